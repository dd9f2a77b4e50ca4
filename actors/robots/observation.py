"""From a driver's flat observation to what the model sees (``RobotObservation``) and what the envelope measures.

The driver speaks in its own feature names and frame sizes; the model wants its camera names, a
proprio vector in a fixed order and images of one size. The mapping is the robot config's, done
here on the robot side (openpi's lesson: resize on the robot, send small images, normalize on the
server). Resizing is plain numpy (an area average down, nearest pixel up): no PIL on a robot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.robots.config import RobotConfig


class ObservationError(ValueError):
    """A driver's observation lacks a feature or has one of the wrong kind (mirrors cosmos_policy.errors.InputError)."""


@dataclass
class RobotObservation:
    """One control step's observation in the model's terms (what ``infer`` receives)."""

    images: dict[str, np.ndarray]  # model camera name -> uint8 (H, W, 3) at the config's image_size
    proprio: np.ndarray  # (d_p,) float32, in the config's proprio order
    instruction: str
    timestamp: float  # time.monotonic() of the robot's process when observed; a Chunk echoes it as observed_at


def robot_observation(flat: Mapping[str, Any], config: RobotConfig, instruction: str, timestamp: float) -> RobotObservation:
    """Map a driver's ``get_observation()`` onto the model's cameras and proprio order."""
    images = {}
    for cam, feature in config.cameras.items():
        frame = flat.get(feature)
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ObservationError(f"observation[{feature!r}] (camera {cam}): expected a uint8 (H, W, 3) frame, got {got}")
        image = resize(frame, config.image_size)
        images[cam] = image.copy() if image is frame else image  # a driver may reuse its frame buffer next step
    proprio = scalars(flat, config.proprio).astype(np.float32)
    return RobotObservation(images=images, proprio=proprio, instruction=instruction, timestamp=timestamp)


def scalars(flat: Mapping[str, Any], names: tuple[str, ...] | list[str]) -> np.ndarray:
    """The named scalar features as a float64 vector (non-finite values pass: the envelope refuses them)."""
    out = np.empty(len(names))
    for i, name in enumerate(names):
        if name not in flat:
            raise ObservationError(f"observation: no feature {name!r} (the driver gave {sorted(flat)})")
        try:
            out[i] = float(flat[name])
        except (TypeError, ValueError):
            raise ObservationError(f"observation[{name!r}]: expected a number, got {type(flat[name]).__name__}") from None
    return out


def resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``frame`` (H, W, C) uint8 at ``size`` (h, w): each axis area-averaged when it shrinks, nearest when it grows."""
    if frame.shape[:2] == tuple(size):
        return frame
    out = frame.astype(np.float32)
    for axis, n in enumerate(size):
        length = out.shape[axis]
        starts = np.arange(n) * length // n
        if length >= n:  # each output pixel averages the input pixels it covers
            counts = np.diff(np.append(starts, length)).astype(np.float32)
            shape = [1] * out.ndim
            shape[axis] = n
            out = np.add.reduceat(out, starts, axis=axis) / counts.reshape(shape)
        else:
            out = np.take(out, starts, axis=axis)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
