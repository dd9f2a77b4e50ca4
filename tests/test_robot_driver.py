"""The driver contract, the dummy mode (DummyArm) and the robot-side observation mapping (numpy resize)."""

from __future__ import annotations

import numpy as np
import pytest

from actors.robots.config import load_robot_config
from actors.robots.driver import NotConnected, RobotDriver, stop_driver
from actors.robots.dummy import DummyArm, Stopped, end_effector
from actors.robots.observation import ObservationError, resize, robot_observation


def test_the_dummy_arm_is_a_robot_driver_with_features_readable_while_disconnected() -> None:
    arm = DummyArm(cameras=("front",), image_size=(24, 32))
    assert isinstance(arm, RobotDriver)
    assert arm.observation_features["front"] == (24, 32, 3) and arm.observation_features["ee.z"] is float
    assert list(arm.action_features) == ["base.pos", "shoulder.pos", "elbow.pos", "wrist.pos", "gripper.pos"]
    with pytest.raises(NotConnected):
        arm.get_observation()
    with pytest.raises(NotConnected):
        arm.send_action({"base.pos": 0.0})


def test_joints_move_toward_their_targets_at_the_maximum_speed() -> None:
    arm = DummyArm(max_joint_speed=0.1)
    arm.connect()
    first = arm.get_observation()
    sent = arm.send_action({"base.pos": 0.25, "gripper.pos": 9.0})
    assert sent["base.pos"] == 0.25 and sent["gripper.pos"] == 3.0  # the action actually sent: the arm's own range
    for _ in range(2):
        arm.send_action({"base.pos": 0.25})
    obs = arm.get_observation()
    assert obs["base.pos"] == pytest.approx(0.25) and obs["gripper.pos"] == pytest.approx(0.8)  # 0.5 + 3 steps of 0.1
    assert arm.send_count == 3
    assert not np.array_equal(obs["front"], first["front"])  # the frames show the motion
    assert np.allclose([obs["ee.x"], obs["ee.y"], obs["ee.z"]], end_effector(arm.position))
    assert obs["ee.y"] > 0  # base yaw swung the fingertip toward +y
    with pytest.raises(KeyError, match="unknown action features \\['knee.pos'\\]"):
        arm.send_action({"knee.pos": 1.0})


def test_stop_driver_prefers_safe_stop_and_falls_back_to_disconnect() -> None:
    arm = DummyArm()
    arm.connect()
    assert stop_driver(arm) == "safe_stop" and arm.stopped
    with pytest.raises(Stopped):
        arm.send_action({"base.pos": 1.0})

    class WithoutSafeStop(DummyArm):  # shaped like a LeRobot robot: its only stop is disconnect()
        safe_stop = None  # type: ignore[assignment]

    lerobot_like = WithoutSafeStop()
    lerobot_like.connect()
    assert stop_driver(lerobot_like) == "disconnect" and not lerobot_like.is_connected


def test_observations_map_onto_the_model_cameras_and_proprio_order() -> None:
    cfg = load_robot_config("dummy_arm")
    arm = DummyArm()
    arm.connect()
    flat = arm.get_observation()
    obs = robot_observation(flat, cfg, "lift the cube", 12.5)
    assert set(obs.images) == {"primary", "wrist"} and obs.images["primary"].shape == (64, 64, 3)
    assert obs.proprio.dtype == np.float32 and obs.proprio[1] == pytest.approx(flat["shoulder.pos"])
    assert obs.instruction == "lift the cube" and obs.timestamp == 12.5
    with pytest.raises(ObservationError, match=r"observation\['front'\] \(camera primary\): expected a uint8 \(H, W, 3\) frame, "
                                               r"got float64"):
        robot_observation(flat | {"front": flat["front"].astype(float)}, cfg, "", 0.0)
    with pytest.raises(ObservationError, match=r"observation: no feature 'ee.z'"):
        robot_observation({k: v for k, v in flat.items() if k != "ee.z"}, cfg, "", 0.0)


def test_resize_averages_down_and_repeats_up() -> None:
    frame = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    down = resize(frame, (2, 3))
    assert down.shape == (2, 3, 3) and down[0, 0, 0] == round(frame[:2, :2, 0].mean())
    up = resize(frame, (8, 12))
    assert up.shape == (8, 12, 3) and np.array_equal(up[::2, ::2], frame)
    assert resize(frame, (4, 6)) is frame
    odd = resize(np.full((48, 64, 3), 200, np.uint8), (64, 20))  # up one axis, down the other
    assert odd.shape == (64, 20, 3) and np.all(odd == 200)
