"""Random batches in the model's units, for smoke runs and benchmarks (speed does not depend on values).

Real training samples come from episodes through the data pipeline; these only have the right
shapes, dtypes and ranges: uint8 images, vectors in [-1, 1], text from ``RandomTextEncoder``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from cosmos_policy.config import ModelConfig
from cosmos_policy.layout import LatentLayout, SampleKind, SlotKind
from cosmos_policy.model import ModelBatch
from cosmos_policy.text import RandomTextEncoder


def random_batch(
    config: ModelConfig,
    layout: LatentLayout,
    kinds: Sequence[SampleKind | str],
    seed: int = 0,
    instructions: Sequence[str] | None = None,
) -> ModelBatch:
    """A full batch (every field present) of ``len(kinds)`` samples."""
    g = torch.Generator().manual_seed(seed)
    b = len(kinds)
    size = config.image_size
    images = {
        s.name: torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=g)
        for s in layout.slots
        if s.kind is SlotKind.IMAGE
    }

    def unit(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g) * 2.0 - 1.0

    texts = list(instructions) if instructions is not None else [f"task {i % 3}" for i in range(b)]
    text = RandomTextEncoder(config.text.embed_dim, config.text.max_length).encode(texts)
    has_proprio = layout.has_proprio
    return ModelBatch(
        kinds=[SampleKind(k) for k in kinds],
        text=text,
        images=images,
        proprio=unit(b, layout.proprio_dim) if has_proprio else None,
        future_proprio=unit(b, layout.proprio_dim) if has_proprio else None,
        actions=unit(b, layout.action_chunk, layout.action_dim),
        value=unit(b),
    )
