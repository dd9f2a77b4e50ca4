"""The demo entry point runs end to end in a subprocess, as `make demo` runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_model_demo_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "model_demo.py"), "--steps", "30", "--out", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "after 30 steps: sampled-chunk L1 error" in result.stdout
    assert "same sample after reload: True" in result.stdout
    assert (tmp_path / "demo" / "checkpoint" / "manifest.json").is_file()
