"""The main job: collect with planning, refine the world model and value, publish, evaluate; repeat.

    python launch/online.py                                  # the quickstart, on a local Ray cluster
    python launch/online.py --config libero_spatial online.rounds=10 online.runners=16
    ray job submit --working-dir . -- python launch/online.py --config libero_all ray.address=auto run_dir=/shared/runs/x

Phases (each one's completion is recorded in ``<run_dir>/state.json``; a restarted job with the
same run directory skips what is done and resumes the learner from its last checkpoint):
1. demonstrations: the built-in task's scripted expert (in parallel Ray tasks), or a dataset;
   written as episode files under the run directory; normalization statistics from them.
2. offline training (DeepSpeed learner group): the policy on the demonstrations until the
   held-out demonstrations' loss stops improving, then the planning model (world model + value)
   from the policy's weights on the planning mixture.
3. online rounds: EnvRunners act through a PolicyServer (best-of-N with the planning model) and
   record every episode into replay; the learner refines the planning model on demonstrations
   plus experience and publishes each version through the object store; the PolicyServer picks
   it up between batches; the evaluator measures success on fixed initial states (with and
   without planning). Metrics go to W&B and ``metrics.jsonl``; ``success_rate.png`` is redrawn.
Ctrl-C or ``ray job stop`` ends the current step, saves a final learner checkpoint and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import ray  # noqa: E402

from actors.env_process import EnvConfig  # noqa: E402
from actors.env_runner import EnvRunner, EpisodeResult, RunnerConfig  # noqa: E402
from actors.evaluator import EvalConfig, evaluate  # noqa: E402
from actors.policy_server import PolicyServer, PolicySpec  # noqa: E402
from cosmos_policy.checkpoint import save_checkpoint  # noqa: E402
from cosmos_policy.codec import NormalizationStats  # noqa: E402
from cosmos_policy.config import load_model_config  # noqa: E402
from cosmos_policy.data.episode_file import read_episode, write_episode  # noqa: E402
from cosmos_policy.data.statistics import compute_statistics  # noqa: E402
from cosmos_policy.episode import Episode  # noqa: E402
from cosmos_policy.errors import ConfigError  # noqa: E402
from cosmos_policy.layout import load_layout  # noqa: E402
from cosmos_policy.model import CosmosPolicyModel  # noqa: E402
from cosmos_policy.text import TextEmbeddingCache  # noqa: E402
from launch.experiment import Experiment, load_experiment  # noqa: E402
from launch.monitor import Monitor, say  # noqa: E402
from launch.offline import source_kwargs, split_validation, text_cache, validation_batches  # noqa: E402
from launch.sources import EpisodeSource, ReplaySource  # noqa: E402
from learner.group import LearnerGroup, PublishConfig  # noqa: E402


class Stop(Exception):
    """Ctrl-C or a job stop (SIGTERM): finish cleanly with a final checkpoint."""


# ---- run directory state ---------------------------------------------------------------------
class RunState:
    """``<run_dir>/state.json``: which phases are done and where their outputs are (written atomically)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "state.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, **values: Any) -> None:
        self.data.update(values)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


# ---- phase 1: demonstrations ---------------------------------------------------------------
@ray.remote(num_cpus=1)
def _expert_demos(n: int, success_rate: float, seed: int, env_kwargs: dict[str, Any]) -> list[Episode]:
    from actors.envs.lift import make_demonstrations

    return make_demonstrations(n, success_rate, seed, image_size=int(env_kwargs.get("image_size", 64)),
                               max_steps=int(env_kwargs.get("max_steps", 100)))


