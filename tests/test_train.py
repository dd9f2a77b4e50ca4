"""launch/train.py: the policy and the planning model trained from episode files without Ray.

Real DeepSpeed (gloo on the CPU), real expert demonstrations from the built-in task written to
files, the tiny model: the policy from scratch with held-out validation, the planning model from
the policy's checkpoint, a resume that continues the step count, a SIGTERM that saves the learner
and a rerun that resumes, and the bad inputs a user can give.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("robosuite")
os.environ.setdefault("MUJOCO_GL", "egl")

from actors.envs.lift_expert import make_demonstrations  # noqa: E402
from cosmos_policy.checkpoint import load_checkpoint  # noqa: E402
from cosmos_policy.data.episode_file import write_episode  # noqa: E402
from cosmos_policy.errors import ConfigError  # noqa: E402
from launch.train import main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["offline.batch=4", "demos.validation_fraction=0.4", "offline.validate_every=2", "offline.warmup_steps=1", "logging.wandb=disabled",
         "env.kwargs.image_size=32", "model.size=tiny", "learner.cpus_per_worker=1"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six expert demonstrations (five successes, one failure) as episode files."""
    out = tmp_path_factory.mktemp("demos")
    for i, ep in enumerate(make_demonstrations(6, 5 / 6, seed=3, image_size=32, max_steps=60)):
        write_episode(out / f"demo_{i:02d}.hdf5", ep)
    return out


@pytest.fixture(autouse=True)
def _restore_environment():
    """In-process runs set the distributed variables (rank 0 of 1); later tests' child processes must not inherit them."""
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _records(path: Path, kind: str) -> list[dict]:
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip()) if r["kind"] == kind]


