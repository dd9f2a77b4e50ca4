"""Collect episodes with a policy (and planner) into episode files, without Ray: worker processes on one host.

The main job collects through Ray EnvRunners into the replay service. This runs the same
``EpisodeRunner`` (the same query seeds, rendering, recording and branching) in plain worker
processes and writes each episode as a file under ``<out>/<table>/`` (experience_success,
experience_failure), where launch/train.py reads it. It is the Ray-free half of the offline
loop (collect, train, evaluate) for a machine without Ray or a cluster, e.g. a GPU host:

    python launch/collect.py --config learning_proof --policy runs/learning_curve/checkpoints/policy \\
        --planning runs/learning_curve/checkpoints/planning --trials 200-259 --branch-first-query \\
        --workers 2 --out runs/branches

Trials are the task's fixed initial states (the evaluation protocol's); ``--branch-first-query``
plays each once per planner candidate, episode c executing candidate c at the first query
(``actors.branching.Branching``). ``--branch-query K`` branches at query K instead: the queries
before it execute one candidate drawn per trial (``lead_candidates``), the same in all of the
trial's episodes, so a judge that plans at several queries sees states reached through any first
chunk it might pick. With ``--branch-point-only`` the files keep camera frames at the branch point
only, the frames a judge trained with ``launch/train.py --branch-point-only`` uses.
``<out>/collect.jsonl`` gets one line per finished episode; a
rerun with the same ``--out`` skips what it lists, so a stopped collection loses nothing it
reported.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from actors.branching import lead_candidates  # noqa: E402
from cosmos_policy.errors import CheckpointError, ConfigError  # noqa: E402
from cosmos_policy.manifest import read_manifest  # noqa: E402
from cosmos_policy.layout import load_layout  # noqa: E402
from launch.cli import add_debug_flag, keys_epilog, run_command  # noqa: E402
from launch.config import load_experiment  # noqa: E402
from launch.experiment import Experiment  # noqa: E402
from launch.monitor import say  # noqa: E402

_WORKER: dict[str, Any] = {}  # each worker process's runner, built once by _start


def parse_trials(text: str) -> list[int]:
    """``a-b`` (inclusive) or a comma list of fixed initial-state indices."""
    span = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    try:
        trials = list(range(int(span[1]), int(span[2]) + 1)) if span else [int(t) for t in text.split(",")]
    except ValueError:
        raise ConfigError(f"--trials: expected a range a-b or a comma list of integers, got {text!r}") from None
    if not trials or min(trials) < 0:
        raise ConfigError(f"--trials: expected non-negative initial-state indices (a-b with a <= b, or a comma list), got {text!r}")
    return trials


def env_kwargs(cfg: Experiment, trials: list[int]) -> dict[str, Any]:
    """The environment's settings; the built-in task gets enough fixed initial states for every trial."""
    kwargs = dict(cfg.env.kwargs)
    if cfg.env.name == "lift":
        kwargs["num_initial_states"] = max(int(kwargs.get("num_initial_states", 0)), max(trials) + 1)
    return kwargs


