"""The robot side stays thin: every actors/robots module imports without torch, Ray, PIL, grpc or cosmos_policy.

The same modules run on a robot's computer in a thin client with only numpy, msgpack and grpcio
(grpc is the gateway's: the thin client's modules import it, no other robot-side module does).
The job's side of a robot (the gateway server and the RobotActor) is exempt: it runs in the job.
Each module is imported in a fresh interpreter, so nothing another test imported can hide a heavy
import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JOB_SIDE = {"actors.robots.gateway", "actors.robots.actor"}  # run in the job: Ray, cosmos_policy, grpc
GRPC = {"actors.robots.client", "actors.robots.remote"}  # the thin client: grpcio, and nothing heavier
MODULES = sorted(f"actors.robots.{p.stem}" for p in (ROOT / "actors" / "robots").glob("*.py")
                 if p.stem != "__init__" and f"actors.robots.{p.stem}" not in JOB_SIDE)
HEAVY = ("torch", "ray", "PIL", "cosmos_policy", "grpc")


def test_the_robot_modules_are_all_listed() -> None:
    assert {"actors.robots.driver", "actors.robots.dummy", "actors.robots.config", "actors.robots.safety",
            "actors.robots.operator", "actors.robots.control", "actors.robots.station", "actors.robots.remote"} <= set(MODULES)


@pytest.mark.parametrize("module", ["actors.robots", *MODULES])
def test_a_robot_module_imports_nothing_heavy(module: str) -> None:
    code = f"import importlib, json, sys; importlib.import_module({module!r}); print(json.dumps(sorted(m for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY and not (module in GRPC and m.split(".")[0] == "grpc"))
    assert not heavy, f"{module} imports {heavy}"
