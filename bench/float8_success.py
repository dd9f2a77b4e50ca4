"""Float8 inference against the unconverted policy on the built-in task: the same episodes, success rates side by side.

``server.float8`` changes the actions by float8's rounding (``bench/inference_speed.py --float8 rowwise`` measures that
error on fixed observations). What a user needs to know is whether the task's success changes. This plays the same
episodes (``--initial-states`` x ``--seeds``: the task's fixed initial states, the same sampling seeds) once per recipe
in ``--recipes``, with the policy alone (no planning), and reports each success rate, the paired difference
(episodes that succeed under one recipe only) and McNemar's exact two-sided p-value on those discordant episodes.

The policy is a trained checkpoint: ``--checkpoint`` (an export's directory), or ``--run-dir``, a run of the main job
whose offline phase is done (the policy it trained from the demonstrations). The quickstart's offline phase alone:

    python launch/online.py online.rounds=0 run_dir=runs/quickstart_offline
    python bench/float8_success.py --run-dir runs/quickstart_offline [--initial-states 100 --seeds 0,1] [override ...]

The PolicyServer runs where ``bench/learning_curve.py``'s does (a CPU actor): the float8 products are
``torch._scaled_mm``'s CPU kernel, which quantizes exactly as the GPU's does and accumulates in float32. Writes
bench/results/float8_success.json (or ``--out``) after each recipe and prints one JSON line per recipe.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

OUT = ROOT / "bench" / "results" / "float8_success.json"


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """McNemar's exact two-sided p-value: under no difference each discordant episode is a fair coin."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(a: list[dict], b: list[dict]) -> dict[str, float | int]:
    """Two evaluations of the same episodes (matched by seed, task and trial) compared episode by episode."""
    key = lambda e: (e["seed"], e["task"], e["trial"])  # noqa: E731
    outcome_a, outcome_b = {key(e): bool(e["success"]) for e in a}, {key(e): bool(e["success"]) for e in b}
    if set(outcome_a) != set(outcome_b):
        raise SystemExit("the recipes' evaluations did not cover the same episodes")
    only_a = sum(outcome_a[k] and not outcome_b[k] for k in outcome_a)
    only_b = sum(outcome_b[k] and not outcome_a[k] for k in outcome_a)
    n = len(outcome_a)
    diff = (only_b - only_a) / n
    # The paired difference's standard error from the discordant counts.
    se = math.sqrt(max(only_a + only_b - n * diff ** 2, 0.0)) / n
    return {"episodes": n, "only_first": only_a, "only_second": only_b, "difference_points": round(100 * diff, 2),
            "difference_se_points": round(100 * se, 2), "mcnemar_exact_p": round(mcnemar_exact_p(only_a, only_b), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="quickstart", help="the experiment whose task, policy settings and runners are used")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="the policy: an export's directory (with its manifest.json)")
    source.add_argument("--run-dir", help="the policy: the one a run of the main job trained in its offline phase")
    parser.add_argument("--recipes", default="off,rowwise", help="server.float8 recipes, comma-separated; the first is the reference")
    parser.add_argument("--initial-states", type=int, default=100)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the experiment's keys")
    args = parser.parse_args(argv)

    from cosmos_policy.config import INFERENCE_FLOAT8
    from launch.config import load_experiment
    from launch.run_state import RunState

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if len(recipes) < 2 or any(r not in INFERENCE_FLOAT8 for r in recipes):
        parser.error(f"--recipes: expected two or more of {INFERENCE_FLOAT8}, got {args.recipes!r}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if args.initial_states < 1:
        parser.error(f"--initial-states: expected >= 1, got {args.initial_states}")
    if args.run_dir:
        checkpoint = RunState(Path(args.run_dir)).get_path("policy_checkpoint") if (Path(args.run_dir) / "state.json").is_file() else None
        if checkpoint is None:
            parser.error(f"--run-dir: {args.run_dir!r} has no trained policy (state.json names none: run its offline phase first)")
    else:
        checkpoint = args.checkpoint
    if not (Path(checkpoint) / "manifest.json").is_file():
        parser.error(f"--checkpoint: expected a checkpoint directory with a manifest.json, got {checkpoint!r}")
    checkpoint = str(Path(checkpoint).resolve())

    import ray

    from learning_curve import evaluate_with

    from launch.cluster import connect

    figures: dict = {"what": "success of the policy alone on the same episodes, per server.float8 recipe", "checkpoint": checkpoint,
                     "initial_states": args.initial_states, "eval_seeds": seeds, "recipes": {},
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores (the PolicyServer on the CPU)",
                     "date": time.strftime("%Y-%m-%d"), "command": "python bench/float8_success.py " + " ".join(sys.argv[1:] if argv is None else argv),
                     "complete": False}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    details: dict[str, list[dict]] = {}
    configs = {recipe: load_experiment(args.config, [*args.overrides, f"server.float8={recipe}"]) for recipe in recipes}
    connect(configs[recipes[0]])  # the job's own cluster: CPUs for its PolicyServer and every EnvRunner
    try:
        for recipe, cfg in configs.items():
            rep = evaluate_with(cfg, checkpoint, None, args.initial_states, seeds, plan=False)
            details[recipe] = rep["episodes_detail"]
            figures["recipes"][recipe] = {"success_rate": rep["success_rate"], "episodes": rep["episodes"], "eval_s": round(rep["seconds"], 1)}
            if recipe != recipes[0]:
                figures["recipes"][recipe]["against_" + recipes[0]] = paired(details[recipes[0]], rep["episodes_detail"])
            print(json.dumps({"recipe": recipe, **figures["recipes"][recipe]}), flush=True)
            out.write_text(json.dumps(figures, indent=1))
    finally:
        ray.shutdown()
    figures["complete"] = True
    out.write_text(json.dumps(figures, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
