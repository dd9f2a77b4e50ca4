"""VAE latents with less work and the same numbers: the constant leading slots encoded once.

``CosmosPolicyModel.encode`` assembles every sample's pixel clip and runs the whole clip through
the Wan VAE. Two parts of that work never change the latents it keeps:

- the *leading* constant slots (the black frame 0 and, in LIBERO / RoboCasa, the current-proprio
  slot: 5 black pixel frames): every sample's clip starts with the same pixels, so the encoder's
  latents AND its causal state (the feature cache of every causal convolution) after them are
  the same for every sample. They are computed once, with batch 1, and broadcast to each batch;
- the *trailing* slots after the last one needed (training: the value frame, which injection
  overwrites; inference: everything after the conditioning frames): the VAE is causal, so
  nothing before them depends on them.

What remains is encoded chunk by chunk exactly as diffusers' ``AutoencoderKLWan._encode`` does,
through the same encoder modules and feature-cache protocol, ``max_clips`` clips at a time. The
result equals the whole-clip encode up to floating-point rounding of batch-size-dependent kernels
(``tests/test_learner_speedups.py`` and ``tests/test_policy.py`` check it). The learner uses it for
training targets (``learner.encode``), the policy for the conditioning frames of every query.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from cosmos_policy.config import VAE_TEMPORAL_COMPRESSION
from cosmos_policy.errors import ConfigError, InputError
from cosmos_policy.layout import SlotKind, SlotTime
from cosmos_policy.tokenizer import images_to_unit_range

if TYPE_CHECKING:
    from cosmos_policy.model import CosmosPolicyModel, ModelBatch


def _causal_conv_count(encoder: torch.nn.Module) -> int:
    """How many feature-cache slots the encoder's causal convolutions use (diffusers counts the same way)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in encoder.modules())


