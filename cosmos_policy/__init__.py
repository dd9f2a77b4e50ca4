"""Cosmos Policy: Cosmos-Predict2 as a robot policy, world model and value function.

The model only: no Ray, no DeepSpeed. Built on diffusers' ``CosmosTransformer3DModel`` and
``AutoencoderKLWan``; the method's numbers and shapes follow ``cosmos_policy_method.md``. The
contracts every role implements are in ``cosmos_policy.contracts``.

The names below are imported on first use, so that a process that needs only the contracts or the
episode record (a replay shard, a robot's client) does not pay for torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "NormalizationStats": "codec", "ModelConfig": "config", "load_model_config": "config", "CheckpointError": "errors",
    "ConfigError": "errors", "InputError": "errors", "StatisticsError": "errors", "FrameRole": "layout", "LatentLayout": "layout",
    "SampleKind": "layout", "load_layout": "layout", "CosmosPolicyModel": "model", "ModelBatch": "model", "Prediction": "model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cosmos_policy' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cosmos_policy.{_EXPORTS[name]}"), name)
