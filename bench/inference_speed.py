"""Inference speed of the policy and the planner with the 2B model (issue 4). No Ray needed.

Prints and writes bench/results/inference_speed.json:
    action_chunk_s_libero_b1      median latency of one LIBERO action chunk from a raw observation
                                  (two 256x256 uint8 camera images, proprio, instruction) to
                                  un-normalized actions: JPEG round trip, centre crop, VAE encode of
                                  the conditioning frames (the constant black prefix's VAE state once,
                                  8 pixel frames per query), 5 denoising steps, read-out. Network
                                  compiled with CUDA graphs, VAE encoder compiled. Target <= 0.10 s.
    policy_peak_memory_gb_libero  peak GPU memory of that policy. Target <= 7.
    planning_gpu_s_per_chunk      GPU-seconds of one best-of-8 plan with 3 future-state x 5 value
                                  ensembles on ALOHA-shaped inputs (10 / 5 / 5 steps; 11 latent
                                  frames; about 510 network evaluations), on one GPU. Target <= 10.
    float8_output_error           with --float8: actions, value and future proprio of the float8 network
                                  against bf16 on 8 fixed observations and seeds, next to the spread of
                                  bf16 against itself with other seeds.
The planner's planning model is the policy model itself here (weights do not change the speed),
so its network is compiled once. Random weights.

    python bench/inference_speed.py [--float8 rowwise] [--skip-planning] [--no-compile] [--out PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cosmos_policy.codec import NormalizationStats  # noqa: E402
from cosmos_policy.config import load_model_config  # noqa: E402
from cosmos_policy.layout import load_layout  # noqa: E402
from cosmos_policy.model import CosmosPolicyModel  # noqa: E402
from cosmos_policy.planner import Planner, PlannerConfig  # noqa: E402
from cosmos_policy.policy import CosmosPolicy, Observation, PolicyConfig  # noqa: E402
from cosmos_policy.text import RandomTextEncoder, TextEmbeddingCache  # noqa: E402

results: dict[str, object] = {}
OUT = ROOT / "bench" / "results" / "inference_speed.json"


def emit(name: str, value: object) -> None:
    results[name] = value
    print(json.dumps({name: value}), flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1))


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_peaks(device: torch.device) -> None:
    """The measured matrix-product peaks of this GPU (8192^3, bf16 and float8 tensorwise) and the bf16 limit of a chunk."""
    if device.type != "cuda":
        return
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    bf16 = 2 * n**3 / timed(lambda: a @ b, device, 3, 20) / 1e12
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=device)
    fp8 = 2 * n**3 / timed(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True),
                           device, 3, 20) / 1e12
    emit("gemm_bf16_tflops", round(bf16, 1))
    emit("gemm_fp8_tflops", round(fp8, 1))
    # bench/model_speed.py's FLOPs of a 2b LIBERO forward (9 latent frames): 7.47 TFLOP; a chunk is 5 forwards
    emit("action_chunk_network_limit_s_bf16", round(5 * 7.47 / bf16, 4))


def parts(layout_name: str, model_cfg: str, device: torch.device):
    layout = load_layout(layout_name)
    cfg = load_model_config(model_cfg)
    with torch.device(device):
        torch.manual_seed(0)
        model = CosmosPolicyModel(cfg, layout)
    model = model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    rng = np.random.default_rng(0)
    stats = NormalizationStats.compute(rng.normal(size=(500, layout.action_dim)), rng.normal(size=(500, layout.proprio_dim)))
    text = TextEmbeddingCache()
    text.fill(RandomTextEncoder(cfg.text.embed_dim, cfg.text.max_length), ["put the bowl on the plate"])
    return model, stats, text


def observation(layout, size: int, seed: int = 0) -> Observation:
    rng = np.random.default_rng(seed)
    return Observation(
        images={c: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for c in layout.cameras},
        proprio=rng.normal(size=layout.proprio_dim),
        instruction="put the bowl on the plate",
    )


def float8_error(model, stats, text, recipe: str, device) -> None:
    """Actions, value and future proprio of float8 against bf16, on the same 8 observations and seeds, eagerly (before
    the network is compiled). The scale is the sampling's own spread: bf16 against bf16 with other seeds."""
    policy = CosmosPolicy(model, stats, text, PolicyConfig(action_steps=5, prefix_encode=True))
    obs = [observation(model.layout, 256, seed=100 + i) for i in range(8)]
    seeds = list(range(8))

    def outputs(seed_offset: int = 0) -> dict[str, np.ndarray]:
        chunks = policy.predict(obs, [s + seed_offset for s in seeds])
        return {"actions": np.stack([c.actions for c in chunks]), "value": np.array([c.value for c in chunks]),
                "future_proprio": np.stack([c.future_proprio for c in chunks])}

    bf16, other_seeds = outputs(), outputs(1000)
    used = model.accelerate(recipe, "off", field="bench")
    f8 = outputs()
    report = {"recipe": used, "observations": len(obs)}
    for name in bf16:
        err = float(np.abs(f8[name] - bf16[name]).mean())
        spread = float(np.abs(other_seeds[name] - bf16[name]).mean())
        report[name] = {"mean_abs_error": round(err, 5), "max_abs_error": round(float(np.abs(f8[name] - bf16[name]).max()), 5),
                        "seed_spread": round(spread, 5), "error_over_seed_spread": round(err / max(spread, 1e-12), 4)}
    emit("float8_output_error", report)


