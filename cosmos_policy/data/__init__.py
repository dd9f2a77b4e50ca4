"""Data: episode files, the official dataset readers, statistics, training samples and loaders.

Everything here works on ``cosmos_policy.episode.Episode`` records; nothing imports Ray.
"""
