"""EnvRunner: episodes with the policy (and planner) in the loop, recorded into replay.

One episode: reset the simulator to a task, a seed and an initial state; at every query step
ask the policy (local, or a PolicyServer) for a chunk, optionally best-of-N planned; execute
``execute`` actions of it, rendering the cameras only at the steps whose observation the next
query (or the episode's end) needs; record every step (images where rendered, proprio, executed
action) with the episode's metadata (seed, initial state, weight versions, the planner's
candidate values and choice) and insert it into replay.

Frames are rendered at query steps, so a recorded episode has images where a training sample
can start (and end: t + K is the next query when ``execute`` = K); the last query of an episode
that ends mid-chunk has no rendered future frame and gives no sample.

The simulator runs in its own process. If it dies mid-episode, the runner restarts it, reports
the episode as ``interrupted`` (never inserted into replay: its outcome is no label) and
carries on with the next episode.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

try:
    import ray
except ImportError:  # optional where only the Ray-free parts run (e.g. a GPU machine without the Ray wheel)
    ray = None

from actors.branching import Branching, branch_point_only
from actors.env import check_action, check_observation
from actors.env_process import EnvConfig, EnvProcess, SimulatorCrashed
from actors.policies import PolicySpec, local_policies
from cosmos_policy.contracts import EnvSpec, Policy, ReplayClient, TableName, WeightSource
from cosmos_policy.episode import EpisodeRecorder, Source
from cosmos_policy.errors import ConfigError


@dataclass
class RunnerConfig:
    env: EnvConfig = field(default_factory=EnvConfig)
    execute: int = 16  # actions executed per query (the chunk K for LIBERO and ALOHA, 16 of RoboCasa's 32)
    plan: bool = False  # best-of-N planning at every query
    # With ``plan``: plan only at the first N queries of an episode and act on the policy's own chunk
    # after (None: every query). Where the outcome is decided early (the built-in task's approach,
    # research/learning_proof), this spends the planner's compute there and keeps a judge that was
    # trained on those decisions away from states it judges poorly.
    plan_queries: int | None = None
    record: bool = True  # insert episodes into replay
    max_steps: int | None = None  # overrides the task's step limit (tests, quick runs)
    # A branching episode's record keeps camera frames at its branch point (and that sample's future
    # frame, this many steps on: the layout's action chunk) only, the frames a judge trains on
    # (actors.branching.branch_point_only); None: every rendered frame.
    branch_point_only: int | None = None

    def __post_init__(self) -> None:
        if self.plan_queries is not None and (isinstance(self.plan_queries, bool) or not isinstance(self.plan_queries, int) or self.plan_queries < 1):
            raise ConfigError(f"plan_queries: expected an integer >= 1 or None (every query), got {self.plan_queries!r}")

    def branched(self, queries: int) -> RunnerConfig:
        """The config of a branching episode whose first ``queries`` queries go through ``Branching``: planned
        there, and after as this config says (every query, the first ``plan_queries``, or none)."""
        planned = self.plan_queries if self.plan else queries
        return dataclasses.replace(self, plan=True, plan_queries=None if planned is None else max(planned, queries))


@dataclass
class EpisodeResult:
    """What a runner reports for one episode."""

    episode_id: str
    task: str
    seed: int
    success: bool
    steps: int
    queries: int
    interrupted: bool
    wall_s: float
    policy_version: int | None = None
    planning_version: int | None = None
    # The value at each planned query (at every query when none was planned): the planner's calibration. A
    # policy's own value output at its unplanned queries is no judge's (the planning model's is what ranks).
    predicted_values: list[float] = field(default_factory=list)
    final_state: np.ndarray | None = None  # the simulator state at the end (replay checks)
    error: str = ""


class EpisodeRunner:
    """Runs episodes in one process; ``EnvRunner`` is the Ray actor around it.

    ``policy`` acts; ``planner`` (best-of-N, also a ``Policy``) chooses the chunk at the queries
    where the runner plans. Both are reset between episodes, where a local policy takes newer
    weights; the episode records the versions the chunks came with.
    """

    def __init__(self, config: RunnerConfig, policy: Policy, planner: Policy | None = None, replay: ReplayClient | None = None) -> None:
        self.config = config
        self.policy = policy
        self.planner = planner
        self.replay = replay
        self.env = EnvProcess(config.env)
        self.spec = self.env.spec
        self.crashes = 0

    def simulator_pid(self) -> int | None:
        return self.env.pid

    def run(self, task: str, seed: int, initial_state: np.ndarray | None = None, metadata: dict | None = None,
            plan: bool | None = None, record: bool | None = None, branch: Sequence[int] | None = None,
            episode_id: str | None = None) -> EpisodeResult:
        """One episode; ``plan`` / ``record`` override the runner's config for it (evaluation: no recording).

        ``branch``: a branching episode (``actors.branching``) that executes the planner's candidate
        ``branch[k]`` at its k-th query; the last index is the branch point. ``episode_id``: the id the
        episode is recorded under (a fresh one if None); the job names a round's episodes by what they
        play, so a round played again after a stop skips the episodes replay already holds.
        """
        start = time.time()
        config, planner = self.config, self.planner
        if branch is not None:
            if planner is None:
                raise ConfigError("branch: this runner has no planner (branching executes the planner's candidates)")
            config, planner = config.branched(len(branch)), Branching(planner, branch)
            metadata = {**(metadata or {}), "branch_candidates": [int(c) for c in branch]}
        plan = config.plan if plan is None else plan
        if plan and planner is None:
            raise ConfigError("plan: this runner has no planner (no planning checkpoint)")
        record = config.record if record is None else record
        recorder = EpisodeRecorder(self.spec.cameras)
        versions: dict[str, int | None] = {"policy": None, "planning": None}
        values: list[float] = []
        planned_values: list[float] = []
        success, interrupted, error, queries = False, False, "", 0
        final_state = None
        instruction = ""
        where = f"env {self.config.env.name}:{task}"
        try:
            for p in (self.policy, planner):
                if p is not None:
                    p.reset()
            instruction = self.env.instruction(task)
            limit = config.max_steps or self.env.max_steps(task)
            obs = check_observation(self.env.reset(task, seed, initial_state), self.spec, rendered=True, where=where)
            queue: list[np.ndarray] = []
            for t in range(limit):
                if not queue:
                    planned = plan and (config.plan_queries is None or queries < config.plan_queries)
                    chunk = (planner if planned else self.policy).infer(obs, seed + 7919 * queries)  # type: ignore[union-attr]
                    versions["policy"] = chunk.policy_version
                    versions["planning"] = versions["planning"] if chunk.planning_version is None else chunk.planning_version
                    queries += 1
                    values.append(float(chunk.value))
                    if planned:
                        planned_values.append(float(chunk.value))
                    if chunk.planner is not None:
                        chunk.planner.step = t
                        recorder.planner.append(chunk.planner)
                    queue = list(chunk.actions[: config.execute])
                action = check_action(queue.pop(0), self.spec, where=where)  # a NaN action never reaches the env
                recorder.add(obs.images, obs.proprio, action)
                result = self.env.step(action, render=not queue)
                obs = check_observation(result.observation, self.spec, rendered=not queue, where=where)
                success = bool(result.success)
                if result.done:
                    break
            final_state = np.asarray(self.env.get_state())
        except SimulatorCrashed as exc:
            interrupted, error = True, str(exc)
            self.crashes += 1
            self.env.restart()
        episode = recorder.episode(
            instruction=instruction or task, success=success, task=task, seed=seed, initial_state=initial_state, source=Source.SIM,
            policy_version=versions["policy"], planning_version=versions["planning"], interrupted=interrupted,
            metadata={**(metadata or {}), "env": self.config.env.name, **({"error": error} if error else {})},
            **({"episode_id": episode_id} if episode_id else {}),
        )
        # An interrupted episode is reported (marked) but never inserted: its outcome is no label.
        if record and self.replay is not None and episode is not None and not interrupted:
            if branch is not None and config.branch_point_only:
                episode = branch_point_only(episode, config.branch_point_only)
            self.replay.insert(TableName.of(episode), episode)
        return EpisodeResult(
            episode_id=episode.episode_id if episode is not None else "", task=task, seed=seed, success=success,
            steps=recorder.steps, queries=queries, interrupted=interrupted, wall_s=time.time() - start,
            policy_version=versions["policy"], planning_version=versions["planning"], predicted_values=planned_values or values,
            final_state=final_state, error=error,
        )

    def close(self) -> None:
        self.env.close()


class EnvRunner:
    """A Ray actor running episodes of one environment with a policy in the loop.

    ``policy`` and ``planner`` are ``Policy`` objects (``ServerPolicy`` clients of a PolicyServer:
    many runners, one GPU), or ``policy`` is a ``PolicySpec`` built here (a policy in the runner
    itself, taking new versions from ``weights`` between episodes). ``replay`` is the replay
    client the episodes go to (handed in by the job, whatever its backend).
    """

    def __init__(self, config: RunnerConfig, policy: Policy | PolicySpec, planner: Policy | None = None,
                 replay: ReplayClient | None = None, weights: WeightSource | None = None) -> None:
        import os
        import socket

        if isinstance(policy, PolicySpec):
            policy, planner = local_policies(policy, weights)
        self.runner = EpisodeRunner(config, policy, planner, replay if config.record else None)
        # Recorded with every episode, so replay shows which actor (and host) an episode came from.
        self.identity = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, task: str, seed: int, initial_state: np.ndarray | None = None, metadata: dict | None = None,
            plan: bool | None = None, record: bool | None = None, branch: Sequence[int] | None = None,
            episode_id: str | None = None) -> EpisodeResult:
        return self.runner.run(task, seed, initial_state, {"runner": self.identity, **(metadata or {})}, plan, record, branch, episode_id)

    def run_trial(self, task: str, seed: int, trial: int, plan: bool | None = None, record: bool | None = None) -> EpisodeResult:
        """The evaluation protocol's trial: the task's ``trial``-th fixed initial state (an environment without
        fixed states starts from the seed's placement)."""
        states = self.runner.env.initial_states(task)
        if states and not 0 <= trial < len(states):  # never another trial's state under this trial's name
            raise ConfigError(f"trial {trial}: task {task!r} has {len(states)} fixed initial states (trials 0 to {len(states) - 1})")
        state = states[trial] if states else None
        return self.runner.run(task, seed, state, {"runner": self.identity, "trial": trial}, plan, record)

    def tasks(self) -> list[str]:
        return self.runner.env.tasks()

    def spec(self) -> EnvSpec:
        """What the environment gives and takes (cameras, image size, dims, control rate)."""
        return self.runner.spec

    def simulator_pid(self) -> int | None:
        return self.runner.simulator_pid()

    def crashes(self) -> int:
        return self.runner.crashes


if ray is not None:  # the Ray actor; without Ray, EpisodeRunner runs the same episodes in-process
    EnvRunner = ray.remote(max_restarts=-1)(EnvRunner)
