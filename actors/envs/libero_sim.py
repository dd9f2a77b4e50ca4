"""How the LIBERO adapter (``actors.envs.libero``) makes robosuite cheap: cameras rendered only when asked,
and no second ``forward`` pass inside the controller's substeps."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np


class CameraGate:
    """Camera sensors that render only while the gate is open, returning a blank frame otherwise.

    robosuite's observables call their sensor on their own schedule (and once more to check it
    when it is installed); the gate leaves that schedule alone and only decides whether a call
    renders. Frames rendered while open are kept by observable name, so a step's images are
    exactly the frames rendered during that step.
    """

    def __init__(self) -> None:
        self.is_open = False
        self.frames: dict[str, np.ndarray] = {}
        self.renders = 0  # camera renders done through the gate, for diagnostics and tests
        self._sensors: dict[str, Callable[[dict], np.ndarray]] = {}

    def wrap(self, name: str, sensor: Callable[[dict], np.ndarray], shape: tuple[int, int, int]) -> Callable[[dict], np.ndarray]:
        blank = np.zeros(shape, dtype=np.uint8)
        self._sensors[name] = sensor

        def gated(obs_cache: dict) -> np.ndarray:
            if not self.is_open:
                return blank
            frame = sensor(obs_cache)
            self.renders += 1
            self.frames[name] = frame
            return frame

        gated.__modality__ = sensor.__modality__  # what robosuite's @sensor decorator sets
        return gated

    @contextlib.contextmanager
    def open(self, is_open: bool = True):
        """Let the sensors render for the duration of a step; yields the frames rendered."""
        self.frames = {}
        self.is_open = is_open
        try:
            yield self.frames
        finally:
            self.is_open = False

    def render_now(self, name: str) -> np.ndarray:
        """Render one camera directly, outside the observable's schedule (a fallback only)."""
        frame = self._sensors[name]({})
        self.renders += 1
        return frame


class ForwardedSim:
    """The simulator as the arm controller sees it inside ``LiberoEnv._advance``: ``forward()`` does nothing.

    robosuite's controller calls ``sim.forward()`` before it reads the arm's pose, Jacobians, mass
    matrix and bias forces. In ``_advance`` that call comes right after ``mj_step1``, which has
    just computed every one of those position- and velocity-stage quantities from the same state,
    so recomputing them (a whole ``mj_forward``) would give the same bits and cost 0.12 ms per
    physics substep. Everything else is the real simulator.
    """

    def __init__(self, sim: Any) -> None:
        self._sim = sim

    def forward(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sim, name)
