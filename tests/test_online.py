"""The main job: its config, its logger, and whole scaled-down runs (ray job submit, LIBERO, stop/resume)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from cosmos_policy.errors import ConfigError
from launch.config import experiment_names, load_experiment
from launch.monitor import Monitor

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")

# The quickstart scaled down to a couple of minutes of a 2-core machine.
SMALL = [
    "demos.episodes=6", "offline.policy_steps=8", "offline.validate_every=4", "offline.planning_steps=4", "offline.batch=4",
    "online.rounds=2", "online.episodes_per_round=4", "online.runners=2", "online.refine_steps=4", "online.publish_every=2",
    "online.batch=4", "eval.trials=2", "env.kwargs.max_steps=34", "env.kwargs.num_initial_states=4", "planner.num_candidates=2",
    "planner.value_steps=[1]", "policy.action_steps=2", "logging.wandb=offline", "model.size=tiny", "learner.cpus_per_worker=1",
]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", WANDB_MODE="offline", MUJOCO_GL="egl",
               PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _replay_episodes(run_dir: Path, table: str) -> list[dict]:
    out = []
    for path in sorted((run_dir / "replay").rglob(f"{table}/*.hdf5")):
        with h5py.File(path, "r") as f:
            out.append(json.loads(f.attrs["metadata"]))
    return out


def _timed_lines(proc: subprocess.Popen, on_line=lambda line: None, timeout_s: float = 1200) -> list[tuple[float, str]]:
    """Every line a running job prints (stdout and stderr), with when it arrived; ``on_line`` sees each."""
    lines, deadline = [], time.time() + timeout_s
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.time(), line))
        on_line(line)
        assert time.time() < deadline, "the job ran past its time"
    proc.wait(timeout=120)
    return lines


def _check_the_log_speaks(lines: list[tuple[float, str]]) -> None:
    """No silent minute (a line at least every 60 s) and no error-level line in a healthy run."""
    gaps = [(b[0] - a[0], b[1].strip()) for a, b in zip(lines, lines[1:])]
    assert max(g for g, _ in gaps) < 60, max(gaps)
    errors = [line for _, line in lines if re.search(r"\bERROR\b|Traceback|\[E\]|^\[\S+ \S+ E \d+ \d+\]", line)]  # the last: Ray's core
    assert not errors, errors[:5]


def _kill_actor_at_work(title: str, timeout_s: float = 60) -> int:
    """kill -9 the first process whose title (Ray's ``ray::<Actor>.<method>`` while it runs a call) is ``title``;
    waits up to ``timeout_s`` for one to appear; returns its pid."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                name = cmdline.read_bytes().split(b"\0")[0].strip()
            except OSError:
                continue
            if name == title.encode():
                pid = int(cmdline.parent.name)
                os.kill(pid, signal.SIGKILL)
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no process {title!r} within {timeout_s} s")


def _reports_the_kill(line: str) -> bool:
    """Ray's own line about a worker killed on purpose (a test's kill -9), which a healthy run would not print."""
    return "A worker died or was killed while executing a task" in line


def _check_finished_run(run_dir: Path, rounds: int) -> None:
    evals = _records(run_dir, "eval")
    assert [e["round"] for e in evals] == list(range(rounds + 1))  # round 0 before any online training
    assert all(0.0 <= e["success_rate"] <= 1.0 and e["episodes"] >= 1 for e in evals)
    versions = [e["weight_version"] for e in evals]
    assert versions[0] == 0 and len(set(versions[1:])) == rounds and min(versions[1:]) >= 1  # a new version each round
    learner = _records(run_dir, "learner")
    assert {r["phase"] for r in learner} >= {"policy_offline", "planning_offline", "planning_online"}
    validation = _records(run_dir, "validation")  # the held-out demonstration (1 of 6) is validated on
    assert validation and all(np.isfinite(r["val_loss"]) for r in validation)
    assert all(np.isfinite(r["loss"]) for r in learner)
    collect = [r for r in _records(run_dir, "collect") if not r["stopped"]]  # a round cut by a stop is finished on resume
    assert sorted(r["round"] for r in collect) == list(range(1, rounds + 1)) and all(r["env_steps_per_s"] > 0 for r in collect)
    assert (run_dir / "success_rate.png").stat().st_size > 1000
    assert json.loads((run_dir / "state.json").read_text())["finished"]
    # Every metric the run wrote is documented (launch/metrics.py), and weight versions are whole publications.
    from launch.metrics import documented

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    undocumented = sorted({(r["kind"], k) for r in records for k in r if not documented(r["kind"], k)})
    assert not undocumented, undocumented
    versions = [r[k] for r in records for k in ("weight_version", "policy_version", "published_version") if r.get(k) is not None]
    assert versions and all(isinstance(v, int) for v in versions), versions


# ---- config ------------------------------------------------------------------------------------
def test_every_experiment_config_loads() -> None:
    assert {"quickstart", "libero_spatial", "libero_all"} <= set(experiment_names())
    for name in experiment_names():
        cfg = load_experiment(name)
        assert cfg.name == name
    # The 2b configs split each batch of 32 into micro-batches of 8 and ask for float8 where the GPU has it.
    learner = load_experiment("libero_spatial").learner_config("x", online=True)
    assert (learner.micro_batch, learner.grad_accum, learner.checkpoint_blocks, learner.float8) == (8, 4, 0, "auto")
    # The planning mixture: a preset (planning_q: Q(s, a) value samples) or a mapping of pools and kinds.
    q = load_experiment("quickstart", ["data.planning_mixture=planning_q", "planner.value_kind=q_value"])
    assert q.mixture("planning").expected_kinds() == pytest.approx({"policy": 0.1, "world_model": 0.45, "q_value": 0.45})
    own = load_experiment("quickstart", ["data.planning_mixture={pools: {demo: 0.2, success: 0.4, failure: 0.4}, kinds: "
                                         "{demo: {policy: 1.0}, success: {q_value: 1.0}, failure: {q_value: 1.0}}}"])
    assert own.mixture("planning").expected_kinds() == pytest.approx({"policy": 0.2, "q_value": 0.8})
    assert own.to_dict()["data"]["planning_mixture"]["pools"]["demo"] == 0.2
    cfg = load_experiment("quickstart", ["online.rounds=7", "planner.num_candidates=4"])
    assert cfg.online.rounds == 7 and cfg.planner.num_candidates == 4
    # Replay's step windows are the layout's action chunk even when fewer actions run per query.
    cfg = load_experiment("quickstart", ["env.execute=8"])
    assert {t.window for t in cfg.replay.tables} == {16}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["online.roundz=3"], "roundz"),
        (["online.rounds=three"], "online.rounds"),
        (["online.runners=0"], "online.runners: expected >= 1"),
        (["online.servers=0"], "online.servers: expected an integer from 1 to online.runners"),
        (["online.servers=3", "online.runners=2"], "online.servers: expected an integer from 1 to online.runners .*got 3"),
        (["planner.num_candidatez=3"], r"the command line: planner.num_candidatez: unknown key \(did you mean 'num_candidates'"),
        (["learner.lr=0.1"], r"learner.lr: set by the job from offline.lr / online.lr"),
        (["online.branch_first_query=true"], r"the command line: online.branch_first_query: unknown key"),
        (["planner.aggregation=best"], "planner.aggregation"),
        (["learner.zero_stage=5"], "learner.zero_stage"),
        (["model.planning_size=huge"], "model.planning_size: expected one of"),
        (["learner.grad_accum=5"], r"learner.grad_accum: expected a divisor of offline.batch \(32\), got 5"),
        (["learner.float8=e5m2"], "learner.float8: expected one of"),
        (["data.planning_mixture=planing"], "data.planning_mixture: mixture preset 'planing': expected one of"),
        (["data.planning_mixture={pools: {demo: 1.0}, kinds: {demo: {qvalue: 1.0}}}"],
         "data.planning_mixture: mixture.kinds.demo: unknown entry 'qvalue'"),
        (["demos.source=dataset"], "demos.dataset: source 'dataset' needs a path"),
        (["env.name=libero"], "demos.source: the scripted expert exists for the built-in task 'lift' only"),
        (["online.refine_policy=maybe"], r"the command line: online.refine_policy: expected true or false, got 'maybe'"),
        (["online.refine_policy=true", "online.policy_refine_steps=0"], "online.policy_refine_steps: expected >= 1"),
        (["data.policy_online_mixture={pools: {failure: 1.0}, kinds: {failure: {polcy: 1.0}}}"],
         "data.policy_online_mixture: mixture.kinds.failure: unknown entry 'polcy'"),
        (["learner.cpus_per_worker=0"], "learner.cpus_per_worker: expected a number > 0"),
        (["planner.num_candidates=4", "online.branch_candidates=5"], r"online.branch_candidates: expected null or an integer from 1 to "
         r"planner.num_candidates \(4\), got 5"),
        (["eval.trials=10", "eval.fresh_first_trial=5"], r"eval.fresh_first_trial: expected an integer >= eval.trials \(10\)"),
        (["online.budget_s=0"], "online.budget_s: expected null or seconds > 0"),
        (["online.min_experience=-5"], r"online.min_experience: expected an integer >= 0 \(experience items; 0: no wait\), got -5"),
        (["eval.runners=-1"], r"eval.runners: expected an integer >= 0 \(0: the collection's runners\), got -1"),
        (["logging.wandb=sometimes"], r"logging.wandb: expected one of \('auto', 'online', 'offline', 'disabled'\), got 'sometimes'"),
        (["promotion.tolerance=2"], r"promotion.tolerance: expected a success difference in \[0, 1\], got 2"),
        (["promotion.live_window=-1"], r"promotion.live_window: expected an integer >= 0 \(0: no live check\), got -1"),
        (["env.name=my sim:Env"], r"env.name: expected one of \['libero', 'lift'\] or package.module:Class, got 'my sim:Env'"),
    ],
)
def test_bad_experiment_configs_are_clear_errors(overrides: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        load_experiment("quickstart", overrides)


def test_unknown_experiment_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="quickstart"):
        load_experiment("quickstrat")


