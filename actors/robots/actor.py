"""RobotActor: a real robot as one more actor of the job, on the robot's own host (the job's side of a robot).

A Ray actor placed by the robot's custom resource (``ray start --resources='{"robot:<id>": 1}'`` on the
robot's host, ``RobotActor.options(resources={"robot:<id>": 1})``), so its process, and with it the
driver, the safety envelope, the operator's key and the control loop (``RobotStation``), runs beside
the hardware. It asks the same ``Policy`` objects as the EnvRunners for chunks (``ServerPolicy``
clients of the job's PolicyServer: act, or plan with best-of-N) and writes its episodes into the same
replay, as ``Source.ROBOT`` episodes.

Weight versions: a robot takes new ones only between episodes. Both policies are reset before each
episode, where a policy in the actor's own process takes newer weights (``LocalPolicy``). A PolicyServer
(shared with EnvRunners, one model copy per target) is leased for the episode (``PolicyServer.lease``): it
takes the newest published weights as the episode begins and no newer ones until it ends, at most
``server.lease_max_s``. The episode records the versions its chunks came with: ``policy_version`` /
``planning_version`` are the first chunk's, and its metadata says ``versions_changed`` with every version it
acted with (``versions``, in order): only an episode that outlasts its lease can have more than one.

This module is the job's side (Ray, ``cosmos_policy``); a robot outside the cluster runs the same
station through the gateway instead (``remote.py``).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

try:
    import ray
except ImportError:  # the in-process RobotActor runs without Ray (tests, one machine)
    ray = None

from actors.robots.chunks import Chunk
from actors.robots.config import RobotConfig, as_robot_config
from actors.robots.observation import RobotObservation
from actors.robots.record import RobotEpisodeRecord
from actors.robots.station import OperatorSpec, RobotStation, acted_versions, episode_metadata, label, summary
from cosmos_policy.contracts import Observation, Policy, ReplayClient, TableName
from cosmos_policy.episode import Episode, EpisodeRecorder, Source


def resource(robot_id: str) -> str:
    """The Ray custom resource a robot's host offers, and its RobotActor asks for."""
    return f"robot:{robot_id}"


def to_episode(record: RobotEpisodeRecord, cameras: list[str] | tuple[str, ...], operator: str, task: str = "",
               seed: int | None = None, metadata: Mapping[str, Any] | None = None) -> Episode | None:
    """The record as a replay ``Episode`` (``Source.ROBOT``; the label as ``station.label`` says, False when it has
    none: an interrupted or re-recorded episode is never inserted), or None for an episode of no steps."""
    if not record.steps:
        return None
    recorder = EpisodeRecorder(cameras)
    for t in range(record.steps):
        recorder.add({c: record.images[c][t] for c in cameras}, record.proprio[t], record.actions[t], float(record.timestamps[t]))
    versions = acted_versions(record)
    return recorder.episode(instruction=record.instruction, success=bool(label(record)), task=task, seed=seed, source=Source.ROBOT,
                            policy_version=versions.get("policy"), planning_version=versions.get("planning"),
                            interrupted=record.interrupted, metadata={**(metadata or {}), **episode_metadata(record, operator)})


