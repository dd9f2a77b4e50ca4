"""Speed and memory of the Cosmos Policy model (our wrapper around diffusers' 2B network).

Prints one JSON line per figure and writes them to bench/results/model_speed.json (or --out):
    device                           the accelerator
    dit_forward_s_libero_b1 / _b8    one denoiser evaluation (preconditioning included), bf16, eager
    action_chunk_s_libero_b1         one LIBERO action chunk: VAE encode of the 4 conditioning frames
                                     (13 pixel frames) + 5 sampler steps + reading the actions, bf16
    train_samples_per_s_libero       training samples/s of the denoiser (fp32 master weights, bf16
                                     autocast, gradient checkpointing, fused AdamW, clip 1.0) on
                                     precomputed latents: the plain-diffusers baseline's setting
    train_samples_per_s_libero_incl_vae   the same with the VAE encode of every 33-frame clip
    peak_memory_gb_train             peak GPU memory of the fastest training setting
With --compile, the batch-1 inference figures again with the network compiled with CUDA graphs
(mode reduce-overhead) and the VAE encoder compiled (suffix _compiled). Batch 1 is bound by the
host CPU's kernel-launch rate in eager mode (about 2,200 launches per forward), so eager batch-1
figures depend on the host; bare_network_forward_s_* times diffusers' network alone on the same
host for comparison. RoboCasa-shaped batches get one training step and one 5-step action sample.
Random weights: speed does not depend on values.

    python bench/model_speed.py [--config 2b] [--compile] [--train-batches 16,32] [--out PATH]
    python bench/model_speed.py --config tiny --device cpu     # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cosmos_policy.config import load_model_config  # noqa: E402
from cosmos_policy.layout import FrameRole, SampleKind, load_layout  # noqa: E402
from cosmos_policy.model import CosmosPolicyModel  # noqa: E402
from cosmos_policy.synthetic import random_batch  # noqa: E402

FWD_TFLOP = {9: 7.47, 11: 9.30}  # 2B forward per sample (diffusers_cosmos.md B3)
results: dict[str, object] = {}
OUT: Path = ROOT / "bench" / "results" / "model_speed.json"


def emit(name: str, value: object) -> None:
    results[name] = value
    print(json.dumps({name: value}), flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(config_name: str, layout_name: str, device: torch.device, dtype: torch.dtype, checkpointing: bool) -> CosmosPolicyModel:
    cfg = load_model_config(config_name, [f"gradient_checkpointing={str(checkpointing).lower()}"])
    with torch.device(device):  # initialize on the GPU: a 2B CPU init takes minutes
        torch.manual_seed(0)
        model = CosmosPolicyModel(cfg, load_layout(layout_name))
    return model.to(dtype)


def gemm_peak(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t = median_time(lambda: a @ b, device, 3, 20)
    return 2 * 8192**3 / t / 1e12


def bench_inference(args: argparse.Namespace, device: torch.device, peak: float, compiled: bool) -> None:
    suffix = "_compiled" if compiled else ""
    model = build(args.config, "libero", device, torch.bfloat16, checkpointing=False).eval()
    if compiled:
        model.denoiser.net.compile(fullgraph=True, dynamic=False, mode=args.compile_mode)
        if args.compile_vae:
            model.tokenizer.vae.encoder.compile(dynamic=False)
    layout = model.layout
    if not compiled:
        emit("dit_params", sum(p.numel() for p in model.denoiser.parameters()))
    for b in (1,) if compiled and not args.compile_b8 else (1, 8):
        batch = random_batch(model.config, layout, [SampleKind.POLICY] * b)
        c, h, w = model.frame_shape
        x = torch.randn(b, c, layout.num_frames, h, w, device=device)
        clean = (layout.role_tensor(batch.kinds) == FrameRole.CLEAN).to(device)
        sigma = torch.full((b,), 21.0, device=device)
        text = batch.text.to(device)
        with torch.no_grad():
            if compiled:
                start = time.perf_counter()
                model.denoiser(x, sigma, x, clean, text)
                sync(device)
                emit(f"compile_s_libero_b{b}", round(time.perf_counter() - start, 1))
            t = median_time(lambda: model.denoiser(x, sigma, x, clean, text), device, args.warmup, args.iters)
        emit(f"dit_forward_s_libero_b{b}{suffix}", t)
        if args.profile and b == 1 and not compiled:
            from torch.profiler import ProfilerActivity, profile

            with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model.denoiser(x, sigma, x, clean, text)
                sync(device)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
        if not compiled:
            # The bare network with the same inputs: what our preconditioning wrapper adds on top.
            mask = clean.view(b, 1, -1, 1, 1).to(torch.bfloat16).expand(b, 1, layout.num_frames, h, w)
            kwargs = dict(
                hidden_states=x.to(torch.bfloat16), timestep=torch.rand(b, 1, layout.num_frames, 1, 1, device=device, dtype=torch.bfloat16),
                encoder_hidden_states=text.to(torch.bfloat16), condition_mask=torch.cat([mask, torch.zeros_like(mask)], 1),
                fps=None, return_dict=False,
            )
            with torch.no_grad():
                emit(f"bare_network_forward_s_libero_b{b}", median_time(lambda: model.denoiser.net(**kwargs), device, args.warmup, args.iters))
        if device.type == "cuda" and args.config == "2b":
            emit(f"dit_forward_mfu_libero_b{b}{suffix}", FWD_TFLOP[9] * b / t / peak)
    query = random_batch(model.config, layout, [SampleKind.POLICY])  # uint8 images on the CPU, as an env gives them
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = median_time(lambda: model.sample(query, steps=5, seed=0), device, args.warmup, args.iters)
    emit(f"action_chunk_s_libero_b1{suffix}", t)
    prefix = layout.clean_prefix(SampleKind.POLICY)
    t_vae = median_time(lambda: model.encode(query, prefix), device, args.warmup, args.iters)
    emit(f"vae_encode_conditioning_s_libero_b1{suffix}", t_vae)
    if device.type == "cuda" and not compiled:
        emit("peak_memory_gb_inference_libero", torch.cuda.max_memory_allocated() / 2**30)
    model = None  # its GPU memory freed before the next configuration (the lambdas above ran already)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_step_fn(model: CosmosPolicyModel, batch, device: torch.device, with_vae: bool) -> Callable[[], float]:
    params = [p for p in model.denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1, fused=device.type == "cuda")
    x0 = None if with_vae else model.targets(batch)
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> float:
        with autocast:
            out = model.training_loss(batch, generator=generator, x0=x0)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.metrics["loss"]

    return step


def bench_training(args: argparse.Namespace, device: torch.device, peak: float) -> None:
    best = None
    for layout_name in ("libero", "robocasa"):
        model = build(args.config, layout_name, device, torch.float32, checkpointing=True).train()
        model.tokenizer.vae.to(torch.bfloat16)  # frozen: bf16 weights
        kinds = [SampleKind.POLICY, SampleKind.WORLD_MODEL, SampleKind.VALUE, SampleKind.POLICY]
        batches = [int(b) for b in args.train_batches.split(",")] if layout_name == "libero" else [2]
        for b in batches:
            batch = random_batch(model.config, model.layout, [kinds[i % 4] for i in range(b)])
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            step = train_step_fn(model, batch, device, with_vae=False)
            loss = step()
            if layout_name == "robocasa":
                emit("train_step_loss_robocasa_b2", loss)
                sample = model.eval().to(torch.bfloat16).sample(random_batch(model.config, model.layout, [SampleKind.POLICY]), steps=5)
                emit("action_chunk_robocasa_shape", list(sample.actions.shape))
                break
            t = median_time(step, device, args.warmup, args.iters)
            sps = b / t
            mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            emit(f"train_samples_per_s_libero_b{b}", sps)
            emit(f"train_peak_memory_gb_libero_b{b}", mem)
            if best is None or sps > best[1]:
                best = (b, sps, mem)
        if layout_name == "libero" and best is not None:
            b = best[0]
            emit("train_samples_per_s_libero", best[1])
            emit("train_micro_batch_libero", b)
            emit("peak_memory_gb_train", best[2])
            if device.type == "cuda" and args.config == "2b":
                emit("train_mfu_libero", 3 * FWD_TFLOP[9] * best[1] / peak)
            batch = random_batch(model.config, model.layout, [kinds[i % 4] for i in range(b)])
            step = train_step_fn(model, batch, device, with_vae=True)
            emit("train_samples_per_s_libero_incl_vae", b / median_time(step, device, 1, max(2, args.iters // 2)))
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="2b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode; reduce-overhead adds CUDA graphs")
    parser.add_argument("--no-compile-vae", dest="compile_vae", action="store_false", help="leave the VAE encoder eager under --compile")
    parser.add_argument("--compile-b8", action="store_true", help="also compile and time batch 8 (one more compile)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-eager", action="store_true", help="skip the eager inference figures")
    parser.add_argument("--profile", action="store_true", help="print the top CPU ops of one eager batch-1 forward")
    parser.add_argument("--train-batches", default="16,32")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    OUT = Path(args.out)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu"
    emit("device", name)
    emit("config", args.config)
    emit("torch", torch.__version__)
    peak = gemm_peak(device)
    if device.type == "cuda":
        emit("gemm_bf16_tflops", peak)
    phases = [] if args.skip_eager else [("inference", lambda: bench_inference(args, device, peak, compiled=False))]
    if not args.skip_train:
        phases.append(("training", lambda: bench_training(args, device, peak)))
    if args.compile:
        phases.append(("inference_compiled", lambda: bench_inference(args, device, peak, compiled=True)))
    for name, phase in phases:
        try:
            phase()
        except Exception as exc:  # keep the other phases' figures; record what failed
            emit(f"{name}_error", f"{type(exc).__name__}: {str(exc)[:400]}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print("\nSUMMARY")
    for k, v in results.items():
        print(f"{k:45s} {round(v, 4) if isinstance(v, float) else v}")


if __name__ == "__main__":
    main()
