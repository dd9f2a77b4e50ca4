"""Operator inputs (actors/robots/operator.py): a real terminal (a pty) for the keyboard, scripts, the key that clears a stop."""

from __future__ import annotations

import os
import termios
import threading
import time

import pytest

from actors.robots.config import load_robot_config
from actors.robots.operator import KEYMAP, KeyboardOperator, OperatorEvent, OperatorKey, ScriptedOperator, ScriptedTeleop
from actors.robots.safety import SafetyEnvelope

E = OperatorEvent


def test_the_keyboard_reads_single_keys_without_blocking_and_gives_the_terminal_back() -> None:
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        with KeyboardOperator(fd=slave) as keys:
            assert not termios.tcgetattr(slave)[3] & termios.ICANON  # cbreak: no waiting for Enter
            started = time.monotonic()
            assert keys.poll() == []  # nothing typed: returns at once
            assert time.monotonic() - started < 0.5
            os.write(master, b"s f")
            time.sleep(0.05)
            assert keys.poll() == [E.SUCCESS, E.INTERVENTION_START, E.FAILURE]
            os.write(master, b" Rnzxe")  # space ends the intervention; R as r; unknown keys are ignored
            time.sleep(0.05)
            assert keys.poll() == [E.INTERVENTION_END, E.RERECORD, E.RESET_DONE, E.ESTOP]
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_a_pedal_is_a_keyboard_with_its_own_keys() -> None:
    master, slave = os.openpty()
    try:
        with KeyboardOperator(fd=slave, keymap={"a": E.INTERVENTION_START, "b": E.SUCCESS}) as pedal:
            os.write(master, b"aab")
            time.sleep(0.05)
            assert pedal.poll() == [E.INTERVENTION_START, E.INTERVENTION_END, E.SUCCESS]
    finally:
        os.close(master)
        os.close(slave)
    r, w = os.pipe()
    with pytest.raises(OSError, match="is not a terminal"):
        KeyboardOperator(fd=r)
    os.close(r)
    os.close(w)
    assert set(KEYMAP.values()) == set(E) - {E.INTERVENTION_END}  # space toggles start/end


def test_only_an_input_that_holds_the_key_clears_a_stop() -> None:
    key = OperatorKey.create()
    envelope = SafetyEnvelope(load_robot_config("dummy_arm"), key)
    envelope.estop("test")
    keyless = ScriptedOperator(steps={0: E.CLEAR_ESTOP})
    assert keyless.poll() == [] and envelope.stopped is not None  # a clear it cannot perform is not reported
    station = ScriptedOperator(steps={0: [E.CLEAR_ESTOP, E.RESET_DONE]}, key=key, latch=envelope)
    assert station.poll() == [E.CLEAR_ESTOP, E.RESET_DONE] and envelope.stopped is None
    impostor = ScriptedOperator(steps={0: E.CLEAR_ESTOP}, key=OperatorKey.create(), latch=envelope)
    envelope.estop("again")
    with pytest.raises(PermissionError):
        impostor.poll()
    assert envelope.stopped is not None and envelope.stopped.reason == "again"


def test_scripted_events_by_step_by_time_and_pushed_from_another_thread() -> None:
    op = ScriptedOperator(steps={1: E.INTERVENTION_START, 3: [E.INTERVENTION_END, E.SUCCESS]}, seconds={0.1: E.RESET_DONE})
    assert op.poll() == [] and op.poll() == [E.INTERVENTION_START] and op.poll() == []
    assert op.poll() == [E.INTERVENTION_END, E.SUCCESS]
    time.sleep(0.15)
    threading.Thread(target=op.push, args=(E.ESTOP,)).start()
    time.sleep(0.05)
    assert op.poll() == [E.RESET_DONE, E.ESTOP] and op.poll() == []


def test_scripted_teleop_repeats_its_last_action() -> None:
    teleop = ScriptedTeleop([{"a": 1.0}, {"a": 2.0}])
    assert [teleop.get_action()["a"] for _ in range(4)] == [1.0, 2.0, 2.0, 2.0] and teleop.calls == 4
    with pytest.raises(ValueError):
        ScriptedTeleop([])
