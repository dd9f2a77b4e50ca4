"""The gates around every environment (the ``Env`` contract of ``cosmos_policy.contracts``).

An environment runs tasks; each episode starts from a task, a seed and (optionally) an initial
simulator state, and reports camera images, proprio and success. Cameras are rendered only when
asked (``render=True``): rendering is almost all of a MuJoCo step's cost, and the policy only
looks at the observation of a query step, so runners render every ``execute``-th step.

Observations are checked on the way out (``check_observation``) and actions on the way in
(``check_action``): a NaN or mis-shaped observation from a simulator is a clear error, and a NaN
action never reaches one.
"""

from __future__ import annotations

import numpy as np

from cosmos_policy.contracts import EnvSpec, Observation
from cosmos_policy.errors import InputError


def check_observation(obs: Observation, spec: EnvSpec, rendered: bool, where: str = "env") -> Observation:
    """Raise ``InputError`` naming the field when a simulator reports something malformed."""
    proprio = np.asarray(obs.proprio)
    if proprio.shape != (spec.proprio_dim,):
        raise InputError(f"{where}: observation.proprio has shape {proprio.shape}, expected ({spec.proprio_dim},)")
    if not np.all(np.isfinite(proprio)):
        raise InputError(f"{where}: observation.proprio has non-finite values at dims {np.flatnonzero(~np.isfinite(proprio)).tolist()}")
    if rendered:
        for cam in spec.cameras:
            img = obs.images.get(cam)
            if img is None:
                raise InputError(f"{where}: observation.images has no camera {cam!r} (got {sorted(obs.images)})")
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.shape != (*spec.image_size, 3):
                got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
                raise InputError(f"{where}: observation.images[{cam!r}] is {got}, expected uint8 {(*spec.image_size, 3)}")
    return obs


def check_action(action: np.ndarray, spec: EnvSpec, where: str = "env") -> np.ndarray:
    """The last gate before a simulator or robot: right shape, finite, within bounds (clipped)."""
    a = np.asarray(action, dtype=np.float64)
    if a.shape != (spec.action_dim,):
        raise InputError(f"{where}: action has shape {a.shape}, expected ({spec.action_dim},)")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{where}: refusing a non-finite action (dims {np.flatnonzero(~np.isfinite(a)).tolist()})")
    if spec.action_low:
        a = np.clip(a, spec.action_low, spec.action_high)
    return a
