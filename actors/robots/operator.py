"""The human beside the robot: labels, interventions, resets, the emergency stop, and the key that clears it.

An ``OperatorInput`` is polled once per control step and never blocks. Events are LeRobot HIL-SERL's
(success, failure, re-record, intervention) plus reset-done and the emergency stop. The
``OperatorKey`` is a capability: whoever holds the object may clear a latched stop. It is made
once, handed to the ``SafetyEnvelope`` and to the operator's input device, and to nothing else; it
refuses to be pickled, so it cannot travel to the job through Ray or a gateway. An input that holds
the key clears the envelope itself when its clear key is pressed: the control loop never holds it.
"""

from __future__ import annotations

import os
import secrets
import select
import sys
import termios
import threading
import time
import tty
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Protocol


class OperatorEvent(StrEnum):
    SUCCESS = "success"  # the task is done: end the episode, labelled a success
    FAILURE = "failure"  # the task failed: end the episode, labelled a failure
    RERECORD = "rerecord"  # discard this episode (the caller does not insert it)
    INTERVENTION_START = "intervention_start"  # the teleop takes over from the policy
    INTERVENTION_END = "intervention_end"  # back to the policy
    RESET_DONE = "reset_done"  # the scene is reset: the next episode may start
    ESTOP = "estop"  # emergency stop: latched until the operator clears it
    CLEAR_ESTOP = "clear_estop"  # the operator cleared a latched stop (reported after clearing it)


class OperatorKey:
    """The capability to clear a latched stop; equal only to itself, never pickled or copied."""

    __slots__ = ("_token",)
    _MINT = object()

    def __init__(self, _mint: object = None) -> None:
        if _mint is not OperatorKey._MINT:
            raise TypeError("OperatorKey: make one with OperatorKey.create() at the operator's station")
        self._token = secrets.token_hex(4)  # for logs only: identity is what the envelope checks

    @classmethod
    def create(cls) -> OperatorKey:
        return cls(cls._MINT)

    def __reduce__(self) -> None:  # type: ignore[override]
        raise TypeError("OperatorKey: the operator's key does not leave the operator's process")

    def __copy__(self) -> OperatorKey:
        return self

    def __deepcopy__(self, memo: dict) -> OperatorKey:
        return self

    def __repr__(self) -> str:
        return f"OperatorKey({self._token})"


class Latch(Protocol):
    """What an operator input needs of the safety envelope (``SafetyEnvelope`` is one)."""

    def estop(self, reason: str) -> None: ...
    def clear(self, key: OperatorKey) -> None: ...


class OperatorInput(Protocol):
    """``poll()``: the events since the last poll, oldest first; returns at once."""

    def poll(self) -> list[OperatorEvent]: ...


class Teleop(Protocol):
    """A human's device that gives actions (LeRobot's teleoperators): feature name -> value."""

    def get_action(self) -> dict[str, float]: ...


def _clearing(events: list[OperatorEvent], key: OperatorKey | None, latch: Latch | None) -> list[OperatorEvent]:
    """Clear the latch with the held key on CLEAR_ESTOP; a clear this input cannot perform is not reported."""
    out = []
    for event in events:
        if event is OperatorEvent.CLEAR_ESTOP:
            if key is None or latch is None:
                continue
            latch.clear(key)
        out.append(event)
    return out


