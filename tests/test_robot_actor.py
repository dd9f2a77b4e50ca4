"""A robot attached to a job, below the job: the RobotActor on a real two-node local Ray cluster (placed by its
resource; run in a subprocess, so no other test's cluster is in the way), the same station through the gateway
with the thin client and the tiny real policy, and the experiment's ``robots:`` and ``gateway:`` keys.

The robot is the simulated arm (configs/robot/sim_lift.yaml: the built-in task's Panda in a child process
behind the driver contract) with its loop at 2 Hz and deadlines wide enough for a loaded two-core machine;
labels come from a scripted operator. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script (the cluster's subprocess)
    sys.path.insert(0, str(ROOT))

from actors.robots.config import robot_config_from_dict  # noqa: E402
from actors.robots.station import OperatorSpec  # noqa: E402
from cosmos_policy.errors import ConfigError  # noqa: E402

SIM_LIFT = ROOT / "configs" / "robot" / "sim_lift.yaml"
DUMMY_LIFT = ROOT / "configs" / "robot" / "dummy_lift.yaml"
INSTRUCTION = "lift the red cube"
STILL = {"eef.dx": 0.0, "eef.dy": 0.0, "eef.dz": 0.0, "eef.drx": 0.0, "eef.dry": 0.0, "eef.drz": 0.0, "gripper": 0.0}  # the teleop: hold


def lift_robot(robot_id: str, control_hz: float = 2) -> dict[str, Any]:
    """configs/robot/dummy_lift.yaml (the kinematic arm shaped like the built-in task: no child process, for the job-level
    tests) slowed down as ``sim_robot``."""
    data = yaml.safe_load(DUMMY_LIFT.read_text())
    data.update(id=robot_id, control_hz=control_hz)
    data["chunking"] = {"request_threshold": 0.5, "deadline_s": 10.0, "stale_s": 10.0, "hold_s": 10.0, "watchdog_s": 5.0}
    return data


def sim_robot(robot_id: str, control_hz: float = 2) -> dict[str, Any]:
    """configs/robot/sim_lift.yaml with its loop slowed down, chunk deadlines and watchdogs for a loaded test machine: the
    tiny model's chunk (16 actions, 8 s at 2 Hz) takes seconds there and must outlast its own latency, or every action is in
    the past. No workspace box: the untrained model's deltas may leave it (the envelope's own tests check the box)."""
    data = yaml.safe_load(SIM_LIFT.read_text())
    data.update(id=robot_id, control_hz=control_hz)
    data["driver"]["kwargs"].update(watchdog_s=5.0, antialias=False)  # the arm's own watchdog outlasts the slow loop's period
    data["chunking"] = {"request_threshold": 0.5, "deadline_s": 10.0, "stale_s": 10.0, "hold_s": 10.0, "watchdog_s": 5.0}
    del data["workspace"]
    return data


# ---- the experiment's keys -----------------------------------------------------------------------------------------
BASE = {"config": "dummy_lift", "instruction": "lift the red cube", "operator": "scripted", "script": "{5: success}"}


def robots(*entries: dict[str, str]) -> str:
    """A ``robots=[...]`` override of these entries (YAML flow mappings)."""
    return "robots=[" + ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in e.items()) + "}" for e in entries) + "]"


@pytest.mark.parametrize("override, message", [
    (robots({k: v for k, v in BASE.items() if k != "instruction"}), r"robots\[0\].instruction: expected what the robot is told"),
    (robots({"config": "dummy_lift", "instruction": "x"}), r"robots\[0\].tty: a keyboard operator needs the terminal"),
    (robots({**BASE, "config": "dummy_arm"}), r"robots\[0\].config: robot.proprio: the model takes 9 values, the robot config names 8"),
    (robots({**BASE, "config": "nosuch"}), r"robots\[0\].config: robot config 'nosuch': no file"),
    (robots({**BASE, "episodes_per_round": "0"}), r"robots\[0\].episodes_per_round: expected an integer >= 1 or 'continuous', got 0"),
    (robots({**BASE, "script": "{5: sucess}"}), r"robots\[0\].script.5: expected an event or a list of events"),
    (robots({**BASE, "operator": "telepathy"}), r"robots\[0\].operator: expected one of \['scripted'"),
    (robots(BASE, BASE), r"robots\[1\].id: robot 'dummy-lift-0' is listed twice"),
    ("gateway.enabled=true", r"gateway.token_file: required with gateway.enabled"),
    ("gateway.tls_cert=a.pem", r"gateway.tls_cert / gateway.tls_key: give both or neither"),
])
def test_robots_and_gateway_keys_name_their_mistakes(override: str, message: str) -> None:
    from launch.config import load_experiment

    with pytest.raises(ConfigError, match=message):
        load_experiment("quickstart", [override])


def test_robots_and_gateway_keys_load(tmp_path: Path) -> None:
    from launch.config import check_inputs, load_experiment

    cfg = load_experiment("quickstart", [robots({**BASE, "id": "arm-2", "episodes_per_round": "3"})])
    (entry,) = cfg.robots
    assert (entry.episodes_per_round, entry.plan, cfg.robot_config(0).id) == (3, True, "arm-2")
    assert cfg.robot_operator(0) == OperatorSpec(kind="scripted", script={5: ("success",)})
    assert (cfg.gateway.enabled, cfg.gateway.host) == (False, "127.0.0.1")
    assert cfg.to_dict()["robots"][0]["config"] == "dummy_lift"
    missing = load_experiment("quickstart", ["gateway.enabled=true", f"gateway.token_file={tmp_path / 'none.json'}"])
    with pytest.raises(ConfigError, match="token file not found"):
        check_inputs(missing)


def test_launch_robot_without_a_running_job_says_so(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "robot.py"), "--job", str(tmp_path), "--robot", "dummy_lift",
                          "--instruction", INSTRUCTION, "--operator", "scripted"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and "no job.json there: is the job running?" in out.stderr, out.stderr[-2000:]


# ---- through the gateway, with the thin client ------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The tiny real policy (version 4) and planner (version 2) behind a gateway on loopback, a real LocalReplay."""
    from actors.robots import tokens
    from actors.robots.gateway import GatewayConfig, RobotGateway
    from cosmos_policy.codec import NormalizationStats
    from cosmos_policy.config import PlannerConfig, load_model_config
    from cosmos_policy.contracts import EnvSpec, Observation
    from cosmos_policy.layout import load_layout
    from cosmos_policy.model import CosmosPolicyModel
    from cosmos_policy.planner import Planner
    from cosmos_policy.policy import CosmosPolicy, PolicyConfig
    from cosmos_policy.text import RandomTextEncoder, TextEmbeddingCache
    from replay.config import ReplayConfig, default_tables
    from replay.local import LocalReplay

    root = tmp_path_factory.mktemp("gateway")
    cfg, layout = load_model_config("tiny"), load_layout("libero")
    rng = np.random.default_rng(0)
    stats = NormalizationStats.compute(rng.uniform(-1, 1, (200, 7)), rng.uniform(-1, 1, (200, 9)))
    policy = CosmosPolicy(CosmosPolicyModel.build(cfg, layout, seed=0), stats, TextEmbeddingCache(),
                          PolicyConfig(action_steps=1, future_steps=1, value_steps=1),
                          text_encoder=RandomTextEncoder(cfg.text.embed_dim, cfg.text.max_length))
    policy.version = 4
    planner = Planner(policy, CosmosPolicyModel.build(cfg, layout, seed=1), PlannerConfig(num_candidates=2, future_steps=[1], value_steps=[1]))
    planner.version = 2
    replay = LocalReplay(ReplayConfig(root=str(root / "replay"), tables=default_tables(window=16)))
    token = tokens.mint(root / "tokens.json", "gw-arm")
    spec = EnvSpec(cameras=layout.cameras, image_size=(64, 64), proprio_dim=9, action_dim=7)
    gateway = RobotGateway(GatewayConfig(token_file=str(root / "tokens.json"), call_timeout_s=30.0), spec, layout.action_chunk, policy,
                           planner=planner, replay=replay, versions=lambda: {"policy": 4, "planning": 2})
    for model in (policy, planner):  # the first call pays for the model's warm-up: not the robot's first chunk
        model.infer(Observation(images={c: np.zeros((64, 64, 3), np.uint8) for c in layout.cameras}, proprio=np.zeros(9, np.float32),
                                instruction=INSTRUCTION), 0)
    gateway.start()
    yield gateway, replay, token
    gateway.stop()


