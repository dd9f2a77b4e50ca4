"""The main job: demonstrations, offline training, then rounds of collect, refine, publish, evaluate.

    python launch/online.py                                  # the quickstart, on a local Ray cluster
    python launch/online.py --config libero_spatial online.rounds=10 online.runners=16
    ray job submit --working-dir . -- python launch/online.py --config libero_all ray.address=auto run_dir=/shared/runs/x

Every phase's completion is recorded in ``<run_dir>/state.json``; the same command again skips
what is done and resumes the learners from their checkpoints. Ctrl-C or ``ray job stop`` ends the
current step, saves a final learner checkpoint and exits. Metrics go to W&B and
``<run_dir>/metrics.jsonl``; ``<run_dir>/success_rate.png`` is redrawn after every evaluation.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cosmos_policy.contracts import Target  # noqa: E402
from cosmos_policy.errors import StorageFull, disk_full  # noqa: E402
from launch.cli import add_debug_flag, keys_epilog, run_command  # noqa: E402
from launch.config import check_inputs, load_experiment  # noqa: E402
from launch.experiment import Experiment  # noqa: E402
from launch.monitor import Monitor, say  # noqa: E402
from launch.run_state import RunState  # noqa: E402
from launch.signals import Stop, StopRequest  # noqa: E402

if TYPE_CHECKING:
    from cosmos_policy.codec import NormalizationStats
    from cosmos_policy.contracts import Episode
    from cosmos_policy.text import TextEmbeddingCache
    from launch.rounds import OnlineLearner, Rates
    from launch.services import Services


def online(cfg: Experiment, run_dir: Path, state: RunState, monitor: Monitor, demos: list[Episode], stats: NormalizationStats,
           text: TextEmbeddingCache, checkpoints: dict[Target, str], stop: StopRequest) -> None:
    """The rounds: collect with planning, refine on demonstrations plus experience, publish, evaluate; until
    online.rounds or online.budget_s, then the last evaluations. ``online.loop`` says whether collection and
    refinement run at once (asynchronous, ``asynchronous_rounds``) or take turns (``synchronous_rounds``).

    A resumed job serves the newest weights it exported (their versions are in the checkpoints) and
    its learners resume from their own checkpoints, or, where a run was moved without them, from those
    exports (same step, version and schedule; a fresh optimizer state).
    """
    from launch.offline import source_kwargs
    from launch.phases import in_background
    from launch.promotion import Promotion
    from launch.robots import start_gateway, write_job_file
    from launch.rounds import OnlineLearner, Rates, evaluate_round
    from launch.services import Services

    latest = {t: state.get_path(f"{t.value}_latest") or checkpoints[t] for t in Target}
    served = dict(latest)
    if cfg.promotion.enabled:  # the actors are served what was promoted, not the learners' newest candidates
        served = {t: str(Promotion.promoted_export(run_dir / "checkpoints", t.value) or checkpoints[t]) for t in Target}
    services = Services.start(cfg, served[Target.POLICY], served[Target.PLANNING])
    gateway = None
    if not state.get("demos_in_replay"):
        state.set(demos_in_replay=services.insert_demos(demos))
    targets = [Target.PLANNING] + ([Target.POLICY] if cfg.online.refine_policy else [])
    kwargs = source_kwargs(cfg, stats, text, cfg.online.batch)
    # Side by side: each learner's start (its processes, model, DeepSpeed, data) is independent of the other's.
    starting = [in_background(f"online-{t.value}-learner", OnlineLearner.start, cfg, run_dir, services, t, latest[t], kwargs,
                              bool(state.get(f"{t.value}_latest"))) for t in targets]
    learners = [future.result() for future in starting]
    if cfg.promotion.enabled:
        services.promotion = start_promotion(cfg, run_dir, monitor, services, [t.target.value for t in learners])
    versions = services.versions()
    rates = Rates(monitor, cfg.logging.rates_every_s)
    try:
        services.start_robots(cfg)
        gateway = start_gateway(cfg, services)
        write_job_file(cfg, run_dir, services=True, gateway_port=None if gateway is None else gateway.port)
        say(f"robots may join this job: `python launch/robot.py --job {run_dir} --robot <config> --instruction <...>` "
            f"on a node whose `ray start` offers the resource robot:<id>")
        if state.get("round", 0) == 0 and cfg.eval.at_start and not state.get("eval0_done"):
            evaluate_round(cfg, services, monitor, 0, versions, last=cfg.online.rounds == 0)
            state.set(eval0_done=True)
        if not state.get("last_round"):
            rounds = asynchronous_rounds if cfg.online.loop == "asynchronous" else synchronous_rounds
            rounds(cfg, run_dir, state, monitor, services, learners, versions, rates, stop)
    except Stop:
        say("stopping: saving a final learner checkpoint")
        for learner in learners:
            learner.group.save()
        services.replay.checkpoint()
        raise
    finally:
        rates.close()
        if gateway is not None:
            gateway.stop()
        services.stop()
        for learner in learners:
            learner.group.stop()


def start_promotion(cfg: Experiment, run_dir: Path, monitor: Monitor, services: Services, targets: list[str]) -> Any:
    """The promotion gate over the job's registry, its own PolicyServer and EnvRunners (``launch.promotion``); the
    weights served now become the first promoted version."""
    from launch.promotion import Promotion, PromotionConfig

    p = cfg.promotion
    config = PromotionConfig(states=p.states, tolerance=p.tolerance, live_window=p.live_window, live_tolerance=p.live_tolerance,
                             plan=cfg.eval.plan, seed=cfg.seed)
    promotion = Promotion(config, services.weights, services.gate_server, services.gate_runners, services.tasks, log=monitor.log,
                          keep=run_dir / "checkpoints", say=say)
    promotion.begin(targets)
    return promotion


def gate_round(services: Services, run_dir: Path, round_: int, done: dict[str, int], paths: dict[str, str | None]) -> dict[str, int]:
    """The round's candidates through the promotion gate (when on); returns the versions the servers are to serve."""
    if services.promotion is None:
        return done
    services.promotion.gate(done, round_, paths)
    (run_dir / "versions.json").write_text(json.dumps(services.promotion.table(), indent=1))
    return {**done, **services.promotion.served}


