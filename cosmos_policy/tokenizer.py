"""The frozen Wan 2.1 VAE (diffusers' ``AutoencoderKLWan``) around the latent layout.

Clip assembly follows the official datasets (method 1.2): frame 0 is one black image, then
every slot is its image repeated 4 times, so each slot becomes exactly one latent frame of the
causal VAE; non-image slots are 4 black frames whose latents are overwritten afterwards.

Encoding returns the posterior mean (NVIDIA's tokenizer does; diffusers' pipelines sample),
normalized per channel with the VAE config's Wan statistics: (z - mean) / std, sigma_data = 1.
Because the VAE is causal, encoding a prefix of the clip yields the same latents for those frames
as encoding the whole clip; inference uses that to encode only what conditioning needs.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan
from torch import nn

from cosmos_policy.config import VAE_TEMPORAL_COMPRESSION, ModelConfig
from cosmos_policy.errors import InputError
from cosmos_policy.layout import LatentLayout, SlotKind, SlotTime


def build_vae(cfg: ModelConfig) -> AutoencoderKLWan:
    """The Wan 2.1 VAE of ``cfg``'s shape, randomly initialized so that its latents see the images.

    Pretrained weights (``checkpoint.load_checkpoint``, the NVIDIA import) overwrite everything;
    the initialization matters only for random VAEs (the tiny model of the tests and the
    quickstart). PyTorch's default conv initialization shrinks the signal about 1.7x per layer,
    and over the encoder's ~15 convolutions the latents become a fixed bias pattern: measured on
    Lift frames, the latents of different images differed by 0.003 against a 0.4 pattern, so a
    policy could not see where the cube was. Fan-in Kaiming weights (gain for SiLU) and zero
    biases keep the images' variation in the latents.
    """
    v = cfg.vae
    vae = AutoencoderKLWan(
        base_dim=v.base_dim,
        z_dim=v.z_dim,
        dim_mult=list(v.dim_mult),
        num_res_blocks=v.num_res_blocks,
        temperal_downsample=list(v.temperal_downsample),
    )
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    module.bias.zero_()
    return vae


def images_to_unit_range(images: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1] (x / 127.5 - 1, as the official code)."""
    if images.dtype != torch.uint8:
        raise InputError(f"{name}: expected uint8 images, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"{name}: expected shape (batch, height, width, 3), got {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class VideoTokenizer(nn.Module):
    """Encode a layout's slot images into normalized latents and decode latents back to pixels."""

    def __init__(self, vae: AutoencoderKLWan, layout: LatentLayout, image_size: int) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.layout = layout
        self.image_size = image_size

    def latent_statistics(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, std) of the VAE config as float32 (1, z, 1, 1, 1), whatever the VAE's dtype."""
        z = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean, dtype=torch.float32, device=device).view(1, z, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std, dtype=torch.float32, device=device).view(1, z, 1, 1, 1)
        return mean, std

    def train(self, mode: bool = True) -> "VideoTokenizer":
        # The VAE is frozen: it stays in eval mode whatever the surrounding module does.
        super().train(mode)
        self.vae.eval()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def assemble_clip(self, images: dict[str, torch.Tensor], num_frames: int | None = None) -> torch.Tensor:
        """Build the pixel clip (B, 3, 1 + 4 (k - 1), H, W) in [-1, 1] for the first k latent frames.

        ``images`` maps slot names (``current_image.wrist``, ``future_image.primary``...) to uint8
        (B, H, W, 3). A missing future image is filled with the current image of its camera, as the
        official inference does before the future frames are noised; other missing slots are black.
        """
        layout = self.layout
        k = layout.num_frames if num_frames is None else num_frames
        if not 1 <= k <= layout.num_frames:
            raise InputError(f"num_frames: expected 1..{layout.num_frames} latent frames, got {k}")
        unknown = set(images) - {s.name for s in layout.slots if s.kind is SlotKind.IMAGE}
        if unknown:
            raise InputError(f"images: no image slot named {sorted(unknown)} in layout {layout.name!r}")
        if not images:
            raise InputError("images: at least one camera image is needed to build a clip")
        converted = {name: images_to_unit_range(img, f"images[{name!r}]") for name, img in images.items()}
        batch = _common_batch(converted)
        size = self.image_size
        for name, img in converted.items():
            if img.shape[-2:] != (size, size):
                raise InputError(f"images[{name!r}]: expected {size}x{size} pixels, got {tuple(img.shape[-2:])}")
        ref = next(iter(converted.values()))
        black = torch.full((batch, 3, size, size), -1.0, dtype=ref.dtype, device=ref.device)
        frames = [black]
        for slot in layout.slots[1:k]:
            img = black
            if slot.kind is SlotKind.IMAGE:
                img = converted.get(slot.name)
                if img is None and slot.time is SlotTime.FUTURE:
                    img = converted.get(f"current_image.{slot.camera}")
                if img is None:
                    img = black
            frames.extend([img] * VAE_TEMPORAL_COMPRESSION)
        return torch.stack(frames, dim=2)

    @torch.no_grad()
    def encode(self, clip: torch.Tensor, max_clips: int = 8) -> torch.Tensor:
        """Pixel clip (B, 3, 1 + 4 (k - 1), H, W) -> normalized latents (B, z, k, h, w) in float32.

        At most ``max_clips`` clips go through the VAE at once: its activations for one 33-frame
        224-pixel clip are a few GB, so a training batch of 32 in one call would not fit.
        """
        if clip.ndim != 5 or clip.shape[1] != 3 or (clip.shape[2] - 1) % VAE_TEMPORAL_COMPRESSION:
            raise InputError(f"clip: expected (batch, 3, 1 + 4k, height, width), got {tuple(clip.shape)}")
        parts = [self.vae.encode(part.to(self.dtype)).latent_dist.mode() for part in clip.split(max_clips)]
        z = torch.cat(parts).float()
        mean, std = self.latent_statistics(z.device)
        return (z - mean) / std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents (B, z, k, h, w) -> pixels (B, 3, 1 + 4 (k - 1), H, W) in [-1, 1]."""
        mean, std = self.latent_statistics(latents.device)
        z = latents.float() * std + mean
        return self.vae.decode(z.to(self.dtype)).sample.float().clamp(-1.0, 1.0)

    @torch.no_grad()
    def decode_future_images(self, generated: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decode the predicted future camera images as uint8 (B, H, W, 3) per camera.

        Injected frames (blank, proprio, action, value) are first put back to the latents of their
        black placeholder frames (``reference``: the encoded clip before injection); decoding the
        injected numbers as if they were images leaves artifacts in the frames after them
        (the official ``undo_latent_injection``).
        """
        layout = self.layout
        if generated.shape != reference.shape or generated.shape[2] != layout.num_frames:
            raise InputError(
                f"decode_future_images: expected generated and reference latents of {layout.num_frames} frames and one shape, "
                f"got {tuple(generated.shape)} and {tuple(reference.shape)}"
            )
        latents = generated.clone()
        idx = layout.injected_indices()
        latents[:, :, idx] = reference[:, :, idx].to(latents.dtype)
        last = max(layout.image_indices(SlotTime.FUTURE)) + 1
        pixels = self.decode(latents[:, :, :last])
        out = {}
        for i in layout.image_indices(SlotTime.FUTURE):
            frame = pixels[:, :, 1 + VAE_TEMPORAL_COMPRESSION * (i - 1)]
            out[layout.slots[i].camera] = ((frame + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        return out


def _common_batch(tensors: dict[str, torch.Tensor]) -> int:
    sizes = {name: t.shape[0] for name, t in tensors.items()}
    if len(set(sizes.values())) != 1:
        raise InputError(f"images: all cameras need the same batch size, got {sizes}")
    return next(iter(sizes.values()))
