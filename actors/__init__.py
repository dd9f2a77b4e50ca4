"""Ray actors that act: simulators (EnvRunner), policy servers, real robots and the evaluator.

They drive ``cosmos_policy`` models and send every episode to ``replay``; they meet ``learner``
only through weight versions. See ARCHITECTURE.md section 4.
"""
