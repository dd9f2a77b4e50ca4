"""Fault drills against a running main job: kill -9 its processes one by one, stop it, kill its driver, and count.

One scaled-down job (``launch/online.py``, the quickstart's task, the tiny model from untrained checkpoints:
no offline phases) plays its rounds while the drills strike in turn (``--drills``, in order; by default all):

====================  ==============================  =============================================
drill                 when (all drills, in order)     what
====================  ==============================  =============================================
simulator             round 1: collecting             kill -9 an EnvRunner's simulator process
env_runner            round 2: collecting             kill -9 an EnvRunner playing an episode
policy_server         round 3: collecting             kill -9 a PolicyServer
replay_shard          round 4: collecting             kill -9 the replay shard
learner_rank          round 5: collecting             kill -9 the planning learner's rank at work
sigterm               round 5 or later: success       SIGTERM to the job (``ray job stop``): exit 0
driver                the next run's first progress   kill -9 of the job's driver
sigint                the next run's first success    SIGINT (Ctrl-C): exit 0
full_disk             the next run's first progress   the run directory's filesystem filled up: the job
                                                      stops with one line naming the path and what was
                                                      kept; the space is freed and the command run again
====================  ==============================  =============================================

A blow that ends the job is answered as a user would: the same command again, which resumes. With
``full_disk`` the run directory lies on a small tmpfs the bench mounts (root may; elsewhere the drill
is reported as not run, with the reason).

Per drill: ``acknowledged`` (the episode files in replay when it struck: an insert is acknowledged
once its file is renamed into place), ``present_after`` (those of them readable at the very end,
after every restart), ``lost`` (the difference: must be 0), ``recovered`` (the job went on, or the
command run again resumed, and the last run finished every round), ``recovery_s`` (from the blow to
the job's next progress line, the command's start included after a stop) and ``message`` (the first
line the job said of it: a warning, its stop, its resume). Also
``listening_beyond_loopback`` (sockets of the job's process tree bound beyond loopback, taken while
it runs) and ``left_behind`` (processes of the job's tree, seen while it ran, still alive a minute after
its last run ended).

    python bench/chaos.py [--drills a,b,...] [--out bench/results/chaos.json] [--keep DIR] [override ...]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

JOB = [
    "demos.episodes=2", "online.episodes_per_round=4", "online.runners=2", "online.refine_steps=4",
    "online.publish_every=2", "online.batch=4", "eval.trials=2", "eval.also_without_planning=false", "env.kwargs.max_steps=34",
    "env.kwargs.num_initial_states=4", "planner.num_candidates=2", "planner.value_steps=[1]", "policy.action_steps=2",
    "logging.wandb=disabled", "model.size=tiny", "learner.cpus_per_worker=1", "learner.checkpoint_every=2",
]
PROGRESS = re.compile(r"\b\d+/\d+\b")  # a progress count ("collecting 3/8"): the job is working again
ANSI = re.compile(r"\x1b\[[0-9;]*m")
SAYS = re.compile(r"warning|stopping|resum|restart", re.IGNORECASE)  # what the job says of a blow


@dataclass
class Drill:
    name: str
    trigger: str  # the job's line that sets it off (a regular expression)
    run: int  # which run of the command it strikes in (a stop or a killed driver ends a run)
    strike: Callable[[subprocess.Popen], str]  # does it; returns what it hit
    ends_run: bool = False
    heal: Callable[[], None] | None = None  # what a user does before running the command again (free the disk)
    says: re.Pattern = SAYS  # the line the job says of it
    acknowledged: list[str] = field(default_factory=list)
    struck_at: float | None = None
    hit: str = ""
    recovery_s: float | None = None
    message: str = ""
    from_round: int = 0  # and its round (the trigger's first group) is this one or later

    def sets_off(self, line: str) -> bool:
        found = re.search(self.trigger, line)
        return bool(found) and (not self.from_round or int(found.group(1)) >= self.from_round)


# ---- the blows ---------------------------------------------------------------------------------------------------
def _processes() -> list[tuple[int, int, str, str]]:
    """(pid, parent pid, title: the first word of the command line, the whole command line) of every process."""
    out = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        words = [c.decode(errors="replace") for c in cmd if c]
        if words:
            out.append((int(entry.name), ppid, words[0].strip(), " ".join(words)))
    return out


def _kill_first(match: Callable[[tuple[int, int, str, str], list], bool], what: str, timeout_s: float = 90.0) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        procs = _processes()
        for proc in procs:
            if match(proc, procs):
                os.kill(proc[0], signal.SIGKILL)
                return f"{what} (pid {proc[0]}: {proc[2][:60]})"
        time.sleep(0.05)
    raise RuntimeError(f"no {what} within {timeout_s} s")


def titled(prefix: str, what: str) -> Callable[[subprocess.Popen], str]:
    """kill -9 the first process whose title (Ray's ``ray::<Actor>.<method>``) starts with ``prefix``."""
    return lambda job: _kill_first(lambda p, _: p[2].startswith(prefix), what)


def simulator(job: subprocess.Popen) -> str:
    """kill -9 a simulator: the spawned child of an EnvRunner (actors/env_process.py)."""
    def match(p: tuple[int, int, str, str], procs: list) -> bool:
        runners = {q[0] for q in procs if q[2].startswith("ray::EnvRunner")}
        return p[1] in runners and "spawn_main" in p[3] and "resource_tracker" not in p[3]
    return _kill_first(match, "a simulator process")


def send(sig: signal.Signals) -> Callable[[subprocess.Popen], str]:
    def strike(job: subprocess.Popen) -> str:
        job.send_signal(sig)
        return f"{sig.name} to the job (pid {job.pid})"
    return strike


def kill_driver(job: subprocess.Popen) -> str:
    job.kill()
    return f"kill -9 of the job's driver (pid {job.pid})"


class SmallDisk:
    """The run directory's own small filesystem (a tmpfs; mounting one needs root), which ``fill`` fills up."""

    def __init__(self, where: Path, size_mb: int = 256) -> None:
        self.where, self.filler = where, where / "filler"
        where.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)], capture_output=True, text=True)
        self.error = "" if done.returncode == 0 else " ".join((done.stderr or done.stdout or "mount failed").split())[:200]

    def fill(self, job: subprocess.Popen) -> str:
        free = shutil.disk_usage(self.where).free
        said: list[str] = []
        with open(self.filler, "ab", buffering=0) as f:  # unbuffered: nothing left to write at close
            for _ in range(20):  # the job writes and deletes meanwhile (checkpoint rotation): until nothing is left
                try:
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size + shutil.disk_usage(self.where).free)
                except OSError as exc:
                    said.append(exc.strerror or str(exc))
                try:
                    while True:  # what rounding left, to the last block
                        f.write(b"\0" * 4096)
                except OSError as exc:
                    said.append(exc.strerror or str(exc))
                if shutil.disk_usage(self.where).free < 1 << 16:
                    break
        left = shutil.disk_usage(self.where).free
        return (f"filled the run directory's filesystem ({free / 2**20:.0f} MB were free; {left} bytes now"
                + (f"; {sorted(set(said))}" if left >= 1 << 16 else "") + ")")

    def heal(self) -> None:
        self.filler.unlink(missing_ok=True)

    def close(self) -> None:
        if not self.error:
            subprocess.run(["umount", "-l", str(self.where)], capture_output=True)


