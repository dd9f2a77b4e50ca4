"""The phases before the online rounds: demonstrations, statistics and embeddings, offline training.

Each phase records its completion in the run state, so a restarted job skips what is done:
1. demonstrations: the built-in task's scripted expert (in parallel Ray tasks), or a dataset;
   written as episode files under the run directory;
2. normalization statistics from them, and the embeddings of every instruction the job will see;
3. offline training (DeepSpeed learner groups): the policy on the demonstrations until the
   held-out demonstrations' loss stops improving, then the planning model (world model + value)
   from the policy's weights on the planning mixture (or, of a size of its own, beside the policy).
"""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray

from cosmos_policy.checkpoint import save_checkpoint
from cosmos_policy.codec import NormalizationStats
from cosmos_policy.config import load_model_config
from cosmos_policy.contracts import Episode, WeightPublisher
from cosmos_policy.data.episode_file import read_episode, write_episode
from cosmos_policy.data.statistics import compute_statistics
from cosmos_policy.errors import ConfigError
from cosmos_policy.layout import load_layout
from cosmos_policy.model import CosmosPolicyModel
from cosmos_policy.text import TextEmbeddingCache
from launch.experiment import Experiment
from launch.monitor import Monitor, say
from launch.offline import source_kwargs, split_validation, text_cache, validation_batches
from launch.run_state import RunState
from learner.config import LearnerConfig
from learner.fit import EarlyStopping, fit
from learner.group import LearnerGroup, PublishConfig
from learner.sources import EpisodeSource


# ---- demonstrations ----------------------------------------------------------------------------
@ray.remote(num_cpus=1)
def _expert_demos(n: int, success_rate: float, seed: int, indices: range, env_kwargs: dict[str, Any]) -> list[Episode]:
    from actors.envs.lift_expert import make_demonstrations

    return make_demonstrations(n, success_rate, seed, image_size=int(env_kwargs.get("image_size", 64)),
                               max_steps=int(env_kwargs.get("max_steps", 100)), indices=indices)


def demonstrations(cfg: Experiment, run_dir: Path, state: RunState, monitor: Monitor) -> list[Episode]:
    """The demonstrations: read back from the run directory, or made / read once and written there."""
    demo_dir = run_dir / "demos"
    if state.get("demos_done"):
        return [read_episode(p) for p in sorted(demo_dir.glob("*.hdf5"))]
    if cfg.demos.source == "none":
        return []
    start = time.time()
    if cfg.demos.source == "expert":
        # Shares of a few episodes each, spread over the cluster's CPUs as Ray tasks (progress after each); together
        # they are the episodes one maker would make (the seed, the outcomes), whatever the shares.
        n = cfg.demos.episodes
        refs = [_expert_demos.remote(n, cfg.demos.expert_success_rate, cfg.demos.seed, range(i, min(i + 4, n)), dict(cfg.env.kwargs))
                for i in range(0, n, 4)]
        shares: dict[Any, list[Episode]] = {}
        pending = list(refs)
        while pending:  # a line at least every 20 s: the first shares wait for their simulators to start
            done, pending = ray.wait(pending, num_returns=1, timeout=20)
            shares.update((ref, ray.get(ref)) for ref in done)
            monitor.progress("demonstrations (scripted expert)", sum(map(len, shares.values())), n)
        episodes = [ep for ref in refs for ep in shares[ref]]  # in the episodes' order, whichever share finished first
    else:
        episodes = read_dataset(cfg)
    demo_dir.mkdir(parents=True, exist_ok=True)
    for i, ep in enumerate(episodes):
        write_episode(demo_dir / f"demo_{i:05d}.hdf5", ep)
    monitor.log("demos", {"episodes": len(episodes), "success_rate": float(np.mean([e.success for e in episodes])) if episodes else 0.0,
                          "steps": int(sum(e.num_steps for e in episodes)), "seconds": time.time() - start})
    state.set(demos_done=True)
    return episodes


