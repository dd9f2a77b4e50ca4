"""``LocalReplay``: the ``ReplayClient`` contract (``cosmos_policy.contracts``) on one store in this process.

No Ray: tests, tools and a GPU machine without a cluster. ``replay.ray_backend.RayReplay``
shards the same store (or ``replay.reverb_backend``'s, DeepMind Reverb behind the same calls)
over Ray actors.
"""

from __future__ import annotations

from pathlib import Path

from cosmos_policy.contracts import SampledItem
from cosmos_policy.episode import Episode
from replay.config import ReplayConfig
from replay.store import ReplayStore


class LocalReplay:
    """A single in-process store."""

    def __init__(self, config: ReplayConfig, root: str | Path | None = None) -> None:
        self.store = ReplayStore(config, root or config.root)

    def insert(self, table: str, episode: Episode, priority: float | list[float] = 1.0, timeout: float | None = None) -> str:
        return self.store.insert(table, episode, priority, timeout)

    def sample(self, table: str, n: int, timeout: float | None = None) -> list[SampledItem]:
        return self.store.sample(table, n, timeout)

    def update_priorities(self, table: str, keys: list[tuple[str, int]], priorities: list[float]) -> int:
        return self.store.update_priorities(table, keys, priorities)

    def episode_ids(self, table: str) -> list[str]:
        return self.store.episode_ids(table)

    def stats(self) -> dict[str, dict[str, float]]:
        return self.store.stats()

    def checkpoint(self) -> None:
        self.store.checkpoint()

    def set_version(self, version: int) -> None:
        self.store.set_version(version)

    def close(self) -> None:
        self.store.checkpoint()
