"""What the planner diagnostics share: a run directory's policy and planning model on the built-in task.

``bench/planner_noise.py`` and ``bench/planner_oracle.py`` both follow the planner in-process (no
Ray) from the fixed initial states of a finished ``learning_curve`` run; this module holds their
common command-line arguments and the loading, so both read the same run the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MUJOCO_GL", "egl")

from actors.policy_server import PolicySpec  # noqa: E402
from launch.experiment import Experiment, load_experiment  # noqa: E402


def add_run_args(parser: argparse.ArgumentParser, planning: str, planning_help: str = "relative to --run-dir, or absolute") -> None:
    """--config, --run-dir, --policy, --planning (default ``planning``) and the trailing experiment overrides."""
    parser.add_argument("--config", default="learning_curve")
    parser.add_argument("--run-dir", default="runs/learning_curve")
    parser.add_argument("--policy", default="checkpoints/policy", help="relative to --run-dir, or absolute")
    parser.add_argument("--planning", default=planning, help=planning_help)


def load(args: argparse.Namespace, overrides: list[str]) -> tuple[Experiment, Any, Any, str, str]:
    """(experiment, policy, planner, policy checkpoint, planning checkpoint) for a run on the built-in task.

    One torch thread: the diagnostics run beside each other (one per core) on small CPU machines.
    """
    torch.set_num_threads(1)
    cfg = load_experiment(args.config, [f"run_dir={args.run_dir}", *overrides])
    if cfg.env.name != "lift":
        raise SystemExit(f"--config: this script drives the built-in task 'lift', the experiment uses {cfg.env.name!r}")
    run_dir = Path(args.run_dir)
    policy_ckpt, planning_ckpt = (str(p if Path(p).is_absolute() else run_dir / p) for p in (args.policy, args.planning))
    spec = PolicySpec(checkpoint=policy_ckpt, planning_checkpoint=planning_ckpt, policy=cfg.policy_config(), planner=cfg.planner_config(),
                      text_encoder=cfg.model.text_encoder)
    policy, planner = spec.build()
    assert planner is not None
    return cfg, policy, planner, policy_ckpt, planning_ckpt


def write_figures(figures: dict[str, Any], out: str, detail: str) -> None:
    """Print the figures (without the per-episode ``detail`` entry) as one JSON line, write them all to ``out``."""
    import json

    print(json.dumps({k: v for k, v in figures.items() if k != detail}), flush=True)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=1))
    print(f"wrote {path}")