def read_dataset(cfg: Experiment) -> list[Episode]:
    path = Path(cfg.demos.dataset or "")
    if not path.exists():
        raise ConfigError(f"demos.dataset: {path} does not exist")
    if cfg.demos.dataset_format == "libero":
        from cosmos_policy.data.official import iter_libero_demos

        it = iter_libero_demos(path)
    else:
        it = (read_episode(p) for p in sorted(path.rglob("*.hdf5")))
    episodes = []
    for ep in it:
        episodes.append(ep)
        if cfg.demos.max_episodes and len(episodes) >= cfg.demos.max_episodes:
            break
    if not episodes:
        raise ConfigError(f"demos.dataset: no episodes under {path} (format {cfg.demos.dataset_format!r})")
    return episodes


# ---- statistics and instruction embeddings -----------------------------------------------------
def statistics_and_text(cfg: Experiment, run_dir: Path, demos: list[Episode]) -> tuple[NormalizationStats, TextEmbeddingCache]:
    """Normalization statistics (computed once from the demonstrations) and every instruction's embedding."""
    stats_path = run_dir / "dataset_statistics.json"
    if not stats_path.is_file():
        if not demos:
            raise ConfigError("demos: no demonstrations to compute normalization statistics from")
        compute_statistics(demos).save(stats_path)
    return NormalizationStats.load(stats_path), text_cache(cfg, [e.instruction for e in demos] + env_instructions(cfg))


def env_instructions(cfg: Experiment) -> list[str]:
    """The instructions of the environment's tasks (the built-in task's is fixed; others ask the env)."""
    if cfg.env.name == "lift":
        from actors.envs.lift import INSTRUCTION

        return [INSTRUCTION]
    from actors.env_process import EnvProcess

    env = EnvProcess(cfg.env_config())
    try:
        return [env.instruction(t) for t in (cfg.env.tasks or env.tasks())]
    finally:
        env.close()


# ---- offline training ----------------------------------------------------------------------------
def in_background(name: str, fn: Callable[..., Any], *args: Any) -> Future:
    """``fn(*args)`` in a daemon thread (one that never holds up the job's exit after a failure elsewhere);
    the future gives its result or raises what it raised."""
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed to whoever waits for the result
            future.set_exception(exc)

    threading.Thread(target=work, name=name, daemon=True).start()
    return future


def learner_group(cfg: Experiment, what: str, learner_cfg: LearnerConfig, source: Any, publish: PublishConfig | None = None,
                  publisher: WeightPublisher | None = None) -> LearnerGroup:
    """The ``what`` learner of this experiment: ``learner.world_size`` ranks with its resources (ready when returned)."""
    start = time.time()
    ranks = cfg.learner.world_size
    say(f"starting the {what} learner ({ranks} rank{'s' if ranks > 1 else ''}: model, DeepSpeed, data; a minute or more on a CPU)")
    group = LearnerGroup(learner_cfg, source, world_size=ranks, gpus_per_worker=cfg.learner.gpus_per_worker,
                         cpus_per_worker=cfg.learner.cpus_per_worker, publish_cfg=publish, publisher=publisher,
                         waiting=lambda s: say(f"still starting the {what} learner ({s:.0f} s)"),
                         on_restart=lambda exc: say(f"warning: the {what} learner lost a rank ({type(exc).__name__}); "
                                                    "restarting it from its last checkpoint (the actors go on acting)"))
    say(f"the {what} learner is ready at step {group.step()} ({time.time() - start:.0f} s)")
    return group


