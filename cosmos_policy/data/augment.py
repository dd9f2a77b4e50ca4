"""Image augmentation for training samples, and the matching test-time crop (method sheet 3.7).

What the official code does (``cosmos_policy/datasets/dataset_utils.py::preprocess_image`` /
``apply_image_aug`` with ``stronger=True``, used for all three benchmarks): every image of a sample
is first resized to 224 x 224, then ONE set of parameters is drawn for the whole sample and applied
identically to each image (current and future, all cameras), in this fixed order:

1. random resized crop covering 90 % of the area, aspect 1, at a random position, resized back;
2. rotation by U(-5, 5) degrees about the centre, counter-clockwise for positive angles, black fill;
3. colour jitter in a FIXED order (not ColorJitter's random permutation): brightness x U(0.7, 1.3),
   contrast x U(0.6, 1.4), saturation x U(0.5, 1.5), hue + U(-0.05, 0.05) turns, each with
   torchvision's functional semantics and a clamp to the valid range after each.

At test time (``cosmos_utils.py::apply_image_transforms`` with ``trained_with_image_aug=True``) the
policy sees a centre crop of side sqrt(0.9) of the image, resized back.

How this module does it, and why it differs in small ways:

- The resize to the output size, the crop and the rotation are one affine warp (bilinear sampling)
  of all images at once, straight from the stored image (e.g. LIBERO's 256 x 256) to the output
  size. This keeps a data-loader worker well above 50 samples/s on one core; the official code
  resamples three times (PIL bicubic resize, bilinear crop-resize, nearest-neighbour rotation).
- The crop is continuous: its side is exactly sqrt(area) of the image side and its offset is
  uniform over the positions that keep it inside the image, where the official code rounds to
  whole pixels (213 of 224 in training, 212 of 224 at test time). Training and test crops
  therefore have the same scale here.
- The colour jitter runs in float on the warped result and is rounded to uint8 once at the end;
  the official code converts back to uint8 (truncating) after every jitter step.

Crop boxes are stored as fractions of the image side, so parameters can be drawn before the images
are decoded and are valid for any image size. For a non-square image the crop covers the same
fraction of each side (so the area fraction is still exact) and the output is square, as the
official resize to 224 x 224 also squashes such images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cosmos_policy.errors import ConfigError, InputError

# ITU-R 601 luma weights, as torchvision's ``rgb_to_grayscale`` (used by contrast and saturation).
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# Hues (in sixths of a turn) of pure red, green and blue: the centres of the HSV -> RGB map.
_HUE_CHANNEL_CENTRES = (0.0, 2.0, 4.0)
_MAX_LEVEL = 255.0


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the training augmentation; the defaults are the official "stronger" variant.

    Attributes:
        crop_area: fraction of the image area kept by the random crop (side = sqrt(crop_area)).
        max_rotation_deg: rotation angle ~ U(-max_rotation_deg, max_rotation_deg) degrees.
        brightness: brightness factor ~ U(1 - brightness, 1 + brightness).
        contrast: contrast factor ~ U(1 - contrast, 1 + contrast).
        saturation: saturation factor ~ U(1 - saturation, 1 + saturation).
        hue: hue shift ~ U(-hue, hue), in full turns of the colour wheel.
    """

    crop_area: float = 0.9
    max_rotation_deg: float = 5.0
    brightness: float = 0.3
    contrast: float = 0.4
    saturation: float = 0.5
    hue: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_area <= 1.0:
            raise ConfigError(f"crop_area: expected a fraction in (0, 1], got {self.crop_area}")
        if not 0.0 <= self.max_rotation_deg <= 180.0:
            raise ConfigError(f"max_rotation_deg: expected a value in [0, 180], got {self.max_rotation_deg}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}: expected a jitter half-width in [0, 1] (factors stay >= 0), got {value}")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"hue: expected a half-width in [0, 0.5] turns, got {self.hue}")


