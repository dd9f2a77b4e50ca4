"""Training-sample throughput of the data pipeline on one CPU core (issue 3).

LIBERO-shaped samples: two cameras stored as 256x256 JPEG q95 (as in the official LIBERO
release), 9-d proprio, 7-d actions, chunk 16. One sample = decode 4 JPEGs (current and future
of both cameras) + the training augmentation (crop, rotation, color jitter; one draw per sample)
to 224x224 + normalization + tiling of the action chunk and both proprio vectors into
16x28x28 latent frames. Frames are synthetic scenes (smooth shading, objects, sensor noise)
whose JPEG size matches rendered frames (~15-25 KB), because random noise would inflate decode
cost several-fold.

Prints and writes bench/results/data_speed.json:
    samples_per_s_per_core   whole samples per second, one process pinned to one core, 1 torch thread
    ms_decode, ms_augment, ms_tiling   where a sample's time goes
    loader_samples_per_s_2_workers     the DataLoader with 2 worker processes on this machine

    python bench/data_speed.py [--seconds 10] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cosmos_policy.codec import tile_into_frame  # noqa: E402
from cosmos_policy.data.augment import augment  # noqa: E402
from cosmos_policy.data.loader import TrainingStream, make_loader  # noqa: E402
from cosmos_policy.data.mixture import MixtureSampler, mixture_preset  # noqa: E402
from cosmos_policy.data.samples import SampleBuilder  # noqa: E402
from cosmos_policy.data.statistics import compute_statistics  # noqa: E402
from cosmos_policy.episode import Episode, Source  # noqa: E402
from cosmos_policy.layout import load_layout  # noqa: E402
from cosmos_policy.text import RandomTextEncoder, TextEmbeddingCache  # noqa: E402

FRAME = (16, 28, 28)


def scene_frames(steps: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Frames that compress like rendered scenes: shaded background, moving boxes, slight noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([0.5 + 0.3 * xx, 0.4 + 0.3 * yy, 0.6 - 0.2 * xx * yy], -1) * 255
    frames = np.empty((steps, size, size, 3), np.uint8)
    boxes = [(rng.uniform(0.1, 0.7, 2), rng.uniform(0.08, 0.25), rng.integers(0, 255, 3)) for _ in range(6)]
    for t in range(steps):
        img = base.copy()
        for (y, x), side, color in boxes:
            y0, x0 = int((y + 0.002 * t) * size), int((x + 0.003 * t) * size)
            img[y0 : y0 + int(side * size), x0 : x0 + int(side * size)] = color
        img += rng.normal(0, 2.0, img.shape)
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def libero_episodes(n: int, steps: int, rng: np.random.Generator) -> list[Episode]:
    out = []
    for i in range(n):
        frames = {c: scene_frames(steps, 256, rng) for c in ("primary", "wrist")}
        out.append(
            Episode.from_frames(frames, proprio=rng.normal(size=(steps, 9)), actions=rng.uniform(-1, 1, (steps, 7)),
                                instruction=f"task {i % 4}", success=True, source=Source.DEMO)
        )
    return out


def one_core() -> None:
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_speed.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    layout = load_layout("libero")
    episodes = libero_episodes(4, 120, rng)
    jpeg_kb = np.mean([len(j) for j in episodes[0].images["primary"].jpegs]) / 1024
    builder = SampleBuilder(layout, compute_statistics(episodes), image_size=224, gamma=0.99)
    sampler = MixtureSampler.from_episodes(mixture_preset("base", pools={"demo": 1.0}), episodes)

    one_core()
    results: dict[str, object] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "jpeg_kb_per_frame": round(jpeg_kb, 1)}
    for _ in range(20):  # warm-up
        _, kind, ep, t = sampler.draw(rng)
        builder.build(ep, t, kind, rng)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        _, kind, ep, t = sampler.draw(rng)
        s = builder.build(ep, t, kind, rng)
        tile_into_frame(torch.from_numpy(s.actions.reshape(1, -1)), FRAME)
        tile_into_frame(torch.from_numpy(s.proprio[None]), FRAME)
        tile_into_frame(torch.from_numpy(s.future_proprio[None]), FRAME)
        count += 1
    results["samples_per_s_per_core"] = count / (time.perf_counter() - start)

    # Where the time goes, stage by stage.
    ep = episodes[0]
    reps = 200
    t0 = time.perf_counter()
    for i in range(reps):
        raw = [ep.frame(c, i % 100) for c in ("wrist", "primary")] + [ep.frame(c, i % 100 + 16) for c in ("wrist", "primary")]
    results["ms_decode"] = (time.perf_counter() - t0) / reps * 1e3
    stack = torch.from_numpy(np.stack(raw))
    t0 = time.perf_counter()
    for _ in range(reps):
        augment(stack, rng, 224)
    results["ms_augment"] = (time.perf_counter() - t0) / reps * 1e3
    vec = torch.rand(1, 16 * 7)
    t0 = time.perf_counter()
    for _ in range(reps):
        tile_into_frame(vec, FRAME)
        tile_into_frame(vec[:, :9], FRAME)
        tile_into_frame(vec[:, :9], FRAME)
    results["ms_tiling"] = (time.perf_counter() - t0) / reps * 1e3

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    text = TextEmbeddingCache()
    text.fill(RandomTextEncoder(1024, 512), [f"task {i}" for i in range(4)])
    loader = make_loader(TrainingStream(sampler, builder, seed=0), text, batch_size=8, num_workers=2)
    it = iter(loader)
    for _ in range(3):
        next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        n += len(next(it).steps)
    results["loader_samples_per_s_2_workers"] = n / (time.perf_counter() - start)
    del it, loader

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    for k, v in results.items():
        print(f"{k:36s} {round(v, 2) if isinstance(v, float) else v}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
