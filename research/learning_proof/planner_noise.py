"""How much of best-of-N planning's choice is signal: candidate spread against evaluation noise.

Best-of-N only helps when the planner's score of a candidate (world-model future, then the value
of that future, aggregated over the ensemble) differs between candidates *because the
candidates differ*. This script follows the planner on the built-in task from fixed initial
states and, at every query, scores
- the real candidates (the policy's N samples), and
- N copies of the first candidate, judged with the same seeds: any spread among those scores is
  pure evaluation noise (world-model and value sampling), since the candidates are identical.
Figures (printed and written to bench/results/planner_noise.json, or --out):
    candidate_action_std            mean over queries of the per-dimension std of the executed
                                    actions across candidates (dataset units)
    value_std_real_candidates       mean over queries of the std of the N candidates' scores
    value_std_identical_candidates  the same for N identical candidates (evaluation noise)
    noise_share                     identical / real: near 1 means the choice is made by noise
    chosen_not_first_share          how often the planner picked another candidate than the first

    python bench/planner_noise.py [--run-dir runs/learning_curve] [--planning checkpoints/planning_latest] [--trials 0,1,2,3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from lift_planning import add_run_args, load, write_figures  # noqa: E402

from cosmos_policy.layout import SampleKind  # noqa: E402
from cosmos_policy.planner import Planner  # noqa: E402


class IdenticalCandidates(Planner):
    """A planner whose N candidates are all copies of the policy's first sample (same judging seeds)."""

    def _sample(self, model, kind, text, clean, steps, seeds):  # type: ignore[override]
        out = super()._sample(model, kind, text, clean, steps, seeds)
        if kind is SampleKind.POLICY:
            n = self.config.num_candidates
            first = out.view(-1, n, *out.shape[1:])[:, :1]
            out = first.expand(-1, n, *out.shape[1:]).reshape(out.shape).clone()
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, "checkpoints/planning_latest")
    parser.add_argument("--trials", default="0,1,2,3", help="fixed initial states to start from")
    parser.add_argument("--queries", type=int, default=6, help="planner queries per episode at most")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "planner_noise.json"))
    parser.add_argument("overrides", nargs="*", help="experiment overrides, e.g. planner.future_steps=[1,1,1]")
    args = parser.parse_args()
    cfg, policy, planner, policy_ckpt, planning_ckpt = load(args, args.overrides)
    twin = IdenticalCandidates(policy, planner.planning, planner.config)

    from actors.envs.lift import LiftEnv

    kwargs = dict(cfg.env.kwargs)
    env = LiftEnv(image_size=int(kwargs.get("image_size", 64)), max_steps=int(kwargs.get("max_steps", 100)), num_initial_states=100)
    states = env.initial_states("lift")
    execute = cfg.env.execute
    spread, real_std, same_std, not_first, episodes = [], [], [], [], []
    for trial in (int(t) for t in args.trials.split(",")):
        obs = env.reset("lift", 0, states[trial])
        done, success, rows = False, False, []
        for q in range(args.queries):
            seed = 7919 * q  # the runners' per-query seeds
            plan = planner.plan(obs, seed=seed)
            same = twin.plan(obs, seed=seed)
            spread.append(float(plan.candidate_actions[:, :execute].std(0).mean()))
            real_std.append(float(plan.candidate_values.std()))
            same_std.append(float(same.candidate_values.std()))
            not_first.append(plan.chosen != 0)
            rows.append({"real": np.round(plan.candidate_values, 3).tolist(), "identical": np.round(same.candidate_values, 3).tolist(),
                         "chosen": plan.chosen})
            chunk = plan.output.actions[:execute]
            for i, action in enumerate(chunk):
                result = env.step(action, render=i == len(chunk) - 1)  # cameras only where the next query looks
                if result.done:
                    done, success = True, result.success
                    break
            if done:
                break
            obs = result.observation
        episodes.append({"trial": trial, "success_so_far": success, "queries": rows})
        print(json.dumps({"trial": trial, "queries": len(rows)}), flush=True)
    env.close()
    figures = {
        "candidate_action_std": float(np.mean(spread)),
        "value_std_real_candidates": float(np.mean(real_std)),
        "value_std_identical_candidates": float(np.mean(same_std)),
        "noise_share": float(np.mean(same_std) / max(np.mean(real_std), 1e-9)),
        "chosen_not_first_share": float(np.mean(not_first)),
        "queries": len(spread),
        "planner": cfg.to_dict()["planner"],
        "policy_checkpoint": policy_ckpt,
        "planning_checkpoint": planning_ckpt,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": "python bench/planner_noise.py " + " ".join(sys.argv[1:]),
        "episodes": episodes,
    }
    write_figures(figures, args.out, "episodes")


if __name__ == "__main__":
    main()
