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

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

try:
    import ray
except ImportError:  # optional where only the Ray-free parts run (e.g. a GPU machine without the Ray wheel)
    ray = None

from actors.env import check_action, check_observation
from actors.env_process import EnvConfig, EnvProcess, SimulatorCrashed
from cosmos_policy.episode import Episode, ImageSequence, PlannerQuery, Source, encode_jpeg
from cosmos_policy.errors import ConfigError
from cosmos_policy.planner import Planner
from cosmos_policy.policy import CosmosPolicy, Observation, PolicyOutput
from replay.client import ReplayClient, table_for
from replay.config import ReplayConfig


class PolicyClient(Protocol):
    """Something that turns an observation into a chunk: a local policy or a PolicyServer."""

    def query(self, observation: Observation, seed: int, plan: bool) -> tuple[PolicyOutput, PlannerQuery | None, dict[str, int | None]]: ...


class LocalPolicyClient:
    """A policy (and planner) in the runner's own process."""

    def __init__(self, policy: CosmosPolicy, planner: Planner | None = None, versions: dict[str, int | None] | None = None) -> None:
        self.policy = policy
        self.planner = planner
        self.versions = versions or {"policy": None, "planning": None}

    def query(self, observation: Observation, seed: int, plan: bool) -> tuple[PolicyOutput, PlannerQuery | None, dict[str, int | None]]:
        if plan:
            if self.planner is None:
                raise ValueError("plan: this runner has no planner")
            p = self.planner.plan(observation, seed)
            return p.output, PlannerQuery(0, p.candidate_values, p.chosen, p.candidate_actions), dict(self.versions)
        return self.policy.act(observation, seed), None, dict(self.versions)


