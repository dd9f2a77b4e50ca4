"""The training objective (method 3.1-3.3), as the released configs compute it.

- sigma per sample from the hybrid distribution: with probability 0.7 ln sigma ~ N(ln 4, 1.2),
  otherwise sigma ~ U[1, 85]; then times sqrt(number of latent frames) (x3 for LIBERO);
- x_sigma = x0 + sigma * eps (variance-exploding bookkeeping, rectified-flow preconditioning);
- loss = loss_scale * mean over (B, C, T, H, W) of (1 + sigma)^2 / sigma^2 * (x0_pred - x0)^2,
  counting only generated frames. Clean frames are replaced by their targets and masked frames
  (input masking of the planning value) are zeroed, but both stay in the mean's denominator, as
  ``.mean()`` in the official training step does.
Metrics are single-step x0 L1 errors in normalized latent space per sample kind and output
(action, future proprio, future image latents, value), the figures the official docs quote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cosmos_policy.config import DiffusionConfig
from cosmos_policy.denoiser import Denoiser
from cosmos_policy.errors import InputError
from cosmos_policy.layout import FrameRole, LatentLayout, SampleKind, SlotTime
from cosmos_policy.transfer import to_device


def sample_training_sigma(
    batch_size: int, num_frames: int, cfg: DiffusionConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B,) float32 noise levels from the hybrid distribution, on the generator's device (CPU)."""
    n = cfg.noise
    use_lognormal = torch.rand(batch_size, generator=generator) < n.lognormal_probability
    lognormal = torch.exp(n.lognormal_mean + n.lognormal_std * torch.randn(batch_size, generator=generator))
    uniform = n.uniform_low + (n.uniform_high - n.uniform_low) * torch.rand(batch_size, generator=generator)
    sigma = torch.where(use_lognormal, lognormal, uniform)
    if n.scale_by_sqrt_frames:
        sigma = sigma * math.sqrt(num_frames)
    return sigma.float()


@dataclass
class TrainingNoise:
    """The random draws of one loss evaluation: noise levels (B,) and Gaussian noise (B, C, T, H, W).

    Drawn on the host generator so that any device gets the same numbers; a learner can draw (and
    pin) them ahead of the step that uses them, off the GPU's critical path.
    """

    sigma: torch.Tensor
    eps: torch.Tensor

    @classmethod
    def draw(cls, shape: tuple[int, ...], cfg: DiffusionConfig, generator: torch.Generator | None = None) -> TrainingNoise:
        """sigma first, then eps, from ``generator``: the order every loss evaluation has always used."""
        b, _, t_frames = shape[:3]
        sigma = sample_training_sigma(b, t_frames, cfg, generator)
        return cls(sigma=sigma, eps=torch.randn(tuple(shape), generator=generator, dtype=torch.float32))

    def pinned(self) -> TrainingNoise:
        """Both tensors in pinned host memory (for a copy to a GPU that does not wait)."""
        return TrainingNoise(self.sigma.pin_memory(), self.eps.pin_memory())


def loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """(1 + sigma)^2 / sigma^2 = 1 / t^2: the x0 MSE becomes an unweighted velocity MSE."""
    return (1.0 + sigma) ** 2 / sigma**2


@dataclass
class LossOutput:
    """The loss and its metrics; ``metric_tensors`` stay on the device (reading them waits for the GPU)."""

    loss: torch.Tensor
    metric_tensors: dict[str, torch.Tensor]
    x0_pred: torch.Tensor

    @property
    def metrics(self) -> dict[str, float]:
        """The metrics as floats (one device synchronization for all of them)."""
        if not self.metric_tensors:
            return {}
        values = torch.stack([v.detach().float().reshape(()) for v in self.metric_tensors.values()]).tolist()
        return dict(zip(self.metric_tensors, values))


def output_groups(layout: LatentLayout) -> dict[str, list[int]]:
    """Frames of each reported output: action, future proprio, future image latents, value."""
    groups = {"action": [layout.action_index], "future_image": layout.image_indices(SlotTime.FUTURE), "value": [layout.value_index]}
    future_proprio = layout.proprio_index(SlotTime.FUTURE)
    if future_proprio is not None:
        groups["future_proprio"] = [future_proprio]
    return groups


def diffusion_loss(
    denoiser: Denoiser,
    x0: torch.Tensor,
    roles: torch.Tensor,
    text: torch.Tensor,
    kinds: list[SampleKind],
    layout: LatentLayout,
    cfg: DiffusionConfig,
    generator: torch.Generator | None = None,
    noise: TrainingNoise | None = None,
) -> LossOutput:
    """One denoising-score-matching loss evaluation on target latents ``x0`` (B, C, T, H, W).

    ``noise``: the draws to use (``TrainingNoise.draw`` of ``x0``'s shape); else drawn here from ``generator``.
    """
    b, _, t_frames = x0.shape[:3]
    device = x0.device
    if noise is None:
        noise = TrainingNoise.draw(tuple(x0.shape), cfg, generator)
    elif tuple(noise.eps.shape) != tuple(x0.shape) or tuple(noise.sigma.shape) != (b,):
        raise InputError(f"noise: expected sigma {(b,)} and eps {tuple(x0.shape)}, got {tuple(noise.sigma.shape)} and "
                         f"{tuple(noise.eps.shape)}")
    # Host draws, copied without a sync.
    sigma = to_device(noise.sigma, device)
    eps = to_device(noise.eps, device)
    roles = to_device(roles, device)
    x_sigma = x0 + sigma.view(b, 1, 1, 1, 1) * eps
    clean = roles == FrameRole.CLEAN
    x0_pred = denoiser(x_sigma, sigma, x0, clean, text)
    generated = (roles == FrameRole.GENERATED).to(x0_pred.dtype).view(b, 1, t_frames, 1, 1)
    per_element = loss_weight(sigma).view(b, 1, 1, 1, 1) * (x0_pred - x0) ** 2 * generated
    loss = per_element.mean() * cfg.loss_scale
    metrics = {"loss": loss.detach()}
    metrics.update(kind_metrics(x0_pred.detach(), x0, layout.role_tensor(kinds), kinds, layout))
    return LossOutput(loss=loss, metric_tensors=metrics, x0_pred=x0_pred)


def kind_metrics(
    x0_pred: torch.Tensor, x0: torch.Tensor, roles: torch.Tensor, kinds: list[SampleKind], layout: LatentLayout
) -> dict[str, torch.Tensor]:
    """``<kind>/<output>_l1``: mean |x0_pred - x0| over an output's frames where it is generated.

    Which frames count is decided on the host from ``roles`` (moved there if needed), so no value
    computed on the device is read back here: the results are 0-d tensors on ``x0``'s device.
    """
    out: dict[str, torch.Tensor] = {}
    roles = roles.cpu()
    abs_err = (x0_pred - x0).abs().mean(dim=(1, 3, 4))  # (B, T)
    for kind in dict.fromkeys(kinds):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        for name, frames in output_groups(layout).items():
            gen = roles[rows][:, frames] == FrameRole.GENERATED  # (rows, frames), host
            count = int(gen.sum())
            if count:
                weights = to_device(gen.to(abs_err.dtype), abs_err.device)
                sel = abs_err[to_device(torch.tensor(rows), abs_err.device)][:, frames]
                out[f"{SampleKind(kind).value}/{name}_l1"] = (sel * weights).sum() / count
    return out


__all__ = ["LossOutput", "TrainingNoise", "diffusion_loss", "kind_metrics", "loss_weight", "output_groups", "sample_training_sigma"]
