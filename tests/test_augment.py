"""Training augmentation and the test-time centre crop (method sheet 3.7)."""

from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np
import pytest
import torch

from cosmos_policy.data.augment import (
    AugmentConfig,
    AugmentParams,
    apply_augmentation,
    augment,
    center_crop_resize,
    resize,
    sample_params,
)
from cosmos_policy.errors import ConfigError, InputError

# Full-image crop, no rotation, neutral colour: the warp reduces to a plain resize.
IDENTITY = AugmentParams(
    crop_left=0.0, crop_top=0.0, crop_side=1.0, angle_deg=0.0, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0
)
GRAY = np.array([0.2989, 0.587, 0.114])


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def _uniform(rgb: tuple[int, int, int], size: int = 32) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.uint8).expand(1, size, size, 3).contiguous()


def _max_diff(a: torch.Tensor, b: torch.Tensor | np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def _reference_jitter(image: np.ndarray, p: AugmentParams) -> np.ndarray:
    """torchvision's functional colour ops in the official order, in float64 (uint8 -> [0, 1])."""
    x = image.astype(np.float64) / 255.0
    x = np.clip(x * p.brightness, 0.0, 1.0)
    x = np.clip(p.contrast * x + (1.0 - p.contrast) * (x @ GRAY).mean(), 0.0, 1.0)
    x = np.clip(p.saturation * x + (1.0 - p.saturation) * (x @ GRAY)[..., None], 0.0, 1.0)
    hsv = [colorsys.rgb_to_hsv(*px) for px in x.reshape(-1, 3)]
    x = np.array([colorsys.hsv_to_rgb((h + p.hue) % 1.0, s, v) for h, s, v in hsv]).reshape(x.shape)
    return x * 255.0


# ---- one set of parameters per sample -----------------------------------------------------------


def test_copies_of_one_image_come_out_identical():
    out, _ = augment(_images(1, 96).expand(4, -1, -1, -1), np.random.default_rng(3), 80)
    assert out.shape == (4, 80, 80, 3) and out.dtype == torch.uint8
    for i in range(1, 4):
        assert torch.equal(out[i], out[0])


def test_images_of_a_sample_are_augmented_independently_of_each_other():
    images = _images(2, 96, seed=1)
    params = sample_params(np.random.default_rng(5))
    together = apply_augmentation(images, params, 80)
    for i in range(2):
        assert torch.equal(apply_augmentation(images[i : i + 1], params, 80), together[i : i + 1])


def test_parameters_are_drawn_from_the_configured_ranges():
    cfg = AugmentConfig()
    rng = np.random.default_rng(0)
    draws = [sample_params(rng, cfg) for _ in range(2000)]
    side = math.sqrt(0.9)
    for p in draws:
        assert p.crop_side == pytest.approx(side) and p.crop_side**2 == pytest.approx(0.9)
    ranges = {
        "crop_left": (0.0, 1.0 - side),
        "crop_top": (0.0, 1.0 - side),
        "angle_deg": (-5.0, 5.0),
        "brightness": (0.7, 1.3),
        "contrast": (0.6, 1.4),
        "saturation": (0.5, 1.5),
        "hue": (-0.05, 0.05),
    }
    for name, (lo, hi) in ranges.items():
        values = np.array([getattr(p, name) for p in draws])
        width = hi - lo
        assert values.min() >= lo and values.max() <= hi, name
        # Reaches both ends and is roughly flat: 10 bins of 200 expected draws each.
        assert values.min() < lo + 0.01 * width and values.max() > hi - 0.01 * width, name
        counts, _ = np.histogram(values, bins=10, range=(lo, hi))
        assert counts.min() > 140 and counts.max() < 260, (name, counts)


def test_same_seed_same_result_and_different_seeds_differ():
    images = _images(4, 64)
    a, pa = augment(images, np.random.default_rng(7), 56)
    b, pb = augment(images, np.random.default_rng(7), 56)
    c, pc = augment(images, np.random.default_rng(8), 56)
    assert pa == pb and torch.equal(a, b)
    assert pc != pa and not torch.equal(a, c)


# ---- geometry ---------------------------------------------------------------------------------------


def test_neutral_parameters_give_the_plain_resize():
    images = _images(3, 96, seed=2)
    assert _max_diff(apply_augmentation(images, IDENTITY, 72), resize(images, 72)) <= 1
    # At the same size the warp is the identity.
    assert _max_diff(apply_augmentation(images, IDENTITY, 96), images) <= 1
    assert torch.equal(resize(images, 96), images)


def test_upscaling_keeps_the_border_pixels():
    # Only points outside the image are black; the outer half pixel repeats the border.
    assert resize(_uniform((9, 99, 199), 8), 32).reshape(-1, 3).unique(dim=0).tolist() == [[9, 99, 199]]


def test_resize_of_a_gradient_samples_at_pixel_centres():
    # value = column index; output column j samples source x = (j + 0.5) * 256 / 224 - 0.5.
    cols = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1).expand(1, 256, 256, 3).contiguous()
    out = resize(cols, 224)[0, 100, :, 0].double()
    expected = np.clip((np.arange(224) + 0.5) * 256 / 224 - 0.5, 0, 255)
    assert _max_diff(out, expected) <= 0.5 + 1e-6


def test_rotation_blackens_the_corners_and_keeps_the_centre():
    params = dataclasses.replace(IDENTITY, angle_deg=5.0)
    out = apply_augmentation(_uniform((200, 120, 40), 64), params, 64)[0]
    for corner in (out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]):
        assert corner.tolist() == [0, 0, 0]
    assert out[20:44, 20:44].eq(torch.tensor([200, 120, 40], dtype=torch.uint8)).all()
    # On an odd-sized image the centre pixel maps onto itself.
    images = _images(2, 65, seed=4)
    rotated = apply_augmentation(images, params, 65)
    assert _max_diff(rotated[:, 32, 32], images[:, 32, 32]) <= 1
    assert not torch.equal(rotated, images)


