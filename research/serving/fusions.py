"""Fusions of the float8 network's elementwise work, to measure on a GPU before any goes into the product.

research/serving's kernel profile of a served batch (batch 8, float8 rowwise, CUDA graphs) puts the 2048 x 2048
products at 785 TFLOP/s against 1,181 for the MLP's 2048 x 8192, and the MLP's GELU-and-quantize kernel at 263 us a
block where its bytes (the 8,192-wide rows read once, their float8 copy written) take about 130 us:

- ``qkv``: the self-attention's q, k and v as one float8 product (2048 -> 6144) on one quantized input, instead of
  three 2048 -> 2048 products. Each output row keeps its own weight scale, so the numbers are the three products'.
- ``ffn``: the MLP's GELU and the row-wise float8 quantization of its output in one Triton kernel, one row per
  program: the 8,192-wide row is read once, straight from the first product's output.
- ``norms`` (the whole block, q, k, v and MLP fused too): each of a block's three AdaLN-Zero norms with the residual add
  before it and the float8 quantization after it in one Triton kernel (``add_norm_quantize``; the first norm without
  the add, ``norm_quantize``), one 2,048-wide row per program, the modulation read per latent frame. Inductor made each
  a looped-reduction kernel of 122 to 154 us a block at batch 8 on the H100, over bytes that take about 70 us. The
  block's forward is written around them (``FusedFloat8Block``), as the add belongs to the block, the norm to its
  AdaLN module and the quantization to the next product.

All keep the network's state dict as it is (the bf16 weights stay the modules' parameters; the float8 copies are
buffers outside it, refreshed by a ``load_state_dict`` post-hook, as ``cosmos_policy.float8`` does), so published
weights load unchanged.

On a GPU (``python research/serving/fusions.py``) for each variant (``--variants none,qkv,ffn,qkv+ffn``) it builds the 2b
policy at LIBERO shapes, converts it to float8 rowwise, measures the fused outputs against the unfused ones on 8 fixed
observations and seeds (eagerly; next to the seed-to-seed spread), compiles it into CUDA graphs as the policy server
does and serves N = ``--batch`` closed-loop clients for ``--seconds`` (bench/serving.py's loop). One JSON line each.
``--cpu-check`` runs the same output check with the tiny network on a CPU, where the GELU kernel's torch twin stands
in for Triton: Triton 3.6's interpreter (``TRITON_INTERPRET=1``) casts to float8 wrongly when rounding carries into the
next power of two (127.7 -> 64 where the GPU and torch give 128), so it cannot check the kernel's numbers. On a GPU
the kernel's numbers are checked against inductor's twin (``max_dequantized_difference``) and the network's actions
against the unfused network's. ``kernel_times`` times each fusion's kernels alone at batch 8 against inductor's compile
of their torch twins, and the q, k, v products three against one. The norms' kernel was checked under the interpreter
on a CPU, from its own residual stream (the interpreter rounds float32 to bfloat16 toward zero): every float8 value
equal but for that power-of-two carry. The whole fused network's actions equal the unfused one's on a CPU with the
twins, and differ by 0.0045 of the seed spread with the Triton kernels run by the interpreter (its two roundings):
``TRITON_INTERPRET=1 python research/serving/fusions.py --cpu-check --variants norms`` with triton installed.

Run on an H200 on 2026-12-07 (``results/2026-12-07_fusions_h200.jsonl``; the same code then sat in
``cosmos_policy/float8.py`` of the run's working tree, its ``ffn`` named ``feed_forward``): the kernel's numbers equal
inductor's (largest dequantized difference 0.0) in 181 us against inductor's 246 us; the fused network's actions
differ from the unfused one's by 0.009 of the seed-to-seed spread; served at N = 8, no variant was faster beyond the
run-to-run spread of 8-second windows (unfused 16.12 and 15.85 queries/s, qkv 16.09, ffn 16.17, both 15.71). They stay
here, out of the product. On torch 2.11 each served variant needs a process of its own (the script starts one for each
when given several): CUDA graph trees keep their state in the thread that first used them, so a second server's compiled
graphs, run on its own new passes thread, fail (pytorch/pytorch#123177, fixed in later torch). The product makes one
server per process. The ``norms`` fusion and ``kernel_times``' other kernels were written after those runs: not yet run
on a GPU.

    python research/serving/fusions.py --variants none,qkv+ffn,norms --seconds 20   # kernels, checks, 3 served: ~10 min
    python research/serving/fusions.py --serve-only --variants none,qkv,ffn,qkv+ffn,norms
    python research/serving/fusions.py --cpu-check --variants qkv,ffn,qkv+ffn,norms
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cosmos_policy.float8 import Float8InferenceLinear, _quantize, _scale  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU machine without triton: the torch twin below
    triton = None


# ---- the GELU and its row-wise float8 quantization, fused --------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _gelu_quantize_rows_kernel(h_ptr, q_ptr, scale_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        x = tl.load(h_ptr + row * n_cols + offs, mask=mask, other=0.0).to(tl.float32)
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))  # GELU(x), exact (erf), as diffusers' "gelu"
        amax = tl.max(tl.abs(y), axis=0)  # masked lanes are GELU(0) = 0
        scale = tl.maximum(amax, 1e-12) / 448.0
        q = tl.clamp(y / scale, -448.0, 448.0)
        tl.store(q_ptr + row * n_cols + offs, q.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=mask)
        tl.store(scale_ptr + row, scale)


def gelu_quantize_rows_reference(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch twin of the kernel: GELU in float32, then one float8 scale per row."""
    y = F.gelu(h.float())
    scale = _scale(y, rowwise=True)
    return _quantize(y, scale), scale


