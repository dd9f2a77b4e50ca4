"""The tiny model end to end: training loss, sampling, and clear errors on bad input."""

from __future__ import annotations

import math

import pytest
import torch

from cosmos_policy.config import DiffusionConfig
from cosmos_policy.errors import ConfigError, InputError
from cosmos_policy.layout import FrameRole, SampleKind
from cosmos_policy.model import CosmosPolicyModel
from cosmos_policy.objective import loss_weight, sample_training_sigma
from cosmos_policy.synthetic import random_batch

ALL_KINDS = list(SampleKind)


def test_training_sigma_distribution():
    cfg = DiffusionConfig()
    g = torch.Generator().manual_seed(0)
    sigma = sample_training_sigma(200_000, 9, cfg, g) / 3.0  # LIBERO: x sqrt(9)
    uniform_part = ((sigma >= 1) & (sigma <= 85)).float().mean()
    # 30 % uniform on [1, 85] plus the log-normal mass inside that interval.
    lognormal_inside = 0.5 * (math.erf((math.log(85) - math.log(4)) / (1.2 * math.sqrt(2))) - math.erf((0 - math.log(4)) / (1.2 * math.sqrt(2))))
    assert abs(float(uniform_part) - (0.3 + 0.7 * lognormal_inside)) < 0.005
    below_one = float((sigma < 1).float().mean())  # only the log-normal reaches below 1
    expected_below = 0.7 * 0.5 * (1 + math.erf((0 - math.log(4)) / (1.2 * math.sqrt(2))))
    assert abs(below_one - expected_below) < 0.005
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    unscaled = DiffusionConfig()
    unscaled.noise.scale_by_sqrt_frames = False
    assert torch.allclose(sample_training_sigma(10, 11, cfg, g1), sample_training_sigma(10, 11, unscaled, g2) * math.sqrt(11))
    assert torch.allclose(loss_weight(torch.tensor([1.0, 3.0])), torch.tensor([4.0, 16 / 9]))


def test_loss_counts_generated_frames_only(tiny_model, tiny_config, libero):
    batch = random_batch(tiny_config, libero, [SampleKind.VALUE_SPRIME, SampleKind.WORLD_MODEL])
    x0 = tiny_model.targets(batch)
    base = tiny_model.training_loss(batch, torch.Generator().manual_seed(0), x0=x0)
    # Changing what sits in clean or masked frames changes nothing the loss counts... except through
    # the network's input; so instead check the loss equals the hand formula over generated frames.
    roles = libero.role_tensor(batch.kinds)
    g = torch.Generator().manual_seed(0)
    sigma = sample_training_sigma(2, 9, tiny_config.diffusion, g)
    gen = (roles == FrameRole.GENERATED).float().view(2, 1, 9, 1, 1)
    per = loss_weight(sigma).view(2, 1, 1, 1, 1) * (base.x0_pred - x0) ** 2
    assert torch.allclose(base.loss, 10.0 * (per * gen).sum() / per.numel())
    # Clean frames are exactly the targets; the masked frames of V(s') are predicted but carry no loss.
    clean = (roles == FrameRole.CLEAN).view(2, 1, 9, 1, 1).expand_as(x0)
    assert torch.equal(base.x0_pred[clean], x0[clean])
    assert set(base.metrics) >= {"loss", "value_sprime/value_l1", "world_model/future_image_l1", "world_model/value_l1"}
    assert "value_sprime/action_l1" not in base.metrics
    # The per-kind L1s (computed without reading the device) equal the plain masked means.
    err = (base.x0_pred - x0).abs().mean(dim=(1, 3, 4))
    wm = libero.value_index
    assert base.metrics["world_model/value_l1"] == pytest.approx(float(err[1, wm]), rel=1e-5)
    assert base.metrics["value_sprime/value_l1"] == pytest.approx(float(err[0, wm]), rel=1e-5)
    assert all(isinstance(v, float) for v in base.metrics.values())


