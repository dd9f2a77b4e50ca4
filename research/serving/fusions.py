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

For each variant (``none`` or ``norms``) it builds the 2b policy at LIBERO shapes in float8 rowwise, measures the fused
outputs against the unfused ones on 8 fixed observations and seeds (eagerly, next to the seed-to-seed spread), compiles
it into CUDA graphs as the policy server does and serves N = ``--batch`` closed-loop clients for ``--seconds``
(bench/serving.py's loop). ``kernel_times`` times the fused kernels alone at batch 8 against inductor's compile of their
torch twins, and the q, k, v products three against one. ``--cpu-check`` runs the output check with the tiny network on
a CPU (the torch twins). One JSON line each. On torch 2.11 each served variant needs a process of its own (the script
starts one for each): CUDA graph trees keep their state in the thread that first used them, so a second server's
compiled graphs, run on its own new passes thread, fail (pytorch/pytorch#123177, fixed in later torch). The product
makes one server per process.

    python research/serving/fusions.py --variants none,norms --seconds 20   # kernels, check, 2 served: ~7 min
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

FUSIONS = {"norms": fuse_float8_blocks}  # the product's fused block (the q, k, v product and the GELU kernel with it)


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
