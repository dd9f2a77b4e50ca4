"""Learner throughput, memory and MFU on LIBERO-shaped data, and weight publication time (issue 7).

Two parts, merged into one file (bench/results/learner_speed.json, or --out):

``--part train`` (no Ray needed: runs on the GPU machine). Samples go through the real data
path: synthetic LIBERO-shaped episodes (two 256x256 cameras as JPEG q95, 9-d proprio, 7-d
actions) are written as episode HDF5 files (``cosmos_policy.data.episode_file``) and read back,
statistics come from the demonstrations, the sample builder decodes and augments (one draw per
sample) in ``--data-workers`` processes (``learner.data.PrefetchBatches`` over
``EpisodeBatches``, base mixture 50/25/25), and ``learner.engine.Learner`` trains with
DeepSpeed (ZeRO-2, bf16 weights with fp32 master weights, AdamW, clip 1.0; on GPUs float8
matrix products for the blocks' token-wise layers, ``learner.float8: tensorwise``, and no
gradient checkpointing). Every step VAE-encodes its samples' clips (no latent caching). Figures:
    train_samples_per_s_incl_vae   samples per second over timed optimizer steps (wall clock:
                                   data wait + VAE encode + forward/backward + optimizer)
    peak_memory_gb                 torch.cuda.max_memory_allocated over the timed steps
    mfu                            model FLOPs per sample x samples/s / measured bf16 matmul peak;
                                   model FLOPs = 3 x (DiT forward, counted by torch's
                                   FlopCounterMode at batch 1) + the VAE encode actually done per
                                   sample (counted the same way); checkpoint recomputation is not
                                   counted (model FLOPs, not hardware FLOPs)
    mfu_nominal                    the same over the H100's nominal 989 TFLOP/s
    vae_ms_per_sample              the VAE encode alone, per sample (median of a few batches)
    data_wait_s_per_step           time steps waited for a batch that was not ready
``--part publish`` (needs Ray; this part was measured on the CPU machine). The 2b denoiser's
state (its real parameter names and shapes, random bf16 values: 1.96 B parameters, 3.9 GB) is
packed as the learner publishes it, ``learner.publish.publish`` puts it into the object store once
and registers the version; 4 reader actors on the same host (a real local Ray cluster on
127.0.0.1) each fetch it from the registry and verify its checksum.
    weight_publish_s_2b            from the start of the put to the last reader's verified copy
                                   (median of --publish-repeats)

    python bench/learner_speed.py --part train [--config 2b] [--micro-batch 8] [--grad-accum 4] [--checkpoint-blocks 0] [--float8 off] ...
    python bench/learner_speed.py --part publish
    python bench/learner_speed.py --part train --config tiny --device cpu --steps 2 --data-workers 0   # smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.data_speed import scene_frames  # noqa: E402
from cosmos_policy.config import load_model_config  # noqa: E402
from cosmos_policy.episode import Episode, Source  # noqa: E402
from cosmos_policy.layout import load_layout  # noqa: E402

OUT: Path = ROOT / "bench" / "results" / "learner_speed.json"
NOMINAL_H100_BF16_TFLOPS = 989.0
results: dict[str, Any] = {}


def emit(name: str, value: Any) -> None:
    """Print one figure as a JSON line and merge it into the results file (other parts' figures stay)."""
    results[name] = value
    print(json.dumps({name: value}), flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(OUT.read_text()) if OUT.exists() else {}
    merged.update(results)
    OUT.write_text(json.dumps(merged, indent=1))


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} host cores"
    return f"{platform.machine()} CPU machine, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, no GPU"


# ---- data -------------------------------------------------------------------------------------
def write_episodes(root: Path, n: int, steps: int, seed: int = 0) -> list[Path]:
    """LIBERO-shaped episodes as HDF5 files: half demonstrations, a quarter successful and a quarter failed rollouts."""
    from cosmos_policy.data.episode_file import episode_file_name, write_episode

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        kind = i % 4
        source = Source.DEMO if kind < 2 else Source.SIM
        success = kind != 3
        frames = {c: scene_frames(steps, 256, rng) for c in ("primary", "wrist")}
        ep = Episode.from_frames(frames, proprio=rng.normal(size=(steps, 9)), actions=rng.uniform(-1, 1, (steps, 7)),
                                 instruction=f"put the bowl on plate {i % 5}", success=success, source=source, task=f"task{i % 5}")
        paths.append(write_episode(root / episode_file_name(ep), ep))
    return paths


def libero_source(paths: list[Path], model_cfg, layout, batch_size: int, seed: int):
    """EpisodeBatches over the episode files, read back through the episode-file reader."""
    from cosmos_policy.data.augment import AugmentConfig
    from cosmos_policy.data.episode_file import read_episode
    from cosmos_policy.data.mixture import MixtureSampler, mixture_preset
    from cosmos_policy.data.samples import SampleBuilder
    from cosmos_policy.data.statistics import compute_statistics
    from cosmos_policy.text import RandomTextEncoder, TextEmbeddingCache
    from learner.data import EpisodeBatches

    episodes = [read_episode(p) for p in paths]
    stats = compute_statistics([e for e in episodes if e.source is Source.DEMO])
    builder = SampleBuilder(layout, stats, model_cfg.image_size, gamma=0.99, augmentation=AugmentConfig())
    sampler = MixtureSampler.from_episodes(mixture_preset("base"), episodes, chunk=layout.action_chunk)
    text = TextEmbeddingCache()
    text.fill(RandomTextEncoder(model_cfg.text.embed_dim, model_cfg.text.max_length), sorted({e.instruction for e in episodes}))
    return EpisodeBatches(sampler, builder, text, batch_size, seed=seed)


# ---- measurements -----------------------------------------------------------------------------
def gemm_peak(device: torch.device) -> float:
    """Measured bf16 matmul rate (TFLOP/s) of an 8192^3 product on random data."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def count_flops(model, batch, encoder) -> tuple[float, float]:
    """(DiT forward FLOPs, VAE encode FLOPs) for ONE sample, counted by FlopCounterMode (eager)."""
    from torch.utils.flop_counter import FlopCounterMode

    from cosmos_policy.layout import FrameRole, SampleKind

    one = batch.select([0], [SampleKind.POLICY])
    encoder(one)  # the constant prefix is encoded once per run, not per sample: keep it out of the count
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        x0 = encoder(one)
    vae = fc.get_total_flops()
    roles = model.layout.role_tensor(one.kinds, device=x0.device)
    sigma = torch.full((1,), 20.0, device=x0.device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.denoiser(x0, sigma, x0, roles == FrameRole.CLEAN, one.text.to(x0.device))
    return float(fc.get_total_flops()), float(vae)


def bench_train(args: argparse.Namespace) -> None:
    from cosmos_policy.model import CosmosPolicyModel
    from learner.encode import TargetEncoder
    from learner.engine import Learner, LearnerConfig
    from learner.schedule import ScheduleConfig

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    tag = f"_{args.tag}" if args.tag else ""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if not cuda:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the learner picks the device from CUDA's availability
    model_cfg = load_model_config(args.config)
    layout = load_layout("libero")
    emit("train_machine", machine())
    emit("torch", torch.__version__)
    peak = gemm_peak(device) if cuda else float("nan")
    if cuda:
        emit("gemm_bf16_tflops", peak)

    workdir = Path(tempfile.mkdtemp(prefix="learner_speed_"))
    start = time.perf_counter()
    paths = write_episodes(workdir / "episodes", args.episodes, args.episode_steps)
    emit("episode_files", {"count": len(paths), "steps_each": args.episode_steps, "mb_total": round(sum(p.stat().st_size for p in paths) / 2**20, 1),
                           "write_s": round(time.perf_counter() - start, 1)})
    source = libero_source(paths, model_cfg, layout, args.micro_batch, seed=0)

    with torch.device(device):  # initialize the 2B network on the GPU: a CPU init takes minutes
        model = CosmosPolicyModel.build(model_cfg, layout, seed=0)
    cfg = LearnerConfig(
        model=args.config, micro_batch=args.micro_batch, grad_accum=args.grad_accum, zero_stage=args.zero_stage,
        schedule=ScheduleConfig(warmup_steps=0, cycle_steps=10**6, end_of_cycle=1.0),
        checkpoint_dir=str(workdir / "ckpt"), checkpoint_every=0,
        checkpoint_blocks=args.checkpoint_blocks, compile=args.compile, fused_optimizer=None if args.fused else False,
        vae_encode=args.vae_encode, vae_batch=args.vae_batch, vae_compile=args.vae_compile, data_workers=args.data_workers,
        vae_channels_last=args.vae_channels_last, float8=args.float8,
    )
    emit(f"learner_config{tag}", {k: v for k, v in vars(cfg).items() if k not in ("schedule", "checkpoint_dir")})
    if args.flops:
        vae_dtype = torch.bfloat16 if cuda else model.tokenizer.dtype
        model.tokenizer.to(device, vae_dtype)
        dit = model.denoiser.to(torch.bfloat16) if cuda else model.denoiser
        probe = source.batch(10**6).model
        dit_f, vae_f = count_flops(model, probe, TargetEncoder(model, args.vae_encode))
        _, vae_full = count_flops(model, probe, TargetEncoder(model, "full"))
        dit.float()
        emit("dit_forward_tflop_per_sample", dit_f / 1e12)
        emit("vae_encode_tflop_per_sample", {"done": vae_f / 1e12, "full_clip": vae_full / 1e12})
        flops_per_sample = 3 * dit_f + vae_f
    else:
        flops_per_sample = float("nan")

    learner = Learner(cfg, source, model=model)
    emit(f"checkpointed_blocks{tag}", learner.checkpointed_blocks)
    emit(f"float8{tag}", {"recipe": learner.float8, "layers": learner.float8_layers})
    per_step = args.micro_batch * args.grad_accum
    try:
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            metrics = learner.train_step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        emit(f"warmup_s{tag}", round(time.perf_counter() - t0, 1))
        wait0 = learner.source.wait_s
        times, losses = [], []
        for _ in range(args.steps):
            s = time.perf_counter()
            metrics = learner.train_step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - s)
            losses.append(metrics["loss"])
        total = sum(times)
        sps = per_step * args.steps / total
        emit(f"train_samples_per_s_incl_vae{tag}", sps)
        emit(f"step_s{tag}", {"median": statistics.median(times), "min": min(times), "max": max(times), "samples_per_step": per_step})
        emit(f"data_wait_s_per_step{tag}", (learner.source.wait_s - wait0) / args.steps)
        emit(f"losses{tag}", [round(x, 4) for x in losses])
        if cuda:
            emit(f"peak_memory_gb{tag}", torch.cuda.max_memory_allocated() / 2**30)
            emit(f"peak_reserved_gb{tag}", torch.cuda.max_memory_reserved() / 2**30)
        if flops_per_sample == flops_per_sample and cuda:
            emit(f"mfu{tag}", flops_per_sample * sps / (peak * 1e12))
            emit(f"mfu_nominal{tag}", flops_per_sample * sps / (NOMINAL_H100_BF16_TFLOPS * 1e12))
        # The VAE encode alone (what each step spends on it).
        batch = source.batch(0).model
        vt = []
        for _ in range(4):
            if cuda:
                torch.cuda.synchronize()
            s = time.perf_counter()
            learner.targets(batch)
            if cuda:
                torch.cuda.synchronize()
            vt.append(time.perf_counter() - s)
        emit(f"vae_ms_per_sample{tag}", 1e3 * statistics.median(vt[1:]) / args.micro_batch)
        if args.profile and cuda:
            emit(f"profile{tag}", profile_step(learner))
    except torch.OutOfMemoryError as exc:
        emit(f"train_error{tag}", f"OutOfMemoryError: {str(exc)[:300]}")
    finally:
        if hasattr(learner.source, "close"):
            learner.source.close()


def profile_step(learner: Any, top: int = 25) -> dict[str, Any]:
    """One optimizer step under torch.profiler: GPU time by kernel family and the GPU's idle share of the wall time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        s = time.perf_counter()
        learner.train_step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - s
    kernels: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name] = kernels.get(ev.name, 0.0) + ev.time_range.elapsed_us() / 1e6
    busy = sum(kernels.values())
    families = {"gemm": ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas"), "attention": ("flash", "fmha", "attention"),
                "conv": ("conv", "implicit", "cudnn", "xmma_fprop", "dgrad", "wgrad"), "triton": ("triton",),
                "copy": ("memcpy", "memset", "copy", "cat"), "optimizer": ("adam", "multi_tensor", "foreach")}
    by_family: dict[str, float] = {}
    for name, t in kernels.items():
        low = name.lower()
        fam = next((f for f, keys in families.items() if any(k in low for k in keys)), "other")
        by_family[fam] = by_family.get(fam, 0.0) + t
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top), flush=True)
    gaps = idle_gaps(prof.events())
    return {"wall_s": wall, "idle_gaps": gaps, "gpu_busy_s": busy, "by_family_s": {k: round(v, 4) for k, v in sorted(by_family.items(), key=lambda x: -x[1])},
            "top_kernels_s": {k[:120]: round(v, 4) for k, v in sorted(kernels.items(), key=lambda x: -x[1])[:top]}}