class ServerPolicyClient:
    """A PolicyServer actor, queried over Ray."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def query(self, observation: Observation, seed: int, plan: bool) -> tuple[PolicyOutput, PlannerQuery | None, dict[str, int | None]]:
        import ray

        if plan:
            reply = ray.get(self.server.plan.remote(observation, seed))
            p = reply.result
            query = PlannerQuery(0, p.candidate_values, p.chosen, p.candidate_actions)
            return p.output, query, {"policy": reply.policy_version, "planning": reply.planning_version}
        reply = ray.get(self.server.act.remote(observation, seed))
        return reply.result, None, {"policy": reply.policy_version, "planning": reply.planning_version}


@dataclass
class RunnerConfig:
    env: EnvConfig = field(default_factory=EnvConfig)
    execute: int = 16  # actions executed per query (the chunk K for LIBERO and ALOHA, 16 of RoboCasa's 32)
    plan: bool = False  # best-of-N planning at every query
    # With ``plan``: plan only at the first N queries of an episode and act on the policy's own chunk
    # after (None: every query). Where the outcome is decided early (the built-in task's approach,
    # bench/planner_oracle.py), this spends the planner's compute there and keeps a judge that was
    # trained on those decisions away from states it judges poorly.
    plan_queries: int | None = None
    record: bool = True  # insert episodes into replay
    max_steps: int | None = None  # overrides the task's step limit (tests, quick runs)

    def __post_init__(self) -> None:
        if self.plan_queries is not None and (isinstance(self.plan_queries, bool) or not isinstance(self.plan_queries, int) or self.plan_queries < 1):
            raise ConfigError(f"plan_queries: expected an integer >= 1 or None (every query), got {self.plan_queries!r}")


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
    predicted_values: list[float] = field(default_factory=list)  # the value at each query (planner calibration)
    final_state: np.ndarray | None = None  # the simulator state at the end (replay checks)
    error: str = ""


class EpisodeRunner:
    """Runs episodes in one process; ``EnvRunner`` is the Ray actor around it."""

    def __init__(self, config: RunnerConfig, policy: PolicyClient, replay: ReplayClient | None = None) -> None:
        self.config = config
        self.policy = policy
        self.replay = replay
        self.env = EnvProcess(config.env)
        self.spec = self.env.spec
        self.crashes = 0

    def simulator_pid(self) -> int | None:
        return self.env.pid

    def run(self, task: str, seed: int, initial_state: np.ndarray | None = None, metadata: dict | None = None,
            plan: bool | None = None, record: bool | None = None, branch: int | Sequence[int] | None = None) -> EpisodeResult:
        """One episode; ``plan`` / ``record`` override the runner's config for it (evaluation: no recording).

        ``branch``: at the first query, execute the planner's candidate of this index instead of its
        choice (later queries as configured); a sequence gives the candidate executed at each of the
        first ``len(branch)`` queries, and its last query is the branch point. Episodes with the same
        seed, initial state and leading candidates and every last index 0..N-1 show what each chunk
        leads to from one state: the contrast a value has to learn to rank candidates
        (``online.branch_first_query``; ``launch/collect.py --branch-query``). The episode's metadata
        records the sequence (``branch_candidates``) and the branch point's step (``branch_step``).
        """
        start = time.time()
        branches = _branch_sequence(branch)
        plan = self.config.plan if plan is None else plan
        record = self.config.record if record is None else record
        recorder = _Recorder(self.spec.cameras)
        versions: dict[str, int | None] = {"policy": None, "planning": None}
        planner: list[PlannerQuery] = []
        values: list[float] = []
        success, interrupted, error, queries = False, False, "", 0
        final_state = None
        branch_step: int | None = None
        instruction = ""
        where = f"env {self.config.env.name}:{task}"
        try:
            instruction = self.env.instruction(task)
            limit = self.config.max_steps or self.env.max_steps(task)
            obs = check_observation(self.env.reset(task, seed, initial_state), self.spec, rendered=True, where=where)
            queue: list[np.ndarray] = []
            for t in range(limit):
                if not queue:
                    planned = plan and (self.config.plan_queries is None or queries < self.config.plan_queries)
                    branching = queries < len(branches)
                    out, query, versions = self.policy.query(obs, seed + 7919 * queries, planned or branching)
                    chunk = out.actions
                    if branching:
                        chunk = _branch_chunk(query, branches[queries])
                        query.chosen = branches[queries]
                        branch_step = t
                    queries += 1
                    values.append(float(query.candidate_values[query.chosen]) if branching else float(out.value))
                    if query is not None:
                        query.step = t
                        planner.append(query)
                    queue = list(chunk[: self.config.execute])
                action = check_action(queue.pop(0), self.spec, where=where)  # a NaN action never reaches the env
                recorder.add(obs, action)
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
            instruction=instruction or task, success=success, task=task, seed=seed, initial_state=initial_state,
            policy_version=versions["policy"], planning_version=versions["planning"], planner=planner,
            interrupted=interrupted, metadata={**(metadata or {}), "env": self.config.env.name, **({"error": error} if error else {}),
                      **({"branch_candidates": list(branches), "branch_step": branch_step} if branches and branch_step is not None else {})},
        )
        # An interrupted episode is reported (marked) but never inserted: its outcome is no label.
        if record and self.replay is not None and episode is not None and not interrupted:
            self.replay.insert(table_for(episode), episode)
        return EpisodeResult(
            episode_id=episode.episode_id if episode is not None else "", task=task, seed=seed, success=success,
            steps=recorder.steps, queries=queries, interrupted=interrupted, wall_s=time.time() - start,
            policy_version=versions["policy"], planning_version=versions["planning"], predicted_values=values,
            final_state=final_state, error=error,
        )

    def close(self) -> None:
        self.env.close()


def _branch_sequence(branch: int | Sequence[int] | None) -> tuple[int, ...]:
    """``run``'s ``branch`` as the candidate index of each leading query (empty: no branching)."""
    if branch is None:
        return ()
    seq = list(branch) if isinstance(branch, (list, tuple)) else [branch]
    if not seq or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) for b in seq):
        raise ConfigError(f"branch: expected a candidate index or a non-empty sequence of them (one per leading query), got {branch!r}")
    return tuple(int(b) for b in seq)


