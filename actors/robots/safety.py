"""The last gate before any robot, in the robot's own process: ``SafetyEnvelope`` and ``Watchdog``.

Every action that reaches a driver (the policy's, the teleop's, a hold) passes ``check`` first, so
no network, model or job can move the robot outside its config. A refused action, too many
corrections in a row, a watchdog that was not fed, or anyone's ``estop`` latches a stop; while it is
latched no action passes, and only the holder of the ``OperatorKey`` clears it. The key is given to
the envelope when it is built, and to the operator's input device: never to the policy or the job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from actors.robots.config import RobotConfig
from actors.robots.operator import OperatorKey

log = logging.getLogger(__name__)


class StopKind(StrEnum):
    ESTOP = "estop"  # someone pressed stop (the operator, a watchdog, the job)
    FAULT = "fault"  # the envelope refused what it was given


@dataclass(frozen=True)
class Stop:
    """Why the robot is stopped; latched until the operator clears it."""

    kind: StopKind
    reason: str
    at: float  # time.time() when it latched


class RobotStopped(RuntimeError):
    """The envelope is latched: no action passes until the operator clears it."""

    def __init__(self, stop: Stop) -> None:
        super().__init__(f"robot stopped ({stop.kind}): {stop.reason}; only the operator can clear it")
        self.stop = stop


class UnsafeAction(RobotStopped):
    """The envelope refused an action (wrong shape, non-finite, too many corrections) and latched a fault stop."""


@dataclass(frozen=True)
class SafeAction:
    """An action the envelope let through, and what it corrected."""

    action: np.ndarray  # (d_a,) float64, within limits, workspace and the per-step cap
    clipped: tuple[int, ...]  # dims moved to their limits or into the workspace box
    capped: tuple[int, ...]  # dims held to max_step from the measured state


class SafetyEnvelope:
    """Limits, the per-step cap, the workspace box, the fault counter and the latched stop of one robot."""

    def __init__(self, config: RobotConfig, key: OperatorKey) -> None:
        if not isinstance(key, OperatorKey):
            raise TypeError(f"SafetyEnvelope: expected the OperatorKey, got {type(key).__name__}")
        self.names = config.actions
        self.low = np.array([config.limits[a].low for a in self.names])
        self.high = np.array([config.limits[a].high for a in self.names])
        self.max_step = np.array([config.max_step[a] for a in self.names])
        self.max_clipped_in_a_row = config.fault.max_clipped_in_a_row
        # The workspace box: features that are actions (end-effector control) tighten those actions'
        # limits; the others are measured only (joint control: no kinematics here), and a measured
        # position outside the box is a fault.
        self.box_low, self.box_high = self.low.copy(), self.high.copy()
        self.position_features: tuple[str, ...] = ()
        self._position_box = (np.zeros(0), np.zeros(0))
        if config.workspace is not None:
            ws = config.workspace
            measured_only = []
            for name, lo, hi in zip(ws.features, ws.low, ws.high):
                if name in self.names:
                    i = self.names.index(name)
                    self.box_low[i], self.box_high[i] = max(self.low[i], lo), min(self.high[i], hi)
                else:
                    measured_only.append((name, lo, hi))
            self.position_features = tuple(n for n, _, _ in measured_only)
            self._position_box = (np.array([lo for _, lo, _ in measured_only]), np.array([hi for _, _, hi in measured_only]))
        self._key = key
        self._lock = threading.Lock()
        self._stop: Stop | None = None
        self.clipped_in_a_row = 0
        self.counters = {"steps": 0, "clipped_steps": 0, "capped_steps": 0, "faults": 0, "estops": 0, "clears": 0}

    # ---- the latch -------------------------------------------------------------------------------
    @property
    def stopped(self) -> Stop | None:
        """The latched stop, or None."""
        return self._stop

    def estop(self, reason: str) -> Stop:
        """Latch an emergency stop (anyone may); an earlier stop keeps its reason."""
        return self._latch(StopKind.ESTOP, reason)

    def fault(self, reason: str) -> Stop:
        """Latch a fault stop for something found outside the envelope (a driver error, a bad observation)."""
        return self._latch(StopKind.FAULT, reason)

    def clear(self, key: OperatorKey) -> None:
        """Release the latch; only with the operator's own key object."""
        if key is not self._key:
            raise PermissionError(f"SafetyEnvelope.clear: only the operator's key clears a latched stop (got {type(key).__name__})")
        with self._lock:
            if self._stop is not None:
                log.warning("robot stop cleared by the operator (was %s: %s)", self._stop.kind, self._stop.reason)
                self.counters["clears"] += 1
            self._stop = None
            self.clipped_in_a_row = 0

    def _latch(self, kind: StopKind, reason: str) -> Stop:
        with self._lock:
            if self._stop is None:
                self._stop = Stop(kind, reason, time.time())
                self.counters["faults" if kind is StopKind.FAULT else "estops"] += 1
                log.error("robot stop latched (%s): %s", kind, reason)
            return self._stop

    def _refuse(self, reason: str) -> UnsafeAction:
        self._latch(StopKind.FAULT, reason)
        return UnsafeAction(self._stop or Stop(StopKind.FAULT, reason, time.time()))

    # ---- the gate ---------------------------------------------------------------------------------
    def check(self, action: np.ndarray, measured: np.ndarray, position: np.ndarray | None = None) -> SafeAction:
        """The action that may be sent, given the measured state of each action dim (and the measured
        end-effector position when the workspace has measured-only features); raises ``RobotStopped``."""
        if self._stop is not None:
            raise RobotStopped(self._stop)
        d = len(self.names)
        a = self._vector(action, "action", d)
        m = self._vector(measured, "measured", d)
        if self.position_features:
            p = self._vector(position, "position", len(self.position_features), self.position_features)
            lo, hi = self._position_box
            out = np.flatnonzero((p < lo) | (p > hi))
            if out.size:
                i = int(out[0])
                raise self._refuse(f"workspace: measured {self.position_features[i]}={p[i]:.4g} is outside [{lo[i]:.4g}, {hi[i]:.4g}]")
        # The allowed interval of each dim: its limits (tightened by the box) intersected with the step
        # cap around the measured state. Empty means the robot is already further than one step outside
        # its limits: no single step can make that safe.
        lo, hi = np.maximum(self.box_low, m - self.max_step), np.minimum(self.box_high, m + self.max_step)
        empty = np.flatnonzero(lo > hi)
        if empty.size:
            i = int(empty[0])
            raise self._refuse(f"measured[{i}] ({self.names[i]})={m[i]:.4g} is more than max_step {self.max_step[i]:.4g} "
                               f"outside its limits [{self.box_low[i]:.4g}, {self.box_high[i]:.4g}]")
        within = np.clip(a, self.box_low, self.box_high)
        out = np.clip(within, lo, hi)
        clipped = tuple(int(i) for i in np.flatnonzero(within != a))
        capped = tuple(int(i) for i in np.flatnonzero(out != within))
        with self._lock:
            self.clipped_in_a_row = self.clipped_in_a_row + 1 if clipped else 0
            too_many = self.clipped_in_a_row > self.max_clipped_in_a_row
            if not too_many:  # the counters count what passed; a refusal counts as a fault
                self.counters["steps"] += 1
                self.counters["clipped_steps"] += bool(clipped)
                self.counters["capped_steps"] += bool(capped)
        if too_many:
            names = [self.names[i] for i in clipped]
            raise self._refuse(f"{self.clipped_in_a_row} steps in a row clipped to the limits (max_clipped_in_a_row "
                               f"{self.max_clipped_in_a_row}; last: {names})")
        return SafeAction(out, clipped, capped)

    def _vector(self, value: np.ndarray | None, what: str, d: int, names: tuple[str, ...] | None = None) -> np.ndarray:
        """A finite float vector of ``d`` values, or a latched fault naming the first bad index."""
        names = names or self.names
        try:
            v = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise self._refuse(f"{what}: expected {d} numbers, got {type(value).__name__}") from None
        if v.shape != (d,):
            raise self._refuse(f"{what}: expected shape ({d},), got {v.shape}")
        bad = np.flatnonzero(~np.isfinite(v))
        if bad.size:
            i = int(bad[0])
            raise self._refuse(f"{what}[{i}] ({names[i]}) is {v[i]}: refusing a non-finite {what}")
        return v