def test_the_judge_is_graded_on_each_rounds_new_branched_states() -> None:
    """Each branch records the judge's score of the candidate it played at the branch point: per state,
    (succeeding, failing) pairs in the right order, and the outcome of the judge's pick among the played."""
    from actors.env_runner import EpisodeResult
    from launch.rounds import Job, judge_figures

    def played(seed: int, candidate: int, value: float, success: bool, version: int = 1) -> tuple[Job, EpisodeResult]:
        return Job("lift", seed, (candidate,)), EpisodeResult(episode_id="", task="lift", seed=seed, success=success, steps=1, queries=1,
                                                              interrupted=False, wall_s=0.0,
                                                              planning_version=version, predicted_values=[value])

    rows = [played(5, 0, 0.9, True), played(5, 1, 0.2, False), played(5, 2, 0.5, True),  # both pairs right, the pick succeeds
            played(6, 0, 0.1, True), played(6, 1, 0.8, False),  # the one pair wrong, the pick fails
            played(7, 0, 0.4, True), played(7, 1, 0.4, False),  # a tie counts half
            played(8, 0, 0.3, True, version=2)]  # alone under its judge version: no pair
    assert judge_figures(rows) == pytest.approx({"branch_judge_pair_accuracy": 2.5 / 4, "branch_judge_pick_success": 2 / 3})
    assert judge_figures(rows[-1:]) == {}


