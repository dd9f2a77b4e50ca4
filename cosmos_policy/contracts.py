"""The contracts of the system on one page: what crosses between the roles, and what each role implements.

Everything else implements these. A local policy, a planner, the PolicyServer's client and a
robot gateway's client are all a ``Policy``; simulators and robots are an ``Env``; the Ray and
Reverb replay backends are a ``ReplayClient``; the learner's weight registry is read through a
``WeightSource``. ``launch/`` builds the concrete ones from the experiment config and hands them
in, so ``actors/`` and ``learner/`` never name each other or a backend. No Ray here: every
component also runs in one process. (ARCHITECTURE.md sections 1 and 3-6.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import numpy as np

from cosmos_policy.episode import Episode, PlannerQuery, Source, StepWindow

__all__ = [
    "ActionChunk", "Env", "EnvSpec", "Episode", "Observation", "PlannerQuery", "Policy", "ReplayClient", "SampledItem", "Source",
    "StepResult", "StepWindow", "TableName", "Target", "WeightPublisher", "WeightSource", "WeightVersion",
]


# ---- the policy: observation in, action chunk out -----------------------------------------------
@dataclass
class Observation:
    """What an environment or robot reports at a query, in dataset units."""

    images: dict[str, np.ndarray]  # camera -> uint8 (H, W, 3)
    proprio: np.ndarray  # (d_p,)
    instruction: str


@dataclass
class ActionChunk:
    """One query's answer: the chunk to execute, what the model predicts of it, and who produced it."""

    actions: np.ndarray  # (K, d_a) in dataset units
    value: float  # predicted value of the future state, [0, 1] (with planning: the chosen candidate's score)
    future_proprio: np.ndarray | None = None  # (d_p,)
    future_images: dict[str, np.ndarray] | None = None  # camera -> uint8 (S, S, 3), when decoded
    planner: PlannerQuery | None = None  # what best-of-N saw (candidates, values, choice); None without planning
    policy_version: int | None = None  # the weight versions that produced this chunk
    planning_version: int | None = None
    latents: Any = field(default=None, repr=False)  # the final latents (C, T, h, w), when asked for


class Policy(Protocol):
    """``infer(observation) -> ActionChunk``; ``reset()`` between episodes (where a local policy takes new weights)."""

    def infer(self, observation: Observation, seed: int | None = None) -> ActionChunk: ...
    def reset(self) -> None: ...


# ---- environments: simulators and robots ----------------------------------------------------------
@dataclass(frozen=True)
class EnvSpec:
    """What an environment gives and takes."""

    cameras: tuple[str, ...]  # camera names as the model's layout calls them (primary, wrist...)
    image_size: tuple[int, int]  # (H, W) of rendered images
    proprio_dim: int
    action_dim: int
    action_low: tuple[float, ...] = ()  # per-dimension bounds; empty = unbounded
    action_high: tuple[float, ...] = ()
    control_hz: float = 20.0


@dataclass
class StepResult:
    observation: Observation  # images are empty unless the step was rendered
    success: bool
    done: bool  # success, or the task's step limit
    info: dict = field(default_factory=dict)


class Env(Protocol):
    """Tasks, each started from a seed and an optional simulator state; cameras rendered only when asked."""

    spec: EnvSpec

    def tasks(self) -> list[str]: ...
    def instruction(self, task: str) -> str: ...
    def initial_states(self, task: str) -> list[np.ndarray]: ...
    def max_steps(self, task: str) -> int: ...
    def reset(self, task: str, seed: int, initial_state: np.ndarray | None = None) -> Observation: ...
    def step(self, action: np.ndarray, render: bool = True) -> StepResult: ...
    def get_state(self) -> np.ndarray: ...
    def close(self) -> None: ...


# ---- replay: tables of episodes, sampled as step windows ----------------------------------------
class TableName(StrEnum):
    """The tables of the training mixture: demonstrations, and experience split by outcome."""

    DEMOS = "demos"
    EXPERIENCE_SUCCESS = "experience_success"
    EXPERIENCE_FAILURE = "experience_failure"

    @classmethod
    def of(cls, episode: Episode) -> TableName:
        if episode.source is Source.DEMO:
            return cls.DEMOS
        return cls.EXPERIENCE_SUCCESS if episode.success else cls.EXPERIENCE_FAILURE


@dataclass
class SampledItem:
    """One sampled item: which step of which episode, its selection odds, and its step window."""

    table: str
    episode_id: str
    step: int
    priority: float
    probability: float
    times_sampled: int
    window: StepWindow


class ReplayClient(Protocol):
    """An insert returns once the episode is durable; a sample hands out step windows, never whole episodes."""

    def insert(self, table: str, episode: Episode, priority: float | list[float] = 1.0, timeout: float | None = None) -> str: ...
    def sample(self, table: str, n: int, timeout: float | None = None) -> list[SampledItem]: ...
    def update_priorities(self, table: str, keys: list[tuple[str, int]], priorities: list[float]) -> int: ...
    def episode_ids(self, table: str) -> list[str]: ...
    def stats(self) -> dict[str, dict[str, float]]: ...
    def checkpoint(self) -> None: ...
    def set_version(self, version: int) -> None: ...
    def close(self) -> None: ...


# ---- weights: the learner publishes versions, actors take them ------------------------------------
class Target(StrEnum):
    """Which model a weight version is for: the acting policy, or the planning model (world model + value)."""

    POLICY = "policy"
    PLANNING = "planning"


@dataclass(frozen=True)
class WeightVersion:
    version: int
    step: int  # learner optimizer step that produced it
    checksum: str  # cosmos_policy.weights.checksum of the packed tensors
    nbytes: int
    target: str = Target.POLICY.value
    created: float = field(default_factory=time.time)


class WeightSource(Protocol):
    """Where actors find published weights: the version of ``target`` served now, unless it is ``have`` (the one they
    hold). Under eval-gated promotion that is the last promoted version, which a rollback makes an older one."""

    def latest(self, target: str, have: int | None = None) -> tuple[WeightVersion, dict[str, Any]] | None: ...


class WeightPublisher(Protocol):
    """Where the learner puts a version (packed by ``cosmos_policy.weights.Packer``): ``publish`` returns its record;
    ``register`` takes a version already in the object store by reference (a learner rank's return: the learner group
    owns it, so it outlives the rank) and returns its status."""

    def publish(self, packed: dict[str, Any], version: int, step: int, target: str) -> WeightVersion: ...

    def register(self, record: WeightVersion, ref: Any) -> str: ...
