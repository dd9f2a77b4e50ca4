"""Stopping on a signal: SIGINT (Ctrl-C) and SIGTERM (``ray job stop``, ``kill``) ask for a clean stop.

The first signal sets the request, which the job checks between steps (it then saves a final
checkpoint); a second one aborts at once (``KeyboardInterrupt``). Used as a context manager, the
previous handlers come back afterwards.

``ray.init`` installs Ray's native failure-signal handler over SIGTERM: a ``ray job stop`` would then
print a stack trace at error level and end the driver without its final checkpoint. The job calls
``install()`` again once Ray is up, so the signal reaches this handler.
"""

from __future__ import annotations

import signal
from typing import Any

from launch.monitor import say


class Stop(Exception):
    """Ctrl-C or a job stop (SIGTERM): finish cleanly with a final checkpoint."""


class StopRequest:
    """``bool(stop)`` / ``stop()``: whether a stop was asked for."""

    def __init__(self, doing: str = "stopping after the current step") -> None:
        self.doing, self.requested = doing, False
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.requested

    def __bool__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        say(f"signal {signum}: {self.doing} (again to abort)")

    def __enter__(self) -> StopRequest:
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def install(self) -> None:
        """Take SIGINT and SIGTERM back (after a library, such as Ray, installed its own handlers)."""
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
