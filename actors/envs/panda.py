"""The Panda arm both environments here drive: LIBERO's robot, and the built-in task set up the same way.

The same two cameras, the same 9-d proprio (gripper qpos 2, end-effector position 3, quaternion 4)
and the same 7-d OSC_POSE action (delta position 3, delta axis-angle 3, gripper), so a model
trained in one layout (``libero``) acts in both.
"""

from __future__ import annotations

from cosmos_policy.contracts import EnvSpec

# Model camera name -> robosuite camera name.
CAMERAS: dict[str, str] = {"primary": "agentview", "wrist": "robot0_eye_in_hand"}
PROPRIO_DIM = 9
ACTION_DIM = 7


def panda_spec(image_size: int, control_hz: float) -> EnvSpec:
    """The spec of a Panda environment rendering square ``image_size`` frames.

    OSC_POSE takes normalized deltas in [-1, 1] (robosuite clips them there itself) and the Panda
    gripper only looks at the sign of its command, so the bounds change nothing that runs but make
    them explicit to callers.
    """
    return EnvSpec(cameras=tuple(CAMERAS), image_size=(image_size, image_size), proprio_dim=PROPRIO_DIM, action_dim=ACTION_DIM,
                   action_low=(-1.0,) * ACTION_DIM, action_high=(1.0,) * ACTION_DIM, control_hz=float(control_hz))


def quiet_robosuite() -> None:
    """Keep robosuite's import-time advice out of the job's log (call before importing robosuite).

    robosuite warns on every import in every process that it found no private macro file and
    suggests making one; its defaults are the settings this project uses, so the advice says
    nothing to a user of the job and only repeats once per simulator process.
    """
    import logging

    logging.getLogger("robosuite_logs").addFilter(lambda record: "macro" not in record.getMessage())
