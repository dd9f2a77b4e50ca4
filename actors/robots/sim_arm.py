"""``SimArm``: the built-in task's Panda arm behind the driver contract, for dry runs and tests without hardware.

Like the dummy mode a real component, not a test mock, but with physics: robosuite's Lift
(``actors.envs.lift``, the built-in task) runs in a child process that plays the arm's own
controller box. The child owns the simulation and keeps its clock:

- each ``send_action`` is one control step, applied when it arrives and its cameras rendered right
  after (the next ``get_observation`` is answered from that frame at once; a stream faster than twice
  ``control_hz`` is throttled, so simulated time never runs ahead of the wall clock);
- when no command comes for 1.5 control periods it holds: it steps with the zero action (zero
  OSC_POSE deltas keep the pose, a zero gripper command keeps the gripper's), so physics runs on in
  real time while the host is late, as an arm's controller holds its last setpoint;
- its own watchdog: once a motion command has come, ``watchdog_s`` without any command latches a
  stop (it holds and refuses motion until ``connect()`` or ``reset()``), whatever hung on the host;
  when the parent's pipe closes (the parent exited or was killed) it stops at once, holds for
  ``linger_s`` so the status shows the arm at rest, and exits: no process is left behind.

The child writes its state to ``status_file`` (JSON, replaced atomically) on every change and every
``STATUS_EVERY_S`` while powered, so whoever outlives the host (a test, an operator's console) can
read whether and when the arm stopped. ``disconnect()`` is the brakes: motion refused, physics
paused, the simulation kept; ``close()`` ends the child. ``reset(seed)`` is the operator's scene reset
(a new cube placement) and re-enables a stopped arm.

Features: one float per proprio dimension in the lift env's order, the two camera frames under
robosuite's camera names, one float per action dimension in the lift env's order (OSC_POSE deltas,
then the gripper), ``hold.<action>`` (always 0.0: the action that holds, which the robot config names
as each delta's measured state), ``task.success`` (1.0 once the cube is lifted) and the cube's
position (``cube.x``...: privileged simulator state, for scripted operators and experts, not the model).

The parent side needs only the standard library and numpy; the child imports robosuite and the
lift env (spawn start method: no inherited threads or GL contexts, as ``actors.env_process``).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from actors.robots.driver import NotConnected

# The lift env's 9-d proprio in its order (LiftEnv._proprio: gripper joints, end-effector position,
# end-effector quaternion xyzw) and its 7-d OSC_POSE action (delta position, delta axis-angle,
# gripper -1 open / +1 close); named here because this module may not import the env (heavy), and
# checked against it by tests/test_robot_sim_arm.py.
PROPRIO = ("gripper.q0", "gripper.q1", "eef.x", "eef.y", "eef.z", "eef.qx", "eef.qy", "eef.qz", "eef.qw")
ACTIONS = ("eef.dx", "eef.dy", "eef.dz", "eef.drx", "eef.dry", "eef.drz", "gripper")
HOLD = tuple(f"hold.{a}" for a in ACTIONS)
CUBE = ("cube.x", "cube.y", "cube.z")
SUCCESS = "task.success"
# The model's camera name -> robosuite's (actors.envs.panda.CAMERAS): the driver's frames keep robosuite's names.
CAMERAS = {"primary": "agentview", "wrist": "robot0_eye_in_hand"}
ACTION_RANGE = 1.0  # OSC_POSE's normalized units: robosuite clips every dim to [-1, 1] itself
STATUS_EVERY_S = 0.1
TASK = "lift"


class SimArmError(ConnectionError):
    """The simulated arm's process died, failed to start, or did not answer in time."""


class SimArmStopped(RuntimeError):
    """``send_action`` while the arm is stopped (``safe_stop``, its watchdog): ``connect()`` or ``reset()`` re-enables it."""


@dataclass(frozen=True)
class _Settings:
    """What the child needs to build and run the simulation (pickled to it at spawn)."""

    image_size: int
    control_hz: float
    watchdog_s: float
    seed: int
    status_file: str | None
    linger_s: float
    antialias: bool


