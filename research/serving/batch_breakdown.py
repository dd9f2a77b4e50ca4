"""Where a served batch's time goes (issue 26): preprocessing, VAE encode, the 5 network passes, eagerly and per batch size.

    python research/serving/batch_breakdown.py [--sizes 1,8,16] [--float8 rowwise]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cosmos_policy.policy import CosmosPolicy, PolicyConfig  # noqa: E402
from inference_speed import observation, parts, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1,8,16")
    parser.add_argument("--float8", default="off")
    parser.add_argument("--vae-clips", type=int, default=16)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda")
    model, stats, text = parts("libero", "2b", device)
    model.accelerate(args.float8, "off", field="bench")
    model.enable_prefix_encoder(max_clips=args.vae_clips, compile=True, channels_last=True)
    policy = CosmosPolicy(model, stats, text, PolicyConfig(action_steps=5, prefix_encode=True))
    for n in [int(s) for s in args.sizes.split(",")]:
        obs = [observation(model.layout, 256, seed=i) for i in range(n)]
        batch = policy.batch(obs)
        prefix = model.layout.clean_prefix("policy")
        row = {"batch": n, "float8": args.float8,
               "preprocess_s": timed(lambda: policy.batch(obs), device, 1, args.iters),
               "vae_encode_s": timed(lambda: model.encode(batch, prefix), device, 1, args.iters),
               "predict_s": timed(lambda: policy.predict(obs, list(range(n))), device, 1, args.iters)}
        row["network_s"] = row["predict_s"] - row["preprocess_s"] - row["vae_encode_s"]
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