class PrefixCachedEncoder:
    """VAE latents of a batch's image slots, with the constant leading slots encoded once.

    Args:
        model: the model whose frozen VAE and layout are used.
        max_clips: clips per encoder call (activation memory grows with it).
        compile: compile the VAE encoder with ``torch.compile`` (every call after the constant
            prefix has the same shapes, so one graph serves them all).
        channels_last: keep the encoder's 3-D convolution weights and inputs channels-last.
    """

    def __init__(self, model: CosmosPolicyModel, max_clips: int = 8, compile: bool = False, channels_last: bool = False) -> None:
        if max_clips < 1:
            raise ConfigError(f"vae_batch: expected >= 1 clips per encoder call, got {max_clips}")
        self.model, self.max_clips = model, max_clips
        layout = model.layout
        images = [i for i, s in enumerate(layout.slots) if s.kind is SlotKind.IMAGE]
        if not images:
            raise ConfigError(f"layout {layout.name!r}: no image slot, nothing to encode")
        self.first_image, self.last_image = min(images), max(images)
        vae = model.tokenizer.vae
        self.channels_last = channels_last
        if channels_last:  # cuDNN's 3-D convolutions run on channels-last data without transposing it first
            for m in vae.encoder.modules():
                if isinstance(m, torch.nn.Conv3d):
                    m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
        self.encoder: Callable[..., torch.Tensor] = vae.encoder
        if compile:
            self.encoder = torch.compile(vae.encoder, dynamic=False)
        self._cache_slots = _causal_conv_count(vae.encoder)
        self._prefix: tuple[torch.Tensor, list[Any]] | None = None
        self._prefix_key: tuple[Any, ...] | None = None

    # ---- the constant prefix ----------------------------------------------------------------
    def _pixels(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        size = self.model.config.image_size
        return torch.full((batch, 3, 1, size, size), -1.0, device=device, dtype=dtype)

    def _run_chunk(self, chunk: torch.Tensor, cache: list[Any], encoder: Callable[..., torch.Tensor]) -> torch.Tensor:
        """One encoder call on a chunk (1 or 4 pixel frames) with the causal feature cache."""
        return encoder(chunk, feat_cache=cache, feat_idx=[0])

    def _constant_prefix(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, list[Any]]:
        """Encoder output and feature cache after the leading constant slots, for one clip."""
        key = (device, dtype)
        if self._prefix is None or self._prefix_key != key:
            vae = self.model.tokenizer.vae
            cache: list[Any] = [None] * self._cache_slots
            black = self._pixels(1, device, dtype)
            with torch.no_grad():
                outs = [self._run_chunk(black, cache, vae.encoder)]  # frame 0 alone, as the VAE does
                for _ in range(1, self.first_image):
                    outs.append(self._run_chunk(black.expand(-1, -1, VAE_TEMPORAL_COMPRESSION, -1, -1), cache, vae.encoder))
            self._prefix = (torch.cat(outs, dim=2), cache)
            self._prefix_key = key
        return self._prefix

    # ---- encoding -----------------------------------------------------------------------------
    @torch.no_grad()
    def latents(self, batch: ModelBatch, num_frames: int | None = None) -> torch.Tensor:
        """Normalized latents (B, z, T, h, w) in float32 of the first ``num_frames`` slots.

        ``num_frames`` None: through the last image slot (what training targets keep; the frames
        after it are zeros, which injection overwrites). Otherwise exactly ``model.encode``'s latents
        of the first ``num_frames`` slots, zeros after.
        """
        model, layout = self.model, self.model.layout
        tokenizer = model.tokenizer
        device, dtype = next(tokenizer.vae.parameters()).device, tokenizer.dtype
        names = [s.name for s in layout.slots]
        unit = {name: images_to_unit_range(img.to(device, non_blocking=True), f"images[{name!r}]") for name, img in batch.images.items()}
        size = model.config.image_size
        for name, img in unit.items():
            if img.shape[-2:] != (size, size):
                raise InputError(f"images[{name!r}]: expected {size}x{size} pixels, got {tuple(img.shape[-2:])}")
        b = batch.batch_size
        limit = layout.num_frames if num_frames is None else num_frames
        if not 1 <= limit <= layout.num_frames:
            raise InputError(f"num_frames: expected 1..{layout.num_frames} latent frames, got {limit}")
        # Training targets stop at the last image (injection overwrites the rest); an explicit
        # prefix is encoded whole, trailing non-image slots as their black frames, as ``encode`` does.
        last = self.last_image if num_frames is None else limit - 1
        prefix_out, prefix_cache = self._constant_prefix(device, dtype)
        parts = []
        for start in range(0, b, self.max_clips):
            n = min(self.max_clips, b - start)
            cache = [c.expand(n, *c.shape[1:]) if isinstance(c, torch.Tensor) else c for c in prefix_cache]
            outs = [prefix_out.expand(n, *prefix_out.shape[1:])]
            for k in range(self.first_image, last + 1):
                slot = layout.slots[k]
                image = None
                if slot.kind is SlotKind.IMAGE:  # as ``assemble_clip``: a missing future image is the current one
                    image = unit.get(names[k])
                    if image is None and slot.time is SlotTime.FUTURE:
                        image = unit.get(f"current_image.{slot.camera}")
                if image is not None:
                    frame = image[start : start + n].to(dtype)
                else:  # a non-image slot or a missing image: 4 black frames, as ``assemble_clip`` makes them
                    frame = self._pixels(n, device, dtype)[:, :, 0]
                chunk = frame.unsqueeze(2).expand(-1, -1, VAE_TEMPORAL_COMPRESSION, -1, -1)
                if self.channels_last:
                    chunk = chunk.contiguous(memory_format=torch.channels_last_3d)
                outs.append(self._run_chunk(chunk, cache, self.encoder))
            parts.append(tokenizer.vae.quant_conv(torch.cat(outs, dim=2)))
        moments = torch.cat(parts)
        z_dim = tokenizer.vae.config.z_dim
        z = moments[:, :z_dim].float()  # the posterior mean (``latent_dist.mode()``)
        mean, std = tokenizer.latent_statistics(z.device)
        z = ((z - mean) / std)[:, :, :limit]
        missing = layout.num_frames - z.shape[2]
        if missing:
            z = torch.cat([z, z.new_zeros(b, z.shape[1], missing, *z.shape[3:])], dim=2)
        return z
