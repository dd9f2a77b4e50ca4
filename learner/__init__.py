"""The DeepSpeed learner that refines the model on demonstrations plus experience and publishes weights.

See ARCHITECTURE.md section 6.
"""