def end_round(cfg: Experiment, run_dir: Path, state: RunState, monitor: Monitor, services: Services, learners: list[OnlineLearner],
              round_: int, versions: dict[str, int | None], exported: dict[str, str], last: bool, seconds: float,
              alone: bool = True) -> None:
    """A round's end in either loop: its evaluations (the fresh states' too after the last), checkpoints, the record.
    ``alone``: nothing is collected beside the evaluation (``evaluate_round``'s)."""
    from launch.robots import log_round
    from launch.rounds import evaluate_round, save_round

    if last and services.robots is not None:  # the last evaluations have the PolicyServers to themselves too
        services.robots.stop("the job's last round")
        services.robots = None
    evaluate_round(cfg, services, monitor, round_, versions, last=last, alone=alone or last)
    if last and cfg.eval.fresh_trials:
        evaluate_round(cfg, services, monitor, round_, versions, last=True, fresh=True)
    save_round(services, learners, monitor, round_, versions.get("policy"))
    log_round(services.hub, monitor, round_)  # the robots' episodes of the round, the job's own and those that joined
    if services.robots is not None:
        services.robots.new_round()
    state.set(round=round_, last_round=last, **exported)
    monitor.log("round", {"round": round_, "weight_version": versions["planning"], "policy_version": versions["policy"], "seconds": seconds})


def synchronous_rounds(cfg: Experiment, run_dir: Path, state: RunState, monitor: Monitor, services: Services,
                       learners: list[OnlineLearner], versions: dict[str, int | None], rates: Rates, stop: StopRequest) -> None:
    """Each round collects, then refines and publishes, then evaluates: the actors and the learner take turns."""
    from launch.rounds import Budget, collect

    budget = Budget(cfg, monitor)
    for round_ in range(state.get("round", 0) + 1, cfg.online.rounds + 1):
        start = time.time()
        if stop:
            raise Stop()
        if state.get("collected", 0) < round_:  # a round cut after its collection is not collected twice
            if not collect(cfg, services, round_, monitor, stop=lambda: bool(stop), rates=rates):
                raise Stop()
            services.replay.checkpoint()
            state.set(collected=round_)
        done = {t.target.value: t.refine(round_, monitor, stop, rates) for t in learners}
        if services.promotion is not None:
            services.promotion.pin(done)
        paths = {t.target.value: t.export(run_dir) for t in learners}
        exported = {f"{target}_latest": state.inside(path) for target, path in paths.items()}
        versions.update(gate_round(services, run_dir, round_, done, paths))
        services.wait_for({t.target.value: versions[t.target.value] for t in learners})
        last = round_ == cfg.online.rounds or not budget.fits_another_round(time.time() - start)
        end_round(cfg, run_dir, state, monitor, services, learners, round_, versions, exported, last, time.time() - start)
        if last:
            return


