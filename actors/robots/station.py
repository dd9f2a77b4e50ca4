"""A robot's station: its driver, safety envelope, operator and control loop, in the process nearest the hardware.

Both ways of attaching a robot to a job run one: the ``RobotActor`` (in the Ray cluster, on the robot's
host) and the gateway's thin client (``remote.py``, on a robot outside the cluster). A station plays
one episode at a time (the operator's reset, then the control loop) and says what the episode is to
replay: its label, whether it may be learned from, and its facts as plain scalars (so they travel
through the gateway as they are). Thin like the rest of the robot side: standard library and numpy.

Labels. The operator's success or failure is the label. An episode that reaches ``max_steps`` with no
label is a failure (as a simulator's episode that hits its step limit, and HIL-SERL's time limit). An
interrupted episode (a late chunk, a stop, a fault, the robot leaving) has no label and a re-recorded
one was discarded by the operator: neither goes to replay.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from actors.robots.chunks import Infer
from actors.robots.config import RobotConfig, RobotConfigError
from actors.robots.control import ControlLoop, ResetCancelled
from actors.robots.driver import make_driver, stop_driver
from actors.robots.operator import KeyboardOperator, OperatorEvent, OperatorKey, ScriptedOperator, ScriptedTeleop
from actors.robots.record import RobotEpisodeRecord
from actors.robots.safety import SafetyEnvelope

OPERATORS = ("scripted", "keyboard")


@dataclass(frozen=True)
class OperatorSpec:
    """Who labels, resets and stops the robot: a script (tests, dry runs) or a person at a keyboard or pedal."""

    kind: str = "keyboard"
    """scripted: ``script`` plays in every episode and resets are done at once; keyboard: a person's keys (README)."""
    script: dict[int, tuple[str, ...]] = field(default_factory=dict)
    """scripted: operator events at control steps of every episode, step -> events (success, failure, rerecord...)."""
    teleop: tuple[dict[str, float], ...] = ()
    """scripted: the teleop's actions during interventions (``ScriptedTeleop``), from the first again each episode."""
    tty: str | None = None
    """keyboard: the terminal to read keys from (a path such as /dev/pts/3 on the robot's host; None: this process's)."""

    @classmethod
    def parse(cls, value: Any, where: str = "operator") -> OperatorSpec:
        """From ``"scripted"`` / ``"keyboard"``, a mapping with these fields, or an ``OperatorSpec``."""
        if isinstance(value, OperatorSpec):
            return value
        if isinstance(value, str):
            value = {"kind": value}
        if not isinstance(value, Mapping):
            raise RobotConfigError(f"{where}: expected 'scripted', 'keyboard' or a mapping, got {type(value).__name__}")
        unknown = sorted(set(value) - {"kind", "script", "teleop", "tty"})
        if unknown:
            raise RobotConfigError(f"{where}.{unknown[0]}: unknown key (known: kind, script, teleop, tty)")
        kind = value.get("kind", "keyboard")
        if kind not in OPERATORS:
            raise RobotConfigError(f"{where}.kind: expected one of {list(OPERATORS)}, got {kind!r}")
        script = parse_script(value.get("script") or {}, f"{where}.script")
        teleop = value.get("teleop") or ()
        if not isinstance(teleop, (list, tuple)) or not all(isinstance(a, Mapping) for a in teleop):
            raise RobotConfigError(f"{where}.teleop: expected a list of actions (feature -> value)")
        tty = value.get("tty")
        if tty is not None and (not isinstance(tty, str) or not tty):
            raise RobotConfigError(f"{where}.tty: expected a terminal's path (e.g. /dev/pts/3), got {tty!r}")
        if kind == "scripted" and tty is not None:
            raise RobotConfigError(f"{where}.tty: only a keyboard operator reads a terminal")
        if kind == "keyboard" and (script or teleop):
            raise RobotConfigError(f"{where}.script: only a scripted operator plays a script (the keyboard's person labels)")
        return cls(kind, script, tuple({str(k): float(v) for k, v in a.items()} for a in teleop), tty)


def parse_script(script: Any, where: str = "script") -> dict[int, tuple[str, ...]]:
    """{control step: event or [events]} with steps as integers or digit strings; events named as ``OperatorEvent``."""
    if not isinstance(script, Mapping):
        raise RobotConfigError(f"{where}: expected a mapping of control step -> event, got {type(script).__name__}")
    out: dict[int, tuple[str, ...]] = {}
    names = [e.value for e in OperatorEvent if e is not OperatorEvent.RESET_DONE]
    for key, events in script.items():
        try:
            step = int(key)
        except (TypeError, ValueError):
            step = -1
        if isinstance(key, bool) or step < 0 or str(step) != str(key).strip():
            raise RobotConfigError(f"{where}: expected control steps (integers >= 0) as keys, got {key!r}")
        listed = [events] if isinstance(events, str) else events
        if not isinstance(listed, (list, tuple)) or not all(e in names for e in listed):
            raise RobotConfigError(f"{where}.{step}: expected an event or a list of events of {names}, got {events!r}")
        out[step] = tuple(listed)
    return out


