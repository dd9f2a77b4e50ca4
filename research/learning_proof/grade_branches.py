"""Grade a judge on branching episode files: does it rank each state's candidates by their outcomes?

A branching collection (``launch/collect.py --branch-first-query`` or ``--branch-query K``) plays
every planner candidate of one state (same initial state, seed and leading candidates) to the end,
so its files are labels: candidate c of that state succeeded or not. This rebuilds the observation
at the branch point from the files (frames, proprio, instruction), lets the planner of
``--planning`` propose and score the candidates there with the query's seed, and compares its
scores with the outcomes, with no rollouts: a judge is graded on held-out states in a minute.
Figures (overall and per branch query):

    judge_pair_accuracy   over candidate pairs of one state with different outcomes: how often the
                          judge scores the succeeding one higher (0.5: chance)
    judge_success         the outcome of the candidate the judge picks
    policy_success        candidate 0's outcome (the policy's own sample)
    oracle_success        some candidate succeeds
    candidate_gap         the largest difference between the planner's candidates and the ones played
                          (the files' frames are JPEG-compressed; the candidates then differ a little)

    python bench/grade_branches.py --policy runs/learning_curve/checkpoints/policy --planning judge/planning \\
        planner.candidate_noise=0.1 planner.common_judge_seeds=true planner.value_kind=q_value \\
        planner.aggregation=mean 'planner.value_steps=[2,2,2,2]' 'planner.future_steps=[1]' \\
        --episodes runs/heldout_branches          # last: --episodes takes every word after it
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lift_planning import add_run_args, load  # noqa: E402

from cosmos_policy.episode import Episode  # noqa: E402
from cosmos_policy.policy import Observation  # noqa: E402

QUERY_SEED = 7919  # the EpisodeRunner's per-query seed stride


def branch_groups(episodes: list[Episode]) -> list[list[Episode]]:
    """The episodes of each branched state (same trial, seed and leading candidates), ordered by candidate;
    states with fewer than two played candidates carry no contrast and are left out."""
    groups: dict[tuple, list[Episode]] = defaultdict(list)
    for ep in episodes:
        path = ep.metadata.get("branch_candidates")
        if path is None and "candidate" in ep.metadata:  # files from before branch_candidates: first-query branching
            path = [ep.metadata["candidate"]]
        if path is None:
            raise SystemExit(f"--episodes: {ep.metadata.get('file', ep.episode_id)} is no branching episode (no branch_candidates)")
        groups[(ep.metadata.get("branch_of", ep.metadata.get("trial")), ep.seed, tuple(path[:-1]))].append(ep)
    return [sorted(g, key=lambda e: _path(e)[-1]) for _, g in sorted(groups.items(), key=lambda kv: str(kv[0])) if len(g) > 1]


def _path(ep: Episode) -> list[int]:
    return list(ep.metadata.get("branch_candidates") or [ep.metadata["candidate"]])


def branch_observation(ep: Episode) -> Observation:
    """What the policy saw at the episode's branch point, as the file holds it."""
    t = int(ep.metadata.get("branch_step", 0) or 0)
    return Observation(images={c: ep.frame(c, t) for c in ep.cameras}, proprio=np.asarray(ep.proprio[t]), instruction=ep.instruction)


def grade(planner: Any, groups: list[list[Episode]]) -> dict[str, Any]:
    """The judge's figures over ``groups`` (see the module docstring), overall and per branch query."""
    rows = []
    for group in groups:
        query = len(_path(group[0])) - 1
        plan = planner.plan(branch_observation(group[0]), seed=int(group[0].seed or 0) + QUERY_SEED * query)
        played = group[0].planner[query].candidate_actions
        labels = {_path(ep)[-1]: bool(ep.success) for ep in group}
        values = [float(v) for v in plan.candidate_values]
        pairs = [(values[i] > values[j]) + 0.5 * (values[i] == values[j]) for i in labels for j in labels if labels[i] and not labels[j]]
        rows.append({"query": query, "pairs": len(pairs), "wins": float(np.sum(pairs)) if pairs else 0.0,
                     "pick": labels.get(int(np.argmax(values))), "own": labels.get(0), "oracle": any(labels.values()),
                     "gap": float(np.abs(plan.candidate_actions - played).max()) if played is not None else None})

    def figures(part: list[dict]) -> dict[str, Any]:
        pairs = sum(r["pairs"] for r in part)
        picks = [r["pick"] for r in part if r["pick"] is not None]
        own = [r["own"] for r in part if r["own"] is not None]
        gaps = [r["gap"] for r in part if r["gap"] is not None]
        return {"states": len(part), "pairs": pairs, "judge_pair_accuracy": sum(r["wins"] for r in part) / pairs if pairs else None,
                "judge_success": float(np.mean(picks)) if picks else None, "policy_success": float(np.mean(own)) if own else None,
                "oracle_success": float(np.mean([r["oracle"] for r in part])), "candidate_gap": max(gaps) if gaps else None}

    out = figures(rows)
    out["per_query"] = {str(q): figures([r for r in rows if r["query"] == q]) for q in sorted({r["query"] for r in rows})}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser, "checkpoints/planning", "the judge to grade (relative to --run-dir, or absolute)")
    parser.add_argument("--episodes", nargs="+", required=True, help="branching episode files, folders or globs")
    parser.add_argument("overrides", nargs="*", help="experiment overrides (the planner's), e.g. planner.candidate_noise=0.1")
    args = parser.parse_args()
    from cosmos_policy.data.episode_file import read_episode
    from launch.train import episode_files

    _, _, planner, _, planning_ckpt = load(args, args.overrides)
    groups = branch_groups([read_episode(p) for p in episode_files(args.episodes)])
    if not groups:
        raise SystemExit(f"--episodes: no state with two or more played candidates in {args.episodes}")
    print(json.dumps({"planning_checkpoint": planning_ckpt, **grade(planner, groups)}), flush=True)


if __name__ == "__main__":
    main()
