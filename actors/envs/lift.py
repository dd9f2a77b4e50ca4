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

The scripted expert (``actors.envs.lift_expert``) plays the environment through ``set_expert``,
``expert_action`` and ``expert_rollout``, so that a whole expert episode is one call to an env in
its own process.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from actors.env import check_action, check_observation
from actors.envs.panda import CAMERAS, panda_spec, quiet_robosuite
from cosmos_policy.contracts import Observation, StepResult
from cosmos_policy.errors import ConfigError, InputError

TASK = "lift"
INSTRUCTION = "lift the red cube"
# robosuite's model timestep (macros.SIMULATION_TIMESTEP); a control period must be a whole number of them.
_PHYSICS_DT = 0.002
# OSC_POSE maps a normalized action of 1 to a 5 cm position goal offset (controllers/config/osc_pose.json).
_POS_SCALE = 0.05


def upright(image: np.ndarray) -> np.ndarray:
    """A robosuite (OpenGL-convention, upside-down) frame flipped vertically, as LIBERO-Cosmos-Policy frames are."""
    return np.ascontiguousarray(image[::-1])


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
        quiet_robosuite()
        try:
            import mujoco
            import robosuite
            from robosuite.utils.binding_utils import MjRenderContextOffscreen
        except ImportError as exc:  # robosuite comes with the sim extra
            raise ImportError("LiftEnv needs robosuite 1.4: pip install '.[sim]'") from exc

        self.spec = panda_spec(image_size, control_hz)
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
        self._plan: Any = None  # the expert's plan of the current episode (lift_expert._ExpertPlan)
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

    # ---- as a robot (actors.robots.sim_arm) ---------------------------------------------------
    def actuate(self, action: np.ndarray) -> None:
        """One control step without the episode's bookkeeping: a robot's episode ends when its operator
        says, not at the task's success or a step limit, so the simulated arm steps on past both."""
        a = check_action(action, self.spec, where="lift.actuate")
        self._check_open()
        self._env.step(a)

    def observe(self, render: bool = True) -> Observation:
        """The current observation (cameras only when ``render``), without stepping."""
        self._check_open()
        return self._observation(render=render, where="lift.observe")

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
        """Decide how the expert plays the current episode (``lift_expert.expert_plan``); ``reset`` installs a succeeding one."""
        from actors.envs.lift_expert import expert_plan

        self._plan = expert_plan(success, seed)

    @property
    def expert_mode(self) -> str:
        """How the current episode's expert plays: "succeed", "miss" or "drop"."""
        if self._plan is None:
            raise RuntimeError("lift: no episode; call reset first")
        return self._plan.mode

    def expert_action(self) -> np.ndarray:
        """The scripted expert's next action, from privileged state (``lift_expert.expert_action``)."""
        from actors.envs.lift_expert import expert_action

        if self._plan is None or self._done:
            raise RuntimeError("lift.expert_action: no running episode; call reset first")
        return expert_action(self._plan, self.gripper_position(), self.cube_position())

    def expert_rollout(self, task: str, seed: int, success: bool, initial_state: np.ndarray | None = None, render: bool = False) -> Any:
        """One whole expert episode in one call (one message when the env lives in an ``EnvProcess``)."""
        from actors.envs.lift_expert import expert_rollout

        return expert_rollout(self, task, seed, success, initial_state, render)

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