class ScriptedOperator:
    """Events at given control steps (counted in polls: the control loop polls once a step) or seconds
    after the first poll, plus ``push`` from any thread; for tests, replays and remote consoles."""

    def __init__(self, steps: Mapping[int, OperatorEvent | Sequence[OperatorEvent]] | None = None,
                 seconds: Mapping[float, OperatorEvent | Sequence[OperatorEvent]] | None = None,
                 key: OperatorKey | None = None, latch: Latch | None = None) -> None:
        def events(v: OperatorEvent | Sequence[OperatorEvent]) -> list[OperatorEvent]:
            return [OperatorEvent(v)] if isinstance(v, str) else [OperatorEvent(e) for e in v]

        self._steps = {int(k): events(v) for k, v in (steps or {}).items()}
        self._seconds = sorted((float(k), events(v)) for k, v in (seconds or {}).items())
        self._key, self._latch = key, latch
        self._pushed: list[OperatorEvent] = []
        self._lock = threading.Lock()
        self.polls = 0
        self._started: float | None = None

    def push(self, *events: OperatorEvent) -> None:
        with self._lock:
            self._pushed += [OperatorEvent(e) for e in events]

    def poll(self) -> list[OperatorEvent]:
        now = time.monotonic()
        if self._started is None:
            self._started = now
        out = list(self._steps.pop(self.polls, []))
        while self._seconds and self._seconds[0][0] <= now - self._started:
            out += self._seconds.pop(0)[1]
        with self._lock:
            out, self._pushed = out + self._pushed, []
        self.polls += 1
        return _clearing(out, self._key, self._latch)


KEYMAP: dict[str, OperatorEvent] = {
    "s": OperatorEvent.SUCCESS,
    "f": OperatorEvent.FAILURE,
    "r": OperatorEvent.RERECORD,
    " ": OperatorEvent.INTERVENTION_START,  # space toggles: start, then end (LeRobot's intervention key)
    "n": OperatorEvent.RESET_DONE,  # next: the scene is reset
    "e": OperatorEvent.ESTOP,
    "c": OperatorEvent.CLEAR_ESTOP,
}


class KeyboardOperator:
    """Single keys from a terminal in cbreak mode, read without blocking (a foot pedal that types keys works the same).

    Keys (``KEYMAP``; pass ``keymap`` to change them, e.g. for a pedal's keys): ``s`` success,
    ``f`` failure, ``r`` re-record, space starts and then ends an intervention, ``n`` reset done,
    ``e`` emergency stop, ``c`` clear the stop (only when built with the operator's key). A keyboard
    stop is a convenience, not a safety device: a real robot keeps its hardware stop button.
    """

    def __init__(self, fd: int | None = None, keymap: Mapping[str, OperatorEvent] | None = None,
                 key: OperatorKey | None = None, latch: Latch | None = None) -> None:
        self.fd = sys.stdin.fileno() if fd is None else fd
        if not os.isatty(self.fd):
            raise OSError(f"KeyboardOperator: file descriptor {self.fd} is not a terminal (run it in one, or use ScriptedOperator)")
        self.keymap = {k: OperatorEvent(v) for k, v in (keymap or KEYMAP).items()}
        self._key, self._latch = key, latch
        self._intervening = False
        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)  # keys arrive one by one, unechoed; Ctrl-C still interrupts

    def poll(self) -> list[OperatorEvent]:
        out = []
        for _ in range(16):  # bounded: a stuck key or a flood of input cannot hold the control loop here
            if not select.select([self.fd], [], [], 0)[0]:
                break
            data = os.read(self.fd, 64).decode(errors="replace")
            if not data:
                break
            for char in data:
                event = self.keymap.get(char) or self.keymap.get(char.lower())
                if event in (OperatorEvent.INTERVENTION_START, OperatorEvent.INTERVENTION_END):
                    event = OperatorEvent.INTERVENTION_END if self._intervening else OperatorEvent.INTERVENTION_START
                    self._intervening = not self._intervening
                if event is not None:
                    out.append(event)
        return _clearing(out, self._key, self._latch)

    def close(self) -> None:
        """Give the terminal back as it was."""
        termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def __enter__(self) -> KeyboardOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ScriptedTeleop:
    """A teleop whose actions are given in advance: one per call, the last repeated once they run out."""

    def __init__(self, actions: Sequence[Mapping[str, float]]) -> None:
        if not actions:
            raise ValueError("ScriptedTeleop: expected at least one action")
        self.actions = [dict(a) for a in actions]
        self.calls = 0

    def get_action(self) -> dict[str, float]:
        action = self.actions[min(self.calls, len(self.actions) - 1)]
        self.calls += 1
        return dict(action)
