"""The control loop (actors/robots/control.py) with the dummy arm, real threads and real timing (no mocks).

Time scales are small (50 Hz, hold_s 0.2 s) and assertions leave wide margins, so each episode
takes well under a second and a loaded two-core machine does not make them flaky. Chunk sources
are plain functions run on the loop's own request thread.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from actors.robots.config import RobotConfig, robot_config_from_dict
from actors.robots.control import Chunk, ControlLoop, ResetTimeout, RobotObservation
from actors.robots.driver import make_driver
from actors.robots.dummy import DummyArm
from actors.robots.operator import OperatorEvent, OperatorKey, ScriptedOperator, ScriptedTeleop
from actors.robots.safety import RobotStopped, SafetyEnvelope, StopKind

E = OperatorEvent
DUMMY = Path(__file__).resolve().parent.parent / "configs" / "robot" / "dummy_arm.yaml"
K = 8


class Robot:
    """The dummy arm under a 50 Hz test config, its envelope and operator key."""

    def __init__(self, fault: int = 10, **chunking: float) -> None:
        data = yaml.safe_load(DUMMY.read_text())
        data.update(id="test-arm", control_hz=50, image_size=[16, 16], fault={"max_clipped_in_a_row": fault})
        data["driver"]["kwargs"]["image_size"] = [12, 16]
        data["chunking"] = {"request_threshold": 0.5, "deadline_s": 2.0, "stale_s": 1.0, "hold_s": 0.2, "watchdog_s": 1.0} | chunking
        self.config: RobotConfig = robot_config_from_dict(data)
        self.arm: DummyArm = make_driver(self.config.driver.target, self.config.driver.kwargs)  # type: ignore[assignment]
        self.arm.connect()
        self.key = OperatorKey.create()
        self.envelope = SafetyEnvelope(self.config, self.key)

    def loop(self, operator: object, infer: object, teleop: object = None) -> ControlLoop:
        return ControlLoop(self.arm, self.config, self.envelope, operator, infer, teleop)  # type: ignore[arg-type]


class Policy:
    """A chunk source: K actions nudging the wrist from the observed pose; remembers what it sent."""

    def __init__(self, delay: float = 0.0, version: int = 7) -> None:
        self.delay, self.version, self.sent, self.calls = delay, version, {}, 0

    def __call__(self, obs: RobotObservation) -> Chunk:
        self.calls += 1
        time.sleep(self.delay)
        actions = np.repeat(obs.proprio[None, :5].astype(np.float64), K, axis=0)
        actions[:, 3] += 0.005 * np.arange(1, K + 1)
        self.sent[obs.timestamp] = actions
        return Chunk(actions=actions, observed_at=obs.timestamp, value=0.5, versions={"policy": self.version})


def test_an_episode_ends_with_the_operator_label_and_records_what_it_did() -> None:
    robot, policy = Robot(), Policy(delay=0.03)
    rec = robot.loop(ScriptedOperator(steps={40: E.SUCCESS}), policy).run("lift the cube", max_steps=500)
    assert (rec.success, rec.interrupted, rec.reason, rec.rerecord, rec.steps) == (True, False, "success", False, 40)
    assert rec.images["primary"].shape == (40, 16, 16, 3) and rec.proprio.shape == (40, 8) and rec.actions.shape == (40, 5)
    assert robot.arm.send_count == 40 and rec.versions() == [{"policy": 7}] and rec.events == [(40, "success")]
    assert rec.held[0] and rec.counters["held_steps"] < 20  # it held only until the first chunk came
    assert rec.counters["late_chunks"] == rec.counters["stale_chunks"] == rec.counters["failed_requests"] == 0
    # each chunk's first actions were for steps already executed since its observation: skipped
    for i, chunk in enumerate(rec.chunks):
        assert chunk["skipped"] >= 1 and chunk["versions"] == {"policy": 7}
        first = int(np.flatnonzero(rec.chunk_index == i)[0])
        assert np.allclose(rec.proposed[first], policy.sent[chunk["observed_at"]][chunk["skipped"]])
    assert np.allclose(rec.actions, rec.proposed, atol=1e-6)  # nothing needed correcting
    timing = rec.timing()
    assert 0.015 < timing["mean_period_s"] < 0.04  # 50 Hz, with a wide margin for a loaded machine


def test_max_steps_ends_an_unlabelled_episode() -> None:
    robot = Robot()
    rec = robot.loop(ScriptedOperator(), Policy()).run("", max_steps=25)
    assert (rec.success, rec.interrupted, rec.reason, rec.steps) == (None, False, "max_steps", 25)
    assert not robot.arm.stopped


def test_a_late_chunk_makes_the_robot_hold_then_stop_and_the_episode_is_interrupted() -> None:
    robot, release, answered = Robot(hold_s=0.2), threading.Event(), []

    def first_then_hang(obs: RobotObservation) -> Chunk:
        if answered:
            release.wait(10)
        answered.append(1)
        return Policy()(obs)

    loop = robot.loop(ScriptedOperator(), first_then_hang)
    try:
        rec = loop.run("", max_steps=500)
    finally:
        release.set()
    assert rec.interrupted and rec.success is None and rec.reason.startswith("late chunk: nothing to execute")
    assert robot.arm.stopped and robot.arm.send_count == rec.steps  # nothing was sent after the stop
    assert robot.envelope.stopped is None  # a late chunk is not a fault: no operator clear needed
    tail = np.flatnonzero(rec.held)
    assert 4 <= rec.counters["held_steps"] <= 60 and rec.held[-1]
    assert np.allclose(rec.actions[tail[-4:]], rec.actions[tail[-1]])  # the hold keeps one pose
    loop.operator = ScriptedOperator(steps={0: E.RESET_DONE})
    loop.reset(timeout_s=5)  # the operator's reset re-enables the stopped arm
    assert not robot.arm.stopped and robot.arm.is_connected


def test_a_request_past_its_deadline_is_abandoned_and_asked_again() -> None:
    robot, release, policy = Robot(deadline_s=0.1, hold_s=0.8), threading.Event(), Policy()

    def hang_first(obs: RobotObservation) -> Chunk:
        if policy.calls == 0:
            policy.calls += 1
            release.wait(10)  # LeRobot #3979: a first call that never returns
        return policy(obs)

    try:
        rec = robot.loop(ScriptedOperator(steps={40: E.SUCCESS}), hang_first).run("", max_steps=500)
    finally:
        release.set()
    assert rec.success and rec.counters["late_chunks"] == 1 and len(rec.chunks) >= 1
    assert "no chunk within deadline_s 0.1 s" in rec.notes[0]


def test_a_stale_chunk_is_dropped() -> None:
    robot, policy = Robot(), Policy()

    def stale_first(obs: RobotObservation) -> Chunk:
        chunk = policy(obs)
        if policy.calls == 1:
            chunk.observed_at -= 5.0  # computed from an observation 5 s old (stale_s 1.0)
        return chunk

    rec = robot.loop(ScriptedOperator(steps={30: E.SUCCESS}), stale_first).run("", max_steps=500)
    assert rec.success and rec.counters["stale_chunks"] == 1 and policy.calls >= 2
    assert all(c["observed_at"] in policy.sent for c in rec.chunks)  # only fresh chunks were acted on


def test_a_chunk_whose_actions_are_all_in_the_past_is_dropped() -> None:
    robot = Robot(hold_s=0.8)
    slow = Policy(delay=0.4)  # 20 steps at 50 Hz: longer than the chunk (8), younger than stale_s
    rec = robot.loop(ScriptedOperator(), lambda obs: Chunk(slow(obs).actions[:4], obs.timestamp)).run("", max_steps=500)
    assert rec.interrupted and rec.reason.startswith("late chunk") and rec.counters["stale_chunks"] >= 1
    assert not rec.chunks and np.all(rec.held)


def test_intervention_steps_run_the_teleop_and_record_its_action() -> None:
    robot = Robot()
    pose = {f"{j}.pos": float(v) for j, v in zip(("base", "shoulder", "elbow", "wrist", "gripper"), robot.arm.position)}
    teleop = ScriptedTeleop([pose | {"gripper.pos": 0.6}])
    operator = ScriptedOperator(steps={10: E.INTERVENTION_START, 25: E.INTERVENTION_END, 45: E.SUCCESS})
    rec = robot.loop(operator, Policy(), teleop).run("", max_steps=500)
    assert rec.success and rec.steps == 45
    assert np.flatnonzero(rec.intervention).tolist() == list(range(10, 25)) and teleop.calls == 15
    assert np.allclose(rec.actions[10:25], list(teleop.actions[0].values()), atol=1e-6)
    assert np.all(rec.chunk_index[10:25] == -1) and np.any(rec.chunk_index[25:] >= 0)  # the policy took over again
    assert rec.counters["intervention_steps"] == 15


def test_an_intervention_without_a_teleop_is_ignored_and_noted() -> None:
    robot = Robot()
    rec = robot.loop(ScriptedOperator(steps={5: E.INTERVENTION_START, 20: E.SUCCESS}), Policy()).run("", max_steps=500)
    assert rec.success and not rec.intervention.any() and "no teleop" in rec.notes[0]


def test_rerecord_ends_the_episode_marked_for_discarding() -> None:
    robot = Robot()
    rec = robot.loop(ScriptedOperator(steps={15: E.RERECORD}), Policy()).run("", max_steps=500)
    assert (rec.rerecord, rec.success, rec.interrupted, rec.reason, rec.steps) == (True, None, False, "rerecord", 15)


def test_an_estop_latches_until_the_operator_clears_it() -> None:
    robot = Robot()
    loop = robot.loop(ScriptedOperator(steps={20: E.ESTOP}), Policy())
    rec = loop.run("", max_steps=500)
    assert rec.interrupted and rec.success is None and "emergency stop" in rec.reason
    assert robot.arm.send_count == 20 and robot.arm.stopped and robot.envelope.stopped.kind is StopKind.ESTOP
    with pytest.raises(RobotStopped, match="only the operator can clear it"):
        loop.run("", max_steps=10)
    loop.operator = ScriptedOperator(steps={0: [E.RESET_DONE, E.CLEAR_ESTOP]})  # no key: the clear is not the operator's
    with pytest.raises(ResetTimeout, match=r"robot test-arm is still stopped \(estop: operator: emergency stop\)"):
        loop.reset(timeout_s=0.3)
    loop.operator = ScriptedOperator(steps={0: [E.CLEAR_ESTOP, E.RESET_DONE]}, key=robot.key, latch=robot.envelope)
    loop.reset(timeout_s=5)
    assert robot.envelope.stopped is None and not robot.arm.stopped
    assert loop.run("", max_steps=10).reason == "max_steps"


def test_a_non_finite_chunk_latches_a_fault_and_stops_the_arm() -> None:
    robot, policy = Robot(), Policy()

    def nan_elbow(obs: RobotObservation) -> Chunk:
        chunk = policy(obs)
        chunk.actions[:, 2] = np.nan
        return chunk

    rec = robot.loop(ScriptedOperator(), nan_elbow).run("", max_steps=500)
    assert rec.interrupted and "action[2] (elbow.pos) is nan" in rec.reason
    assert robot.envelope.stopped.kind is StopKind.FAULT and robot.arm.stopped
    assert robot.arm.send_count == rec.steps and np.all(rec.held)  # only holds went out before the fault


def test_too_many_clipped_steps_in_a_row_latch_a_fault() -> None:
    robot, policy = Robot(fault=5), Policy()

    def gripper_beyond(obs: RobotObservation) -> Chunk:
        chunk = policy(obs)
        chunk.actions[:, 4] = 1.1  # past the gripper's high limit (1.0), within one step of it
        return chunk

    rec = robot.loop(ScriptedOperator(), gripper_beyond).run("", max_steps=500)
    assert rec.interrupted and "6 steps in a row clipped" in rec.reason and "gripper.pos" in rec.reason
    assert rec.counters["clipped_steps"] == 5 and np.all(rec.actions[rec.clipped][:, 4] <= 1.0)
    assert robot.envelope.stopped.kind is StopKind.FAULT


def test_failing_requests_count_as_no_chunk() -> None:
    robot = Robot()

    def broken(obs: RobotObservation) -> Chunk:
        raise RuntimeError("no policy")

    rec = robot.loop(ScriptedOperator(), broken).run("", max_steps=500)
    assert rec.interrupted and rec.reason.startswith("late chunk") and rec.counters["failed_requests"] >= 1
    assert "infer failed: RuntimeError: no policy" in rec.notes[0]


class BlockingOperator(ScriptedOperator):
    """A fake input device that blocks once (a misbehaving driver): the loop falls silent."""

    def poll(self) -> list[OperatorEvent]:
        if self.polls == 10:
            time.sleep(1.5)
        return super().poll()


def test_the_watchdog_stops_the_arm_when_the_loop_falls_silent() -> None:
    robot = Robot(watchdog_s=0.3)
    rec = robot.loop(BlockingOperator(), Policy()).run("", max_steps=500)
    assert rec.interrupted and rec.reason.startswith("watchdog: the control loop was silent")
    assert robot.arm.stopped and robot.arm.stop_count == 1 and robot.arm.send_count == 10
    assert robot.envelope.stopped.kind is StopKind.ESTOP


def test_reset_waits_for_the_operator_and_times_out_with_a_clear_error() -> None:
    robot = Robot()
    loop = robot.loop(ScriptedOperator(seconds={0.3: E.RESET_DONE}), Policy())
    started = time.monotonic()
    loop.reset(timeout_s=5)
    assert time.monotonic() - started >= 0.25
    loop.operator = ScriptedOperator()
    with pytest.raises(ResetTimeout, match=r"no RESET_DONE from the operator of robot test-arm within 0.3 s"):
        loop.reset(timeout_s=0.3)
