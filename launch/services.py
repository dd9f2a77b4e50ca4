"""The job's services, built from the experiment config and handed to the roles that use them.

``launch.cluster.connect`` joins or starts the Ray cluster. ``Services`` starts the concrete ones: the replay
service (the config's backend), the weight registry, the PolicyServers (the policy and its
planner, on GPUs where the cluster has them), the EnvRunners, each runner given its server's
clients and the replay client, and the robot hub (where robots attach: ``launch.robots``); then
``start_robots`` the experiment's robots. Nothing else in the job creates a Ray actor of a service.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.env_runner import EnvRunner, RunnerConfig
from actors.policies import PolicySpec, ServerPolicy
from actors.policy_server import PolicyServer
from cosmos_policy.contracts import ReplayClient, TableName
from cosmos_policy.layout import load_layout
from launch import names
from launch.experiment import Experiment
from launch.monitor import say
from launch.robots import JobRobots, RobotHub
from learner.publish import RegistryWeights, WeightRegistry
from replay.service import make_replay


@dataclass
class Services:
    """The running services of one job (``start`` them; ``stop`` kills the actors, the replay files stay)."""

    replay: ReplayClient
    weights: RegistryWeights
    servers: list[Any]
    runners: list[Any]  # the collection's
    tasks: list[str]
    eval_runners: list[Any] = field(default_factory=list)  # the evaluation's own (eval.runners)
    hub: Any = None  # launch.robots.RobotHub: where robots attach and report
    policy: Any = None  # ServerPolicy clients of the first PolicyServer, for robots: act ...
    planner: Any = None  # ... and plan
    layout: dict[str, Any] = field(default_factory=dict)  # the served model's cameras, proprio_dim, action_dim, chunk
    spec: Any = None  # the EnvRunners' EnvSpec (image size, control rate)
    robots: Any = None  # launch.robots.JobRobots, once started
    gate_server: Any = None  # the promotion gate's own PolicyServer (promotion.enabled): it serves candidates ...
    gate_runners: list[Any] = field(default_factory=list)  # ... to these EnvRunners alone
    promotion: Any = None  # launch.promotion.Promotion, once the job starts it (it watches the collection's episodes)

    def evaluators(self, alone: bool) -> list[Any]:
        """The EnvRunners an evaluation plays on: its own (``eval.runners``) while collection goes on beside it, and
        every runner when it has them to itself (round 0, the last round, the synchronous loop) or has none."""
        return self.eval_runners + self.runners if alone or not self.eval_runners else self.eval_runners

    @classmethod
    def start(cls, cfg: Experiment, policy_checkpoint: str, planning_checkpoint: str) -> Services:
        """Replay, weights, PolicyServers serving the given checkpoints (and what is published after), EnvRunners."""
        say(f"starting the services: replay ({cfg.replay.backend}, {cfg.replay.shards} shard{'s' if cfg.replay.shards > 1 else ''}), "
            f"{cfg.online.servers} PolicyServer(s), {cfg.online.runners} EnvRunners"
            + (f" and {cfg.eval.runners} for the evaluations" if cfg.eval.runners else ""))
        replay = make_replay(cfg.replay, names=names.replay_shards(cfg.name, cfg.replay.shards), seed=cfg.seed)
        restored = {t: int(s.get("episodes", 0)) for t, s in replay.stats().items()}
        if any(restored.values()):
            say("replay: restored " + ", ".join(f"{n} {t} episodes" for t, n in restored.items() if n))
        # The zero-CPU services (the weight registry, the robot hub) on the job's own node: a robot's host joins with no CPU
        # to offer (`ray start --num-cpus=0`), so only a zero-CPU actor could land there, and would die when the robot leaves.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        registry = WeightRegistry.options(name=names.weight_registry(cfg.name), get_if_exists=True, scheduling_strategy=here).remote(
            gated=cfg.promotion.enabled)
        weights = RegistryWeights(registry, name=names.weight_registry(cfg.name))
        on_gpu = cfg.model.device == "cuda" or (cfg.model.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)
        gpu = cfg.online.server_gpus if on_gpu else 0
        spec = PolicySpec(checkpoint=policy_checkpoint, planning_checkpoint=planning_checkpoint, policy=cfg.policy, planner=cfg.planner,
                          device="cuda" if gpu else "cpu", dtype="bfloat16" if gpu else None, text_encoder=cfg.model.text_encoder)
        server_names = names.policy_servers(cfg.name, cfg.online.servers)
        servers = [PolicyServer.options(name=n, num_cpus=0 if gpu else 1, num_gpus=gpu).remote(spec, cfg.server, weights)
                   for n in server_names]
        config = RunnerConfig(env=cfg.env_config(), execute=cfg.env.execute, plan=cfg.online.plan, record=True, max_steps=cfg.env.max_steps,
                              plan_queries=cfg.env.plan_queries,
                              branch_point_only=load_layout(cfg.model.layout).action_chunk if cfg.online.branch_point_only else None)
        runners = []
        for i in range(cfg.online.runners + cfg.eval.runners):  # runners are dealt to the servers in turn
            server, name = servers[i % len(servers)], server_names[i % len(servers)]
            runners.append(EnvRunner.options(num_cpus=1).remote(config, ServerPolicy(server, name=name),
                                                                ServerPolicy(server, plan=True, name=name), replay))
        gate_server, gate_runners = None, []
        if cfg.promotion.enabled:  # it serves what the gate asks, never polls: the actors' servers take promoted versions only
            gate_name = names.gate_server(cfg.name)
            gate_server = PolicyServer.options(name=gate_name, num_cpus=0 if gpu else 1, num_gpus=gpu).remote(
                spec, dataclasses.replace(cfg.server, poll_weights_s=0), weights)
            gate_runners = [EnvRunner.options(num_cpus=1).remote(dataclasses.replace(config, record=False), ServerPolicy(gate_server, name=gate_name),
                                                                 ServerPolicy(gate_server, plan=True, name=gate_name), None)
                            for _ in range(cfg.promotion.runners)]
        tasks = list(cfg.env.tasks or ray.get(runners[0].tasks.remote()))
        ray.get([s.versions.remote() for s in servers + ([gate_server] if gate_server is not None else [])])  # every server has built its models
        layout = load_layout(cfg.model.layout)
        served = {"cameras": list(layout.cameras), "proprio_dim": layout.proprio_dim, "action_dim": layout.action_dim,
                  "chunk": layout.action_chunk}
        policy, planner = ServerPolicy(servers[0], name=server_names[0]), ServerPolicy(servers[0], plan=True, name=server_names[0])
        hub = RobotHub.options(name=names.robot_hub(cfg.name), get_if_exists=True, scheduling_strategy=here).remote(
            cfg.name, policy, planner, replay, served)
        return cls(replay, weights, servers, runners[: cfg.online.runners], tasks, runners[cfg.online.runners:], hub=hub, policy=policy,
                   planner=planner, layout=served, spec=ray.get(runners[0].spec.remote()), gate_server=gate_server, gate_runners=gate_runners)

    def start_robots(self, cfg: Experiment) -> None:
        """The experiment's ``robots:``, each a RobotActor on its host playing beside the collection (``launch.robots``)."""
        self.robots = JobRobots.start(cfg, self)

    def insert_demos(self, demos: list[Any]) -> bool:
        """The demonstrations into the replay's demonstration table (once per run); returns True when done."""
        for episode in demos:
            self.replay.insert(TableName.DEMOS, episode)
        return True

    def on_servers(self, method: str, *args: Any, servers: list[Any] | None = None) -> list[Any]:
        """``method(*args)`` on every PolicyServer (or ``servers``), in order. A server that died is restarted by Ray
        (it reloads its checkpoint and takes the newest published weights): the call waits for it, as its clients
        do (``ServerPolicy.restart_wait_s``), so the job's loop never dies of a server's death."""
        out = []
        for server in self.servers if servers is None else servers:
            deadline = time.monotonic() + ServerPolicy.restart_wait_s
            while True:
                try:
                    out.append(ray.get(getattr(server, method).remote(*args)))
                    break
                except RayActorError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
        return out

    def versions(self) -> dict[str, int | None]:
        """The weight versions the (first) PolicyServer serves now."""
        return self.on_servers("versions", servers=self.servers[:1])[0]

    def wait_for(self, versions: dict[str, int], timeout_s: float = 120.0) -> None:
        """Block until every PolicyServer serves these versions (each takes them from the registry between batches)."""
        deadline = time.time() + timeout_s
        while True:
            served = self.on_servers("versions")
            if all(v.get(target) == version for v in served for target, version in versions.items()):
                return
            if time.time() > deadline:
                raise TimeoutError(f"PolicyServers did not all pick up weights {versions} within {timeout_s:.0f} s (serving {served})")
            time.sleep(0.2)

    def hold_weights(self, held: bool) -> None:
        """Every PolicyServer keeps the versions it serves now (``held``: an evaluation of them runs while the learner
        publishes on), or takes the newest published again."""
        self.on_servers("hold_weights", held)

    def seconds_per_batch(self) -> float:
        """Seconds per served batch, over all PolicyServers."""
        stats = self.on_servers("stats")
        return sum(s["busy_s"] for s in stats) / max(1, sum(s["batches"] for s in stats))

    def stop(self) -> None:
        if self.robots is not None:  # first: a robot mid-episode stops before its policy goes
            self.robots.stop()
            self.robots = None
        gate = self.gate_runners + ([self.gate_server] if self.gate_server is not None else [])
        for actor in self.runners + self.eval_runners + gate + self.servers + ([self.hub] if self.hub is not None else []):
            ray.kill(actor)