def demonstrations(cfg: Experiment, run_dir: Path, state: RunState, monitor: Monitor) -> list[Episode]:
    """The demonstrations: read back from the run directory, or made / read once and written there."""
    demo_dir = run_dir / "demos"
    if state.get("demos_done"):
        return [read_episode(p) for p in sorted(demo_dir.glob("*.hdf5"))]
    if cfg.demos.source == "none":
        return []
    start = time.time()
    if cfg.demos.source == "expert":
        workers = max(1, min(cfg.online.runners, cfg.demos.episodes))
        # Each worker makes its own share with a distinct seed; the expert's outcomes are exact per share.
        shares = [cfg.demos.episodes // workers + (i < cfg.demos.episodes % workers) for i in range(workers)]
        refs = [_expert_demos.remote(n, cfg.demos.expert_success_rate, cfg.demos.seed * 1000 + i, dict(cfg.env.kwargs))
                for i, n in enumerate(shares) if n]
        episodes = []
        while refs:
            done, refs = ray.wait(refs, num_returns=1)
            episodes += ray.get(done[0])
            monitor.progress("demonstrations (scripted expert)", len(episodes), cfg.demos.episodes)
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


# ---- phase 2: offline training ---------------------------------------------------------------
def offline(cfg: Experiment, run_dir: Path, state: RunState, monitor: Monitor, demos: list[Episode], stats: NormalizationStats,
            text: TextEmbeddingCache) -> tuple[str, str]:
    """Train (or take) the policy and the planning model; returns their checkpoint directories."""
    ckpt_dir = run_dir / "checkpoints"
    policy_ckpt = cfg.model.checkpoint or state.get("policy_checkpoint")
    if policy_ckpt is None:
        init = save_checkpoint(ckpt_dir / "init", CosmosPolicyModel.build(load_model_config(cfg.model.size), load_layout(cfg.model.layout),
                                                                          seed=cfg.seed), stats=stats, text=text)
        train, val = split_validation(cfg, demos)
        policy_ckpt = train_policy(cfg, run_dir, monitor, str(init), train, val, stats, text)
        state.set(policy_checkpoint=policy_ckpt)
    planning_ckpt = cfg.model.planning_checkpoint or state.get("planning_checkpoint")
    if planning_ckpt is None:
        planning_ckpt = train_planning(cfg, run_dir, monitor, policy_ckpt, demos, stats, text)
        state.set(planning_checkpoint=planning_ckpt)
    return str(policy_ckpt), str(planning_ckpt)


def _group(cfg: Experiment, learner_cfg: Any, source: Any, publish: PublishConfig | None = None) -> LearnerGroup:
    return LearnerGroup(learner_cfg, source, world_size=cfg.world_size, gpus_per_worker=cfg.gpus_per_worker, cpus_per_worker=cfg.cpus_per_worker,
                        publish_cfg=publish)


def _log_learner(monitor: Monitor, phase: str, rows: list[dict[str, float]]) -> dict[str, float]:
    """Average a chunk of learner steps into one record."""
    if not rows:
        return {}
    keys = {k for r in rows for k in r}
    avg = {k: float(np.nanmean([r[k] for r in rows if k in r and r[k] is not None])) for k in keys}
    avg["step"] = rows[-1]["step"]
    monitor.log("learner", {"phase": phase, **{("learner/step" if k == "step" else k): v for k, v in avg.items()}})
    return avg


def validation_loss(group: LearnerGroup, batches: list[Any]) -> float:
    """Mean loss over fixed held-out batches with fixed noise (comparable between calls)."""
    worker = group.workers[0]
    return float(np.mean(ray.get([worker.evaluate.remote(b, seed=i) for i, b in enumerate(batches)])))


def train_policy(cfg: Experiment, run_dir: Path, monitor: Monitor, init: str, train: list[Episode], val: list[Episode],
                 stats: NormalizationStats, text: TextEmbeddingCache) -> str:
    """The policy on demonstrations alone, until the held-out loss stops improving (or the step budget)."""
    off = cfg.offline
    out = run_dir / "checkpoints" / "policy"
    source = EpisodeSource(train, mixture=cfg.mixture("policy"), **source_kwargs(cfg, stats, text, off.batch))
    group = _group(cfg, cfg.learner_config(str(run_dir / "learner" / "policy_offline"), online=False, init_checkpoint=init), source)
    val_batches = validation_batches(cfg, stats, text, val)
    best, bad, exported = float("inf"), 0, False
    try:
        while group.step() < off.policy_steps:
            n = min(off.validate_every, off.policy_steps - group.step())
            rows: list[dict[str, float]] = []
            group.train(n, chunk=min(n, 50), on_metrics=lambda r: (rows.extend(r), monitor.progress("policy training", rows[-1]["step"], off.policy_steps,
                                                                                                   f"loss {rows[-1]['loss']:.3f}")))
            _log_learner(monitor, "policy_offline", rows)
            if not val_batches:
                continue
            loss = validation_loss(group, val_batches)
            monitor.log("validation", {"phase": "policy_offline", "learner/step": group.step(), "val_loss": loss, "best": min(best, loss)})
            if loss < best - 1e-4:
                best, bad = loss, 0
                group.export(str(out))
                exported = True
            else:
                bad += 1
                if bad >= off.patience:
                    say(f"policy: held-out loss stopped improving at {best:.4f}; stopping at step {group.step()}")
                    break
        if not exported:
            group.export(str(out))
    finally:
        group.stop()
    return str(out)


def train_planning(cfg: Experiment, run_dir: Path, monitor: Monitor, policy_ckpt: str, demos: list[Episode], stats: NormalizationStats,
                   text: TextEmbeddingCache) -> str:
    """The planning model starts from the policy's weights and learns dynamics and values on the planning mixture."""
    out = run_dir / "checkpoints" / "planning"
    steps = cfg.offline.planning_steps
    source = EpisodeSource(demos, mixture=cfg.mixture("planning"), **source_kwargs(cfg, stats, text, cfg.offline.batch))
    group = _group(cfg, cfg.learner_config(str(run_dir / "learner" / "planning_offline"), online=False, init_checkpoint=policy_ckpt,
                                           steps=max(1, steps)), source)
    try:
        done = 0
        while done < steps:
            rows: list[dict[str, float]] = []
            n = min(100, steps - done)
            group.train(n, chunk=min(n, 50), on_metrics=rows.extend)
            done += n
            _log_learner(monitor, "planning_offline", rows)
            monitor.progress("planning model training", done, steps, f"loss {rows[-1]['loss']:.3f}")
        group.export(str(out))
    finally:
        group.stop()
    return str(out)


# ---- phase 3: online rounds --------------------------------------------------------------------
def collection_jobs(cfg: Experiment, tasks: list[str], round_: int) -> list[tuple[str, int, int | None]]:
    """A round's episodes as (task, seed, branch): fresh seeds per round; with ``online.branch_first_query``
    each seed (one initial state) once per first-query candidate, else branch None (the planner chooses)."""
    from actors.envs.lift import episode_seed

    n = cfg.online.episodes_per_round
    if cfg.online.branch_first_query:
        branches = cfg.planner_config().num_candidates
        return [(tasks[i % len(tasks)], episode_seed(cfg.seed * 7919 + round_, i), c) for i in range(n // branches) for c in range(branches)]
    return [(tasks[i % len(tasks)], episode_seed(cfg.seed * 7919 + round_, i), None) for i in range(n)]


def collect(runners: list[Any], cfg: Experiment, tasks: list[str], round_: int, monitor: Monitor) -> list[EpisodeResult]:
    """``episodes_per_round`` episodes with fresh seeds, spread over the runners as they come free (in branches
    of every first-query candidate per seed with ``online.branch_first_query``)."""
    jobs = collection_jobs(cfg, tasks, round_)
    pending: dict[Any, Any] = {}
    free = list(runners)
    results: list[EpisodeResult] = []
    while jobs or pending:
        while free and jobs:
            runner = free.pop()
            task, seed, branch = jobs.pop(0)
            meta = {"round": round_, **({"branch": branch} if branch is not None else {})}
            pending[runner.run.remote(task, seed, None, meta, None, None, branch)] = runner
        done, _ = ray.wait(list(pending), num_returns=1)
        free.append(pending.pop(done[0]))
        results.append(ray.get(done[0]))
        if len(results) % max(1, len(runners)) == 0 or not (jobs or pending):
            monitor.progress(f"round {round_}: collecting", len(results), cfg.online.episodes_per_round)
    return results


def calibration(results: list[EpisodeResult]) -> dict[str, float]:
    """How the planner's predicted values relate to what happened (value in [0, 1] vs success)."""
    rows = [(float(np.mean(r.predicted_values)), float(r.success)) for r in results if r.predicted_values and not r.interrupted]
    if not rows:
        return {}
    pred, real = np.array(rows).T
    out = {"value_mean": float(pred.mean()), "value_brier": float(np.mean((pred - real) ** 2))}
    if real.min() != real.max():
        out["value_if_success"] = float(pred[real == 1].mean())
        out["value_if_failure"] = float(pred[real == 0].mean())
        if pred.std() > 0:
            out["value_success_corr"] = float(np.corrcoef(pred, real)[0, 1])
    return out


def run_eval(runners: list[Any], cfg: Experiment, tasks: list[str], plan: bool) -> dict[str, Any]:
    return evaluate(runners, EvalConfig(tasks=tasks, trials=cfg.eval.trials, seeds=list(cfg.eval.seeds)), suite=cfg.env.name,
                    plan=plan, record=False)


def online(cfg: Experiment, run_dir: Path, state: RunState, monitor: Monitor, demos: list[Episode], stats: NormalizationStats,
           text: TextEmbeddingCache, policy_ckpt: str, planning_ckpt: str, stopping: dict[str, bool]) -> None:
    replay_name = f"{cfg.name}-replay"
    registry = f"{cfg.name}-weights"
    replay_cfg = cfg.replay_config(str(run_dir / "replay"))
    from replay.service import make_replay

    replay = make_replay(replay_cfg, name=replay_name, seed=cfg.seed)
    if not state.get("demos_in_replay"):
        for ep in demos:
            replay.insert("demos", ep)
        state.set(demos_in_replay=True)
    gpu = 1 if (cfg.model.device == "cuda" or (cfg.model.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)) else 0
    # A resumed job serves the newest weights it exported, not the offline ones.
    planning_now = state.get("planning_latest") or planning_ckpt
    policy_now = state.get("policy_latest") or policy_ckpt
    spec = PolicySpec(checkpoint=policy_now, planning_checkpoint=planning_now, policy=cfg.policy_config(), planner=cfg.planner_config(),
                      device="cuda" if gpu else "cpu", dtype="bfloat16" if gpu else None, text_encoder=cfg.model.text_encoder)
    version0 = int(state.get("planning_version", 0))
    policy_version = int(state.get("policy_version", 0))
    servers = [PolicyServer.options(num_cpus=0 if gpu else 1, num_gpus=gpu).remote(spec, cfg.server_config(), policy_version, version0)
               for _ in range(cfg.online.servers)]
    ray.get([s.set_registry.remote(registry) for s in servers])
    runner_cfg = RunnerConfig(env=cfg.env_config(), execute=cfg.env.execute, plan=cfg.online.plan, record=True, max_steps=cfg.env.max_steps,
                              plan_queries=cfg.env.plan_queries)
    runners = [EnvRunner.options(num_cpus=1).remote(runner_cfg, servers[i % len(servers)], replay_cfg, replay_name)
               for i in range(cfg.online.runners)]
    tasks = cfg.env.tasks or ray.get(runners[0].tasks.remote())
    publish = PublishConfig(every=cfg.online.publish_every, target="planning", registry=registry)
    source = ReplaySource(replay_cfg, replay_name, mixture=cfg.mixture("planning"), **source_kwargs(cfg, stats, text, cfg.online.batch))
    group = _group(cfg, cfg.learner_config(str(run_dir / "learner" / "planning_online"), online=True, init_checkpoint=planning_ckpt), source,
                   publish)
    policy_group = policy_learner(cfg, run_dir, replay_cfg, replay_name, registry, stats, text, policy_ckpt) if cfg.online.refine_policy else None
    try:
        start_round = int(state.get("round", 0))
        if start_round == 0 and cfg.eval.at_start and not state.get("eval0_done"):
            evaluate_round(cfg, runners, tasks, monitor, 0, version0, policy_version)
            state.set(eval0_done=True)
        for round_ in range(start_round + 1, cfg.online.rounds + 1):
            if stopping["stop"]:
                raise Stop()
            t0 = time.time()
            results = collect(runners, cfg, tasks, round_, monitor)
            t1 = time.time()
            ok = [r for r in results if not r.interrupted]
            steps = sum(r.steps for r in results)
            rstats = replay.stats()
            monitor.log("collect", {"round": round_, "episodes": len(results), "interrupted": len(results) - len(ok),
                                    "success_rate": float(np.mean([r.success for r in ok])) if ok else 0.0,
                                    "env_steps": steps, "env_steps_per_s": steps / max(t1 - t0, 1e-9),
                                    "episodes_per_s": len(results) / max(t1 - t0, 1e-9),
                                    "inference_s_per_query": _server_latency(servers),
                                    **{f"replay_items/{t}": s.get("items", 0) for t, s in rstats.items()},
                                    **{f"calibration/{k}": v for k, v in calibration(ok).items()}})
            if stopping["stop"]:
                raise Stop()
            rows: list[dict[str, float]] = []
            if cfg.online.refine_steps:
                group.train(cfg.online.refine_steps, chunk=cfg.online.publish_every, on_metrics=lambda r: (
                    rows.extend(r), monitor.progress(f"round {round_}: refining", len(rows), cfg.online.refine_steps)),
                    should_stop=lambda: stopping["stop"])
                _log_learner(monitor, "planning_online", rows)
            if stopping["stop"]:  # the round is not recorded: a restart collects it again from the saved learner
                raise Stop()
            # Every round ends on a published version (the last step may fall between publications).
            version = int(rows[-1]["published_version"]) if rows and "published_version" in rows[-1] else group.publish()
            if policy_group is not None:
                policy_version = refine_policy(cfg, policy_group, monitor, round_, stopping)
            wait_for_version(servers, version)
            latest = group.export(str(run_dir / "checkpoints" / "planning_latest"))
            progress: dict[str, Any] = dict(round=round_, planning_version=version, planning_latest=latest)
            if policy_group is not None:
                wait_for_version(servers, policy_version, target="policy")
                progress.update(policy_version=policy_version, policy_latest=policy_group.export(str(run_dir / "checkpoints" / "policy_latest")))
            evaluate_round(cfg, runners, tasks, monitor, round_, version, policy_version)
            group.save()
            if policy_group is not None:
                policy_group.save()
            replay.checkpoint()
            state.set(**progress)
            monitor.log("round", {"round": round_, "weight_version": version, "policy_version": policy_version, "seconds": time.time() - t0})
            if cfg.online.budget_s and monitor.elapsed() > cfg.online.budget_s:
                say(f"time budget of {cfg.online.budget_s:.0f} s reached after round {round_}")
                break
    except Stop:
        say("stopping: saving a final learner checkpoint")
        group.save()
        if policy_group is not None:
            policy_group.save()
        replay.checkpoint()
        raise
    finally:
        for r in runners:
            ray.kill(r)
        for s in servers:
            ray.kill(s)
        group.stop()
        if policy_group is not None:
            policy_group.stop()


def policy_learner(cfg: Experiment, run_dir: Path, replay_cfg: Any, replay_name: str, registry: str, stats: NormalizationStats,
                   text: TextEmbeddingCache, policy_ckpt: str) -> LearnerGroup:
    """The acting policy's own learner (``online.refine_policy``): a second engine beside the planning
    model's, from the policy's weights, on demonstrations plus successful experience, publishing
    the ``policy`` target. Its own checkpoint directory makes a restarted job resume it too."""
    source = ReplaySource(replay_cfg, replay_name, mixture=cfg.mixture("policy_online"), **source_kwargs(cfg, stats, text, cfg.online.batch))
    steps = cfg.online.policy_refine_steps * max(1, cfg.online.rounds)
    learner_cfg = cfg.learner_config(str(run_dir / "learner" / "policy_online"), online=True, init_checkpoint=policy_ckpt, steps=steps,
                                     lr=cfg.online.policy_lr)
    return _group(cfg, learner_cfg, source, PublishConfig(every=cfg.online.publish_every, target="policy", registry=registry))


def refine_policy(cfg: Experiment, group: LearnerGroup, monitor: Monitor, round_: int, stopping: dict[str, bool]) -> int:
    """One round's policy refinement; returns the policy version it ends on (published)."""
    rows: list[dict[str, float]] = []
    steps = cfg.online.policy_refine_steps
    group.train(steps, chunk=cfg.online.publish_every,
                on_metrics=lambda r: (rows.extend(r), monitor.progress(f"round {round_}: refining the policy", len(rows), steps)),
                should_stop=lambda: stopping["stop"])
    _log_learner(monitor, "policy_online", rows)
    if stopping["stop"]:
        raise Stop()
    return int(rows[-1]["published_version"]) if rows and "published_version" in rows[-1] else group.publish()


def _server_latency(servers: list[Any]) -> float:
    """Seconds per served batch, over all PolicyServers."""
    stats = ray.get([s.stats.remote() for s in servers])
    return sum(s["busy_s"] for s in stats) / max(1, sum(s["batches"] for s in stats))


def wait_for_version(servers: list[Any], version: int, timeout_s: float = 120.0, target: str = "planning") -> None:
    """Block until every PolicyServer serves ``target`` weights ``version`` (each polls the registry)."""
    deadline = time.time() + timeout_s
    while True:
        served = [v.get(target) for v in ray.get([s.versions.remote() for s in servers])]
        if all(v == version for v in served):
            return
        if time.time() > deadline:
            raise TimeoutError(f"PolicyServers did not all pick up {target} weights v{version} within {timeout_s:.0f} s (serving {served})")
        time.sleep(0.2)


def evaluate_round(cfg: Experiment, runners: list[Any], tasks: list[str], monitor: Monitor, round_: int, version: int,
                   policy_version: int = 0) -> dict[str, Any]:
    t0 = time.time()
    rep = run_eval(runners, cfg, tasks, plan=cfg.eval.plan)
    record: dict[str, Any] = {"round": round_, "weight_version": version, "policy_version": policy_version,
                              "success_rate": rep["success_rate"], "episodes": rep["episodes"],
                              "planning": cfg.eval.plan, **{f"task/{t}": row["success_rate"] for t, row in rep["tasks"].items()},
                              **{f"calibration/{k}": v for k, v in calibration([_as_result(e) for e in rep["episodes_detail"]]).items()}}
    if cfg.eval.also_without_planning and cfg.eval.plan:
        rep2 = run_eval(runners, cfg, tasks, plan=False)
        record["success_rate_no_plan"] = rep2["success_rate"]
    record["seconds"] = time.time() - t0
    monitor.log("eval", record)
    monitor.plot()
    say(f"round {round_}: success {100 * rep['success_rate']:.1f} % with planning (weight version {version})"
        + (f", {100 * record['success_rate_no_plan']:.1f} % policy alone" if "success_rate_no_plan" in record else ""))
    return record


def _as_result(row: dict[str, Any]) -> EpisodeResult:
    keys = EpisodeResult.__dataclass_fields__
    return EpisodeResult(**{k: v for k, v in row.items() if k in keys})


# ---- entry point -----------------------------------------------------------------------------
def connect(cfg: Experiment) -> None:
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")  # set for drivers of `ray job submit`
    if address:
        ray.init(address=address, namespace=cfg.ray.namespace, log_to_driver=True)
        return
    learners = 2 if cfg.online.refine_policy else 1  # the planning model's learner, and the policy's
    need = cfg.online.runners + cfg.online.servers + learners * int(np.ceil(cfg.world_size * cfg.cpus_per_worker)) + 1
    extra: dict[str, Any] = {}
    if cfg.ray.object_store_gb:
        extra["object_store_memory"] = int(cfg.ray.object_store_gb * 1e9)
    # address="local": a new cluster of our own, even where `ray start` or another job runs one on this
    # machine (a bare ray.init() would join that one and then refuse num_cpus).
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cfg.ray.num_cpus or need), include_dashboard=False, _node_ip_address="127.0.0.1",
             namespace=cfg.ray.namespace, log_to_driver=True, **extra)


def run(cfg: Experiment) -> dict[str, Any]:
    """The whole job for one experiment config; returns the last evaluation record."""
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    state = RunState(run_dir)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    stopping = {"stop": False}

    def on_signal(signum: int, frame: Any) -> None:
        if stopping["stop"]:
            raise KeyboardInterrupt
        stopping["stop"] = True
        say(f"signal {signum}: stopping after the current step (again to abort)")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    monitor = Monitor(run_dir, cfg.to_dict(), cfg.logging.wandb, cfg.logging.project, cfg.logging.entity, cfg.name)
    try:
        connect(cfg)
        say(f"run directory {run_dir}" + (" (resuming)" if state.data else ""))
        demos = demonstrations(cfg, run_dir, state, monitor)
        stats_path = run_dir / "dataset_statistics.json"
        if not stats_path.is_file():
            if not demos:
                raise ConfigError("demos: no demonstrations to compute normalization statistics from")
            compute_statistics(demos).save(stats_path)
        stats = NormalizationStats.load(stats_path)
        instructions = [e.instruction for e in demos] + env_instructions(cfg)
        text = text_cache(cfg, instructions)
        policy_ckpt, planning_ckpt = offline(cfg, run_dir, state, monitor, demos, stats, text)
        if stopping["stop"]:
            raise Stop()
        online(cfg, run_dir, state, monitor, demos, stats, text, policy_ckpt, planning_ckpt, stopping)
        state.set(finished=True)
    except Stop:
        say("stopped; run again with the same run_dir to resume")
    finally:
        plot = monitor.plot()
        monitor.close()
        for s, h in previous.items():
            signal.signal(s, h)
        say(f"metrics: {monitor.path}")
        if plot:
            say(f"success-rate plot: {plot}")
        if monitor.wandb_dir:
            say(f"W&B files: {monitor.wandb_dir / 'wandb'} (offline runs: `wandb sync {monitor.wandb_dir / 'wandb'}/offline-run-*`)")
    evals = monitor.records("eval")
    return evals[-1] if evals else {}


def env_instructions(cfg: Experiment) -> list[str]:
    """The instructions of the environment's tasks (the built-in task's is fixed; others ask the env)."""
    if cfg.env.name == "lift":
        from actors.envs.lift import INSTRUCTION

        return [INSTRUCTION]
    from actors.env_process import EnvProcess

    env = EnvProcess(EnvConfig(cfg.env.name, dict(cfg.env.kwargs)))
    try:
        return [env.instruction(t) for t in (cfg.env.tasks or env.tasks())]
    finally:
        env.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Overrides are dotted keys of configs/experiment/*.yaml, e.g. online.rounds=5 eval.trials=50")
    parser.add_argument("--config", default="quickstart", help="configs/experiment/<name>.yaml or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    cfg = load_experiment(args.config, args.overrides)
    run(cfg)


if __name__ == "__main__":
    main()