@torch.library.custom_op("cosmos_research::gelu_quantize_rows", mutates_args=())
def gelu_quantize_rows(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, n) bf16 -> (rows, n) float8 e4m3 and (rows, 1) float32 scales of GELU(h)."""
    if triton is None or (h.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"):
        return gelu_quantize_rows_reference(h)
    rows, n = h.shape
    h = h.contiguous()
    q = torch.empty((rows, n), dtype=torch.float8_e4m3fn, device=h.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=h.device)
    _gelu_quantize_rows_kernel[(rows,)](h, q, scale, n, BLOCK=triton.next_power_of_2(n), num_warps=8)
    return q, scale


@gelu_quantize_rows.register_fake
def _(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(h.shape, dtype=torch.float8_e4m3fn, device=h.device), torch.empty((h.shape[0], 1), dtype=torch.float32, device=h.device)


def _product(q: torch.Tensor, scale: torch.Tensor, layer: Float8InferenceLinear | Float8QKV, dtype: torch.dtype) -> torch.Tensor:
    out_dtype = torch.bfloat16 if dtype == torch.float32 and q.device.type == "cuda" else dtype
    out = torch._scaled_mm(q, layer.weight_f8.t(), scale_a=scale, scale_b=layer.weight_scale, out_dtype=out_dtype, use_fast_accum=True)
    return out.to(dtype)


class FusedFloat8FeedForward(torch.nn.Module):
    """diffusers' ``FeedForward`` (GELU, bias-free in Cosmos) whose two float8 products meet through one fused kernel.

    Made by swapping the class of an instance whose ``net[0].proj`` and ``net[2]`` are ``Float8InferenceLinear``: its
    modules, parameters and state dict stay as they are."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        first, second = self.net[0].proj, self.net[2]
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        scale = _scale(rows, rowwise=True)
        h = _product(_quantize(rows, scale), scale, first, hidden_states.dtype)
        if first.bias is not None:
            h = h + first.bias
        q, q_scale = gelu_quantize_rows(h)
        out = _product(q, q_scale, second, hidden_states.dtype)
        if second.bias is not None:
            out = out + second.bias
        return out.reshape(*hidden_states.shape[:-1], out.shape[-1])


def fuse_feed_forward(net: torch.nn.Module) -> int:
    from diffusers.models.attention import FeedForward

    fused_class = type("FusedFloat8FeedForward", (FusedFloat8FeedForward, FeedForward), {})
    count = 0
    for module in net.modules():
        if isinstance(module, FeedForward) and isinstance(module.net[0].proj, Float8InferenceLinear) and isinstance(module.net[2], Float8InferenceLinear):
            if not module.net[0].proj.rowwise or getattr(module.net[0], "approximate", "none") != "none":
                raise ValueError("the fused feed-forward is written for rowwise float8 and the exact GELU")
            module.__class__ = fused_class
            count += 1
    return count


