"""A robot's config: which driver, which features the model sees, its limits, and its timing rules.

``configs/robot/<name>.yaml`` (or a dict, as a gateway receives it) read into a frozen
``RobotConfig``. This module runs on robot computers that have no OmegaConf and no
``cosmos_policy``, so it reads with ``yaml.safe_load`` (imported only when a file is read) and
validates by hand, the way ``launch/config.py`` does through OmegaConf: every field has a one-line
docstring, and every bad value is an error naming its key path and what was expected.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]  # the repository root: actors/robots/ is two levels down
ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # ids name Ray resources and tokens: no spaces or slashes
TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class RobotConfigError(ValueError):
    """A robot config value is missing, of the wrong type, or out of range.

    Mirrors ``cosmos_policy.errors.ConfigError`` (same base, same message style), which the robot
    side cannot import: ``except ValueError`` catches both.
    """


@dataclass(frozen=True)
class DriverSpec:
    """Which ``RobotDriver`` to build."""

    target: str
    """Import path "package.module:Class" of the driver (e.g. actors.robots.dummy:DummyArm)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the driver's constructor (ports, camera serials...)."""


@dataclass(frozen=True)
class Limit:
    """The range an action may command, in the action's own units."""

    low: float
    """The lowest value sent to the robot."""
    high: float
    """The highest value sent to the robot."""


@dataclass(frozen=True)
class Workspace:
    """A box for the end effector, given by proprio features (x, y, z in the robot's base frame)."""

    features: tuple[str, ...]
    """Proprio features of the end-effector position (usually x, y, z)."""
    low: tuple[float, ...]
    """The box's lower corner, one value per feature."""
    high: tuple[float, ...]
    """The box's upper corner, one value per feature."""


@dataclass(frozen=True)
class FaultConfig:
    """When repeated corrections mean something is wrong."""

    max_clipped_in_a_row: int = 10
    """The most consecutive steps whose action is clipped to its limits or the workspace box; one more latches a fault stop."""


@dataclass(frozen=True)
class ChunkingConfig:
    """How action chunks are requested and when they are too old or too late."""

    request_threshold: float = 0.5
    """Request the next chunk when the queue falls to this fraction of a chunk (LeRobot async inference's 0.5)."""
    deadline_s: float = 2.0
    """A request unanswered this long is abandoned (counted late) and a fresh one is made."""
    stale_s: float = 1.0
    """A chunk computed from an observation older than this is dropped (counted stale)."""
    hold_s: float = 1.0
    """With nothing to execute, hold the pose this long, then safe-stop and end the episode (late chunk)."""
    watchdog_s: float = 0.5
    """The control loop must tick within this; otherwise the watchdog latches a stop and stops the robot."""


