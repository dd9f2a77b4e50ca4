"""Normalization statistics from demonstrations (method 2.1, 7.4).

Computed over every step of every demonstration; rollouts are normalized with these same demo
statistics (never recomputed), so out-of-range rollout values map outside [-1, 1], as in the
official code. ``load_or_compute`` mirrors the official behaviour of writing
``dataset_statistics.json`` next to the data on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from cosmos_policy.codec import NormalizationStats
from cosmos_policy.episode import Episode, Source
from cosmos_policy.errors import StatisticsError


def compute_statistics(episodes: Iterable[Episode]) -> NormalizationStats:
    """Per-dimension statistics of actions and proprio over the demonstrations given."""
    actions, proprio = [], []
    for ep in episodes:
        if ep.source is not Source.DEMO:
            raise StatisticsError(f"episode {ep.episode_id}: statistics come from demonstrations only, got a {ep.source.value} episode")
        actions.append(ep.actions)
        proprio.append(ep.proprio)
    if not actions:
        raise StatisticsError("no demonstrations to compute statistics from")
    dims = {a.shape[1] for a in actions}, {p.shape[1] for p in proprio}
    if len(dims[0]) != 1 or len(dims[1]) != 1:
        raise StatisticsError(f"demonstrations disagree on dimensions: actions {sorted(dims[0])}, proprio {sorted(dims[1])}")
    return NormalizationStats.compute(np.concatenate(actions), np.concatenate(proprio))


def load_or_compute(path: str | Path, demos: Iterable[Episode]) -> NormalizationStats:
    """Read ``path`` if it exists; otherwise compute from ``demos`` and write it there."""
    path = Path(path)
    if path.exists():
        return NormalizationStats.load(path)
    stats = compute_statistics(demos)
    stats.save(path)
    return stats