# ---- q, k and v as one product -------------------------------------------------------------------------------------
class Float8QKV(torch.nn.Module):
    """The float8 copies of an attention's q, k and v weights side by side (rowwise), with no parameters of its own."""

    weight_f8: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, attn: torch.nn.Module) -> None:
        super().__init__()
        weights = [attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]
        rows, cols = sum(w.shape[0] for w in weights), weights[0].shape[1]
        device = weights[0].device
        self.register_buffer("weight_f8", torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=device), persistent=False)
        self.register_buffer("weight_scale", torch.ones((1, rows), dtype=torch.float32, device=device), persistent=False)
        self.refresh(attn)

    @torch.no_grad()
    def refresh(self, attn: torch.nn.Module) -> None:
        weight = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]).detach()
        scale = _scale(weight, rowwise=True)
        self.weight_f8.copy_(_quantize(weight, scale))
        self.weight_scale.copy_(scale.reshape(self.weight_scale.shape))


class FusedQKVProcessor:
    """diffusers' ``CosmosAttnProcessor2_0`` for self-attention with q, k and v from one float8 product."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None) -> torch.Tensor:
        assert encoder_hidden_states is None and attention_mask is None, "self-attention only"
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])
        scale = _scale(rows, rowwise=True)
        return self_attention_of_rows(attn, _quantize(rows, scale), scale, hidden_states.shape, hidden_states.dtype, image_rotary_emb)


def self_attention_of_rows(attn, q8: torch.Tensor, scale: torch.Tensor, shape: torch.Size, dtype: torch.dtype,
                           image_rotary_emb: torch.Tensor | None) -> torch.Tensor:
    """Self-attention whose input rows come quantized (float8 and their scales): q, k and v as one product."""
    from diffusers.models.embeddings import apply_rotary_emb

    qkv = _product(q8, scale, attn.fused_qkv, dtype)
    qkv = qkv.reshape(*shape[:-1], qkv.shape[-1])
    query, key, value = (t.unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
        key = apply_rotary_emb(key, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).flatten(2, 3).type_as(query)
    return attn.to_out[1](attn.to_out[0](out))


def fuse_qkv(net: torch.nn.Module) -> int:
    count = 0
    for block in net.transformer_blocks:
        attn = block.attn1
        if not all(isinstance(getattr(attn, n), Float8InferenceLinear) for n in ("to_q", "to_k", "to_v")):
            continue
        if any(getattr(attn, n).bias is not None for n in ("to_q", "to_k", "to_v")) or not attn.to_q.rowwise:
            raise ValueError("the fused q, k, v product is written for bias-free rowwise float8 layers")
        attn.fused_qkv = Float8QKV(attn)
        attn.register_load_state_dict_post_hook(lambda mod, _keys: mod.fused_qkv.refresh(mod))
        attn.set_processor(FusedQKVProcessor())
        count += 1
    return count


# ---- the residual add, LayerNorm, modulation and quantization of the 2,048-wide rows, fused ----------------------------
# A block's three AdaLN-Zero norms each end in a float8 product, and the second and third start with the residual add of
# the branch before: inductor made each a looped-reduction kernel (122 to 154 us on the H100 at batch 8) over rows whose
# bytes take about 70 us. One row per program here: the row is read once, the new residual stream and its float8 copy
# written once. The modulation is per latent frame (``PerFrameAdaLayerNormZero``): row r takes frame r // tokens_per_frame.
if triton is not None:

    @triton.jit
    def _add_norm_quantize_kernel(x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, h_ptr, q_ptr, s_ptr, n_cols,
                                  tokens_per_frame, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        frame = row // tokens_per_frame
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        x = tl.load(x_ptr + row * n_cols + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:  # h = x + gate * y, stored in the stream's dtype, and normalized as stored
            y = tl.load(y_ptr + row * n_cols + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(gate_ptr + frame * n_cols + offs, mask=mask, other=0.0).to(tl.float32)
            h = (x + g * y).to(h_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            tl.store(h_ptr + row * n_cols + offs, h, mask=mask)
            x = h.to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        centered = tl.where(mask, x - mean, 0.0)
        var = tl.sum(centered * centered, axis=0) / n_cols
        shift = tl.load(shift_ptr + frame * n_cols + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + frame * n_cols + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.where(mask, centered * tl.rsqrt(var + eps) * (1.0 + scale) + shift, 0.0)
        row_scale = tl.maximum(tl.max(tl.abs(m), axis=0), 1e-12) / 448.0
        q = tl.clamp(m / row_scale, -448.0, 448.0)
        tl.store(q_ptr + row * n_cols + offs, q.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=mask)
        tl.store(s_ptr + row, row_scale)


def add_norm_quantize_reference(x: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None, shift: torch.Tensor,
                                scale: torch.Tensor, tokens_per_frame: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch twin of the kernel: (h, float8 rows, row scales) of LayerNorm(h) * (1 + scale) + shift, h = x + gate * y."""
    def per_row(t: torch.Tensor) -> torch.Tensor:
        return t.float().repeat_interleave(tokens_per_frame, dim=0)

    h = x if y is None else (x.float() + per_row(gate) * y.float()).to(x.dtype)
    m = F.layer_norm(h.float(), (h.shape[-1],), eps=eps) * (1 + per_row(scale)) + per_row(shift)
    row_scale = _scale(m, rowwise=True)
    return h, _quantize(m, row_scale), row_scale