class RobotStation:
    """One robot in the process nearest its hardware: driver (connected here), envelope, operator key, loop.

    ``infer`` is the chunk source (``ControlLoop``'s). ``play`` runs one episode; ``leave`` from any
    thread ends the one running (the robot stops, the episode is interrupted) and calls off a reset;
    ``close`` stops and disconnects the driver.
    """

    def __init__(self, config: RobotConfig, operator: OperatorSpec, infer: Infer) -> None:
        self.config, self.operator = config, operator
        self.driver = make_driver(config.driver.target, config.driver.kwargs)
        self.key = OperatorKey.create()  # made here, held here: it never leaves the robot's process
        self.envelope = SafetyEnvelope(config, self.key)
        self.keyboard: KeyboardOperator | None = None
        if operator.kind == "keyboard":
            fd = os.open(operator.tty, os.O_RDWR | os.O_NOCTTY) if operator.tty else None
            self.keyboard = KeyboardOperator(fd, key=self.key, latch=self.envelope)
        self.loop = ControlLoop(self.driver, config, self.envelope, self.keyboard or ScriptedOperator(), infer)
        self.driver.connect(calibrate=True)
        self.leaving = threading.Event()
        self.episodes = 0

    def play(self, instruction: str, max_steps: int, reset_timeout_s: float) -> RobotEpisodeRecord:
        """The operator's reset (a script's at once), then one episode. Raises ``ResetTimeout`` (no reset in time, or
        a stop still latched), ``ResetCancelled`` (leaving), ``RobotStopped`` (latched as it began)."""
        scripted = self.operator.kind == "scripted"
        if scripted:  # a script's operator: resets at once, then plays the script from step 0 of the episode
            self.loop.operator = ScriptedOperator(steps={0: OperatorEvent.RESET_DONE}, key=self.key, latch=self.envelope)
        self.loop.reset(reset_timeout_s, cancel=self.leaving)
        if scripted:
            events = {step: [OperatorEvent(e) for e in names] for step, names in self.operator.script.items()}
            self.loop.operator = ScriptedOperator(steps=events, key=self.key, latch=self.envelope)
            self.loop.teleop = ScriptedTeleop(self.operator.teleop) if self.operator.teleop else None
        if self.leaving.is_set():
            raise ResetCancelled(f"robot {self.config.id} is leaving; no episode follows")
        record = self.loop.run(instruction, max_steps)
        self.episodes += 1
        return record

    def leave(self, reason: str) -> None:
        """From any thread: no more episodes; one running ends at its next step, the robot stopped (latched)."""
        self.leaving.set()
        self.envelope.estop(f"leaving: {reason}")

    def close(self) -> None:
        stop_driver(self.driver)
        try:
            if self.driver.is_connected:
                self.driver.disconnect()
        finally:
            if self.keyboard is not None:
                self.keyboard.close()


# ---- what an episode is to replay -------------------------------------------------------------------
def label(record: RobotEpisodeRecord) -> bool | None:
    """The episode's outcome as a label: the operator's, a failure at ``max_steps``, None when it is no label."""
    if record.interrupted or record.rerecord:
        return None
    return bool(record.success) if record.success is not None else False


def acted_versions(record: RobotEpisodeRecord) -> dict[str, int | None]:
    """The weight versions of the first chunk acted on (those the episode began with); {} when none was."""
    versions = record.versions()
    return dict(versions[0]) if versions else {}


def episode_metadata(record: RobotEpisodeRecord, operator: str) -> dict[str, Any]:
    """Per-episode facts for replay, all scalars: how it ended, who drove which steps, what the envelope did,
    which versions acted (``versions_changed``: the server swapped weights mid-episode; ``versions``: each, in order)."""
    versions = record.versions()
    counters = record.counters
    return {
        "robot_id": record.robot_id, "driver": record.driver, "reason": record.reason, "operator": operator,
        "labelled_by": "operator" if record.success is not None else "max_steps",
        "intervention": "".join("1" if f else "0" for f in record.intervention),  # per step: the teleop drove it
        "versions_changed": len(versions) > 1,
        "versions": ";".join(f"{v.get('policy')}/{v.get('planning')}" for v in versions),  # policy/planning of each, in order
        "control_hz": float(record.control_hz),
        **{k: int(counters.get(k, 0)) for k in ("intervention_steps", "clipped_steps", "capped_steps", "held_steps", "late_chunks",
                                                 "stale_chunks", "failed_requests", "overruns")},
    }


def summary(record: RobotEpisodeRecord) -> dict[str, Any]:
    """The small result of one episode (JSON-ready): its label, counts and versions; the caller adds where it went."""
    versions = acted_versions(record)
    counters = record.counters
    seconds = float(record.tick_times[-1] - record.tick_times[0]) + 1.0 / record.control_hz if record.steps else 0.0
    return {
        "robot_id": record.robot_id, "success": label(record), "reason": record.reason, "steps": record.steps,
        "interrupted": bool(record.interrupted), "rerecord": bool(record.rerecord),
        "intervention_steps": int(counters.get("intervention_steps", 0)), "clipped_steps": int(counters.get("clipped_steps", 0)),
        "capped_steps": int(counters.get("capped_steps", 0)), "held_steps": int(counters.get("held_steps", 0)),
        "late_chunks": int(counters.get("late_chunks", 0)), "stale_chunks": int(counters.get("stale_chunks", 0)),
        "failed_requests": int(counters.get("failed_requests", 0)),
        "policy_version": versions.get("policy"), "planning_version": versions.get("planning"),
        "versions": [dict(v) for v in record.versions()], "seconds": seconds,
        "inserted": False, "table": None, "episode_id": None,
    }
