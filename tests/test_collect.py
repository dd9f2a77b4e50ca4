"""launch/collect.py: episodes from a policy and planner written as files by worker processes, without Ray.

Real built-in task (robosuite Lift), the tiny model with random weights (the mechanics, not the
skill, are under test): branching at the first query, the files and their log, a rerun that
skips what was done, a SIGTERM that stops the workers too, bad inputs, and the Ray-free entry points importing where Ray is missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("robosuite")
os.environ.setdefault("MUJOCO_GL", "egl")

from actors.envs.lift import INSTRUCTION  # noqa: E402
from actors.envs.lift_expert import make_demonstrations  # noqa: E402
from cosmos_policy.checkpoint import save_checkpoint  # noqa: E402
from cosmos_policy.config import load_model_config  # noqa: E402
from cosmos_policy.data.episode_file import read_episode  # noqa: E402
from cosmos_policy.data.statistics import compute_statistics  # noqa: E402
from cosmos_policy.errors import ConfigError  # noqa: E402
from cosmos_policy.layout import load_layout  # noqa: E402
from cosmos_policy.model import CosmosPolicyModel  # noqa: E402
from cosmos_policy.text import RandomTextEncoder, TextEmbeddingCache  # noqa: E402
from actors.branching import lead_candidates  # noqa: E402
from launch.collect import collect, parse_trials  # noqa: E402
from launch.config import load_experiment  # noqa: E402
from actors.branching import branch_step  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = ["env.max_steps=12", "env.execute=4", "planner.num_candidates=2", "planner.candidate_noise=0.1", "online.plan=false",
             "logging.wandb=disabled"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (random weights) with real statistics and the task's instruction embedded."""
    out = tmp_path_factory.mktemp("ckpt") / "policy"
    cfg = load_model_config("tiny")
    stats = compute_statistics(make_demonstrations(2, 1.0, seed=1, image_size=cfg.image_size, max_steps=60))
    text = TextEmbeddingCache()
    text.add(INSTRUCTION, RandomTextEncoder(cfg.text.embed_dim, cfg.text.max_length).encode([INSTRUCTION])[0])
    save_checkpoint(out, CosmosPolicyModel.build(cfg, load_layout("libero"), seed=0), stats=stats, text=text)
    return out


@pytest.mark.slow
def test_branches_are_written_as_files_and_a_rerun_skips_them(checkpoint: Path, tmp_path: Path) -> None:
    cfg = load_experiment("quickstart", OVERRIDES)
    out = tmp_path / "col"
    rows = collect(cfg, str(checkpoint), str(checkpoint), [3], out, seed=5, branch=True, workers=1)
    assert sorted(r["branch"] for r in rows) == [0, 1] and all(r["trial"] == 3 and not r["interrupted"] for r in rows)
    logged = [json.loads(line) for line in (out / "collect.jsonl").read_text().splitlines()]
    assert sorted(r["branch"] for r in logged) == [0, 1]
    episodes = {r["branch"]: read_episode(out / r["file"]) for r in rows}
    assert all(out.joinpath(r["file"]).parent.name == ("experience_success" if r["success"] else "experience_failure") for r in rows)
    first = {b: ep.planner[0] for b, ep in episodes.items()}
    # One state, one seed, the same candidates; branch c executed candidate c at the first query.
    assert np.array_equal(episodes[0].initial_state, episodes[1].initial_state)
    assert np.allclose(first[0].candidate_actions, first[1].candidate_actions)
    for b, ep in episodes.items():
        assert ep.metadata["branch_of"] == 3 and ep.metadata["candidate"] == b and first[b].chosen == b
        assert np.allclose(ep.actions[:4], first[b].candidate_actions[b][:4], atol=1e-5)
    assert not np.allclose(episodes[0].actions[:4], episodes[1].actions[:4])
    # A rerun plays nothing that was logged.
    assert collect(cfg, str(checkpoint), str(checkpoint), [3], out, seed=5, branch=True, workers=1) == []
    assert len((out / "collect.jsonl").read_text().splitlines()) == 2
    # --branch-point-only: the same episodes, with camera frames at the branch point only (smaller files).
    focused_rows = collect(cfg, str(checkpoint), str(checkpoint), [3], tmp_path / "fq", seed=5, branch=True, workers=1, branch_point=True)
    chunk = load_layout(cfg.model.layout).action_chunk
    for r in focused_rows:
        focused, full = read_episode(tmp_path / "fq" / r["file"]), episodes[r["branch"]]
        assert np.allclose(focused.actions, full.actions, atol=1e-5) and focused.success == full.success
        kept = {t for seq in focused.images.values() for t, jpeg in enumerate(seq.jpegs) if jpeg}
        assert 0 in kept and kept <= {0, min(chunk, focused.num_steps - 1)}
        assert len({t for seq in full.images.values() for t, jpeg in enumerate(seq.jpegs) if jpeg}) > len(kept)
    # --branch-query 1: both branches execute the trial's drawn lead candidate at the first query, then
    # candidate b at the second, the branch point, whose step the files record and keep frames at.
    lead = lead_candidates(3, 5, 1, 2)
    later = collect(cfg, str(checkpoint), str(checkpoint), [3], tmp_path / "q1", seed=5, branch=True, workers=1, branch_point=True,
                    branch_query=1)
    late = {r["branch"]: read_episode(tmp_path / "q1" / r["file"]) for r in later}
    assert sorted(late) == [0, 1] and lead == lead_candidates(3, 5, 1, 2)
    execute = cfg.env.execute
    for b, ep in late.items():
        assert ep.metadata["branch_candidates"] == [*lead, b] and branch_step(ep) == execute
        assert [q.chosen for q in ep.planner[:2]] == [*lead, b] and ep.planner[1].step == execute
        assert np.allclose(ep.actions[:execute], late[0].actions[:execute], atol=1e-6)  # the same lead, the same state
        assert np.allclose(ep.actions[execute:execute + 4], ep.planner[1].candidate_actions[b][:4], atol=1e-5)
        kept = {t for seq in ep.images.values() for t, jpeg in enumerate(seq.jpegs) if jpeg}
        assert execute in kept and kept <= {execute, min(execute + chunk, ep.num_steps - 1)}
    assert not np.allclose(late[0].actions[execute:execute + 4], late[1].actions[execute:execute + 4])


