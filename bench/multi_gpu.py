"""Multi-GPU runs on one host (issue 9): the 2b learner over 1..N GPUs and the weight broadcast over NCCL.

No Ray (the GPU machine has none): every part runs one process per GPU under torchrun, and the
driver (this script without ``--part``) starts those runs and merges their figures into
bench/results/multi_gpu.json (or --out):
    learner_samples_per_s_per_gpu   {gpus: samples/s per GPU}: the 2b learner (DeepSpeed ZeRO-2 by
                                    default, bf16 with float8 matrix products in the blocks where the
                                    GPU has them, no gradient checkpointing; LIBERO-shaped samples through the real data path:
                                    episode files -> sample builder with augmentation -> VAE targets),
                                    each rank on its own shard of the data
    scaling_efficiency_<N>gpu       per-GPU samples/s at N GPUs over 1 GPU (N = 4 where lent, else
                                    the largest count run)
    nccl_broadcast_s_2b             learner rank 0 -> every other GPU of the host (a PolicyServer's
                                    network on each): the 2b denoiser in bf16 through
                                    ``learner.nccl_broadcast.NcclBroadcaster`` (bucketed, loaded into
                                    the receivers' parameters), median of --repeats
    object_store_broadcast_s_2b     the object-store path's figure (bench/learner_speed.py
                                    --part publish, on the CPU machine: Ray cannot be carried here)

    python bench/multi_gpu.py [--gpus 1,2] [--zero-stages 2] [--steps 3]
    torchrun --nproc_per_node=2 bench/multi_gpu.py --part learner --zero-stage 3 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "results" / "multi_gpu.json"


def _rank() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def part_learner(args: argparse.Namespace) -> dict[str, Any]:
    """One torchrun rank of the learner; rank 0 returns the figures."""
    import torch.distributed as dist

    from bench.learner_speed import libero_source, write_episodes
    from cosmos_policy.config import load_model_config
    from cosmos_policy.layout import load_layout
    from cosmos_policy.model import CosmosPolicyModel
    from learner.engine import Learner, LearnerConfig
    from learner.schedule import ScheduleConfig

    rank, world, local = _rank()
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    model_cfg, layout = load_model_config(args.config), load_layout("libero")
    work = Path(tempfile.mkdtemp(prefix=f"multi_gpu_r{rank}_"))
    paths = write_episodes(work / "episodes", args.episodes, args.episode_steps, seed=rank)
    source = libero_source(paths, model_cfg, layout, args.micro_batch, seed=0)
    source.rank = rank  # each rank draws its own samples
    with torch.device(device):
        model = CosmosPolicyModel.build(model_cfg, layout, seed=0)
    cfg = LearnerConfig(model=args.config, micro_batch=args.micro_batch, grad_accum=args.grad_accum, zero_stage=args.zero_stage,
                        schedule=ScheduleConfig(warmup_steps=0, cycle_steps=10**6, end_of_cycle=1.0), checkpoint_dir=str(work / "ckpt"),
                        checkpoint_every=0, checkpoint_blocks=args.checkpoint_blocks, data_workers=args.data_workers, float8=args.float8)
    learner = Learner(cfg, source, model=model)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        learner.train_step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        dist.barrier()
        s = time.perf_counter()
        losses.append(learner.train_step()["loss"])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - s)
    slowest = torch.tensor([sum(times)], device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    per_step = args.micro_batch * args.grad_accum  # per rank
    out = {"gpus": world, "zero_stage": args.zero_stage, "samples_per_s_total": world * per_step * args.steps / float(slowest),
           "samples_per_s_per_gpu": per_step * args.steps / float(slowest), "step_s_median": statistics.median(times),
           "samples_per_step_per_gpu": per_step, "warmup_s": round(warmup_s, 1), "losses": [round(x, 4) for x in losses],
           "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30, "checkpointed_blocks": learner.checkpointed_blocks,
           "float8": learner.float8}
    if hasattr(learner.source, "close"):
        learner.source.close()
    return out


def part_broadcast(args: argparse.Namespace) -> dict[str, Any]:
    """Rank 0 (the learner's GPU) broadcasts the 2b denoiser to every other GPU's network."""
    import torch.distributed as dist

    from cosmos_policy.config import load_model_config
    from cosmos_policy.denoiser import build_network
    from learner.nccl_broadcast import NcclBroadcaster

    rank, world, local = _rank()
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    with torch.device(device):
        torch.manual_seed(rank)  # receivers start from other weights
        net = build_network(load_model_config(args.config)).to(torch.bfloat16)
    caster = NcclBroadcaster(net, src=0, bucket_mb=args.bucket_mb)
    nbytes = sum(t.numel() * t.element_size() for t in caster.tensors.values())
    caster.broadcast()  # warm-up: NCCL's communicator and buffers
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        s = caster.broadcast()
        t = torch.tensor([s], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # until the last PolicyServer has loaded it
        times.append(float(t))
    # Every receiver now holds the sender's weights exactly.
    probe = next(iter(caster.tensors.values())).detach().float().sum().reshape(1)
    gathered = [torch.zeros_like(probe) for _ in range(world)]
    dist.all_gather(gathered, probe)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    dist.destroy_process_group()
    return {"gpus": world, "receivers": world - 1, "gb": round(nbytes / 1e9, 3), "bucket_mb": args.bucket_mb, "repeats_s": [round(t, 4) for t in times],
            "nccl_broadcast_s_2b": statistics.median(times), "gb_per_s_per_receiver": nbytes / 1e9 / statistics.median(times),
            "receivers_hold_the_sender_weights": same}


def run_part(part: str, gpus: int, extra: list[str], timeout: float) -> dict[str, Any]:
    """One torchrun of ``part`` on ``gpus`` GPUs; its rank 0's figures."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", str(Path(__file__).resolve()),
           "--part", part, "--result", out, *extra]
    print("$", " ".join(cmd[2:]), flush=True)
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}
    return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("learner", "broadcast"))
    parser.add_argument("--result", help="(internal) where a part's rank 0 writes its figures")
    parser.add_argument("--gpus", default=None, help="comma-separated GPU counts for the learner (default: 1, 2, 4, 8 up to what is visible)")
    parser.add_argument("--zero-stages", default="2")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--config", default="2b")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--checkpoint-blocks", type=int, default=0)
    parser.add_argument("--float8", default="auto", help="learner.float8 (auto: tensorwise on float8 GPUs; the recipe of bench/learner_speed.py)")
    parser.add_argument("--data-workers", type=int, default=4)
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--episode-steps", type=int, default=48)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--part-timeout", type=float, default=300)
    parser.add_argument("--skip-learner", action="store_true")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()

    if args.part:  # inside torchrun
        figures = part_learner(args) if args.part == "learner" else part_broadcast(args)
        if _rank()[0] == 0 and args.result:
            Path(args.result).write_text(json.dumps(figures))
        return

    visible = torch.cuda.device_count()
    kind = f"{visible} x {torch.cuda.get_device_name(0)}, {os.cpu_count()} host cores" if visible else "no GPU"
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}

    def emit(key: str, value: Any) -> None:
        results[key] = value
        print(json.dumps({key: value}), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))

    emit("date", time.strftime("%Y-%m-%d"))
    emit("machine", kind)
    if visible < 2:
        raise SystemExit("multi_gpu: needs at least 2 visible GPUs")
    counts = [int(c) for c in args.gpus.split(",")] if args.gpus else [c for c in (1, 2, 4, 8) if c <= visible]
    common = ["--config", args.config, "--micro-batch", str(args.micro_batch), "--grad-accum", str(args.grad_accum),
              "--checkpoint-blocks", str(args.checkpoint_blocks), "--float8", args.float8,
              "--data-workers", str(args.data_workers), "--episodes", str(args.episodes),
              "--episode-steps", str(args.episode_steps), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    # The broadcast first: it is quick, and the learner runs may use up the time there is.
    bc = run_part("broadcast", visible, ["--config", args.config, "--bucket-mb", str(args.bucket_mb), "--repeats", str(args.repeats)],
                  args.part_timeout)
    emit(f"broadcast_{visible}gpu", {**bc, "machine": kind})
    if "nccl_broadcast_s_2b" in bc:
        emit("nccl_broadcast_s_2b", bc["nccl_broadcast_s_2b"])
    publish = ROOT / "bench" / "results" / "learner_speed.json"
    if publish.exists() and "weight_publish_s_2b" in (pub := json.loads(publish.read_text())):
        emit("object_store_broadcast_s_2b", {"seconds": pub["weight_publish_s_2b"], "machine": pub.get("publish_machine"),
                                             "readers": pub.get("weight_publish_detail_2b", {}).get("readers"),
                                             "source": "bench/learner_speed.py --part publish (Ray is not on the GPU machine)"})
    if args.skip_learner:
        return
    per_gpu = dict(results.get("learner_samples_per_s_per_gpu", {}))
    for stage in [int(s) for s in args.zero_stages.split(",")]:
        for n in counts:
            r = run_part("learner", n, [*common, "--zero-stage", str(stage)], args.part_timeout)
            emit(f"learner_zero{stage}_{n}gpu", {**r, "machine": kind})
            if "samples_per_s_per_gpu" in r:
                per_gpu[f"zero{stage}_{n}"] = r["samples_per_s_per_gpu"]
                emit("learner_samples_per_s_per_gpu", per_gpu)
        base = per_gpu.get(f"zero{stage}_1")
        done = [n for n in counts if f"zero{stage}_{n}" in per_gpu and n > 1]
        if base and done:
            top = 4 if 4 in done else max(done)
            emit(f"scaling_efficiency_{top}gpu" + ("" if stage == 2 else f"_zero{stage}"), per_gpu[f"zero{stage}_{top}"] / base)


if __name__ == "__main__":
    main()
