"""The safety envelope and the watchdog (actors/robots/safety.py): properties over random configs, the latch, faults.

Real components: the envelope and DummyArm (the dummy mode), real threads for the watchdog.
"""

from __future__ import annotations

import copy
import pickle
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.robots.config import RobotConfig, load_robot_config, robot_config_from_dict
from actors.robots.dummy import DummyArm, Stopped
from actors.robots.operator import OperatorKey
from actors.robots.safety import RobotStopped, SafetyEnvelope, StopKind, UnsafeAction, Watchdog

SETTINGS = settings(max_examples=150, deadline=None)


def config(low: list[float], high: list[float], step: list[float], in_a_row: int = 1000, workspace: dict | None = None) -> RobotConfig:
    names = [f"j{i}.pos" for i in range(len(low))]
    data = {
        "id": "prop", "driver": {"target": "actors.robots.dummy:DummyArm"}, "cameras": {"primary": "front"},
        "proprio": names + ["ee.x", "ee.y", "ee.z"], "actions": names, "control_hz": 50, "image_size": [8, 8],
        "limits": {n: {"low": lo, "high": hi} for n, lo, hi in zip(names, low, high)},
        "max_step": dict(zip(names, step)), "fault": {"max_clipped_in_a_row": in_a_row},
    }
    if workspace:
        data["workspace"] = workspace
    return robot_config_from_dict(data)


@st.composite
def envelope_case(draw: st.DrawFn) -> tuple[RobotConfig, np.ndarray, np.ndarray]:
    d = draw(st.integers(1, 6))
    finite = st.floats(-10, 10, allow_nan=False)
    low = [draw(finite) for _ in range(d)]
    high = [lo + draw(st.floats(1e-3, 10)) for lo in low]
    step = [draw(st.floats(1e-3, 2)) for _ in range(d)]
    # measured: anywhere within the limits widened by less than one step (further out is a fault: tested below)
    measured = np.array([draw(st.floats(lo - 0.99 * s, hi + 0.99 * s)) for lo, hi, s in zip(low, high, step)])
    action = np.array([draw(st.floats(-1e6, 1e6, allow_nan=False)) for _ in range(d)])
    return config(low, high, step), action, measured


@SETTINGS
@given(envelope_case())
def test_outputs_stay_within_limits_and_the_step_cap(case: tuple[RobotConfig, np.ndarray, np.ndarray]) -> None:
    cfg, action, measured = case
    env = SafetyEnvelope(cfg, OperatorKey.create())
    out = env.check(action, measured).action
    low, high = env.low, env.high
    assert np.all(out >= low) and np.all(out <= high)
    assert np.all(np.abs(out - measured) <= env.max_step * (1 + 1e-12) + 1e-12)
    # (the step bound as the envelope computes it: |a - m| <= s can round true where a < m - s holds)
    inside = (action >= np.maximum(low, measured - env.max_step)) & (action <= np.minimum(high, measured + env.max_step))
    assert np.array_equal(out[inside], action[inside])  # what is already safe passes unchanged


@SETTINGS
@given(envelope_case(), st.data())
def test_non_finite_actions_are_refused_and_latch_a_fault(case: tuple[RobotConfig, np.ndarray, np.ndarray], data: st.DataObject) -> None:
    cfg, action, measured = case
    env = SafetyEnvelope(cfg, OperatorKey.create())
    i = data.draw(st.integers(0, len(action) - 1))
    action[i] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    with pytest.raises(UnsafeAction, match=rf"action\[{i}\] \(j{i}\.pos\) is (nan|inf|-inf)"):
        env.check(action, measured)
    assert env.stopped is not None and env.stopped.kind is StopKind.FAULT
    with pytest.raises(RobotStopped):
        env.check(measured, measured)  # even a safe action: latched


OPS = st.lists(st.sampled_from(["estop", "check", "clear_wrong", "clear_right"]), min_size=1, max_size=30)


@SETTINGS
@given(OPS, st.sampled_from(["another key", "a string", "None", "a copy"]))
def test_once_stopped_nothing_passes_until_the_operator_key_clears_it(ops: list[str], wrong: str) -> None:
    key = OperatorKey.create()
    env = SafetyEnvelope(config([-1.0, -1.0], [1.0, 1.0], [0.5, 0.5]), key)
    impostor = {"another key": OperatorKey.create(), "a string": repr(key), "None": None, "a copy": object()}[wrong]
    latched = False
    for op in ops:
        if op == "estop":
            env.estop("test")
            latched = True
        elif op == "clear_wrong":
            with pytest.raises(PermissionError, match="only the operator's key"):
                env.clear(impostor)  # type: ignore[arg-type]
        elif op == "clear_right":
            env.clear(key)
            latched = False
        elif latched:
            with pytest.raises(RobotStopped, match="only the operator can clear it"):
                env.check(np.zeros(2), np.zeros(2))
        else:
            assert np.array_equal(env.check(np.zeros(2), np.zeros(2)).action, np.zeros(2))
        assert (env.stopped is not None) == latched