def asynchronous_rounds(cfg: Experiment, run_dir: Path, state: RunState, monitor: Monitor, services: Services,
                        learners: list[OnlineLearner], versions: dict[str, int | None], rates: Rates, stop: StopRequest) -> None:
    """The EnvRunners collect round after round (``Collector``) while a thread refines round after round; this
    thread evaluates each round's last version as the learner hands it over.

    The PolicyServers hold the round's versions while it is evaluated (so the evaluation sees one version
    throughout, and the collection beside it acts on that version too), while the learner trains and publishes
    on; it waits only if it finishes the next round before that evaluation ends. The learner's last round
    (online.rounds) runs beside that round's collection, as every round does, and the last evaluations wait for
    both: the same env steps and learner steps as the synchronous loop, the final version refined on what replay
    holds meanwhile (all rounds but the last, and as much of the last as has arrived). A round the time budget
    makes the last instead halts the collection and the learner before the last evaluations. The last
    evaluations have the runners to themselves.
    """
    import queue

    from launch.phases import in_background
    from launch.rounds import Budget, Collector

    budget = Budget(cfg, monitor)
    first = state.get("round", 0) + 1
    halt, evaluating = threading.Event(), threading.Event()
    handed: queue.Queue = queue.Queue()
    stopping = lambda: bool(stop) or halt.is_set()  # noqa: E731
    collector = Collector(cfg, services, monitor, max(first, state.get("collected", 0) + 1), first - 1, lambda: bool(stop), rates,
                          lambda round_: state.set(collected=max(round_, state.get("collected", 0))))

    def learn() -> None:
        for round_ in range(first, cfg.online.rounds + 1):
            collector.wait_collected(round_ - cfg.online.collect_ahead, stopping)
            waited = collector.wait_experience(cfg.online.min_experience, round_, stopping)
            done = {t.target.value: t.refine(round_, monitor, stopping, rates, waited_s=waited) for t in learners}
            if services.promotion is not None:  # the gate plays them later, while this thread publishes the next round's
                services.promotion.pin(done)
            paths = {t.target.value: t.export(run_dir) for t in learners}
            exported = {f"{target}_latest": state.inside(path) for target, path in paths.items()}
            collector.finished_learning(round_)
            while evaluating.is_set():  # the round before is still evaluated on the versions the servers hold
                if stopping():
                    raise Stop()
                time.sleep(0.2)
            if services.promotion is None:  # (gated, the job's thread gates the round's versions first)
                services.wait_for(done)  # nothing newer is published meanwhile: this thread is the learner
                services.hold_weights(True)
            evaluating.set()
            handed.put((round_, done, exported, paths))

    learning = in_background("learner", learn)
    start = time.time()
    try:
        for round_ in range(first, cfg.online.rounds + 1):
            while True:  # the learner's round, or its error, or a stop
                collector.check()
                if stop:
                    raise Stop()
                try:
                    _, done, exported, paths = handed.get(timeout=0.5)
                    break
                except queue.Empty:
                    if learning.done():
                        learning.result()  # raises what the learner raised
                        raise RuntimeError(f"the learner ended before round {round_}")
            if services.promotion is not None:  # the servers then hold what the gate leaves served while it is evaluated
                served = gate_round(services, run_dir, round_, done, paths)
                services.wait_for(served)
                services.hold_weights(True)
                done = served
            versions.update(done)
            last = round_ == cfg.online.rounds or not budget.fits_another_round(time.time() - start)
            if round_ == cfg.online.rounds:  # the whole budget of env steps is collected before the job ends
                collector.wait_collected(round_, lambda: bool(stop))
            if last:  # the last evaluations have the runners and the GPU to themselves
                halt.set()
                collector.halt()
            end_round(cfg, run_dir, state, monitor, services, learners, round_, versions, exported, last, time.time() - start, alone=last)
            start = time.time()
            services.hold_weights(False)
            evaluating.clear()
            if last:
                break
    finally:
        halt.set()
        evaluating.clear()  # the learner, waiting for an evaluation, sees the halt
        collector.halt()
        failed = learning.exception(timeout=600)  # the learner stops at its next chunk
    if failed is not None and not isinstance(failed, Stop):
        raise failed
    collector.check()


