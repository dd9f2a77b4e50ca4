"""Robots in a running main job, scaled down (one job run, several assertions): a robot of the experiment's
``robots:`` (its resource on the job's own local cluster), a robot whose host joins the job's cluster (a second
node offering its resource, as ``ray start --address --resources`` adds) and that attaches with
``launch/robot.py``, plays and leaves, and a
robot outside the cluster through the job's gateway with the thin client. The job's rounds go on and end
with exit 0; the robots' episodes are in replay and in the rounds' ``robot`` records.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from actors.robots import tokens
from test_online import SMALL, _env, _records
from test_robot_actor import INSTRUCTION, lift_robot, robots

ROOT = Path(__file__).resolve().parent.parent


def tiny_checkpoints(root: Path) -> tuple[Path, Path]:
    """The tiny policy and planning model, untrained, as checkpoints the job starts from (versions 0)."""
    from cosmos_policy.checkpoint import save_checkpoint
    from cosmos_policy.codec import NormalizationStats
    from cosmos_policy.config import load_model_config
    from cosmos_policy.layout import load_layout
    from cosmos_policy.model import CosmosPolicyModel
    from cosmos_policy.text import TextEmbeddingCache

    cfg, layout = load_model_config("tiny"), load_layout("libero")
    rng = np.random.default_rng(0)
    stats = NormalizationStats.compute(rng.uniform(-1, 1, (200, 7)), rng.uniform(-1, 1, (200, 9)))
    for name, seed in (("policy", 0), ("planning", 1)):
        save_checkpoint(root / name, CosmosPolicyModel.build(cfg, layout, seed=seed), stats=stats, text=TextEmbeddingCache(),
                        metadata={"version": 0})
    return root / "policy", root / "planning"


def robot_host(gcs_address: str, robot_id: str):
    """A robot's host joining the job's cluster: a second Ray node on this machine offering ``robot:<id>`` and no CPU, started as
    ``ray start --address=<gcs> --num-cpus=0 --resources='{"robot:<id>": 1}'`` starts one (``ray._private.node.Node``, as
    ``ray.cluster_utils`` does). Not the CLI itself: it rewrites 127.0.0.1 to the machine's network address once
    multi-node is on, and the job's cluster listens on loopback only."""
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(gcs_address=gcs_address, node_ip_address="127.0.0.1", num_cpus=0, num_gpus=0, resources={f"robot:{robot_id}": 1},
                       object_store_memory=150 * 1024 * 1024, min_worker_port=0, max_worker_port=0, node_manager_port=0,
                       include_log_monitor=False)
    params.dashboard_agent_listen_port = None  # a free one: the job's node holds the default
    return Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)


def listening_beyond_loopback() -> list[str]:
    """Every TCP socket listening beyond loopback in this test's process tree (the job, its Ray cluster, the robot's
    node, the robots' processes): ``address:port pid name`` each. Sockets of processes outside the tree (the machine's
    own) are not the run's."""
    import psutil

    tree = {p.pid: p for p in psutil.Process().children(recursive=True)}
    out = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in tree:
            continue
        ip = conn.laddr.ip.removeprefix("::ffff:")
        if not ipaddress.ip_address(ip).is_loopback:
            try:
                name = " ".join(tree[conn.pid].cmdline())[:120]
            except psutil.Error:
                name = "?"
            out.append(f"{conn.laddr.ip}:{conn.laddr.port} pid {conn.pid} {name}")
    return out


def wait_for_job(job: subprocess.Popen, run_dir: Path, lines: list[str], ready) -> dict:
    """The job's job.json once ``ready(its contents)``."""
    deadline = time.time() + 600
    while True:
        path = run_dir / "job.json"
        data = json.loads(path.read_text()) if path.is_file() else None
        if data is not None and ready(data):
            return data
        assert job.poll() is None and time.time() < deadline, "".join(lines)[-4000:]
        time.sleep(0.5)


