"""Shared fixtures: the tiny model config and the benchmark layouts."""

from __future__ import annotations

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