class SimArm:
    """The built-in Lift task's Panda, as a robot whose controller is a child process (see the module docstring)."""

    name = "sim_arm"

    def __init__(self, image_size: int = 64, control_hz: float = 20.0, watchdog_s: float = 0.5, seed: int = 0,
                 status_file: str | None = None, linger_s: float = 1.0, call_timeout_s: float = 10.0,
                 start_timeout_s: float = 180.0, antialias: bool = True) -> None:
        """``seed``: the first episode's (``reset(seed)`` starts the others); ``watchdog_s``: the child's silence limit
        once motion began; ``status_file``: where the child writes its
        state (None: nowhere); ``linger_s``: how long the child holds after its parent is gone before it exits;
        ``call_timeout_s``: the longest a command waits for the child's answer."""
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"SimArm image_size: expected an integer >= 8, got {image_size!r}")
        if not (isinstance(control_hz, (int, float)) and math.isfinite(control_hz) and control_hz > 0):
            raise ValueError(f"SimArm control_hz: expected a positive number, got {control_hz!r}")
        if not watchdog_s > 1.5 / control_hz:  # it must outlast the hold grace, or a healthy stream would trip it
            raise ValueError(f"SimArm watchdog_s: expected more than 1.5 control periods ({1.5 / control_hz:.4g} s), got {watchdog_s!r}")
        for key, value in (("linger_s", linger_s), ("call_timeout_s", call_timeout_s), ("start_timeout_s", start_timeout_s)):
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"SimArm {key}: expected seconds >= 0, got {value!r}")
        if status_file is not None and not Path(status_file).parent.is_dir():
            raise ValueError(f"SimArm status_file: expected a file in an existing folder, got {status_file!r}")
        self.settings = _Settings(int(image_size), float(control_hz), float(watchdog_s), int(seed),
                                  None if status_file is None else str(status_file), float(linger_s), bool(antialias))
        self.call_timeout_s, self.start_timeout_s = float(call_timeout_s), float(start_timeout_s)
        self._proc: mp.process.BaseProcess | None = None
        self._cmd: Connection | None = None  # request / reply, one at a time (``_lock``)
        self._stop: Connection | None = None  # the stop line: ``safe_stop`` from any thread, even while a command waits
        self._lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._connected = False
        self._stopped = False  # known here without asking the child: send_action refuses at once
        self._last: dict[str, Any] | None = None
        self.starts = 0

    # ---- features: readable while disconnected ------------------------------------------------------
    @property
    def observation_features(self) -> dict[str, Any]:
        size = (self.settings.image_size, self.settings.image_size, 3)
        features: dict[str, Any] = {name: float for name in (*PROPRIO, *HOLD, SUCCESS, *CUBE)}
        return features | {cam: size for cam in CAMERAS.values()}

    @property
    def action_features(self) -> dict[str, Any]:
        return {name: float for name in ACTIONS}

    @property
    def is_connected(self) -> bool:
        return self._connected and self.alive()

    @property
    def pid(self) -> int | None:
        """The child's process id (None before the first ``connect``)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def last_observation(self) -> dict[str, Any] | None:
        """The flat dict ``get_observation`` last returned (for an operator's display, or one that labels from ``task.success``)."""
        return self._last

    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    # ---- the contract ----------------------------------------------------------------------------
    def connect(self, calibrate: bool = True) -> None:
        """Start the simulation if it is not running (seconds: robosuite builds its model), then enable motion;
        a connect after a stop re-enables it, holding the current pose."""
        if not self.alive():
            self._start()
        self._call("enable")
        self._stopped, self._connected = False, True

    def disconnect(self) -> None:
        """The brakes: motion refused and physics paused; the simulation stays for the next ``connect`` (``close`` ends it)."""
        if self.alive():
            self._call("disable")
        self._connected = False

    def safe_stop(self) -> None:
        """Hold and refuse motion until ``connect()`` or ``reset()``; safe from any thread (its own line to the child)."""
        self._stopped = True
        if not self.alive() or self._stop is None:
            return
        with self._stop_lock:
            try:
                self._stop.send(("safe_stop", None))
                if self._stop.poll(self.call_timeout_s):
                    self._stop.recv()
            except (EOFError, OSError):  # the child is gone: nothing is moving
                pass

    def get_observation(self) -> dict[str, Any]:
        if not self.is_connected:
            raise NotConnected("SimArm: get_observation() before connect()")
        flat = self._call("observe")
        self._last = flat
        return flat

    def send_action(self, action: dict[str, float]) -> dict[str, float]:
        """One control step; dims not given hold (0). Returns what was sent: each dim clipped to [-1, 1]."""
        unknown = sorted(set(action) - set(ACTIONS))
        if unknown:
            raise KeyError(f"SimArm.send_action: unknown action features {unknown} (known: {list(ACTIONS)})")
        vector = np.zeros(len(ACTIONS))
        for i, name in enumerate(ACTIONS):
            value = float(action.get(name, 0.0))
            if not math.isfinite(value):
                raise ValueError(f"SimArm.send_action: {name} is {value}: refusing a non-finite action")
            vector[i] = value
        if not self.is_connected:
            raise NotConnected("SimArm: send_action() before connect()")
        if self._stopped:
            raise SimArmStopped("SimArm: stopped (safe_stop); connect() or reset() to move again")
        sent = self._call("act", vector)
        return {name: float(v) for name, v in zip(ACTIONS, sent)}

    # ---- beyond the contract ---------------------------------------------------------------------
    def reset(self, seed: int) -> dict[str, Any]:
        """The operator's scene reset: a new episode of the task from ``seed`` (cube placement), motion re-enabled;
        returns the first observation."""
        if not self.is_connected:
            raise NotConnected("SimArm: reset() before connect()")
        flat = self._call("reset", int(seed))
        self._stopped, self._last = False, flat
        return flat

    def status(self) -> dict[str, Any] | None:
        """What the child last wrote to ``status_file`` (None without one, or before the child wrote it)."""
        return read_status(self.settings.status_file) if self.settings.status_file else None

    def close(self) -> None:
        """End the simulation's process (waits for it; kills it if it does not end within a few seconds)."""
        self._connected = False
        if self.alive():
            try:
                self._call("close", timeout_s=5.0)
            except (SimArmError, RuntimeError):
                pass
        if self._proc is not None:
            self._proc.join(5.0)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5.0)
        for conn in (self._cmd, self._stop):
            if conn is not None:
                conn.close()
        self._proc, self._cmd, self._stop = None, None, None

    def __enter__(self) -> SimArm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the pipe ------------------------------------------------------------------------------------
    def _start(self) -> None:
        self.close()
        ctx = mp.get_context("spawn")
        cmd, child_cmd = ctx.Pipe()
        stop, child_stop = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child_cmd, child_stop, self.settings), name="sim-arm", daemon=True)
        self._proc.start()
        child_cmd.close()
        child_stop.close()
        self._cmd, self._stop = cmd, stop
        self.starts += 1
        self._call("ready", timeout_s=self.start_timeout_s, send=False)

    def _call(self, name: str, payload: Any = None, timeout_s: float | None = None, send: bool = True) -> Any:
        """One command and its answer, or ``SimArmError`` (dead, silent) / ``SimArmStopped`` (the arm refused to move)."""
        timeout_s = self.call_timeout_s if timeout_s is None else timeout_s
        with self._lock:
            if self._cmd is None or self._proc is None:
                raise SimArmError(f"SimArm: {name}: the simulation is not running (connect() starts it)")
            try:
                if send:
                    self._cmd.send((name, payload))
                if not self._cmd.poll(timeout_s):
                    raise SimArmError(f"SimArm: {name}: the simulation (pid {self._proc.pid}) did not answer within {timeout_s} s")
                status, reply = self._cmd.recv()
            except (EOFError, OSError) as exc:
                self._connected = False
                self._proc.join(1.0)  # a closed pipe comes before the exit: wait a moment, to report its code
                raise SimArmError(f"SimArm: {name}: the simulation (pid {self._proc.pid}) died "
                                  f"(exit code {self._proc.exitcode})") from exc
        if status == "ok":
            return reply
        if status == "stopped":
            self._stopped = True
            raise SimArmStopped(f"SimArm: {reply}; connect() or reset() to move again")
        raise SimArmError(f"SimArm: {name} failed in the simulation: {reply}")