def test_noise_drawn_ahead_is_the_noise_drawn_inside_the_loss(tiny_model, tiny_config, libero):
    """A learner draws (and pins) the noise before the step; the loss must be the one drawn inline."""
    batch = random_batch(tiny_config, libero, [SampleKind.POLICY, SampleKind.VALUE, SampleKind.WORLD_MODEL], seed=2)
    x0 = tiny_model.targets(batch)
    inline = tiny_model.training_loss(batch, torch.Generator().manual_seed(5), x0=x0)
    noise = tiny_model.training_noise(3, torch.Generator().manual_seed(5))
    assert noise.sigma.shape == (3,) and noise.eps.shape == x0.shape
    ahead = tiny_model.training_loss(batch, x0=x0, noise=noise)
    assert torch.equal(ahead.loss, inline.loss)
    other = tiny_model.training_loss(batch, x0=x0, noise=tiny_model.training_noise(3, torch.Generator().manual_seed(6)))
    assert not torch.equal(other.loss, inline.loss)
    with pytest.raises(InputError, match="noise: expected sigma"):
        tiny_model.training_loss(batch, x0=x0, noise=tiny_model.training_noise(2, torch.Generator().manual_seed(5)))


def test_batch_moves_whole_and_unchanged(tiny_config, libero):
    batch = random_batch(tiny_config, libero, [SampleKind.POLICY, SampleKind.VALUE])
    moved = batch.to("cpu")
    assert moved.kinds == batch.kinds and moved.kinds is not batch.kinds
    assert torch.equal(moved.text, batch.text) and torch.equal(moved.actions, batch.actions)
    assert set(moved.images) == set(batch.images) and all(torch.equal(moved.images[k], batch.images[k]) for k in batch.images)


def test_loss_falls_tenfold_when_overfitting(tiny_config, libero):
    model = CosmosPolicyModel.build(tiny_config, libero, seed=0).train()
    batch = random_batch(tiny_config, libero, [SampleKind.POLICY, SampleKind.WORLD_MODEL, SampleKind.VALUE])
    x0 = model.targets(batch)
    opt = torch.optim.AdamW(model.denoiser.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        out = model.training_loss(batch, torch.Generator().manual_seed(0), x0=x0)  # same sigma and noise each step
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.metrics["loss"])
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_conditioning_frames_are_bit_identical_after_sampling(tiny_model, tiny_config, libero, kind):
    batch = random_batch(tiny_config, libero, [kind, kind])
    pred = tiny_model.sample(batch, steps=3, seed=[1, 2])
    expected = tiny_model.inject(tiny_model.encode(batch, libero.clean_prefix(kind)), batch)
    for i, role in enumerate(libero.frame_roles(kind)):
        if role is FrameRole.CLEAN:
            assert torch.equal(pred.latents[:, :, i], expected[:, :, i]), libero.slots[i].name
    assert pred.actions.shape == (2, 16, 7) and pred.future_proprio.shape == (2, 9)
    assert pred.value.shape == (2,) and torch.all((pred.value >= 0) & (pred.value <= 1))
    if kind in (SampleKind.WORLD_MODEL, SampleKind.VALUE, SampleKind.Q_VALUE):
        assert torch.allclose(pred.actions, batch.actions, atol=1e-5)  # the clean action frame reads back


def test_sampling_is_deterministic_for_a_seed(tiny_model, tiny_config, libero):
    batch = random_batch(tiny_config, libero, [SampleKind.POLICY] * 2)
    a = tiny_model.sample(batch, seed=7)
    b = tiny_model.sample(batch, seed=7)
    c = tiny_model.sample(batch, seed=8)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.actions, b.actions)
    assert not torch.equal(a.actions, c.actions)
    # A sample's result depends on its own seed only, not on its batch neighbours.
    single = tiny_model.sample(batch.select([1]), seed=[7])
    assert torch.allclose(single.actions[0], a.actions[1], atol=1e-5)
    euler = tiny_model.sample(batch, seed=7, solver="euler")
    assert not torch.equal(euler.actions, a.actions)


def test_mixed_kinds_and_precomputed_conditioning(tiny_model, tiny_config, libero):
    batch = random_batch(tiny_config, libero, [SampleKind.POLICY, SampleKind.WORLD_MODEL])
    pred = tiny_model.sample(batch, steps=2, seed=0)
    # Autoregressive use: feed the policy sample's generated latents back as world-model conditioning.
    wm = batch.select([0], kinds=[SampleKind.WORLD_MODEL])
    wm.actions = None
    again = tiny_model.sample(wm, steps=2, seed=0, clean_latents=pred.latents[:1])
    assert torch.equal(again.latents[:, :, libero.action_index], pred.latents[:1, :, libero.action_index])