def jobs(trials: list[int], branches: int | None, done: set[tuple[int, int | None]]) -> list[tuple[int, int | None]]:
    """(trial, branch) pairs still to play: every branch of each trial, or the trial once (branch None)."""
    todo = [(t, b) for t in trials for b in (range(branches) if branches else [None])]
    return [j for j in todo if j not in done]


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """End this worker when the collector that spawned it is gone.

    A collector killed by a signal (``kill``, a job stop) never reaches its pool's shutdown, and its
    spawned workers would go on playing queued episodes that nobody records, holding the cores.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _start(config_path: str, policy: str, planning: str | None, trials: list[int], threads: int, branch_point: bool = False) -> None:
    import torch

    _exit_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the collector stops the workers

    from actors.env_process import EnvConfig
    from actors.env_runner import EpisodeRunner, RunnerConfig
    from actors.policies import PolicySpec, local_policies

    torch.set_num_threads(threads)
    cfg = load_experiment(config_path, [])
    spec = PolicySpec(checkpoint=policy, planning_checkpoint=planning, policy=cfg.policy, planner=cfg.planner,
                      text_encoder=cfg.model.text_encoder)
    acting, planner = local_policies(spec)
    # --branch-point-only: the runner keeps a branching episode's frames at its branch point (and that sample's
    # future frame), what launch/train.py --branch-point-only keeps: files about half the size, to ship off a host.
    config = RunnerConfig(env=EnvConfig(cfg.env.name, env_kwargs(cfg, trials)), execute=cfg.env.execute, plan=cfg.online.plan,
                          plan_queries=cfg.env.plan_queries, max_steps=cfg.env.max_steps,
                          branch_point_only=load_layout(cfg.model.layout).action_chunk if branch_point else None)
    _WORKER["runner"] = EpisodeRunner(config, acting, planner, _Files(Path(config_path).parent))
    _WORKER["task"] = cfg.env.tasks[0] if cfg.env.tasks else _WORKER["runner"].env.tasks()[0]


class _Files:
    """The runner's replay client: each inserted episode becomes a file under ``<out>/<table>/``."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.last: str | None = None

    def insert(self, table: str, episode: Any, priority: float | list[float] = 1.0, timeout: float | None = None) -> str:
        from cosmos_policy.data.episode_file import episode_file_name, write_episode

        path = self.out / table / episode_file_name(episode)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_episode(path, episode)
        self.last = str(path.relative_to(self.out))
        return episode.episode_id


def _play(trial: int, branch: int | None, seed: int, lead: list[int]) -> dict[str, Any]:
    """One episode of ``trial``; with ``branch``, the runner plans through ``Branching`` at the leading queries and
    the branch point (then as the experiment says: planned at every query, or at ``env.plan_queries``, or not)."""
    runner, task = _WORKER["runner"], _WORKER["task"]
    states = runner.env.initial_states(task)
    state = states[trial % len(states)] if states else None
    runner.replay.last = None
    meta: dict[str, Any] = {"trial": trial}
    if branch is not None:
        meta.update(branch_of=trial, candidate=branch)
    result = runner.run(task, seed, state, meta, branch=None if branch is None else [*lead, branch])
    return {"trial": trial, "branch": branch, "success": result.success, "steps": result.steps, "interrupted": result.interrupted,
            "file": runner.replay.last, "wall_s": round(result.wall_s, 2)}