def test_bad_inputs_name_the_argument(checkpoint: Path, tmp_path: Path) -> None:
    cfg = load_experiment("quickstart", OVERRIDES)
    with pytest.raises(ConfigError, match="--trials: expected a range"):
        parse_trials("a-b")
    with pytest.raises(ConfigError, match="--trials: expected non-negative"):
        parse_trials("3,-1")
    assert parse_trials("2-4") == [2, 3, 4] and parse_trials("7,1") == [7, 1]
    with pytest.raises(ConfigError, match="--branch-query: needs --planning"):
        collect(cfg, str(checkpoint), None, [0], tmp_path / "o", branch=True)
    with pytest.raises(ConfigError, match="online.plan: collecting with planning needs --planning"):
        collect(load_experiment("quickstart", [*OVERRIDES, "online.plan=true"]), str(checkpoint), None, [0], tmp_path / "o")
    with pytest.raises(ConfigError, match="--workers: expected a positive"):
        collect(cfg, str(checkpoint), str(checkpoint), [0], tmp_path / "o", workers=0)
    with pytest.raises(ConfigError, match="--branch-query: expected a query index >= 0"):
        collect(cfg, str(checkpoint), str(checkpoint), [0], tmp_path / "o", branch=True, branch_query=-1)
    with pytest.raises(ConfigError, match="--threads: expected a positive"):
        collect(cfg, str(checkpoint), str(checkpoint), [0], tmp_path / "o", threads=0)


def test_ray_free_entry_points_import_without_ray() -> None:
    """The GPU machine has no Ray wheel: training, collection and the policy server's in-process parts must import there."""
    code = ("import sys; sys.modules['ray'] = None; "
            "import launch.train, launch.collect, actors.env_runner, actors.policy_server, actors.branching; "
            "from actors.env_runner import EpisodeRunner; from actors.policy_server import BatchingServer; "
            "from actors.policies import LocalPolicy, PolicySpec; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.slow
def test_sigterm_stops_the_workers_and_keeps_what_was_logged(checkpoint: Path, tmp_path: Path) -> None:
    """A collector killed with SIGTERM (``kill``, a job stop) takes its spawned workers with it; every logged row has its file."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "col"
    cmd = [sys.executable, str(ROOT / "launch" / "collect.py"), "--config", "quickstart", "--policy", str(checkpoint), "--trials", "0-199",
           "--workers", "2", "--threads", "1", "--out", str(out), *OVERRIDES]
    log = out / "collect.jsonl"

    def start_and_wait_for_rows(n: int):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (log.is_file() and len(log.read_text().splitlines()) >= n):
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert workers, "the collector runs its episodes in worker processes"
        return proc, workers

    proc, workers = start_and_wait_for_rows(1)
    proc.send_signal(signal.SIGTERM)  # the collector alone, not its process group
    said, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, said
    assert "run again with --out" in said
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"workers left running after the collector stopped: {[p.pid for p in alive]}"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert 1 <= len(rows) < 200  # stopped early, and what was logged stays
    assert all((out / r["file"]).is_file() for r in rows)
    # SIGKILL gives the collector no chance to stop anything: its workers notice it is gone and exit.
    proc, workers = start_and_wait_for_rows(len(rows) + 1)
    proc.kill()
    proc.communicate(timeout=60)
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"workers outlived a killed collector: {[p.pid for p in alive]}"
    rerun = [json.loads(line) for line in log.read_text().splitlines()]
    assert len({(r["trial"], r["branch"]) for r in rerun}) == len(rerun) > len(rows)  # the rerun skipped what was logged
