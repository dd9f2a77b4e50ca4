"""Replay configuration: tables with Reverb's vocabulary (selectors, removers, rate limiters).

An *item* is one step of an episode; sampling an item returns its ``StepWindow`` (step t, its
future step t + K and the chunk between), never the whole episode. Sizes and rate limits count
items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cosmos_policy.errors import ConfigError

SELECTORS = ("uniform", "prioritized", "fifo")
REMOVERS = ("fifo", "age")
LIMITERS = ("min_size", "sample_to_insert")


@dataclass
class RateLimiterConfig:
    """``min_size``: sampling waits for ``min_size`` items. ``sample_to_insert``: Reverb's
    SampleToInsertRatio; the side that runs more than ``error_buffer`` items ahead of
    ``samples_per_insert`` sampled items per inserted item waits for the other."""

    kind: str = "min_size"
    min_size: int = 1
    samples_per_insert: float = 1.0
    error_buffer: float = 100.0

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


@dataclass
class Signature:
    """What every episode of a table must look like; anything else is rejected at insert."""

    cameras: list[str] = field(default_factory=list)  # empty: any
    image_shape: list[int] | None = None  # [H, W]
    proprio_dim: int | None = None
    action_dim: int | None = None


@dataclass
class TableConfig:
    name: str
    sampler: str = "uniform"
    priority_exponent: float = 1.0  # prioritized: P(item) ~ priority ** exponent
    remover: str = "fifo"  # which items leave when the table is full
    max_items: int = 1_000_000
    max_bytes: int | None = None
    max_age_s: float | None = None  # remover "age": items inserted longer ago leave
    max_times_sampled: int | None = None  # items leave after this many samples (1 with fifo: a queue)
    window: int = 16  # the action chunk K of the step windows handed out
    rate_limiter: RateLimiterConfig = field(default_factory=RateLimiterConfig)
    signature: Signature = field(default_factory=Signature)

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


@dataclass
class ReplayConfig:
    backend: str = "ray"  # or "reverb"
    root: str = "replay"  # episode files and checkpoints live here
    shards: int = 1  # ray backend: shard actors
    tables: list[TableConfig] = field(default_factory=lambda: default_tables())
    checkpoint_every_s: float = 60.0

    def __post_init__(self) -> None:
        if self.backend not in ("ray", "reverb"):
            raise ConfigError(f"replay.backend: expected 'ray' or 'reverb', got {self.backend!r}")
        if self.shards < 1:
            raise ConfigError(f"replay.shards: expected >= 1, got {self.shards}")
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
    return [TableConfig(name=n, window=window, **overrides) for n in ("demos", "experience_success", "experience_failure")]