class RobotActor:
    """One robot: its station in this process, chunks from ``policy`` (or ``planner``), episodes into ``replay``.

    ``robot``: a robot config's name, path, dict or ``RobotConfig`` (``robot_id`` renames it). ``operator``:
    an ``OperatorSpec`` (or ``"scripted"`` / ``"keyboard"`` / its dict). ``layout``: the served model's
    ``{cameras, proprio_dim, action_dim}``, checked against the config before the robot connects. ``plan``:
    every chunk by best-of-N planning (when a planner is given), else the policy's.
    """

    def __init__(self, robot: str | Path | Mapping[str, Any] | RobotConfig, policy: Policy, planner: Policy | None = None,
                 replay: ReplayClient | None = None, operator: OperatorSpec | Mapping[str, Any] | str = "keyboard", *,
                 robot_id: str | None = None, layout: Mapping[str, Any] | None = None, plan: bool = True, seed: int = 0) -> None:
        self.config = as_robot_config(robot, robot_id)
        self.cameras = list(layout["cameras"]) if layout else list(self.config.cameras)
        if layout is not None:
            self.config.check_layout(self.cameras, int(layout["proprio_dim"]), int(layout["action_dim"]))
        self.operator = OperatorSpec.parse(operator)
        self.policy, self.planner, self.replay = policy, planner, replay
        self.plan = bool(plan and planner is not None)
        self.seed, self._queries, self._episode_seed = int(seed), 0, int(seed)
        self._idle = threading.Event()
        self._idle.set()
        self.station = RobotStation(self.config, self.operator, self._infer)

    def describe(self) -> dict[str, Any]:
        """Where this robot runs: its id, host, process and Ray node."""
        node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
        return {"robot_id": self.config.id, "host": socket.gethostname(), "pid": os.getpid(), "node_id": node,
                "cameras": self.cameras, "operator": self.operator.kind, "plan": self.plan, "episodes": self.station.episodes}

    def play(self, instruction: str, task: str = "", max_steps: int = 400, metadata: Mapping[str, Any] | None = None,
             reset_timeout_s: float = 600.0) -> dict[str, Any]:
        """One episode (after the operator's reset) into replay when it is a label; returns ``station.summary`` plus
        where it went (inserted, table, episode_id). Raises ``ResetTimeout`` / ``ResetCancelled`` / ``RobotStopped``."""
        self._idle.clear()
        leased = []
        try:
            for p in (self.policy, self.planner):
                if p is not None:
                    p.reset()  # between episodes: where a policy of this process takes newer weights
                    if callable(getattr(p, "lease", None)):  # a server's: its versions stay until this episode ends
                        p.lease(self.config.id, True)
                        leased.append(p)
            self._queries = 0
            self._episode_seed = self.seed * 1_000_003 + self.station.episodes
            record = self.station.play(instruction, max_steps, reset_timeout_s)
            result = summary(record)
            if label(record) is not None and self.replay is not None:
                extra = {"robot_episode": self.station.episodes, "host": socket.gethostname(), **(metadata or {})}
                episode = to_episode(record, self.cameras, self.operator.kind, task, self._episode_seed, extra)
                if episode is not None:
                    table = TableName.of(episode)
                    result.update(episode_id=self.replay.insert(table, episode), table=table.value, inserted=True)
            return result
        finally:
            for p in leased:
                p.lease(self.config.id, False)
            self._idle.set()

    def leave(self, reason: str = "", timeout_s: float = 30.0) -> dict[str, Any]:
        """Stop playing (an episode running ends at its next step, interrupted; the robot stops), then disconnect."""
        self.station.leave(reason or "asked to leave")
        ended = self._idle.wait(timeout_s)
        self.station.close()
        return {"robot_id": self.config.id, "episodes": self.station.episodes, "ended_cleanly": ended}

    def _infer(self, obs: RobotObservation) -> Chunk:
        model = self.planner if self.plan else self.policy
        seed = self._episode_seed + 7919 * self._queries
        self._queries += 1
        started = time.monotonic()
        chunk = model.infer(Observation(images={c: obs.images[c] for c in self.cameras}, proprio=obs.proprio,
                                        instruction=obs.instruction), seed)  # type: ignore[union-attr]
        return Chunk(actions=np.asarray(chunk.actions, dtype=np.float64), observed_at=obs.timestamp, value=float(chunk.value),
                     versions={"policy": chunk.policy_version, "planning": chunk.planning_version},
                     extra={"infer_s": time.monotonic() - started, "planned": self.plan})


if ray is not None:  # the Ray actor (threaded: ``leave`` runs while ``play`` does). Placed by its robot's resource alone (no
    # CPU asked: other work holding the host's CPUs must not keep a robot off its own host). Never restarted by Ray, which
    # would reconnect the hardware with no operator looking: a robot whose actor dies is attached again by a person.
    RobotActor = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=2)(RobotActor)
