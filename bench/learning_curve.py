"""Proof that the system learns from its own experience: the quickstart's recipe, then a large evaluation.

1. ``launch/online.py``'s whole job on the built-in task (``configs/experiment/learning_curve.yaml``,
   the quickstart recipe with the small model, plus the overrides given): scripted-expert demonstrations, the policy trained on them until the
   held-out loss stops improving, the planning model (world model + value) from the policy's
   weights on the demonstrations, then online rounds in which EnvRunners collect with best-of-N
   planning and the learner refines the planning model on demonstrations plus those episodes
   (and, with ``online.refine_policy=true``, the acting policy on demonstrations plus the
   successful episodes).
2. On the same fixed initial states (``--initial-states`` x ``--seeds`` episodes each):
   ``base_success``: the demonstration-trained policy alone;
   ``offline_planning_success``: planning with the planning model before any experience;
   ``final_success``: planning with the planning model (and policy) after the online rounds;
   ``final_policy_success`` (``--evals ...,final_policy``): that policy alone, without planning.
   ``gain_points`` = 100 x (final_success - base_success). Target: >= 15 over >= 200 episodes.

``--planning CKPT``: the ``final`` evaluation plans with this planning model instead of the job's
last one: a judge made from this run's own episodes outside the job, where the CPU machine is too
small for it (branching episodes of this run's policy collected and a 9.4 M-parameter judge
trained on a GPU host: ``research/learning_proof/gpu_branch_judge.sh`` did it at commit 6696f28,
``configs/experiment/learning_proof.yaml`` has the steps now; research/bench_history.md, "eighth
session"). With
``online.rounds=0`` the job stops after its offline phase (demonstrations, policy, planning model).

Writes bench/results/learning_curve.json (or --out) after each evaluation (``complete`` turns true
at the end) and prints one JSON line per evaluation. A run directory that exists is resumed, so a
second call goes straight to the evaluations.

    python bench/learning_curve.py [--initial-states 100 --seeds 0,1] [override ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402

from actors.env_process import EnvConfig  # noqa: E402
from actors.env_runner import EnvRunner, RunnerConfig  # noqa: E402
from actors.evaluator import EvalConfig, evaluate  # noqa: E402
from actors.policies import PolicySpec, ServerPolicy  # noqa: E402
from actors.policy_server import PolicyServer  # noqa: E402
from launch.config import load_experiment  # noqa: E402
from launch.online import run  # noqa: E402
from launch.run_state import RunState  # noqa: E402


def evaluate_with(cfg, policy_ckpt: str, planning_ckpt: str | None, initial_states: int, seeds: list[int], plan: bool) -> dict:
    """Success over ``initial_states`` x ``seeds`` episodes from the task's fixed initial states."""
    spec = PolicySpec(checkpoint=policy_ckpt, planning_checkpoint=planning_ckpt, policy=cfg.policy, planner=cfg.planner,
                      text_encoder=cfg.model.text_encoder)
    server = PolicyServer.options(num_cpus=1).remote(spec, cfg.server)
    kwargs = {**cfg.env.kwargs, "num_initial_states": initial_states}
    runner_cfg = RunnerConfig(env=EnvConfig(cfg.env.name, kwargs), execute=cfg.env.execute, plan=plan, record=False, max_steps=cfg.env.max_steps,
                              plan_queries=cfg.env.plan_queries)
    runners = [EnvRunner.options(num_cpus=1).remote(runner_cfg, ServerPolicy(server), ServerPolicy(server, plan=True))
               for _ in range(cfg.online.runners)]
    try:
        start = time.time()
        rep = evaluate(runners, EvalConfig(trials=initial_states, seeds=seeds), suite=cfg.env.name, plan=plan, record=False)
        rep["seconds"] = time.time() - start
        return rep
    finally:
        for r in runners:
            ray.kill(r)
        ray.kill(server)


