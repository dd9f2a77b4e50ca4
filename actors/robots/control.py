"""``ControlLoop``: one robot episode at ``control_hz``, the same in the in-cluster RobotActor and a gateway's thin client.

Each step: observe, poll the operator, take what the chunk source delivered, pick the action (the
chunk queue's next, the teleop's during an intervention, or a hold), pass it through the safety
envelope, send it, record it, feed the watchdog, and sleep to the next tick of a drift-free
schedule. The chunk source (``infer``) runs on its own thread (``ChunkRequests``), so a slow or
dead policy only ever makes the robot hold, then stop (``hold_s``); the next chunk is asked for
when the queue falls to ``request_threshold`` of a chunk, as LeRobot's async inference does.
A newer chunk replaces the queue (no blending: the newer one saw more), minus the steps executed
since the observation it was computed from.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping

import numpy as np

from actors.robots.chunks import AnswerKind, Chunk, ChunkRequests, Infer
from actors.robots.config import RobotConfig
from actors.robots.driver import NotConnected, RobotDriver, stop_driver
from actors.robots.observation import RobotObservation, robot_observation, scalars
from actors.robots.operator import OperatorEvent, OperatorInput, Teleop
from actors.robots.record import EpisodeBuilder, RobotEpisodeRecord
from actors.robots.safety import RobotStopped, SafetyEnvelope, Watchdog

__all__ = ["Chunk", "ControlLoop", "ResetCancelled", "ResetTimeout", "RobotEpisodeRecord", "RobotObservation"]

log = logging.getLogger(__name__)
LABELS = {OperatorEvent.SUCCESS: True, OperatorEvent.FAILURE: False}


class ResetTimeout(TimeoutError):
    """The operator did not finish a reset in time."""


class ResetCancelled(ResetTimeout):
    """The wait for a reset was called off (the robot is leaving its job)."""


class ControlLoop:
    """Runs episodes of one robot: a driver, its config and envelope, an operator, an optional teleop, a chunk source."""

    def __init__(self, driver: RobotDriver, config: RobotConfig, envelope: SafetyEnvelope, operator: OperatorInput,
                 infer: Infer, teleop: Teleop | None = None) -> None:
        config.check_driver(driver.observation_features, driver.action_features)
        if envelope.names != config.actions:
            raise ValueError(f"ControlLoop: the envelope's actions {list(envelope.names)} are not the config's {list(config.actions)}")
        self.driver, self.config, self.envelope, self.operator, self.infer, self.teleop = driver, config, envelope, operator, infer, teleop
        self._measured = [config.measured_feature(a) for a in config.actions]
        self._stop_lock = threading.Lock()
        self.driver_stopped = False  # this loop stopped the driver: the next reset reconnects it

    # ---- between episodes --------------------------------------------------------------------------
    def reset(self, timeout_s: float = 120.0, cancel: threading.Event | None = None) -> None:
        """Wait for the operator's RESET_DONE (and for any latched stop to be cleared), then re-enable a stopped driver.
        ``cancel`` set ends the wait at once (``ResetCancelled``): a robot leaving its job does not wait for a reset."""
        deadline = time.monotonic() + timeout_s
        done = False
        while not (done and self.envelope.stopped is None):
            if cancel is not None and cancel.is_set():
                raise ResetCancelled(f"reset: robot {self.config.id} is leaving; no episode follows")
            for event in self.operator.poll():
                done |= event is OperatorEvent.RESET_DONE
                if event is OperatorEvent.ESTOP:
                    self.envelope.estop("operator: emergency stop during reset")
            if time.monotonic() > deadline:
                stop = self.envelope.stopped
                if done and stop is not None:
                    raise ResetTimeout(f"reset: robot {self.config.id} is still stopped ({stop.kind}: {stop.reason}) "
                                       f"{timeout_s} s after RESET_DONE was asked for: the operator must clear it")
                raise ResetTimeout(f"reset: no RESET_DONE from the operator of robot {self.config.id} within {timeout_s} s")
            time.sleep(self.config.period_s)
        if self.driver_stopped:  # a stopped driver moves again only after a fresh connect
            if self.driver.is_connected:
                self.driver.disconnect()
            self.driver.connect(calibrate=False)
            self.driver_stopped = False

    # ---- one episode -------------------------------------------------------------------------------
    def run(self, instruction: str, max_steps: int) -> RobotEpisodeRecord:
        """Play one episode until the operator labels it, ``max_steps``, or something interrupts it."""
        cfg, ch = self.config, self.config.chunking
        if max_steps < 1:
            raise ValueError(f"ControlLoop.run: max_steps must be >= 1, got {max_steps}")
        if not self.driver.is_connected:
            raise NotConnected(f"ControlLoop.run: robot {cfg.id} is not connected (connect the driver, or reset after a stop)")
        if self.envelope.stopped is not None:
            raise RobotStopped(self.envelope.stopped)
        ep = EpisodeBuilder(cfg, instruction)
        requests = ChunkRequests(self.infer, ch.deadline_s)
        queue: deque[np.ndarray] = deque()
        chunk_len, chunk_id = 0, -1
        intervening, hold_since, hold_pose = False, None, None
        watchdog = Watchdog(ch.watchdog_s, self._watchdog_fired, name=f"{cfg.id}-watchdog").start()
        next_tick = time.monotonic()
        try:
            for step in range(max_steps):
                tick = time.monotonic()
                try:
                    flat = self.driver.get_observation()
                    wall, now = time.time(), time.monotonic()
                    obs = robot_observation(flat, cfg, instruction, now)
                    measured = scalars(flat, self._measured)
                    position = scalars(flat, self.envelope.position_features) if self.envelope.position_features else None
                except Exception as exc:
                    return self._fault(ep, f"observation: {type(exc).__name__}: {exc}")

                label: OperatorEvent | None = None
                for event in self.operator.poll():
                    ep.events.append((step, event.value))
                    if event is OperatorEvent.ESTOP:
                        self.envelope.estop("operator: emergency stop")
                    elif event in (OperatorEvent.SUCCESS, OperatorEvent.FAILURE, OperatorEvent.RERECORD):
                        label = label or event
                    elif event is OperatorEvent.INTERVENTION_START and self.teleop is None:
                        ep.note(step, "intervention asked for, but this robot has no teleop: ignored")
                    elif event is OperatorEvent.INTERVENTION_START:
                        intervening, hold_since = True, None
                        queue.clear()
                        requests.cancel()  # computed before the human moved the robot: no longer meant for it
                    elif event is OperatorEvent.INTERVENTION_END and intervening:
                        intervening, chunk_len = False, 0  # ask for a fresh chunk at once
                if self.envelope.stopped is not None:  # an estop, or the watchdog: nothing more is sent
                    return self._interrupt(ep, self.envelope.stopped.reason)
                if label is OperatorEvent.RERECORD:
                    return ep.finish("rerecord", rerecord=True)
                if label is not None:
                    return ep.finish(label.value, success=LABELS[label])

                for answer in requests.poll():
                    if answer.kind is AnswerKind.LATE:
                        ep.counters["late_chunks"] += 1
                        ep.note(step, answer.error)
                    elif answer.kind is AnswerKind.ERROR:
                        ep.counters["failed_requests"] += 1
                        ep.note(step, f"infer failed: {answer.error}")
                    else:
                        chunk = answer.chunk
                        actions = np.asarray(chunk.actions, dtype=np.float64)
                        if actions.ndim != 2 or actions.shape[1] != len(cfg.actions) or not len(actions):
                            return self._fault(ep, f"chunk: expected actions of shape (K, {len(cfg.actions)}), got {actions.shape}")
                        skip = ep.steps_since(chunk.observed_at)
                        if now - chunk.observed_at > ch.stale_s or skip >= len(actions):
                            ep.counters["stale_chunks"] += 1
                            continue
                        queue = deque(actions[skip:])
                        chunk_len, chunk_id = len(actions), ep.add_chunk(chunk, answer, skip)

                held, from_chunk = False, -1
                if intervening:
                    try:
                        proposed = self._vector(self.teleop.get_action())  # type: ignore[union-attr]
                    except Exception as exc:
                        return self._fault(ep, f"teleop: {type(exc).__name__}: {exc}")
                elif queue:
                    proposed, from_chunk, hold_since = queue.popleft(), chunk_id, None
                else:  # nothing to execute: hold the pose measured when the hold began (re-sending each
                    # step's measurement would let an arm that sags under gravity creep down)
                    if hold_since is None:
                        hold_since, hold_pose = now, measured.copy()
                    if now - hold_since > ch.hold_s:
                        return self._interrupt(ep, f"late chunk: nothing to execute for {now - hold_since:.2f} s (hold_s {ch.hold_s})")
                    proposed, held = hold_pose, True
                if not intervening and not requests.in_flight and (chunk_len == 0 or len(queue) <= ch.request_threshold * chunk_len):
                    requests.submit(obs)

                try:
                    safe = self.envelope.check(proposed, measured, position)
                except RobotStopped as exc:
                    return self._interrupt(ep, exc.stop.reason)
                try:
                    sent = self.driver.send_action({a: float(v) for a, v in zip(cfg.actions, safe.action)})
                except Exception as exc:
                    return self._fault(ep, f"send_action: {type(exc).__name__}: {exc}")
                sent = sent if isinstance(sent, Mapping) else {}
                executed = np.array([float(sent.get(a, v)) for a, v in zip(cfg.actions, safe.action)])
                ep.add_step(obs, wall, tick, proposed, executed, intervention=intervening, clipped=bool(safe.clipped),
                            capped=bool(safe.capped), held=held, chunk_index=from_chunk)
                watchdog.feed()

                next_tick += cfg.period_s  # drift-free: the schedule, not the last wake-up, sets the next tick
                delay = next_tick - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                elif -delay > cfg.period_s:  # more than a step behind: start the schedule again from now, no burst
                    ep.counters["overruns"] += 1
                    next_tick = time.monotonic()
            return ep.finish("max_steps")
        finally:
            watchdog.close()
            requests.cancel()

    # ---- helpers -------------------------------------------------------------------------------------
    def _vector(self, action: Mapping[str, float]) -> np.ndarray:
        missing = [a for a in self.config.actions if a not in action]
        if missing:
            raise KeyError(f"no value for action features {missing} (got {sorted(action)})")
        return np.array([float(action[a]) for a in self.config.actions])

    def _stop_driver(self) -> None:
        with self._stop_lock:
            if not self.driver_stopped:
                self.driver_stopped = True
                how = stop_driver(self.driver)
                log.warning("robot %s stopped (%s)", self.config.id, how)

    def _watchdog_fired(self) -> None:
        self.envelope.estop(f"watchdog: the control loop was silent for {self.config.chunking.watchdog_s} s")
        self._stop_driver()

    def _interrupt(self, ep: EpisodeBuilder, reason: str) -> RobotEpisodeRecord:
        """Stop the robot and end the episode as interrupted (its outcome is not a label)."""
        self._stop_driver()
        return ep.finish(reason, interrupted=True)

    def _fault(self, ep: EpisodeBuilder, reason: str) -> RobotEpisodeRecord:
        """Latch a fault stop (the operator must look before the robot moves again), then interrupt with the
        first cause (a driver that refuses to move because the watchdog stopped it names the watchdog)."""
        return self._interrupt(ep, self.envelope.fault(reason).reason)
