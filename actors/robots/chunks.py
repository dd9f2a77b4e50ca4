"""Action chunks and the request for the next one, run on its own thread so the control loop never waits.

``infer(observation) -> Chunk`` is whatever computes chunks: a local policy, a PolicyServer's
client, a gateway connection. It may be slow, fail or hang (LeRobot issue #3979: a first call with
no deadline hung forever); the control loop only ever asks ``ChunkRequests.poll`` what has arrived.
One request is in flight at a time. A request unanswered after ``deadline_s`` is abandoned: its
answer, if it ever comes, is dropped, and a fresh one is made; while ``MAX_ABANDONED`` abandoned
calls still run, no new one starts, so a hanging ``infer`` cannot pile up threads (one hang is
retried once; a second hang leaves the robot holding, then stopping).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from actors.robots.observation import RobotObservation


@dataclass
class Chunk:
    """The actions to execute from one observation, in the config's action order."""

    actions: np.ndarray  # (K, d_a) float, in the robot config's action order and units
    observed_at: float  # the RobotObservation.timestamp it was computed from
    value: float | None = None  # the model's predicted value, when it gives one
    versions: dict[str, int] = field(default_factory=dict)  # weight versions that produced it (policy, planning)
    extra: dict[str, Any] = field(default_factory=dict)  # anything else the source reports (timings...)


Infer = Callable[[RobotObservation], Chunk]
MAX_ABANDONED = 2


class AnswerKind(StrEnum):
    CHUNK = "chunk"
    ERROR = "error"  # infer raised: counts as no chunk
    LATE = "late"  # no answer within deadline_s: abandoned


@dataclass
class Answer:
    kind: AnswerKind
    chunk: Chunk | None = None
    error: str = ""
    sent_at: float = 0.0  # time.monotonic() when the request was made
    arrived_at: float = 0.0


class ChunkRequests:
    """At most one ``infer`` call in flight on a daemon thread; answers collected without blocking."""

    def __init__(self, infer: Infer, deadline_s: float) -> None:
        self.infer = infer
        self.deadline_s = deadline_s
        self._answers: queue.Queue[tuple[int, Chunk | None, str, float]] = queue.Queue()
        self._ids = itertools.count()
        self._current: tuple[int, float, threading.Thread] | None = None
        self._abandoned: list[threading.Thread] = []

    @property
    def in_flight(self) -> bool:
        return self._current is not None

    def submit(self, observation: RobotObservation) -> bool:
        """Start ``infer(observation)``; False (nothing started) while one is in flight or too many abandoned ones still run."""
        self._abandoned = [t for t in self._abandoned if t.is_alive()]
        if self._current is not None or len(self._abandoned) >= MAX_ABANDONED:
            return False
        rid = next(self._ids)
        thread = threading.Thread(target=self._call, args=(rid, observation), name=f"chunk-request-{rid}", daemon=True)
        self._current = (rid, time.monotonic(), thread)
        thread.start()
        return True

    def poll(self) -> list[Answer]:
        """What arrived for the current request (a chunk or an error), or LATE once its deadline passed."""
        out = []
        while True:
            try:
                rid, chunk, error, arrived = self._answers.get_nowait()
            except queue.Empty:
                break
            if self._current is not None and rid == self._current[0]:
                kind = AnswerKind.CHUNK if chunk is not None else AnswerKind.ERROR
                out.append(Answer(kind, chunk, error, self._current[1], arrived))
                self._current = None
            # else: the answer to an abandoned or cancelled request: dropped
        if self._current is not None and time.monotonic() - self._current[1] > self.deadline_s:
            out.append(Answer(AnswerKind.LATE, error=f"no chunk within deadline_s {self.deadline_s} s", sent_at=self._current[1]))
            self.cancel()
        return out

    def cancel(self) -> None:
        """Forget the request in flight (its answer will be dropped)."""
        if self._current is not None:
            self._abandoned.append(self._current[2])
            self._current = None

    def _call(self, rid: int, observation: RobotObservation) -> None:
        try:
            chunk = self.infer(observation)
            if not isinstance(chunk, Chunk):
                raise TypeError(f"infer returned {type(chunk).__name__}, expected a Chunk")
            self._answers.put((rid, chunk, "", time.monotonic()))
        except Exception as exc:  # any failure of the source is "no chunk": the loop holds and counts it
            self._answers.put((rid, None, f"{type(exc).__name__}: {exc}", time.monotonic()))
