"""The learning run's figures, written from its own metrics: the top level of bench/results/learning_curve.json.

    python bench/learning_curve_report.py runs/lift_learning --machine "1 NVIDIA H200, 16 host cores"

Reads ``<run_dir>/metrics.jsonl`` (what ``launch/online.py`` wrote, resumes included) and prints the
figures issue 23 asks for: success with planning at the last version against the policy alone at
version 0 on the same evaluation episodes, the same on initial states used for nothing else, every
version's success with and without planning, the experience collected, the run's GPU-minutes by
phase, and the gain per 1,000 experience episodes. Nothing is typed in by hand: every number is a
record of the run or arithmetic on records. Figures already in the file that did not come from a
run (the learning proof's side scripts) are kept under ``learning_proof``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "learning_curve.json"


def records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (the run directory of launch/online.py)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    return rows


def mcnemar(only_a: int, only_b: int) -> float | None:
    """McNemar's chi-square with continuity correction for paired outcomes (None without discordant pairs)."""
    n = only_a + only_b
    return None if n == 0 else (abs(only_a - only_b) - 1) ** 2 / n


def report(rows: list[dict[str, Any]], machine: str | None = None) -> dict[str, Any]:
    """The figures of one run (its records in order); raises SystemExit naming what is missing."""
    kinds = lambda k: [r for r in rows if r.get("kind") == k]  # noqa: E731
    evals, fresh, collects, starts = kinds("eval"), kinds("eval_fresh"), kinds("collect"), kinds("start")
    if not evals:
        raise SystemExit("metrics.jsonl: no eval records (the run has not evaluated yet)")
    first = next((e for e in evals if e.get("round") == 0), None)
    if first is None or not isinstance(first.get("success_rate_no_plan"), (int, float)):
        raise SystemExit("metrics.jsonl: no round-0 evaluation of the policy alone (eval.at_start and eval.also_without_planning)")
    last = evals[-1]
    if last["episodes"] != first["episodes"]:
        raise SystemExit(f"metrics.jsonl: the last evaluation has {last['episodes']} episodes, round 0's {first['episodes']}: "
                         "the run has not reached its last round")
    wall_s = max(r.get("wall_s", 0.0) for r in rows)
    gpus = max((float(s.get("gpus", 0)) for s in starts), default=0.0)
    experience = sum(int(c.get("episodes", 0)) - int(c.get("interrupted", 0)) for c in collects)
    gain = 100 * (last["success_rate"] - first["success_rate_no_plan"])
    out: dict[str, Any] = {
        "made_by": "launch/online.py",
        "experiment": next((r.get("command", "").split("--config ")[-1].split()[0] for r in starts if "--config " in r.get("command", "")), None),
        "commands": [s["command"] for s in starts],
        "date": datetime.fromtimestamp(rows[0]["time"], timezone.utc).strftime("%Y-%m-%d"),
        "machine": machine,
        "base_success": first["success_rate_no_plan"],
        "base_success_planned": first["success_rate"],
        "final_success": last["success_rate"],
        "final_success_no_plan": last.get("success_rate_no_plan"),
        "gain_points": round(gain, 2),
        "evaluation_episodes": last["episodes"],
        "base_version": {"planning": first["weight_version"], "policy": first["policy_version"]},
        "final_version": {"planning": last["weight_version"], "policy": last["policy_version"]},
        "final_paired": _paired(last),
        "experience_episodes": experience,
        "branch_episodes": sum(int(c.get("branch_episodes", 0)) for c in collects),
        "rounds": len(kinds("round")) or len(collects),  # refined and evaluated (the synchronous loop: also collected)
        "rounds_collected": sum(1 for c in collects if not c.get("stopped")),  # the asynchronous loop collects up to a round ahead
        "gpus": gpus,
        "wall_minutes": round(wall_s / 60, 2),
        "gpu_minutes": round(wall_s / 60 * max(gpus, 1.0), 2) if gpus else None,
        "minutes_by_phase": phases(rows),
        "gain_points_per_1000_experience_episodes": round(gain / (experience / 1000), 2) if experience else None,
        "versions": [{"round": e["round"], "planning_version": e["weight_version"], "policy_version": e["policy_version"],
                      "success": e["success_rate"], "success_no_plan": e.get("success_rate_no_plan"), "episodes": e["episodes"],
                      "wall_minutes": round(e["wall_s"] / 60, 2)} for e in evals],
    }
    if fresh:
        f = fresh[-1]
        out.update({"fresh_states_success": f["success_rate"], "fresh_states_success_no_plan": f.get("success_rate_no_plan"),
                    "fresh_states_gain_points": round(100 * (f["success_rate"] - f["success_rate_no_plan"]), 2)
                    if isinstance(f.get("success_rate_no_plan"), (int, float)) else None,
                    "fresh_states_episodes": f["episodes"], "fresh_states_first_trial": f.get("first_trial"),
                    "fresh_states_version": {"planning": f["weight_version"], "policy": f["policy_version"]},
                    "fresh_states_paired": _paired(f)})
    return out


def _paired(e: dict[str, Any]) -> dict[str, Any] | None:
    counts = {k.split("/", 1)[1]: int(v) for k, v in e.items() if k.startswith("paired/")}
    if not counts:
        return None
    return {**counts, "mcnemar_chi2": mcnemar(counts.get("only_planned", 0), counts.get("only_alone", 0))}


def phases(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Minutes of wall time per phase, from the records' wall clocks: demonstrations, the offline policy and
    planning model (trained at once), the services' start and the round-0 evaluation, the online rounds (collection,
    refinement, evaluations between), and the last evaluations."""
    def wall(pred) -> float | None:
        hits = [r["wall_s"] for r in rows if pred(r)]
        return max(hits) if hits else None

    # The policy and the planning model train side by side offline: one span, ended by the later of the two.
    offline = [x for x in (wall(lambda r: r.get("phase") == "policy_offline" or r.get("kind") == "validation"),
                           wall(lambda r: r.get("phase") == "planning_offline")) if x is not None]
    marks = {
        "demonstrations": wall(lambda r: r.get("kind") == "demos"),
        "offline_policy_and_planning_model": max(offline) if offline else None,
        "services_and_round_0_evaluation": wall(lambda r: r.get("kind") == "eval" and r.get("round") == 0),
    }
    evals = [r for r in rows if r.get("kind") == "eval"]
    last_round = evals[-1].get("round") if evals else None
    last_start = wall(lambda r: r.get("kind") == "collect" and r.get("round") == last_round)
    last_learner = wall(lambda r: r.get("kind") == "learner" and r.get("phase", "").endswith("_online"))
    marks["online_rounds"] = max(x for x in (last_start, last_learner) if x is not None) if last_start or last_learner else None
    marks["last_evaluations"] = max(r["wall_s"] for r in rows)
    out, before = {}, 0.0
    for name, at in marks.items():
        if at is None:
            continue
        out[name] = round((at - before) / 60, 2)
        before = at
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run directory of launch/online.py")
    parser.add_argument("--machine", default=None, help="the machine the run was made on, in words")
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON file whose top level is (re)written")
    args = parser.parse_args(argv)
    figures = report(records(args.run_dir), args.machine)
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    keep = {k: v for k, v in previous.items() if k == "learning_proof"}
    if previous and "made_by" not in previous and "learning_proof" not in previous:
        keep["learning_proof"] = previous  # the side scripts' figures, before the main job made its own
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**figures, **keep}, indent=1) + "\n")
    print(json.dumps({k: v for k, v in figures.items() if k != "versions"}, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
