"""A tiny environment of the tests' own, behind the ``Env`` contract: hold a puck inside a square.

It is what a user's own simulator is to the system (``env.name: hold_env:HoldEnv``), small enough that an
untrained tiny model does the task: a policy whose actions are small keeps the puck in (success), one whose
actions are wild pushes it out (failure). The promotion tests need exactly that contrast, real and cheap: the
built-in Lift task is never solved by a tiny model, so every version would tie there.

The puck starts near the centre (placed by the episode's seed), each action's first two dimensions push it by
``gain`` x the action, and the episode succeeds when the puck is still inside the square [-0.5, 0.5]^2 at its
``max_steps``-th step. The two cameras show the puck as a bright square on a dark field.
"""

from __future__ import annotations

import numpy as np

from cosmos_policy.contracts import EnvSpec, Observation, StepResult

TASK = "hold"
INSTRUCTION = "hold the puck inside the square"


class HoldEnv:
    def __init__(self, image_size: int = 32, max_steps: int = 16, gain: float = 0.05) -> None:
        self.spec = EnvSpec(cameras=("primary", "wrist"), image_size=(image_size, image_size), proprio_dim=9, action_dim=7)
        self._max_steps, self.gain = max_steps, gain
        self._puck = np.zeros(2)
        self._steps = 0

    def tasks(self) -> list[str]:
        return [TASK]

    def instruction(self, task: str) -> str:
        return INSTRUCTION

    def initial_states(self, task: str) -> list[np.ndarray]:
        return []  # no fixed states: episodes start from their seed's placement

    def max_steps(self, task: str) -> int:
        return self._max_steps

    def reset(self, task: str, seed: int, initial_state: np.ndarray | None = None) -> Observation:
        rng = np.random.default_rng(seed)
        self._puck = np.asarray(initial_state, dtype=float)[:2] if initial_state is not None else rng.uniform(-0.1, 0.1, 2)
        self._steps = 0
        return self._observe(True)

    def step(self, action: np.ndarray, render: bool = True) -> StepResult:
        self._puck = self._puck + self.gain * np.asarray(action, dtype=float)[:2]
        self._steps += 1
        done = self._steps >= self._max_steps
        inside = bool(np.all(np.abs(self._puck) <= 0.5))
        return StepResult(observation=self._observe(render), success=done and inside, done=done or not inside)

    def get_state(self) -> np.ndarray:
        return self._puck.copy()

    def close(self) -> None:
        pass

    def _observe(self, render: bool) -> Observation:
        images = {}
        if render:
            size = self.spec.image_size[0]
            frame = np.zeros((size, size, 3), dtype=np.uint8)
            r, c = (np.clip((self._puck + 1) / 2, 0, 0.999) * size).astype(int)
            frame[max(0, r - 1): r + 2, max(0, c - 1): c + 2] = 255
            images = {cam: frame.copy() for cam in self.spec.cameras}
        proprio = np.concatenate([self._puck, np.zeros(7)])
        return Observation(images=images, proprio=proprio, instruction=INSTRUCTION)
