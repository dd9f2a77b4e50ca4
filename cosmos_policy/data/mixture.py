"""Which episodes and which sample kinds a training batch is made of (method 3.4).

Three pools: demonstrations, successful rollouts and failed rollouts. Each draw picks a pool with
the configured probability, then a step uniformly over all steps of that pool (the official
epoch index space does the same with ``idx % num_steps``), then a sample kind with the pool's
probabilities. The official recipes:
- base training: pools 50 / 25 / 25; demos give policy samples, rollouts give world-model or
  value samples half and half -> 50 % policy, 25 % world model, 25 % value;
- planning model: pools 10 / 45 / 45 and the rollout value samples use the V(s') input masking
  -> 10 % policy, 45 % world model, 45 % V(s').
The split is drawn per sample (a Bernoulli per sample, not a per-batch quota), as in the code.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from cosmos_policy.episode import Episode, Source
from cosmos_policy.errors import ConfigError, InputError
from cosmos_policy.layout import SampleKind

POOLS = ("demo", "success", "failure")


@dataclass
class MixtureConfig:
    """Pool probabilities and, per pool, sample-kind probabilities."""

    pools: dict[str, float] = field(default_factory=lambda: {"demo": 0.5, "success": 0.25, "failure": 0.25})
    kinds: dict[str, dict[str, float]] = field(
        default_factory=lambda: {
            "demo": {"policy": 1.0},
            "success": {"world_model": 0.5, "value": 0.5},
            "failure": {"world_model": 0.5, "value": 0.5},
        }
    )
    # Also count demonstrations as rollouts (the official ALOHA recipe, whose demos never fail, so all
    # go to "success"); a demonstration that failed goes to "failure".
    demos_as_success_rollouts: bool = False

    def __post_init__(self) -> None:
        _check_distribution(self.pools, POOLS, "mixture.pools")
        for pool, prob in self.pools.items():
            if prob > 0 and pool not in self.kinds:
                raise ConfigError(f"mixture.kinds: no sample kinds for pool {pool!r}")
        for pool, dist in self.kinds.items():
            if pool not in POOLS:
                raise ConfigError(f"mixture.kinds: unknown pool {pool!r}; expected one of {POOLS}")
            _check_distribution(dist, tuple(k.value for k in SampleKind), f"mixture.kinds.{pool}")

    def expected_kinds(self) -> dict[str, float]:
        """Overall probability of each sample kind."""
        out: dict[str, float] = {}
        for pool, p in self.pools.items():
            for kind, q in self.kinds.get(pool, {}).items():
                out[kind] = out.get(kind, 0.0) + p * q
        return out


def _check_distribution(dist: dict[str, float], allowed: tuple[str, ...], name: str) -> None:
    if not isinstance(dist, dict) or not dist:
        raise ConfigError(f"{name}: expected a non-empty mapping of name -> probability")
    for key, value in dist.items():
        if key not in allowed:
            raise ConfigError(f"{name}: unknown entry {key!r}; expected one of {list(allowed)}")
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name}.{key}: expected a probability >= 0, got {value!r}")
    total = sum(dist.values())
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"{name}: probabilities must sum to 1, got {total:.6f}")


def _planning(value_kind: str) -> dict[str, Any]:
    """The planning model's mixture (method 6.3): 10 % policy samples from the demonstrations, and from
    successful and failed rollouts alike, world-model and value samples half and half."""
    judged = {"world_model": 0.5, value_kind: 0.5}
    return {"pools": {"demo": 0.1, "success": 0.45, "failure": 0.45},
            "kinds": {"demo": {"policy": 1.0}, "success": dict(judged), "failure": dict(judged)}}


PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    "planning": _planning("value_sprime"),
    # The policy refined on experience (``online.refine_policy``): action samples from the
    # demonstrations and, in equal share, from the system's own successful episodes (the chunks
    # it executed there); failures never teach the policy. Not in the paper, which keeps the acting
    # policy fixed; the architecture's optional policy refinement.
    "policy_experience": {
        "pools": {"demo": 0.5, "success": 0.5},
        "kinds": {"demo": {"policy": 1.0}, "success": {"policy": 1.0}},
    },
    # The planning pools with a model-free, action-conditioned value Q(s, a) (the future state
    # masked) in place of V(s'): for ``planner.value_kind: q_value``.
    "planning_q": _planning("q_value"),
}


def mixture_preset(name: str | dict[str, Any], **overrides: Any) -> MixtureConfig:
    """A preset by name (``base`` 50/25/25, ``planning`` 10/45/45 with V(s') samples, ``planning_q``
    with Q(s, a) samples) or a mapping of ``MixtureConfig`` fields (``pools``, ``kinds``, ...), with
    field overrides."""
    if isinstance(name, str):
        if name not in PRESETS:
            raise ConfigError(f"mixture preset {name!r}: expected one of {sorted(PRESETS)} or a mapping with pools and kinds")
        return MixtureConfig(**{**PRESETS[name], **overrides})
    if not isinstance(name, dict):
        raise ConfigError(f"mixture: expected a preset name or a mapping with pools and kinds, got {type(name).__name__}")
    unknown = sorted(set(name) - {"pools", "kinds", "demos_as_success_rollouts"})
    if unknown:
        raise ConfigError(f"mixture: unknown key(s) {unknown}; expected pools, kinds, demos_as_success_rollouts")
    return MixtureConfig(**{**name, **overrides})


def pools_of(episode: Episode, demos_as_success_rollouts: bool = False) -> list[str]:
    """The pools an episode belongs to; interrupted episodes carry no outcome and join none."""
    if episode.interrupted:
        return []
    if episode.source is Source.DEMO:
        if not demos_as_success_rollouts:
            return ["demo"]
        # Counted as a rollout too, in the pool of its outcome: a scripted expert's failed attempt
        # is a failure for the value function, never a success.
        return ["demo", "success" if episode.success else "failure"]
    return ["success" if episode.success else "failure"]


class EpisodePool:
    """Episodes of one pool; draws a step uniformly over all of their sample steps.

    A sample step has frames at t and at t + ``chunk`` (every step of a dataset episode; the
    query steps of an episode a runner recorded with sparse rendering).
    """

    def __init__(self, name: str, episodes: Iterable[Episode] = (), chunk: int = 1) -> None:
        self.name = name
        self.chunk = chunk
        self.episodes: list[Episode] = []
        self._steps: list[np.ndarray] = []
        self._ends: list[int] = []
        for ep in episodes:
            self.add(ep)

    def add(self, episode: Episode) -> None:
        steps = episode.sample_steps(self.chunk)
        if len(steps) == 0:
            return
        self.episodes.append(episode)
        self._steps.append(steps)
        self._ends.append((self._ends[-1] if self._ends else 0) + len(steps))

    @property
    def num_steps(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __len__(self) -> int:
        return len(self.episodes)

    def draw(self, rng: np.random.Generator) -> tuple[Episode, int]:
        if not self.episodes:
            raise InputError(f"pool {self.name!r}: no episodes to draw from")
        g = int(rng.integers(self.num_steps))
        i = bisect.bisect_right(self._ends, g)
        start = self._ends[i - 1] if i else 0
        return self.episodes[i], int(self._steps[i][g - start])


class MixtureSampler:
    """Draws (pool, sample kind, episode, step) with the configured proportions.

    A pool that is empty (e.g. no failed rollout yet) is skipped and the others renormalized;
    ``skipped`` counts how often that happened so the learner can report it.
    """

    def __init__(self, config: MixtureConfig, pools: dict[str, EpisodePool]) -> None:
        self.config = config
        self.pools = pools
        self.skipped = 0
        self._kinds = {p: ([SampleKind(k) for k in d], np.array(list(d.values()))) for p, d in config.kinds.items()}

    @classmethod
    def from_episodes(cls, config: MixtureConfig, episodes: Iterable[Episode], chunk: int = 1) -> "MixtureSampler":
        pools = {name: EpisodePool(name, chunk=chunk) for name in POOLS}
        for ep in episodes:
            for name in pools_of(ep, config.demos_as_success_rollouts):
                pools[name].add(ep)
        return cls(config, pools)

    def draw(self, rng: np.random.Generator) -> tuple[str, SampleKind, Episode, int]:
        names = [p for p, prob in self.config.pools.items() if prob > 0]
        probs = np.array([self.config.pools[p] if len(self.pools.get(p, ())) else 0.0 for p in names])
        if probs.sum() <= 0:
            raise InputError(f"mixture: every pool with a positive probability is empty ({names})")
        if probs.sum() < 1.0 - 1e-9:
            self.skipped += 1
        pool = names[int(rng.choice(len(names), p=probs / probs.sum()))]
        kinds, kind_probs = self._kinds[pool]
        kind = kinds[int(rng.choice(len(kinds), p=kind_probs))]
        episode, step = self.pools[pool].draw(rng)
        return pool, kind, episode, step
