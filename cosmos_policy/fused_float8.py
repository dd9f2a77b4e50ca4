"""Fused float8 transformer blocks: the elementwise work between a block's float8 products in three Triton kernels.

With float8 products (``cosmos_policy.float8``, ``rowwise``), a served batch spends about a third of its GPU time in the
elementwise kernels between the products, and inductor makes the three AdaLN-Zero norms looped-reduction kernels of
122 to 154 us a block (batch 8, H100) over bytes that take about 70 us. ``FusedFloat8Block`` runs a block around three
kernels, each one row per program, the row read once:

- ``norm_quantize``: the first norm, LayerNorm and its per-frame modulation, then the row-wise float8 quantization of
  the self-attention's input;
- ``add_norm_quantize``: the residual add of the branch before (``x + gate * y``), the next norm, its modulation and
  the quantization (before the cross-attention and before the MLP);
- ``gelu_quantize_rows``: the MLP's GELU and the quantization of the second product's input.

The self-attention's q, k and v come from one 2048 -> 6144 product on the one quantized input. Measured on an H100
(batch 8, CUDA graphs, N = 8 closed-loop clients, 20 and 30 s windows, one process each, in both orders): 16.61 and
16.66 queries/s against 15.10 and 15.24 unfused (``research/serving/results/2026-12-07_norms_h100.jsonl``); actions
differ from the unfused float8 network's by 0.0095 of the seed-to-seed spread (one float32 rounding of the residual
add instead of two bf16 ones, and a different reduction order).

The block's modules, parameters and state dict stay as they are: the class of each block is swapped, the q, k and v
layers' float8 copies become views into one joined buffer (their ``load_state_dict`` post-hooks refresh it in place,
so CUDA graphs captured on it stay valid across versions). On a CPU, or with shapes the kernels are not written for
(one timestep per sample, a control-net), the same arithmetic runs in torch, or the block's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_cosmos import CosmosTransformerBlock

from cosmos_policy.denoiser import PerFrameAdaLayerNormZero
from cosmos_policy.float8 import Float8InferenceLinear, _quantize, _scale

try:
    import triton
    import triton.language as tl
except ImportError:  # torch without CUDA: the torch twins below run instead
    triton = None


def _use_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.device.type == "cuda"


# ---- the kernels -----------------------------------------------------------------------------------------------------
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

    @triton.jit
    def _add_norm_quantize_kernel(x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, h_ptr, q_ptr, s_ptr, n_cols,
                                  tokens_per_frame, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        frame = row // tokens_per_frame  # tokens are frame-major: row r takes its frame's modulation
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


def gelu_quantize_rows_reference(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's arithmetic in torch: GELU in float32, then one float8 scale per row."""
    y = F.gelu(h.float())
    scale = _scale(y, rowwise=True)
    return _quantize(y, scale), scale


def add_norm_quantize_reference(x: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None, shift: torch.Tensor,
                                scale: torch.Tensor, tokens_per_frame: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's arithmetic in torch: h = x + gate * y (or x), and the float8 rows and row scales of
    LayerNorm(h) * (1 + scale) + shift, the modulation rows repeated over each frame's tokens."""
    def per_row(t: torch.Tensor) -> torch.Tensor:
        return t.float().repeat_interleave(tokens_per_frame, dim=0)

    h = x if y is None else (x.float() + per_row(gate) * y.float()).to(x.dtype)
    m = F.layer_norm(h.float(), (h.shape[-1],), eps=eps) * (1 + per_row(scale)) + per_row(shift)
    row_scale = _scale(m, rowwise=True)
    return h, _quantize(m, row_scale), row_scale


@torch.library.custom_op("cosmos_policy::gelu_quantize_rows", mutates_args=())
def gelu_quantize_rows(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, n) -> the (rows, n) float8 e4m3 values and (rows, 1) float32 scales of GELU(h), one scale per row."""
    if not _use_triton(h):
        return gelu_quantize_rows_reference(h)
    rows, n = h.shape
    h = h.contiguous()
    q = torch.empty((rows, n), dtype=torch.float8_e4m3fn, device=h.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=h.device)
    _gelu_quantize_rows_kernel[(rows,)](h, q, scale, n, BLOCK=triton.next_power_of_2(n), num_warps=8)
    return q, scale


@gelu_quantize_rows.register_fake
def _(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(h.shape, dtype=torch.float8_e4m3fn, device=h.device),
            torch.empty((h.shape[0], 1), dtype=torch.float32, device=h.device))


def _add_norm_quantize(x: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None, shift: torch.Tensor,
                       scale: torch.Tensor, tokens_per_frame: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not _use_triton(x):
        return add_norm_quantize_reference(x, y, gate, shift, scale, tokens_per_frame, eps)
    rows, n = x.shape
    h = torch.empty_like(x) if y is not None else x
    q = torch.empty((rows, n), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    _add_norm_quantize_kernel[(rows,)](x, y if y is not None else x, gate if gate is not None else shift, shift, scale, h, q, s,
                                       n, tokens_per_frame, eps, HAS_RESIDUAL=y is not None, BLOCK=triton.next_power_of_2(n),
                                       num_warps=4)
    return h, q, s


@torch.library.custom_op("cosmos_policy::add_norm_quantize", mutates_args=())
def add_norm_quantize(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                      tokens_per_frame: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, n) x, y and (frames, n) gate, shift, scale -> h = x + gate * y, and the float8 rows and (rows, 1) scales of
    LayerNorm(h) * (1 + scale) + shift; row r belongs to frame r // tokens_per_frame."""
    return _add_norm_quantize(x.contiguous(), y.contiguous(), gate.contiguous(), shift.contiguous(), scale.contiguous(),
                              tokens_per_frame, eps)


@add_norm_quantize.register_fake
def _(x, y, gate, shift, scale, tokens_per_frame, eps):
    return (torch.empty_like(x), torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
            torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device))