def float8_blocks(model) -> str:
    """Whether the float8 blocks run fused (``cosmos_policy.fused_float8``, rowwise's default) or as plain layers."""
    from cosmos_policy.fused_float8 import FusedFloat8Block

    blocks = list(getattr(model.denoiser.net, "transformer_blocks", []))
    fused = sum(isinstance(b, FusedFloat8Block) for b in blocks)
    return "fused" if blocks and fused == len(blocks) else "plain" if not fused else f"{fused} of {len(blocks)} fused"


def bench_policy(args, device) -> tuple:
    model, stats, text = parts("libero", args.config, device)
    if args.float8 != "off":
        float8_error(model, stats, text, args.float8, device)
    emit("float8", args.float8)
    emit("float8_blocks", float8_blocks(model))
    if args.compile:
        model.accelerate("off", "graphs")
    if args.prefix_encode:  # the constant leading frames' VAE state once; 8 of 13 pixel frames encoded per query
        model.enable_prefix_encoder(max_clips=8, compile=args.compile, channels_last=device.type == "cuda")
    elif args.compile:
        model.tokenizer.vae.encoder.compile(dynamic=False)
    emit("prefix_encode", args.prefix_encode)
    policy = CosmosPolicy(model, stats, text, PolicyConfig(action_steps=5, prefix_encode=args.prefix_encode))
    obs = observation(model.layout, 256)
    start = time.perf_counter()
    policy.infer(obs)
    emit("first_chunk_s_incl_compile", round(time.perf_counter() - start, 1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    emit("action_chunk_s_libero_b1", timed(lambda: policy.infer(obs), device, args.warmup, args.iters))
    if device.type == "cuda":
        emit("policy_peak_memory_gb_libero", torch.cuda.max_memory_allocated() / 2**30)
    if args.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            policy.infer(obs)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)
    # Where the time goes: preprocessing on the CPU, the VAE encode, the network.
    batch = policy.batch([obs])
    emit("preprocess_s", timed(lambda: policy.batch([obs]), device, 1, args.iters))
    emit("vae_encode_s", timed(lambda: model.encode(batch, model.layout.clean_prefix("policy")), device, 1, args.iters))
    return model


def bench_planning(args, device) -> None:
    model, stats, text = parts("aloha", args.config, device)
    # Block by block: the 28 identical blocks share one graph per batch size (a plan uses a few
    # row counts), which compiles in seconds where a dynamic whole-network graph did not finish.
    model.accelerate(args.float8, "blocks" if args.compile and args.compile_planning else "off", field="bench")
    emit("planning_compiled", bool(args.compile and args.compile_planning))
    emit("planning_float8", args.float8)
    emit("planning_float8_blocks", float8_blocks(model))
    policy = CosmosPolicy(model, stats, text, PolicyConfig(action_steps=10, jpeg_round_trip=False))
    cfg = PlannerConfig(num_candidates=8, future_steps=[1, 3, 5], value_steps=[1, 2, 3, 4, 5], max_batch=args.max_batch)
    planner = Planner(policy, model, cfg)
    obs = observation(model.layout, 256, seed=1)
    start = time.perf_counter()
    planner.infer(obs)
    emit("first_plan_s_incl_compile", round(time.perf_counter() - start, 1))
    planner.forward_rows = 0
    t = timed(lambda: planner.infer(obs), device, 1, args.plan_iters)
    emit("network_row_evaluations_per_plan", planner.forward_rows // (1 + args.plan_iters))
    emit("planning_gpu_s_per_chunk", t)
    emit("planning_max_batch", args.max_batch)


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="2b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--skip-planning", action="store_true")
    parser.add_argument("--skip-policy", action="store_true")
    parser.add_argument("--no-prefix-encode", dest="prefix_encode", action="store_false", help="encode all 13 conditioning frames")
    parser.add_argument("--no-compile-planning", dest="compile_planning", action="store_false")
    parser.add_argument("--profile", action="store_true", help="print the top ops of one action chunk")
    parser.add_argument("--float8", default="off", help="server.float8 for the policy and the plan: off, rowwise, tensorwise "
                        "(with a recipe, the float8 outputs' error against bf16 is measured first)")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--plan-iters", type=int, default=3)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    OUT = Path(args.out)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    emit("device", torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu")
    emit("config", args.config)
    emit("compiled", args.compile)
    gemm_peaks(device)
    if not args.skip_policy:
        model = bench_policy(args, device)
        del model
        gc.collect()
    if not args.skip_planning:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            bench_planning(args, device)
        except Exception as exc:  # keep the policy figures
            emit("planning_error", f"{type(exc).__name__}: {str(exc)[:400]}")
    print("\nSUMMARY")
    for k, v in results.items():
        print(f"{k:36s} {round(v, 4) if isinstance(v, float) else v}")


if __name__ == "__main__":
    main()
