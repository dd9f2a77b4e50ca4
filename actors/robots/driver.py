"""What a robot is to us: LeRobot's ``Robot`` contract, by name and meaning, so a LeRobot robot drives as is.

LeRobot cannot be our dependency (it needs Python >= 3.12 and its own torch pins), but its robots
are the ones people own; a ``lerobot.robots`` object satisfies ``RobotDriver`` by duck typing on a
robot host that has LeRobot installed (``driver.target: lerobot.robots.so101_follower:SO101Follower``
with its config as ``kwargs`` is one adapter away; see README.md).

Feature dictionaries map a name to ``float`` (a scalar: a joint position, a gripper opening) or a
shape tuple (a camera frame, ``(H, W, 3)``), exactly as LeRobot's ``observation_features`` and
``action_features``; they are readable while the robot is disconnected so a config can be checked
before anything moves.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from actors.robots.config import RobotConfigError

log = logging.getLogger(__name__)

Feature = type | tuple[int, ...]


class NotConnected(ConnectionError):
    """A driver was asked to observe or act before ``connect()`` (LeRobot's DeviceNotConnectedError)."""


@runtime_checkable
class RobotDriver(Protocol):
    """A robot as LeRobot's ``Robot`` base class defines it.

    ``safe_stop()`` is optional (LeRobot has none: its stop is ``disconnect()`` with torque off);
    callers reach it through ``stop_driver``, which falls back to ``disconnect()``.
    """

    @property
    def observation_features(self) -> dict[str, Feature]:
        """Name -> ``float`` or a shape tuple, for every key ``get_observation`` returns; readable while disconnected."""
        ...

    @property
    def action_features(self) -> dict[str, Feature]:
        """Name -> ``float``, for every key ``send_action`` takes; readable while disconnected."""
        ...

    @property
    def is_connected(self) -> bool: ...

    def connect(self, calibrate: bool = True) -> None:
        """Open the hardware (and calibrate it when asked and needed)."""
        ...

    def get_observation(self) -> dict[str, Any]:
        """A flat dict: joint values as floats, camera frames as uint8 (H, W, 3) arrays."""
        ...

    def send_action(self, action: dict[str, float]) -> dict[str, float]:
        """Command the robot; returns the action actually sent (after the driver's own clipping)."""
        ...

    def disconnect(self) -> None: ...


def make_driver(target: str, kwargs: Mapping[str, Any] | None = None, where: str = "robot.driver.target") -> RobotDriver:
    """Import ``"package.module:Class"`` and build it with ``kwargs`` (a config's ``driver`` section)."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise RobotConfigError(f"{where}: expected 'package.module:Class', got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RobotConfigError(f"{where}: cannot import {module_name!r} ({exc})") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise RobotConfigError(f"{where}: module {module_name!r} has no {attr!r}")
    try:
        driver = cls(**dict(kwargs or {}))
    except TypeError as exc:  # a misspelled or missing constructor argument: the config's kwargs are wrong
        raise RobotConfigError(f"{where.rsplit('.', 1)[0]}.kwargs: {target} does not take them ({exc})") from None
    missing = [name for name in ("observation_features", "action_features", "is_connected", "connect",
                                 "get_observation", "send_action", "disconnect") if not hasattr(driver, name)]
    if missing:
        raise RobotConfigError(f"{where}: {target} is not a RobotDriver (missing {', '.join(missing)})")
    return driver


def stop_driver(driver: RobotDriver) -> str:
    """Stop the robot the best way it offers: its ``safe_stop()``, else ``disconnect()``; returns which ran.

    Never raises: it is called on the way out of a fault, where a second error must not hide the first.
    """
    safe_stop = getattr(driver, "safe_stop", None)
    try:
        if callable(safe_stop):
            safe_stop()
            return "safe_stop"
        if driver.is_connected:
            driver.disconnect()
        return "disconnect"
    except Exception:  # the robot may be why we are stopping: say so, and go on stopping
        log.exception("stopping the robot failed")
        return "failed"