@pytest.mark.slow
def test_a_robot_outside_the_cluster_plays_through_the_gateway_into_replay(served) -> None:
    from actors.robots.client import GatewayClient
    from actors.robots.remote import run_robot_over_gateway
    from cosmos_policy.contracts import Source
    from cosmos_policy.data.episode_file import read_episode

    gateway, replay, token = served
    config = robot_config_from_dict(sim_robot("gw-arm"))

    def play(script: dict[int, tuple[str, ...]], **operator: Any) -> dict[str, Any]:
        with GatewayClient(f"127.0.0.1:{gateway.port}", "gw-arm", token, timeout_s=30.0) as client:
            (result,) = run_robot_over_gateway(client, config, OperatorSpec(kind="scripted", script=script, **operator), INSTRUCTION, 1,
                                               task="lift", max_steps=200)
        return result

    # The operator's (scripted) label at step 10, on chunks the planner chose (versions 4 and 2).
    ok = play({10: ("success",)})
    assert (ok["inserted"], ok["table"], ok["success"], ok["steps"]) == (True, "experience_success", True, 10), ok
    assert (ok["policy_version"], ok["planning_version"]) == (4, 2) and ok["held_steps"] < 10, ok
    ep = read_episode(replay.store.files.path("experience_success", ok["episode_id"]))
    assert ep.source is Source.ROBOT and ep.metadata["robot_id"] == "gw-arm" and (ep.policy_version, ep.planning_version) == (4, 2)
    assert ep.metadata["labelled_by"] == "operator" and ep.metadata["intervention"] == "0" * 10 and ep.task == "lift"
    assert ep.metadata["driver"] == "actors.robots.sim_arm:SimArm"
    assert ep.instruction == INSTRUCTION and ep.num_steps == 10 and set(ep.cameras) == {"primary", "wrist"}
    # An intervention (the teleop drives steps 3 to 6), then a failure: the flags per step travel with it.
    failed = play({3: ("intervention_start",), 7: ("intervention_end",), 10: ("failure",)}, teleop=(STILL,))
    assert (failed["table"], failed["success"], failed["intervention_steps"]) == ("experience_failure", False, 4), failed
    flags = read_episode(replay.store.files.path("experience_failure", failed["episode_id"])).metadata["intervention"]
    assert flags == "000" + "1111" + "000"
    # Re-recorded, or stopped by the operator (interrupted): neither is a label, neither reaches replay.
    again = play({3: ("rerecord",)})
    stopped = play({3: ("estop",)})
    assert again["rerecord"] and stopped["interrupted"] and not again["inserted"] and not stopped["inserted"]
    assert len(replay.episode_ids("experience_success")) == 1 and len(replay.episode_ids("experience_failure")) == 1