@torch.library.custom_op("cosmos_policy::norm_quantize", mutates_args=())
def norm_quantize(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, tokens_per_frame: int,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_norm_quantize`` without the residual add (a block's first norm): the float8 rows and their scales."""
    _, q, s = _add_norm_quantize(x.contiguous(), None, None, shift.contiguous(), scale.contiguous(), tokens_per_frame, eps)
    return q, s


@norm_quantize.register_fake
def _(x, shift, scale, tokens_per_frame, eps):
    return (torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
            torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device))


# ---- the block -------------------------------------------------------------------------------------------------------
def _product(q: torch.Tensor, scale: torch.Tensor, weight_f8: torch.Tensor, weight_scale: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
    """A float8 product of rows quantized already, as ``Float8InferenceLinear.forward`` does it (no bias)."""
    out_dtype = torch.bfloat16 if dtype == torch.float32 and q.device.type == "cuda" else dtype
    out = torch._scaled_mm(q, weight_f8.t(), scale_a=scale, scale_b=weight_scale, out_dtype=out_dtype, use_fast_accum=True)
    return out.to(dtype)


def _layer_product(q: torch.Tensor, scale: torch.Tensor, layer: Float8InferenceLinear, dtype: torch.dtype) -> torch.Tensor:
    return _product(q, scale, layer.weight_f8, layer.weight_scale, dtype)


def _modulation(norm: PerFrameAdaLayerNormZero, embedded_timestep: torch.Tensor, temb: torch.Tensor | None, b: int,
                frames: int) -> list[torch.Tensor]:
    """``PerFrameAdaLayerNormZero``'s shift, scale and gate, each (B x frames, D): one row per latent frame."""
    tpf = norm.tokens_per_frame
    e = embedded_timestep.view(b, frames, tpf, -1)[:, :, 0]
    e = norm.linear_2(norm.linear_1(norm.activation(e)))
    if temb is not None:
        e = e + temb.view(b, frames, tpf, -1)[:, :, 0]
    return [t.reshape(b * frames, -1) for t in e.chunk(3, dim=-1)]


def attend(attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The rest of diffusers' ``CosmosAttnProcessor2_0`` from normed (and rotated) (B, H, N, Dh) queries and keys:
    grouped keys and values repeated, attention, the output projection."""
    if key.shape[1] != query.shape[1]:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).flatten(2, 3).type_as(query)
    return attn.to_out[1](attn.to_out[0](out))


class FusedFloat8Block(CosmosTransformerBlock):
    """diffusers' Cosmos transformer block whose norms feed its float8 products already quantized.

    Made by ``fuse_float8_blocks`` swapping an instance's class: its modules, parameters and state dict are the
    block's own. ``attn1.qkv_f8`` and ``attn1.qkv_scale`` hold the self-attention's q, k and v float8 weights side by
    side (q, k and v's own buffers are views into them)."""

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, embedded_timestep: torch.Tensor,
                temb: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None,
                extra_pos_emb: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                controlnet_residual: torch.Tensor | None = None, latents: torch.Tensor | None = None,
                block_idx: int | None = None) -> torch.Tensor:
        tpf = self.norm1.tokens_per_frame
        if (self.before_proj is not None or self.after_proj is not None or controlnet_residual is not None
                or not isinstance(encoder_hidden_states, torch.Tensor) or embedded_timestep.ndim != 3
                or hidden_states.shape[1] % tpf):  # what the kernels are not written for: the block as it was
            return super().forward(hidden_states, encoder_hidden_states, embedded_timestep, temb, image_rotary_emb,
                                   extra_pos_emb, attention_mask, controlnet_residual, latents, block_idx)
        if extra_pos_emb is not None:
            hidden_states = hidden_states + extra_pos_emb
        b, n, d = hidden_states.shape
        dtype, eps, frames = hidden_states.dtype, self.norm1.norm.eps, n // tpf
        (shift1, scale1, gate1), (shift2, scale2, gate2), (shift3, scale3, gate3) = (
            _modulation(norm, embedded_timestep, temb, b, frames) for norm in (self.norm1, self.norm2, self.norm3))
        x = hidden_states.reshape(b * n, d)
        q8, s8 = norm_quantize(x, shift1, scale1, tpf, eps)
        attn = self._self_attention(q8, s8, hidden_states.shape, dtype, image_rotary_emb)
        x, q8, s8 = add_norm_quantize(x, attn.reshape(b * n, d), gate1, shift2, scale2, tpf, eps)
        cross = self._cross_attention(q8, s8, hidden_states.shape, dtype, encoder_hidden_states, attention_mask)
        x, q8, s8 = add_norm_quantize(x, cross.reshape(b * n, d), gate2, shift3, scale3, tpf, eps)
        g8, gs = gelu_quantize_rows(_layer_product(q8, s8, self.ff.net[0].proj, dtype))
        ff = _layer_product(g8, gs, self.ff.net[2], dtype)
        out = x.view(b, frames, tpf, d) + gate3.view(b, frames, 1, d) * ff.view(b, frames, tpf, d)
        return out.view(b, n, d)

    def _self_attention(self, q8: torch.Tensor, s8: torch.Tensor, shape: torch.Size, dtype: torch.dtype,
                        image_rotary_emb: torch.Tensor | None) -> torch.Tensor:
        """diffusers' ``CosmosAttnProcessor2_0`` for self-attention, q, k and v from one product."""
        from diffusers.models.embeddings import apply_rotary_emb

        attn = self.attn1
        qkv = _product(q8, s8, attn.qkv_f8, attn.qkv_scale, dtype).reshape(*shape[:-1], -1)
        query, key, value = (t.unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
        return attend(attn, query, key, value, None)

    def _cross_attention(self, q8: torch.Tensor, s8: torch.Tensor, shape: torch.Size, dtype: torch.dtype,
                         encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """diffusers' ``CosmosAttnProcessor2_0`` for cross-attention, its query from rows quantized already."""
        attn = self.attn2
        query = _layer_product(q8, s8, attn.to_q, dtype).reshape(*shape[:-1], -1)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = (t.unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in (query, key, value))
        return attend(attn, attn.norm_q(query), attn.norm_k(key), value, attention_mask)


def _fusable(block: torch.nn.Module) -> bool:
    """A diffusers Cosmos block with per-frame norms and bias-free rowwise float8 products, the exact GELU."""
    if type(block) is not CosmosTransformerBlock:
        return False
    layers = [block.attn1.to_q, block.attn1.to_k, block.attn1.to_v, block.attn2.to_q, block.ff.net[0].proj, block.ff.net[2]]
    return (all(isinstance(m, Float8InferenceLinear) and m.rowwise and m.bias is None for m in layers)
            and all(isinstance(getattr(block, f"norm{i}"), PerFrameAdaLayerNormZero) for i in (1, 2, 3))
            and all(getattr(block, f"norm{i}").norm.weight is None for i in (1, 2, 3))
            and getattr(block.ff.net[0], "approximate", None) == "none")


@torch.no_grad()
def _join_qkv(attn: torch.nn.Module) -> None:
    """One (3 x out, in) float8 buffer for q, k and v on ``attn``; each layer's own buffers become views into it, so its
    ``refresh`` (the post-hook of every ``load_state_dict``) rewrites the joined copy in place."""
    layers = [attn.to_q, attn.to_k, attn.to_v]
    joined = torch.cat([m.weight_f8 for m in layers])
    scales = torch.cat([m.weight_scale for m in layers], dim=1)
    attn.register_buffer("qkv_f8", joined, persistent=False)
    attn.register_buffer("qkv_scale", scales, persistent=False)
    start = 0
    for m in layers:
        rows = m.weight_f8.shape[0]
        m._buffers["weight_f8"] = joined[start:start + rows]
        m._buffers["weight_scale"] = scales[:, start:start + rows]
        start += rows


def fuse_float8_blocks(net: torch.nn.Module) -> int:
    """Make each fusable transformer block of ``net`` (converted to rowwise float8 already) a ``FusedFloat8Block``;
    returns how many. Blocks it does not fit (tensorwise, no per-frame norms) stay as they are."""
    count = 0
    for block in getattr(net, "transformer_blocks", []):
        if _fusable(block):
            _join_qkv(block.attn1)
            block.__class__ = FusedFloat8Block
            count += 1
    return count


__all__ = ["FusedFloat8Block", "add_norm_quantize", "attend", "add_norm_quantize_reference", "fuse_float8_blocks",
           "gelu_quantize_rows", "gelu_quantize_rows_reference", "norm_quantize"]