# ---- monitor -----------------------------------------------------------------------------------
def test_the_budget_ends_the_rounds_while_the_last_evaluations_still_fit(tmp_path: Path) -> None:
    """online.budget_s: a round starts only if it, the evaluation between and the last evaluations fit, each
    estimated from what was measured (the previous round; the round-0 evaluation's seconds per trial)."""
    from launch.rounds import Budget

    with (tmp_path / "metrics.jsonl").open("w") as f:  # a run 500 s in, whose round-0 evaluation (100 trials) took 100 s
        f.write(json.dumps({"kind": "eval", "time": 0, "wall_s": 500.0, "round": 0, "seconds": 100.0, "episodes": 200}) + "\n")
    monitor = Monitor(tmp_path, {}, "disabled")
    cfg = load_experiment("lift_learning", ["online.budget_s=1000"])  # trials 100, between 20, fresh 100: 20 s + 200 s
    budget = Budget(cfg, monitor)
    assert budget.fits_another_round(250.0)  # 500 + 20 + 250 + 200 = 970
    assert not budget.fits_another_round(300.0)  # 1020
    assert Budget(load_experiment("lift_learning", ["online.budget_s=null"]), monitor).fits_another_round(1e9)
    monitor.close()



def test_monitor_writes_jsonl_wandb_offline_and_the_plot_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    m = Monitor(tmp_path, {"name": "t"}, "auto", name="t")
    m.log("learner", {"learner/step": 1, "loss": 0.5, "grad_norm": float("nan")})
    for v, rate in enumerate([0.1, 0.4]):
        m.log("eval", {"round": v, "weight_version": v, "success_rate": rate, "success_rate_no_plan": 0.1, "task/a": rate, "task/b": 0.0,
                       "episodes": 10})
    assert m.plot() == tmp_path / "success_rate.png" and m.plot_path.stat().st_size > 1000
    assert not (tmp_path / "loop.png").exists()  # no online rounds yet: nothing to draw
    m.log("rates", {"interval_s": 10.0, "env_steps": 50, "learner_samples": 64, "env_steps_per_s": 5.0, "learner_samples_per_s": 6.4})
    m.log("learner", {"phase": "planning_online", "learner/step": 20, "staleness_versions": 0.5, "staleness_max_versions": 1.0})
    assert m.plot_loop() == tmp_path / "loop.png" and (tmp_path / "loop.png").stat().st_size > 1000
    m.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))  # W&B ran offline, into the run directory
    rec = _records(tmp_path, "learner")[0]
    assert rec["grad_norm"] is None and rec["loss"] == 0.5 and rec["wall_s"] >= 0
    run_id = (tmp_path / "wandb_id.txt").read_text()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "eval", "trunc')  # a line cut by a crash
    again = Monitor(tmp_path, {"name": "t"}, "offline")
    assert len(again.records("eval")) == 2 and (tmp_path / "wandb_id.txt").read_text() == run_id
    again.log("eval", {"round": 2, "weight_version": 2, "success_rate": 0.6, "episodes": 10})
    again.close()
    assert [r["success_rate"] for r in again.records("eval")] == [0.1, 0.4, 0.6]
    assert Monitor(tmp_path / "x", {}, "disabled").plot() is None


def test_forgetting_is_each_tasks_drop_from_its_best_and_many_tasks_get_a_map(tmp_path: Path) -> None:
    """Continual learning's forgetting curve: per task, its best earlier success less its success now; with more tasks
    than the curve's lines (multi-task LIBERO's 40), tasks.png maps every task's success at every evaluated version."""
    from launch.rounds import forgetting

    tasks = [f"task {i}" for i in range(13)]
    evals = [{"weight_version": v, **{f"task/{t}": rate for t, rate in zip(tasks, rates)}}
             for v, rates in enumerate([[0.5] * 13, [1.0] + [0.5] * 12, [0.0] + [0.75] * 12])]
    assert forgetting([], evals[0]) == {}
    assert forgetting(evals[:1], evals[1]) == {"forgetting": 0.0, "forgetting_max": 0.0}
    assert forgetting(evals[:2], evals[2]) == {"forgetting": 1.0 / 13, "forgetting_max": 1.0}  # task 0 fell from 1.0 to 0
    m = Monitor(tmp_path, {}, "disabled")
    for e in evals:
        m.log("eval", {"round": e["weight_version"], "success_rate": 0.5, "episodes": 13, **e})
    m.plot()
    m.close()
    assert (tmp_path / "tasks.png").stat().st_size > 1000


