"""A Reverb server in a child process (``replay/reverb_server.py``), and calls to it that notice its death.

Calls to a dead server hang (gRPC keeps reconnecting), so every call runs on a daemon thread
that the caller abandons when the server process exits (``ServerDied``) or when it outlives the
caller's deadline (``Stalled``). TensorFlow's log noise is cut with TF_CPP_MIN_LOG_LEVEL=2.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported (by reverb)

import reverb  # noqa: E402

from cosmos_policy.atomic import atomic_write_bytes  # noqa: E402
from replay.reverb_server import SERVER_READY  # noqa: E402

SERVER_SCRIPT = Path(__file__).resolve().parent / "reverb_server.py"
POLL_S = 0.1  # how often a caller waiting on Reverb looks whether the server process is still alive
START_TIMEOUT_S = 300.0  # restoring a large checkpoint takes a while


class ReverbServerError(RuntimeError):
    """The Reverb server process could not be started, or keeps dying."""


class ServerDied(Exception):
    """The server process exited while a call was waiting on it (the call is abandoned)."""


class Stalled(Exception):
    """A Reverb call outlived the caller's deadline (Reverb blocked something the service admitted)."""


class ReverbServerProcess:
    """One server at a time under ``root``: its spec, its log and, while it runs, a client on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log_path = root / "reverb-server.log"
        self.proc: subprocess.Popen | None = None
        self.client: Any = None
        self.address = ""
        self._log: Any = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, tables: list[dict[str, Any]], checkpoints: Path) -> None:
        """Start a server for ``tables`` (``replay.reverb_book.table_spec``) restoring from ``checkpoints``."""
        spec_path = self.root / "reverb-server.json"
        atomic_write_bytes(spec_path, json.dumps({"tables": tables, "checkpoints": str(checkpoints.resolve())}).encode())
        if self._log is None:
            self._log = open(self.log_path, "ab")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        # -P: the script's folder (replay/, with config.py...) must not shadow modules.
        proc = subprocess.Popen([sys.executable, "-P", str(SERVER_SCRIPT), str(spec_path)], stdout=subprocess.PIPE,
                                stderr=self._log, env=env, start_new_session=True)
        port = self._await_ready(proc)
        self.proc = proc
        self.address = f"127.0.0.1:{port}"
        self.client = reverb.Client(self.address)

    def _await_ready(self, proc: subprocess.Popen) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        assert proc.stdout is not None
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], POLL_S)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                line += chunk
                if b"\n" in line:
                    first = line.split(b"\n", 1)[0].decode(errors="replace")
                    if first.startswith(SERVER_READY):
                        return int(first.split()[1])
                    break
                if not chunk:
                    break
            if proc.poll() is not None and not ready:
                break
        proc.kill()
        proc.wait()
        raise ReverbServerError(f"the Reverb server did not start (see {self.log_path}):\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server process (SIGTERM, then SIGKILL) and abandon calls still waiting on it."""
        proc, self.proc = self.proc, None
        self.client = None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def call(self, fn: Callable[[], Any], deadline: float | None = None) -> Any:
        """Run a Reverb call on a daemon thread while watching the server process.

        A call to a dead server hangs (gRPC keeps reconnecting), so the caller gives up on it when
        the process exits and the thread is left behind; a daemon thread, unlike an executor's
        worker, does not hold up the interpreter's exit.
        """
        proc = self.proc
        assert proc is not None
        outcome: list[tuple[bool, Any]] = []

        def run() -> None:
            try:
                outcome.append((True, fn()))
            except BaseException as exc:  # handed to the caller below
                outcome.append((False, exc))

        worker = threading.Thread(target=run, name="reverb-call", daemon=True)
        worker.start()
        while not outcome:
            worker.join(POLL_S)
            if outcome:
                break
            if proc.poll() is not None:
                self.stop()
                raise ServerDied()
            if deadline is not None and time.monotonic() > deadline:
                raise Stalled()
        ok, value = outcome[0]
        if ok:
            return value
        # A dying server can fail a call a moment before its process is gone: look again, briefly.
        try:
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            raise value from None
        self.stop()
        raise ServerDied() from value