@dataclass(frozen=True)
class AugmentParams:
    """The augmentation drawn for one training sample, applied to each of its images.

    Attributes:
        crop_left: left edge of the square crop, as a fraction of the image width.
        crop_top: top edge of the crop, as a fraction of the image height.
        crop_side: side of the crop as a fraction of the image side (sqrt of the area fraction).
        angle_deg: rotation in degrees, counter-clockwise for positive values (torchvision ``rotate``).
        brightness: multiplicative brightness factor (1 = unchanged).
        contrast: contrast factor, blending with the mean grey level (1 = unchanged, 0 = uniform).
        saturation: saturation factor, blending with the greyscale image (1 = unchanged, 0 = grey).
        hue: hue shift in full turns (0 = unchanged).

    The colour operations always run in the official fixed order brightness, contrast,
    saturation, hue, so no order is stored.
    """

    crop_left: float
    crop_top: float
    crop_side: float
    angle_deg: float
    brightness: float
    contrast: float
    saturation: float
    hue: float

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_side <= 1.0:
            raise InputError(f"crop_side: expected a fraction in (0, 1], got {self.crop_side}")
        for name in ("crop_left", "crop_top"):
            value = getattr(self, name)
            if not -1e-9 <= value <= 1.0 - self.crop_side + 1e-9:
                raise InputError(f"{name}: expected the crop inside the image, in [0, {1.0 - self.crop_side}], got {value}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise InputError(f"{name}: expected a finite factor >= 0, got {value}")
        for name in ("angle_deg", "hue"):
            if not math.isfinite(getattr(self, name)):
                raise InputError(f"{name}: expected a finite value, got {getattr(self, name)}")


def sample_params(rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> AugmentParams:
    """Draw one sample's augmentation: crop position, angle and jitter factors, each uniform."""
    side = math.sqrt(cfg.crop_area)
    return AugmentParams(
        crop_left=float(rng.uniform(0.0, 1.0 - side)),
        crop_top=float(rng.uniform(0.0, 1.0 - side)),
        crop_side=side,
        angle_deg=float(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)),
        brightness=float(rng.uniform(1.0 - cfg.brightness, 1.0 + cfg.brightness)),
        contrast=float(rng.uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast)),
        saturation=float(rng.uniform(1.0 - cfg.saturation, 1.0 + cfg.saturation)),
        hue=float(rng.uniform(-cfg.hue, cfg.hue)),
    )


def apply_augmentation(images: torch.Tensor, params: AugmentParams, output_size: int) -> torch.Tensor:
    """Crop, rotate, resize and colour-jitter every image of one sample with the same ``params``.

    ``images`` is uint8 (N, H, W, 3); the result is uint8 (N, output_size, output_size, 3).
    """
    _check_images(images)
    _check_output_size(output_size)
    side = params.crop_side
    angle = math.radians(params.angle_deg)
    cos, sin = math.cos(angle), math.sin(angle)
    # Output coords -> (inverse rotation) -> crop-resized image coords -> source coords, all in
    # affine_grid's normalized [-1, 1] space (y down), so one matrix does the whole geometry.
    theta = (
        (side * cos, -side * sin, 2.0 * params.crop_left + side - 1.0),
        (side * sin, side * cos, 2.0 * params.crop_top + side - 1.0),
    )
    x = _warp(images, theta, output_size)
    _adjust_brightness(x, params.brightness)
    _adjust_contrast(x, params.contrast)
    _adjust_saturation(x, params.saturation)
    _shift_hue(x, params.hue)
    return _to_uint8(x)


def augment(
    images: torch.Tensor, rng: np.random.Generator, output_size: int, cfg: AugmentConfig = AugmentConfig()
) -> tuple[torch.Tensor, AugmentParams]:
    """Draw one set of parameters from ``rng`` and apply it to all images of one training sample."""
    _check_images(images)
    params = sample_params(rng, cfg)
    return apply_augmentation(images, params, output_size), params