@pytest.mark.slow
def test_policy_then_planning_model_from_files(demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    main(["--target", "policy", "--episodes", str(demo_dir), "--out", str(out), "--steps", "4", *SMALL])
    policy = load_checkpoint(out / "checkpoints" / "policy")
    assert policy.stats is not None and "lift the red cube" in policy.text  # a fresh model exports statistics and text too
    val = _records(out / "metrics.jsonl", "validation")
    assert [r["learner/step"] for r in val] == [2, 4] and all(r["val_loss"] > 0 for r in val)
    assert _records(out / "metrics.jsonl", "learner")[-1]["learner/step"] == 4

    main(["--target", "planning", "--episodes", str(demo_dir / "*.hdf5"), "--out", str(out), "--init", str(out / "checkpoints" / "policy"),
          "--steps", "2", *SMALL])
    first = load_checkpoint(out / "checkpoints" / "planning")
    assert json.loads((out / "checkpoints" / "planning" / "manifest.json").read_text())["metadata"]["step"] == 2
    # A second run with a larger budget resumes the learner where the first stopped.
    main(["--target", "planning", "--episodes", str(demo_dir / "*.hdf5"), "--out", str(out), "--init", str(out / "checkpoints" / "policy"),
          "--steps", "3", *SMALL])
    assert json.loads((out / "checkpoints" / "planning" / "manifest.json").read_text())["metadata"]["step"] == 3
    second = load_checkpoint(out / "checkpoints" / "planning")
    moved = [not (a == b).all() for a, b in zip(first.model.denoiser.parameters(), second.model.denoiser.parameters())]
    assert any(moved)
    # --time-limit: the run ends at the limit as if its steps were done, its weights exported and saved.
    limited = tmp_path / "limited"
    main(["--target", "planning", "--episodes", str(demo_dir), "--out", str(limited), "--init", str(out / "checkpoints" / "policy"),
          "--steps", "500", "--time-limit", "0.001", *SMALL])
    assert json.loads((limited / "checkpoints" / "planning" / "manifest.json").read_text())["metadata"]["step"] == 1
    assert int((limited / "learner" / "planning" / "latest").read_text().strip().removeprefix("step")) == 1
    # --export-every: snapshots to choose from afterwards, besides the final export.
    snap = tmp_path / "snapshots"
    main(["--target", "planning", "--episodes", str(demo_dir), "--out", str(snap), "--init", str(out / "checkpoints" / "policy"),
          "--steps", "5", "--export-every", "2", *SMALL])
    assert sorted(p.name for p in (snap / "checkpoints").iterdir()) == ["planning", "planning_step2", "planning_step4"]
    assert json.loads((snap / "checkpoints" / "planning_step4" / "manifest.json").read_text())["metadata"]["step"] == 4
    assert load_checkpoint(snap / "checkpoints" / "planning_step2").stats is not None


@pytest.mark.slow
def test_sigterm_saves_the_learner_and_a_rerun_resumes(demo_dir: Path, tmp_path: Path) -> None:
    """SIGTERM to the trainer's whole process group, as ``timeout``, Ctrl-C and job stops send it, with
    batches built in a worker process: the worker must not die of it before the learner has saved."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--target", "policy", "--episodes", str(demo_dir), "--out", str(out),
           "--steps", "500", *SMALL, "learner.data_workers=1"]
    env = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, start_new_session=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:  # the trainer says what it trains just before its first step
        lines.append(line)
        if line.startswith("policy: "):
            break
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "run again with --out" in rest
    saved = int((out / "learner" / "policy" / "latest").read_text().strip().removeprefix("step"))
    assert saved >= 1
    rerun = subprocess.run([*cmd[:-len(SMALL) - 3], "--steps", "2", *SMALL], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming at step {saved}" in rerun.stdout, rerun.stdout


def test_bad_inputs_name_the_argument(demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def fails(args: list[str], message: str) -> None:  # one line naming the flag, exit code 2, no traceback
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1, err

    fails(["--target", "policy", "--episodes", str(tmp_path / "nothing" / "*.hdf5"), "--out", str(tmp_path / "o"), *SMALL], "--episodes: .*matches no file")
    fails(["--target", "policy", "--episodes", str(demo_dir), "--out", str(tmp_path / "o"), "--steps", "0", *SMALL], "--steps: expected a positive")
    fails(["--target", "policy", "--episodes", str(demo_dir), "--out", str(tmp_path / "o"), "--time-limit", "0", *SMALL], "--time-limit: expected a positive number of seconds")
    fails(["--target", "policy", "--episodes", str(demo_dir), "--out", str(tmp_path / "o"), "--export-every", "0", *SMALL], "--export-every: expected a positive number of steps")
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["--target", "judge", "--episodes", str(demo_dir), "--out", str(tmp_path / "o")])
    assert "invalid choice: 'judge'" in capsys.readouterr().err
    experience = tmp_path / "exp"
    experience.mkdir()
    from cosmos_policy.data.episode_file import read_episode
    from cosmos_policy.episode import Source

    ep = read_episode(sorted(demo_dir.glob("*.hdf5"))[0])
    ep.source = Source.SIM
    write_episode(experience / "rollout.hdf5", ep)
    fails(["--target", "planning", "--episodes", str(experience), "--out", str(tmp_path / "o"), *SMALL], "--episodes: no demonstrations")


def test_branch_point_only_leaves_samples_at_the_branch_point(demo_dir: Path) -> None:
    from cosmos_policy.data.episode_file import read_episode
    from actors.branching import branch_point_only

    ep = read_episode(sorted(demo_dir.glob("*.hdf5"))[0])
    assert len(ep.sample_steps(16)) > 1
    focused = branch_point_only(ep, 16)
    assert focused.sample_steps(16).tolist() == [0]
    assert focused.num_steps == ep.num_steps and (focused.actions == ep.actions).all()
    assert ep.sample_steps(16).tolist()[0] == 0 and len(ep.sample_steps(16)) > 1  # the original is untouched
    # A later branch point (launch/collect.py --branch-query) is read from the episode's metadata.
    ep.metadata["branch_step"] = 8
    assert branch_point_only(ep, 16).sample_steps(16).tolist() == [8]
    ep.metadata["branch_step"] = ep.num_steps + 3
    with pytest.raises(ConfigError, match="branch_step: expected a step of episode"):
        branch_point_only(ep, 16)
