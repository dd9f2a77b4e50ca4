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

import ray  # noqa: E402

from actors.env_process import EnvConfig  # noqa: E402
from actors.env_runner import EnvRunner, RunnerConfig  # noqa: E402
from actors.evaluator import EvalConfig, evaluate, table, write  # noqa: E402
from actors.policies import PolicySpec, ServerPolicy  # noqa: E402
from actors.policy_server import PolicyServer, ServerConfig  # noqa: E402
from cosmos_policy.planner import PlannerConfig  # noqa: E402
from cosmos_policy.policy import PolicyConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--planning-checkpoint")
    parser.add_argument("--plan", action="store_true", help="best-of-N planning at every query")
    parser.add_argument("--env", default="libero")
    parser.add_argument("--suites", default="libero_spatial,libero_object,libero_goal,libero_10")
    parser.add_argument("--tasks", help="comma-separated task names (default: all)")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seeds", default="195,196,197")
    parser.add_argument("--runners", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--steps", type=int, default=5, help="denoising steps per action chunk")
    parser.add_argument("--execute", type=int, default=16)
    parser.add_argument("--max-steps", type=int, help="cap episode length (quick runs)")
    parser.add_argument("--address", help="Ray cluster address (default: start a local one)")
    parser.add_argument("--out", default="runs/eval")
    args = parser.parse_args()
    if args.plan and not args.planning_checkpoint:
        parser.error("--plan needs --planning-checkpoint")

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
        reports.append(evaluate(runners, EvalConfig(tasks=tasks, trials=args.trials, seeds=seeds), suite=suite))
        for r in runners:
            ray.kill(r)
    json_path, md_path = write(reports, args.out)
    print(table(reports))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