def idle_gaps(events: Any, min_ms: float = 0.3, top: int = 20) -> dict[str, Any]:
    """Where the GPU waits: gaps between kernels longer than ``min_ms``, with the host operations running then."""
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    gaps, end = [], None
    for start, stop in kernels:
        if end is not None and start - end > 1000 * min_ms:
            gaps.append((end, start))
        end = stop if end is None else max(end, stop)
    by_op: dict[str, float] = {}
    for g0, g1 in sorted(gaps, key=lambda g: g[0] - g[1])[:200]:  # the 200 longest (attribution is a scan of host events)
        # The innermost host operations alive during the gap (the shortest ones that cover its middle).
        mid = (g0 + g1) / 2
        alive = sorted((e for e in host if e.time_range.start <= mid <= e.time_range.end), key=lambda e: e.time_range.elapsed_us())
        name = " < ".join(e.name[:60] for e in alive[:3]) or "(no host op)"
        by_op[name] = by_op.get(name, 0.0) + (g1 - g0) / 1e6
    return {"count": len(gaps), "total_s": round(sum(g1 - g0 for g0, g1 in gaps) / 1e6, 4),
            "longest_200_by_host_op_s": {k: round(v, 4) for k, v in sorted(by_op.items(), key=lambda x: -x[1])[:top]}}


