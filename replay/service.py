"""Where the configured backend is chosen: the store a shard (or this process) holds, and the client to hand out.

A store is what a ``ReplayShard`` hosts: the ``ReplayClient`` calls plus ``weight(table)`` (its
share of a table's sampling mass) and ``restored`` (episodes per table found at start). A new
backend is one more store class and one more branch in ``open_store``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from cosmos_policy.contracts import ReplayClient
from replay.config import ReplayConfig
from replay.local import LocalReplay
from replay.store import ReplayStore


class Store(ReplayClient, Protocol):
    restored: dict[str, int]

    def weight(self, table: str) -> float: ...


def open_store(config: ReplayConfig, root: str | Path, seed: int = 0) -> Store:
    """The store of ``config.backend`` under ``root``: a ``ReplayStore``, or a ``ReverbReplay`` with its own server."""
    if config.backend == "reverb":
        from replay.reverb_backend import ReverbReplay  # optional extra: dm-reverb

        return ReverbReplay(config, root)
    return ReplayStore(config, root, seed=seed)  # type: ignore[return-value]


def make_replay(config: ReplayConfig, names: list[str] | None = None, local: bool = False, seed: int | None = None) -> ReplayClient:
    """The replay client: ``local=True`` keeps the store in this process (no Ray), else shards over Ray.

    ``names``: one Ray actor name per shard (``config.shards``), chosen by the caller; None for
    anonymous shards.
    """
    if local:
        return LocalReplay(config) if config.backend == "ray" else open_store(config, config.root)
    from replay.ray_backend import RayReplay

    return RayReplay(config, names=names, seed=seed)