def _batch(tiny_config, libero, kinds=(SampleKind.POLICY,)):
    return random_batch(tiny_config, libero, list(kinds))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: setattr(b, "proprio", torch.zeros(1, 8)), r"proprio: expected shape \(1, 9\)"),
        (lambda b: setattr(b, "actions", torch.zeros(1, 16, 6)), r"actions: expected shape \(1, 16, 7\)"),
        (lambda b: setattr(b, "actions", torch.zeros(1, 12, 7)), r"actions: expected shape \(1, 16, 7\)"),
        (lambda b: b.proprio.__setitem__((0, 3), float("nan")), r"proprio: non-finite value \(NaN or inf\) at index \[0, 3\]"),
        (lambda b: b.actions.__setitem__((0, 2, 1), float("inf")), r"actions: non-finite value"),
        (lambda b: b.text.__setitem__((0, 0, 0), float("nan")), r"text: non-finite value"),
        (lambda b: setattr(b, "text", torch.zeros(1, 8, 32)), r"text: expected shape \(1, 16, 32\)"),
        (lambda b: b.images.pop("current_image.primary"), r"images: missing camera slots \['current_image.primary'"),
        (lambda b: b.images.__setitem__("current_image.wrist", torch.zeros(1, 64, 64, 3)), r"expected uint8"),
        (lambda b: b.images.__setitem__("current_image.wrist", torch.zeros(1, 3, 64, 64, dtype=torch.uint8)), r"expected shape \(1, 64, 64, 3\)"),
        (lambda b: setattr(b, "proprio", torch.zeros(1, 9, dtype=torch.int64)), r"proprio: expected a floating-point tensor"),
        (lambda b: setattr(b, "kinds", ["policy_plus"]), r"unknown sample kind 'policy_plus'"),
    ],
)
def test_bad_inputs_are_clear_errors(tiny_model, tiny_config, libero, mutate, message):
    batch = _batch(tiny_config, libero)
    mutate(batch)
    with pytest.raises(InputError, match=message):
        tiny_model.training_loss(batch)
    with pytest.raises(InputError, match=message):
        tiny_model.sample(batch, steps=1)


def test_wrong_frame_counts_are_clear_errors(tiny_model, tiny_config, libero):
    batch = _batch(tiny_config, libero)
    with pytest.raises(InputError, match=r"clean_latents: expected shape \(1, 16, 9, 8, 8\)"):
        tiny_model.sample(batch, clean_latents=torch.zeros(1, 16, 11, 8, 8))
    with pytest.raises(InputError, match="num_frames: expected 1..9 latent frames, got 10"):
        tiny_model.encode(batch, num_frames=10)
    with pytest.raises(InputError, match="seed: expected one seed or 1 seeds, got 2"):
        tiny_model.sample(batch, seed=[1, 2])
    wm = _batch(tiny_config, libero, [SampleKind.WORLD_MODEL])
    wm.actions = None
    with pytest.raises(InputError, match="actions: required for sample kinds"):
        tiny_model.sample(wm)


def test_layout_that_does_not_fit_the_latent_frame(tiny_config, aloha):
    small = tiny_config.__class__(**{**tiny_config.__dict__, "image_size": 32})
    with pytest.raises(ConfigError, match="does not fit a latent frame"):
        CosmosPolicyModel(small, aloha)


def test_latent_cache_gives_the_encoded_latents_and_skips_the_vae(tiny_config, libero):
    model = CosmosPolicyModel.build(tiny_config, libero, seed=0)
    batch = random_batch(tiny_config, libero, [SampleKind.POLICY, SampleKind.WORLD_MODEL, SampleKind.VALUE], seed=3)
    plain = model.encode(batch)
    model.enable_latent_cache(4)
    first = model.encode(batch)
    assert model.latent_cache_misses == 3 and model.latent_cache_hits == 0
    again = model.encode(batch.select([2, 0]))
    assert model.latent_cache_hits == 2 and model.latent_cache_misses == 3
    assert torch.allclose(first, plain, atol=1e-5) and torch.equal(again, first[[2, 0]])
    # A prefix encode is another clip; the cache keeps at most 4 clips.
    model.encode(batch, num_frames=4)
    assert model.latent_cache_misses == 6 and len(model._latent_cache) == 4
    # Training through the cache gives the loss of training without it (same noise).
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cached = model.training_loss(batch, g()).loss
    model.enable_latent_cache(0)
    assert torch.allclose(model.training_loss(batch, g()).loss, cached, atol=1e-5)
    with pytest.raises(ConfigError, match="latent_cache"):
        model.enable_latent_cache(-1)