def _run_wall_s(run_dir: Path) -> float | None:
    """Wall time at the job's last finished round, as its monitor recorded it (continues across resumes)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "round"' in line]
    return round(rows[-1]["wall_s"], 1) if rows else None


def _version(checkpoint: str) -> int:
    """The weight version a checkpoint was exported at (the learner writes it into the manifest)."""
    return int(json.loads((Path(checkpoint) / "manifest.json").read_text()).get("metadata", {}).get("version", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="learning_curve")
    parser.add_argument("--initial-states", type=int, default=100)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--evals", default="base,offline_planning,final", help="which evaluations, in order (comma-separated)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "learning_curve.json"))
    parser.add_argument("--planning", default=None, help="plan the final evaluation with this planning checkpoint (default: the job's last)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.planning is not None and not (Path(args.planning) / "manifest.json").is_file():
        raise SystemExit(f"--planning: expected a checkpoint directory with a manifest.json, got {args.planning!r}")
    overrides = ["run_dir=runs/learning_curve", "name=learning_curve", *args.overrides]
    cfg = load_experiment(args.config, overrides)
    start = time.time()
    run(cfg)
    train_s = time.time() - start
    state = RunState(Path(cfg.run_dir))
    seeds = [int(s) for s in args.seeds.split(",")]
    policy, planning_offline = state.get_path("policy_checkpoint"), state.get_path("planning_checkpoint")
    planning_final = str(Path(args.planning).resolve()) if args.planning else state.get_path("planning_latest") or planning_offline
    policy_final = state.get_path("policy_latest") or policy  # the refined policy, with online.refine_policy
    figures: dict = {
        "eval_seeds": seeds,
        "initial_states": args.initial_states,
        "experiment_seed": cfg.seed,
        "demo_episodes": cfg.demos.episodes,
        "online_rounds": state.get("round"),
        "online_episodes": cfg.online.episodes_per_round * int(state.get("round", 0)),
        "planning_weight_version": _version(planning_final),
        "policy_refined": policy_final != policy,
        "policy_weight_version": _version(policy_final),
        "this_call_run_s": round(train_s, 1),  # run(cfg) in this call (little when it resumed a finished run)
        "run_wall_s": _run_wall_s(Path(cfg.run_dir)),  # the whole job, from its own metrics (over resumes)
        "final_planning_checkpoint": planning_final,
        "final_planning_step": json.loads((Path(planning_final) / "manifest.json").read_text()).get("metadata", {}).get("step"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "command": "python bench/learning_curve.py " + " ".join(sys.argv[1:]),
        "complete": False,
        "config": cfg.to_dict(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Each evaluation is written as soon as it ends: a run cut short keeps what it measured.
    # (acting policy, planning model, plan?) per evaluation; final_policy: the final policy alone, so the
    # gain splits into what the refined policy brings and what planning adds on top of it.
    plans = {"base": (policy, planning_offline, False), "offline_planning": (policy, planning_offline, True),
             "final": (policy_final, planning_final, True), "final_policy": (policy_final, planning_final, False)}
    for name in args.evals.split(","):
        if name not in plans:
            raise SystemExit(f"--evals: expected some of {sorted(plans)}, got {name!r}")
        rep = evaluate_with(cfg, plans[name][0], plans[name][1], args.initial_states, seeds, plan=plans[name][2])
        figures[f"{name}_success"] = rep["success_rate"]
        figures[f"{name}_episodes"] = rep["episodes"]
        figures[f"{name}_eval_s"] = round(rep["seconds"], 1)
        print(json.dumps({f"{name}_success": rep["success_rate"], "episodes": rep["episodes"], "seconds": round(rep["seconds"], 1)}), flush=True)
        if "base_success" in figures and "final_success" in figures:
            figures["gain_points"] = round(100 * (figures["final_success"] - figures["base_success"]), 2)
        if "offline_planning_success" in figures and "final_success" in figures:
            figures["gain_points_from_experience"] = round(100 * (figures["final_success"] - figures["offline_planning_success"]), 2)
        if "final_policy_success" in figures and "final_success" in figures:
            figures["gain_points_from_planning"] = round(100 * (figures["final_success"] - figures["final_policy_success"]), 2)
        out.write_text(json.dumps(figures, indent=1))
    figures["complete"] = True
    out.write_text(json.dumps(figures, indent=1))
    print(json.dumps({k: v for k, v in figures.items() if k != "config"}), flush=True)
    print(f"wrote {out}")

if __name__ == "__main__":
    main()
