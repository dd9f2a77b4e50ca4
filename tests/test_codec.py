"""Normalization statistics, tiling of vectors into latent frames, and the value frame."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cosmos_policy.codec import (
    PROPRIO_CLIP,
    NormalizationStats,
    tile_into_frame,
    untile_from_frame,
    value_from_frame,
    value_into_frame,
)
from cosmos_policy.errors import InputError, StatisticsError

FRAME = (16, 28, 28)  # 12,544 numbers: one latent frame at 224 pixels


@pytest.mark.parametrize(
    "chunk, dim, full_copies, leftover",
    [(16, 7, 112, 0), (32, 7, 56, 0), (50, 14, 17, 644)],  # LIBERO, RoboCasa, ALOHA (method 2.2)
)
def test_action_chunk_tiling_round_trips(chunk, dim, full_copies, leftover):
    g = torch.Generator().manual_seed(chunk)
    actions = torch.rand(3, chunk, dim, generator=g) * 2 - 1
    flat = actions.reshape(3, -1)
    frame = tile_into_frame(flat, FRAME)
    assert frame.shape == (3, *FRAME)
    raw = frame.reshape(3, -1)
    n = chunk * dim
    assert 12544 // n == full_copies and 12544 - full_copies * n == leftover
    # Row-major in time, repeated copy after copy; the trailing partial copy is a prefix of the vector.
    for c in range(full_copies):
        assert torch.equal(raw[:, c * n : (c + 1) * n], flat)
    assert torch.equal(raw[:, full_copies * n :], flat[:, :leftover])
    back = untile_from_frame(frame, n).reshape(3, chunk, dim)
    assert torch.allclose(back, actions, atol=1e-6)


def test_untile_averages_complete_copies_and_ignores_the_partial_one():
    n = 700  # ALOHA: 17 complete copies + 644 numbers
    vec = torch.randn(1, n)
    frame = tile_into_frame(vec, FRAME).reshape(1, -1).clone()
    noise = torch.randn(1, 17 * n)
    frame[:, : 17 * n] += noise
    frame[:, 17 * n :] = 1e6  # the partial copy must not be read
    expected = vec + noise.reshape(1, 17, n).mean(1)
    got = untile_from_frame(frame.reshape(1, *FRAME), n)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("dim, copies", [(9, 1393), (14, 896)])
def test_proprio_tiling(dim, copies):
    proprio = torch.rand(2, dim) * 2 - 1
    frame = tile_into_frame(proprio, FRAME)
    assert 12544 // dim == copies
    assert torch.allclose(untile_from_frame(frame, dim), proprio, atol=1e-6)


def test_value_frame_maps_to_unit_interval():
    v = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    frame = value_into_frame(v, FRAME)
    assert frame.shape == (4, *FRAME) and torch.equal(frame[:, 3, 7, 9], v)
    assert torch.allclose(value_from_frame(frame), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    # The mean over all 12,544 numbers is read, then clipped to [0, 1].
    noisy = frame + 0.3 * torch.randn_like(frame)
    assert torch.allclose(value_from_frame(noisy), (noisy.reshape(4, -1).mean(1) + 1).div(2).clamp(0, 1))
    assert value_from_frame(torch.full((1, *FRAME), 3.0)).item() == 1.0


def test_tiling_rejects_vectors_larger_than_a_frame():
    with pytest.raises(InputError, match="cannot tile"):
        tile_into_frame(torch.zeros(1, 12545), FRAME)
    with pytest.raises(InputError, match="no complete copy"):
        untile_from_frame(torch.zeros(1, *FRAME), 20000)


def _demo_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-2, 3, size=(500, 7)), rng.uniform(-1, 1, size=(500, 9))


def test_statistics_json_round_trip_with_official_keys(tmp_path):
    actions, proprio = _demo_arrays()
    stats = NormalizationStats.compute(actions, proprio)
    path = tmp_path / "dataset_statistics.json"
    stats.save(path)
    data = json.loads(path.read_text())
    for group, d in (("actions", 7), ("proprio", 9)):
        for name in ("min", "max", "mean", "std", "median"):
            assert len(data[f"{group}_{name}"]) == d
    again = NormalizationStats.load(path)
    assert np.array_equal(again.actions_min, stats.actions_min) and np.array_equal(again.proprio_max, stats.proprio_max)
    assert np.allclose(stats.actions_min, actions.min(0)) and np.allclose(stats.proprio_median, np.median(proprio, 0))


def test_normalization_matches_the_formula_and_inverts():
    actions, proprio = _demo_arrays()
    stats = NormalizationStats.compute(actions, proprio)
    a = torch.as_tensor(actions[:16], dtype=torch.float64)
    norm = stats.normalize_actions(a)
    expected = 2 * (actions[:16] - actions.min(0)) / (actions.max(0) - actions.min(0)) - 1
    assert np.allclose(norm.numpy(), expected)
    assert norm.min() >= -1 and norm.max() <= 1
    assert torch.allclose(stats.unnormalize_actions(norm), a)
    p = torch.as_tensor(proprio[:4], dtype=torch.float32)
    assert torch.allclose(stats.unnormalize_proprio(stats.normalize_proprio(p)), p, atol=1e-6)
    with pytest.raises(InputError, match="actions: expected last dimension 7"):
        stats.normalize_actions(torch.zeros(2, 6))


def test_constant_dimensions_normalize_to_zero_and_back(tmp_path):
    actions, proprio = _demo_arrays()
    actions[:, 2] = 0.5  # a constant dimension (a scripted expert that never moves it)
    stats = NormalizationStats.compute(actions, proprio)
    assert stats.actions_min[2] == -0.5 and stats.actions_max[2] == 1.5
    a = torch.as_tensor(actions[:8], dtype=torch.float32)
    norm = stats.normalize_actions(a)
    assert torch.all(norm[:, 2] == 0)
    assert torch.allclose(stats.unnormalize_actions(norm), a)
    # A model's prediction there is sampling noise: it comes back as the demonstrations' constant,
    # while the dimensions that vary keep the formula.
    noisy = norm + 0.1
    out = stats.unnormalize_actions(noisy)
    assert torch.all(out[:, 2] == 0.5)
    assert torch.allclose(out[:, [0, 1, 3]], 0.5 * (noisy[:, [0, 1, 3]] + 1) * torch.as_tensor(stats.actions_max - stats.actions_min)[[0, 1, 3]].float()
                          + torch.as_tensor(stats.actions_min)[[0, 1, 3]].float(), atol=1e-5)
    assert stats.held_action_dims().tolist() == [i == 2 for i in range(actions.shape[1])]


def test_proprio_far_outside_the_demonstrations_is_clipped():
    """Rollouts can leave a narrow demonstration range by many widths (the built-in task's quaternion):
    the normalized proprio stops at +-PROPRIO_CLIP; inside the range nothing changes."""
    actions, proprio = _demo_arrays()
    stats = NormalizationStats.compute(actions, proprio)
    lo, hi = stats.proprio_min, stats.proprio_max
    far = torch.as_tensor(np.stack([hi + 10 * (hi - lo), lo - 10 * (hi - lo), (lo + hi) / 2]), dtype=torch.float64)
    norm = stats.normalize_proprio(far)
    assert torch.all(norm[0] == PROPRIO_CLIP) and torch.all(norm[1] == -PROPRIO_CLIP) and torch.allclose(norm[2], torch.zeros_like(norm[2]), atol=1e-9)


def test_degenerate_statistics_are_clear_errors(tmp_path):
    actions, proprio = _demo_arrays()
    data = NormalizationStats.compute(actions, proprio).to_dict()
    data["actions_max"][2] = data["actions_min"][2]  # a file with min == max
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(data))
    with pytest.raises(StatisticsError, match=r"degenerate dims \[2\]"):
        NormalizationStats.load(path)


def test_statistics_with_nan_or_missing_keys_are_clear_errors(tmp_path):
    actions, proprio = _demo_arrays()
    data = NormalizationStats.compute(actions, proprio).to_dict()
    bad = dict(data, proprio_max=[float("nan")] + data["proprio_max"][1:])
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(StatisticsError, match=r"stats.json: proprio_max: non-finite values at dims \[0\]"):
        NormalizationStats.load(path)
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "actions_min"}))
    with pytest.raises(StatisticsError, match="missing key 'actions_min'"):
        NormalizationStats.load(path)
    path.write_text("{not json")
    with pytest.raises(StatisticsError, match="not valid JSON"):
        NormalizationStats.load(path)
    with pytest.raises(StatisticsError, match="non-finite"):
        NormalizationStats.compute(np.full((3, 7), np.nan), proprio[:3])