class Watchdog:
    """Calls ``on_timeout`` once, from its own thread, if ``feed()`` is not called within ``timeout_s``.

    Run it in the process nearest the hardware: when whatever feeds it dies or falls silent (a hung
    driver call, a stalled loop, a dead feeder connection), the robot still stops by itself. It
    fires at most once; a fired watchdog stays fired (build a new one to watch again).
    """

    def __init__(self, timeout_s: float, on_timeout: Callable[[], None], name: str = "robot-watchdog") -> None:
        if not timeout_s > 0:
            raise ValueError(f"Watchdog: timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.on_timeout = on_timeout
        self.fired_at: float | None = None
        self._last = time.monotonic()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=name, daemon=True)

    @property
    def fired(self) -> bool:
        return self.fired_at is not None

    def start(self) -> Watchdog:
        self._last = time.monotonic()
        self._thread.start()
        return self

    def feed(self) -> None:
        self._last = time.monotonic()

    def close(self) -> None:
        """Stop watching without firing."""
        self._closed.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _watch(self) -> None:
        while not self._closed.wait(max(0.0, self._last + self.timeout_s - time.monotonic())):
            silent = time.monotonic() - self._last
            if silent >= self.timeout_s:
                self.fired_at = time.monotonic()
                log.error("watchdog %s: not fed for %.3f s (timeout %.3f s): stopping", self._thread.name, silent, self.timeout_s)
                try:
                    self.on_timeout()
                except Exception:  # the stop itself failed: say so loudly; there is nothing further to call
                    log.exception("watchdog %s: the stop callback failed", self._thread.name)
                return
