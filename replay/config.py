"""Replay configuration: tables with Reverb's vocabulary (selectors, removers, rate limiters).

An *item* is one step of an episode; sampling an item returns its ``StepWindow`` (step t, its
future step t + K and the chunk between), never the whole episode. Sizes and rate limits count
items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cosmos_policy.contracts import TableName
from cosmos_policy.errors import ConfigError

SELECTORS = ("uniform", "prioritized", "fifo")
REMOVERS = ("fifo", "age")
LIMITERS = ("min_size", "sample_to_insert")


@dataclass(frozen=True)
class RateLimiterConfig:
    """``min_size``: sampling waits for ``min_size`` items. ``sample_to_insert``: Reverb's
    SampleToInsertRatio; the side that runs more than ``error_buffer`` items ahead of
    ``samples_per_insert`` sampled items per inserted item waits for the other."""

    kind: str = "min_size"
    """min_size or sample_to_insert."""
    min_size: int = 1
    """Items the table holds before anything is sampled."""
    samples_per_insert: float = 1.0
    """sample_to_insert: sampled items per inserted item the limiter holds both sides to."""
    error_buffer: float = 100.0
    """sample_to_insert: how many items either side may run ahead before it waits."""

    def __post_init__(self) -> None:
        if self.kind not in LIMITERS:
            raise ConfigError(f"rate_limiter.kind: expected one of {LIMITERS}, got {self.kind!r}")
        if self.min_size < 1:
            raise ConfigError(f"rate_limiter.min_size: expected >= 1, got {self.min_size}")
        if self.kind == "sample_to_insert":
            if not self.samples_per_insert > 0:
                raise ConfigError(f"rate_limiter.samples_per_insert: expected > 0, got {self.samples_per_insert}")
            if self.error_buffer < max(1.0, self.samples_per_insert):
                raise ConfigError(
                    f"rate_limiter.error_buffer: must be at least max(1, samples_per_insert) = {max(1.0, self.samples_per_insert)}, "
                    f"got {self.error_buffer}"
                )

    def bounds(self) -> tuple[float, float]:
        """(min_diff, max_diff) on inserts * samples_per_insert - samples, as Reverb defines them."""
        if self.kind == "min_size":
            return -math.inf, math.inf
        offset = self.samples_per_insert * self.min_size
        return offset - self.error_buffer, offset + self.error_buffer


@dataclass(frozen=True)
class Signature:
    """What every episode of a table must look like; anything else is rejected at insert."""

    cameras: list[str] = field(default_factory=list)
    """The episode's camera names (empty: any)."""
    image_shape: list[int] | None = None
    """[H, W] of every frame (None: any)."""
    proprio_dim: int | None = None
    """Proprio dimensions (None: any)."""
    action_dim: int | None = None
    """Action dimensions (None: any)."""


@dataclass(frozen=True)
class TableConfig:
    """One table: how items are selected and removed, its size, rate limiter and signature."""

    name: str
    """The table's name (cosmos_policy.contracts.TableName for the mixture's three)."""
    sampler: str = "uniform"
    """uniform, prioritized or fifo."""
    priority_exponent: float = 1.0
    """prioritized: P(item) ~ priority ** exponent."""
    remover: str = "fifo"
    """Which whole episodes leave when the table is full: fifo, or age (max_age_s)."""
    max_items: int = 1_000_000
    """Items (episode steps) the table holds at most."""
    max_bytes: int | None = None
    """Bytes the table holds at most (None: no limit)."""
    max_age_s: float | None = None
    """With the age remover: episodes inserted longer ago leave."""
    max_times_sampled: int | None = None
    """Items leave after this many samples (1 with fifo: a queue; None: never)."""
    window: int = 16
    """The action chunk K of the step windows handed out (the experiment sets the layout's)."""
    rate_limiter: RateLimiterConfig = field(default_factory=RateLimiterConfig)
    """When inserts and samples wait for each other."""
    signature: Signature = field(default_factory=Signature)
    """What every episode of the table must look like."""

    def __post_init__(self) -> None:
        where = f"replay.tables.{self.name}"
        if self.sampler not in SELECTORS:
            raise ConfigError(f"{where}.sampler: expected one of {SELECTORS}, got {self.sampler!r}")
        if self.remover not in REMOVERS:
            raise ConfigError(f"{where}.remover: expected one of {REMOVERS}, got {self.remover!r}")
        if self.remover == "age" and (self.max_age_s is None or self.max_age_s <= 0):
            raise ConfigError(f"{where}.max_age_s: the 'age' remover needs a positive max_age_s")
        if self.max_items < 1:
            raise ConfigError(f"{where}.max_items: expected >= 1, got {self.max_items}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ConfigError(f"{where}.max_bytes: expected >= 1 or None, got {self.max_bytes}")
        if self.priority_exponent < 0:
            raise ConfigError(f"{where}.priority_exponent: expected >= 0, got {self.priority_exponent}")
        if self.window < 1:
            raise ConfigError(f"{where}.window: expected >= 1, got {self.window}")
        if self.max_times_sampled is not None and self.max_times_sampled < 1:
            raise ConfigError(f"{where}.max_times_sampled: expected >= 1 or None, got {self.max_times_sampled}")


@dataclass(frozen=True)
class ReplayConfig:
    """The replay service: which backend, where its files live, how many shards, which tables."""

    backend: str = "ray"
    """ray (ReplayStore shards on any Python) or reverb (DeepMind Reverb servers, the reverb extra)."""
    root: str = "replay"
    """Episode files and checkpoints live here (the experiment's default: run_dir/replay)."""
    shards: int = 1
    """Shard actors; each holds the episodes whose id hashes to it (one Reverb server each with reverb)."""
    tables: list[TableConfig] = field(default_factory=lambda: default_tables())
    """The tables (default: demos, experience_success, experience_failure)."""
    checkpoint_every_s: float = 60.0
    """Seconds between checkpoints of the tables' metadata (episode files are durable at once)."""

    def __post_init__(self) -> None:
        if self.backend not in ("ray", "reverb"):
            raise ConfigError(f"replay.backend: expected 'ray' or 'reverb', got {self.backend!r}")
        if self.shards < 1:
            raise ConfigError(f"replay.shards: expected >= 1, got {self.shards}")
        if not self.checkpoint_every_s >= 0:
            raise ConfigError(f"replay.checkpoint_every_s: expected seconds >= 0, got {self.checkpoint_every_s}")
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names) or not names:
            raise ConfigError(f"replay.tables: expected distinct table names, got {names}")

    def table(self, name: str) -> TableConfig:
        for t in self.tables:
            if t.name == name:
                return t
        raise ConfigError(f"replay: no table {name!r}; tables are {[t.name for t in self.tables]}")


def default_tables(window: int = 16, **overrides: Any) -> list[TableConfig]:
    """The three tables of the mixture: demonstrations, successful and failed experience."""
    return [TableConfig(name=n.value, window=window, **overrides) for n in TableName]