def read_status(path: str | Path) -> dict[str, Any] | None:
    """The child's status file (None while it does not exist yet)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


# ---- the child: the arm's controller ------------------------------------------------------------------
def _serve(cmd: Connection, stop: Connection, settings: _Settings) -> None:
    """The child process's body: build the simulation, then answer commands and keep the clock until told to close
    or orphaned."""
    try:
        controller = _Controller(cmd, stop, settings)
    except BaseException:  # say why the simulation could not be built, then end
        try:
            cmd.send(("error", traceback.format_exc()))
        except OSError:  # and the parent is gone too: nobody to tell
            pass
        return
    controller._reply(cmd, "ok", os.getpid())  # a parent that died while it waited: run() lingers, then ends
    controller.run()


@dataclass
class _Status:
    """What the child writes to its status file; times are ``time.monotonic()`` of this host (comparable between
    its processes) unless named ``*_wall``."""

    pid: int
    state: str  # disconnected, idle (enabled, no motion yet), moving, stopped, exited
    stop_reason: str | None
    stopped_at: float | None
    last_command_at: float
    watchdog_s: float
    steps: int  # control steps commanded by the parent
    hold_steps: int  # control steps the controller held by itself
    eef: list[float]
    eef_speed: float  # m/s over the last control step
    success: bool
    parent_gone: bool
    updated_at: float
    updated_at_wall: float


class _Controller:
    """The simulation and its controller's rules (see the module docstring); lives in the child only."""

    def __init__(self, cmd: Connection, stop: Connection, s: _Settings) -> None:
        os.environ.setdefault("MUJOCO_GL", "egl")  # offscreen rendering; set before robosuite is imported
        from actors.envs.lift import LiftEnv

        self.cmd, self.stop, self.s = cmd, stop, s
        self.env = LiftEnv(image_size=s.image_size, max_steps=1, control_hz=s.control_hz, num_initial_states=1,
                           antialias=s.antialias)
        self.env.reset(TASK, s.seed)
        self.period = 1.0 / s.control_hz
        now = time.monotonic()
        self.enabled = False  # connected: physics runs and motion is allowed unless stopped
        self.armed = False  # a motion command came since enable / reset: silence now trips the watchdog
        self.stop_reason: str | None = None
        self.stopped_at: float | None = None
        self.parent_gone_at: float | None = None
        self.last_command = self.last_step = self.last_write = now
        self.steps = self.hold_steps = 0
        self.eef = self.env.gripper_position()
        self.eef_speed = 0.0
        self.closing = False
        self.frame: dict[str, Any] | None = None  # the current observation, once rendered (until the next step)
        self.written_state = ""
        self._write()

    # ---- the loop ------------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self.closing:
                now = time.monotonic()
                if self.parent_gone_at is None:
                    for conn in wait([self.cmd, self.stop], timeout=max(0.0, self._next_due(now) - now)):
                        self._receive(conn)
                else:  # nobody to listen to (a closed pipe is always "ready"): keep the clock until the linger ends
                    end = self.parent_gone_at + self.s.linger_s
                    if now >= end:
                        break
                    time.sleep(max(0.0, min(self._next_due(now), end) - now))
                self._keep_time(time.monotonic())
        finally:
            self._write(state="exited")
            self.env.close()

    def _next_due(self, now: float) -> float:
        """When something must happen without a command: a hold step, the watchdog's deadline, a status write."""
        due = self.last_write + STATUS_EVERY_S
        if self._powered():
            due = min(due, self.last_step + (1.5 if self._moving() else 1.0) * self.period)
        if self._moving():
            due = min(due, self.last_command + self.s.watchdog_s)
        return due

    def _powered(self) -> bool:
        """Physics runs while connected, stopped or not (an arm holding under its controller), and after the parent is gone."""
        return self.enabled or self.parent_gone_at is not None

    def _moving(self) -> bool:
        return self.enabled and self.armed and self.stop_reason is None

    def _keep_time(self, now: float) -> None:
        if self._moving() and now - self.last_command >= self.s.watchdog_s:
            self._latch(f"watchdog: no command for {now - self.last_command:.3f} s (watchdog_s {self.s.watchdog_s})", now)
        if self._powered() and now - self.last_step >= (1.5 if self._moving() else 1.0) * self.period:
            self._step(np.zeros(len(ACTIONS)), held=True)
        self._write()

    def _latch(self, reason: str, now: float) -> None:
        if self.stop_reason is None:
            self.stop_reason, self.stopped_at = reason, now
        self.armed = False
        self._write(force=True)

    def _step(self, action: np.ndarray, held: bool) -> None:
        """One control step. After a commanded one the cameras are rendered at once, while the host sleeps to its
        next tick, and its next observe is answered from that frame (the state changes only with a step, so the
        frame is current); after a hold nobody may ask, so the next observe renders."""
        start = time.monotonic()
        self.env.actuate(action)
        eef = self.env.gripper_position()
        self.eef_speed = float(np.linalg.norm(eef - self.eef) / self.period)
        self.eef, self.last_step = eef, start
        self.hold_steps += held
        self.steps += not held
        self.frame = None if held else self._flat(self.env.observe(render=True))

    def _observation(self) -> dict[str, Any]:
        if self.frame is None:
            self.frame = self._flat(self.env.observe(render=True))
        return self.frame

    # ---- commands ------------------------------------------------------------------------------------
    def _receive(self, conn: Connection) -> None:
        try:
            name, payload = conn.recv()
        except (EOFError, OSError):  # the parent exited or was killed
            self._parent_gone()
            return
        now = time.monotonic()
        self.last_command = now  # any command feeds the watchdog
        try:
            self._answer(conn, name, payload, now)
        except Exception:  # a failed command fails alone; the controller keeps holding
            self._reply(conn, "error", f"{name}: {traceback.format_exc()}")
        self._write()

    def _reply(self, conn: Connection, status: str, payload: Any) -> bool:
        """Answer the parent; False when it is gone (it died between its command and this answer)."""
        try:
            conn.send((status, payload))
            return True
        except (EOFError, OSError):
            self._parent_gone()
            return False

    def _parent_gone(self) -> None:
        """Stop now, hold for ``linger_s`` so the status shows the arm at rest, then end (``run``)."""
        if self.parent_gone_at is None:
            self.parent_gone_at = time.monotonic()
            self._latch("parent gone: its pipe closed (it exited or was killed)", self.parent_gone_at)

    def _answer(self, conn: Connection, name: str, payload: Any, now: float) -> None:
        if name == "act":
            if not self.enabled or self.stop_reason is not None:
                self._reply(conn, "stopped", f"stopped ({self.stop_reason or 'disconnected'})")
                return
            action = np.clip(np.asarray(payload, dtype=np.float64), -ACTION_RANGE, ACTION_RANGE)
            if not self._reply(conn, "ok", action):  # acknowledged at once, as a controller takes a setpoint; applied below
                return
            earliest = self.last_step + 0.5 * self.period  # throttle a stream faster than twice the control rate
            if now < earliest:
                time.sleep(earliest - now)
            self.armed = True
            self._step(action, held=False)
        elif name == "observe":
            self._reply(conn, "ok", self._observation())
        elif name == "safe_stop":
            self._latch("safe_stop", now)
            self._reply(conn, "ok", None)
        elif name == "reset":
            flat = self.frame = self._flat(self.env.reset(TASK, int(payload)))
            self._enable(now)
            self.eef, self.eef_speed = self.env.gripper_position(), 0.0
            self._reply(conn, "ok", flat)
        elif name == "enable":
            self._enable(now)
            self._reply(conn, "ok", None)
        elif name == "disable":
            self.enabled = self.armed = False
            self._reply(conn, "ok", None)
        elif name == "close":
            self.closing = True
            self._reply(conn, "ok", None)
        else:
            self._reply(conn, "error", f"unknown command {name!r}")

    def _enable(self, now: float) -> None:
        self.enabled, self.armed = True, False
        self.stop_reason = self.stopped_at = None
        self.last_step = now

    def _flat(self, obs: Any) -> dict[str, Any]:
        flat: dict[str, Any] = {name: float(v) for name, v in zip(PROPRIO, obs.proprio)}
        flat |= {name: 0.0 for name in HOLD}
        flat[SUCCESS] = float(self.env.success())
        flat |= {name: float(v) for name, v in zip(CUBE, self.env.cube_position())}
        flat |= {robosuite: obs.images[model] for model, robosuite in CAMERAS.items()}
        return flat

    # ---- the status file -----------------------------------------------------------------------------
    def _state(self) -> str:
        if self.stop_reason is not None:
            return "stopped"
        if not self.enabled:
            return "disconnected"
        return "moving" if self.armed else "idle"

    def _write(self, state: str | None = None, force: bool = False) -> None:
        """On a change of state at once, else every ``STATUS_EVERY_S`` (two writes a control step would be waste)."""
        state = state or self._state()
        now = time.monotonic()
        if not (force or state != self.written_state or now - self.last_write >= STATUS_EVERY_S):
            return
        self.last_write, self.written_state = now, state
        if self.s.status_file is None:
            return
        status = _Status(pid=os.getpid(), state=state, stop_reason=self.stop_reason, stopped_at=self.stopped_at,
                         last_command_at=self.last_command, watchdog_s=self.s.watchdog_s, steps=self.steps,
                         hold_steps=self.hold_steps, eef=[float(v) for v in self.eef], eef_speed=self.eef_speed,
                         success=self.env.success(), parent_gone=self.parent_gone_at is not None, updated_at=now,
                         updated_at_wall=time.time())
        path = Path(self.s.status_file)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(status)))
        os.replace(tmp, path)  # readers never see half a file