def _load_job_modules() -> None:
    """Import what the job's phases need; a module that fails to import raises again where it is used."""
    import importlib

    for module in ("launch.phases", "launch.services", "launch.rounds"):
        try:
            importlib.import_module(module)
        except BaseException:  # noqa: BLE001 - reported by the import where it is used
            return


def run(cfg: Experiment) -> dict[str, Any]:
    """The whole job for one experiment config; returns the last evaluation record."""
    # Imported here, not at the top: a mistake in the command line is reported before Ray, torch and diffusers load.
    # They load (seconds) in a thread while this one starts the cluster, whose processes start on the other cores.
    loading = threading.Thread(target=_load_job_modules, name="imports", daemon=True)
    loading.start()
    from launch.cluster import cluster_gpus, connect
    from launch.robots import JOB_FILE, write_job_file

    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    state = RunState(run_dir)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    monitor = Monitor(run_dir, cfg.to_dict(), cfg.logging.wandb, cfg.logging.project, cfg.logging.entity, cfg.name)
    with StopRequest() as stop:
        try:
            connect(cfg)
            write_job_file(cfg, run_dir, services=False)  # robots may start joining: launch/robot.py waits for the services
            stop.install()  # over Ray's native SIGTERM handler (launch/signals.py)
            loading.join()
            from launch.phases import demonstrations, offline, statistics_and_text
            monitor.log("start", {"command": shlex.join(["python", *sys.argv]), "resuming": bool(state.data), "gpus": cluster_gpus()})
            say(f"run directory {run_dir}" + (" (resuming)" if state.data else ""))
            demos = demonstrations(cfg, run_dir, state, monitor)
            stats, text = statistics_and_text(cfg, run_dir, demos)
            policy, planning = offline(cfg, run_dir, state, monitor, demos, stats, text)
            if stop:
                raise Stop()
            online(cfg, run_dir, state, monitor, demos, stats, text, {Target.POLICY: policy, Target.PLANNING: planning}, stop)
            state.set(finished=True)
        except Stop:
            say("stopped; run again with the same run_dir to resume")
        finally:
            (run_dir / JOB_FILE).unlink(missing_ok=True)  # no robot may join a job that has ended
            plot = monitor.plot()
            monitor.close()
            say(f"metrics: {monitor.path}")
            if plot:
                say(f"success-rate plot: {plot}" + (f" (the online loop: {plot.parent / 'loop.png'})" if (plot.parent / "loop.png").is_file() else ""))
            if monitor.wandb_dir:
                say(f"W&B files: {monitor.wandb_dir / 'wandb'} (offline runs: `wandb sync {monitor.wandb_dir / 'wandb'}/offline-run-*`)")
    evals = monitor.records("eval")
    return evals[-1] if evals else {}


def build_parser() -> argparse.ArgumentParser:
    """The command line: every flag with its help, and (for the experiment's keys) each key with its default."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=keys_epilog("Overrides are key=value pairs of the experiment's keys (launch/experiment.py), "
                                                        "e.g. online.rounds=5 eval.trials=50."))
    parser.add_argument("--config", default="quickstart", help="configs/experiment/<name>.yaml or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the experiment's keys (listed below)")
    add_debug_flag(parser)
    return parser


def start(args: argparse.Namespace) -> None:
    cfg = load_experiment(args.config, args.overrides)
    check_inputs(cfg)  # every path it names, before Ray or W&B start
    try:
        run(cfg)
    except Exception as exc:
        full = disk_full(exc)
        if full is None:
            raise
        raise StorageFull(f"{kept(Path(cfg.run_dir).resolve())}. The disk filled up: {' '.join(str(full).split())[:300]}") from exc


def kept(run_dir: Path) -> str:
    """What a run directory keeps for a resume, in words (the full-disk error says it)."""
    state = RunState(run_dir).data if (run_dir / "state.json").is_file() else {}
    done = (f"round {state['round']} done" if state.get("round") else "the offline phases done" if state.get("planning_checkpoint")
            else "nothing finished yet")
    return (f"{run_dir} keeps what was saved before ({done}; the learners' last checkpoints; every acknowledged episode): "
            "free space there and run the same command again to resume")


def main(argv: list[str] | None = None) -> None:
    run_command(build_parser(), start, argv)


if __name__ == "__main__":
    main()
