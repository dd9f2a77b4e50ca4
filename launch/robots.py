"""Robots in the main job: the hub where they attach, the experiment's own robots, the gateway, their metrics.

- ``RobotHub`` (a named actor of every job, ``names.robot_hub``): hands a robot that joins the running
  job (``launch/robot.py``) the job's policy clients, replay client and layout, and collects every
  robot's episode results until the job logs them at a round's end.
- ``JobRobots``: one ``RobotActor`` per ``robots:`` entry, placed on the robot's host by its resource,
  each playing in a thread of the job beside the collection (its own episodes per round, or
  continuously), reporting to the hub.
- ``log_round``: a round's ``robot`` record (``robot/<id>/success_rate``, ``intervention_rate``,
  ``clipped_step_rate``...) from what the hub collected, whichever way the robots came.
- ``start_gateway``: the robot gateway over the same policy clients and replay (``gateway:``).
- ``<run_dir>/job.json``: where a running job's Ray cluster, namespace, hub and gateway are, for
  ``launch/robot.py --job <run_dir>``; written when the job's cluster is up, again when its services
  are, removed when the job ends.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from actors.robots.actor import RobotActor, resource
from actors.robots.control import ResetCancelled, ResetTimeout
from cosmos_policy.errors import ConfigError
from launch import names
from launch.monitor import Monitor, say

JOB_FILE = "job.json"


class RobotHub:
    """Where robots meet a running job: what they need to play (``attach``) and where their results go (``report``)."""

    def __init__(self, experiment: str, policy: Any, planner: Any, replay: Any, layout: dict[str, Any]) -> None:
        self.experiment, self.policy, self.planner, self.replay, self.layout = experiment, policy, planner, replay, layout
        self.results: list[dict[str, Any]] = []
        self.attached: dict[str, dict[str, Any]] = {}

    def attach(self, robot_id: str, where: dict[str, Any]) -> dict[str, Any]:
        """A robot joins: the job's policy and planner clients, replay client and layout (``RobotActor``'s arguments)."""
        self.attached[robot_id] = {**where, "since": time.time()}
        print(f"robot {robot_id} joined the job ({', '.join(f'{k} {v}' for k, v in where.items())})", flush=True)
        return {"experiment": self.experiment, "policy": self.policy, "planner": self.planner, "replay": self.replay,
                "layout": self.layout}

    def detach(self, robot_id: str, why: str = "") -> None:
        if self.attached.pop(robot_id, None) is not None:
            print(f"robot {robot_id} left the job{f' ({why})' if why else ''}", flush=True)

    def report(self, result: dict[str, Any]) -> None:
        self.results.append(dict(result))

    def drain(self) -> list[dict[str, Any]]:
        """The results reported since the last drain."""
        out, self.results = self.results, []
        return out

    def robots(self) -> dict[str, dict[str, Any]]:
        return dict(self.attached)


RobotHub = ray.remote(num_cpus=0, max_restarts=-1)(RobotHub)  # type: ignore[misc]


def place(robot_id: str, where: str, wait_s: float = 30.0) -> dict[str, float]:
    """The resource that puts a robot's actor on its host; a clear error when no node of the cluster offers it within
    ``wait_s`` (a robot's host that has just run ``ray start`` takes a few seconds to appear)."""
    key = resource(robot_id)
    deadline = time.monotonic() + wait_s
    while ray.cluster_resources().get(key, 0) < 1 and time.monotonic() < deadline:
        time.sleep(1.0)
    if ray.cluster_resources().get(key, 0) < 1:
        raise ConfigError(f"{where}: no node of the Ray cluster offers the resource {key!r}: on the robot's host run "
                          f"`ray start --address=<head>:6379 --resources='{{\"{key}\": 1}}'` (a job that starts its own "
                          "local cluster offers the resources of its robots: entries itself)")
    return {key: 1}


class JobRobots:
    """The experiment's ``robots:``: their actors, each driven by a thread of the job, reporting to the hub."""

    def __init__(self, cfg: Any, services: Any) -> None:
        self.cfg, self.hub = cfg, services.hub
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._round_played: dict[str, int] = {}
        self.actors: dict[str, Any] = {}
        self.threads: list[threading.Thread] = []
        layout = services.layout
        for i, entry in enumerate(cfg.robots):
            config = cfg.robot_config(i)
            options = place(config.id, f"robots[{i}]")
            self.actors[config.id] = RobotActor.options(name=names.robot_actor(cfg.name, config.id), resources=options).remote(
                config, services.policy, services.planner, services.replay, cfg.robot_operator(i), layout=layout, plan=entry.plan,
                seed=cfg.seed + i)
        for i, (robot_id, actor) in enumerate(self.actors.items()):
            self._round_played[robot_id] = 0
            thread = threading.Thread(target=self._run, args=(i, cfg.robots[i], robot_id, actor), name=f"robot-{robot_id}", daemon=True)
            thread.start()
            self.threads.append(thread)

    @classmethod
    def start(cls, cfg: Any, services: Any) -> JobRobots | None:
        if not cfg.robots:
            return None
        say(f"attaching {len(cfg.robots)} robot(s): " + ", ".join(cfg.robot_config(i).id for i in range(len(cfg.robots))))
        return cls(cfg, services)

    def _run(self, index: int, entry: Any, robot_id: str, actor: Any) -> None:
        """The robot's thread: wait for its actor to connect on its host (the job goes on meanwhile), then play."""
        try:
            where = ray.get(actor.describe.remote())
        except RayActorError as exc:  # its constructor failed there: the driver, the operator's terminal...
            if not self._stop.is_set():
                say(f"warning: robots[{index}]: robot {robot_id}'s RobotActor did not start on its host ({_line(exc, 600)}); "
                    "the job goes on without it")
            return
        ray.get(self.hub.attach.remote(robot_id, {"host": where["host"], "node": where["node_id"][:8], "from": "robots:"}))
        self._play(entry, robot_id, actor)

    def _play(self, entry: Any, robot_id: str, actor: Any) -> None:
        per_round = entry.episodes_per_round if isinstance(entry.episodes_per_round, int) else None
        while not self._stop.is_set():
            with self._cond:
                while per_round is not None and self._round_played[robot_id] >= per_round and not self._stop.is_set():
                    self._cond.wait(0.5)
            if self._stop.is_set():
                return
            ref = actor.play.remote(entry.instruction, entry.task, entry.max_steps, {"experiment": self.cfg.name}, entry.reset_timeout_s)
            try:
                while not ray.wait([ref], timeout=0.5)[0]:
                    pass
                result = ray.get(ref)
            except (ResetCancelled, RayActorError) as exc:
                if not self._stop.is_set():
                    say(f"warning: robot {robot_id} is gone ({type(exc).__name__}: {_line(exc, 200)}); "
                        "the job goes on without it (attach it again with launch/robot.py)")
                    self.hub.detach.remote(robot_id, "lost")
                return
            except ResetTimeout as exc:
                say(f"warning: robot {robot_id}: {_line(exc)}; waiting again")
                continue
            except Exception as exc:  # the robot's fault (driver, stop latched as it began): it leaves, the job goes on
                say(f"warning: robot {robot_id} failed ({type(exc).__name__}: {_line(exc)}); "
                    "it leaves the job, which goes on")
                self.hub.detach.remote(robot_id, "failed")
                return
            self.hub.report.remote(result)
            with self._cond:
                self._round_played[robot_id] += 1

    def new_round(self) -> None:
        """A round ended: robots with episodes per round play the next round's."""
        with self._cond:
            for robot_id in self._round_played:
                self._round_played[robot_id] = 0
            self._cond.notify_all()

    def stop(self, reason: str = "the job is ending") -> None:
        """An episode running ends now (the robot stops, the episode is interrupted); the robots disconnect."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        leaving = {rid: actor.leave.remote(reason) for rid, actor in self.actors.items()}
        for rid, ref in leaving.items():
            try:
                ray.get(ref, timeout=60)
            except Exception as exc:  # noqa: BLE001 (an actor already gone has nothing to stop)
                say(f"warning: robot {rid} did not leave cleanly ({type(exc).__name__})")
            self.hub.detach.remote(rid, reason)
        for thread in self.threads:
            thread.join(timeout=60)
        for actor in self.actors.values():
            ray.kill(actor)


def _line(exc: BaseException, keep: int = 300) -> str:
    """The end of an error's message on one line (a remote error's last words: its cause's message)."""
    return " ".join(str(exc).split())[-keep:]


def log_round(hub: Any, monitor: Monitor, round_: int) -> dict[str, Any]:
    """The round's ``robot`` record from the results the hub collected since the last round; {} when none came."""
    try:
        results = ray.get(hub.drain.remote())
    except (RayActorError, ActorUnavailableError) as exc:  # the hub restarting: its results so far are lost, the job goes on
        say(f"warning: round {round_}: the robot hub did not answer ({type(exc).__name__}); no robot record this round")
        return {}
    if not results:
        return {}
    record: dict[str, Any] = {"round": round_}
    for robot_id in sorted({r["robot_id"] for r in results}):
        mine = [r for r in results if r["robot_id"] == robot_id]
        steps = sum(r["steps"] for r in mine)
        labelled = [r["success"] for r in mine if r["success"] is not None]
        key = f"robot/{robot_id}"
        record.update({f"{key}/episodes": len(mine), f"{key}/inserted": sum(bool(r["inserted"]) for r in mine),
                       f"{key}/interrupted": sum(bool(r["interrupted"]) for r in mine),
                       f"{key}/rerecorded": sum(bool(r["rerecord"]) for r in mine), f"{key}/steps": steps,
                       f"{key}/intervention_rate": sum(r["intervention_steps"] for r in mine) / steps if steps else 0.0,
                       f"{key}/clipped_step_rate": sum(r["clipped_steps"] for r in mine) / steps if steps else 0.0})
        if labelled:
            record[f"{key}/success_rate"] = float(np.mean(labelled))
        say(f"round {round_}: robot {robot_id}: {len(mine)} episode(s)"
            + (f", success {100 * record[f'{key}/success_rate']:.0f} %" if labelled else "")
            + f", interventions {100 * record[f'{key}/intervention_rate']:.0f} % of steps")
    monitor.log("robot", record)
    return record


# ---- the gateway, and the job file --------------------------------------------------------------------
def start_gateway(cfg: Any, services: Any) -> Any:
    """The robot gateway over the job's PolicyServer (act and plan) and replay, when ``gateway.enabled``."""
    if not cfg.gateway.enabled:
        return None
    from actors.robots.gateway import RobotGateway
    from cosmos_policy.contracts import EnvSpec

    spec = services.spec
    served = EnvSpec(cameras=tuple(services.layout["cameras"]), image_size=tuple(spec.image_size),
                     proprio_dim=int(services.layout["proprio_dim"]), action_dim=int(services.layout["action_dim"]),
                     control_hz=spec.control_hz)
    hub = services.hub

    def report(episode: dict[str, Any]) -> None:  # the gateway's robots count in the round's robot record like the others
        hub.report.remote(gateway_result(episode))

    gateway = RobotGateway(cfg.gateway_config(), served, services.layout["chunk"], services.policy, planner=services.planner,
                           replay=services.replay, versions=services.versions, on_episode=report)
    port = gateway.start()
    say(f"robot gateway: listening on {cfg.gateway.host}:{port} ({'TLS' if cfg.gateway.tls_cert else 'plaintext'}); "
        f"a robot's token: `python -m actors.robots.tokens add --file {cfg.gateway.token_file} --robot <id>`; "
        f"on the robot: `python -m actors.robots.remote --address <this host>:{port} --robot <config> --token-file <file>`")
    return gateway


def gateway_result(episode: dict[str, Any]) -> dict[str, Any]:
    """An episode the gateway put into replay as a robot's result (``station.summary``'s keys; the robot sends only labelled
    episodes, so none is interrupted or re-recorded; its counts are those the robot wrote into the metadata)."""
    meta = episode.get("metadata") or {}

    def count(key: str) -> int:
        value = meta.get(key, 0)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0

    return {"robot_id": episode["robot_id"], "success": bool(episode["success"]), "reason": str(meta.get("reason", "")),
            "steps": int(episode["steps"]), "interrupted": False, "rerecord": False,
            **{k: count(k) for k in ("intervention_steps", "clipped_steps", "capped_steps", "held_steps", "late_chunks", "stale_chunks",
                                            "failed_requests")},
            "policy_version": episode.get("policy_version"), "planning_version": episode.get("planning_version"), "versions": [],
            "seconds": 0.0, "inserted": True, "table": episode["table"], "episode_id": episode["episode_id"], "via": "gateway"}


def write_job_file(cfg: Any, run_dir: Path, services: bool, gateway_port: int | None = None) -> Path:
    """``<run_dir>/job.json``: what ``launch/robot.py --job <run_dir>`` needs to join this running job. Written once the
    job's Ray cluster is up (``services`` false: a robot may start joining and waits for them) and again when its
    services, the robot hub and the gateway, are up; removed when the job ends."""
    path = run_dir / JOB_FILE
    data = {"experiment": cfg.name, "ray_address": ray.get_runtime_context().gcs_address, "namespace": cfg.ray.namespace,
            "hub": names.robot_hub(cfg.name), "services": services, "host": socket.gethostname(), "pid": os.getpid(),
            "written": time.time(), "gateway": None if gateway_port is None else f"{cfg.gateway.host}:{gateway_port}"}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path


def read_job_file(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / JOB_FILE
    if not path.is_file():
        raise ConfigError(f"--job {run_dir}: no {JOB_FILE} there: is the job running? (launch/online.py writes it when its "
                          "Ray cluster is up, and removes it when it ends)")
    return json.loads(path.read_text())