def _add_norm_quantize(x, y, gate, shift, scale, tokens_per_frame: int, eps: float):
    if triton is None or (x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"):
        return add_norm_quantize_reference(x, y, gate, shift, scale, tokens_per_frame, eps)
    rows, n = x.shape
    h = torch.empty_like(x) if y is not None else x
    q = torch.empty((rows, n), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    _add_norm_quantize_kernel[(rows,)](x, y if y is not None else x, gate if gate is not None else shift, shift, scale, h, q, s,
                                       n, tokens_per_frame, eps, HAS_RESIDUAL=y is not None, BLOCK=triton.next_power_of_2(n),
                                       num_warps=4)
    return h, q, s


@torch.library.custom_op("cosmos_research::add_norm_quantize", mutates_args=())
def add_norm_quantize(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                      tokens_per_frame: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, n) x, y; (frames, n) gate, shift, scale -> h = x + gate * y, and the float8 rows and (rows, 1) scales of
    LayerNorm(h) * (1 + scale) + shift."""
    return _add_norm_quantize(x.contiguous(), y.contiguous(), gate.contiguous(), shift.contiguous(), scale.contiguous(),
                              tokens_per_frame, eps)


@add_norm_quantize.register_fake
def _(x, y, gate, shift, scale, tokens_per_frame, eps):
    return (torch.empty_like(x), torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
            torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device))


@torch.library.custom_op("cosmos_research::norm_quantize", mutates_args=())
def norm_quantize(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, tokens_per_frame: int,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_norm_quantize`` without the residual add (a block's first norm): the float8 rows and their scales."""
    _, q, s = _add_norm_quantize(x.contiguous(), None, None, shift.contiguous(), scale.contiguous(), tokens_per_frame, eps)
    return q, s


@norm_quantize.register_fake
def _(x, shift, scale, tokens_per_frame, eps):
    return torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device), torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)


def _modulation(norm: torch.nn.Module, embedded_timestep: torch.Tensor, temb: torch.Tensor | None, b: int, frames: int):
    """``PerFrameAdaLayerNormZero``'s shift, scale and gate, each (B x frames, D) (one row per latent frame)."""
    tpf = norm.tokens_per_frame
    e = embedded_timestep.view(b, frames, tpf, -1)[:, :, 0]
    e = norm.linear_2(norm.linear_1(norm.activation(e)))
    if temb is not None:
        e = e + temb.view(b, frames, tpf, -1)[:, :, 0]
    return [t.reshape(b * frames, -1) for t in e.chunk(3, dim=-1)]


