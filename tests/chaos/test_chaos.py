"""Fault drills in CI: ``bench/chaos.py`` against a running scaled-down main job, every drill in turn on one job: kill -9
of a simulator, an EnvRunner, the PolicyServer, the replay shard and the learner's rank while it collects; SIGTERM; kill
-9 of the driver; SIGINT; its run directory's disk filled up mid-round (a stop, a killed driver or a full disk answered
with the same command again, as a user would). What ``python bench/chaos.py`` writes to bench/results/chaos.json.

The full disk needs a tmpfs the test can mount (root); where it cannot, the bench reports the drill as not run, with the
reason, and this test checks that it says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_job_keeps_every_acknowledged_episode_through_every_drill(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "chaos.py"), "--out", str(out), "--keep", str(tmp_path / "work"),
                           "--timeout-s", "600"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    log = (tmp_path / "work" / "job.log").read_text() if (tmp_path / "work" / "job.log").exists() else ""
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    drills = {d["drill"]: d for d in report["drills"]}
    assert list(drills) == ["simulator", "env_runner", "policy_server", "replay_shard", "learner_rank", "sigterm", "driver", "sigint",
                            "full_disk"]
    mounted = not drills["full_disk"]["hit"].startswith("(not run")
    for name, d in drills.items():
        if name == "full_disk" and not mounted:  # no tmpfs here: said so, not pretended
            assert "cannot mount a tmpfs" in d["hit"] and not d["recovered"], d
            continue
        assert d["hit"] != "(never struck)" and d["recovered"], (name, d, log[-4000:])
        assert d["acknowledged"] >= 2 and d["present_after"] == d["acknowledged"] and d["lost"] == 0, (name, d)  # the demos at least
        assert d["recovery_s"] is not None and d["message"], (name, d)
    for name, says in [("simulator", "simulator died"), ("env_runner", "an actor died during an episode"),
                       ("policy_server", "a PolicyServer was restarted"), ("replay_shard", "restored its acknowledged episodes"),
                       ("learner_rank", "restarting it from its last checkpoint"), ("sigterm", "signal 15: stopping"),
                       ("driver", "(resuming)"), ("sigint", "signal 2: stopping")]:
        assert says in drills[name]["message"], drills[name]
    assert report["exit_codes"] == ([0, -9, 0, 2, 0] if mounted else [0, -9, 0, 0]) and report["finished"], report
    if mounted:  # one line: the disk, the run directory, what it keeps, what to do
        message = drills["full_disk"]["message"]
        assert "The disk filled up" in message and "keeps what was saved before" in message and "run the same command again" in message
    assert report["rounds_evaluated"] == list(range(report["rounds"] + 1)), report
    assert report["listening_beyond_loopback"] == [] and report["left_behind"] == [], report
    assert proc.returncode == (0 if mounted else 1), proc.stdout[-3000:] + proc.stderr[-3000:]
