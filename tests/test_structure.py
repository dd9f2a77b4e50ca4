"""The shape of the code: dependencies point one way, actor names live in one module, modules stay readable.

ARCHITECTURE.md section 1: ``launch -> {actors, learner, replay} -> cosmos_policy``; the roles meet
through ``cosmos_policy.contracts`` and never import each other; ``cosmos_policy`` knows nothing
of Ray or DeepSpeed. Read from the source (AST), function-level imports included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("actors", "learner", "replay")
PRODUCT = ("cosmos_policy", *ROLES, "launch")


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PRODUCT)
def test_dependencies_point_one_way(package: str) -> None:
    forbidden = {"cosmos_policy": {*ROLES, "launch", "ray", "deepspeed"}, "launch": set()}.get(package, {*ROLES, "launch"} - {package})
    found = {f"{path.relative_to(ROOT)} imports {name}" for path in _modules(package) for name in _imports(path) & forbidden}
    assert not found, sorted(found)


def test_ray_actor_names_are_spelled_in_one_module() -> None:
    """Services are handed over as objects (which may carry the names launch gave them); only launch/names.py spells a name."""
    spelled = []
    for package in PRODUCT:
        for path in _modules(package):
            if path == ROOT / "launch" / "names.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                    continue
                if node.func.attr == "get_actor" and node.args and isinstance(node.args[0], (ast.Constant, ast.JoinedStr)):
                    spelled.append(f"{path.relative_to(ROOT)}:{node.lineno} looks an actor up by a name it spells")
                if node.func.attr == "options":
                    for kw in node.keywords:
                        if kw.arg == "name" and isinstance(kw.value, (ast.Constant, ast.JoinedStr, ast.BinOp)):
                            spelled.append(f"{path.relative_to(ROOT)}:{node.lineno} spells an actor name")
    assert not spelled, spelled


def test_modules_stay_readable_or_say_why() -> None:
    """No product module over 400 lines unless its folder's README names it and says why."""
    long = []
    for package in PRODUCT:
        for path in _modules(package):
            lines = len(path.read_text().splitlines())
            readme = path.parent / "README.md"
            if lines > 400 and not (readme.is_file() and path.name in readme.read_text()):
                long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not long, long


def test_the_round_loop_reads_top_to_bottom() -> None:
    """launch/online.py's rounds (collect, refine, publish, evaluate) are one short function."""
    tree = ast.parse((ROOT / "launch" / "online.py").read_text())
    loop = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "online")
    assert loop.end_lineno - loop.lineno + 1 <= 60  # type: ignore[operator]


def test_every_experiment_key_has_a_default_and_a_docstring() -> None:
    from launch.config import config_keys

    rows = config_keys()
    assert len(rows) > 100 and len({k for k, _, _ in rows}) == len(rows)
    undocumented = [key for key, _, doc in rows if not doc.strip()]
    assert not undocumented, undocumented
    assert ("online.rounds", 3, "Online rounds after the offline phase (0: offline only, then the round-0 evaluation).") in rows
    assert any(k == "planner.num_candidates" for k, _, _ in rows) and any(k == "learner.zero_stage" for k, _, _ in rows)


def test_contracts_are_one_ray_free_page() -> None:
    path = ROOT / "cosmos_policy" / "contracts.py"
    assert len(path.read_text().splitlines()) <= 200
    names = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)}
    assert {"Observation", "ActionChunk", "Policy", "EnvSpec", "Env", "TableName", "ReplayClient", "WeightVersion", "WeightSource"} <= names
