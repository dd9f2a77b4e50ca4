"""Non-image modalities as latent frames (method sheet section 2).

- Normalization: per-dimension min-max to [-1, 1] from dataset statistics. Actions are not
  clipped (as in the official code); normalized proprio is clipped to +-PROPRIO_CLIP (ours, see below).
- Tiling: a flattened vector (an action chunk row-major in time, or a proprio vector) is
  repeated to fill a whole latent frame (C x H x W numbers) and overwrites it; reading it back
  averages the complete copies and ignores a partial trailing copy (ALOHA's 50 x 14 chunk fills
  17 copies plus 644 numbers of 12,544).
- Value: the scalar in [-1, 1] fills the frame; reading it back takes the mean over the frame
  and maps it to [0, 1].
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cosmos_policy.atomic import atomic_write_bytes
from cosmos_policy.errors import InputError, StatisticsError, existing_file

# Normalized proprio is clipped to this bound. The official code does not clip, and its datasets'
# wide ranges keep rollouts near [-1, 1]; a dimension the demonstrations barely vary (the built-in
# task's end-effector quaternion spans 0.008) maps the system's own episodes to 5-27 there, which
# then dominates the world-model and policy losses on experience and puts the proprio frame far
# outside anything the model saw. 2 keeps up to half a range of excess on either side.
PROPRIO_CLIP = 2.0

# Keys of the official dataset_statistics.json (method 2.1); only min/max are used.
_STAT_FIELDS = ("min", "max", "mean", "std", "median")


@dataclass(frozen=True)
class NormalizationStats:
    """Per-dimension statistics of actions and proprio over the demonstrations."""

    actions_min: np.ndarray
    actions_max: np.ndarray
    proprio_min: np.ndarray
    proprio_max: np.ndarray
    actions_mean: np.ndarray | None = None
    actions_std: np.ndarray | None = None
    actions_median: np.ndarray | None = None
    proprio_mean: np.ndarray | None = None
    proprio_std: np.ndarray | None = None
    proprio_median: np.ndarray | None = None

    def __post_init__(self) -> None:
        for group in ("actions", "proprio"):
            lo, hi = getattr(self, f"{group}_min"), getattr(self, f"{group}_max")
            if lo.ndim != 1 or lo.shape != hi.shape:
                raise StatisticsError(f"{group}_min/{group}_max: expected two vectors of one length, got {lo.shape} and {hi.shape}")
            for name in _STAT_FIELDS:
                arr = getattr(self, f"{group}_{name}")
                if arr is None:
                    continue
                if arr.shape != lo.shape:
                    raise StatisticsError(f"{group}_{name}: expected shape {lo.shape}, got {arr.shape}")
                if not np.all(np.isfinite(arr)):
                    raise StatisticsError(f"{group}_{name}: non-finite values at dims {np.flatnonzero(~np.isfinite(arr)).tolist()}")
            bad = np.flatnonzero(hi <= lo)
            if bad.size:
                raise StatisticsError(
                    f"{group}_min/{group}_max: max must exceed min in every dimension; degenerate dims "
                    f"{bad.tolist()} (min {lo[bad].tolist()}, max {hi[bad].tolist()}): min-max normalization would divide by zero"
                )

    @property
    def action_dim(self) -> int:
        return int(self.actions_min.shape[0])

    @property
    def proprio_dim(self) -> int:
        return int(self.proprio_min.shape[0])

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def compute(cls, actions: np.ndarray, proprio: np.ndarray) -> "NormalizationStats":
        """Statistics over all steps of all demonstrations: ``actions`` (N, d_a), ``proprio`` (N, d_p).

        A dimension the demonstrations never vary (e.g. a scripted expert that never rotates)
        gets the range [v - 1, v + 1] around its constant v instead of a zero-width one: it then
        normalizes to 0 and un-normalizes back to v exactly, where max == min would divide by zero.
        """
        out: dict[str, np.ndarray] = {}
        for group, data in (("actions", actions), ("proprio", proprio)):
            arr = np.asarray(data, dtype=np.float64)
            if arr.ndim != 2 or arr.shape[0] == 0:
                raise StatisticsError(f"{group}: expected a non-empty (steps, dims) array, got shape {arr.shape}")
            if not np.all(np.isfinite(arr)):
                raise StatisticsError(f"{group}: the data holds non-finite values")
            lo, hi = arr.min(0), arr.max(0)
            constant = hi <= lo
            out[f"{group}_min"] = np.where(constant, lo - 1.0, lo)
            out[f"{group}_max"] = np.where(constant, hi + 1.0, hi)
            out[f"{group}_mean"] = arr.mean(0)
            out[f"{group}_std"] = arr.std(0)
            out[f"{group}_median"] = np.median(arr, 0)
        return cls(**out)

    @classmethod
    def from_dict(cls, data: dict, source: str = "statistics") -> "NormalizationStats":
        kwargs: dict[str, np.ndarray | None] = {}
        for group in ("actions", "proprio"):
            for name in _STAT_FIELDS:
                key = f"{group}_{name}"
                if key not in data:
                    if name in ("min", "max"):
                        raise StatisticsError(f"{source}: missing key {key!r}")
                    kwargs[key] = None
                    continue
                try:
                    kwargs[key] = np.asarray(data[key], dtype=np.float64).reshape(-1)
                except (TypeError, ValueError) as exc:
                    raise StatisticsError(f"{source}: key {key!r} is not a list of numbers ({exc})") from exc
        try:
            return cls(**kwargs)  # type: ignore[arg-type]
        except StatisticsError as exc:
            raise StatisticsError(f"{source}: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> "NormalizationStats":
        """Read the official ``dataset_statistics.json``."""
        path = existing_file(path, "statistics file", StatisticsError)
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StatisticsError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise StatisticsError(f"{path}: expected a JSON object of per-dimension lists")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, list[float]]:
        out = {}
        for group in ("actions", "proprio"):
            for name in _STAT_FIELDS:
                arr = getattr(self, f"{group}_{name}")
                if arr is not None:
                    out[f"{group}_{name}"] = [float(x) for x in arr]
        return out

    def save(self, path: str | Path) -> None:
        """Write the official JSON layout, atomically."""
        atomic_write_bytes(Path(path), json.dumps(self.to_dict(), indent=2).encode())

    # ---- normalization -----------------------------------------------------------------
    def normalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return _scale(actions, self.actions_min, self.actions_max, "actions", forward=True)

    def unnormalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """Dataset units. A dimension the demonstrations never varied (std 0, e.g. the rotation of a
        scripted expert that never rotates) comes back as their constant: the model learned nothing
        there, and its sampling noise, scaled by the placeholder range of width 2, would otherwise
        move the robot (rotation commands of about 0.1, i.e. 0.05 rad per step, on the built-in task)."""
        out = _scale(actions, self.actions_min, self.actions_max, "actions", forward=False)
        held = self.held_action_dims()
        if held.any():
            value = torch.tensor(np.asarray(self.actions_mean, dtype=np.float64)[held], dtype=out.dtype, device=out.device)
            out[..., torch.from_numpy(held).to(out.device)] = value
        return out

    def held_action_dims(self) -> np.ndarray:
        """Action dimensions the demonstrations never varied (boolean mask; none without std/mean)."""
        if self.actions_std is None or self.actions_mean is None:
            return np.zeros(len(self.actions_min), dtype=bool)
        return np.asarray(self.actions_std) == 0

    def normalize_proprio(self, proprio: torch.Tensor) -> torch.Tensor:
        return _scale(proprio, self.proprio_min, self.proprio_max, "proprio", forward=True).clamp(-PROPRIO_CLIP, PROPRIO_CLIP)

    def unnormalize_proprio(self, proprio: torch.Tensor) -> torch.Tensor:
        return _scale(proprio, self.proprio_min, self.proprio_max, "proprio", forward=False)


def _scale(x: torch.Tensor, lo: np.ndarray, hi: np.ndarray, name: str, forward: bool) -> torch.Tensor:
    if x.shape[-1] != lo.shape[0]:
        raise InputError(f"{name}: expected last dimension {lo.shape[0]} (from the statistics), got shape {tuple(x.shape)}")
    # Copies (a few numbers): statistics that came through Ray's object store are read-only arrays.
    lo_t = torch.tensor(lo, dtype=torch.float64, device=x.device)
    hi_t = torch.tensor(hi, dtype=torch.float64, device=x.device)
    x64 = x.to(torch.float64)
    out = 2.0 * (x64 - lo_t) / (hi_t - lo_t) - 1.0 if forward else 0.5 * (x64 + 1.0) * (hi_t - lo_t) + lo_t
    return out.to(x.dtype if x.is_floating_point() else torch.float32)


# ---- tiling ----------------------------------------------------------------------------
def frame_numel(frame_shape: tuple[int, int, int]) -> int:
    return int(math.prod(frame_shape))


def tile_into_frame(vector: torch.Tensor, frame_shape: tuple[int, int, int]) -> torch.Tensor:
    """Repeat each (B, n) row to fill a (B, C, H, W) latent frame, C-major, truncating the last copy."""
    if vector.ndim != 2:
        raise InputError(f"tile_into_frame: expected (batch, n), got shape {tuple(vector.shape)}")
    batch, n = vector.shape
    total = frame_numel(frame_shape)
    if n == 0 or n > total:
        raise InputError(f"tile_into_frame: a vector of {n} numbers cannot tile a latent frame of {total} ({frame_shape})")
    repeats = -(-total // n)
    return vector.repeat(1, repeats)[:, :total].reshape(batch, *frame_shape)


def untile_from_frame(frame: torch.Tensor, n: int) -> torch.Tensor:
    """Average the complete copies of an n-vector tiled into (B, C, H, W) frames -> (B, n)."""
    batch = frame.shape[0]
    flat = frame.reshape(batch, -1)
    copies = flat.shape[1] // n
    if copies < 1:
        raise InputError(f"untile_from_frame: a frame of {flat.shape[1]} numbers holds no complete copy of {n}")
    return flat[:, : copies * n].reshape(batch, copies, n).mean(1)


def value_into_frame(value: torch.Tensor, frame_shape: tuple[int, int, int]) -> torch.Tensor:
    """Broadcast (B,) values in [-1, 1] over whole (B, C, H, W) frames."""
    if value.ndim != 1:
        raise InputError(f"value: expected shape (batch,), got {tuple(value.shape)}")
    return value.reshape(-1, 1, 1, 1).expand(-1, *frame_shape).clone()


def value_from_frame(frame: torch.Tensor) -> torch.Tensor:
    """Mean over each (C, H, W) frame, mapped from [-1, 1] to [0, 1] and clipped."""
    v = frame.reshape(frame.shape[0], -1).mean(1)
    return ((v + 1.0) / 2.0).clamp(0.0, 1.0)
