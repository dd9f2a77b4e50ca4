"""The kernels a 2b pass is made of, at the policy's shapes, each timed alone: which attention backend, which float8
recipe and which cuDNN setting of the VAE's convolutions is fastest on this GPU, and by how much.

A pass of the 2b network at LIBERO shapes is 28 blocks of: self-attention over 1,764 tokens (16 heads of 128),
cross-attention to 512 text tokens, and the token-wise products (q, k, v, out: 2048 -> 2048; the MLP: 2048 -> 8192
-> 2048). The query's VAE encode is 2 chunks of 4 identical 224x224 frames after the cached prefix. Each line of
output is one JSON object: the kernel, its shape, milliseconds (median of 20 after 5) and TFLOP/s, and for
attention its largest difference from the flash kernel's output.

    python research/serving/kernel_probe.py [--batches 1,8]
    python research/serving/kernel_probe.py --parts vae_convs --batches 8    # the VAE encode's convolutions, layer by layer
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TOKENS, HEADS, HEAD_DIM, TEXT, WIDTH, MLP = 1764, 16, 128, 512, 2048, 8192


def timed_ms(fn, warmup: int = 5, iters: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def emit(**row: object) -> None:
    print(json.dumps(row), flush=True)


def attention(batch: int, device: torch.device) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, kv in (("self", TOKENS), ("cross", TEXT)):
        q = torch.randn(batch, HEADS, TOKENS, HEAD_DIM, device=device, dtype=torch.bfloat16)
        k = torch.randn(batch, HEADS, kv, HEAD_DIM, device=device, dtype=torch.bfloat16)
        v = torch.randn(batch, HEADS, kv, HEAD_DIM, device=device, dtype=torch.bfloat16)
        flops = 4 * batch * HEADS * TOKENS * kv * HEAD_DIM
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            reference = F.scaled_dot_product_attention(q, k, v)
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            try:
                with sdpa_kernel([backend]):
                    ms = timed_ms(lambda: F.scaled_dot_product_attention(q, k, v))
                    diff = float((F.scaled_dot_product_attention(q, k, v) - reference).abs().max())
                    graph_ok = _graph_replays(lambda: F.scaled_dot_product_attention(q, k, v))
                emit(kernel=f"sdpa_{name}", backend=backend.name, batch=batch, ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1),
                     max_diff_vs_flash=round(diff, 5), cuda_graph=graph_ok)
            except Exception as exc:  # a backend this build or GPU lacks
                emit(kernel=f"sdpa_{name}", backend=backend.name, batch=batch, error=f"{type(exc).__name__}: {str(exc)[:200]}")


def _graph_replays(fn) -> bool | str:
    """Whether ``fn`` can be captured into a CUDA graph and replayed to the same output."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            eager = fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        graph.replay()
        torch.cuda.synchronize()
        return bool((out - eager).abs().max() == 0)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:120]}"


def products(batch: int, device: torch.device) -> None:
    from cosmos_policy.float8 import _quantize, _scale

    rows = batch * TOKENS
    for k, n in ((WIDTH, WIDTH), (WIDTH, 3 * WIDTH), (WIDTH, MLP), (MLP, WIDTH)):  # 3 x WIDTH: q, k and v as one product
        x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5
        flops = 2 * rows * k * n
        emit(kernel="mm", recipe="bf16", rows=rows, k=k, n=n, ms=round(ms := timed_ms(lambda: x @ w.t()), 3), tflops=round(flops / ms / 1e9, 1))
        for recipe in ("rowwise", "tensorwise"):
            rowwise = recipe == "rowwise"
            ws = _scale(w, rowwise)
            w8 = _quantize(w, ws).t()
            wscale = ws.reshape(1, -1) if rowwise else ws
            xs = _scale(x, rowwise)
            x8 = _quantize(x, xs)
            mm = lambda: torch._scaled_mm(x8, w8, scale_a=xs, scale_b=wscale, out_dtype=torch.bfloat16, use_fast_accum=True)  # noqa: E731
            quantize = lambda: _quantize(x, _scale(x, rowwise))  # noqa: E731
            emit(kernel="mm", recipe=recipe, rows=rows, k=k, n=n, ms=round(ms := timed_ms(mm), 3), tflops=round(flops / ms / 1e9, 1),
                 quantize_input_ms_eager=round(timed_ms(quantize), 3))


def vae(batches: list[int], device: torch.device) -> None:
    from inference_speed import observation, parts

    from cosmos_policy.policy import CosmosPolicy, PolicyConfig

    model, stats, text = parts("libero", "2b", device)
    policy = CosmosPolicy(model, stats, text, PolicyConfig(action_steps=5, prefix_encode=True))
    for benchmark in (False, True):
        torch.backends.cudnn.benchmark = benchmark
        model.enable_prefix_encoder(max_clips=max(batches), compile=False, channels_last=True)
        for b in batches:
            obs = [observation(model.layout, 256, seed=i) for i in range(b)]
            batch = policy.batch(obs)
            frames = model.layout.clean_prefix("policy")
            ms = timed_ms(lambda: model.encode(batch, frames), 3, 10)
            emit(kernel="vae_encode_eager", cudnn_benchmark=benchmark, channels_last=True, batch=b, ms=round(ms, 2),
                 ms_per_query=round(ms / b, 2))


