"""Fusions of the float8 network's elementwise work, measured on a GPU before one went into the product.

research/serving's kernel profile of a served batch (batch 8, float8 rowwise, CUDA graphs) put the 2048 x 2048
products at 785 TFLOP/s against 1,181 for the MLP's 2048 x 8192, and the elementwise kernels between the products at
about twice their bytes' time. Three fusions were tried:

- ``qkv``: the self-attention's q, k and v as one float8 product (2048 -> 6144) on one quantized input;
- ``ffn``: the MLP's GELU and the row-wise float8 quantization of its output in one Triton kernel;
- ``norms`` (the whole block, q, k, v and MLP fused too): each of a block's three AdaLN-Zero norms with the residual add
  before it and the float8 quantization after it in one Triton kernel, the block's forward written around them.

On an H200 (``results/2026-12-07_fusions_h200.jsonl``) ``qkv`` and ``ffn`` alone served no more than the run-to-run
spread of 8-second windows (unfused 16.12 and 15.85 queries/s, qkv 16.09, ffn 16.17, both 15.71); their code left with
that result. On an H100 (``results/2026-12-07_norms_h100.jsonl``) ``norms`` served 16.61 and 16.66 queries/s against
15.10 and 15.24 unfused (N = 8, 20 and 30 s windows, each variant in its own process, both orders), its kernels 112,
87 and 185 us against inductor's 141, 107 and 251, the actions 0.0095 of the seed spread from the unfused network's.
It is now the product's ``cosmos_policy.fused_float8`` (rowwise float8's default); this script measures it against
the plain float8 layers (``convert_inference_float8(..., fuse=False)``).

For each variant (``none``, ``norms``, ``norms+qk``) it builds the 2b policy at LIBERO shapes in float8 rowwise, measures the fused
outputs against the unfused ones on 8 fixed observations and seeds (eagerly, next to the seed-to-seed spread), compiles
it into CUDA graphs as the policy server does and serves N = ``--batch`` closed-loop clients for ``--seconds``
(bench/serving.py's loop). ``kernel_times`` times the fused kernels alone at batch 8 against inductor's compile of their
torch twins, and the q, k, v products three against one. ``--cpu-check`` runs the output check with the tiny network on
a CPU (the torch twins). One JSON line each. On torch 2.11 each served variant needs a process of its own (the script
starts one for each): CUDA graph trees keep their state in the thread that first used them, so a second server's
compiled graphs, run on its own new passes thread, fail (pytorch/pytorch#123177, fixed in later torch). The product
makes one server per process.

``qk`` (on top of ``norms``, research only, not yet run on a GPU): the attention's q and k RMS norms and rotary
embedding in one Triton kernel a tensor (``rms_norm_rope``), read straight from the q, k, v product's rows. On a CPU its
torch twin gives the plain network's actions exactly (``--cpu-check --variants norms+qk``); Triton 3.6's interpreter
(``TRITON_INTERPRET=1``, triton on the path) runs the kernel on 392 rows of 2b's 16 heads of 128 with every value
equal to the twin's but for the interpreter's float32 -> bfloat16 rounding toward zero: with that rounding emulated at
the kernel's three roundings, all but 3 of 802,816 values are equal (those 3 one bf16 step apart).

    python research/serving/fusions.py --variants none,norms,norms+qk --seconds 20   # kernels, checks, 3 served: ~10 min
    python research/serving/fusions.py --serve-only --variants norms,none --seconds 30
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cosmos_policy.float8 import _quantize, _scale, convert_inference_float8  # noqa: E402
from cosmos_policy.fused_float8 import (  # noqa: E402
    add_norm_quantize,
    add_norm_quantize_reference,
    fuse_float8_blocks,
    gelu_quantize_rows,
    gelu_quantize_rows_reference,
    norm_quantize,
)

from cosmos_policy.fused_float8 import FusedFloat8Block, _layer_product, _product, attend  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU machine without triton: the torch twin below
    triton = None


# ---- the attention's q and k norms and rotary embedding, fused (``qk``, after ``norms``) ------------------------------
# The fused block's profile left these as the largest elementwise kernels: the q and k RMS norms over each head's 128
# channels and the rotary embedding ran as three kernels a block pass (152, 34 and 31 us at batch 8 on the H100; 4.7 %,
# 1.1 % and 1.0 % of a served batch's GPU time, ``results/2026-12-07_profile_b8_multi_kernel_h100.txt``), and the
# cross-attention's query norm as one more. Here one kernel a tensor, one token row per program (all heads at once): it
# reads the row straight out of the q, k, v product (v is left a view) and writes the normed, rotated row, with the
# roundings diffusers' RMSNorm and ``apply_rotary_emb`` make (to bf16 after the norm, after the weight, after the
# rotation). Bytes: 58 MB read and written a tensor at batch 8, about 40 us at 3 TB/s.
if triton is not None:

    @triton.jit
    def _rms_norm_rope_kernel(x_ptr, x_stride, w_ptr, cos_ptr, sin_ptr, out_ptr, tokens, eps, HEADS: tl.constexpr,
                              HEAD_DIM: tl.constexpr, HAS_ROPE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, HEADS)[:, None]
        d = tl.arange(0, HEAD_DIM)[None, :]
        x = tl.load(x_ptr + row * x_stride + h * HEAD_DIM + d).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]  # one scale per head
        w = tl.load(w_ptr + d).to(tl.float32)
        n = ((x * r).to(tl.bfloat16).to(tl.float32) * w).to(tl.bfloat16).to(tl.float32)
        if HAS_ROPE:  # diffusers' use_real_unbind_dim=-2: channel c pairs with c +- HEAD_DIM / 2
            half: tl.constexpr = HEAD_DIM // 2
            dp = (d + half) % HEAD_DIM
            xp = tl.load(x_ptr + row * x_stride + h * HEAD_DIM + dp).to(tl.float32)
            wp = tl.load(w_ptr + dp).to(tl.float32)
            npair = ((xp * r).to(tl.bfloat16).to(tl.float32) * wp).to(tl.bfloat16).to(tl.float32)
            token = row % tokens
            cos = tl.load(cos_ptr + token * HEAD_DIM + d)
            sin = tl.load(sin_ptr + token * HEAD_DIM + d)
            n = n * cos + tl.where(d < half, -npair, npair) * sin
        tl.store(out_ptr + row * (HEADS * HEAD_DIM) + h * HEAD_DIM + d, n.to(tl.bfloat16))


def rms_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                            heads: int, eps: float) -> torch.Tensor:
    """diffusers' RMSNorm of each head, then ``apply_rotary_emb`` (real, unbind -2), on (rows, heads x head_dim) rows."""
    from diffusers.models.embeddings import apply_rotary_emb

    rows, width = x.shape
    v = x.reshape(rows, heads, width // heads)
    variance = v.float().pow(2).mean(-1, keepdim=True)
    n = v * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        n = n.to(weight.dtype)
    n = n * weight
    if cos is not None:
        tokens = cos.shape[0]
        n = n.reshape(rows // tokens, tokens, heads, -1).transpose(1, 2)  # (B, H, N, Dh) as the processor has it
        n = apply_rotary_emb(n, (cos, sin), use_real=True, use_real_unbind_dim=-2).transpose(1, 2)
    return n.reshape(rows, width).to(x.dtype)


@torch.library.custom_op("cosmos_research::rms_norm_rope", mutates_args=())
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, heads: int,
                  eps: float) -> torch.Tensor:
    """(rows, heads x head_dim) rows (a view with any row stride) -> their per-head RMS norm (and rotary embedding: cos,
    sin (tokens, head_dim), row r at token r % tokens), (rows, heads x head_dim) contiguous."""
    rows, width = x.shape
    use_kernel = (triton is not None and x.device.type == "cuda" and x.dtype == torch.bfloat16 and x.stride(1) == 1
                  and weight.dtype == torch.bfloat16 and heads & (heads - 1) == 0 and (width // heads) & (width // heads - 1) == 0)
    if not use_kernel:
        return rms_norm_rope_reference(x, weight, cos, sin, heads, eps)
    out = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    rope = cos is not None
    _rms_norm_rope_kernel[(rows,)](x, x.stride(0), weight, cos.contiguous() if rope else weight, sin.contiguous() if rope else weight,
                                   out, cos.shape[0] if rope else 1, eps, HEADS=heads, HEAD_DIM=width // heads, HAS_ROPE=rope,
                                   num_warps=4)
    return out


@rms_norm_rope.register_fake
def _(x, weight, cos, sin, heads, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


class FusedQKBlock(FusedFloat8Block):
    """The product's fused block with the attention's q and k norms and rotary embedding in ``rms_norm_rope``."""

    def _self_attention(self, q8, s8, shape, dtype, image_rotary_emb):
        attn = self.attn1
        b, n, d = shape
        qkv = _product(q8, s8, attn.qkv_f8, attn.qkv_scale, dtype)  # (B x N, 3 D)
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        query = rms_norm_rope(qkv[:, :d], attn.norm_q.weight, cos, sin, attn.heads, attn.norm_q.eps)
        key = rms_norm_rope(qkv[:, d:2 * d], attn.norm_k.weight, cos, sin, attn.heads, attn.norm_k.eps)
        query, key, value = (t.reshape(b, n, attn.heads, -1).transpose(1, 2) for t in (query, key, qkv[:, 2 * d:]))
        return attend(attn, query, key, value, None)

    def _cross_attention(self, q8, s8, shape, dtype, encoder_hidden_states, attention_mask):
        attn = self.attn2
        b, n, d = shape
        query = rms_norm_rope(_layer_product(q8, s8, attn.to_q, dtype), attn.norm_q.weight, None, None, attn.heads, attn.norm_q.eps)
        query = query.reshape(b, n, attn.heads, -1).transpose(1, 2)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        key, value = (t.unflatten(2, (attn.heads, -1)).transpose(1, 2) for t in (key, value))
        return attend(attn, query, attn.norm_k(key), value, attention_mask)


def fuse_qk(net: torch.nn.Module) -> int:
    """The product's fused blocks (``norms`` first) made ``FusedQKBlock``: returns how many."""
    count = 0
    for block in net.transformer_blocks:
        if type(block) is FusedFloat8Block and block.attn1.norm_q.weight is not None and block.attn2.norm_q.weight is not None:
            block.__class__ = FusedQKBlock
            count += 1
    return count


FUSIONS = {"norms": fuse_float8_blocks, "qk": fuse_qk}  # norms: the product's fused block; qk: on top of it


# ---- the measurements ------------------------------------------------------------------------------------------------
def outputs(policy, observations, seeds) -> np.ndarray:
    return np.stack([c.actions for c in policy.predict(observations, seeds)])


def check(config: str, device: torch.device, fusions: list[str]) -> dict[str, object]:
    """The fused network's actions against the unfused float8 network's, same observations and seeds, eagerly."""
    from inference_speed import observation, parts

    from cosmos_policy.policy import CosmosPolicy, PolicyConfig

    model, stats, text = parts("libero", config, device)
    convert_inference_float8(model.denoiser.net, "rowwise", field="research", fuse=False)  # the plain float8 layers
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
    convert_inference_float8(model.denoiser.net, "rowwise", field="research", fuse=False)  # the plain float8 layers
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
    twin, fused = compiled(gelu_quantize_rows_reference), gelu_quantize_rows
    out["gelu_quantize"] = {"inductor_us": _us(lambda: twin(h)), "triton_us": _us(lambda: fused(h)),
                            "max_dequantized_difference": _difference(twin(h), fused(h)),
                            "bytes_time_us_at_3TBps": round(h.numel() * 3 / 3e12 * 1e6, 1)}
    d, frames = 2048, rows // tokens_per_frame
    x, y = (torch.randn(rows, d, device=device, dtype=torch.bfloat16) for _ in range(2))
    gate, shift, scale = (0.5 * torch.randn(frames, d, device=device, dtype=torch.bfloat16) for _ in range(3))
    twin = compiled(lambda *a: add_norm_quantize_reference(*a, tokens_per_frame, 1e-6))
    fused = add_norm_quantize
    (h1, *q1), (h2, *q2) = twin(x, y, gate, shift, scale), fused(x, y, gate, shift, scale, tokens_per_frame, 1e-6)
    out["add_norm_quantize"] = {"inductor_us": _us(lambda: twin(x, y, gate, shift, scale)),
                                "triton_us": _us(lambda: fused(x, y, gate, shift, scale, tokens_per_frame, 1e-6)),
                                "residual_max_difference": round(float((h1.float() - h2.float()).abs().max()), 5),
                                "max_dequantized_difference": _difference(q1, q2),
                                "bytes_time_us_at_3TBps": round(rows * d * (2 + 2 + 2 + 1) / 3e12 * 1e6, 1)}
    twin = compiled(lambda *a: add_norm_quantize_reference(a[0], None, None, *a[1:], tokens_per_frame, 1e-6)[1:])
    fused = norm_quantize
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
    # the q or k rows of the fused product's output (a view, row stride 3 D): norm and rotary, against inductor's twin
    heads, head_dim = 16, 128
    qkv = torch.randn(rows, 3 * d, device=device, dtype=torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(head_dim, device=device)).to(torch.bfloat16)
    angles = torch.rand(tokens_per_frame * 9, head_dim, device=device) * 6.28
    cos, sin = angles.cos(), angles.sin()
    twin = compiled(lambda x: rms_norm_rope_reference(x, weight, cos, sin, heads, 1e-6))
    a, b = twin(qkv[:, :d]), rms_norm_rope(qkv[:, :d], weight, cos, sin, heads, 1e-6)
    out["rms_norm_rope"] = {"inductor_us": _us(lambda: twin(qkv[:, :d])), "triton_us": _us(lambda: rms_norm_rope(qkv[:, :d], weight, cos, sin, heads, 1e-6)),
                            "max_difference": round(float((a.float() - b.float()).abs().max()), 5),
                            "bytes_time_us_at_3TBps": round(rows * d * 4 / 3e12 * 1e6, 1)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="none,norms", help="comma-separated; each a '+'-joined set of fusions, or none")
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
