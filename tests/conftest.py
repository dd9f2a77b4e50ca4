"""Shared fixtures: the tiny model config and the benchmark layouts, and a local Ray cluster."""

from __future__ import annotations

import os

# Before anything imports Ray: keep the node on loopback, no token auth left over from ~/.ray,
# no usage reporting (there is no network to report to).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MUJOCO_GL", "egl")  # offscreen rendering through Mesa (no display)

import pytest
import torch

from cosmos_policy.config import ModelConfig, load_model_config
from cosmos_policy.layout import LatentLayout, load_layout
from cosmos_policy.model import CosmosPolicyModel


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return load_model_config("tiny")


@pytest.fixture(scope="session")
def libero() -> LatentLayout:
    return load_layout("libero")


@pytest.fixture(scope="session")
def robocasa() -> LatentLayout:
    return load_layout("robocasa")


@pytest.fixture(scope="session")
def aloha() -> LatentLayout:
    return load_layout("aloha")


@pytest.fixture
def tiny_model(tiny_config: ModelConfig, libero: LatentLayout) -> CosmosPolicyModel:
    return CosmosPolicyModel.build(tiny_config, libero, seed=0).eval()


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster on loopback, shared by the tests that need one."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False, object_store_memory=300 * 1024 * 1024)
    yield ray
    ray.shutdown()
