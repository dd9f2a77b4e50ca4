"""The replay service: tables of episodes with Reverb's semantics, on an in-process or a Reverb backend, sharded over Ray.

See README.md in this folder.
"""
