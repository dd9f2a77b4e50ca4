"""Replay throughput on this machine with LIBERO-shaped steps, durability on (issue 5).

A step is two 224x224x3 uint8 camera images, a 9-d proprio and a 7-d action: 301,120 bytes
uncompressed. Episodes (100 steps) arrive as actors send them, JPEG q95-encoded (encoding
happens in the actors, not here); every insert writes and fsyncs the episode file before it is
acknowledged. A sampled item is a step window: the images of both cameras at t and t + 16, the
action chunk and both proprio vectors.

Figures, per backend (ray, reverb), merged into bench/results/replay_speed.json:
    <backend>_insert_mb_per_s        uncompressed step bytes inserted per second
    <backend>_sample_mb_per_s        uncompressed bytes of the sampled windows per second
    <backend>_insert_wire_mb_per_s / _sample_wire_mb_per_s   the (JPEG) bytes actually moved
    <backend>_sample_p99_ms_batch32  99th-percentile latency of sampling a batch of 32

    python bench/replay_speed.py --backend ray        # in .venv
    python bench/replay_speed.py --backend reverb     # in .venv-reverb (dm-reverb)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from data_speed import scene_frames  # noqa: E402

from cosmos_policy.episode import Episode, Source  # noqa: E402
from replay.config import ReplayConfig, TableConfig  # noqa: E402
from replay.service import make_replay  # noqa: E402

STEP_BYTES = 2 * 224 * 224 * 3 + 9 * 4 + 7 * 4
WINDOW_BYTES = 4 * 224 * 224 * 3 + 2 * 9 * 4 + 16 * 7 * 4


def episodes(n: int, steps: int) -> list[Episode]:
    rng = np.random.default_rng(0)
    base = {c: scene_frames(steps, 224, rng) for c in ("primary", "wrist")}
    out = []
    for i in range(n):
        # Same pixels, new ids: the JPEG size and the work per insert are what matter.
        out.append(Episode.from_frames(base, proprio=rng.normal(size=(steps, 9)), actions=rng.normal(size=(steps, 7)),
                                       instruction="put the bowl on the plate", success=True, source=Source.SIM, policy_version=i))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["ray", "reverb"], default="ray")
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "replay_speed.json"))
    args = parser.parse_args()
    for k, v in (("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(k, v)
    if args.backend == "ray":
        import ray

        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 object_store_memory=1 << 30)

    data = episodes(args.episodes, args.steps)
    wire_per_episode = np.mean([sum(s.nbytes for s in e.images.values()) for e in data])
    root = Path(tempfile.mkdtemp(prefix="replay-bench-"))
    cfg = ReplayConfig(backend=args.backend, root=str(root), shards=args.shards, checkpoint_every_s=30.0,
                       tables=[TableConfig(name="experience_success", window=16, max_items=1_000_000)])
    replay = make_replay(cfg, local=args.backend == "reverb", seed=0)  # Reverb: its server, no Ray in between
    res: dict[str, float | str] = {}
    b = args.backend
    try:
        replay.stats()  # wait until the service (shard actors, Reverb server) is up: startup is not throughput
        start = time.perf_counter()
        for ep in data:
            replay.insert("experience_success", ep)
        elapsed = time.perf_counter() - start
        steps = args.episodes * args.steps
        res[f"{b}_insert_mb_per_s"] = steps * STEP_BYTES / elapsed / 1e6
        res[f"{b}_insert_wire_mb_per_s"] = args.episodes * wire_per_episode / elapsed / 1e6
        res[f"{b}_insert_steps_per_s"] = steps / elapsed

        for _ in range(10):
            replay.sample("experience_success", 32, timeout=30)
        latencies, wire = [], 0
        start = time.perf_counter()
        for _ in range(args.batches):
            t0 = time.perf_counter()
            items = replay.sample("experience_success", 32, timeout=30)
            latencies.append(time.perf_counter() - t0)
            wire += sum(it.window.nbytes for it in items)
        elapsed = time.perf_counter() - start
        res[f"{b}_sample_mb_per_s"] = args.batches * 32 * WINDOW_BYTES / elapsed / 1e6
        res[f"{b}_sample_wire_mb_per_s"] = wire / elapsed / 1e6
        res[f"{b}_sample_p99_ms_batch32"] = float(np.percentile(latencies, 99) * 1e3)
        res[f"{b}_sample_p50_ms_batch32"] = float(np.percentile(latencies, 50) * 1e3)
        res[f"{b}_jpeg_kb_per_image"] = float(wire_per_episode / (2 * args.steps) / 1024)
        res[f"{b}_machine"] = f"{os.cpu_count()} cores, durability on ({args.shards} shards)" if b == "ray" else f"{os.cpu_count()} cores, durability on"
    finally:
        replay.close()
        shutil.rmtree(root, ignore_errors=True)

    out = Path(args.out)
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged.update(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1))
    for k, v in res.items():
        print(f"{k:34s} {round(v, 2) if isinstance(v, float) else v}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