# ---- publication ------------------------------------------------------------------------------
def bench_publish(args: argparse.Namespace) -> None:
    for key, value in (("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(key, value)  # loopback only, no leftover token auth, no usage reporting
    import ray

    from cosmos_policy.denoiser import build_network
    from cosmos_policy.weights import pack
    from learner.publish import RegistryWeights, WeightRegistry

    cfg = load_model_config(args.config)
    emit("publish_machine", machine())
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in build_network(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    state = {k: (torch.randn(s, generator=g, dtype=torch.bfloat16) if dt.is_floating_point else torch.zeros(s, dtype=dt))
             for k, (s, dt) in shapes.items()}
    start = time.perf_counter()
    packed = pack(state)  # what ``Learner.packed_weights`` hands to ``publish`` (bf16 as raw 16-bit words)
    pack_s = time.perf_counter() - start
    nbytes = sum(a.nbytes for a, _, _ in packed.values())
    emit("weights_2b", {"params": sum(int(np.prod(s)) for s, _ in shapes.values()), "tensors": len(packed), "gb": round(nbytes / 1e9, 3),
                        "dtype": "bfloat16", "pack_s_from_bf16": round(pack_s, 3)})

    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False, object_store_memory=int(min(2.6 * nbytes, 12e9)), namespace="learner-speed")

    @ray.remote(num_cpus=0.5)
    class Reader:
        """A policy server's weight source, reduced to what publication must deliver: fetch + verify."""

        def __init__(self, weights: RegistryWeights) -> None:
            self.registry = weights.registry
            self.verify_threads = 1  # four readers share this machine's two cores: one checksum thread each

        def pull(self, version: int) -> dict[str, float]:
            from cosmos_policy.weights import verify

            start = time.perf_counter()
            latest = ray.get(self.registry.latest.remote("policy"))
            if latest is None or latest[0].version < version:
                raise RuntimeError(f"reader: version {version} not registered (got {latest and latest[0].version})")
            record, (ref,) = latest
            got = time.perf_counter()
            packed = ray.get(ref)
            fetched = time.perf_counter()
            verify(packed, record, self.verify_threads)
            done = time.perf_counter()
            del packed
            return {"registry_s": got - start, "get_s": fetched - got, "verify_s": done - fetched, "end": time.time()}

    # The registry exists before timing. It keeps one version here (the system keeps 2): each
    # repeat then frees the last one, and the object store never spills to disk mid-measurement.
    weights = RegistryWeights(WeightRegistry.remote(keep=1))
    ray.get(weights.registry.latest.remote("policy"))
    readers = [Reader.remote(weights) for _ in range(args.readers)]
    ray.get([r.__ray_ready__.remote() for r in readers])
    totals, details = [], []
    for version in range(1, args.publish_repeats + 1):
        t_wall = time.time()
        weights.publish(packed, version, step=version, target="policy")
        put_s = weights.publish_s[-1]
        # The readers ask the registry right after the version is registered: actors poll between
        # episodes, and how often is their setting, not the cost of publishing.
        out = ray.get([r.pull.remote(version) for r in readers])
        total = max(o["end"] for o in out) - t_wall
        totals.append(total)
        details.append({"put_and_register_s": round(put_s, 3), "reader_get_s_max": round(max(o["get_s"] for o in out), 3),
                        "reader_verify_s_max": round(max(o["verify_s"] for o in out), 3), "total_s": round(total, 3)})
        print(json.dumps({"publish_repeat": version, **details[-1]}), flush=True)
    emit("weight_publish_s_2b", statistics.median(totals))
    emit("weight_publish_detail_2b", {"readers": args.readers, "repeats": details, "checksum_verified_by_every_reader": True})
    ray.shutdown()


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("train", "publish"), required=True)
    parser.add_argument("--config", default="2b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--checkpoint-blocks", type=int, default=0, help="blocks recomputed in the backward pass (-1: the model config's choice)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", default=None, help="eager transformer blocks (default: compiled on GPUs)")
    parser.add_argument("--no-vae-compile", dest="vae_compile", action="store_false", default=None)
    parser.add_argument("--no-vae-channels-last", dest="vae_channels_last", action="store_false", default=None)
    parser.add_argument("--vae-encode", default="needed", choices=("needed", "full"))
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--no-fused", dest="fused", action="store_false", help="DeepSpeed's torch AdamW instead of the fused kernel")
    parser.add_argument("--float8", default="auto", help="float8 recipe for the blocks' token-wise layers (learner.float8; "
                        "auto: tensorwise on GPUs with float8, off elsewhere)")
    parser.add_argument("--data-workers", type=int, default=4)
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--episode-steps", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps (compilation happens here)")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--no-flops", dest="flops", action="store_false")
    parser.add_argument("--profile", action="store_true", help="profile one more step: GPU time by kernel family, idle share")
    parser.add_argument("--tag", default="", help="suffix for this run's figures (variants in one results file)")
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--publish-repeats", type=int, default=3)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    if args.checkpoint_blocks < 0:
        args.checkpoint_blocks = None
    OUT = Path(args.out)
    emit(f"date_{args.part}", time.strftime("%Y-%m-%d"))
    if args.part == "train":
        bench_train(args)
    else:
        bench_publish(args)
    gc.collect()


if __name__ == "__main__":
    main()
