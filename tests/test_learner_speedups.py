"""The learner's speed options compute what the plain path computes (tiny model, CPU).

- ``learner.encode.TargetEncoder`` (skip the overwritten trailing frames, reuse the constant
  leading ones, channels-last weights) gives the targets of ``model.targets`` for every layout;
- selective gradient checkpointing gives the same loss and gradients as none;
- ``PrefetchBatches`` hands out exactly the source's batches, also after a jump;
- the fused AdamW trains like DeepSpeed's torch AdamW;
- float8 takes exactly the blocks' token-wise layers, and is a clear error without a float8 GPU;
- bad values are errors naming the field.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cosmos_policy.config import load_model_config
from cosmos_policy.errors import ConfigError
from cosmos_policy.layout import SampleKind, load_layout
from cosmos_policy.model import CosmosPolicyModel
from cosmos_policy.synthetic import random_batch
from learner.data import PrefetchBatches, SyntheticBatches, synthetic_source
from learner.encode import TargetEncoder
from learner.engine import Learner, LearnerConfig, configure_blocks
from learner.float8 import check_float8_support, convert_float8, float8_layer
from learner.schedule import ScheduleConfig

FLAT = ScheduleConfig(warmup_steps=0, cycle_steps=1000, end_of_cycle=1.0)
KINDS = [SampleKind.POLICY, SampleKind.WORLD_MODEL, SampleKind.VALUE, SampleKind.VALUE_SPRIME, SampleKind.POLICY]


@pytest.mark.parametrize("layout_name,channels_last", [("libero", False), ("robocasa", False), ("aloha", False), ("libero", True)])
def test_needed_frames_encode_gives_the_full_encode_targets(layout_name, channels_last):
    model = CosmosPolicyModel.build(load_model_config("tiny"), load_layout(layout_name), seed=0)
    batch = random_batch(model.config, model.layout, KINDS, seed=3)
    reference = model.targets(batch)
    encoder = TargetEncoder(model, "needed", max_clips=2, channels_last=channels_last)  # 5 clips: parts of 2, 2, 1
    out = encoder(batch)
    assert out.shape == reference.shape
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    # The constant prefix is computed once and reused: a second batch needs no new prefix.
    prefix = encoder._prefix
    other = random_batch(model.config, model.layout, KINDS[:2], seed=4)
    torch.testing.assert_close(encoder(other), model.targets(other), rtol=0, atol=1e-5)
    assert encoder._prefix is prefix
    # ``full`` is the model's own path (through the same, possibly re-laid-out, VAE weights).
    torch.testing.assert_close(TargetEncoder(model, "full")(batch), reference, rtol=0, atol=1e-5)


def test_selective_checkpointing_keeps_loss_and_gradients():
    cfg = load_model_config("tiny", ["network.num_layers=3"])
    layout = load_layout("libero")
    batch = random_batch(cfg, layout, KINDS[:3], seed=1)
    results = []
    for blocks in (0, 2, None):
        model = CosmosPolicyModel.build(cfg, layout, seed=0)
        if blocks is None:
            model.denoiser.net.enable_gradient_checkpointing()  # diffusers' own, all blocks
        n = configure_blocks(model.denoiser.net, blocks, compile=False)
        assert n == (3 if blocks is None else blocks)
        model.train()
        out = model.training_loss(batch, torch.Generator().manual_seed(0))
        out.loss.backward()
        results.append((float(out.loss), [p.grad.clone() for p in model.denoiser.parameters()]))
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-6)
        for g, g0 in zip(grads, results[0][1]):
            torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="learner.checkpoint_blocks"):
        configure_blocks(CosmosPolicyModel.build(cfg, layout).denoiser.net, 4, compile=False)


def test_prefetched_batches_are_the_sources_batches():
    model = CosmosPolicyModel.build(load_model_config("tiny"), load_layout("libero"), seed=0)
    source = SyntheticBatches(model, 2, seed=5)
    prefetch = PrefetchBatches(SyntheticBatches(model, 2, seed=5), workers=2)
    try:
        for step in [0, 1, 2, 3, 7, 8, 2]:  # in order, then a jump ahead and one back (a resume)
            got, want = prefetch.batch(step).model, source.batch(step).model
            assert got.kinds == want.kinds and torch.equal(got.text, want.text)
            for name in want.images:
                assert torch.equal(got.images[name], want.images[name])
            assert torch.equal(got.actions, want.actions) and torch.equal(got.value, want.value)
        assert prefetch.wait_s > 0
    finally:
        prefetch.close()


def test_fused_adamw_and_prefetching_learner_trains_like_the_default(tmp_path):
    losses = {}
    fast = {"fused_optimizer": True, "data_workers": 1, "checkpoint_blocks": 1, "prepare_ahead": True}
    for name, kw in (("default", {"prepare_ahead": False}), ("fast", fast)):
        os.environ.update(MASTER_PORT="29671" if name == "default" else "29672")
        cfg = LearnerConfig(micro_batch=2, grad_accum=2, lr=2e-3, schedule=FLAT, checkpoint_dir=str(tmp_path / name), checkpoint_every=0, **kw)
        learner = Learner(cfg, synthetic_source(2))
        if name == "fast":
            assert type(learner.optimizer.optimizer).__name__ == "AdamW" and learner.optimizer.optimizer.defaults["fused"]
            assert learner.checkpointed_blocks == 1
        losses[name] = [learner.train_step()["loss"] for _ in range(4)]
        if hasattr(learner.source, "close"):
            learner.source.close()
    assert np.allclose(losses["fast"], losses["default"], rtol=1e-4), losses


def test_speed_options_are_checked():
    with pytest.raises(ConfigError, match="learner.vae_encode"):
        LearnerConfig(vae_encode="some")
    with pytest.raises(ConfigError, match="learner.vae_dtype"):
        LearnerConfig(vae_dtype="fp8")
    with pytest.raises(ConfigError, match="learner.vae_batch"):
        LearnerConfig(vae_batch=0)
    with pytest.raises(ConfigError, match="learner.checkpoint_blocks"):
        LearnerConfig(checkpoint_blocks=-1)
    with pytest.raises(ConfigError, match="learner.data_workers"):
        LearnerConfig(data_workers=-2)
    with pytest.raises(ConfigError, match="learner.float8: expected one of"):
        LearnerConfig(float8="e4m3")
    with pytest.raises(ConfigError, match="learner.float8: expected one of"):
        LearnerConfig(float8=True)  # YAML's bare `on`
    assert LearnerConfig(float8=False).float8 == "off"  # YAML's bare `off`
    from launch.config import load_experiment

    assert load_experiment("quickstart", ["learner.float8=off"]).learner_config("x", True).float8 == "off"
    LearnerConfig(zero_stage=3)  # compile left to the default: simply off under ZeRO-3


def test_float8_takes_the_token_wise_layers_of_the_blocks_and_needs_a_float8_gpu():
    net = CosmosPolicyModel.build(load_model_config("tiny"), load_layout("libero"), seed=0).denoiser.net
    chosen = {name for name, module in net.named_modules() if float8_layer(module, name)}
    per_block = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                 "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"}
    assert chosen == {f"transformer_blocks.{i}.{layer}" for i in range(len(net.transformer_blocks)) for layer in per_block}
    # Modulation (a few rows per sample) and the layers outside the blocks stay bf16.
    assert not any(".norm" in name or not name.startswith("transformer_blocks.") for name in chosen)
    assert not float8_layer(torch.nn.Linear(64, 40), "transformer_blocks.0.ff.net.2")  # 40: not a multiple of 16
    check_float8_support("off")
    if not torch.cuda.is_available():  # this machine: a clear error, never a silent bf16 run
        with pytest.raises(ConfigError, match="learner.float8: 'tensorwise' needs a CUDA GPU"):
            convert_float8(net, "tensorwise")
        assert all(type(m) is torch.nn.Linear for name, m in net.named_modules() if name in chosen)


@pytest.mark.parametrize("layout_name", ["libero", "robocasa", "aloha"])
def test_prefix_encoder_gives_the_whole_clip_latents_of_every_prefix(layout_name):
    """Inference encodes only the conditioning frames: every prefix length equals ``model.encode``'s."""
    from cosmos_policy.prefix_encode import PrefixCachedEncoder

    model = CosmosPolicyModel.build(load_model_config("tiny"), load_layout(layout_name), seed=0)
    batch = random_batch(model.config, model.layout, KINDS, seed=4)
    encoder = PrefixCachedEncoder(model, max_clips=3)
    for k in range(1, model.layout.num_frames + 1):
        reference = model.encode(batch, num_frames=k)
        out = encoder.latents(batch, k)
        assert out.shape == reference.shape
        torch.testing.assert_close(out[:, :, :k], reference[:, :, :k], rtol=0, atol=1e-5)
        assert torch.all(out[:, :, k:] == 0)
    # The policy's model switches it on: encode() then goes through it.
    model.enable_prefix_encoder(max_clips=3)
    k = model.layout.clean_prefix("policy")
    torch.testing.assert_close(model.encode(batch, num_frames=k), encoder.latents(batch, k), rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="num_frames"):
        encoder.latents(batch, 0)