def test_positive_angles_turn_counter_clockwise():
    # As torchvision's rotate: content on the right moves to the top.
    image = torch.zeros(1, 33, 33, 3, dtype=torch.uint8)
    image[0, 14:19, 28:33] = 255
    out = apply_augmentation(image, dataclasses.replace(IDENTITY, angle_deg=90.0), 33)[0, :, :, 0]
    assert out[0:5, 14:19].min() >= 250
    assert out[:, 28:33].max() == 0


def test_crop_box_selects_the_drawn_region():
    # value = row index: a crop at the bottom with side 1/2 maps rows 128..255 onto the output.
    rows = torch.arange(256, dtype=torch.uint8).view(1, 256, 1, 1).expand(1, 256, 256, 3).contiguous()
    params = dataclasses.replace(IDENTITY, crop_left=0.25, crop_top=0.5, crop_side=0.5)
    out = apply_augmentation(rows, params, 128)[0, :, 64, 0].double()
    assert _max_diff(out, np.arange(128, 256)) <= 0.5 + 1e-6


def test_center_crop_takes_the_central_90_percent():
    side = math.sqrt(0.9) * 256  # 242.86 source pixels, starting at 6.57
    start = (256 - side) / 2
    grid = np.add.outer(np.arange(256), np.zeros(256))
    image = np.stack([grid.T, grid, np.full((256, 256), 77.0)], axis=-1).astype(np.uint8)  # R = column, G = row
    out = center_crop_resize(torch.from_numpy(image)[None], 224)
    assert out.shape == (1, 224, 224, 3) and out.dtype == torch.uint8
    expected = start + (np.arange(224) + 0.5) * side / 224 - 0.5
    assert _max_diff(out[0, 50, :, 0], expected) <= 0.5 + 1e-3
    assert _max_diff(out[0, :, 50, 1], expected) <= 0.5 + 1e-3
    assert out[..., 2].eq(77).all()
    assert center_crop_resize(_images(2, 100), 37).shape == (2, 37, 37, 3)


# ---- colour -------------------------------------------------------------------------------------


def test_brightness_scales_mid_grey():
    out = apply_augmentation(_uniform((128, 128, 128)), dataclasses.replace(IDENTITY, brightness=1.2), 32)
    assert out.eq(154).all()  # 128 * 1.2 = 153.6


def test_contrast_zero_gives_the_mean_grey_level():
    images = _images(2, 32, seed=6)
    images[1] //= 3  # each image blends towards its own mean
    out = apply_augmentation(images, dataclasses.replace(IDENTITY, contrast=0.0), 32)
    for i in range(2):
        mean = (images[i].double().numpy() @ GRAY).mean()
        assert out[i].min() == out[i].max()
        assert abs(float(out[i, 0, 0, 0]) - mean) <= 1


def test_saturation_zero_gives_the_greyscale_image():
    images = _images(1, 32, seed=7)
    out = apply_augmentation(images, dataclasses.replace(IDENTITY, saturation=0.0), 32)[0]
    assert torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 0], out[..., 2])
    assert _max_diff(out[..., 0], images[0].double().numpy() @ GRAY) <= 1


def test_hue_shift_of_a_third_turns_red_into_green():
    out = apply_augmentation(_uniform((255, 0, 0)), dataclasses.replace(IDENTITY, hue=1.0 / 3.0), 32)
    assert out.reshape(-1, 3).unique(dim=0).tolist() == [[0, 255, 0]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_colour_jitter_matches_torchvision_semantics_in_the_official_order(seed):
    rng = np.random.default_rng(seed)
    drawn = sample_params(rng, AugmentConfig(brightness=0.6, contrast=0.6, saturation=0.9, hue=0.5))
    params = dataclasses.replace(drawn, crop_left=0.0, crop_top=0.0, crop_side=1.0, angle_deg=0.0)
    image = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    image[:4, :4] = [255, 255, 0]  # ties between the largest channels
    image[4:8, :4] = 90  # grey
    out = apply_augmentation(torch.from_numpy(image)[None], params, 24)[0]
    assert _max_diff(out, _reference_jitter(image, params)) <= 1


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(2, 16, 16, 3, dtype=torch.float32),
        torch.zeros(16, 16, 3, dtype=torch.uint8),
        torch.zeros(2, 16, 16, 4, dtype=torch.uint8),
        torch.zeros(0, 16, 16, 3, dtype=torch.uint8),
        np.zeros((2, 16, 16, 3), dtype=np.uint8),
    ],
)
def test_bad_images_raise_input_error_naming_images(bad):
    for call in (
        lambda: augment(bad, np.random.default_rng(0), 8),
        lambda: apply_augmentation(bad, IDENTITY, 8),
        lambda: center_crop_resize(bad, 8),
        lambda: resize(bad, 8),
    ):
        with pytest.raises(InputError, match=r"images: expected a uint8 torch.Tensor of shape \(N, H, W, 3\)"):
            call()


def test_bad_sizes_parameters_and_config_are_rejected():
    with pytest.raises(InputError, match="output_size"):
        resize(_images(1, 8), 0)
    with pytest.raises(InputError, match="area"):
        center_crop_resize(_images(1, 8), 8, area=1.5)
    with pytest.raises(InputError, match="crop_left"):
        dataclasses.replace(IDENTITY, crop_side=0.9, crop_left=0.2)
    with pytest.raises(ConfigError, match="brightness"):
        AugmentConfig(brightness=1.5)
    with pytest.raises(ConfigError, match="crop_area"):
        AugmentConfig(crop_area=0.0)
