"""Start the configured replay backend and hand back its client."""

from __future__ import annotations

from replay.client import LocalReplay, ReplayClient
from replay.config import ReplayConfig


def make_replay(config: ReplayConfig, name: str = "replay", local: bool = False, seed: int | None = None) -> ReplayClient:
    """``local=True`` runs the store in this process (no Ray); otherwise the configured backend."""
    if local:
        return LocalReplay(config)
    if config.backend == "reverb":
        from replay.reverb_backend import ReverbReplay  # optional extra: dm-reverb

        return ReverbReplay(config)
    from replay.ray_backend import RayReplay

    return RayReplay(config, name=name, seed=seed)