# ---- whole runs -------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_job_submit_runs_the_quickstart_with_token_auth(tmp_path: Path) -> None:
    """``ray start --head`` on loopback with token authentication, then ``ray job submit`` of the main job (its working
    directory uploaded), stopped by ``ray job stop`` in round 1: a clean stop, a final checkpoint. (A stopped job resumed
    by the same command: test_stop_saves_a_checkpoint_and_a_restart_resumes and the chaos drills; the quickstart run to
    its end: test_the_actors_go_on_while_the_learner_restarts.)"""
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    port, dash = _free_port(), _free_port()
    # The session's other local cluster (conftest's ``ray_local``) holds Ray's default agent ports (52365 and
    # friends); a second head that reuses them starts without a job agent ("No available agent to submit
    # job"), so every port this head listens on is a free one.
    agent_ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                   f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
                   f"--ray-client-server-port={_free_port()}"]
    # Ray's socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must fit a Unix socket's
    # 107 bytes, which pytest's tmp_path does not leave room for: a short directory under /tmp.
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=8", "--disable-usage-stats",
                             f"--temp-dir={temp}", *agent_ports], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    run_dir = tmp_path / "run"
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while subprocess.run([RAY, "job", "list", f"--address={address}"], env=env, capture_output=True).returncode != 0:
            assert head.poll() is None and time.time() < deadline, "the Ray head did not come up"
            time.sleep(2)
        # Without the token the cluster refuses the job.
        no_token = subprocess.run([RAY, "job", "list", f"--address={address}"], env={**env, "RAY_AUTH_TOKEN": "wrong"}, capture_output=True)
        assert no_token.returncode != 0
        # RAY_JOB_STOP_WAIT_TIME_S: how long `ray job stop` lets the job stop cleanly before SIGKILL (Ray's default, 3 s,
        # is shorter than finishing a step and saving a checkpoint); the README's submit command sets it the same way.
        runtime_env = json.dumps({"excludes": [".venv", ".venv-reverb", ".git", "runs", ".whl", "wandb"],
                                  "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "300"}})

        def submit(job_id: str, *flags: str) -> subprocess.CompletedProcess:
            cmd = [RAY, "job", "submit", f"--address={address}", f"--submission-id={job_id}", *flags, "--working-dir", str(ROOT),
                   f"--runtime-env-json={runtime_env}", "--", sys.executable, "launch/online.py", f"run_dir={run_dir}", "name=jobtest",
                   *SMALL, "online.rounds=1", "online.refine_steps=400", "online.publish_every=100"]
            # One round, whose refinement (400 steps, minutes) the stop always lands in: on a fast machine a round of
            # SMALL's 4 steps was over, and the job finished, before `ray job stop` struck.
            for _ in range(30):  # the head answers `job list` a little before its node's job agent takes submissions
                job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
                if "No available agent to submit job" not in job.stdout + job.stderr:
                    return job
                time.sleep(4)
            raise AssertionError("no job agent")

        # `ray job stop` in round 1: a final checkpoint and a clean exit.
        first = submit("jobtest-stopped", "--no-wait")
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
        logs = ""
        deadline = time.time() + 900
        while "round 1: collecting" not in logs:
            assert time.time() < deadline, logs[-3000:]
            time.sleep(3)
            logs = subprocess.run([RAY, "job", "logs", f"--address={address}", "jobtest-stopped"], env=env, capture_output=True,
                                  text=True).stdout
        stop = subprocess.run([RAY, "job", "stop", f"--address={address}", "jobtest-stopped"], env=env, capture_output=True, text=True,
                              timeout=600)
        assert stop.returncode == 0 and "stopped" in stop.stdout.lower(), stop.stdout[-2000:] + stop.stderr[-2000:]
        logs = subprocess.run([RAY, "job", "logs", f"--address={address}", "jobtest-stopped"], env=env, capture_output=True, text=True).stdout
        assert "saving a final learner checkpoint" in logs and "run again with the same run_dir to resume" in logs, logs[-3000:]
        assert "Traceback" not in logs and not re.search(r"^\[\S+ \S+ E \d+ \d+\]", logs, re.M), logs[-3000:]
        status = subprocess.run([RAY, "job", "status", f"--address={address}", "jobtest-stopped"], env=env, capture_output=True, text=True)
        assert "was stopped" in status.stdout, status.stdout[-2000:] + status.stderr[-2000:]
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=90)
        shutil.rmtree(temp, ignore_errors=True)
    state = json.loads((run_dir / "state.json").read_text())
    assert not state.get("finished") and state.get("round", 0) == 0, state  # round 1 was cut: a resume plays it again
    assert (run_dir / "learner" / "planning_online" / "latest").is_file()
    assert [e["round"] for e in _records(run_dir, "eval")] == [0] and len(_replay_episodes(run_dir, "demos")) == 6


def test_a_local_run_starts_its_own_cluster_beside_a_ray_start_one() -> None:
    """``ray start`` records its cluster in /tmp/ray/ray_current_cluster, which a bare ``ray.init()`` joins
    (and then refuses ``num_cpus``); with ``ray.address`` unset the main job starts its own local cluster."""
    marker = Path("/tmp/ray/ray_current_cluster")
    had_marker = marker.exists()
    env = _env(RAY_AUTH_MODE="disabled")
    port = _free_port()
    ports = [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
             f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}", f"--ray-client-server-port={_free_port()}"]
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false",
                             "--num-cpus=1", "--disable-usage-stats", *ports], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (marker.exists() and f":{port}" in marker.read_text()):
            assert head.poll() is None and time.time() < deadline, "the Ray head did not come up"
            time.sleep(1)
        code = ("import ray; from launch.config import load_experiment; from launch.cluster import connect; "
                "connect(load_experiment('quickstart', ['ray.num_cpus=3'])); "
                "print('GCS', ray.get_runtime_context().gcs_address, 'CPUS', ray.cluster_resources()['CPU']); ray.shutdown()")
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        line = next(x for x in out.stdout.splitlines() if x.startswith("GCS"))
        gcs, cpus = line.split()[1], float(line.split()[3])
        assert not gcs.endswith(f":{port}") and cpus >= 3  # its own cluster, sized as asked
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=90)
        if not had_marker:  # a stale record would send later bare ray.init() calls to a dead cluster
            marker.unlink(missing_ok=True)


