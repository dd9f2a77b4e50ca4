"""The one replay API that actors and the learner use, whatever the backend.

``ReplayClient`` is the contract: insert an episode (or stream steps into an ``EpisodeWriter``
that inserts the episode when it closes), sample items from a table, update priorities, read
statistics, checkpoint. ``LocalReplay`` runs one store in this process (no Ray: tests, the GPU
machine); ``replay.ray_backend.RayReplay`` shards it over Ray actors; ``replay.reverb_backend``
puts DeepMind Reverb behind the same calls.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cosmos_policy.episode import Episode, ImageSequence, PlannerQuery, Source, encode_jpeg
from cosmos_policy.errors import InputError
from replay.config import ReplayConfig
from replay.store import ReplayStore
from replay.table import SampledItem


class ReplayClient(Protocol):
    def insert(self, table: str, episode: Episode, priority: float | list[float] = 1.0, timeout: float | None = None) -> str: ...
    def sample(self, table: str, n: int, timeout: float | None = None) -> list[SampledItem]: ...
    def update_priorities(self, table: str, keys: list[tuple[str, int]], priorities: list[float]) -> int: ...
    def episode_ids(self, table: str) -> list[str]: ...
    def stats(self) -> dict[str, dict[str, float]]: ...
    def checkpoint(self) -> None: ...
    def set_version(self, version: int) -> None: ...
    def close(self) -> None: ...


def table_for(episode: Episode) -> str:
    """The default table of an episode: demonstrations, or experience split by outcome."""
    if episode.source is Source.DEMO:
        return "demos"
    return "experience_success" if episode.success else "experience_failure"


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


class EpisodeWriter:
    """Collects an episode step by step and inserts it into replay when it closes.

    Frames are JPEG-encoded as they arrive (q95, as at rest), so an open episode holds
    compressed bytes only.
    """

    def __init__(self, client: ReplayClient, instruction: str, source: Source | str = Source.SIM, **episode_fields: Any) -> None:
        self.client = client
        self.instruction = instruction
        self.source = Source(source)
        self.fields = episode_fields
        self.jpegs: dict[str, list[bytes]] = {}
        self.proprio: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.timestamps: list[float] = []
        self.planner: list[PlannerQuery] = []

    def append(self, images: dict[str, np.ndarray], proprio: np.ndarray, action: np.ndarray, timestamp: float | None = None) -> None:
        if self.jpegs and set(images) != set(self.jpegs):
            raise InputError(f"images: cameras {sorted(images)} differ from the episode's {sorted(self.jpegs)}")
        for cam, img in images.items():
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise InputError(f"images[{cam!r}]: expected uint8 (height, width, 3)")
            self.jpegs.setdefault(cam, []).append(encode_jpeg(img))
        self.proprio.append(np.asarray(proprio, dtype=np.float32))
        self.actions.append(np.asarray(action, dtype=np.float32))
        self.timestamps.append(time.time() if timestamp is None else timestamp)

    def record_plan(self, query: PlannerQuery) -> None:
        self.planner.append(query)

    def close(self, success: bool, table: str | None = None, timeout: float | None = None, **fields: Any) -> Episode:
        """Build the episode and insert it (into ``table`` or its default table); returns it."""
        episode = Episode(
            images={c: ImageSequence(j, origin=f"episode[{c!r}]") for c, j in self.jpegs.items()},
            proprio=np.stack(self.proprio) if self.proprio else np.zeros((0, 0)),
            actions=np.stack(self.actions) if self.actions else np.zeros((0, 0)),
            instruction=self.instruction,
            success=success,
            source=self.source,
            planner=self.planner,
            timestamps=np.asarray(self.timestamps),
            **{**self.fields, **fields},
        )
        self.client.insert(table or table_for(episode), episode, timeout=timeout)
        return episode