@dataclass(frozen=True)
class RobotConfig:
    """One robot: its driver, what the model sees of it, and the rules of its safety envelope."""

    id: str
    """A unique name for this robot (letters, digits, _ . -): names its Ray resource and its token."""
    driver: DriverSpec
    """The driver class and its constructor's arguments."""
    cameras: dict[str, str]
    """Model camera name (primary, wrist...) -> the driver's observation feature holding that frame."""
    proprio: tuple[str, ...]
    """Observation features that make the model's proprio vector, in order."""
    actions: tuple[str, ...]
    """Action features that make the model's action vector, in order."""
    control_hz: float
    """Control steps per second: one action sent per step."""
    image_size: tuple[int, int]
    """(H, W) of the model's images: camera frames are resized to it."""
    limits: dict[str, Limit]
    """Per action: the range it may command (every action must have one)."""
    max_step: dict[str, float]
    """Per action: the largest change per step relative to the measured state (every action must have one)."""
    measured: dict[str, str] = field(default_factory=dict)
    """Action -> the observation feature that measures it, where their names differ (default: the same name)."""
    workspace: Workspace | None = None
    """An optional end-effector box (action features inside it are clipped; a measured position outside is a fault)."""
    fault: FaultConfig = field(default_factory=FaultConfig)
    """When the envelope latches a fault stop."""
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    """Chunk requests, deadlines, staleness, holding and the watchdog."""

    def __post_init__(self) -> None:
        _check(self)

    @property
    def period_s(self) -> float:
        """Seconds per control step."""
        return 1.0 / self.control_hz

    def measured_feature(self, action: str) -> str:
        """The observation feature that measures ``action``."""
        return self.measured.get(action, action)

    def check_driver(self, observation_features: Mapping[str, Any], action_features: Mapping[str, Any]) -> None:
        """Every feature this config names exists on the driver with the right kind (a frame or a scalar)."""
        known = sorted(observation_features)
        for cam, feature in self.cameras.items():
            shape = observation_features.get(feature)
            if shape is None:
                raise RobotConfigError(f"robot.cameras.{cam}: {feature!r} is not an observation feature of the driver (it has {known})")
            if not (isinstance(shape, tuple) and len(shape) == 3 and shape[2] == 3):
                raise RobotConfigError(f"robot.cameras.{cam}: expected {feature!r} to be a (H, W, 3) frame, the driver says {shape!r}")
        scalar_names = [(f"robot.proprio[{i}]", name) for i, name in enumerate(self.proprio)]
        scalar_names += [(f"robot.measured.{a}", self.measured_feature(a)) for a in self.actions]
        for where, name in scalar_names:
            if name not in observation_features:
                raise RobotConfigError(f"{where}: {name!r} is not an observation feature of the driver (it has {known})")
            if isinstance(observation_features[name], tuple):
                raise RobotConfigError(f"{where}: expected {name!r} to be a scalar, the driver says {observation_features[name]!r}")
        for i, name in enumerate(self.actions):
            if name not in action_features:
                raise RobotConfigError(f"robot.actions[{i}]: {name!r} is not an action feature of the driver "
                                       f"(it has {sorted(action_features)})")

    def check_layout(self, cameras: list[str] | tuple[str, ...], proprio_dim: int, action_dim: int) -> None:
        """The model's side: the served model's cameras, proprio and action counts are this robot's."""
        missing = [c for c in cameras if c not in self.cameras]
        if missing:
            raise RobotConfigError(f"robot.cameras: the model needs cameras {list(cameras)}, the robot maps {list(self.cameras)} "
                                   f"(missing {missing})")
        for key, names, dim in (("proprio", self.proprio, proprio_dim), ("actions", self.actions, action_dim)):
            if len(names) != dim:
                raise RobotConfigError(f"robot.{key}: the model takes {dim} values, the robot config names {len(names)}")


# ---- loading ----------------------------------------------------------------------------------------
def load_robot_config(name_or_path: str | Path) -> RobotConfig:
    """``configs/robot/<name>.yaml`` of the repository (or of an installed copy), or a YAML path."""
    path = _resolve(name_or_path)
    import yaml  # only here: a gateway's client receives its config as a dict and needs no yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RobotConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    try:
        return robot_config_from_dict(data)
    except RobotConfigError as exc:
        raise RobotConfigError(f"{path}: {exc}") from None


def robot_config_from_dict(data: Any, where: str = "robot") -> RobotConfig:
    """Read plain data (a parsed YAML, a message) into a validated ``RobotConfig``."""
    top = _section(data, where, RobotConfig)
    driver = _section(top["driver"], f"{where}.driver", DriverSpec)
    workspace = None
    if top.get("workspace") is not None:
        ws = _section(top["workspace"], f"{where}.workspace", Workspace)
        workspace = Workspace(features=_names(ws["features"], f"{where}.workspace.features"),
                              low=_numbers(ws["low"], f"{where}.workspace.low"), high=_numbers(ws["high"], f"{where}.workspace.high"))
    limits = {}
    for action, limit in _mapping(top["limits"], f"{where}.limits").items():
        lim = _section(limit, f"{where}.limits.{action}", Limit)
        limits[action] = Limit(_number(lim["low"], f"{where}.limits.{action}.low"), _number(lim["high"], f"{where}.limits.{action}.high"))
    fault = _section(top.get("fault") or {}, f"{where}.fault", FaultConfig)
    chunking = _section(top.get("chunking") or {}, f"{where}.chunking", ChunkingConfig)
    return RobotConfig(
        id=_string(top["id"], f"{where}.id"),
        driver=DriverSpec(_string(driver["target"], f"{where}.driver.target"),
                          dict(_mapping(driver.get("kwargs") or {}, f"{where}.driver.kwargs"))),
        cameras={k: _string(v, f"{where}.cameras.{k}") for k, v in _mapping(top["cameras"], f"{where}.cameras").items()},
        proprio=_names(top["proprio"], f"{where}.proprio"),
        actions=_names(top["actions"], f"{where}.actions"),
        control_hz=_number(top["control_hz"], f"{where}.control_hz"),
        image_size=tuple(int(_number(v, f"{where}.image_size[{i}]", integer=True))  # type: ignore[arg-type]
                         for i, v in enumerate(_list(top["image_size"], f"{where}.image_size"))),
        limits=limits,
        max_step={k: _number(v, f"{where}.max_step.{k}") for k, v in _mapping(top["max_step"], f"{where}.max_step").items()},
        measured={k: _string(v, f"{where}.measured.{k}") for k, v in _mapping(top.get("measured") or {}, f"{where}.measured").items()},
        workspace=workspace,
        fault=FaultConfig(**{k: int(_number(v, f"{where}.fault.{k}", integer=True)) for k, v in fault.items()}),
        chunking=ChunkingConfig(**{k: _number(v, f"{where}.chunking.{k}") for k, v in chunking.items()}),
    )


