"""The replay service: tables of episodes with Reverb's semantics, a Ray backend and a Reverb backend.

See ARCHITECTURE.md section 5.
"""