def test_the_operator_key_cannot_be_forged_or_shipped() -> None:
    key = OperatorKey.create()
    with pytest.raises(TypeError, match="OperatorKey.create"):
        OperatorKey()
    with pytest.raises(TypeError, match="does not leave the operator's process"):
        pickle.dumps(key)
    assert copy.deepcopy(key) is key  # a copy is the same capability, never a second one
    with pytest.raises(TypeError, match="expected the OperatorKey"):
        SafetyEnvelope(load_robot_config("dummy_arm"), "secret")  # type: ignore[arg-type]


def test_a_fault_stop_latches_after_max_clipped_in_a_row() -> None:
    env = SafetyEnvelope(config([-1.0], [1.0], [5.0], in_a_row=3), OperatorKey.create())
    for _ in range(2):  # a correct step between clipped ones resets the count
        assert env.check(np.array([2.0]), np.zeros(1)).clipped == (0,)
    env.check(np.array([0.5]), np.zeros(1))
    for _ in range(3):
        assert env.check(np.array([-7.0]), np.zeros(1)).action[0] == -1.0
    with pytest.raises(UnsafeAction, match=r"4 steps in a row clipped .*max_clipped_in_a_row 3.*'j0.pos'"):
        env.check(np.array([-7.0]), np.zeros(1))
    assert env.counters["clipped_steps"] == 5 and env.counters["faults"] == 1


def test_wrong_shape_and_far_out_measurements_are_faults() -> None:
    env = SafetyEnvelope(config([-1.0, -1.0], [1.0, 1.0], [0.1, 0.1]), OperatorKey.create())
    with pytest.raises(UnsafeAction, match=r"action: expected shape \(2,\), got \(3,\)"):
        env.check(np.zeros(3), np.zeros(2))
    env = SafetyEnvelope(config([-1.0, -1.0], [1.0, 1.0], [0.1, 0.1]), OperatorKey.create())
    with pytest.raises(UnsafeAction, match=r"measured\[1\] \(j1.pos\)=1.5 is more than max_step 0.1 outside its limits"):
        env.check(np.zeros(2), np.array([0.0, 1.5]))
    env = SafetyEnvelope(config([-1.0, -1.0], [1.0, 1.0], [0.1, 0.1]), OperatorKey.create())
    with pytest.raises(UnsafeAction, match=r"measured\[0\] \(j0.pos\) is nan"):
        env.check(np.zeros(2), np.array([np.nan, 0.0]))


def test_the_workspace_box_clips_actions_and_refuses_a_measured_position_outside_it() -> None:
    # end-effector control: the box's features are actions, so it tightens their limits
    ws = {"features": ["ee.z"], "low": [0.1], "high": [0.5]}
    cfg = robot_config_from_dict({
        "id": "ee", "driver": {"target": "x.y:Z"}, "cameras": {"primary": "front"}, "proprio": ["ee.x", "ee.z"],
        "actions": ["ee.x", "ee.z"], "control_hz": 50, "image_size": [8, 8],
        "limits": {"ee.x": {"low": -1, "high": 1}, "ee.z": {"low": -1, "high": 1}}, "max_step": {"ee.x": 1, "ee.z": 1}, "workspace": ws,
    })
    safe = SafetyEnvelope(cfg, OperatorKey.create()).check(np.array([0.2, -0.5]), np.array([0.0, 0.2]))
    assert safe.action.tolist() == [0.2, 0.1] and safe.clipped == (1,)
    # joint control: the box is on measured features only; outside it is a fault
    box = {"features": ["ee.x", "ee.y", "ee.z"], "low": [-1, -1, 0], "high": [1, 1, 1]}
    env = SafetyEnvelope(config([-1.0], [1.0], [0.1], workspace=box), OperatorKey.create())
    assert env.position_features == ("ee.x", "ee.y", "ee.z")
    env.check(np.zeros(1), np.zeros(1), position=np.array([0.3, 0.0, 0.2]))
    with pytest.raises(UnsafeAction, match=r"workspace: measured ee.z=-0.05 is outside \[0, 1\]"):
        env.check(np.zeros(1), np.zeros(1), position=np.array([0.3, 0.0, -0.05]))


def test_the_watchdog_stops_the_dummy_arm_when_no_longer_fed() -> None:
    arm = DummyArm()
    arm.connect()
    with Watchdog(0.2, arm.safe_stop) as dog:
        for _ in range(25):  # fed every 20 ms for half a second: never fires
            arm.send_action({"base.pos": 2.5})
            dog.feed()
            time.sleep(0.02)
        assert not dog.fired and not arm.stopped
        deadline = time.monotonic() + 5.0  # silent now: it must fire (generously bounded on a loaded machine)
        while not dog.fired and time.monotonic() < deadline:
            time.sleep(0.01)
    assert dog.fired and arm.stopped and arm.stop_count == 1
    held = arm.position.copy()
    with pytest.raises(Stopped, match="connect\\(\\) again"):
        arm.send_action({"base.pos": 2.5})
    assert np.array_equal(arm.position, held)
    arm.connect()  # the operator re-enables it
    arm.send_action({"base.pos": 2.5})
    assert arm.position[0] > held[0]


def test_a_closed_watchdog_never_fires() -> None:
    fired = []
    dog = Watchdog(0.5, lambda: fired.append(1)).start()
    dog.close()
    time.sleep(0.8)
    assert not fired and not dog.fired