# ---- the RobotActor on a two-node cluster ---------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.mark.slow
def test_a_robot_actor_runs_only_on_the_node_with_its_resource_and_its_episodes_land_in_replay(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, __file__, str(tmp_path)], env=_env(), capture_output=True, text=True, timeout=500, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["placed"] == facts["robot_node"] != facts["head_node"]  # the node that offers robot:arm-7, not the other
    first, second = facts["first"], facts["second"]
    assert (first["success"], first["inserted"], first["table"]) == (True, True, "experience_success"), first
    # Version 8 was published while the first episode played: it kept acting with 7 (its lease), the second began with 8.
    assert facts["published_during_first"] and first["versions"] == [{"policy": 7, "planning": 2}], first
    assert (second["success"], second["reason"], second["table"], second["steps"]) == (False, "max_steps", "experience_failure", 4)
    assert (second["policy_version"], second["planning_version"]) == (8, 2), second
    ep = facts["episode"]
    assert ep["source"] == "robot" and ep["robot_id"] == "arm-7" and (ep["policy_version"], ep["planning_version"]) == (7, 2)
    assert ep["labelled_by"] == "operator" and ep["reason"] == "success" and ep["steps"] == 10 and ep["host"]
    assert ep["versions_changed"] is False and ep["driver"] == "actors.robots.sim_arm:SimArm"
    assert facts["robot_episodes"] == 2 and facts["left"]["ended_cleanly"] and facts["left"]["episodes"] == 2