class FusedFloat8Block:
    """A Cosmos transformer block whose three norms run as ``norm_quantize`` / ``add_norm_quantize``, feeding its float8
    products already quantized: the self-attention's fused q, k, v, the cross-attention's query, the MLP (through
    ``gelu_quantize_rows``). Mixed into the block's own class, so modules and state dict stay as they are."""

    def forward(self, hidden_states, encoder_hidden_states, embedded_timestep, temb=None, image_rotary_emb=None,
                extra_pos_emb=None, attention_mask=None, controlnet_residual=None, latents=None, block_idx=None):
        if self.before_proj is not None or self.after_proj is not None or controlnet_residual is not None:
            raise ValueError("FusedFloat8Block: no control-net projections or residuals")
        if extra_pos_emb is not None:
            hidden_states = hidden_states + extra_pos_emb
        b, n, d = hidden_states.shape
        tpf, eps = self.norm1.tokens_per_frame, self.norm1.norm.eps
        frames = n // tpf
        (shift1, scale1, gate1), (shift2, scale2, gate2), (shift3, scale3, gate3) = (
            _modulation(norm, embedded_timestep, temb, b, frames) for norm in (self.norm1, self.norm2, self.norm3))
        x = hidden_states.reshape(b * n, d)
        q8, s8 = norm_quantize(x, shift1, scale1, tpf, eps)
        attn = self_attention_of_rows(self.attn1, q8, s8, hidden_states.shape, hidden_states.dtype, image_rotary_emb)
        x, q8, s8 = add_norm_quantize(x, attn.reshape(b * n, d), gate1, shift2, scale2, tpf, eps)
        cross = self._cross_attention(q8, s8, hidden_states.shape, hidden_states.dtype, encoder_hidden_states, attention_mask)
        x, q8, s8 = add_norm_quantize(x, cross.reshape(b * n, d), gate2, shift3, scale3, tpf, eps)
        first, second = self.ff.net[0].proj, self.ff.net[2]
        g8, gs = gelu_quantize_rows(_product(q8, s8, first, hidden_states.dtype))
        ff = _product(g8, gs, second, hidden_states.dtype)
        out = x.view(b, frames, tpf, d) + gate3.view(b, frames, 1, d) * ff.view(b, frames, tpf, d)
        return out.view(b, n, d)

    def _cross_attention(self, q8, s8, shape, dtype, encoder_hidden_states, attention_mask):
        attn = self.attn2
        query = _product(q8, s8, attn.to_q, dtype).reshape(*shape[:-1], -1)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = (t.unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if key.shape[1] != query.shape[1]:  # grouped keys and values, as diffusers' processor repeats them
            key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def fuse_norms(net: torch.nn.Module) -> int:
    """The whole block fused (its q, k, v and MLP with it): returns how many blocks."""
    from cosmos_policy.denoiser import PerFrameAdaLayerNormZero

    if not any(hasattr(b.attn1, "fused_qkv") for b in net.transformer_blocks):
        fuse_qkv(net)
    count = 0
    for block in net.transformer_blocks:
        layers = [block.attn1.to_q, block.attn2.to_q, block.ff.net[0].proj, block.ff.net[2]]
        if not hasattr(block.attn1, "fused_qkv") or not all(isinstance(m, Float8InferenceLinear) and m.rowwise for m in layers):
            continue
        if not all(isinstance(getattr(block, f"norm{i}"), PerFrameAdaLayerNormZero) for i in (1, 2, 3)):
            raise ValueError("the fused block is written for the per-frame AdaLN-Zero norms (cosmos_policy.denoiser)")
        if any(m.bias is not None for m in layers) or getattr(block.ff.net[0], "approximate", "none") != "none":
            raise ValueError("the fused block is written for bias-free products and the exact GELU")
        block.__class__ = type("FusedFloat8Block", (FusedFloat8Block, type(block)), {})
        count += 1
    return count


FUSIONS = {"qkv": fuse_qkv, "ffn": fuse_feed_forward, "norms": fuse_norms}


# ---- the measurements ------------------------------------------------------------------------------------------------
def outputs(policy, observations, seeds) -> np.ndarray:
    return np.stack([c.actions for c in policy.predict(observations, seeds)])


def check(config: str, device: torch.device, fusions: list[str]) -> dict[str, object]:
    """The fused network's actions against the unfused float8 network's, same observations and seeds, eagerly."""
    from inference_speed import observation, parts

    from cosmos_policy.policy import CosmosPolicy, PolicyConfig

    model, stats, text = parts("libero", config, device)
    model.accelerate("rowwise", "off", field="research")
    policy = CosmosPolicy(model, stats, text, PolicyConfig(action_steps=5, prefix_encode=True))
    obs = [observation(model.layout, 256, seed=100 + i) for i in range(8)]
    seeds = list(range(8))
    unfused, other = outputs(policy, obs, seeds), outputs(policy, obs, [s + 1000 for s in seeds])
    counts = {name: FUSIONS[name](model.denoiser.net) for name in fusions}
    fused = outputs(policy, obs, seeds)
    state = {k: v.clone() for k, v in model.denoiser.net.state_dict().items()}
    model.denoiser.net.load_state_dict(state)  # the post-hooks refresh the fused copies: the same numbers again
    again = outputs(policy, obs, seeds)
    spread = float(np.abs(other - unfused).mean())
    return {"fused": counts, "mean_abs_action_error": round(float(np.abs(fused - unfused).mean()), 5),
            "max_abs_action_error": round(float(np.abs(fused - unfused).max()), 5), "seed_spread": round(spread, 5),
            "error_over_seed_spread": round(float(np.abs(fused - unfused).mean()) / max(spread, 1e-12), 4),
            "same_after_reload": bool(np.array_equal(fused, again)), "state_dict_keys_unchanged": sorted(state) == sorted(model.denoiser.net.state_dict())}


def serve(variant: list[str], args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """The variant compiled into CUDA graphs as the policy server does, and N = ``args.batch`` clients served."""
    from inference_speed import observation, parts
    from serving import measure

    from actors.config import ServerConfig
    from actors.policy_server import BatchingServer
    from cosmos_policy.model import GRAPHS_OPTIONS
    from cosmos_policy.policy import CosmosPolicy, PolicyConfig

    model, stats, text = parts("libero", "2b", device)
    model.accelerate("rowwise", "off", field="research")
    counts = {name: FUSIONS[name](model.denoiser.net) for name in variant}
    model.denoiser.net.compile(fullgraph=True, dynamic=False, options={**GRAPHS_OPTIONS, "triton.cudagraphs": True})
    model.enable_prefix_encoder(max_clips=args.batch, compile=True, channels_last=True)
    policy = CosmosPolicy(model, stats, text, PolicyConfig(action_steps=5, prefix_encode=True))
    server = BatchingServer(policy, config=ServerConfig(max_batch=args.batch, max_wait_ms=2.0, batch_sizes=[args.batch]))
    start = time.perf_counter()
    server.warm_up(observation(model.layout, 256))
    warm = time.perf_counter() - start
    args.warmup_s, args.plan_every, args.image_size = 2.0, 0, 256
    row = measure(server, args.batch, args, model.layout, device)
    return {"fused": counts, "warm_up_s": round(warm, 1), **row}


def _us(fn) -> float:
    """Mean microseconds of ``fn`` on the GPU, 50 calls after 5."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - start) / 50 * 1e6, 1)


def _difference(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The largest difference between two (float8 rows, row scales) pairs, dequantized."""
    return round(float((a[0].float() * a[1] - b[0].float() * b[1]).abs().max()), 5)


def kernel_times(device: torch.device, rows: int = 8 * 1764, tokens_per_frame: int = 196) -> dict[str, object]:
    """Each fusion's kernels alone on the rows of batch 8 (LIBERO: 9 latent frames of 196 tokens a query), in us,
    against inductor's compile of their torch twins (the product's options: multi_kernel), with their numbers' largest
    difference, and the bytes' time at 3 TB/s."""
    from cosmos_policy.model import GRAPHS_OPTIONS

    def compiled(fn):
        return torch.compile(fn, dynamic=False, options=dict(GRAPHS_OPTIONS))

    out: dict[str, object] = {}
    h = torch.randn(rows, 8192, device=device, dtype=torch.bfloat16)
    twin, fused = compiled(gelu_quantize_rows_reference), torch.ops.cosmos_research.gelu_quantize_rows
    out["gelu_quantize"] = {"inductor_us": _us(lambda: twin(h)), "triton_us": _us(lambda: fused(h)),
                            "max_dequantized_difference": _difference(twin(h), fused(h)),
                            "bytes_time_us_at_3TBps": round(h.numel() * 3 / 3e12 * 1e6, 1)}
    d, frames = 2048, rows // tokens_per_frame
    x, y = (torch.randn(rows, d, device=device, dtype=torch.bfloat16) for _ in range(2))
    gate, shift, scale = (0.5 * torch.randn(frames, d, device=device, dtype=torch.bfloat16) for _ in range(3))
    twin = compiled(lambda *a: add_norm_quantize_reference(*a, tokens_per_frame, 1e-6))
    fused = torch.ops.cosmos_research.add_norm_quantize
    (h1, *q1), (h2, *q2) = twin(x, y, gate, shift, scale), fused(x, y, gate, shift, scale, tokens_per_frame, 1e-6)
    out["add_norm_quantize"] = {"inductor_us": _us(lambda: twin(x, y, gate, shift, scale)),
                                "triton_us": _us(lambda: fused(x, y, gate, shift, scale, tokens_per_frame, 1e-6)),
                                "residual_max_difference": round(float((h1.float() - h2.float()).abs().max()), 5),
                                "max_dequantized_difference": _difference(q1, q2),
                                "bytes_time_us_at_3TBps": round(rows * d * (2 + 2 + 2 + 1) / 3e12 * 1e6, 1)}
    twin = compiled(lambda *a: add_norm_quantize_reference(a[0], None, None, *a[1:], tokens_per_frame, 1e-6)[1:])
    fused = torch.ops.cosmos_research.norm_quantize
    out["norm_quantize"] = {"inductor_us": _us(lambda: twin(x, shift, scale)), "triton_us": _us(lambda: fused(x, shift, scale, tokens_per_frame, 1e-6)),
                            "max_dequantized_difference": _difference(twin(x, shift, scale), fused(x, shift, scale, tokens_per_frame, 1e-6)),
                            "bytes_time_us_at_3TBps": round(rows * d * 3 / 3e12 * 1e6, 1)}
    # q, k and v: three 2048 x 2048 float8 products against one 2048 x 6144 on the same quantized rows
    row_scale = _scale(x, rowwise=True)
    q8 = _quantize(x, row_scale)
    weights = [torch.randn(d, d, device=device, dtype=torch.bfloat16) for _ in range(3)]
    singles = [(_quantize(w, _scale(w, rowwise=True)), _scale(w, rowwise=True).reshape(1, -1)) for w in weights]
    joined = torch.cat(weights)
    joined = (_quantize(joined, _scale(joined, rowwise=True)), _scale(joined, rowwise=True).reshape(1, -1))

    def product(w8, ws):
        return torch._scaled_mm(q8, w8.t(), scale_a=row_scale, scale_b=ws, out_dtype=torch.bfloat16, use_fast_accum=True)

    three, one = _us(lambda: [product(*w) for w in singles]), _us(lambda: product(*joined))
    flop = 2 * rows * d * 3 * d
    out["qkv_products"] = {"three_us": three, "one_us": one, "three_tflops": round(flop / three / 1e6, 1), "one_tflops": round(flop / one / 1e6, 1),
                           "max_difference": round(float((torch.cat([product(*w) for w in singles], dim=1).float() - product(*joined).float()).abs().max()), 5)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="none,qkv+ffn", help="comma-separated; each a '+'-joined set of fusions, or none")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0, help="the clock per served variant (8-second windows differ by one batch, 6 %%)")
    parser.add_argument("--serve-only", action="store_true", help="skip the kernel and output checks")
    parser.add_argument("--cpu-check", action="store_true", help="the output check alone, tiny network, on a CPU")
    args = parser.parse_args()
    variants = [[] if v == "none" else v.split("+") for v in args.variants.split(",")]
    for v in variants:
        for name in v:
            if name not in FUSIONS:
                parser.error(f"--variants: unknown fusion {name!r} (known: {sorted(FUSIONS)})")
    if args.cpu_check:
        for v in [v for v in variants if v]:
            print(json.dumps({"check": "+".join(v), "config": "tiny", **check("tiny", torch.device("cpu"), v)}), flush=True)
        return 0
    device = torch.device("cuda")
    if not args.serve_only:
        print(json.dumps({"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "kernels": kernel_times(device)}), flush=True)
        for v in [v for v in variants if v]:
            print(json.dumps({"check": "+".join(v), "config": "2b", **check("2b", device, v)}), flush=True)
            torch.cuda.empty_cache()
    if len(variants) == 1:
        print(json.dumps({"serve": "+".join(variants[0]) or "none", **serve(variants[0], args, device)}), flush=True)
        return 0
    torch.cuda.empty_cache()
    for v in variants:  # a process each: torch 2.11's CUDA graph trees fail on a second server's thread (above)
        command = [sys.executable, __file__, "--serve-only", "--variants", "+".join(v) or "none",
                   "--batch", str(args.batch), "--seconds", str(args.seconds)]
        if subprocess.run(command).returncode:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
