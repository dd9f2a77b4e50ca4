"""The evaluation protocol over many EnvRunners: suites x tasks x trials x seeds.

LIBERO's published protocol (method 8.1): per suite 10 tasks x 50 trials from the tasks' fixed
initial states, three seeds (195, 196, 197); the success rate per task, per suite, and its mean
and spread over seeds. Trials are spread over the runners as they come free.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray

from actors.dispatch import spread
from actors.env_runner import EpisodeResult
from cosmos_policy.errors import ConfigError


@dataclass
class EvalConfig:
    tasks: list[str] | None = None  # None: every task the runners' environment has
    trials: int = 50
    seeds: list[int] = field(default_factory=lambda: [195, 196, 197])
    first_trial: int = 0  # trials first_trial .. first_trial + trials - 1 of each task's fixed initial states

    def __post_init__(self) -> None:
        if self.trials < 1 or not self.seeds or self.first_trial < 0:
            raise ConfigError("eval: need trials >= 1, at least one seed and first_trial >= 0")


def evaluate(runners: list[Any], config: EvalConfig, suite: str = "", plan: bool | None = None, record: bool | None = None,
             on_result: Callable[[int, int], None] | None = None,
             on_lost: Callable[[Any, BaseException], None] | None = None) -> dict[str, Any]:
    """Run every (seed, task, trial) on the runners; returns the report (JSON-ready).

    ``plan`` / ``record`` override the runners' own settings for these episodes (the main job
    evaluates with and without planning on the same runners, and never records evaluations).
    An episode whose runner dies is played again (``actors.dispatch.spread``; ``on_lost`` hears of
    it), so the report always covers the same episodes; ``episodes_lost`` counts the replays.
    """
    if not runners:
        raise ConfigError("eval: no runners")
    tasks = config.tasks or ray.get(runners[0].tasks.remote())
    trials = range(config.first_trial, config.first_trial + config.trials)
    jobs = [(seed, task, trial) for seed in config.seeds for task in tasks for trial in trials]
    lost: list[Any] = []

    def lose(job: Any, exc: BaseException) -> None:
        lost.append(job)
        if on_lost is not None:
            on_lost(job, exc)

    results = spread(runners, jobs, lambda runner, job: runner.run_trial.remote(job[1], job[0], job[2], plan, record), on_result, lose)
    return {**report(results, tasks, config, suite), "episodes_lost": len(lost)}


def report(results: list[tuple[tuple, EpisodeResult]], tasks: list[str], config: EvalConfig, suite: str) -> dict[str, Any]:
    per_task: dict[str, dict[str, Any]] = {}
    for task in tasks:
        rows = [(job, r) for job, r in results if job[1] == task]
        by_seed = {s: [r.success for job, r in rows if job[0] == s] for s in config.seeds}
        per_task[task] = {
            "success_rate": float(np.mean([r.success for _, r in rows])) if rows else 0.0,
            "trials": len(rows),
            "interrupted": sum(r.interrupted for _, r in rows),
            "by_seed": {str(s): float(np.mean(v)) if v else 0.0 for s, v in by_seed.items()},
        }
    seed_rates = [np.mean([r.success for job, r in results if job[0] == s]) for s in config.seeds]
    return {
        "suite": suite,
        "success_rate": float(np.mean([r.success for _, r in results])) if results else 0.0,
        "success_rate_std_over_seeds": float(np.std(seed_rates)) if results else 0.0,
        "episodes": len(results),
        "tasks": per_task,
        "config": asdict(config),
        "episodes_detail": [
            {"seed": j[0], "task": j[1], "trial": j[2], **{k: v for k, v in asdict(r).items() if k != "final_state"}} for j, r in results
        ],
    }


def table(reports: list[dict[str, Any]]) -> str:
    """A markdown table: one row per task, one per suite, one overall."""
    lines = ["| suite | task | success rate | trials |", "|---|---|---|---|"]
    for rep in reports:
        for task, row in rep["tasks"].items():
            lines.append(f"| {rep['suite']} | {task} | {100 * row['success_rate']:.1f} % | {row['trials']} |")
        lines.append(f"| **{rep['suite']}** | all | **{100 * rep['success_rate']:.1f} %** (+- {100 * rep['success_rate_std_over_seeds']:.1f} over seeds) | {rep['episodes']} |")
    if len(reports) > 1:
        overall = float(np.mean([r["success_rate"] for r in reports]))
        lines.append(f"| **average** | | **{100 * overall:.1f} %** | {sum(r['episodes'] for r in reports)} |")
    return "\n".join(lines)


def write(reports: list[dict[str, Any]], out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(reports, indent=1, default=float))
    (out / "eval.md").write_text(table(reports) + "\n")
    return out / "eval.json", out / "eval.md"