def two_node_cluster(tmp: Path) -> dict[str, Any]:
    """A head (2 CPUs: the PolicyServer, the replay shard) and a robot's host (1 CPU and robot:arm-7) on 127.0.0.1."""
    import ray
    from ray.cluster_utils import Cluster

    from actors.policies import PolicySpec, ServerPolicy
    from actors.policy_server import PolicyServer, ServerConfig
    from actors.robots.actor import RobotActor, resource
    from cosmos_policy.checkpoint import save_checkpoint
    from cosmos_policy.codec import NormalizationStats
    from cosmos_policy.config import PlannerConfig, load_model_config
    from cosmos_policy.data.episode_file import read_episode
    from cosmos_policy.layout import load_layout
    from cosmos_policy.model import CosmosPolicyModel
    from cosmos_policy.policy import PolicyConfig
    from cosmos_policy.text import TextEmbeddingCache
    from cosmos_policy.weights import pack
    from learner.publish import RegistryWeights, WeightRegistry
    from replay.config import ReplayConfig, default_tables
    from replay.service import make_replay

    cfg, layout = load_model_config("tiny"), load_layout("libero")
    rng = np.random.default_rng(0)
    stats = NormalizationStats.compute(rng.uniform(-1, 1, (200, 7)), rng.uniform(-1, 1, (200, 9)))
    save_checkpoint(tmp / "policy", CosmosPolicyModel.build(cfg, layout, seed=0), stats=stats, text=TextEmbeddingCache(), metadata={"version": 7})
    save_checkpoint(tmp / "planning", CosmosPolicyModel.build(cfg, layout, seed=1), stats=stats, text=TextEmbeddingCache(), metadata={"version": 2})
    marker = Path("/tmp/ray/ray_current_cluster")  # cluster_utils records its head there, where a bare ray.init() would look
    had = marker.read_text() if marker.exists() else None
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    try:
        robot_node = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={resource("arm-7"): 1})
        ray.init(address=cluster.address, namespace="robot-test", log_to_driver=False)
        spec = PolicySpec(checkpoint=str(tmp / "policy"), planning_checkpoint=str(tmp / "planning"), policy=PolicyConfig(action_steps=1),
                          planner=PlannerConfig(num_candidates=2, future_steps=[1], value_steps=[1]), text_encoder="random")
        weights = RegistryWeights(WeightRegistry.remote())
        server = PolicyServer.options(name="robot-test-server", num_cpus=1).remote(
            spec, ServerConfig(max_batch=2, max_wait_ms=20, poll_weights_s=0.2), weights)
        policy, planner = ServerPolicy(server, name="robot-test-server"), ServerPolicy(server, plan=True, name="robot-test-server")
        replay = make_replay(ReplayConfig(root=str(tmp / "replay"), tables=default_tables(window=16)), names=["robot-test-replay-0"])
        robot = RobotActor.options(resources={resource("arm-7"): 1}).remote(
            sim_robot("arm-7"), policy, planner, replay, {"kind": "scripted", "script": {10: ["success"]}},
            layout={"cameras": list(layout.cameras), "proprio_dim": 9, "action_dim": 7})
        placed = ray.get(robot.describe.remote(), timeout=240)["node_id"]  # the arm's child process has started its simulation
        playing = robot.play.remote(INSTRUCTION, "lift", 200)
        while ray.get(server.stats.remote())["requests"] < 1 and not ray.wait([playing], timeout=0)[0]:
            time.sleep(0.1)  # the episode has asked for its first chunk: it holds its lease
        net = CosmosPolicyModel.build(cfg, layout, seed=3).denoiser.net
        weights.publish(pack(net.state_dict()), version=8, step=80, target="policy")
        published_during_first = not ray.wait([playing], timeout=0)[0]
        first = ray.get(playing, timeout=120)
        second = ray.get(robot.play.remote(INSTRUCTION, "lift", 4), timeout=120)  # ends at max_steps before the script's label: a failure
        left = ray.get(robot.leave.remote("the test is over"), timeout=90)
        stats_now = replay.stats()
        path = next((tmp / "replay").rglob(f"experience_success/{first['episode_id']}.hdf5"))
        ep = read_episode(path)
        episode = {"source": ep.source.value, "policy_version": ep.policy_version, "planning_version": ep.planning_version,
                   "steps": ep.num_steps, **{k: ep.metadata.get(k) for k in ("robot_id", "labelled_by", "reason", "host", "versions_changed",
                                                                           "driver")}}
        return {"robot_node": robot_node.node_id, "head_node": cluster.head_node.node_id, "placed": placed, "first": first,
                "second": second, "left": left, "episode": episode, "published_during_first": published_during_first,
                "robot_episodes": int(sum(row.get("episodes_robot", 0) for row in stats_now.values()))}
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had is None:
            marker.unlink(missing_ok=True)
        else:
            marker.write_text(had)


if __name__ == "__main__":
    print(json.dumps(two_node_cluster(Path(sys.argv[1]))), flush=True)
