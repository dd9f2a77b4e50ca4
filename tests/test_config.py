"""Model sizes as YAML: the exact 2B network, the tiny one, overrides and clear errors."""

from __future__ import annotations

import pytest
import torch

from cosmos_policy.config import load_model_config, model_config_from_dict, model_config_to_dict
from cosmos_policy.denoiser import build_network
from cosmos_policy.errors import ConfigError
from cosmos_policy.tokenizer import build_vae


def test_2b_is_exactly_cosmos_predict2_2b():
    cfg = load_model_config("2b")
    with torch.device("meta"):
        net = build_network(cfg)
        vae = build_vae(cfg)
    assert sum(p.numel() for p in net.parameters()) == 1_956_413_440
    assert net.config.in_channels == 18 and net.patch_embed.proj.in_features == 72  # NVIDIA's x_embedder: 18 x 2 x 2
    assert net.config.concat_padding_mask is False and net.config.extra_pos_embed_type is None
    assert tuple(net.config.rope_scale) == (1.0, 3.0, 3.0)
    assert sum(p.numel() for p in vae.parameters()) == 126_892_531  # Wan 2.1 VAE
    assert cfg.latent_frame_shape == (16, 28, 28)
    assert (cfg.sampler.sigma_max, cfg.sampler.sigma_min, cfg.sampler.solver, cfg.sampler.steps) == (80.0, 4.0, "2ab", 5)
    assert cfg.diffusion.loss_scale == 10.0 and cfg.diffusion.sigma_conditional == 0.0


def test_tiny_builds_fast_and_round_trips_as_data():
    cfg = load_model_config("tiny")
    assert cfg.latent_frame_shape == (16, 8, 8)
    assert sum(p.numel() for p in build_network(cfg).parameters()) < 1_000_000
    assert model_config_from_dict(model_config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("size, params", [("small", 1_143_000), ("medium", 9_390_000)])
def test_small_and_medium_share_the_tiny_models_shapes(size, params):
    """Same image size, latent frame and text embedding as each other (a medium judge can plan for a small policy)."""
    cfg = load_model_config(size)
    assert cfg.latent_frame_shape == load_model_config("small").latent_frame_shape
    assert cfg.text.embed_dim == load_model_config("small").text.embed_dim
    with torch.device("meta"):
        assert abs(sum(p.numel() for p in build_network(cfg).parameters()) - params) / params < 0.01


def test_overrides():
    cfg = load_model_config("tiny", ["sampler.steps=10", "sampler.solver=euler"])
    assert cfg.sampler.steps == 10 and cfg.sampler.solver == "euler"
    assert load_model_config("tiny", {"network": {"num_layers": 3}}).network.num_layers == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["image_size=60"], "model.image_size: expected a positive multiple of 16"),
        (["sampler.solver=heun"], "model.sampler.solver: expected one of"),
        (["sampler.sigma_min=90"], "expected 0 < sigma_min < sigma_max"),
        (["dtype=float64"], "model.dtype"),
        (["network.num_layers=0"], "model.network.num_layers: expected a positive integer"),
        (["network.patch_size=[2,2,2]"], "temporal patch must be 1"),
        (["diffusion.sigma_data=0.5"], "sigma_data"),
        (["sampler.stepz=3"], "stepz"),
        (["sampler.steps=five"], "steps"),
    ],
)
def test_invalid_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_model_config("tiny", overrides)


def test_unknown_size_lists_known_ones():
    with pytest.raises(ConfigError, match=r"known: \['2b', 'medium', 'small', 'tiny'\]"):
        load_model_config("7b")