def _libero_demo_file(path: Path, demos: int, steps: int, seed: int) -> None:
    """A LIBERO-Cosmos-Policy demo file (``<task>_demo.hdf5``: JPEG frames, actions, robot_states)."""
    from cosmos_policy.episode import encode_jpeg

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        for i in range(demos):
            g = f.create_group(f"data/demo_{i}")
            for key in ("agentview_rgb_jpeg", "eye_in_hand_rgb_jpeg"):
                frames = [encode_jpeg(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(steps)]
                g.create_dataset(f"obs/{key}", data=np.array([np.frombuffer(b, np.uint8) for b in frames], dtype=object),
                                 dtype=h5py.vlen_dtype(np.uint8))
            actions = rng.uniform(-1, 1, (steps, 7)).astype(np.float32)
            actions[:, 6] = np.sign(actions[:, 6])
            g.create_dataset("actions", data=actions)
            g.create_dataset("robot_states", data=rng.normal(size=(steps, 9)).astype(np.float32))


@pytest.mark.slow
def test_libero_spatial_experiment_scaled_down(tmp_path: Path) -> None:
    """The libero_spatial experiment end to end: 2 EnvRunners on real LIBERO, tiny model, 2 rounds, 2 PolicyServers
    (the multi-GPU layout: every published version must reach both servers before a round's evaluation)."""
    pytest.importorskip("libero.libero")
    data = tmp_path / "libero_spatial_regen"
    data.mkdir()
    name = "pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate"
    _libero_demo_file(data / f"{name}_demo.hdf5", demos=3, steps=24, seed=0)
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", "model.size=tiny", "model.text_encoder=random", f"demos.dataset={data}", "demos.max_episodes=3",
                 "data.augmentation=false", "env.kwargs.image_size=64", "env.kwargs.max_steps=20", f"env.tasks=[{name}]",
                 "offline.policy_steps=4", "offline.validate_every=4", "offline.planning_steps=2", "offline.batch=4", "online.rounds=2",
                 "online.episodes_per_round=2", "online.runners=2", "online.servers=2", "online.refine_steps=2", "online.publish_every=2",
                 "online.batch=4", "eval.trials=1", "eval.also_without_planning=false", "planner.num_candidates=2", "planner.value_steps=[1]",
                 "planner.future_steps=[1]", "policy.action_steps=1", "replay.shards=1", "learner.gpus_per_worker=0", "logging.wandb=offline",
                 "promotion.states=1", "promotion.runners=1"]
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "online.py"), "--config", "libero_spatial", *overrides], env=_env(RAY_AUTH_MODE="disabled"),
                          capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    evals = _records(run_dir, "eval")
    assert [e["round"] for e in evals] == [0, 1, 2] and all(f"task/{name}" in e for e in evals)
    # Each round waited until both PolicyServers served the round's version (else the job fails with a TimeoutError).
    versions = [e["weight_version"] for e in evals]
    assert versions[0] == 0 and versions[1] < versions[2], versions
    runners = {m["runner"] for m in _replay_episodes(run_dir, "experience_*")}
    assert len(runners) == 2
    # Eval-gated promotion (on in libero_spatial): each round's version was played by the gate before it was served
    # (the tiny model ties its predecessor at 0 %: promoted), and the registry's table says so.
    gates = _records(run_dir, "promotion")
    assert [(g["round"], g["planning_version"], g["status"]) for g in gates] == [(1, versions[1], "promoted"), (2, versions[2], "promoted")]
    from launch.metrics import documented

    assert all(documented("promotion", k) for g in gates for k in g), gates
    table = {(row["target"], row["version"]): row["status"] for row in json.loads((run_dir / "versions.json").read_text())}
    assert table[("planning", 0)] == table[("planning", versions[2])] == "promoted"


