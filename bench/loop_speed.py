"""The online loop's speed, asynchronous against synchronous, on the same config and budget of work.

The same job (``launch/online.py``, the quickstart's model and task) runs its online rounds twice from the
same offline checkpoints (made once, by a first job with ``online.rounds=0``): once with
``online.loop=synchronous`` (each round collects, then refines, then evaluates) and once with
``online.loop=asynchronous`` (the EnvRunners collect while the learner refines). Both play the same
episodes and train the same learner steps; the figure is the wall time of the rounds (from the end of
the round-0 evaluation to the last round's end, evaluations between included) and the env steps and
learner samples per second over it. Target: asynchronous <= 0.7 x synchronous.

The machine's busy CPU time over the rounds (from /proc/stat) says how far a loop is from its floor on
these cores: the synchronous loop's CPU work spread over every core is the least wall time any
overlap of the same work can take (``cpu_floor_s``), where both halves are bound by the same cores.

    python bench/loop_speed.py [--out bench/results/loop_speed.json] [override ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "launch" / "online.py"

# The quickstart's model and task; offline training cut short (its quality is not what is measured).
OFFLINE = ["offline.policy_steps=100", "offline.validate_every=100", "offline.planning_steps=20", "demos.episodes=12"]
LOOP = ["online.rounds=3", "online.episodes_per_round=8", "online.refine_steps=40", "online.publish_every=20", "eval.trials=4",
        "eval.also_without_planning=false", "logging.wandb=disabled"]


class BusyCpu:
    """The machine's busy CPU seconds (all cores, /proc/stat) sampled every half second while a job runs."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (time, busy seconds since boot)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def busy_s() -> float:
        fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def _run(self) -> None:
        while not self._done.wait(0.5):
            self.samples.append((time.time(), self.busy_s()))

    def __enter__(self) -> "BusyCpu":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def between(self, start: float, end: float) -> float:
        """Busy CPU seconds between two wall-clock times (the nearest samples)."""
        def at(t: float) -> float:
            return min(self.samples, key=lambda s: abs(s[0] - t))[1]
        return at(end) - at(start)


def job(run_dir: Path, overrides: list[str], cpu: BusyCpu | None = None) -> list[dict]:
    """Run the job to its end; its metrics (``cpu`` samples the machine's busy CPU meanwhile)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "WANDB_MODE": "disabled",
           "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    with cpu or contextlib.nullcontext():
        done = subprocess.run([sys.executable, str(JOB), *overrides, f"run_dir={run_dir}"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the job failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def figures(records: list[dict], batch: int, cpu: BusyCpu) -> dict[str, float]:
    """The rounds' wall time, rates and busy CPU, from a run's metrics."""
    first = next(r for r in records if r["kind"] == "eval" and r["round"] == 0)
    last = max((r for r in records if r["kind"] == "round"), key=lambda r: r["wall_s"])
    begin, end = first["wall_s"], last["wall_s"]
    seconds = end - begin
    busy = cpu.between(first["time"], last["time"])
    env_steps = sum(r["env_steps"] for r in records if r["kind"] == "collect")
    steps = max(r["learner/step"] for r in records if r["kind"] == "learner" and r.get("phase") == "planning_online")
    rates = [r for r in records if r["kind"] == "rates"]
    both = sum(1 for r in rates if r["env_steps"] > 0 and r["learner_samples"] > 0)
    return {"rounds_s": round(seconds, 1), "env_steps": env_steps, "learner_steps": steps,
            "env_steps_per_s": round(env_steps / seconds, 1), "learner_samples_per_s": round(steps * batch / seconds, 1),
            "rates_intervals": len(rates), "intervals_with_both": both, "cpu_busy_s": round(busy, 1),
            "cpu_utilization": round(busy / (seconds * (os.cpu_count() or 1)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "loop_speed.json"))
    parser.add_argument("--keep", help="keep the runs in this folder (their offline checkpoints are reused when there)")
    parser.add_argument("--loops", default="synchronous,asynchronous", help="the loops to run, comma-separated")
    parser.add_argument("overrides", nargs="*", help="experiment overrides for every job (e.g. online.runners=4)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loop_speed_") as tmp:
        base = Path(args.keep or tmp)
        start = time.time()
        if not (base / "offline" / "checkpoints" / "planning").is_dir():
            job(base / "offline", [*OFFLINE, "online.rounds=0", "logging.wandb=disabled", *args.overrides])
        ckpts = [f"model.checkpoint={base / 'offline' / 'checkpoints' / 'policy'}",
                 f"model.planning_checkpoint={base / 'offline' / 'checkpoints' / 'planning'}"]
        from launch.config import load_experiment

        batch = load_experiment("quickstart", [*LOOP, *args.overrides]).online.batch
        result: dict = {}
        for loop in args.loops.split(","):
            shutil.rmtree(base / loop, ignore_errors=True)
            cpu = BusyCpu()
            records = job(base / loop, [*OFFLINE, *ckpts, *LOOP, f"online.loop={loop}", *args.overrides], cpu)
            result[loop] = figures(records, batch, cpu)
            print(json.dumps({loop: result[loop]}), flush=True)
    if set(result) != {"synchronous", "asynchronous"}:
        return
    ratio = result["asynchronous"]["rounds_s"] / result["synchronous"]["rounds_s"]
    floor = result["synchronous"]["cpu_busy_s"] / (os.cpu_count() or 1)  # the synchronous loop's CPU work on every core at once
    # The figure compares the same work: a loop that ended before collecting or training all of it did not finish it.
    same_work = all(result["asynchronous"][k] == result["synchronous"][k] for k in ("env_steps", "learner_steps"))
    figures_ = {
        "command": " ".join(["python bench/loop_speed.py", *args.overrides]),
        "config": ["quickstart", *LOOP, *args.overrides],
        "machine": f"{os.cpu_count()} CPU cores, no GPU ({platform.machine()})",
        "date": time.strftime("%Y-%m-%d"),
        "bench_s": round(time.time() - start, 1),
        **result,
        "async_over_sync_wall": round(ratio, 3),
        "cpu_floor_s": round(floor, 1),
        "cpu_floor_over_sync_wall": round(floor / result["synchronous"]["rounds_s"], 3),
        "same_work": same_work,
        "target": "<= 0.7, the same env steps and learner steps",
        "met": ratio <= 0.7 and same_work,
    }
    path = Path(args.out)  # merged: one entry per config (the overrides), so another config's figures stay
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged["what"] = "the online rounds' wall time, asynchronous against synchronous loop, same episodes and learner steps"
    merged[" ".join(args.overrides) or "quickstart"] = figures_
    path.write_text(json.dumps(merged, indent=1) + "\n")
    print(json.dumps({"async_over_sync_wall": figures_["async_over_sync_wall"], "met": figures_["met"]}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
