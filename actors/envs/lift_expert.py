"""The built-in task's scripted expert: demonstrations from nothing, at a chosen success rate.

It reads privileged simulator state (cube and gripper positions): ``expert_plan`` decides per
episode whether it will succeed; a failing expert makes a real-looking attempt that physically
fails (it grasps beside the cube, or lifts the cube a little and lets it drop), and success is
always the task's own check on the physics. ``make_demonstrations`` records whole episodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from actors.envs.lift import _POS_SCALE, INSTRUCTION, TASK, LiftEnv
from actors.envs.panda import ACTION_DIM, CAMERAS
from cosmos_policy.episode import Episode, Source, episode_seed
from cosmos_policy.errors import ConfigError


def expert_outcomes(n: int, success_rate: float, seed: int) -> np.ndarray:
    """Per-episode outcomes for the expert: exactly ``round(n * success_rate)`` successes, in seeded random order.

    Drawing each episode's outcome independently would put the realised rate of a small batch
    several points away from the requested one (100 episodes at p = 0.6 have a standard deviation
    of 4.9 points); a fixed count shuffled by a seeded RNG gives the requested rate exactly and
    the same episodes every time.
    """
    if n < 0:
        raise ConfigError(f"n: expected a non-negative number of episodes, got {n}")
    if not 0.0 <= float(success_rate) <= 1.0:
        raise ConfigError(f"success_rate: expected a value in [0, 1], got {success_rate}")
    outcomes = np.zeros(n, dtype=bool)
    outcomes[: int(round(n * float(success_rate)))] = True
    np.random.default_rng(seed).shuffle(outcomes)
    return outcomes


@dataclass
class _ExpertPlan:
    """How the scripted expert will play one episode, drawn once from its seed.

    ``mode`` is "succeed", "miss" (approach and grasp a point beside the cube, lift, find nothing)
    or "drop" (grasp the cube, lift it less than the success margin, open the gripper). The other
    fields vary the style between episodes so that demonstrations are not all the same trajectory.
    """

    mode: str
    hover: float  # height above the cube at which the approach ends (m)
    gain: float  # proportional gain on the position error, in normalized action units per 5 cm
    grasp_steps: int  # control steps spent closing the gripper before lifting
    offset: np.ndarray = field(default_factory=lambda: np.zeros(3))  # grasp point relative to the cube (miss mode)
    drop_height: float = 0.0  # how far the cube is raised before release (drop mode)
    phase: str = "approach"
    counter: int = 0  # control steps spent in the current phase
    grasp_point: np.ndarray = field(default_factory=lambda: np.zeros(3))  # where the descent ended
    grasp_z: float = 0.0  # end-effector height when the gripper closed


@dataclass
class ExpertRollout:
    """One expert episode: what ``Episode.from_frames`` needs, plus how to check it replays."""

    seed: int
    initial_state: np.ndarray  # the flattened simulator state the episode started from
    actions: np.ndarray  # (T, 7) float32, the executed actions
    proprio: np.ndarray  # (T, 9), the proprio observed before each action
    frames: dict[str, np.ndarray] | None  # camera -> uint8 (T, H, W, 3), when rendered
    success: bool  # the task's own check at the last step
    mode: str  # "succeed", "miss" or "drop"
    final_state: np.ndarray
    timestamps: np.ndarray  # (T,) seconds since the epoch, when each action was chosen


def expert_plan(success: bool, seed: int) -> _ExpertPlan:
    """How the expert plays an episode: succeed, or fail in a real-looking way.

    ``reset`` installs a succeeding expert seeded by the episode seed; call this after
    ``reset`` to change it. A failing expert picks, from ``seed``, one of two failures:
    "miss" (it aligns 6-8 cm beside the cube, descends, closes on nothing and lifts) or
    "drop" (it grasps the cube, raises it 0.5-1 cm, below the success margin, and opens).
    """
    rng = np.random.default_rng([int(seed) % 2**63, 0x11F7])
    plan = _ExpertPlan(
        mode="succeed",
        hover=float(rng.uniform(0.06, 0.10)),
        gain=float(rng.uniform(1.5, 2.5)),
        grasp_steps=int(rng.integers(7, 11)),
    )
    if not success:
        plan.mode = "miss" if rng.random() < 0.5 else "drop"
        if plan.mode == "miss":
            side = 1.0 if rng.random() < 0.5 else -1.0
            plan.offset = np.array([side * rng.uniform(0.06, 0.08), rng.uniform(-0.01, 0.01), 0.0])
        else:
            plan.drop_height = float(rng.uniform(0.005, 0.010))
    return plan


def expert_action(plan: _ExpertPlan, eef: np.ndarray, cube: np.ndarray) -> np.ndarray:
    """The scripted expert's next action, from privileged state: reach above the cube, descend, close, lift.

    The position part is a proportional controller on the end-effector position error (in
    OSC_POSE's normalized units); the rotation part is zero, which makes OSC hold the
    orientation the episode started with.
    """
    aim = np.array([*(cube[:2] + plan.offset[:2]), cube[2]])  # the grasp point: the cube, or beside it
    gripper = -1.0  # open
    speed = 1.0  # the largest normalized position action this phase uses
    plan.counter += 1
    if plan.phase == "approach":
        target = aim + [0.0, 0.0, plan.hover]
        if np.linalg.norm(eef[:2] - target[:2]) < 0.005 and abs(eef[2] - target[2]) < 0.02:
            plan.phase, plan.counter = "descend", 0
    if plan.phase == "descend":
        target = aim
        if np.linalg.norm(eef - target) < 0.006:
            plan.phase, plan.counter, plan.grasp_point = "grasp", 0, aim.copy()
    if plan.phase == "grasp":
        # Hold the point where the descent ended: aiming at the cube while it is being squeezed
        # (and lifts a little) would chase it upwards.
        target, gripper = plan.grasp_point, 1.0
        if plan.counter >= plan.grasp_steps:
            plan.phase, plan.counter, plan.grasp_z = "lift", 0, float(eef[2])
    if plan.phase == "lift":
        # Straight up from where the gripper closed: far above the success margin, or (drop) a
        # few millimetres, after which the gripper opens.
        target, gripper = np.array([eef[0], eef[1], plan.grasp_z + 0.25]), 1.0
        if plan.mode == "drop":
            # Slowly raise the cube itself to drop_height above where it rested (the success
            # margin is 4 cm for the table-to-centre height, about 2 cm above rest), then let go.
            target[2] = eef[2] + (plan.grasp_point[2] + plan.drop_height - cube[2])
            speed = 0.25
            if cube[2] >= plan.grasp_point[2] + plan.drop_height - 0.001 or plan.counter >= 20:
                plan.phase, plan.counter = "release", 0
    if plan.phase == "release":
        # Hold still while the fingers open (the cube falls back), then back off upwards.
        target = eef.copy() if plan.counter <= 8 else np.array([eef[0], eef[1], plan.grasp_z + 0.12])
    action = np.zeros(ACTION_DIM, dtype=np.float32)  # float32, as episodes store actions: replays are exact
    action[:3] = np.clip(plan.gain * (target - eef) / _POS_SCALE, -speed, speed)
    action[6] = gripper
    return action


def expert_rollout(env: LiftEnv, task: str, seed: int, success: bool, initial_state: np.ndarray | None = None,
                   render: bool = False) -> ExpertRollout:
    """One whole expert episode in one call (one message when the env lives in an ``EnvProcess``).

    With ``render`` every step's cameras are kept (demonstrations need every frame); without,
    no frame is rendered after the reset's.
    """
    obs = env.reset(task, seed, initial_state)
    env.set_expert(success, seed)
    start = env.get_state()
    frames: dict[str, list[np.ndarray]] = {cam: [] for cam in CAMERAS}
    proprio, actions, stamps = [], [], []
    while True:
        if render:
            for cam in CAMERAS:
                frames[cam].append(obs.images[cam])
        proprio.append(obs.proprio)
        action = env.expert_action()
        actions.append(action)
        stamps.append(time.time())
        result = env.step(action, render=render)
        obs = result.observation
        if result.done:
            break
    return ExpertRollout(
        seed=int(seed),
        initial_state=start,
        actions=np.stack(actions),
        proprio=np.stack(proprio),
        frames={cam: np.stack(f) for cam, f in frames.items()} if render else None,
        success=result.success,
        mode=env.expert_mode,
        final_state=env.get_state(),
        timestamps=np.asarray(stamps),
    )


def make_demonstrations(
    n: int,
    success_rate: float,
    seed: int,
    image_size: int = 64,
    max_steps: int = 100,
    env: LiftEnv | None = None,
    indices: range | None = None,
) -> list[Episode]:
    """``n`` scripted demonstrations, ``round(n * success_rate)`` of them meant to succeed, rendered at every step.

    ``indices``: make only these of the ``n`` (a share for one of several makers working in parallel:
    together they make exactly the episodes one call makes, whatever the shares).

    Each episode starts from a fresh seeded placement (``episode_seed(seed, i)``) whose simulator
    state is recorded as its ``initial_state``, so it replays exactly. Episodes carry their true
    outcome (the task's check on the physics, not the expert's intention, which is kept in
    ``metadata``); the caller decides which to keep. ``env`` reuses a built environment (it must
    render ``image_size`` frames; its own step limit applies), else one is built and closed.
    """
    own = env is None
    if env is None:
        env = LiftEnv(image_size=image_size, max_steps=max_steps)
    elif env.spec.image_size != (image_size, image_size):
        raise ConfigError(f"image_size: the given env renders {env.spec.image_size}, expected ({image_size}, {image_size})")
    try:
        episodes = []
        outcomes = expert_outcomes(n, success_rate, seed)
        for i in indices if indices is not None else range(n):
            intended, s = outcomes[i], episode_seed(seed, i)
            r = env.expert_rollout(TASK, s, bool(intended), render=True)
            assert r.frames is not None
            episodes.append(
                Episode.from_frames(
                    r.frames,
                    r.proprio,
                    r.actions,
                    instruction=INSTRUCTION,
                    success=r.success,
                    task=TASK,
                    source=Source.DEMO,
                    seed=s,
                    initial_state=r.initial_state,
                    timestamps=r.timestamps,
                    metadata={"expert": r.mode, "intended_success": bool(intended)},
                )
            )
        return episodes
    finally:
        if own:
            env.close()
