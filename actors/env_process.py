"""A simulator in its own process, so that a crash in it does not take the runner down.

MuJoCo and its renderers can die with a segfault or hang; the EnvRunner keeps its episode
bookkeeping, replay client and policy connection in its own process and talks to the simulator
through a pipe. When the simulator process dies, calls raise ``SimulatorCrashed`` and the runner
restarts it.

Environments are named by ``EnvConfig`` (a registry name plus keyword arguments) so that the
child process can build them itself (spawn start method: no inherited threads or GL contexts).
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from cosmos_policy.contracts import Env, EnvSpec
from cosmos_policy.errors import ConfigError

# name -> "module:Class"; adapters live in actors/envs/.
ENV_REGISTRY = {
    "lift": "actors.envs.lift:LiftEnv",
    "libero": "actors.envs.libero:LiberoEnv",
}


def known_env(name: object) -> bool:
    """A registry name, or ``package.module:Class`` (an environment of the user's own, importable on every node)."""
    if not isinstance(name, str):
        return False
    if name in ENV_REGISTRY:
        return True
    module, _, cls = name.partition(":")
    return bool(module) and cls.isidentifier() and all(part.isidentifier() for part in module.split("."))


@dataclass
class EnvConfig:
    name: str = "lift"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not known_env(self.name):
            raise ConfigError(f"env.name: expected one of {sorted(ENV_REGISTRY)} or package.module:Class, got {self.name!r}")


def make_env(config: EnvConfig) -> Env:
    """Build the environment in this process."""
    module, cls = ENV_REGISTRY.get(config.name, config.name).split(":")
    return getattr(importlib.import_module(module), cls)(**config.kwargs)


class SimulatorCrashed(RuntimeError):
    """The simulator process died or stopped answering."""


def _serve(config: EnvConfig, conn: Connection) -> None:
    try:
        env = make_env(config)
        conn.send(("ok", env.spec))
    except BaseException as exc:  # report why the environment could not be built
        conn.send(("err", (repr(exc), traceback.format_exc())))
        return
    while True:
        try:
            name, args, kwargs = conn.recv()
        except (EOFError, ConnectionError):  # the owner closed the pipe, or died (kill -9): nothing left to serve
            break
        if name == "__close__":
            env.close()
            conn.send(("ok", None))
            break
        try:
            conn.send(("ok", getattr(env, name)(*args, **kwargs)))
        except BaseException as exc:
            try:
                conn.send(("raise", exc))
            except Exception:  # an exception that does not pickle: send its text
                conn.send(("err", (repr(exc), traceback.format_exc())))


class EnvProcess:
    """Proxy to an environment living in a child process."""

    def __init__(self, config: EnvConfig, timeout_s: float = 300.0) -> None:
        self.config = config
        self.timeout_s = timeout_s
        self._proc: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self.spec: EnvSpec
        self.restarts = 0
        self.start()

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(self.config, child), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        self.spec = self._receive("start")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def _receive(self, what: str) -> Any:
        assert self._conn is not None
        try:
            if not self._conn.poll(self.timeout_s):
                raise SimulatorCrashed(f"simulator {self.config.name!r} did not answer {what} within {self.timeout_s} s")
            status, payload = self._conn.recv()
        except (EOFError, ConnectionError, OSError) as exc:
            code = self._proc.exitcode if self._proc is not None else None
            raise SimulatorCrashed(f"simulator {self.config.name!r} (pid {self.pid}) died during {what} (exit code {code})") from exc
        if status == "ok":
            return payload
        if status == "raise":
            raise payload
        text, tb = payload
        raise RuntimeError(f"simulator {self.config.name!r} failed during {what}: {text}\n{tb}")

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._conn is None or not self.alive():
            code = self._proc.exitcode if self._proc is not None else None
            raise SimulatorCrashed(f"simulator {self.config.name!r} (pid {self.pid}) died and is not running (exit code {code})")
        try:
            self._conn.send((name, args, kwargs))
        except (BrokenPipeError, ConnectionError, OSError) as exc:
            raise SimulatorCrashed(f"simulator {self.config.name!r} (pid {self.pid}) died before {name}") from exc
        return self._receive(name)

    def restart(self) -> None:
        self.kill()
        self.restarts += 1
        self.start()

    def kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn = None, None

    def close(self) -> None:
        if self.alive():
            try:
                self.call("__close__")
            except Exception:
                pass
        self.kill()

    # The Env interface, proxied.
    def tasks(self) -> list[str]:
        return self.call("tasks")

    def instruction(self, task: str) -> str:
        return self.call("instruction", task)

    def initial_states(self, task: str) -> list:
        return self.call("initial_states", task)

    def max_steps(self, task: str) -> int:
        return self.call("max_steps", task)

    def reset(self, task: str, seed: int, initial_state=None):
        return self.call("reset", task, seed, initial_state)

    def step(self, action, render: bool = True):
        return self.call("step", action, render)

    def get_state(self):
        return self.call("get_state")