def vae_convs(batch: int, device: torch.device, config: str = "2b") -> None:
    """Each 3-D convolution of one VAE encode of ``batch`` queries (eager, channels-last, cuDNN's choice), summed by
    layer: which of them make the encode's 6.7 ms a query at batch 8 (the profile's 3.3 ms kernel on an sm80 tile, the
    3-channel input's convolution without tensor cores). Then the input's convolution again with its 3 channels padded
    to 8 and 16 (zero weights: the same output), and the busiest layer with its channels padded to the next multiple of
    64 (more work: whether a Hopper kernel then runs it faster all the same)."""
    from inference_speed import observation, parts

    from cosmos_policy.policy import CosmosPolicy, PolicyConfig

    model, stats, text = parts("libero", config, device)
    policy = CosmosPolicy(model, stats, text, PolicyConfig(action_steps=5, prefix_encode=True))
    model.enable_prefix_encoder(max_clips=batch, compile=False, channels_last=True)
    prepared = policy.batch([observation(model.layout, 256, seed=i) for i in range(batch)])
    frames = model.layout.clean_prefix("policy")
    cuda = device.type == "cuda"

    def clock() -> object:
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(start: object, end: object) -> float:
        return start.elapsed_time(end) if cuda else (end - start) * 1e3  # type: ignore[union-attr, operator]

    convs = {m: name for name, m in model.tokenizer.vae.encoder.named_modules() if isinstance(m, torch.nn.Conv3d)}
    records: list[tuple[torch.nn.Module, object, object, tuple[int, ...], tuple[int, ...]]] = []

    def before(module, args):
        module._probe_start = clock()

    def after(module, args, out):
        records.append((module, module._probe_start, clock(), tuple(args[0].shape), tuple(out.shape)))

    handles = [h for m in convs for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    with torch.no_grad():
        model.encode(prepared, frames)  # warm-up: cuDNN picks its kernels
        records.clear()
        model.encode(prepared, frames)
    if cuda:
        torch.cuda.synchronize()
    for h in handles:
        h.remove()
    layers: dict[str, dict[str, object]] = {}
    for module, start, end, shape_in, shape_out in records:
        row = layers.setdefault(convs[module], {"in_channels": module.in_channels, "out_channels": module.out_channels,
                                                "kernel_size": list(module.kernel_size), "input": list(shape_in), "calls": 0, "ms": 0.0, "tflop": 0.0})
        row["calls"] += 1
        row["ms"] += elapsed_ms(start, end)
        row["tflop"] += 2 * float(math.prod(shape_out)) * module.in_channels * float(math.prod(module.kernel_size)) / module.groups / 1e12
    total = sum(r["ms"] for r in layers.values())
    for name, row in sorted(layers.items(), key=lambda kv: -kv[1]["ms"]):
        emit(kernel="vae_conv", batch=batch, layer=name, **{**row, "ms": round(row["ms"], 3), "tflop": round(row["tflop"], 4)},
             tflops=round(row["tflop"] / max(row["ms"], 1e-9) * 1e3, 1), share=round(row["ms"] / max(total, 1e-9), 3))
    emit(kernel="vae_convs_total", batch=batch, ms=round(total, 2), ms_per_query=round(total / batch, 2))

    def conv_ms(cin: int, cout: int, shape: list[int], kernel: list[int]) -> float | None:
        x = torch.randn([shape[0], cin, *shape[2:]], device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
        w = torch.randn([cout, cin, *kernel], device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
        run = lambda: F.conv3d(x, w)  # noqa: E731
        return round(timed_ms(run, 3, 10), 3) if cuda else None  # timed on a GPU only

    first = next((r for r in layers.values() if r["in_channels"] == 3), None)
    if first is not None:
        for cin in (3, 8, 16):
            emit(kernel="vae_input_conv_padded", batch=batch, in_channels=cin, out_channels=first["out_channels"],
                 input=first["input"], ms=conv_ms(cin, first["out_channels"], first["input"], first["kernel_size"]))
    busiest = max(layers.values(), key=lambda r: r["ms"] / max(r["calls"], 1))
    for cin, cout in ((busiest["in_channels"], busiest["out_channels"]),
                      (-(-busiest["in_channels"] // 64) * 64, -(-busiest["out_channels"] // 64) * 64)):
        emit(kernel="vae_busiest_conv_padded", batch=batch, in_channels=cin, out_channels=cout, input=busiest["input"],
             ms=conv_ms(cin, cout, busiest["input"], busiest["kernel_size"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--parts", default="attention,products,vae", help="comma-separated: attention, products, vae, vae_convs")
    args = parser.parse_args()
    device = torch.device("cuda")
    emit(device=torch.cuda.get_device_name(device), torch=torch.__version__, cudnn=torch.backends.cudnn.version())
    batches = [int(b) for b in args.batches.split(",")]
    for part in args.parts.split(","):
        if part == "vae":
            vae(batches, device)
            continue
        if part == "vae_convs":
            vae_convs(max(batches), device)
            continue
        for b in batches:
            {"attention": attention, "products": products}[part](b, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