def fill_disk(job: subprocess.Popen) -> str:
    raise AssertionError("bound to the run's SmallDisk in main()")


BLOWS: dict[str, tuple[str, Callable[[subprocess.Popen], str], bool]] = {  # name -> (its line, the blow, whether it ends the run)
    "simulator": ("collecting", simulator, False),
    "env_runner": ("collecting", titled("ray::EnvRunner.run", "an EnvRunner playing an episode"), False),
    "policy_server": ("collecting", titled("ray::PolicyServer", "a PolicyServer"), False),
    "replay_shard": ("collecting", titled("ray::ReplayShard", "the replay shard"), False),
    "learner_rank": ("collecting", titled("ray::LearnerWorker.train", "the learner's rank at work"), False),
    "sigterm": ("success", send(signal.SIGTERM), True),
    "driver": ("collecting", kill_driver, True),
    "sigint": ("success", send(signal.SIGINT), True),
    "full_disk": ("collecting", fill_disk, True),
}
ALL = list(BLOWS)


def drills(names: list[str]) -> tuple[list[Drill], int]:
    """The drills in order and the rounds the job needs. In the first run each strikes while the next round is collected,
    a signal when the round of the drill before it, or a later one, is evaluated (``round k: success``); each blow that ends a run starts
    the next, whose drill strikes at its first progress line (a signal: its first evaluation), wherever the resumed run
    is (the asynchronous loop collects up to two rounds ahead of the evaluations)."""
    plan, round_, run = [], 0, 1
    for name in names:
        if name not in BLOWS:
            raise SystemExit(f"--drills: unknown drill {name!r} (known: {', '.join(ALL)})")
        line, strike, ends = BLOWS[name]
        from_round = 0
        if run == 1 and line == "success":  # the round's evaluation, or a later one's: on a slow machine the collection
            round_ = from_round = max(round_, 1)  # may fall behind, so the round's evaluation comes before its collection
            trigger = r"round (\d+): success"
        elif run == 1:
            round_ += 1
            trigger = f"round {round_}: {line}"
        else:
            trigger = r"round \d+: success" if line == "success" else r"round \d+: .*\b\d+/\d+\b"
        plan.append(Drill(name, trigger, run, strike, ends_run=ends, from_round=from_round))
        run += ends
    # Rounds enough for every drill: the first run's, two it may collect ahead, one for each drill of a later run.
    return plan, round_ + 2 + sum(d.run > 1 for d in plan)


