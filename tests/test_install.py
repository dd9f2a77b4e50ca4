"""`pip install .` is the model alone: the `cosmos_policy` package with only its own dependencies.

The slow test installs the project, without extras and not editable, into a fresh venv (no system
site packages), checks that none of the roles' packages came with it, and builds and runs the tiny
model from there, outside the source tree, with the YAML configs the wheel ships. The fast test
keeps pyproject.toml's package list (listed, not found, because of the configs' mapping) in step
with the tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCH_VERSION = "2.13.0"  # the Makefile's TORCH_VERSION
CODE_ROOTS = ("cosmos_policy", "actors", "replay", "learner", "launch")
CONFIGS_PACKAGE = "cosmos_policy._configs"
# What the extras bring: none of it may come with the model alone.
ROLE_MODULES = ("ray", "deepspeed", "robosuite", "mujoco", "wandb", "matplotlib", "libero", "reverb", "tensorflow", "torchao")
# Not copied into the build tree: venvs, git, run outputs and build leftovers (.gitignore's entries).
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", ".venv-*", "__pycache__", "*.pyc", "*.egg-info", "build", "dist",
                                     ".pytest_cache", "runs", "wandb", ".whl", ".gl")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_listed_packages_match_the_tree():
    """Every package of the five roots and every config group is in the wheel, nothing else."""
    tool = _pyproject()["tool"]["setuptools"]
    assert tool["package-dir"] == {CONFIGS_PACKAGE: "configs"}
    assert tool["package-data"] == {CONFIGS_PACKAGE: ["**/*.yaml"]}
    expected = {CONFIGS_PACKAGE}
    for root in CODE_ROOTS:
        for init in (ROOT / root).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                expected.add(".".join(init.parent.relative_to(ROOT).parts))
    for yaml in (ROOT / "configs").rglob("*.yaml"):
        parts = yaml.parent.relative_to(ROOT / "configs").parts
        expected.update(".".join((CONFIGS_PACKAGE, *parts[:i])) for i in range(1, len(parts) + 1))
    assert sorted(tool["packages"]) == sorted(expected), "pyproject.toml [tool.setuptools] packages is out of step with the tree"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1")
    return env


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _check(result: subprocess.CompletedProcess, what: str) -> None:
    assert result.returncode == 0, f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def _has_nvidia_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


CHECK = textwrap.dedent(
    """
    import importlib.util, json, math, sys
    from pathlib import Path

    roles = sys.argv[1].split(",")
    present = [m for m in roles if importlib.util.find_spec(m) is not None]

    import torch
    import cosmos_policy
    from cosmos_policy import CosmosPolicyModel, SampleKind, load_layout, load_model_config
    from cosmos_policy.config import CONFIG_ROOT
    from cosmos_policy.synthetic import random_batch

    config = load_model_config("tiny")
    layout = load_layout("libero")
    model = CosmosPolicyModel.build(config, layout, seed=0).eval()
    batch = random_batch(config, layout, [SampleKind.POLICY, SampleKind.WORLD_MODEL], seed=0)
    pred = model.sample(batch, steps=2, seed=[1, 2])
    loss = model.training_loss(batch, torch.Generator().manual_seed(0)).loss
    print("RESULT " + json.dumps({
        "present": present,
        "loaded": sorted(m for m in roles if m in sys.modules),
        "package": cosmos_policy.__file__,
        "config_root": str(CONFIG_ROOT),
        "configs": sorted(str(p.relative_to(CONFIG_ROOT)) for p in CONFIG_ROOT.rglob("*.yaml")),
        "other_packages": {m: importlib.util.find_spec(m) is not None for m in ("actors", "replay", "learner", "launch")},
        "actions": list(pred.actions.shape),
        "value": list(pred.value.shape),
        "expected_actions": [2, layout.action_chunk, layout.action_dim],
        "finite": bool(torch.isfinite(pred.actions).all() and torch.isfinite(pred.value).all()),
        "loss": float(loss),
    }))
    """
)


@pytest.mark.slow
def test_pip_install_gives_the_model_alone(tmp_path):
    """~65-85 s here: torch's local wheel, the model's dependencies from pip's index and cache, the project built."""
    start = time.monotonic()
    venv, src, work = tmp_path / "venv", tmp_path / "src", tmp_path / "work"
    work.mkdir()
    # A copy of the tree is what gets built: setuptools writes build/ and *.egg-info into the
    # source directory, which must not happen in a working tree others may be building in too.
    shutil.copytree(ROOT, src, ignore=COPY_IGNORE)
    _check(_run([sys.executable, "-m", "venv", str(venv)], work, 120), "python -m venv")
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--no-compile"]  # bytecode is written on import, for what is imported
    # torch first, as the Makefile does: the CPU build where there is no NVIDIA GPU.
    if _has_nvidia_gpu():
        _check(_run([*pip, f"torch=={TORCH_VERSION}"], work, 600), "pip install torch")
    else:
        torch = _run([*pip, f"torch=={TORCH_VERSION}+cpu"], work, 600)
        if torch.returncode != 0:
            torch = _run([*pip, f"torch=={TORCH_VERSION}+cpu", "--index-url", "https://download.pytorch.org/whl/cpu",
                          "--extra-index-url", "https://pypi.org/simple"], work, 600)
        _check(torch, "pip install torch")
    after_torch = time.monotonic()
    _check(_run([*pip, str(src)], work, 600), "pip install <project>")  # no extras, not editable
    _check(_run([python, "-m", "pip", "check"], work, 120), "pip check")
    installed = time.monotonic()

    (work / "check.py").write_text(CHECK)
    # -I: no PYTHON* variables, no user site, and neither the script's folder nor the source tree on sys.path.
    result = _run([python, "-I", str(work / "check.py"), ",".join(ROLE_MODULES)], work, 300)
    _check(result, "the check script")
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stdout
    out = json.loads(lines[-1][len("RESULT "):])
    print(f"venv + torch {after_torch - start:.0f} s, project {installed - after_torch:.0f} s, "
          f"check {time.monotonic() - installed:.0f} s")

    assert out["present"] == [], f"the model alone brought role packages: {out['present']}"
    assert out["loaded"] == []
    site = venv.resolve()
    assert Path(out["package"]).resolve().is_relative_to(site), out["package"]  # the installed copy, not the source tree
    assert Path(out["config_root"]).resolve().is_relative_to(site), out["config_root"]
    shipped = sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml"))
    assert out["configs"] == shipped
    assert out["other_packages"] == {"actors": True, "replay": True, "learner": True, "launch": True}
    assert out["actions"] == out["expected_actions"] and out["value"] == [2]
    assert out["finite"] and out["loss"] == out["loss"] and abs(out["loss"]) < float("inf")
