"""The dummy mode: ``DummyArm``, a kinematic arm with cameras, for dry runs of the whole robot path.

A real component (RLinf calls this its dummy mode), not a test mock: a robot config that names it
(``configs/robot/dummy_arm.yaml``) runs the control loop, the safety envelope, the operator and
the policy end to end with nothing plugged in. Joints move toward their commanded targets by at
most ``max_joint_speed`` per ``send_action`` (one control step), so it is deterministic and fast.
Each camera renders a frame whose pixels encode the joint positions, so a policy has something
that changes when the arm moves. After ``safe_stop()`` it refuses motion until ``connect()``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from actors.robots.driver import NotConnected

JOINTS = ("base", "shoulder", "elbow", "wrist", "gripper")
LINKS = (0.30, 0.25, 0.10)  # metres: shoulder-elbow, elbow-wrist, wrist-fingertips
BASE_HEIGHT = 0.10
RANGE = 3.0  # radians (gripper: opening in [0, 1] is within it too): the dummy's own hardware limit


class Stopped(RuntimeError):
    """``send_action`` after ``safe_stop()``: the arm holds until it is connected again."""


class DummyArm:
    """Five joints (base yaw, shoulder, elbow and wrist pitch, gripper), an end-effector position, cameras.

    ``joints`` above five adds joints ``joint5``, ``joint6``... (extra wrist axes that move like the others
    and leave the fingertip where the first four put it), so the dummy can match a model's action count
    (the built-in task's 7: ``configs/robot/dummy_lift.yaml``).
    """

    name = "dummy_arm"

    def __init__(self, cameras: Sequence[str] = ("front", "wrist"), image_size: Sequence[int] = (48, 64),
                 max_joint_speed: float = 0.05, initial: Mapping[str, float] | None = None, joints: int = len(JOINTS)) -> None:
        if isinstance(joints, bool) or not isinstance(joints, int) or joints < len(JOINTS):
            raise ValueError(f"DummyArm joints: expected an integer >= {len(JOINTS)}, got {joints!r}")
        self.joints = JOINTS + tuple(f"joint{i}" for i in range(len(JOINTS), joints))
        self.cameras = tuple(cameras)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.max_joint_speed = float(max_joint_speed)
        start = {"shoulder": 0.6, "elbow": -0.9, "gripper": 0.5} | dict(initial or {})
        unknown = set(start) - set(self.joints)
        if unknown:
            raise ValueError(f"DummyArm initial: unknown joints {sorted(unknown)} (joints: {list(self.joints)})")
        self._initial = np.array([float(start.get(j, 0.0)) for j in self.joints])
        self.position = self._initial.copy()
        self.target = self._initial.copy()
        self._connected = False
        self.stopped = False
        self.send_count = 0
        self.stop_count = 0
        self._lock = threading.Lock()  # safe_stop comes from a watchdog's thread

    @property
    def observation_features(self) -> dict[str, Any]:
        features: dict[str, Any] = {f"{j}.pos": float for j in self.joints}
        features |= {"ee.x": float, "ee.y": float, "ee.z": float}
        return features | {c: (*self.image_size, 3) for c in self.cameras}

    @property
    def action_features(self) -> dict[str, Any]:
        return {f"{j}.pos": float for j in self.joints}

    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self, calibrate: bool = True) -> None:
        """Power up holding the current pose; a connect after ``safe_stop`` re-enables motion."""
        with self._lock:
            self._connected = True
            self.stopped = False
            self.target = self.position.copy()

    def disconnect(self) -> None:
        with self._lock:
            self._connected = False

    def safe_stop(self) -> None:
        """Hold where it is and refuse motion until ``connect()`` (records that it stopped)."""
        with self._lock:
            self.target = self.position.copy()
            self.stopped = True
            self.stop_count += 1

    def get_observation(self) -> dict[str, Any]:
        with self._lock:
            if not self._connected:
                raise NotConnected("DummyArm: get_observation() before connect()")
            q = self.position.copy()
        obs: dict[str, Any] = {f"{j}.pos": float(v) for j, v in zip(self.joints, q)}
        obs |= dict(zip(("ee.x", "ee.y", "ee.z"), (float(v) for v in end_effector(q))))
        for i, cam in enumerate(self.cameras):
            obs[cam] = self._render(q, transpose=i % 2 == 1)
        return obs

    def send_action(self, action: dict[str, float]) -> dict[str, float]:
        """Set targets (missing joints keep theirs) and advance one step; returns the targets sent."""
        names = {f"{j}.pos": i for i, j in enumerate(self.joints)}
        unknown = set(action) - set(names)
        if unknown:
            raise KeyError(f"DummyArm.send_action: unknown action features {sorted(unknown)} (known: {list(names)})")
        with self._lock:
            if not self._connected:
                raise NotConnected("DummyArm: send_action() before connect()")
            if self.stopped:
                raise Stopped("DummyArm: stopped by safe_stop(); connect() again to move")
            for name, value in action.items():
                self.target[names[name]] = float(np.clip(value, -RANGE, RANGE))
            step = np.clip(self.target - self.position, -self.max_joint_speed, self.max_joint_speed)
            self.position = self.position + step
            self.send_count += 1
            return {f"{j}.pos": float(self.target[i]) for i, j in enumerate(self.joints)}

    def _render(self, q: np.ndarray, transpose: bool) -> np.ndarray:
        """One band per joint whose red level is the joint's position over [-RANGE, RANGE]; green and
        blue are fixed gradients so frames look like images (the wrist camera's bands run the other way)."""
        h, w = self.image_size
        levels = np.round((np.clip(q, -RANGE, RANGE) + RANGE) / (2 * RANGE) * 255).astype(np.uint8)
        along = w if not transpose else h
        band = levels[np.minimum(np.arange(along) * len(q) // along, len(q) - 1)]
        frame = np.empty((h, w, 3), np.uint8)
        frame[..., 0] = band[None, :] if not transpose else band[:, None]
        frame[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
        frame[..., 2] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
        return frame


def end_effector(q: np.ndarray) -> np.ndarray:
    """Fingertip (x, y, z) in metres: a base yaw, then a planar chain of three pitch joints."""
    yaw, pitches = q[0], np.cumsum(q[1:4])
    reach = sum(length * math.cos(p) for length, p in zip(LINKS, pitches))
    height = BASE_HEIGHT + sum(length * math.sin(p) for length, p in zip(LINKS, pitches))
    return np.array([reach * math.cos(yaw), reach * math.sin(yaw), height])