# ---- what is on disk, what listens, what is left -------------------------------------------------------------------
def episode_files(run_dir: Path) -> list[str]:
    """The acknowledged episodes: their files renamed into place under the run's replay (a dot-file is an unfinished insert)."""
    return sorted(str(p.relative_to(run_dir)) for p in (run_dir / "replay").rglob("*.hdf5") if not p.name.startswith("."))


def readable(run_dir: Path, names: list[str]) -> int:
    from cosmos_policy.data.episode_file import read_episode

    ok = 0
    for name in names:
        try:
            read_episode(run_dir / name)
            ok += 1
        except Exception:  # noqa: BLE001 - a damaged or missing file is what is counted here
            pass
    return ok


def listening_beyond_loopback(root_pid: int) -> list[str]:
    import psutil

    try:
        tree = {p.pid for p in psutil.Process(root_pid).children(recursive=True)} | {root_pid}
    except psutil.Error:
        return []
    out = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in tree:
            if not ipaddress.ip_address(conn.laddr.ip.removeprefix("::ffff:")).is_loopback:
                out.append(f"{conn.laddr.ip}:{conn.laddr.port} pid {conn.pid}")
    return out


def process_tree(root_pid: int) -> dict[int, str]:
    """The processes under ``root_pid`` (the job: its Ray cluster, actors, simulators), pid -> title."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        out = {}
        for p in [root, *root.children(recursive=True)]:
            try:
                out[p.pid] = " ".join(p.cmdline())[:80]
            except psutil.Error:
                pass
        return out
    except psutil.Error:
        return {}


def still_running(seen: dict[int, str]) -> list[str]:
    """Those of ``seen`` still alive (not zombies): what the job left behind."""
    import psutil

    out = []
    for pid, title in seen.items():
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(f"pid {pid}: {title}")
        except psutil.Error:
            pass
    return sorted(out)


# ---- the job -------------------------------------------------------------------------------------------------------
def tiny_checkpoints(root: Path) -> list[str]:
    """The tiny policy and planning model, untrained, as the checkpoints the job starts from (no offline phases)."""
    import numpy as np

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
    return [f"model.checkpoint={root / 'policy'}", f"model.planning_checkpoint={root / 'planning'}"]


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", MUJOCO_GL="egl",
               PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    return env


def play(cmd: list[str], run_dir: Path, run: int, plan: list[Drill], log: list[str], listening: list[str],
         timeout_s: float, seen: dict[int, str]) -> int:
    """One run of the command; strikes this run's drills at their lines; returns the exit code. A drill that ended the
    run before recovers in this one (its recovery time includes the command's start)."""
    job = subprocess.Popen(cmd, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                           start_new_session=True)
    pending = [d for d in plan if d.run == run]
    struck = [d for d in plan if d.hit and d.recovery_s is None]
    deadline = time.time() + timeout_s
    looked = 0.0
    assert job.stdout is not None
    for line in job.stdout:
        now = time.time()
        if now - looked > 2.0:  # the job's processes as they come (after a kill -9 of the driver they are no longer its children)
            seen.update(process_tree(job.pid))
            looked = now
        line = ANSI.sub("", line)  # Ray colours the prefixes of its actors' lines
        log.append(f"[run {run} {now:.1f}] {line}")
        for d in struck:  # the job at work again after a blow, and what it said of it
            if d.recovery_s is None and PROGRESS.search(line) and now - (d.struck_at or now) > 0.5 and (d.run < run or not d.ends_run):
                d.recovery_s = round(now - (d.struck_at or now), 1)
        latest = max(struck, key=lambda d: d.struck_at or 0.0, default=None)  # what the job says is of the last blow
        if latest is not None and not latest.message and latest.says.search(line):
            latest.message = line.strip()[:300]
        if pending and pending[0].sets_off(line):
            seen.update(process_tree(job.pid))
            d = pending.pop(0)
            if not listening and run == 1:
                listening.extend(listening_beyond_loopback(job.pid) or ["none"])
            d.acknowledged = episode_files(run_dir)
            d.struck_at = time.time()
            d.hit = d.strike(job)
            struck.append(d)
        if time.time() > deadline:
            job.kill()
            raise RuntimeError(f"run {run} ran past {timeout_s} s")
    return job.wait(timeout=300)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "chaos.json"))
    parser.add_argument("--keep", help="keep the run directory and the job's log in this folder")
    parser.add_argument("--timeout-s", type=float, default=1200, help="the longest one run of the job may take")
    parser.add_argument("--drills", default=",".join(ALL), help=f"the drills, in order (default: all: {','.join(ALL)})")
    parser.add_argument("overrides", nargs="*", help="experiment overrides for the job")
    args = parser.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    seen: dict[int, str] = {}
    started = time.time()
    plan, rounds = drills([n.strip() for n in args.drills.split(",") if n.strip()])
    disk = None
    run_dir = work / "run"
    for d in [d for d in plan if d.strike is fill_disk]:
        disk = SmallDisk(work / "small")
        run_dir = disk.where / "run"
        d.strike, d.heal, d.says = disk.fill, disk.heal, re.compile("disk filled up")
        if disk.error:  # not here: reported as not run, with the reason
            plan.remove(d)
            unsupported = {"drill": d.name, "hit": f"(not run: cannot mount a tmpfs for the run directory: {disk.error})",
                           "recovered": False}
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "launch" / "online.py"), *JOB, f"online.rounds={rounds}", *tiny_checkpoints(work / "checkpoints"),
           f"run_dir={run_dir}", "name=chaos", *args.overrides]
    log, listening, codes = [], [], []
    for run in range(1, 2 + sum(d.ends_run for d in plan)):
        for d in plan:
            if d.run == run - 1 and d.heal is not None:  # what the job's message asked for: free space, then the same command
                d.heal()
        codes.append(play(cmd, run_dir, run, plan, log, listening, args.timeout_s, seen))
        state = json.loads((run_dir / "state.json").read_text()) if (run_dir / "state.json").exists() else {}
        if state.get("finished"):
            break
    deadline = time.time() + 60
    while (left := still_running(seen)) and time.time() < deadline:  # a minute for Ray's own shutdown
        time.sleep(1)
    state = json.loads((run_dir / "state.json").read_text())
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "eval"' in x]
    finished = bool(state.get("finished")) and codes[-1] == 0
    results = []
    for d in plan:
        present = readable(run_dir, d.acknowledged)
        # Recovered: the run it struck went on to its end (an actor's death) or stopped cleanly (a signal: exit 0), and the
        # command, run again as often as it took, finished every round. A killed driver's run ends with -9 by design.
        if d.heal is not None:  # a full disk: the run stops (exit 1) with one line that names the disk and the path
            run_ok = d.run <= len(codes) and codes[d.run - 1] != 0 and "disk filled up" in d.message and str(run_dir) in d.message
        elif d.ends_run:
            run_ok = d.run <= len(codes) and (codes[d.run - 1] == 0 or d.strike is kill_driver)
        else:  # the job went on after it (until its run ended: at its end, or by a later drill of that run)
            run_ok = d.recovery_s is not None and d.run <= len(codes) and (
                codes[d.run - 1] == 0 or any(e.ends_run and e.run == d.run for e in plan))
        when = d.trigger.replace(r"(\d+)", f"{d.from_round} or later") if d.from_round else d.trigger
        results.append({"drill": d.name, "when": when, "run": d.run, "hit": d.hit or "(never struck)", "acknowledged": len(d.acknowledged),
                        "present_after": present, "lost": len(d.acknowledged) - present, "recovered": bool(d.hit) and run_ok and finished,
                        "recovery_s": d.recovery_s, "message": d.message})
    report = {
        "what": "fault drills against a running scaled-down main job: acknowledged episodes kept, recovery, what listens, what is left",
        "command": " ".join(["python bench/chaos.py", *(["--drills", args.drills] if args.drills != ",".join(ALL) else []), *args.overrides]),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
        "date": time.strftime("%Y-%m-%d"),
        "bench_s": round(time.time() - started, 1),
        "rounds": rounds, "runs": len(codes), "exit_codes": codes, "finished": finished,
        "rounds_evaluated": sorted({e["round"] for e in evals}), "final_version": evals[-1]["weight_version"] if evals else None,
        "drills": results + ([unsupported] if disk is not None and disk.error else []),
        "lost": sum(r["lost"] for r in results),
        "listening_beyond_loopback": [x for x in listening if x != "none"],
        "left_behind": left,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if disk is not None:
        disk.close()
    if args.keep:
        (work / "job.log").write_text("".join(log))
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in report.items() if k != "drills"}), flush=True)
    for r in results:
        print(json.dumps(r), flush=True)
    ok = finished and report["lost"] == 0 and all(r["recovered"] for r in report["drills"]) and not report["listening_beyond_loopback"] \
        and not report["left_behind"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
