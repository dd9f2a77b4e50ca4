"""Where a PolicyServer's batch time goes at the learning run's sizes (small policy, medium judge, 64 px).

The first run served 0.14 s per batch whatever its size: far above what these models compute. This
times, with the GPU synchronized, one act batch and one best-of-16 planning batch at several batch
sizes, split into preprocessing, VAE conditioning and sampling, and counts the kernels one act batch
launches (a launch-bound server spends about the same per kernel whatever the batch). Random
weights: the time does not depend on them.

    python research/lift_learning/serving_probe.py [--device cuda] [--out probe.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from launch.config import load_experiment  # noqa: E402
from cosmos_policy.codec import NormalizationStats  # noqa: E402
from cosmos_policy.config import load_model_config  # noqa: E402
from cosmos_policy.contracts import Observation  # noqa: E402
from cosmos_policy.layout import load_layout  # noqa: E402
from cosmos_policy.model import CosmosPolicyModel  # noqa: E402
from cosmos_policy.planner import Planner  # noqa: E402
from cosmos_policy.policy import CosmosPolicy  # noqa: E402
from cosmos_policy.text import RandomTextEncoder, TextEmbeddingCache  # noqa: E402


def timed(fn, device: str, repeats: int = 15) -> float:
    """Median seconds of ``fn()`` after two warm-up calls, the device synchronized around each."""
    for _ in range(2):
        fn()
    out = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cfg = load_experiment("lift_learning")
    dev, dtype = args.device, (torch.bfloat16 if args.device == "cuda" else torch.float32)
    layout = load_layout(cfg.model.layout)
    policy_model = CosmosPolicyModel.build(load_model_config(cfg.model.size), layout, seed=0).to(dev, dtype)
    judge = CosmosPolicyModel.build(load_model_config(cfg.model.planning_size), layout, seed=1).to(dev, dtype)
    rng = np.random.default_rng(0)
    stats = NormalizationStats.compute(rng.uniform(-1, 1, (200, layout.action_dim)), rng.normal(size=(200, layout.proprio_dim)))
    text = load_model_config(cfg.model.size).text
    policy = CosmosPolicy(policy_model, stats, TextEmbeddingCache(), cfg.policy, text_encoder=RandomTextEncoder(text.embed_dim, text.max_length))
    planner = Planner(policy, judge, cfg.planner)

    def observations(n: int) -> list[Observation]:
        return [Observation(images={c: rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for c in layout.cameras},
                            proprio=rng.normal(size=layout.proprio_dim), instruction="lift the cube") for _ in range(n)]

    rows = []
    for n in (1, 4, 8, 14):
        obs, seeds = observations(n), list(range(n))
        batch = policy.batch(obs)
        row = {"batch": n,
               "act_s": timed(lambda: policy.predict(obs, seeds), dev),
               "preprocess_s": timed(lambda: policy.batch(obs), dev),
               "encode_s": timed(lambda: policy_model.encode(batch, max(layout.clean_prefix(k) for k in batch.kinds)), dev),
               "plan_s": timed(lambda: planner.plan_batch(obs, seeds), dev, repeats=5) if n <= 4 else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    kernels = None
    if dev == "cuda":
        from torch.profiler import ProfilerActivity, profile

        obs = observations(4)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            policy.predict(obs, list(range(4)))
            torch.cuda.synchronize()
        kernels = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
        print(json.dumps({"kernels_per_act_batch": kernels}), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "kernels_per_act_batch": kernels, "device": dev,
                                        "gpu": torch.cuda.get_device_name() if dev == "cuda" else None}, indent=1))


if __name__ == "__main__":
    main()
