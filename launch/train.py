"""Train the policy or the planning model from episode files, without Ray (one process, or torchrun).

The main job (launch/online.py) trains both through Ray learner groups. This is the same learner
(DeepSpeed, the experiment's mixtures, sample builder and schedule) for work that needs no
cluster: refining a planning model on experience collected earlier, training a larger judge on a
GPU machine where Ray is not installed, or redoing a run's offline phase. Demonstrations and
experience are read from episode files alike; each episode's pools come from its record (source
and outcome), so the mixture draws from them as it would from replay.

    python launch/train.py --config learning_curve --target planning \\
        --init runs/learning_curve/checkpoints/policy --out runs/judge \\
        --episodes 'runs/learning_curve/demos/*.hdf5' 'runs/learning_curve/replay/**/*.hdf5' \\
        data.planning_mixture=planning_q
    torchrun --nproc_per_node=2 launch/train.py ... learner.world_size=2   # one rank per GPU

``--target policy`` holds out ``demos.validation_fraction`` of the successful demonstrations and
stops when their loss stops improving (``offline.patience``), as the main job does; the best
weights are exported. Without ``--init`` the model starts from ``model.size``'s random weights and
the normalization statistics come from the demonstrations given. The learner checkpoints into
``<out>/learner/<target>`` when stopped (Ctrl-C, SIGTERM) and a second run with the same ``--out``
resumes there; the result is ``<out>/checkpoints/<target>``, metrics go to ``<out>/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import glob
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from cosmos_policy.data.episode_file import read_episode  # noqa: E402
from cosmos_policy.episode import Episode, Source  # noqa: E402
from cosmos_policy.errors import CheckpointError, ConfigError  # noqa: E402
from cosmos_policy.manifest import read_manifest  # noqa: E402
from cosmos_policy.layout import load_layout  # noqa: E402
from launch.cli import add_debug_flag, keys_epilog, run_command  # noqa: E402
from launch.config import check_inputs, load_experiment  # noqa: E402
from launch.experiment import Experiment  # noqa: E402
from launch.monitor import Monitor, say  # noqa: E402
from launch.signals import StopRequest  # noqa: E402
from actors.branching import branch_point_only  # noqa: E402
from learner.fit import EarlyStopping, fit  # noqa: E402

if TYPE_CHECKING:
    from cosmos_policy.codec import NormalizationStats

TARGETS = ("policy", "planning")


class Stopped(Exception):
    """A signal asked the trainer to stop; the learner state was saved for a resume."""


def episode_files(patterns: list[str]) -> list[Path]:
    """The episode files the patterns name (globs, ``**`` recursive; directories mean every file under them)."""
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            files += sorted(path.rglob("*.hdf5"))
            continue
        matched = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        if not matched:
            raise ConfigError(f"--episodes: {pattern!r} matches no file")
        files += matched
    if not files:
        raise ConfigError("--episodes: expected episode files (globs or directories), got none")
    return list(dict.fromkeys(files))


def _distributed_env() -> None:
    """One process without torchrun: rank 0 of 1 on a free loopback port (torchrun sets these itself)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _all_agree(flag: bool, device: Any) -> bool:
    """``flag`` if any rank raised it: ranks that decided apart would wait on each other forever."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def statistics(init: str | None, episodes: list[Episode]) -> NormalizationStats:
    """The initial checkpoint's statistics (the model was trained in those units), else the demonstrations'."""
    from cosmos_policy.checkpoint import load_checkpoint
    from cosmos_policy.data.statistics import compute_statistics

    if init:
        stats = load_checkpoint(init).stats
        if stats is not None:
            return stats
    demos = [e for e in episodes if e.source is Source.DEMO]
    if not demos:
        raise ConfigError("--episodes: no demonstrations among them to compute normalization statistics from "
                          "(or pass --init with a checkpoint that holds statistics)")
    return compute_statistics(demos)


def train(cfg: Experiment, target: str, episodes: list[Episode], out: Path, init: str | None = None, steps: int | None = None,
          lr: float | None = None, stop: Callable[[], bool] = lambda: False, branch_point: bool = False,
          time_limit: float | None = None, export_every: int | None = None) -> Path:
    """Train ``target`` on ``episodes`` and export it to ``<out>/checkpoints/<target>``; returns that path.

    ``branch_point``: experience (not demonstrations) gives samples at its branch point only (the first
    query where the episode records none).
    ``time_limit``: seconds of training after which the run ends as if its steps were done (export, save),
    checked every report interval and agreed by all ranks: a run inside a fixed window (a rented GPU
    call) ends with its weights exported instead of killed with nothing to show.
    ``export_every``: also export snapshots ``<out>/checkpoints/<target>_step<N>`` every that many steps,
    for choosing among them afterwards on held-out labels (a judge has no held-out loss here: its quality
    is how it ranks held-out states' candidates, research/learning_proof/grade_branches.py).
    """
    # Imported when training, not at the top: a mistake in the arguments is reported before torch, diffusers and DeepSpeed load.
    from launch.offline import source_kwargs, split_validation, text_cache, validation_batches
    from learner.engine import Learner
    from learner.sources import EpisodeSource

    if target not in TARGETS:
        raise ConfigError(f"--target: expected one of {TARGETS}, got {target!r}")
    off = cfg.offline
    steps = steps or (off.policy_steps if target == "policy" else off.planning_steps)
    stats = statistics(init, episodes)
    if branch_point:
        chunk = load_layout(cfg.model.layout).action_chunk
        episodes = [e if e.source is Source.DEMO else branch_point_only(e, chunk) for e in episodes]
    text = text_cache(cfg, [e.instruction for e in episodes])
    train_eps, val = episodes, []
    if target == "policy":  # held out: demonstrations only; experience stays for the mixture to draw from
        demos, val = split_validation(cfg, [e for e in episodes if e.source is Source.DEMO])
        train_eps = demos + [e for e in episodes if e.source is not Source.DEMO]
    if not train_eps:
        raise ConfigError(f"--episodes: no episodes to train the {target} on (the policy learns from successful demonstrations)")
    source = EpisodeSource(train_eps, mixture=cfg.mixture(target), **source_kwargs(cfg, stats, text, off.batch))
    _distributed_env()
    learner = Learner(cfg.learner_config(str(out / "learner" / target), online=False, init_checkpoint=init, steps=steps, lr=lr), source)
    # A fresh model (no --init) carries no statistics or instruction embeddings: the export needs both.
    learner.stats = learner.stats or stats
    learner.text = learner.text or text
    resumed = learner.resume()
    rank0 = learner.rank == 0
    # Rank 0 reports; the others keep their own file (a shared metrics.jsonl would interleave lines).
    monitor = Monitor(out if rank0 else out / f"rank{learner.rank}", cfg.to_dict(), cfg.logging.wandb if rank0 else "disabled",
                      cfg.logging.project, cfg.logging.entity, cfg.name)
    ckpt = out / "checkpoints" / target
    val_batches = validation_batches(cfg, stats, text, val)
    start, out_of_time = time.time(), []  # out_of_time: set once the time limit is reached
    if rank0:
        say(f"{target}: {len(train_eps)} episodes, {len(val)} held out, {steps} steps" + (f", resuming at step {learner.step}" if resumed else ""))

    def train_steps(n: int) -> list[dict[str, float]]:
        """Up to ``n`` steps; none once the time limit is reached (every rank agrees), so ``fit`` exports and ends."""
        rows: list[dict[str, float]] = []
        for _ in range(n):
            if out_of_time or (time_limit is not None and _all_agree(time.time() - start >= time_limit, learner.device)):
                if rank0 and not out_of_time:
                    say(f"{target}: time limit of {time_limit:.0f} s reached at step {learner.step} of {steps}")
                out_of_time.append(True)
                break
            rows.append(learner.train_step())
            if export_every and learner.step % export_every == 0 and learner.step < steps:  # every rank takes part
                learner.export(ckpt.parent / f"{target}_step{learner.step}")
            if stop():
                learner.save()
                raise Stopped()
        return rows

    def report(rows: list[dict[str, float]], loss: float | None, stopper: EarlyStopping) -> None:
        record = monitor.learner(f"{target}_train", rows, samples_per_s=learner.samples / max(time.time() - start, 1e-9))
        if rank0:
            monitor.progress(f"{target} training", learner.step, steps, f"loss {record['loss']:.3f}")
        if loss is not None:
            monitor.log("validation", {"phase": f"{target}_train", "learner/step": learner.step, "val_loss": loss, "best": min(stopper.best, loss)})

    def validate() -> float:
        return float(np.mean([learner.evaluate(b, seed=i) for i, b in enumerate(val_batches)]))

    try:
        fit(train_steps, lambda: learner.step, steps, off.validate_every if val_batches else max(1, min(100, steps)),
            lambda: learner.export(ckpt), validate if val_batches else None, off.patience, report, say if rank0 else (lambda m: None),
            what=target)
        learner.save()  # a later run with more --steps continues from here
    finally:
        monitor.close()
    return ckpt


def build_parser() -> argparse.ArgumentParser:
    """The command line: every flag with its help, and (for the experiment's keys) each key with its default."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=keys_epilog("Overrides are key=value pairs of the experiment's keys, e.g. model.size=small offline.batch=64."))
    parser.add_argument("--config", default="quickstart", help="configs/experiment/<name>.yaml or a YAML path")
    parser.add_argument("--target", required=True, choices=TARGETS, help="which model: the policy or the planning model")
    parser.add_argument("--episodes", nargs="+", required=True, help="episode files: globs (** recursive) or directories")
    parser.add_argument("--out", required=True, help="output directory: checkpoints/<target>, learner/<target>, metrics.jsonl")
    parser.add_argument("--init", default=None, help="a checkpoint to start from (the planning model starts from the policy's)")
    parser.add_argument("--steps", type=int, default=None, help="learner steps (default: offline.policy_steps or offline.planning_steps)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: offline.lr)")
    parser.add_argument("--branch-point-only", "--first-query-only", dest="branch_point_only", action="store_true",
                        help="experience gives samples at its branch point only (metadata branch_step; the first query without one)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S",
                        help="end training after S seconds as if its steps were done (export and save)")
    parser.add_argument("--export-every", type=int, default=None, metavar="N",
                        help="also export snapshots <out>/checkpoints/<target>_step<N> every N steps")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the experiment's keys (listed below)")
    add_debug_flag(parser)
    return parser


def train_from_files(args: argparse.Namespace) -> None:
    """Check every argument and file, then train; a mistake is one error naming the flag or file."""
    if args.export_every is not None and args.export_every < 1:
        raise ConfigError(f"--export-every: expected a positive number of steps, got {args.export_every}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps: expected a positive number of learner steps, got {args.steps}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise ConfigError(f"--time-limit: expected a positive number of seconds, got {args.time_limit}")
    cfg = load_experiment(args.config, args.overrides)
    check_inputs(cfg)
    if args.init:
        try:
            read_manifest(args.init)
        except CheckpointError as exc:
            raise ConfigError(f"--init: {exc}") from None
    episodes = [read_episode(p) for p in episode_files(args.episodes)]
    try:
        with StopRequest("saving the learner after this step") as stop:
            path = train(cfg, args.target, episodes, Path(args.out), init=args.init, steps=args.steps, lr=args.lr, stop=stop,
                         branch_point=args.branch_point_only, time_limit=args.time_limit, export_every=args.export_every)
    except Stopped:
        if os.environ.get("RANK", "0") == "0":
            say(f"stopped; run again with --out {args.out} to resume")
        sys.exit(130)
    if os.environ.get("RANK", "0") == "0":
        say(f"checkpoint: {path}")


def main(argv: list[str] | None = None) -> None:
    run_command(build_parser(), train_from_files, argv)


if __name__ == "__main__":
    main()
