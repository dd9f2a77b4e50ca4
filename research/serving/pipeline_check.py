"""The pipelined BatchingServer on a GPU: are the replies of batches prepared on a second CUDA stream (while the batch
before them runs) the replies of the same queries made one by one, eagerly and compiled into CUDA graphs?

The tests check the batching on a CPU, where there is no second stream; this checks the stream's hand-over (the event
the passes wait for, the allocator told the prepared tensors are used on the passes' stream) where it exists. Prints a
JSON line per setting: the largest action difference against the one-by-one replies, over the spread of the actions
between seeds (a missed wait would read half-written conditioning latents: differences of the order of that spread),
and the time the server spent preparing and running its batches.

    python research/serving/pipeline_check.py [--config tiny] [--clients 24]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from actors.config import ServerConfig  # noqa: E402
from actors.policy_server import BatchingServer, accelerate  # noqa: E402
from cosmos_policy.policy import CosmosPolicy, PolicyConfig  # noqa: E402
from inference_speed import observation, parts  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--compiled", default="no,yes", help="the servers to check: eager (no), compiled (yes), or both")
    parser.add_argument("--device", default="cuda", help="cuda (what this checks); cpu runs the script without a second stream")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, stats, text = parts("libero", args.config, device)
    policy = CosmosPolicy(model, stats, text, PolicyConfig(action_steps=5, prefix_encode=True))
    observations = [observation(model.layout, args.image_size, seed=i) for i in range(args.clients)]
    alone = np.stack([policy.infer(o, seed=i).actions for i, o in enumerate(observations)])  # eager, one by one
    other_seeds = np.stack([policy.infer(o, seed=10_000 + i).actions for i, o in enumerate(observations)])
    spread = float(np.abs(alone - other_seeds).mean())
    ok = True
    for compiled in [c == "yes" for c in args.compiled.split(",")]:
        config = ServerConfig(max_batch=8, max_wait_ms=5.0, batch_sizes=[1, 4, 8], compile=compiled)
        server = BatchingServer(policy, config=config)
        if compiled:
            accelerate(policy, None, config)
        start = time.perf_counter()
        server.warm_up(observations[0])
        warm = time.perf_counter() - start

        async def burst() -> list:
            return await asyncio.gather(*[server.act(o, seed=i) for i, o in enumerate(observations)])

        server.stats.update(busy_s=0.0, prepare_s=0.0, batches=0)
        start = time.perf_counter()
        served = np.stack([r.actions for r in asyncio.run(burst())])
        wall = time.perf_counter() - start
        diff = float(np.abs(served - alone).max())
        ok &= diff < 0.25 * spread
        print(json.dumps({"compiled": compiled, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "clients": args.clients,
                          "max_abs_action_diff": round(diff, 5), "seed_spread": round(spread, 5),
                          "diff_over_spread": round(diff / spread, 4), "batches": server.stats["batches"],
                          "prepare_s": round(server.stats["prepare_s"], 3), "busy_s": round(server.stats["busy_s"], 3),
                          "wall_s": round(wall, 3), "warm_up_s": round(warm, 1)}), flush=True)
    print("OK" if ok else "MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