@pytest.mark.slow
def test_robots_attach_to_a_running_job_play_into_its_replay_and_leave(tmp_path: Path) -> None:
    from cosmos_policy.data.episode_file import read_episode
    from launch.metrics import documented

    run_dir, arm = tmp_path / "run", tmp_path / "arm.yaml"
    arm.write_text(yaml.safe_dump(lift_robot("arm")))  # 2 Hz: a chunk (8 s) outlasts its latency in a busy job
    token_file, token = tmp_path / "tokens.json", tmp_path / "gw-arm.token"
    token.write_text(tokens.mint(token_file, "gw-arm"))
    entry = robots({"config": str(arm), "id": "job-arm", "instruction": f"'{INSTRUCTION}'", "task": "lift", "operator": "scripted",
                    "script": "{8: success}", "episodes_per_round": "1", "max_steps": "200"})
    env = _env(RAY_AUTH_MODE="disabled")
    policy, planning = tiny_checkpoints(tmp_path)  # no offline phases: what this test is about starts with the services
    cmd = [sys.executable, str(ROOT / "launch" / "online.py"), *SMALL, "demos.episodes=2", f"model.checkpoint={policy}",
           f"model.planning_checkpoint={planning}", "eval.also_without_planning=false", "logging.wandb=disabled",
           "online.rounds=3", "online.episodes_per_round=8", entry, "gateway.enabled=true",
           f"gateway.token_file={token_file}", f"run_dir={run_dir}", "name=robotjob"]
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    node = None
    try:
        attach = wait_for_job(job, run_dir, lines, lambda data: True)  # its cluster is up: robots may start joining
        node = robot_host(attach["ray_address"], "joined-arm")
        robot_node = node.node_id
        joined = subprocess.Popen([sys.executable, str(ROOT / "launch" / "robot.py"), "--job", str(run_dir), "--robot", str(arm), "--id",
                                   "joined-arm", "--instruction", INSTRUCTION, "--task", "lift", "--operator", "scripted", "--script",
                                   "8=failure", "--episodes", "1", "--max-steps", "200"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
        attach = wait_for_job(job, run_dir, lines, lambda data: data["gateway"] is not None)  # its services are up
        remote = subprocess.Popen([sys.executable, "-m", "actors.robots.remote", "--address", attach["gateway"], "--robot", str(arm), "--id",
                                   "gw-arm", "--token-file", str(token), "--instruction", INSTRUCTION, "--task", "lift", "--operator",
                                   "scripted", "--script", "8=success", "--episodes", "1", "--max-steps", "200"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        joined_out, _ = joined.communicate(timeout=400)
        # Everything of a run on one machine listens on loopback (the README says so): the job's Ray cluster, its
        # learner's rendezvous, the gateway, the robot's node, while rounds are played and a robot is attached.
        beyond = listening_beyond_loopback()
        remote_out, _ = remote.communicate(timeout=400)
        assert job.poll() is None, "the job ended before the robots did: " + "".join(lines)[-3000:]
        node.kill_all_processes(check_alive=False, allow_graceful=True)  # the robot's host leaves the cluster too; the job goes on
        node = None
        job.wait(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(timeout=90)
        if node is not None:  # the robot's host leaves the (ended) cluster
            node.kill_all_processes(check_alive=False, allow_graceful=True)
        reader.join(timeout=30)
    log = "".join(lines)
    assert job.returncode == 0, log[-4000:]
    assert not beyond, beyond
    assert joined.returncode == 0, joined_out[-4000:]
    assert remote.returncode == 0, remote_out[-4000:]

    # What each robot's process said: the joined one played its two episodes (the script's failures) and left.
    played = [json.loads(x) for x in joined_out.splitlines() if x.startswith("{")]
    assert [(r["success"], r["inserted"], r["table"]) for r in played] == [(False, True, "experience_failure")], joined_out[-3000:]
    assert "left job robotjob (done) after 1 episode(s); the job goes on" in joined_out, joined_out[-3000:]
    assert f"(node {robot_node[:8]}), attached to job robotjob" in joined_out  # on its host, the node with its resource
    (through_gateway,) = [json.loads(x) for x in remote_out.splitlines() if x.startswith("{")]
    assert through_gateway["success"] and through_gateway["inserted"], remote_out[-3000:]
    assert "robot joined-arm joined the job" in log and "robot joined-arm left the job (done)" in log, log[-4000:]
    assert f"robot gateway: listening on 127.0.0.1:{attach['gateway'].rsplit(':', 1)[1]}" in log
    assert not (run_dir / "job.json").exists()  # removed at the job's end

    # In replay: source robot, each robot's id, the versions it acted with and its operator's label.
    episodes = [read_episode(p) for p in sorted((run_dir / "replay").rglob("experience_*/*.hdf5"))]
    mine: dict[str, list] = {}
    for ep in episodes:
        if ep.source.value == "robot":
            mine.setdefault(ep.metadata["robot_id"], []).append(ep)
    assert set(mine) == {"job-arm", "joined-arm", "gw-arm"}, {k: len(v) for k, v in mine.items()}
    assert len(mine["joined-arm"]) == 1 and len(mine["gw-arm"]) == 1 and mine["job-arm"]
    for robot_id, eps in mine.items():
        for ep in eps:
            assert ep.metadata["labelled_by"] == "operator" and isinstance(ep.policy_version, int), (robot_id, ep.metadata)
            assert ep.success == (robot_id != "joined-arm") and ep.task == "lift" and ep.instruction == INSTRUCTION
    assert all(p["episode_id"] in {ep.episode_id for ep in mine["joined-arm"]} for p in played)

    # In the rounds' metrics: a robot record per round with episodes, for every robot, every name documented.
    records = _records(run_dir, "robot")
    keys = {k for r in records for k in r}
    for robot_id in ("job-arm", "joined-arm", "gw-arm"):
        assert {f"robot/{robot_id}/{m}" for m in ("success_rate", "intervention_rate", "clipped_step_rate", "episodes")} <= keys, keys
    assert sum(r.get("robot/joined-arm/episodes", 0) for r in records) == 1
    assert all(r.get("robot/joined-arm/success_rate", 0.0) == 0.0 and r.get("robot/gw-arm/success_rate", 1.0) == 1.0 for r in records)
    assert {r["round"] for r in records} <= {1, 2, 3} and [e["round"] for e in _records(run_dir, "eval")] == [0, 1, 2, 3]
    every = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not sorted({(r["kind"], k) for r in every for k in r if not documented(r["kind"], k)})