def collect(cfg: Experiment, policy: str, planning: str | None, trials: list[int], out: Path, seed: int = 0, branch: bool = False,
            workers: int = 1, branch_point: bool = False, threads: int | None = None, branch_query: int = 0) -> list[dict[str, Any]]:
    """Play the trials (each branch of each, with ``branch``) in ``workers`` processes; returns this run's rows.

    ``branch_query``: with ``branch``, the query that branches (0: the first); the ones before it
    execute ``lead_candidates``.
    ``branch_point``: the branching episodes' files keep camera frames at the branch point only.
    ``threads``: torch threads per worker; by default the cores divided among the workers. Give it
    when other jobs share the cores (two collections side by side each take all cores otherwise,
    and oversubscribed torch threads slow every worker several-fold).
    """
    if branch and not planning:
        raise ConfigError("--branch-first-query / --branch-query: needs --planning (the planner makes the candidates)")
    if cfg.online.plan and not planning:
        raise ConfigError("online.plan: collecting with planning needs --planning (or online.plan=false)")
    if isinstance(branch_query, bool) or not isinstance(branch_query, int) or branch_query < 0:
        raise ConfigError(f"--branch-query: expected a query index >= 0 (0: the first query), got {branch_query!r}")
    if branch_query and not branch:
        raise ConfigError(f"branch_query: {branch_query} given without branch=True (nothing would branch there)")
    if branch_point and not branch:
        raise ConfigError("--branch-point-only: needs --branch-first-query or --branch-query (episodes that branch)")
    if workers < 1:
        raise ConfigError(f"--workers: expected a positive number of processes, got {workers}")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "collect.jsonl"
    done = set()
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that episode is played again
            done.add((row["trial"], row["branch"]))
    todo = jobs(trials, cfg.planner.num_candidates if branch else None, done)
    say(f"collect: {len(todo)} episodes to play ({len(done)} already in {log}), {workers} workers")
    rows: list[dict[str, Any]] = []
    start = time.time()
    config_path = out / "config.yaml"  # what the workers load: this run's resolved experiment
    OmegaConf.save(OmegaConf.create(cfg.to_dict()), config_path)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads: expected a positive number of torch threads per worker, got {threads}")
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    # Spawned, not forked: a fork of a process whose torch thread pools already ran can hang in the child.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start,
                             initargs=(str(config_path), policy, planning, trials, threads, branch_point)) as pool, \
            log.open("a", buffering=1) as f:
        n = cfg.planner.num_candidates
        futures = [pool.submit(_play, t, b, seed, lead_candidates(t, seed, branch_query, n) if b is not None else []) for t, b in todo]
        try:
            for fut in as_completed(futures):
                row = fut.result()
                f.write(json.dumps(row) + "\n")
                rows.append(row)
                if len(rows) % max(1, len(todo) // 20) == 0 or len(rows) == len(todo):
                    rate = sum(r["success"] for r in rows) / len(rows)
                    say(f"collect: {len(rows)}/{len(todo)} episodes, success {rate:.1%}, {time.time() - start:.0f} s")
        except BaseException:
            # Stopped (Ctrl-C, SIGTERM) or a worker failed: the queued episodes are dropped instead of
            # played out by the pool's exit, and the workers stop with the episode at hand (unrecorded:
            # a rerun plays it again). Every episode in collect.jsonl has its file.
            procs = list((getattr(pool, "_processes", None) or {}).values())  # shutdown forgets them
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in procs:
                proc.terminate()
            say(f"collect: stopped after {len(rows)} of {len(todo)} episodes; run again with --out {out} to continue")
            raise
    return rows


def _stop(signum: int, frame: Any) -> None:
    """SIGTERM (``kill``, ``timeout``, a job stop) ends the collection as Ctrl-C does: workers stopped, what was logged kept."""
    raise SystemExit(128 + signum)


def build_parser() -> argparse.ArgumentParser:
    """The command line: every flag with its help, and (for the experiment's keys) each key with its default."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=keys_epilog("Overrides are key=value pairs of the experiment's keys, e.g. planner.num_candidates=16."))
    parser.add_argument("--config", default="quickstart", help="configs/experiment/<name>.yaml or a YAML path")
    parser.add_argument("--policy", required=True, help="the acting policy's checkpoint")
    parser.add_argument("--planning", default=None, help="the planning model's checkpoint (planning or branching)")
    parser.add_argument("--trials", required=True, help="fixed initial states: a range a-b or a comma list")
    parser.add_argument("--seed", type=int, default=0, help="the episode seed")
    parser.add_argument("--branch-first-query", action="store_true", help="play each trial once per planner candidate at the first query")
    parser.add_argument("--branch-query", type=int, default=None, metavar="K",
                        help="play each trial once per planner candidate at query K (0: the first); earlier queries execute a drawn candidate")
    parser.add_argument("--branch-point-only", "--first-query-only", dest="branch_point_only", action="store_true",
                        help="write frames at the branch point only (what launch/train.py --branch-point-only keeps)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (each with its own simulator)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: the cores divided among the workers)")
    parser.add_argument("--out", required=True, help="output directory: <table>/*.hdf5 and collect.jsonl")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the experiment's keys (listed below)")
    add_debug_flag(parser)
    return parser


def collect_episodes(args: argparse.Namespace) -> None:
    """Check every argument and checkpoint, then collect; a mistake is one error naming the flag or file."""
    cfg = load_experiment(args.config, args.overrides)
    trials = parse_trials(args.trials)
    for flag, path in (("--policy", args.policy), ("--planning", args.planning)):
        if path:
            try:
                read_manifest(path)
            except CheckpointError as exc:
                raise ConfigError(f"{flag}: {exc}") from None
    signal.signal(signal.SIGTERM, _stop)
    rows = collect(cfg, args.policy, args.planning, trials, Path(args.out), seed=args.seed,
                   branch=args.branch_first_query or args.branch_query is not None, workers=args.workers,
                   branch_point=args.branch_point_only, threads=args.threads, branch_query=args.branch_query or 0)
    if rows:
        say(f"collected {len(rows)} episodes, success {sum(r['success'] for r in rows) / len(rows):.1%}: {args.out}")


def main(argv: list[str] | None = None) -> None:
    run_command(build_parser(), collect_episodes, argv)


if __name__ == "__main__":
    main()
