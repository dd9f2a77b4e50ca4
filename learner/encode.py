"""Training targets with less VAE work and the same numbers (``cosmos_policy.prefix_encode``).

``CosmosPolicyModel.targets`` encodes the whole pixel clip of every sample (LIBERO: 33 frames,
about 8.4 TFLOP per sample through the Wan VAE, more than a forward pass of the 2B denoiser) and
then overwrites the proprio, action and value frames with tiled vectors. ``TargetEncoder`` skips
the trailing slots injection overwrites and reuses the constant leading slots (LIBERO: 24 of 33
pixel frames encoded, about 6.0 TFLOP), and injects.
"""

from __future__ import annotations

import torch

from cosmos_policy.errors import ConfigError
from learner.config import ENCODE_MODES
from cosmos_policy.model import CosmosPolicyModel, ModelBatch
from cosmos_policy.prefix_encode import PrefixCachedEncoder



class TargetEncoder(PrefixCachedEncoder):
    """x0 = inject(encode(clip)) for training batches.

    Args:
        model: the model whose frozen VAE and layout are used.
        mode: ``needed`` (skip the trailing non-image slots, reuse the constant leading ones) or
            ``full`` (``model.targets``: the reference path).
        max_clips, compile, channels_last: see ``PrefixCachedEncoder``.
    """

    def __init__(self, model: CosmosPolicyModel, mode: str = "needed", max_clips: int = 8, compile: bool = False,
                 channels_last: bool = False) -> None:
        if mode not in ENCODE_MODES:
            raise ConfigError(f"learner.vae_encode: expected one of {ENCODE_MODES}, got {mode!r}")
        if max_clips < 1:
            raise ConfigError(f"learner.vae_batch: expected >= 1, got {max_clips}")
        super().__init__(model, max_clips, compile, channels_last)
        self.mode = mode

    def __call__(self, batch: ModelBatch, validate: bool = True) -> torch.Tensor:
        """Training targets x0 (B, z, T, h, w), float32 (``validate=False``: the caller checked the batch)."""
        if self.mode == "full" or getattr(self.model, "_latent_cache", None) is not None:
            # ``full``, or the model remembers latents of clips it has seen (training without
            # augmentation): then its own path, which looks clips up before encoding them.
            return self.model.targets(batch)
        if validate:
            self.model.validate(batch, kinds_need_targets=True)
        return self.model.inject(self.latents(batch), batch)