def offline(cfg: Experiment, run_dir: Path, state: RunState, monitor: Monitor, demos: list[Episode], stats: NormalizationStats,
            text: TextEmbeddingCache) -> tuple[str, str]:
    """Train (or take) the policy and the planning model; returns their checkpoint directories.

    A planning model of its own size (model.planning_size) owes nothing to the policy: it trains beside it
    (two learners on the cluster at once); otherwise it starts from the policy's weights, after it.
    """
    planning_ckpt = cfg.model.planning_checkpoint or state.get_path("planning_checkpoint")
    planning: Future | None = None
    if planning_ckpt is None and cfg.model.planning_size:  # a planning model of its own size, from scratch
        model = CosmosPolicyModel.build(load_model_config(cfg.model.planning_size), load_layout(cfg.model.layout), seed=cfg.seed + 1)
        init = str(save_checkpoint(run_dir / "checkpoints" / "planning_init", model, stats=stats, text=text))
        planning = in_background("offline-planning", train_offline, cfg, run_dir, monitor, "planning", init, demos, stats, text)
    policy_ckpt = cfg.model.checkpoint or state.get_path("policy_checkpoint")
    if policy_ckpt is None:
        model = CosmosPolicyModel.build(load_model_config(cfg.model.size), load_layout(cfg.model.layout), seed=cfg.seed)
        init = save_checkpoint(run_dir / "checkpoints" / "init", model, stats=stats, text=text)
        train, val = split_validation(cfg, demos)
        policy_ckpt = train_offline(cfg, run_dir, monitor, "policy", str(init), train, stats, text, val)
        state.set(policy_checkpoint=state.inside(policy_ckpt))
        done_with_learner(run_dir, "policy_offline", "init")
    if planning_ckpt is None:
        planning_ckpt = planning.result() if planning else train_offline(cfg, run_dir, monitor, "planning", str(policy_ckpt), demos, stats, text)
        state.set(planning_checkpoint=state.inside(planning_ckpt))
        done_with_learner(run_dir, "planning_offline", "planning_init")
    return str(policy_ckpt), str(planning_ckpt)


def done_with_learner(run_dir: Path, phase: str, init: str) -> None:
    """Drop a finished offline phase's learner checkpoints (optimizer state included: most of a run
    directory) and the fresh weights it started from (``checkpoints/<init>``): its export holds the
    weights, and a resumed job never goes back into a phase that the run state records as done.
    What a run needs to move between machines stays small."""
    shutil.rmtree(run_dir / "learner" / phase, ignore_errors=True)
    shutil.rmtree(run_dir / "checkpoints" / init, ignore_errors=True)


def train_offline(cfg: Experiment, run_dir: Path, monitor: Monitor, target: str, init: str, episodes: list[Episode],
                  stats: NormalizationStats, text: TextEmbeddingCache, val: list[Episode] | None = None) -> str:
    """The policy on demonstrations alone until the held-out loss stops improving (or its step budget), or the
    planning model from ``init`` (the policy's weights, or a fresh model of model.planning_size) for its steps on the
    planning mixture; returns the export."""
    steps = cfg.offline.policy_steps if target == "policy" else max(1, cfg.offline.planning_steps)
    phase, out = f"{target}_offline", run_dir / "checkpoints" / target
    source = EpisodeSource(episodes, mixture=cfg.mixture(target), **source_kwargs(cfg, stats, text, cfg.offline.batch))
    group = learner_group(cfg, f"offline {target}", cfg.learner_config(str(run_dir / "learner" / phase), online=False, init_checkpoint=init,
                                                                        steps=steps), source)
    batches = validation_batches(cfg, stats, text, val or [])

    def train(n: int) -> list[dict[str, float]]:
        rows: list[dict[str, float]] = []
        group.train(n, chunk=min(n, 10), on_metrics=lambda r: (rows.extend(r), monitor.progress(
            f"{target} training", rows[-1]["step"], steps, f"loss {rows[-1]['loss']:.3f}")))
        return rows

    def report(rows: list[dict[str, float]], loss: float | None, stopper: EarlyStopping) -> None:
        monitor.learner(phase, rows)
        if loss is not None:
            monitor.log("validation", {"phase": phase, "learner/step": group.step(), "val_loss": loss, "best": min(stopper.best, loss)})

    def validate() -> float:  # fixed held-out batches with fixed noise: comparable between calls
        worker = group.workers[0]
        return float(np.mean(ray.get([worker.evaluate.remote(b, seed=i) for i, b in enumerate(batches)])))

    try:
        fit(train, group.step, steps, cfg.offline.validate_every if target == "policy" else 100, lambda: group.export(str(out)),
            validate if batches else None, cfg.offline.patience, report, say, what=target)
    finally:
        group.stop()
    return str(out)