@pytest.mark.slow
def test_stop_saves_a_checkpoint_and_a_restart_resumes(tmp_path: Path) -> None:
    """The learning experiment (lift_learning) scaled down, asynchronous, stopped by SIGTERM (``ray job stop``; Ctrl-C's
    SIGINT takes the same path) in the middle of round 2: a final learner checkpoint, exit 0, no error line (Ray's
    own SIGTERM handler would print a stack trace and lose the checkpoint); the same command again, on the
    run directory moved to another folder without the planning learner's checkpoints (what a move between
    machines needs leaves them out), finishes the remaining rounds.

    Branching collection, a planning model of its own size, smaller evaluations between the first and the
    last; with the policy refined too (online.refine_policy): both learners checkpoint and resume, and every
    round's evaluation runs on the round's published policy and planning versions. The evaluation has a runner of
    its own (eval.runners=1): round 1's, beside round 2's collection, plays on it alone; round 0's and the last on
    all three."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "online.py"), "--config", "lift_learning", *SMALL, "online.rounds=2",
           "online.refine_policy=true", "online.policy_refine_steps=2", "online.branch_states=1", "model.size=tiny", "model.planning_size=tiny",
           "online.servers=1", "online.budget_s=null", "online.episodes_per_round=0", "planner.num_candidates=3", "online.branch_candidates=2",
           "eval.seeds=[0]", "eval.trials_between=1", "eval.fresh_trials=1", "eval.fresh_first_trial=2", "eval.runners=1",
           "learner.gpus_per_worker=0", "learner.cpus_per_worker=1"]
    proc = subprocess.Popen([*cmd, f"run_dir={run_dir}"], env=_env(RAY_AUTH_MODE="disabled"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path)
    sent: list[str] = []  # one signal: a second one aborts at once

    killed: dict[str, int] = {}
    killers: list[threading.Thread] = []

    def kill_at_work(trigger: str, title: str) -> None:
        killed[trigger] = 0
        killers.append(threading.Thread(target=lambda: killed.__setitem__(trigger, _kill_actor_at_work(title)), daemon=True))
        killers[-1].start()

    def stop_once(line: str) -> None:
        # kill -9 an EnvRunner playing an episode of round 1's collection: Ray restarts it, the episode is played
        # again, the job goes on (and a second one later, during an evaluation of the restarted job).
        if "round 1: collecting" in line and not killed:
            kill_at_work("round 1: collecting", "ray::EnvRunner.run")
        # Once round 1 is evaluated (and recorded just after), the asynchronous loop is in round 2: collecting it,
        # and the learner refining up to its first publication.
        if "round 1: success" in line and not sent:
            sent.append(line)
            proc.send_signal(signal.SIGTERM)

    lines = _timed_lines(proc, on_line=stop_once)
    text = "".join(line for _, line in lines)
    assert proc.returncode == 0, text[-4000:]
    killers[0].join(timeout=90)
    assert killed["round 1: collecting"], killed
    _check_the_log_speaks([(t, line) for t, line in lines if not _reports_the_kill(line)])
    (collected,) = [r for r in _records(run_dir, "collect") if r["round"] == 1]
    assert collected["episodes_lost"] >= 1 and collected["episodes"] == 2, collected
    assert "saving a final learner checkpoint" in text and "run again with the same run_dir to resume" in text
    state = json.loads((run_dir / "state.json").read_text())
    assert not state.get("finished") and state["round"] == 1  # round 2 was cut: the restart plays it again
    assert (run_dir / "learner" / "planning_online" / "latest").is_file()
    assert (run_dir / "learner" / "policy_online" / "latest").is_file()
    round1_step = max(r["learner/step"] for r in _records(run_dir, "learner") if r["phase"] == "planning_online" and r["round"] == 1)
    # Moved: another folder, and without the planning learner's checkpoints (Adam's state: most of a run directory).
    # It continues from its latest export (round 1's), on the same step and version counts; the policy's learner
    # resumes from its own checkpoint (saved at the stop, in round 2).
    run_dir = run_dir.rename(tmp_path / "moved")
    shutil.rmtree(run_dir / "learner" / "planning_online")
    again = subprocess.Popen([*cmd, f"run_dir={run_dir}"], env=_env(RAY_AUTH_MODE="disabled"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, cwd=tmp_path)
    # kill -9 an EnvRunner while it plays an episode of the policy-alone evaluation (round 2's collection was done
    # before the stop): Ray restarts it, the episode is played again, the evaluation covers the same episodes.

    def kill_evaluating(line: str) -> None:
        if "round 2: evaluating with planning: 2/2" in line and "round 2: evaluating" not in killed:
            kill_at_work("round 2: evaluating", "ray::EnvRunner.run_trial")

    lines = _timed_lines(again, on_line=kill_evaluating)
    text = "".join(line for _, line in lines)
    assert again.returncode == 0, text[-4000:]
    assert "(resuming)" in text
    killers[-1].join(timeout=90)
    assert killed.get("round 2: evaluating"), killed
    _check_the_log_speaks([(t, line) for t, line in lines if not _reports_the_kill(line)])
    _check_finished_run(run_dir, rounds=2)
    assert [e["runners"] for e in _records(run_dir, "eval")] == [3, 1, 3]
    evaluated = _records(run_dir, "eval")[-1]
    assert evaluated["round"] == 2 and evaluated["episodes_lost"] >= 1 and evaluated["episodes"] == 2, evaluated
    restarted = _records(run_dir, "start")[-1]["time"]
    lost = sum(r.get("episodes_lost", 0) for kind in ("collect", "eval", "eval_fresh") for r in _records(run_dir, kind) if r["time"] > restarted)
    assert text.count("an actor died during an episode") == lost, (lost, [line for line in text.splitlines() if "died" in line])
    restarted = _records(run_dir, "start")[-1]["time"]
    refined = [r for r in _records(run_dir, "learner") if r["phase"] == "planning_online" and r["time"] > restarted]
    # The restart goes on from the learner's step (none left when the learner, not held by round 1's evaluation,
    # had finished round 2 before the stop), never from round 1's start again.
    assert all(r["learner/step"] > round1_step for r in refined), (round1_step, refined)
    # The same steps and versions as a run never stopped: round 2 played again trains only what it had left
    # (2 rounds x 4 planning steps, 2 x 2 policy steps; a publication every 2 steps).
    planning_versions = [e["weight_version"] for e in _records(run_dir, "eval")]
    assert planning_versions == [0, 2, 4], planning_versions
    last_step = {phase: max(r["learner/step"] for r in _records(run_dir, "learner") if r["phase"] == phase)
                 for phase in ("planning_online", "policy_online")}
    assert last_step == {"planning_online": 8, "policy_online": 4}, last_step
    # The policy's versions: 0 (offline) at round 0, then one more published version per round, each
    # served before the round's evaluation (else wait_for_version fails the job); the latest exported.
    policy_versions = [e["policy_version"] for e in _records(run_dir, "eval")]
    assert policy_versions == [0, 1, 2], policy_versions
    assert {r["phase"] for r in _records(run_dir, "learner")} >= {"policy_online"}
    # The version's one owner is the learner: the exported checkpoint carries it (state.json only names the checkpoint).
    state = json.loads((run_dir / "state.json").read_text())
    assert not Path(state["policy_latest"]).is_absolute()  # paths inside the run directory: relative to it, the directory can move
    manifest = json.loads((run_dir / state["policy_latest"] / "manifest.json").read_text())
    assert manifest["metadata"]["version"] == policy_versions[-1] and "policy_version" not in state
    assert [e["episodes"] for e in _records(run_dir, "eval")] == [2, 1, 2]  # eval.trials_between at round 1
    # The last round's evaluation on states used for nothing else (trial 2 of 0..3), with planning and alone, paired.
    (fresh,) = _records(run_dir, "eval_fresh")
    assert (fresh["round"], fresh["episodes"], fresh["first_trial"]) == (2, 1, 2) and "success_rate_no_plan" in fresh
    assert sum(fresh[f"paired/{k}"] for k in ("only_planned", "only_alone", "both", "neither")) == 1
    # The experiment's learner waits for experience (online.min_experience: 256 items, more than these rounds
    # give): its first round began once round 1 was collected, not on the first episode.
    refined = next(r for r in _records(run_dir, "learner") if r["phase"] == "planning_online")
    collected = _records(run_dir, "collect")[0]
    assert refined["experience_wait_s"] > 0 and refined["wall_s"] - refined["seconds"] >= collected["wall_s"] - 0.5, (refined, collected)
    # The figures of the run, written by the committed script from its metrics alone.
    out = tmp_path / "learning_curve.json"
    report = subprocess.run([sys.executable, str(ROOT / "bench" / "learning_curve_report.py"), str(run_dir), "--out", str(out)],
                            capture_output=True, text=True, env=_env())
    assert report.returncode == 0, report.stderr
    figures = json.loads(out.read_text())
    evals = _records(run_dir, "eval")
    assert figures["made_by"] == "launch/online.py" and figures["experiment"] == "lift_learning"
    assert figures["base_success"] == evals[0]["success_rate_no_plan"] and figures["final_success"] == evals[-1]["success_rate"]
    assert figures["fresh_states_episodes"] == 1 and figures["evaluation_episodes"] == 2 and len(figures["commands"]) == 2
    assert figures["experience_episodes"] == sum(r["episodes"] for r in _records(run_dir, "collect"))
    assert figures["rounds"] == len(_records(run_dir, "round")) and figures["rounds_collected"] >= 1
    assert [v["planning_version"] for v in figures["versions"]] == [e["weight_version"] for e in evals]
    assert all(minutes >= 0 for minutes in figures["minutes_by_phase"].values()), figures["minutes_by_phase"]
    # The offline phases' learner checkpoints, and the fresh weights they began from (the planning model's of its own
    # size: model.planning_size), go once their exports are recorded: a resume needs the exports only.
    assert not (run_dir / "learner" / "policy_offline").exists() and not (run_dir / "learner" / "planning_offline").exists()
    assert not (run_dir / "checkpoints" / "init").exists() and not (run_dir / "checkpoints" / "planning_init").exists()
    assert (run_dir / "checkpoints" / "policy" / "manifest.json").is_file() and (run_dir / "checkpoints" / "planning" / "manifest.json").is_file()
    # Branching collection: each round one new state played once per branched candidate (the first 2 of 3), recorded
    # with its branch point's frames.
    collected = _records(run_dir, "collect")
    assert all(r.get("branch_episodes", 0) + r["episodes_kept"] == 2 or r["stopped"] for r in collected), collected
    from cosmos_policy.data.episode_file import read_episode

    branches = [e for e in map(read_episode, sorted((run_dir / "replay").rglob("experience_*/*.hdf5"))) if "branch_of" in e.metadata]
    # Each round's two branches once: a round cut by the stop was finished without playing again what replay held.
    assert sorted((e.metadata["round"], e.metadata["candidate"]) for e in branches) == [(1, 0), (1, 1), (2, 0), (2, 1)], branches
    assert all(e.metadata["branch_candidates"] == [e.metadata["candidate"]] and e.sample_steps(16).tolist() == [0] for e in branches)


@pytest.mark.slow
def test_the_actors_go_on_while_the_learner_restarts(tmp_path: Path) -> None:
    """The asynchronous loop (the default), scaled down: the EnvRunners' episodes and the learner's steps overlap in
    time (both rates above zero in the same ``rates`` intervals); kill -9 of the learner's rank in round 1 is one
    warning line, the group restarts it from its checkpoint, and the env-steps rate stays above zero until the
    learner is back; the job ends with exit 0 on the versions and steps of a run never disturbed. The learner's first
    round waits for its first experience (online.min_experience=20: the first episode's steps)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "online.py"), *SMALL, "offline.policy_steps=2", "offline.validate_every=2",
           "offline.planning_steps=1", "online.rounds=2", "online.episodes_per_round=30", "online.refine_steps=20", "online.publish_every=10",
           "eval.also_without_planning=false", "logging.rates_every_s=3", "logging.wandb=disabled",
           "learner.checkpoint_every=10", "online.min_experience=20", f"run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, env=_env(RAY_AUTH_MODE="disabled"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    killed: list[int] = []

    def kill_learner(line: str) -> None:
        if "round 1: refining the planning model" in line and not killed:
            killed.append(0)
            threading.Thread(target=lambda: killed.__setitem__(0, _kill_actor_at_work("ray::LearnerWorker.train")), daemon=True).start()

    lines = _timed_lines(proc, on_line=kill_learner)
    text = "".join(line for _, line in lines)
    assert proc.returncode == 0, text[-4000:]
    assert killed and killed[0], killed
    assert text.count("learner lost a rank") == 1, text[-4000:]
    _check_the_log_speaks([(t, line) for t, line in lines if not _reports_the_kill(line)])
    rates = _records(run_dir, "rates")
    both = [r for r in rates if r["env_steps"] > 0 and r["learner_samples"] > 0]
    assert both, rates  # collection and refinement at once
    # From the learner's loss to its return (its first samples after the warning), episodes kept ending. A rates record
    # counts the steps of the episodes that ended in its 3 s, and an episode here (34 steps, 2 runners on 2 busy cores)
    # can take longer than that, so one interval may see none; two in a row would be collection stopped.
    (lost_at,) = [t for t, line in lines if "learner lost a rank" in line]
    after = [r for r in rates if r["time"] - r["interval_s"] >= lost_at]
    back = next(i for i, r in enumerate(after) if r["learner_samples"] > 0)
    down = after[:back]
    assert len(down) >= 2 and all(a["env_steps"] + b["env_steps"] > 0 for a, b in zip(down, down[1:])), (down, after[back])
    assert [e["weight_version"] for e in _records(run_dir, "eval")] == [0, 2, 4]
    online = [r for r in _records(run_dir, "learner") if r["phase"] == "planning_online"]
    assert max(r["learner/step"] for r in online) == 40
    assert online[0]["experience_wait_s"] > 0 and "the learner waits for 20 experience items" in text
    first_samples = next(i for i, r in enumerate(rates) if r["learner_samples"] > 0)
    assert any(r["env_steps"] > 0 for r in rates[: first_samples + 1]), rates  # no step before the first episode
    # Staleness in planning versions (the episodes' own), within the bound collect_ahead sets: the newest experience
    # lags at most (collect_ahead + 1) rounds of publications (2 a round here); plotted with the rates.
    assert all(0 <= r["staleness_versions"] <= r["staleness_max_versions"] <= 2 * 2 for r in online), online
    assert (run_dir / "loop.png").stat().st_size > 1000
    # The quickstart run to its end: every round evaluated on a new version, the metrics documented, episodes from both
    # EnvRunners in replay beside the demonstrations.
    _check_finished_run(run_dir, rounds=2)
    assert len({m["runner"] for m in _replay_episodes(run_dir, "experience_*")}) == 2
    assert len(_replay_episodes(run_dir, "demos")) == 6


@pytest.mark.slow
def test_the_main_job_runs_on_reverb(tmp_path: Path) -> None:
    """``replay.backend=reverb``, in the synchronous loop: the EnvRunners insert and the learner samples through the same Reverb
    service (a Reverb server behind the replay shard), a weight version is published, and episodes of
    both EnvRunners were sampled by the learner (Reverb hands out an item's key only with a sample, so
    the service's book knows a key exactly for the items sampled). Runs in the Reverb environment."""
    if os.environ.get("REQUIRE_REVERB") == "1":
        import reverb  # noqa: F401  (its absence fails the test in the Reverb environment)
    else:
        pytest.importorskip("reverb", reason="dm-reverb is an optional extra (see make test-reverb)")
    # The offline phase is the quickstart's own (other tests run it): start from tiny checkpoints made here.
    from cosmos_policy.checkpoint import save_checkpoint
    from cosmos_policy.codec import NormalizationStats
    from cosmos_policy.config import load_model_config
    from cosmos_policy.layout import load_layout
    from cosmos_policy.model import CosmosPolicyModel

    rng = np.random.default_rng(0)
    stats = NormalizationStats.compute(rng.uniform(-1, 1, (100, 7)), rng.uniform(-1, 1, (100, 9)))
    ckpts = {k: save_checkpoint(tmp_path / k, CosmosPolicyModel.build(load_model_config("tiny"), load_layout("libero"), seed=s), stats=stats)
             for k, s in (("policy", 0), ("planning", 1))}
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "online.py"), f"run_dir={run_dir}", "name=reverbjob", *SMALL, "replay.backend=reverb",
           f"model.checkpoint={ckpts['policy']}", f"model.planning_checkpoint={ckpts['planning']}", "online.rounds=1",
           "online.episodes_per_round=4", "eval.also_without_planning=false", "eval.trials=1", "eval.at_start=false",
           "online.loop=synchronous"]  # the round's learner steps come after its episodes: they sample the experience
    proc = subprocess.run(cmd, env=_env(RAY_AUTH_MODE="disabled"), capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    evals = _records(run_dir, "eval")
    assert [e["round"] for e in evals] == [1] and evals[0]["weight_version"] >= 1  # a version was published and served
    replay = _records(run_dir, "replay")[-1]
    assert replay["experience_success/sampled_items"] + replay["experience_failure/sampled_items"] > 0
    runner_of = {}
    for path in (run_dir / "replay").rglob("experience_*/*.hdf5"):
        with h5py.File(path, "r") as f:
            runner_of[path.stem] = json.loads(f.attrs["metadata"])["runner"]
    assert len(set(runner_of.values())) == 2  # both EnvRunners' episodes reached the Reverb service
    books = [json.loads(p.read_text()) for p in (run_dir / "replay").rglob("reverb-service.json")]
    sampled = {e["episode_id"] for book in books for name, table in book["tables"].items() if name.startswith("experience")
               for e in table["episodes"] if e["keys"]}
    assert {runner_of[eid] for eid in sampled} == set(runner_of.values()), (sampled, runner_of)
