"""Rectified-flow preconditioning around the real (tiny) diffusers DiT, in float32 and bfloat16."""

from __future__ import annotations

import copy

import torch

from cosmos_policy.layout import FrameRole, SampleKind


def _capture(denoiser):
    seen = {}

    def pre(module, args, kwargs):
        seen["kwargs"] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}

    def post(module, args, kwargs, output):
        seen["out"] = output[0].clone()

    h1 = denoiser.net.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = denoiser.net.register_forward_hook(post, with_kwargs=True)
    return seen, (h1, h2)


def _inputs(libero, b=2):
    g = torch.Generator().manual_seed(3)
    clean_latents = torch.randn(b, 16, 9, 8, 8, generator=g)
    sigma = torch.tensor([80.0, 2.5])[:b]
    x_sigma = clean_latents + sigma.view(b, 1, 1, 1, 1) * torch.randn(b, 16, 9, 8, 8, generator=g)
    kinds = [SampleKind.POLICY, SampleKind.VALUE_SPRIME][:b]
    clean = libero.role_tensor(kinds) == FrameRole.CLEAN
    text = torch.randn(b, 16, 32, generator=g)
    return x_sigma, sigma, clean_latents, clean, text


@torch.no_grad()
def test_preconditioning_and_clean_frames(tiny_model, libero):
    den = tiny_model.denoiser
    x_sigma, sigma, clean_latents, clean, text = _inputs(libero)
    seen, hooks = _capture(den)
    x0 = den(x_sigma, sigma, clean_latents, clean, text)
    for h in hooks:
        h.remove()
    kw = seen["kwargs"]
    assert kw["fps"] is None
    b, t = clean.shape
    # Per-frame timestep t = sigma / (1 + sigma) on generated frames, 0 (sigma_conditional) on clean ones.
    expected_t = torch.where(clean, torch.zeros(b, t), (sigma / (1 + sigma)).view(b, 1).expand(b, t))
    assert kw["timestep"].shape == (b, 1, t, 1, 1)
    assert torch.allclose(kw["timestep"].view(b, t), expected_t)
    # Input: clean latents on clean frames, x_sigma / (1 + sigma) elsewhere.
    c5 = clean.view(b, 1, t, 1, 1)
    expected_in = torch.where(c5, clean_latents, x_sigma / (1 + sigma.view(b, 1, 1, 1, 1)))
    assert torch.allclose(kw["hidden_states"], expected_in, atol=1e-6)
    # Condition mask channel + an all-zero padding-mask channel: 16 + 2 = 18 network inputs.
    masks = kw["condition_mask"]
    assert masks.shape == (b, 2, t, 8, 8)
    assert torch.equal(masks[:, 0], c5[:, 0].float().expand(b, t, 8, 8)) and torch.all(masks[:, 1] == 0)
    assert den.net.patch_embed.proj.in_features == 18 * 4
    # x0 = (1 - t) x_sigma - t F on generated frames, the clean latents bit for bit on clean frames.
    tt = (sigma / (1 + sigma)).view(b, 1, 1, 1, 1)
    expected_x0 = (1 - tt) * x_sigma - tt * seen["out"].float()
    assert torch.allclose(x0[~c5.expand_as(x0)], expected_x0[~c5.expand_as(x0)], atol=1e-5)
    assert torch.equal(x0[c5.expand_as(x0)], clean_latents[c5.expand_as(x0)])


@torch.no_grad()
def test_bfloat16_matches_float32(tiny_model, libero):
    """bf16 network, float32 preconditioning: at sigma = 80, c_in must not be computed in bf16."""
    den32 = tiny_model.denoiser
    den16 = copy.deepcopy(den32).to(torch.bfloat16)
    x_sigma, sigma, clean_latents, clean, text = _inputs(libero)
    seen, hooks = _capture(den16)
    x16 = den16(x_sigma, sigma, clean_latents, clean, text)
    for h in hooks:
        h.remove()
    x32 = den32(x_sigma, sigma, clean_latents, clean, text)
    assert x16.dtype == torch.float32 and torch.isfinite(x16).all()
    b, t = clean.shape
    c5 = clean.view(b, 1, t, 1, 1)
    expected_in = torch.where(c5, clean_latents, x_sigma * (1.0 / (1.0 + sigma.view(b, 1, 1, 1, 1)))).to(torch.bfloat16)
    assert seen["kwargs"]["hidden_states"].dtype == torch.bfloat16
    assert torch.equal(seen["kwargs"]["hidden_states"], expected_in)
    gen = ~c5.expand_as(x32)
    rel = (x16 - x32)[gen].norm() / x32[gen].norm()
    assert rel < 2e-2, float(rel)
    assert torch.equal(x16[~gen], clean_latents[~gen])


def test_per_frame_modulation_gives_the_per_token_outputs_and_gradients(tiny_config):
    """The AdaLN projections run once per latent frame instead of once per token: same numbers."""
    import copy

    from cosmos_policy.denoiser import Denoiser, build_network, use_per_frame_modulation

    torch.manual_seed(0)
    net = build_network(tiny_config)
    reference = Denoiser(copy.deepcopy(net), 0.0)
    fast = Denoiser(net, 0.0, tokens_per_frame=16)  # 8x8 latents, patch 2x2
    assert use_per_frame_modulation(copy.deepcopy(net), 16) == 3 * len(net.transformer_blocks)
    b = 3
    x = torch.randn(b, 16, 9, 8, 8)
    sigma = torch.rand(b, 9) * 20
    clean = torch.zeros(b, 9, dtype=torch.bool)
    clean[:, :4] = True
    text = torch.randn(b, tiny_config.text.max_length, tiny_config.text.embed_dim)
    out_ref, out_fast = reference(x, sigma, x, clean, text), fast(x, sigma, x, clean, text)
    torch.testing.assert_close(out_fast, out_ref, rtol=0, atol=1e-6)
    out_ref.pow(2).sum().backward()
    out_fast.pow(2).sum().backward()
    grads = dict(reference.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-3, msg=name)
    assert fast.state_dict().keys() == reference.state_dict().keys()
