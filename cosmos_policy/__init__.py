"""Cosmos Policy: Cosmos-Predict2 as a robot policy, world model and value function.

The model only: no Ray, no DeepSpeed. Built on diffusers' ``CosmosTransformer3DModel`` and
``AutoencoderKLWan``; the method's numbers and shapes follow ``cosmos_policy_method.md``.
"""

from cosmos_policy.codec import NormalizationStats
from cosmos_policy.config import ModelConfig, load_model_config
from cosmos_policy.errors import CheckpointError, ConfigError, InputError, StatisticsError
from cosmos_policy.layout import FrameRole, LatentLayout, SampleKind, load_layout
from cosmos_policy.model import CosmosPolicyModel, ModelBatch, Prediction

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CosmosPolicyModel",
    "FrameRole",
    "InputError",
    "LatentLayout",
    "ModelBatch",
    "ModelConfig",
    "NormalizationStats",
    "Prediction",
    "SampleKind",
    "StatisticsError",
    "load_layout",
    "load_model_config",
]
