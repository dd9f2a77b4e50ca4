"""Robot configs (actors/robots/config.py): the dummy arm's loads and matches its driver; every bad value names its key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from actors.robots.config import RobotConfigError, load_robot_config, robot_config_from_dict
from actors.robots.driver import make_driver

DUMMY = Path(__file__).resolve().parent.parent / "configs" / "robot" / "dummy_arm.yaml"


def dummy_data() -> dict:
    return yaml.safe_load(DUMMY.read_text())


def test_the_dummy_arm_config_loads_and_matches_its_driver() -> None:
    cfg = load_robot_config("dummy_arm")
    assert cfg == load_robot_config(DUMMY) == robot_config_from_dict(dummy_data())
    assert cfg.id == "dummy-arm-0" and cfg.cameras == {"primary": "front", "wrist": "wrist"}
    assert cfg.actions[0] == "base.pos" and cfg.limits["gripper.pos"].high == 1.0 and cfg.period_s == pytest.approx(0.05)
    assert cfg.chunking.request_threshold == 0.5 and cfg.measured_feature("elbow.pos") == "elbow.pos"
    driver = make_driver(cfg.driver.target, cfg.driver.kwargs)
    cfg.check_driver(driver.observation_features, driver.action_features)  # readable while disconnected
    assert not driver.is_connected


def _with(path: str, value: object) -> dict:
    data = copy.deepcopy(dummy_data())
    *parents, last = path.split("/")
    node = data
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return data


@pytest.mark.parametrize("path, value, message", [
    ("limits/shoulder.pos/low", 3.0, r"robot.limits.shoulder.pos.low: expected a number < high \(1.6\), got 3.0"),
    ("limits/shoulder.pos/high", "big", r"robot.limits.shoulder.pos.high: expected a number, got str 'big'"),
    ("limits/gripper.pos", KeyError, r"robot.limits.gripper.pos: missing \(every action needs its limits\)"),
    ("limits/knee.pos", {"low": 0, "high": 1}, r"robot.limits.knee.pos: not an action"),
    ("max_step/elbow.pos", 0, r"robot.max_step.elbow.pos: expected a number > 0, got 0"),
    ("control_hz", True, r"robot.control_hz: expected a number, got bool True"),
    ("control_hz", -5, r"robot.control_hz: expected a number in \(0, 1000\]"),
    ("image_size", [64], r"robot.image_size: expected \[H, W\]"),
    ("image_size", [64, 6.5], r"robot.image_size\[1\]: expected an integer, got float 6.5"),
    ("id", "arm 1", r"robot.id: expected letters, digits"),
    ("driver/target", "actors.robots.dummy.DummyArm", r"robot.driver.target: expected 'package.module:Class'"),
    ("driver/tagret", "x", r"robot.driver.tagret: unknown key \(known: \['target', 'kwargs'\]\)"),
    ("cameras", {}, r"robot.cameras: expected at least one camera"),
    ("actions", ["base.pos", "base.pos"], r"robot.actions: expected each feature once"),
    ("proprio", "base.pos", r"robot.proprio: expected a list, got str"),
    ("measured", {"wrist": "wrist.pos"}, r"robot.measured.wrist: not an action"),
    ("workspace/features", ["ee.x", "ee.y", "ee.w"], r"robot.workspace.features\[2\]: 'ee.w' is not a proprio feature"),
    ("workspace/low", [0, 0], r"robot.workspace: expected as many low and high values as features \(3\), got 2 and 3"),
    ("fault/max_clipped_in_a_row", 0, r"robot.fault.max_clipped_in_a_row: expected >= 1, got 0"),
    ("chunking/request_threshold", 1.5, r"robot.chunking.request_threshold: expected a fraction of a chunk in \(0, 1\]"),
    ("chunking/hold_s", 0.01, r"robot.chunking.hold_s: expected more than one control period \(0.05 s\), got 0.01"),
    ("chunking/stale_s", 0, r"robot.chunking.stale_s: expected seconds > 0"),
    ("chunking/hold", 1, r"robot.chunking.hold: unknown key"),
    ("control_hz", KeyError, r"robot.control_hz: missing \(required\)"),
    ("driver/kwargs/control_hz", 10, r"robot.control_hz: expected at most the driver's own rate \(robot.driver.kwargs.control_hz: 10\), got 20"),
])
def test_every_bad_value_names_its_key(path: str, value: object, message: str) -> None:
    with pytest.raises(RobotConfigError, match=message):
        robot_config_from_dict(_with(path, value))


def test_a_config_that_does_not_match_its_driver_names_the_key() -> None:
    driver = make_driver("actors.robots.dummy:DummyArm", {"cameras": ["front"]})
    features = (driver.observation_features, driver.action_features)
    with pytest.raises(RobotConfigError, match=r"robot.cameras.wrist: 'wrist' is not an observation feature of the driver"):
        load_robot_config("dummy_arm").check_driver(*features)
    cfg = robot_config_from_dict(_with("cameras", {"primary": "base.pos"}))
    with pytest.raises(RobotConfigError, match=r"robot.cameras.primary: expected 'base.pos' to be a \(H, W, 3\) frame"):
        cfg.check_driver(*features)
    cfg = robot_config_from_dict(_with("measured", {"gripper.pos": "grip.pos"}))
    full = make_driver("actors.robots.dummy:DummyArm")
    with pytest.raises(RobotConfigError, match=r"robot.measured.gripper.pos: 'grip.pos' is not an observation feature"):
        cfg.check_driver(full.observation_features, full.action_features)


def test_files_and_names(tmp_path: Path) -> None:
    with pytest.raises(RobotConfigError, match=r"robot config 'nope': no file .*nope.yaml \(known: \[.*'dummy_arm'"):
        load_robot_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: [unclosed\n")
    with pytest.raises(RobotConfigError, match=r"bad.yaml: not valid YAML"):
        load_robot_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(_with("limits/base.pos/low", 9)))
    with pytest.raises(RobotConfigError, match=r"wrong.yaml: robot.limits.base.pos.low: expected a number < high"):
        load_robot_config(wrong)
    with pytest.raises(RobotConfigError, match=r"robot.driver.target: cannot import 'no_such_module'"):
        make_driver("no_such_module:Arm")
    with pytest.raises(RobotConfigError, match=r"robot.driver.target: actors.robots.config:Limit is not a RobotDriver "
                                               r"\(missing observation_features"):
        make_driver("actors.robots.config:Limit", {"low": 0, "high": 1})
    with pytest.raises(RobotConfigError, match=r"robot.driver.kwargs: actors.robots.dummy:DummyArm does not take them .*'speed'"):
        make_driver("actors.robots.dummy:DummyArm", {"speed": 1})
