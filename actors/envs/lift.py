"""The built-in task: robosuite's ``Lift`` (a Panda arm lifts a red cube), on a CPU, with no downloads.

It exists so that the whole actor-learner loop can run on real physics without LIBERO's assets:
the same robot, the same OSC_POSE controller and 7-d action space (delta position 3, delta
axis-angle rotation 3, gripper -1 open / +1 close, all in robosuite's normalized units [-1, 1]),
the same 9-d proprio (gripper qpos 2, end-effector position 3, end-effector quaternion xyzw 4)
and the same two cameras (``agentview`` as "primary", ``robot0_eye_in_hand`` as "wrist") as
LIBERO, rendered small (64 x 64 by default).

Images: robosuite renders in OpenGL convention (bottom row first, i.e. upside down). The
LIBERO-Cosmos-Policy training data were flipped vertically (``np.flipud``) and the official Cosmos
Policy LIBERO evaluation flips live frames the same way (``flip_images=True``), as does this
repository's LIBERO adapter; so does this environment, so its frames are upright and oriented
like LIBERO's.

Speed: physics runs robosuite's own controller loop (25 MuJoCo steps of 2 ms per 20 Hz control
step); rendering is software OpenGL on a CPU, so this adapter (a) turns every robosuite
observable off, so no step pays for sensors nobody reads, (b) renders the two cameras itself and
only when ``step(render=True)`` asks, and (c) renders without planar reflections (the table's
mirror pass more than doubles the cost of a frame and is invisible at 64 x 64). Proprio is read straight
from the simulator, exactly as robosuite's sensors compute it.

Reproducibility: robosuite draws the cube placement and the arm's initial joint noise from the
global numpy RNG; ``reset`` seeds it from the episode seed (and puts the caller's RNG state
back), resets the gripper's internal command state that robosuite keeps outside the simulator,
and, when given an initial state, restores it and re-anchors the controller to it, so
(seed, initial_state, actions) replays to the same simulator state bit for bit.

The scripted expert (``expert_action``) reads privileged simulator state (cube and gripper
positions) and makes demonstrations from nothing at a chosen success rate: ``set_expert``
decides per episode whether it will succeed; a failing expert makes a real-looking attempt that
physically fails (it grasps beside the cube, or lifts the cube a little and lets it drop), and
success is always the task's own check on the physics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.env import EnvSpec, StepResult, check_action, check_observation
from cosmos_policy.episode import Episode, Source
from cosmos_policy.errors import ConfigError, InputError
from cosmos_policy.policy import Observation

TASK = "lift"
INSTRUCTION = "lift the red cube"
# Model camera name -> robosuite camera name (LIBERO's pair).
CAMERAS: dict[str, str] = {"primary": "agentview", "wrist": "robot0_eye_in_hand"}
PROPRIO_DIM = 9
ACTION_DIM = 7
# robosuite's model timestep (macros.SIMULATION_TIMESTEP); a control period must be a whole number of them.
_PHYSICS_DT = 0.002
# OSC_POSE maps a normalized action of 1 to a 5 cm position goal offset (controllers/config/osc_pose.json).
_POS_SCALE = 0.05


def upright(image: np.ndarray) -> np.ndarray:
    """A robosuite (OpenGL-convention, upside-down) frame flipped vertically, as LIBERO-Cosmos-Policy frames are."""
    return np.ascontiguousarray(image[::-1])


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


class LiftEnv:
    """robosuite ``Lift`` with a Panda arm behind the ``Env`` protocol (see the module docstring).

    One task, "lift"; episodes end at success (the cube's centre 4 cm above the table) or after
    ``max_steps`` control steps.
    """

    def __init__(
        self,
        image_size: int = 64,
        max_steps: int = 100,
        control_hz: float = 20.0,
        num_initial_states: int = 50,
        antialias: bool = True,
    ) -> None:
        """Build the simulator (about 3 s: robosuite compiles its XML model).

        ``antialias`` renders with 4x multisampling, as robosuite and LIBERO do; turning it off
        roughly halves the cost of a frame at the price of jagged edges.
        """
        if not isinstance(image_size, int) or image_size < 8:
            raise ConfigError(f"image_size: expected an integer >= 8, got {image_size!r}")
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ConfigError(f"max_steps: expected a positive integer, got {max_steps!r}")
        substeps = 1.0 / (float(control_hz) * _PHYSICS_DT) if control_hz > 0 else 0.0
        if control_hz <= 0 or abs(substeps - round(substeps)) > 1e-6 or round(substeps) < 1:
            raise ConfigError(f"control_hz: expected a rate whose period is a whole number of 2 ms physics steps, got {control_hz}")
        if not isinstance(num_initial_states, int) or num_initial_states < 1:
            raise ConfigError(f"num_initial_states: expected a positive integer, got {num_initial_states!r}")
        try:
            import mujoco
            import robosuite
            from robosuite.utils.binding_utils import MjRenderContextOffscreen
        except ImportError as exc:  # robosuite comes with the [libero] extra
            raise ImportError("LiftEnv needs robosuite 1.4 (pip install -e '.[libero]')") from exc

        self.spec = EnvSpec(
            cameras=tuple(CAMERAS),
            image_size=(image_size, image_size),
            proprio_dim=PROPRIO_DIM,
            action_dim=ACTION_DIM,
            action_low=(-1.0,) * ACTION_DIM,
            action_high=(1.0,) * ACTION_DIM,
            control_hz=float(control_hz),
        )
        self._max_steps = max_steps
        # robosuite draws the cube's size (and other model details) from the global RNG when it
        # builds the model: seed it, so every process simulates the very same cube.
        np.random.seed(0)
        self._env: Any = robosuite.make(
            "Lift",
            robots="Panda",
            controller_configs=robosuite.load_controller_config(default_controller="OSC_POSE"),
            has_renderer=False,
            has_offscreen_renderer=False,  # the render context is made below, configured for small frames
            use_camera_obs=False,
            use_object_obs=False,
            reward_shaping=False,
            control_freq=float(control_hz),
            horizon=10**9,  # the step limit is kept here, where it can end the episode with the right flags
            ignore_done=True,
            hard_reset=False,  # a hard reset recompiles the model at every episode, needless for one fixed scene
        )
        for name in list(self._env._observables):
            self._env.modify_observable(name, "enabled", False)
        sim = self._env.sim
        sim.model.vis.global_.offwidth = image_size
        sim.model.vis.global_.offheight = image_size
        sim.model.vis.quality.offsamples = 4 if antialias else 0
        self._render_context = MjRenderContextOffscreen(sim, device_id=-1, max_width=image_size, max_height=image_size)
        self._render_context.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        # As robosuite does: show visual meshes (group 1), hide collision meshes (group 0).
        self._render_context.vopt.geomgroup[0] = 0
        self._render_context.vopt.geomgroup[1] = 1

        robot = self._env.robots[0]
        self._robot = robot
        self._cube_body = sim.model.body_name2id(self._env.cube.root_body)
        self._eef_body = sim.model.body_name2id(robot.robot_model.eef_name)
        self._state_size = 1 + sim.model.nq + sim.model.nv
        self._steps = 0
        self._done = True  # no episode until reset
        self._plan: _ExpertPlan | None = None
        self._closed = False
        self._initial_states: list[np.ndarray] = [self._seeded_reset(i) for i in range(num_initial_states)]

    # ---- the Env protocol ------------------------------------------------------------------
    def tasks(self) -> list[str]:
        return [TASK]

    def instruction(self, task: str) -> str:
        self._check_task(task)
        return INSTRUCTION

    def max_steps(self, task: str) -> int:
        self._check_task(task)
        return self._max_steps

    def initial_states(self, task: str) -> list[np.ndarray]:
        """Fixed initial states, like LIBERO's: entry i is exactly the state ``reset(task, seed=i)`` makes."""
        self._check_task(task)
        return [s.copy() for s in self._initial_states]

    def reset(self, task: str, seed: int, initial_state: np.ndarray | None = None) -> Observation:
        """Start an episode: seeded placement, then (when given) exactly ``initial_state``; rendered."""
        self._check_task(task)
        self._check_open()
        state = None
        if initial_state is not None:
            state = np.asarray(initial_state, dtype=np.float64)
            if state.shape != (self._state_size,):
                raise InputError(f"initial_state: expected a flattened simulator state of shape ({self._state_size},), got {state.shape}")
            if not np.all(np.isfinite(state)):
                raise InputError("initial_state: non-finite values")
        self._seeded_reset(seed)
        if state is not None:
            sim = self._env.sim
            sim.set_state_from_flattened(state)
            sim.forward()
            # The controller was built for the pre-restore pose: its cached end-effector pose, its
            # goal and the nullspace posture it pulls towards must be those of the restored state,
            # else the first action would move towards the seed's pose instead.
            self._robot.controller.update_initial_joints(sim.data.qpos[self._robot._ref_joint_pos_indexes])
        self._steps = 0
        self._done = False
        self.set_expert(True, seed)
        return self._observation(render=True, where="lift.reset")

    def step(self, action: np.ndarray, render: bool = True) -> StepResult:
        """One control step; cameras are rendered only when ``render`` is true."""
        a = check_action(action, self.spec, where="lift.step")  # before anything touches the simulator
        self._check_open()
        if self._done:
            raise RuntimeError("lift.step: the episode is over (success or step limit); call reset first")
        self._env.step(a)
        self._steps += 1
        success = self.success()
        self._done = success or self._steps >= self._max_steps
        obs = self._observation(render=render, where="lift.step")
        return StepResult(observation=obs, success=success, done=self._done, info={"steps": self._steps})

    def get_state(self) -> np.ndarray:
        """The flattened simulator state (time, qpos, qvel): what ``reset(..., initial_state=)`` restores."""
        self._check_open()
        return self._env.sim.get_state().flatten()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._render_context = None
        self._env.close()

    # ---- the task --------------------------------------------------------------------------
    def success(self) -> bool:
        """robosuite's own check: the cube's centre is more than 4 cm above the table top."""
        return bool(self._env._check_success())

    def cube_position(self) -> np.ndarray:
        return np.array(self._env.sim.data.body_xpos[self._cube_body])

    def gripper_position(self) -> np.ndarray:
        return np.array(self._env.sim.data.site_xpos[self._robot.eef_site_id])

    # ---- the scripted expert ---------------------------------------------------------------
    def set_expert(self, success: bool, seed: int) -> None:
        """Decide how the expert plays the current episode: succeed, or fail in a real-looking way.

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
        self._plan = plan

    @property
    def expert_mode(self) -> str:
        """How the current episode's expert plays: "succeed", "miss" or "drop"."""
        if self._plan is None:
            raise RuntimeError("lift: no episode; call reset first")
        return self._plan.mode

    def expert_action(self) -> np.ndarray:
        """The scripted expert's next action, from privileged state: reach above the cube, descend, close, lift.

        The position part is a proportional controller on the end-effector position error (in
        OSC_POSE's normalized units); the rotation part is zero, which makes OSC hold the
        orientation the episode started with.
        """
        plan = self._plan
        if plan is None or self._done:
            raise RuntimeError("lift.expert_action: no running episode; call reset first")
        eef = self.gripper_position()
        cube = self.cube_position()
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

    def expert_rollout(
        self, task: str, seed: int, success: bool, initial_state: np.ndarray | None = None, render: bool = False
    ) -> ExpertRollout:
        """One whole expert episode in one call (one message when the env lives in an ``EnvProcess``).

        With ``render`` every step's cameras are kept (demonstrations need every frame); without,
        no frame is rendered after the reset's.
        """
        obs = self.reset(task, seed, initial_state)
        self.set_expert(success, seed)
        start = self.get_state()
        frames: dict[str, list[np.ndarray]] = {cam: [] for cam in CAMERAS}
        proprio, actions, stamps = [], [], []
        while True:
            if render:
                for cam in CAMERAS:
                    frames[cam].append(obs.images[cam])
            proprio.append(obs.proprio)
            action = self.expert_action()
            actions.append(action)
            stamps.append(time.time())
            result = self.step(action, render=render)
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
            mode=self.expert_mode,
            final_state=self.get_state(),
            timestamps=np.asarray(stamps),
        )

    # ---- internals -------------------------------------------------------------------------
    def _check_task(self, task: str) -> None:
        if task != TASK:
            raise InputError(f"task: expected one of {[TASK]}, got {task!r}")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("lift: the environment is closed")

    def _seeded_reset(self, seed: int) -> np.ndarray:
        """robosuite's reset with its global-RNG draws seeded from ``seed``."""
        np.random.seed(int(seed) % 2**32)
        self._env.reset()
        # robosuite also draws from the global RNG while stepping (its observables' noise and
        # delay samplers), so the episode keeps a global RNG seeded from ``seed``: the same
        # (seed, initial state, actions) then give the same trajectory in any process. The
        # simulator runs in a process of its own, so nothing else shares that RNG.
        np.random.seed((int(seed) * 7919 + 1) % 2**32)
        # robosuite keeps the Panda gripper's ramping command outside the simulator and, without hard
        # resets, never clears it; a fresh episode starts from a neutral command, as after a hard reset.
        gripper = self._robot.gripper
        gripper.current_action = np.zeros(gripper.dof)
        return self._env.sim.get_state().flatten()

    def _proprio(self) -> np.ndarray:
        """LIBERO's 9-d proprio: gripper joint positions, end-effector position, end-effector quaternion (xyzw)."""
        data = self._env.sim.data
        gripper = data.qpos[self._robot._ref_gripper_joint_pos_indexes]
        position = data.site_xpos[self._robot.eef_site_id]
        quat_wxyz = data.body_xquat[self._eef_body]
        return np.concatenate([gripper, position, quat_wxyz[[1, 2, 3, 0]]]).astype(np.float64)

    def _render(self) -> dict[str, np.ndarray]:
        size = self.spec.image_size
        sim = self._env.sim
        return {name: upright(sim.render(width=size[1], height=size[0], camera_name=cam)) for name, cam in CAMERAS.items()}

    def _observation(self, render: bool, where: str) -> Observation:
        images = self._render() if render else {}
        obs = Observation(images=images, proprio=self._proprio(), instruction=INSTRUCTION)
        return check_observation(obs, self.spec, rendered=render, where=where)


def episode_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th episode of a batch seeded ``seed``: distinct across batches, 32 bits."""
    return int(np.random.SeedSequence([int(seed) % 2**63, int(index)]).generate_state(1, dtype=np.uint32)[0])


def make_demonstrations(
    n: int,
    success_rate: float,
    seed: int,
    image_size: int = 64,
    max_steps: int = 100,
    env: LiftEnv | None = None,
) -> list[Episode]:
    """``n`` scripted demonstrations, ``round(n * success_rate)`` of them meant to succeed, rendered at every step.

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
        for i, intended in enumerate(expert_outcomes(n, success_rate, seed)):
            s = episode_seed(seed, i)
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