def as_robot_config(robot: str | Path | Mapping[str, Any] | RobotConfig, robot_id: str | None = None) -> RobotConfig:
    """A ``RobotConfig`` from its name (configs/robot/<name>.yaml), a YAML path, a dict or itself; ``robot_id`` renames it."""
    if isinstance(robot, RobotConfig):
        config = robot
    elif isinstance(robot, Mapping):
        config = robot_config_from_dict(dict(robot))
    else:
        config = load_robot_config(robot)
    return replace(config, id=robot_id) if robot_id else config


def robot_config_names() -> list[str]:
    folder = _folder()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder else []


def _folder() -> Path | None:
    """configs/robot of this repository, else of an installed cosmos_policy (found without importing it)."""
    if (ROOT / "configs" / "robot").is_dir():
        return ROOT / "configs" / "robot"
    spec = importlib.util.find_spec("cosmos_policy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "_configs" / "robot").is_dir():
            return Path(location) / "_configs" / "robot"
    return None


def _resolve(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        folder = _folder()
        path = (folder or ROOT / "configs" / "robot") / f"{name_or_path}.yaml"
    if not path.is_file():
        raise RobotConfigError(f"robot config {str(name_or_path)!r}: no file {path} (known: {robot_config_names()})")
    return path


# ---- checks: each names its key path --------------------------------------------------------------
def _check(c: RobotConfig) -> None:
    if not isinstance(c.id, str) or not ID.match(c.id):
        raise RobotConfigError(f"robot.id: expected letters, digits, '_', '.' or '-' (not starting with a symbol), got {c.id!r}")
    if not TARGET.match(c.driver.target):
        raise RobotConfigError(f"robot.driver.target: expected 'package.module:Class', got {c.driver.target!r}")
    if not c.cameras:
        raise RobotConfigError("robot.cameras: expected at least one camera (model name -> observation feature)")
    if len(set(c.cameras.values())) != len(c.cameras):
        raise RobotConfigError(f"robot.cameras: expected each observation feature once, got {c.cameras}")
    for key in ("proprio", "actions"):
        names = getattr(c, key)
        if not names:
            raise RobotConfigError(f"robot.{key}: expected at least one feature name")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise RobotConfigError(f"robot.{key}: expected each feature once, got {dup} more than once")
    if not (math.isfinite(c.control_hz) and 0 < c.control_hz <= 1000):
        raise RobotConfigError(f"robot.control_hz: expected a number in (0, 1000], got {c.control_hz}")
    own = c.driver.kwargs.get("control_hz")  # a driver with its own controller rate (the simulated arm's) must keep up with the loop
    if own is not None and isinstance(own, (int, float)) and not isinstance(own, bool) and c.control_hz > float(own):
        raise RobotConfigError(f"robot.control_hz: expected at most the driver's own rate (robot.driver.kwargs.control_hz: {own}), "
                               f"got {c.control_hz}: the loop would send actions faster than the arm's controller steps")
    if len(c.image_size) != 2 or min(c.image_size) < 1:
        raise RobotConfigError(f"robot.image_size: expected [H, W] of positive integers, got {list(c.image_size)}")
    for key, table in (("limits", c.limits), ("max_step", c.max_step), ("measured", c.measured)):
        extra = [k for k in table if k not in c.actions]
        if extra:
            raise RobotConfigError(f"robot.{key}.{extra[0]}: not an action (actions: {list(c.actions)})")
        missing = [a for a in c.actions if a not in table]
        if missing and key != "measured":
            raise RobotConfigError(f"robot.{key}.{missing[0]}: missing (every action needs its {key})")
    for action, lim in c.limits.items():
        if not math.isfinite(lim.low):
            raise RobotConfigError(f"robot.limits.{action}.low: expected a finite number, got {lim.low}")
        if not (math.isfinite(lim.high) and lim.low < lim.high):
            raise RobotConfigError(f"robot.limits.{action}.low: expected a number < high ({lim.high}), got {lim.low}")
    for action, step in c.max_step.items():
        if not (math.isfinite(step) and step > 0):
            raise RobotConfigError(f"robot.max_step.{action}: expected a number > 0, got {step}")
    if c.workspace is not None:
        _check_workspace(c.workspace, c.proprio)
    if c.fault.max_clipped_in_a_row < 1:
        raise RobotConfigError(f"robot.fault.max_clipped_in_a_row: expected >= 1, got {c.fault.max_clipped_in_a_row}")
    _check_chunking(c.chunking, c.period_s)


def _check_workspace(ws: Workspace, proprio: tuple[str, ...]) -> None:
    for i, name in enumerate(ws.features):
        if name not in proprio:
            raise RobotConfigError(f"robot.workspace.features[{i}]: {name!r} is not a proprio feature (proprio: {list(proprio)})")
    if not ws.features or len(ws.low) != len(ws.features) or len(ws.high) != len(ws.features):
        raise RobotConfigError(f"robot.workspace: expected as many low and high values as features ({len(ws.features)}), "
                               f"got {len(ws.low)} and {len(ws.high)}")
    for i, (lo, hi) in enumerate(zip(ws.low, ws.high)):
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise RobotConfigError(f"robot.workspace.low[{i}]: expected a finite number < high[{i}] ({hi}), got {lo}")


def _check_chunking(ch: ChunkingConfig, period: float) -> None:
    if not 0 < ch.request_threshold <= 1:
        raise RobotConfigError(f"robot.chunking.request_threshold: expected a fraction of a chunk in (0, 1], got {ch.request_threshold}")
    for key in ("deadline_s", "stale_s"):
        if not getattr(ch, key) > 0:
            raise RobotConfigError(f"robot.chunking.{key}: expected seconds > 0, got {getattr(ch, key)}")
    for key in ("hold_s", "watchdog_s"):  # shorter than a step would fire between two healthy steps
        if not getattr(ch, key) > period:
            raise RobotConfigError(f"robot.chunking.{key}: expected more than one control period ({period:.4g} s), got {getattr(ch, key)}")


# ---- typed reads ------------------------------------------------------------------------------------
def _section(data: Any, where: str, schema: type) -> dict[str, Any]:
    """A mapping with only the schema's keys, and all of its required ones."""
    data = _mapping(data, where)
    known = [f.name for f in fields(schema)]
    for key in data:
        if key not in known:
            raise RobotConfigError(f"{where}.{key}: unknown key (known: {known})")
    for f in fields(schema):
        if f.default is MISSING and f.default_factory is MISSING and f.name not in data:
            raise RobotConfigError(f"{where}.{f.name}: missing (required)")
    return dict(data)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise RobotConfigError(f"{where}: expected a mapping, got {_show(value)}")
    for key in value:
        if not isinstance(key, str) or not key:
            raise RobotConfigError(f"{where}: expected non-empty string keys, got {key!r}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise RobotConfigError(f"{where}: expected a list, got {_show(value)}")
    return list(value)


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise RobotConfigError(f"{where}: expected a non-empty string, got {_show(value)}")
    return value


def _names(value: Any, where: str) -> tuple[str, ...]:
    return tuple(_string(v, f"{where}[{i}]") for i, v in enumerate(_list(value, where)))


def _number(value: Any, where: str, integer: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise RobotConfigError(f"{where}: expected {'an integer' if integer else 'a number'}, got {_show(value)}")
    return value if integer else float(value)


def _numbers(value: Any, where: str) -> tuple[float, ...]:
    return tuple(_number(v, f"{where}[{i}]") for i, v in enumerate(_list(value, where)))


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__