def _branch_chunk(query: PlannerQuery | None, branch: int) -> np.ndarray:
    """Candidate ``branch`` of a planned query, with errors that name what is missing."""
    if query is None or query.candidate_actions is None:
        raise ConfigError("branch: the policy client returned no planner candidates; branching needs a planning model")
    n = len(query.candidate_actions)
    if isinstance(branch, bool) or not 0 <= int(branch) < n:
        raise ConfigError(f"branch: expected a candidate index in [0, {n}), got {branch!r}")
    return query.candidate_actions[int(branch)]


class _Recorder:
    """Accumulates one episode's steps as JPEG bytes (empty where nothing was rendered)."""

    def __init__(self, cameras: tuple[str, ...]) -> None:
        self.cameras = cameras
        self.jpegs: dict[str, list[bytes]] = {c: [] for c in cameras}
        self.proprio: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.timestamps: list[float] = []

    @property
    def steps(self) -> int:
        return len(self.actions)

    def add(self, obs: Observation, action: np.ndarray) -> None:
        for c in self.cameras:
            img = obs.images.get(c)
            self.jpegs[c].append(encode_jpeg(img) if img is not None else b"")
        self.proprio.append(np.asarray(obs.proprio, dtype=np.float32))
        self.actions.append(np.asarray(action, dtype=np.float32))
        self.timestamps.append(time.time())

    def episode(self, **fields: Any) -> Episode | None:
        if not self.actions:
            return None
        return Episode(
            images={c: ImageSequence(j, origin=f"episode[{c!r}]") for c, j in self.jpegs.items()},
            proprio=np.stack(self.proprio), actions=np.stack(self.actions), timestamps=np.asarray(self.timestamps),
            source=Source.SIM, **fields,
        )


def policy_client(policy: Any) -> PolicyClient:
    """A PolicyServer handle, a ``PolicySpec`` (built here), or a ready PolicyClient."""
    from actors.policy_server import PolicySpec

    if isinstance(policy, PolicySpec):
        built, planner = policy.build()
        return LocalPolicyClient(built, planner)
    if hasattr(policy, "act") and hasattr(policy.act, "remote"):
        return ServerPolicyClient(policy)
    return policy


class EnvRunner:
    """A Ray actor running episodes of one environment with a policy in the loop.

    ``policy`` is a PolicyServer handle (many runners, one GPU) or a ``PolicySpec`` (a policy in
    the runner itself). ``replay`` names the replay service (its config) the episodes go to.
    """

    def __init__(self, config: RunnerConfig, policy: Any, replay: ReplayConfig | None = None, replay_name: str = "replay") -> None:
        from replay.ray_backend import RayReplay

        import os
        import socket

        client = RayReplay(replay, name=replay_name) if replay is not None and config.record else None
        self.runner = EpisodeRunner(config, policy_client(policy), client)
        # Recorded with every episode, so replay shows which actor (and host) an episode came from.
        self.identity = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, task: str, seed: int, initial_state: np.ndarray | None = None, metadata: dict | None = None,
            plan: bool | None = None, record: bool | None = None, branch: int | Sequence[int] | None = None) -> EpisodeResult:
        return self.runner.run(task, seed, initial_state, {"runner": self.identity, **(metadata or {})}, plan, record, branch)

    def run_trial(self, task: str, seed: int, trial: int, plan: bool | None = None, record: bool | None = None) -> EpisodeResult:
        """The evaluation protocol's trial: the task's ``trial``-th fixed initial state."""
        states = self.runner.env.initial_states(task)
        state = states[trial % len(states)] if states else None
        return self.runner.run(task, seed, state, {"runner": self.identity, "trial": trial}, plan, record)

    def tasks(self) -> list[str]:
        return self.runner.env.tasks()

    def simulator_pid(self) -> int | None:
        return self.runner.simulator_pid()

    def crashes(self) -> int:
        return self.runner.crashes


if ray is not None:  # the Ray actor; without Ray, EpisodeRunner runs the same episodes in-process
    EnvRunner = ray.remote(max_restarts=-1)(EnvRunner)