def center_crop_resize(images: torch.Tensor, output_size: int, area: float = 0.9) -> torch.Tensor:
    """Test-time counterpart of the random crop: the centred crop of ``area`` of the image, resized.

    Official evaluation does this whenever the policy was trained with augmentation, so the
    objects appear at the scale the policy saw in training.
    """
    _check_images(images)
    _check_output_size(output_size)
    if not 0.0 < area <= 1.0:
        raise InputError(f"area: expected a fraction in (0, 1], got {area}")
    side = math.sqrt(area)
    return _to_uint8(_warp(images, ((side, 0.0, 0.0), (0.0, side, 0.0)), output_size))


def resize(images: torch.Tensor, output_size: int) -> torch.Tensor:
    """Bilinear resize to ``output_size`` (training without augmentation); same sampler as the rest."""
    _check_images(images)
    _check_output_size(output_size)
    return _to_uint8(_warp(images, ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)), output_size))


def _check_images(images: torch.Tensor) -> None:
    """Reject anything but a non-empty uint8 (N, H, W, 3) tensor, naming what was expected."""
    expected = "a uint8 torch.Tensor of shape (N, H, W, 3) with N >= 1"
    if not isinstance(images, torch.Tensor):
        raise InputError(f"images: expected {expected}, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise InputError(f"images: expected {expected}, got dtype {images.dtype}")
    if images.ndim != 4:
        raise InputError(f"images: expected {expected}, got {images.ndim} dims (shape {tuple(images.shape)})")
    if images.shape[-1] != 3:
        raise InputError(f"images: expected {expected}, got {images.shape[-1]} channels (shape {tuple(images.shape)})")
    if min(images.shape[:3]) == 0:
        raise InputError(f"images: expected {expected}, got an empty tensor of shape {tuple(images.shape)}")


def _check_output_size(output_size: int) -> None:
    """Reject a non-positive or non-integer output side."""
    if isinstance(output_size, bool) or not isinstance(output_size, int) or output_size < 1:
        raise InputError(f"output_size: expected a positive int, got {output_size!r}")


def _warp(images: torch.Tensor, theta: tuple[tuple[float, ...], ...], output_size: int) -> torch.Tensor:
    """Sample all images through one affine map; returns float (N, 3, S, S) in [0, 255].

    ``theta`` maps output coordinates to source coordinates in ``grid_sample``'s normalized
    [-1, 1] space (align_corners=False: -1 and 1 are the outer pixel edges). The N images are
    stacked as 3N channels of one batch item so that one sampling grid serves them all. Points
    whose source falls outside the image are black (the rotation's fill); points inside but beyond
    the outermost pixel centres take the border pixel, as a plain resize would.
    """
    n, h, w, _ = images.shape
    x = images.permute(0, 3, 1, 2).reshape(1, 3 * n, h, w).to(torch.float32)
    grid = _affine_grid(theta, output_size, images.device)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # 1 where both source coordinates lie within [-1, 1], else 0 (float ops: bool kernels are slow).
    inside = grid.abs().sub_(1.0).clamp_min_(0.0).sign_().amax(dim=-1).neg_().add_(1.0)
    out.mul_(inside.unsqueeze(1))
    return out.view(n, 3, output_size, output_size)


def _affine_grid(theta: tuple[tuple[float, ...], ...], size: int, device: torch.device | None = None) -> torch.Tensor:
    """``F.affine_grid`` for one square output, built by broadcasting (its batched matmul is slower)."""
    coords = torch.arange(size, dtype=torch.float32, device=device).mul_(2.0 / size).add_(1.0 / size - 1.0)
    cols, rows = coords.view(1, size), coords.view(size, 1)
    (a, b, c), (d, e, f) = theta
    grid_x = (cols * a + rows * b).add_(c)
    grid_y = (cols * d + rows * e).add_(f)
    return torch.stack((grid_x, grid_y), dim=-1).unsqueeze(0)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of (N, 3, S, S) images as (N, 1, S, S)."""
    r, g, b = _GRAY_WEIGHTS
    return (x[:, 0:1] * r).add_(x[:, 1:2], alpha=g).add_(x[:, 2:3], alpha=b)


def _adjust_brightness(x: torch.Tensor, factor: float) -> None:
    """torchvision ``adjust_brightness``: scale towards black, in place."""
    x.mul_(factor).clamp_(0.0, _MAX_LEVEL)


def _adjust_contrast(x: torch.Tensor, factor: float) -> None:
    """torchvision ``adjust_contrast``: blend with each image's mean grey level, in place."""
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    x.mul_(factor).add_(mean * (1.0 - factor)).clamp_(0.0, _MAX_LEVEL)


def _adjust_saturation(x: torch.Tensor, factor: float) -> None:
    """torchvision ``adjust_saturation``: blend with the per-pixel greyscale image, in place."""
    gray = _grayscale(x).mul_(1.0 - factor)
    x.mul_(factor).add_(gray).clamp_(0.0, _MAX_LEVEL)


def _shift_hue(x: torch.Tensor, shift: float) -> None:
    """torchvision ``adjust_hue``, in place: rotate H in HSV space by ``shift`` turns, keep S and V.

    H in sixths of a turn is (g - b) / chroma where red is the largest channel, 2 + (b - r) /
    chroma where green is, and 4 + (r - g) / chroma otherwise (torchvision's tie order). Keeping
    S and V keeps each pixel's max and min channel, so RGB is rebuilt directly from the shifted H
    in [0, 6) with the piecewise-linear HSV -> RGB map, written here as
    channel = min + chroma * clamp(||H - c| - 3| - 1, 0, 1) with c = 0, 2, 4 for R, G, B
    (the same function as torchvision's six-sector table). The branches are float 0/1 masks and
    everything runs in a few reused buffers: on one CPU core boolean kernels, ``where`` and fresh
    large allocations each cost more than the arithmetic.
    """
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    high = torch.maximum(r, g)
    torch.maximum(high, b, out=high)
    low = torch.minimum(r, g)
    torch.minimum(low, b, out=low)
    chroma = high - low
    not_red = (high - r).sign_()  # 0 where red is the largest channel, else 1
    not_green = torch.sub(high, g, out=high).sign_()  # high is not needed any more
    # sixths * chroma = (g - b) + not_red * (q - (g - b)), where q is the green-or-blue branch
    # q = (b - r + 2 chroma) + not_green * (2 r - g - b + 2 chroma).
    sixths = r * 2.0
    sixths.sub_(g).sub_(b).add_(chroma, alpha=2.0).mul_(not_green)
    sixths.add_(b).sub_(r).add_(chroma, alpha=2.0).sub_(g).add_(b).mul_(not_red).add_(g).sub_(b)
    # Grey pixels have numerator 0 and any hue rebuilds them; the tiny chroma adds < 1e-9 below.
    sixths.div_(chroma.clamp_min_(1e-12)).add_(6.0 * shift)
    turns = torch.mul(sixths, 1.0 / 6.0, out=not_red).floor_()
    sixths.sub_(turns, alpha=6.0)
    centres = torch.tensor(_HUE_CHANNEL_CENTRES, dtype=x.dtype).view(1, 3, 1, 1)
    torch.sub(sixths.unsqueeze(1), centres, out=x)
    x.abs_().sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0).mul_(chroma.unsqueeze(1)).add_(low.unsqueeze(1))


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) float in [0, 255] -> contiguous uint8 (N, S, S, 3), rounded to nearest.

    Every producer keeps values within [0, 255] (convex combinations and clamped jitter), so
    adding 0.5 and truncating rounds to nearest without overflow.
    """
    return x.add_(0.5).permute(0, 2, 3, 1).to(torch.uint8, memory_format=torch.contiguous_format)
