"""Train the tiny Cosmos Policy model for a few steps and sample an action chunk, on a CPU.

The model alone, no Ray and no simulator, in seconds. It exercises the whole model path: clip assembly and VAE encoding, latent injection of proprio/actions/values, the
hybrid-sigma loss over policy, world-model and value samples, the 5-step second-order sampler,
and a checkpoint round trip. The batch is synthetic (random images, a fixed action chunk), so
the model learns to reproduce that chunk: the sampled chunk's error falls as it trains.

    python launch/model_demo.py [--config tiny] [--layout libero] [--steps 400] [--out runs/model_demo]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cosmos_policy.checkpoint import load_checkpoint, save_checkpoint
from cosmos_policy.codec import NormalizationStats
from cosmos_policy.config import load_model_config
from cosmos_policy.layout import SampleKind, load_layout
from cosmos_policy.model import CosmosPolicyModel
from cosmos_policy.synthetic import random_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--layout", default="libero")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--out", default="runs/model_demo")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = load_model_config(args.config)
    layout = load_layout(args.layout)
    model = CosmosPolicyModel.build(config, layout, seed=0)
    n_params = sum(p.numel() for p in model.denoiser.parameters())
    print(f"model {config.name}: {n_params:,} DiT parameters; layout {layout.name}: {layout.num_frames} latent frames")

    kinds = [SampleKind.POLICY, SampleKind.POLICY, SampleKind.WORLD_MODEL, SampleKind.VALUE]
    batch = random_batch(config, layout, kinds, seed=1)
    x0 = model.targets(batch)  # the VAE is frozen: encode once
    policy_query = batch.select([0])  # a training sample, asked as a policy query

    def chunk_error() -> float:
        model.eval()
        pred = model.sample(policy_query, seed=0)
        model.train()
        return float((pred.actions - policy_query.actions).abs().mean())

    print(f"before training: sampled-chunk L1 error {chunk_error():.3f} (normalized units)")
    optimizer = torch.optim.AdamW(model.denoiser.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    start = time.time()
    for step in range(1, args.steps + 1):
        out = model.training_loss(batch, generator=generator, x0=x0)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.denoiser.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0 or step == 1:
            m = out.metrics
            print(
                f"step {step:4d}  loss {m['loss']:.4f}  policy/action_l1 {m.get('policy/action_l1', float('nan')):.3f}  "
                f"value/value_l1 {m.get('value/value_l1', float('nan')):.3f}  ({time.time() - start:.1f} s)"
            )

    err = chunk_error()
    pred = model.sample(policy_query, seed=0)
    print(f"after {args.steps} steps: sampled-chunk L1 error {err:.3f}; predicted value {float(pred.value[0]):.3f}")
    print("first 2 actions of the sampled chunk:", [[round(x, 3) for x in row] for row in pred.actions[0, :2].tolist()])

    stats = NormalizationStats.compute(
        actions=torch.rand(100, layout.action_dim).numpy(), proprio=torch.rand(100, layout.proprio_dim).numpy()
    )
    out_dir = save_checkpoint(Path(args.out) / "checkpoint", model, stats=stats, metadata={"steps": args.steps})
    loaded = load_checkpoint(out_dir)
    same = torch.equal(loaded.model.sample(policy_query, seed=0).actions, model.eval().sample(policy_query, seed=0).actions)
    print(f"checkpoint written to {out_dir} and reloaded; same sample after reload: {same}")


if __name__ == "__main__":
    main()
