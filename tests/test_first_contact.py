"""What a new user meets first: every mistake caught before anything starts, one clear line, keys in --help.

Each mistake runs its entry point for real, in a subprocess: it must end quickly, with a non-zero
exit code and a single line on stderr that names the key or file, no traceback, and no Ray
started (a Ray session directory would appear in the child's RAY_TMPDIR).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float, Path]:
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir(exist_ok=True)
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("COSMOS_DEBUG", None)
    start = time.time()
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return proc, time.time() - start, ray_tmp


MISTAKES = [
    (["launch/online.py", "model.size=7b"], r"model\.size: expected one of \['2b', 'medium', 'small', 'tiny'\].*got '7b'"),
    (["launch/online.py", "demos.dataset=/nope"], r"demos\.dataset: given \(/nope\) but demos\.source is 'expert'"),
    (["launch/online.py", "demos.source=dataset", "demos.dataset=/nope"], r"demos\.dataset: /nope does not exist"),
    (["launch/online.py", "online.roundz=2"], r"the command line: online\.roundz: unknown key \(did you mean 'rounds'\?\)"),
    (["launch/online.py", "online.rounds=-1"], r"online\.rounds: expected >= 0, got -1"),
    (["launch/online.py", "planner.num_candidates=0"], r"planner\.num_candidates: expected >= 1, got 0"),
    (["launch/online.py", "online.rounds=three"], r"the command line: online\.rounds: expected an integer, got 'three'"),
    (["launch/online.py", "model.checkpoint=/nope/ckpt", "model.text_encoder=/nope/t5"],
     r"model\.checkpoint: /nope/ckpt: checkpoint directory not found; model\.text_encoder: /nope/t5 is not a T5 encoder directory"),
    (["launch/online.py", "--config", "quickstrat"], r"experiment config 'quickstrat': no file .*known: \[.*'quickstart'"),
    (["launch/online.py", "rounds"], r"the command line: 'rounds': expected key=value"),
    (["launch/evaluate.py", "--checkpoint", "/nope/ckpt"], r"--checkpoint: /nope/ckpt: checkpoint directory not found"),
    (["launch/evaluate.py", "--checkpoint", "/nope/ckpt", "--plan", "--suites", "libero_spatal"],
     r"--checkpoint: .*; --plan: needs --planning-checkpoint.*; --suites: unknown \['libero_spatal'\]"),
    (["launch/train.py", "--target", "policy", "--episodes", "/nope", "--out", "o"], r"--episodes: '/nope' matches no file"),
    (["launch/train.py", "--target", "policy", "--episodes", ".", "--out", "o", "--init", "/nope"], r"--init: /nope: checkpoint directory not found"),
    (["launch/train.py", "--target", "policy", "--episodes", ".", "--out", "o", "model.size=7b"], r"model\.size: expected one of"),
    (["launch/collect.py", "--policy", "/nope", "--trials", "0-3", "--out", "o"], r"--policy: /nope: checkpoint directory not found"),
    (["launch/collect.py", "--policy", "/nope", "--trials", "a-b", "--out", "o"], r"--trials: expected a range a-b or a comma list"),
    (["launch/collect.py", "--policy", "/nope", "--trials", "0-3", "--out", "o", "online.roundz=1"], r"online\.roundz: unknown key"),
]


@pytest.mark.parametrize("args, message", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_a_mistake_is_one_line_before_anything_starts(tmp_path: Path, args: list[str], message: str) -> None:
    proc, seconds, ray_tmp = _run(tmp_path, str(ROOT / args[0]), *args[1:])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert re.search(message, lines[0]) and lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert seconds < 15, f"{seconds:.1f} s"
    assert not any(ray_tmp.iterdir()), "Ray was started"


def test_a_full_disk_is_one_line_naming_what_was_kept(tmp_path: Path) -> None:
    """The disk filling up is one line and exit code 2, naming the run directory, what it keeps and how to go on
    (no traceback): here the job's first write goes to /dev/full, which fails every write with ENOSPC as a full
    disk does; a full disk under a Ray call is found the same way (tests/test_dispatch.py)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").symlink_to("/dev/full")
    proc, seconds, _ = _run(tmp_path, str(ROOT / "launch" / "online.py"), f"run_dir={run_dir}", "logging.wandb=disabled")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: {run_dir} keeps what was saved before (nothing finished yet") and "run the same command" in lines[0]
    assert "No space left on device" in lines[0] and "Traceback" not in proc.stderr + proc.stdout, lines[0]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc, _, _ = _run(tmp_path, str(ROOT / "launch" / "online.py"), "online.roundz=2", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "online.roundz: unknown key" in proc.stderr


def test_help_lists_every_key_with_its_default_and_every_flag_has_help(tmp_path: Path) -> None:
    from launch import collect, evaluate, online, train
    from launch.config import config_keys

    proc, seconds, ray_tmp = _run(tmp_path, str(ROOT / "launch" / "online.py"), "--help")
    assert proc.returncode == 0 and seconds < 15 and not any(ray_tmp.iterdir())
    for key, default, doc in config_keys():
        assert f"  {key} = {default!r}\n      {doc}" in proc.stdout, key
    for module in (online, train, collect, evaluate):
        parser = module.build_parser()
        undocumented = [a.dest for a in parser._actions if not a.help]
        assert not undocumented, (module.__name__, undocumented)
    assert "  online.rounds = 3" in train.build_parser().format_help() and "  planner.num_candidates = 8" in collect.build_parser().format_help()


def test_the_importer_names_every_missing_file(tmp_path: Path) -> None:
    """The README's import snippet with files missing: each is named at once, in one line."""
    code = ("from cosmos_policy.checkpoint import import_nvidia_checkpoint\n"
            "from launch.cli import guard\n"
            "guard(lambda: import_nvidia_checkpoint('Cosmos-Policy-LIBERO-Predict2-2B.pt', vae='Wan2.1-T2V-1.3B-Diffusers/vae', "
            "config='2b', layout='libero', statistics='libero_dataset_statistics.json', text_embeddings='libero_t5_embeddings.pkl'))\n")
    (tmp_path / "Cosmos-Policy-LIBERO-Predict2-2B.pt").write_bytes(b"")
    proc, _, _ = _run(tmp_path, "-c", code)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for part in ("weights: Cosmos-Policy-LIBERO-Predict2-2B.pt is empty (0 bytes)", "statistics: libero_dataset_statistics.json not found",
                 "text_embeddings: libero_t5_embeddings.pkl not found", "vae: Wan2.1-T2V-1.3B-Diffusers/vae is not a directory"):
        assert part in lines[0], lines[0]


def test_metrics_are_documented_and_versions_are_integers(tmp_path: Path) -> None:
    """Every name a run's metrics.jsonl holds is in launch/metrics.py; weight versions are integers (not chunk means)."""
    from launch.metrics import documented
    from launch.monitor import Monitor

    m = Monitor(tmp_path, {}, "disabled")
    m.learner("planning_online", [{"step": 1, "loss": 1.0, "lr": 1e-3}, {"step": 2, "loss": 0.5, "lr": 9e-4, "published_version": 1,
                                                                        "publish_s": 0.1, "world_model/future_image_l1": 0.3}])
    m.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["published_version"] == 1 and isinstance(record["published_version"], int) and record["learner/step"] == 2
    assert record["loss"] == 0.75 and record["lr"] == 9e-4
    assert all(documented("learner", k) for k in record)
    assert not documented("learner", "loss_typo") and not documented("eval", "task") and documented("eval", "task/lift")
