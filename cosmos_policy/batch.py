"""What the model consumes and produces, in model units.

``ModelBatch``: camera images per slot (uint8), proprio / actions / values already normalized to
[-1, 1], text embeddings, and one ``SampleKind`` per sample. ``Prediction``: one sampling pass's
latents and the actions, future proprio and value read from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cosmos_policy.layout import SampleKind
from cosmos_policy.transfer import to_device


@dataclass
class ModelBatch:
    """One batch of samples in model units.

    Attributes:
        kinds: the sample kind of every sample (policy, world model, value...).
        text: instruction embeddings (B, max_length, embed_dim).
        images: uint8 (B, H, W, 3) per image slot name, e.g. ``current_image.wrist``.
        proprio: current proprio (B, d_p) in [-1, 1].
        future_proprio: proprio at t + K (B, d_p) in [-1, 1].
        actions: action chunk (B, K, d_a) in [-1, 1].
        value: value label of the future state (B,) in [-1, 1].
    """

    kinds: list[SampleKind]
    text: torch.Tensor
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    proprio: torch.Tensor | None = None
    future_proprio: torch.Tensor | None = None
    actions: torch.Tensor | None = None
    value: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return len(self.kinds)

    def to(self, device: torch.device | str) -> "ModelBatch":
        """The batch with every tensor on ``device`` (host -> GPU copies queued without waiting for the GPU)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else to_device(t, device)

        return ModelBatch(kinds=list(self.kinds), text=to_device(self.text, device), images={k: to_device(v, device) for k, v in self.images.items()},
                          proprio=move(self.proprio), future_proprio=move(self.future_proprio), actions=move(self.actions), value=move(self.value))

    def pinned(self) -> "ModelBatch":
        """The batch with its host tensors in pinned memory, so the copy to a GPU can be queued without waiting."""

        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None or t.device.type != "cpu" else t.pin_memory()

        return ModelBatch(kinds=list(self.kinds), text=pin(self.text), images={k: pin(v) for k, v in self.images.items()},
                          proprio=pin(self.proprio), future_proprio=pin(self.future_proprio), actions=pin(self.actions), value=pin(self.value))

    def select(self, indices: list[int], kinds: list[SampleKind] | None = None) -> "ModelBatch":
        """The samples at ``indices`` (optionally asking for other sample kinds)."""
        idx = torch.as_tensor(indices, dtype=torch.long)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx.to(t.device)]

        return ModelBatch(
            kinds=list(kinds) if kinds is not None else [self.kinds[i] for i in indices],
            text=self.text[idx.to(self.text.device)],
            images={k: v[idx.to(v.device)] for k, v in self.images.items()},
            proprio=pick(self.proprio),
            future_proprio=pick(self.future_proprio),
            actions=pick(self.actions),
            value=pick(self.value),
        )


@dataclass
class Prediction:
    """What one sampling pass produced, in model units (normalized)."""

    latents: torch.Tensor  # (B, C, T, h, w) final x0 in float32
    actions: torch.Tensor  # (B, K, d_a) in [-1, 1] space
    future_proprio: torch.Tensor | None  # (B, d_p)
    value: torch.Tensor  # (B,) in [0, 1]
