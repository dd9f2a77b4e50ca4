"""Evaluate a checkpoint with the published protocol, spread over EnvRunners on a Ray cluster.

LIBERO (default): four suites x 10 tasks x 50 trials from the tasks' fixed initial states,
seeds 195, 196, 197; a PolicyServer holds the model (on a GPU when there is one) and the
EnvRunners on CPUs query it. Writes eval.json (every episode) and eval.md (the table).

    python launch/evaluate.py --checkpoint checkpoints/libero \
        [--planning-checkpoint checkpoints/libero_planning --plan] \
        [--env libero --suites libero_spatial,libero_object,libero_goal,libero_10] \
        [--trials 50 --seeds 195,196,197 --runners 8 --out runs/eval] [--address auto]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.cli import add_debug_flag, run_command  # noqa: E402

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")


def check(args: argparse.Namespace) -> None:
    """Every argument the evaluation needs, checked before Ray starts; all problems in one error."""
    from cosmos_policy.errors import CheckpointError, ConfigError
    from cosmos_policy.manifest import read_manifest

    problems = []
    for flag, path in (("--checkpoint", args.checkpoint), ("--planning-checkpoint", args.planning_checkpoint)):
        if path:
            try:
                read_manifest(path)
            except CheckpointError as exc:
                problems.append(f"{flag}: {exc}")
    if args.plan and not args.planning_checkpoint:
        problems.append("--plan: needs --planning-checkpoint (the planning model judges the candidates)")
    if args.env == "libero":
        unknown = [s for s in args.suites.split(",") if s not in SUITES]
        if unknown:
            problems.append(f"--suites: unknown {unknown}; expected some of {list(SUITES)}")
    for flag, value in (("--trials", args.trials), ("--runners", args.runners), ("--steps", args.steps), ("--execute", args.execute)):
        if value < 1:
            problems.append(f"{flag}: expected a positive integer, got {value}")
    try:
        [int(s) for s in args.seeds.split(",")]
    except ValueError:
        problems.append(f"--seeds: expected a comma list of integers, got {args.seeds!r}")
    if problems:
        raise ConfigError("; ".join(problems))


def evaluate_checkpoint(args: argparse.Namespace) -> None:
    import ray

    from actors.config import ServerConfig
    from actors.env_process import EnvConfig
    from actors.env_runner import EnvRunner, RunnerConfig
    from actors.evaluator import EvalConfig, evaluate, table, write
    from actors.policies import PolicySpec, ServerPolicy
    from actors.policy_server import PolicyServer
    from cosmos_policy.config import PlannerConfig, PolicyConfig

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")  # our own, beside any other
    gpu = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    spec = PolicySpec(
        checkpoint=str(Path(args.checkpoint).resolve()),
        planning_checkpoint=str(Path(args.planning_checkpoint).resolve()) if args.planning_checkpoint else None,
        policy=PolicyConfig(action_steps=args.steps),
        planner=PlannerConfig(),
        device="cuda" if gpu else "cpu",
        dtype="bfloat16" if gpu else None,
    )
    server = PolicyServer.options(num_gpus=gpu, num_cpus=1).remote(spec, ServerConfig(max_batch=max(8, args.runners)))
    seeds = [int(s) for s in args.seeds.split(",")]
    reports = []
    for suite in args.suites.split(","):
        env_kwargs = {"suite": suite} if args.env == "libero" else {}
        config = RunnerConfig(env=EnvConfig(args.env, env_kwargs), execute=args.execute, plan=args.plan, record=False,
                              max_steps=args.max_steps)
        planner = ServerPolicy(server, plan=True) if args.planning_checkpoint else None
        runners = [EnvRunner.options(num_cpus=1).remote(config, ServerPolicy(server), planner) for _ in range(args.runners)]
        tasks = args.tasks.split(",") if args.tasks else None
        print(f"evaluating {suite}: {args.trials} trials x seeds {seeds} with {args.runners} runners", flush=True)

        def progress(done: int, total: int) -> None:
            if done % max(1, args.runners) == 0 or done == total:
                print(f"{suite}: {done}/{total} episodes", flush=True)

        reports.append(evaluate(runners, EvalConfig(tasks=tasks, trials=args.trials, seeds=seeds), suite=suite, on_result=progress))
        for r in runners:
            ray.kill(r)
    json_path, md_path = write(reports, args.out)
    print(table(reports))
    print(f"wrote {json_path} and {md_path}")


def build_parser() -> argparse.ArgumentParser:
    """The command line: every flag with its help, and (for the experiment's keys) each key with its default."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--checkpoint", required=True, help="the policy's checkpoint directory (our format; see README, real weights)")
    parser.add_argument("--planning-checkpoint", help="the planning model's checkpoint directory (needed by --plan)")
    parser.add_argument("--plan", action="store_true", help="best-of-N planning at every query")
    parser.add_argument("--env", default="libero", choices=["libero", "lift"], help="the simulator (default: libero)")
    parser.add_argument("--suites", default="libero_spatial,libero_object,libero_goal,libero_10",
                        help="comma-separated LIBERO suites (default: the four of the published protocol)")
    parser.add_argument("--tasks", help="comma-separated task names (default: every task of the suite)")
    parser.add_argument("--trials", type=int, default=50, help="trials per task and seed, from the fixed initial states (default: 50)")
    parser.add_argument("--seeds", default="195,196,197", help="comma-separated evaluation seeds (default: the protocol's 195,196,197)")
    parser.add_argument("--runners", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="EnvRunners, one simulator each (default: cores - 1)")
    parser.add_argument("--steps", type=int, default=5, help="denoising steps per action chunk (default: 5)")
    parser.add_argument("--execute", type=int, default=16, help="actions executed per query (default: 16, LIBERO's chunk)")
    parser.add_argument("--max-steps", type=int, help="cap an episode's length (quick runs; default: the suite's own)")
    parser.add_argument("--address", help="a Ray cluster to join (default: start a local one on 127.0.0.1)")
    parser.add_argument("--out", default="runs/eval", help="where eval.json and eval.md go (default: runs/eval)")
    add_debug_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    run_command(build_parser(), lambda args: (check(args), evaluate_checkpoint(args)), argv)


if __name__ == "__main__":
    main()
