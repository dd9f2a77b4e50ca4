"""Readers of the official dataset releases, on small files written here in exactly the official layouts.

The layouts follow the official writers (regenerate_*_dataset.py, preprocess_split_aloha_data.py) and loaders
(*_dataset.py); each bad-file case must raise ``EpisodeFileError`` naming the file and the field.
"""

from __future__ import annotations

import re
from pathlib import Path

import av
import h5py
import numpy as np
import pytest

from cosmos_policy.data.episode_file import EpisodeFileError
from cosmos_policy.data.official import (
    DATASET_KINDS,
    iter_aloha_episodes,
    iter_dataset,
    iter_libero_demos,
    iter_libero_rollouts,
    iter_robocasa_demos,
    iter_robocasa_rollouts,
    libero_instruction,
    read_aloha_episode,
    read_libero_demo_file,
    read_robocasa_demo_file,
)
from cosmos_policy.episode import Episode, Source, encode_jpeg
from cosmos_policy.errors import ConfigError

VLEN_UINT8 = h5py.vlen_dtype(np.dtype("uint8"))
SIZE = 32
LIBERO_TASK = "KITCHEN_SCENE3_turn_on_the_stove"
LIBERO_ROLLOUT = "episode_data--suite=libero_goal--2025_01_01-12_00_00--task=3--ep=7--success={}--regen_demo.hdf5"
ROBOCASA_ROLLOUT = "episode_data--task=close_the_cabinet_doors--2025-10-02_15-20-39--ep={}--success={}--regen_demo.hdf5"


def smooth_frames(steps: int, seed: int = 0) -> np.ndarray:
    """Gradients that move each step: distinct frames that JPEG and MPEG-4 keep within a few levels."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    frames = [np.stack([x * 3 + t * 10 + seed * 20, y * 3 + t * 5, (x + y) * 2 + seed * 15], axis=-1) for t in range(steps)]
    return np.clip(frames, 0, 255).astype(np.uint8)


def jpeg_dataset(group: h5py.Group, key: str, frames: np.ndarray) -> list[bytes]:
    """Write frames the official way (vlen uint8 JPEG q95); returns the bytes written."""
    jpegs = [encode_jpeg(f) for f in frames]
    data = np.empty(len(jpegs), dtype=object)
    data[:] = [np.frombuffer(j, dtype=np.uint8) for j in jpegs]
    group.create_dataset(key, data=data, dtype=VLEN_UINT8)
    return jpegs


def close_to(decoded: np.ndarray, original: np.ndarray, tolerance: float = 4.0) -> bool:
    return decoded.shape == original.shape and float(np.abs(decoded.astype(int) - original).mean()) < tolerance


def demo_arrays(steps: int, seed: int, action_dims: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return dict(actions=rng.normal(size=(steps, action_dims)), robot_states=rng.normal(size=(steps, 9)))


def write_demo_file(path: Path, cameras: tuple[str, ...], demos: dict[int, int], jpeg: bool, action_dims: int,
                    instructions: dict[int, str] | None = None) -> dict[int, dict]:
    """A robomimic-style demo file (``data/demo_<i>/...``); ``demos`` maps demo index -> steps. Returns what was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    written: dict[int, dict] = {}
    with h5py.File(path, "w") as f:
        for i, steps in demos.items():
            g = f.create_group(f"data/demo_{i}")
            arrays = demo_arrays(steps, seed=i, action_dims=action_dims)
            g.create_dataset("actions", data=arrays["actions"])
            g.create_dataset("robot_states", data=arrays["robot_states"])
            g.create_dataset("dones", data=np.arange(steps) == steps - 1)  # an official extra the readers ignore
            if instructions is not None:
                g.attrs["task_description"] = instructions[i]
            for c, cam in enumerate(cameras):
                frames = smooth_frames(steps, seed=i + c)
                if jpeg:
                    arrays[cam] = jpeg_dataset(g, f"obs/{cam}_rgb_jpeg", frames)
                else:
                    g.create_dataset(f"obs/{cam}_rgb", data=frames)
                    arrays[cam] = frames
            written[i] = arrays
    return written


def write_libero_demo_file(path: Path, demos: dict[int, int], jpeg: bool = True) -> dict[int, dict]:
    return write_demo_file(path, ("agentview", "eye_in_hand"), demos, jpeg, action_dims=7)


def write_rollout_file(path: Path, cameras: tuple[str, ...], steps: int, action_dims: int, success: bool,
                       instruction: str, seed: int = 0) -> dict:
    """A rollout file as the official regeneration / eval scripts write it (float64 arrays, two attrs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written: dict = dict(proprio=rng.normal(size=(steps, 9)), actions=rng.normal(size=(steps, action_dims)))
    with h5py.File(path, "w") as f:
        for c, cam in enumerate(cameras):
            written[cam] = jpeg_dataset(f, f"{cam}_images_jpeg", smooth_frames(steps, seed=seed + c))
        f.create_dataset("proprio", data=written["proprio"])
        f.create_dataset("actions", data=written["actions"])
        f.attrs["success"] = success
        f.attrs["task_description"] = instruction
    return written


def write_mp4(path: Path, frames: np.ndarray, fps: int = 25) -> None:
    """MPEG-4 part 2 in MP4, what OpenCV's 'mp4v' writer in preprocess_split_aloha_data.py produces."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = SIZE, SIZE, "yuv420p", 4_000_000
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


ALOHA_CAMS = ("cam_high", "cam_left_wrist", "cam_right_wrist")


def write_aloha_episode(folder: Path, index: int, steps: int, video_steps: int | None = None) -> dict:
    """``episode_<i>.hdf5`` with video file names as scalar string datasets, and its three MP4s beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(index)
    written: dict = dict(qpos=rng.normal(size=(steps, 14)), action=rng.normal(size=(steps, 14)))
    with h5py.File(folder / f"episode_{index}.hdf5", "w") as f:
        f.attrs["sim"] = False
        f.create_dataset("observations/qpos", data=written["qpos"], dtype=np.float32)
        for key in ("qvel", "effort"):
            f.create_dataset(f"observations/{key}", data=np.zeros((steps, 14)), dtype=np.float32)
        f.create_dataset("action", data=written["action"], dtype=np.float32)
        f.create_dataset("relative_action", data=np.zeros((steps, 14)), dtype=np.float32)
        for c, cam in enumerate(ALOHA_CAMS):
            name = f"episode_{index}_{cam}.mp4"
            f.create_dataset(f"observations/video_paths/{cam}", data=name.encode("utf-8"))
            written[cam] = smooth_frames(video_steps or steps, seed=index + c)
            write_mp4(folder / name, written[cam])
    written["qpos"] = written["qpos"].astype(np.float32)
    written["action"] = written["action"].astype(np.float32)
    return written


def error_about(path: Path, field: str) -> str:
    """A regex requiring the file path, then the field, in an error message."""
    return rf"{re.escape(str(path))}.*{field}"


# ---------------------------------------------------------------------------------------------- LIBERO


def test_libero_instruction_from_the_file_name():
    assert libero_instruction("KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5") == "turn on the stove"
    assert libero_instruction("pick_up_the_black_bowl_demo.hdf5") == "pick up the black bowl"
    assert libero_instruction("LIVING_ROOM_SCENE2_put_both_the_alphabet_soup_demo.hdf5") == "put both the alphabet soup"


LIBERO_JPEG_FILE = Path("success_only") / "libero_goal_regen" / f"{LIBERO_TASK}_demo.hdf5"
LIBERO_RAW_FILE = Path("success_only") / "libero_object_regen" / "pick_up_the_black_bowl_demo.hdf5"


@pytest.fixture
def libero_release(tmp_path) -> tuple[Path, dict]:
    """LIBERO-Cosmos-Policy/{success_only, all_episodes}: a JPEG and a raw-image demo file, two rollouts.

    Returns the root and what was written: demo file path -> demo index -> arrays, and success -> rollout arrays.
    """
    root = tmp_path / "LIBERO-Cosmos-Policy"
    written: dict = {
        root / LIBERO_JPEG_FILE: write_libero_demo_file(root / LIBERO_JPEG_FILE, {10: 3, 2: 4}),  # demo_10 after demo_2
        root / LIBERO_RAW_FILE: write_libero_demo_file(root / LIBERO_RAW_FILE, {0: 5}, jpeg=False),
    }
    (root / "success_only" / "t5_embeddings.pkl").write_bytes(b"not an episode")
    for success in (True, False):
        written[success] = write_rollout_file(root / "all_episodes" / LIBERO_ROLLOUT.format(success), ("primary", "wrist"),
                                              steps=4, action_dims=7, success=success, instruction="open the drawer",
                                              seed=int(success))
    return root, written


def test_libero_demos_read_back(libero_release):
    root, written = libero_release
    episodes = list(iter_libero_demos(root))  # the release's top folder: rollouts must not pass for demos
    assert len(episodes) == 3
    assert [e.metadata["demo"] for e in episodes] == [2, 10, 0]
    assert len(list(iter_libero_demos(root / "success_only"))) == 3
    jpeg_file, raw_file = root / LIBERO_JPEG_FILE, root / LIBERO_RAW_FILE
    for episode, (path, i) in zip(episodes, [(jpeg_file, 2), (jpeg_file, 10), (raw_file, 0)]):
        assert isinstance(episode, Episode)
        assert episode.cameras == ["primary", "wrist"]
        assert episode.source is Source.DEMO and episode.success and episode.score == 1.0
        assert episode.metadata == {"suite": path.parent.name, "demo": i, "file": str(path)}
        data = written[path][i]
        assert np.array_equal(episode.actions, data["actions"].astype(np.float32))
        assert np.array_equal(episode.proprio, data["robot_states"].astype(np.float32))
    assert episodes[0].instruction == "turn on the stove" and episodes[0].task == LIBERO_TASK
    assert episodes[2].instruction == "pick up the black bowl" and episodes[2].task == "pick_up_the_black_bowl"
    assert episodes[0].images["primary"].jpegs == written[jpeg_file][2]["agentview"]  # JPEG bytes kept as they are
    assert episodes[1].images["wrist"].jpegs == written[jpeg_file][10]["eye_in_hand"]
    raw = written[raw_file][0]
    assert close_to(episodes[2].images["primary"].frames(), raw["agentview"])  # raw frames encoded at q95
    assert close_to(episodes[2].images["wrist"].frames(), raw["eye_in_hand"])


def test_read_libero_demo_file_returns_the_file_s_demos(libero_release):
    root, _ = libero_release
    episodes = read_libero_demo_file(root / LIBERO_JPEG_FILE)
    assert [(e.metadata["demo"], e.num_steps) for e in episodes] == [(2, 4), (10, 3)]


def test_libero_rollouts_read_back(libero_release):
    root, written = libero_release
    episodes = list(iter_libero_rollouts(root))
    assert sorted(e.success for e in episodes) == [False, True]
    for episode in episodes:
        data = written[episode.success]
        assert episode.source is Source.SIM and episode.instruction == "open the drawer"
        assert episode.cameras == ["primary", "wrist"]
        assert episode.images["primary"].jpegs == data["primary"] and episode.images["wrist"].jpegs == data["wrist"]
        assert np.array_equal(episode.actions, data["actions"].astype(np.float32))
        assert np.array_equal(episode.proprio, data["proprio"].astype(np.float32))
        path = root / "all_episodes" / LIBERO_ROLLOUT.format(episode.success)
        assert episode.metadata == {"suite": "libero_goal", "task": 3, "ep": 7, "file": str(path)}
    assert len(list(iter_libero_rollouts(root / "all_episodes"))) == 2


# -------------------------------------------------------------------------------------------- RoboCasa

ROBOCASA_OBS = ("robot0_agentview_left", "robot0_agentview_right", "robot0_eye_in_hand")
ROBOCASA_VIEWS = dict(zip(("primary", "secondary", "wrist"), ROBOCASA_OBS))


def test_robocasa_demos_read_back(tmp_path):
    root = tmp_path / "RoboCasa-Cosmos-Policy"
    raw_file = root / "success_only" / "kitchen_coffee" / "CoffeeSetupMug" / "2024-04-25" / "demo_gentex_im128_randcams.hdf5"
    jpeg_file = root / "success_only" / "kitchen_drawer" / "CloseDrawer" / "2024-04-30" / "demo_gentex_im128_randcams.hdf5"
    said = {0: "pick the mug from the counter and place it under the coffee machine dispenser", 1: "place the mug"}
    written = {
        raw_file: write_demo_file(raw_file, ROBOCASA_OBS, {0: 3, 1: 4}, jpeg=False, action_dims=12, instructions=said),
        jpeg_file: write_demo_file(jpeg_file, ROBOCASA_OBS, {0: 5}, jpeg=True, action_dims=12,
                                   instructions={0: "close the drawer"}),
    }
    write_rollout_file(root / "all_episodes" / "CloseDrawer" / ROBOCASA_ROLLOUT.format(1, True),
                       ("primary", "secondary", "wrist"), steps=3, action_dims=12, success=True, instruction="close the drawer")
    episodes = list(iter_robocasa_demos(root))
    assert [(e.task, e.metadata["demo"], e.instruction) for e in episodes] == [
        ("CoffeeSetupMug", 0, said[0]), ("CoffeeSetupMug", 1, said[1]), ("CloseDrawer", 0, "close the drawer")]
    for episode, (path, i) in zip(episodes, [(raw_file, 0), (raw_file, 1), (jpeg_file, 0)]):
        data = written[path][i]
        assert episode.cameras == ["primary", "secondary", "wrist"]
        assert episode.source is Source.DEMO and episode.success
        assert episode.metadata == {"file": str(path), "demo": i}
        assert np.array_equal(episode.actions, data["actions"][:, :7].astype(np.float32))  # arm + gripper of 12
        assert np.array_equal(episode.proprio, data["robot_states"].astype(np.float32))
        for camera, obs in ROBOCASA_VIEWS.items():
            if path == jpeg_file:
                assert episode.images[camera].jpegs == data[obs]
            else:
                assert close_to(episode.images[camera].frames(), data[obs])
    assert [e.num_steps for e in read_robocasa_demo_file(raw_file)] == [3, 4]


def test_robocasa_rollouts_read_back(tmp_path):
    root = tmp_path / "RoboCasa-Cosmos-Policy" / "all_episodes"
    folder = root / "CloseDoubleDoor" / "2024-05-01"
    written = {
        success: write_rollout_file(folder / ROBOCASA_ROLLOUT.format(ep, success), ("primary", "secondary", "wrist"),
                                    steps=4, action_dims=12, success=success, instruction="close the cabinet doors", seed=ep)
        for ep, success in ((2, True), (3, False))
    }
    episodes = list(iter_robocasa_rollouts(root.parent))
    assert [e.success for e in episodes] == [True, False]
    for episode, ep in zip(episodes, (2, 3)):
        data = written[episode.success]
        assert episode.cameras == ["primary", "secondary", "wrist"]
        assert episode.source is Source.SIM and episode.task == "CloseDoubleDoor"
        assert episode.instruction == "close the cabinet doors"
        assert all(episode.images[c].jpegs == data[c] for c in ("primary", "secondary", "wrist"))
        assert np.array_equal(episode.actions, data["actions"][:, :7].astype(np.float32))
        assert np.array_equal(episode.proprio, data["proprio"].astype(np.float32))
        path = folder / ROBOCASA_ROLLOUT.format(ep, episode.success)
        assert episode.metadata == {"task": "close_the_cabinet_doors", "ep": ep, "file": str(path)}


# ----------------------------------------------------------------------------------------------- ALOHA


@pytest.fixture
def aloha_release(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "ALOHA-Cosmos-Policy"
    dataset = root / "preprocessed" / "put_candies_in_bowl_1000_steps"
    written = {split: write_aloha_episode(dataset / split, 0, steps=steps) for split, steps in (("train", 5), ("val", 4))}
    return root, written


def test_aloha_episodes_read_back(aloha_release):
    root, written = aloha_release
    episodes = list(iter_aloha_episodes(root))
    assert [e.metadata["split"] for e in episodes] == ["train", "val"]
    for episode in episodes:
        data = written[episode.metadata["split"]]
        assert episode.cameras == ["primary", "left_wrist", "right_wrist"]
        assert episode.source is Source.DEMO and episode.success
        assert episode.instruction == "put candies in bowl" and episode.task == "put_candies_in_bowl"
        assert episode.metadata["control_hz"] == 25 and episode.metadata["dataset"] == "put_candies_in_bowl_1000_steps"
        assert np.array_equal(episode.proprio, data["qpos"]) and np.array_equal(episode.actions, data["action"])
        for camera, cam in zip(episode.cameras, ALOHA_CAMS):
            assert close_to(episode.images[camera].frames(), data[cam], tolerance=6.0)  # MPEG-4 then JPEG q95


def test_aloha_unknown_task_folder_is_an_error(tmp_path):
    write_aloha_episode(tmp_path / "stack_cups" / "train", 0, steps=3)
    path = tmp_path / "stack_cups" / "train" / "episode_0.hdf5"
    expected = "no known task in the dataset folder name 'stack_cups'.*fold_shirt"
    with pytest.raises(EpisodeFileError, match=error_about(path, expected)):
        read_aloha_episode(path)


# ------------------------------------------------------------------------------------------- any kind


def test_iter_dataset_dispatches_on_kind(libero_release, aloha_release):
    libero_root, _ = libero_release
    aloha_root, _ = aloha_release
    assert len(list(iter_dataset("libero_demos", libero_root))) == 3
    assert len(list(iter_dataset("libero_rollouts", libero_root))) == 2
    assert len(list(iter_dataset("aloha", aloha_root))) == 2
    assert set(DATASET_KINDS) == {"libero_demos", "libero_rollouts", "robocasa_demos", "robocasa_rollouts", "aloha"}


def test_unknown_kind_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="libero_demos.*robocasa_rollouts.*'droid'"):
        iter_dataset("droid", tmp_path)


@pytest.mark.parametrize("reader, pattern", [
    (iter_libero_demos, "*_demo.hdf5"), (iter_libero_rollouts, "*.hdf5"), (iter_robocasa_demos, "*.hdf5"),
    (iter_robocasa_rollouts, "*.hdf5"), (iter_aloha_episodes, "*.hdf5"),
])
def test_a_root_without_files_is_an_error_naming_root_and_pattern(tmp_path, reader, pattern):
    (tmp_path / "notes.txt").write_text("no episodes here")
    with pytest.raises(EpisodeFileError, match=rf"{re.escape(str(tmp_path))}: no files matching {re.escape(repr(pattern))}"):
        reader(tmp_path)  # raised at the call, before iteration
    with pytest.raises(EpisodeFileError, match=error_about(tmp_path / "missing", "not found")):
        reader(tmp_path / "missing")


# ------------------------------------------------------------------------------------------ bad files


@pytest.fixture
def libero_file(tmp_path) -> Path:
    path = tmp_path / f"{LIBERO_TASK}_demo.hdf5"
    write_libero_demo_file(path, {0: 4})
    return path


def test_missing_robot_states(libero_file):
    with h5py.File(libero_file, "a") as f:
        del f["data/demo_0/robot_states"]
    with pytest.raises(EpisodeFileError, match=error_about(libero_file, "missing dataset 'data/demo_0/robot_states'")):
        read_libero_demo_file(libero_file)


def test_missing_agentview_images(libero_file):
    with h5py.File(libero_file, "a") as f:
        del f["data/demo_0/obs/agentview_rgb_jpeg"]
    with pytest.raises(EpisodeFileError, match=error_about(libero_file, "missing dataset 'data/demo_0/obs/agentview_rgb_jpeg'")):
        read_libero_demo_file(libero_file)


@pytest.mark.parametrize("actions, expected", [
    (np.zeros((4, 6)), r"/data/demo_0/actions: expected shape \(steps, 7\), got \(4, 6\)"),
    (np.full((4, 7), b"x"), r"/data/demo_0/actions: expected a numeric dataset"),
])
def test_malformed_actions(libero_file, actions, expected):
    with h5py.File(libero_file, "a") as f:
        del f["data/demo_0/actions"]
        f["data/demo_0/actions"] = actions
    with pytest.raises(EpisodeFileError, match=error_about(libero_file, expected)):
        read_libero_demo_file(libero_file)


def test_raw_frames_of_the_wrong_dtype(tmp_path):
    path = tmp_path / "pick_up_the_black_bowl_demo.hdf5"
    write_libero_demo_file(path, {0: 3}, jpeg=False)
    with h5py.File(path, "a") as f:
        frames = f["data/demo_0/obs/eye_in_hand_rgb"][()]
        del f["data/demo_0/obs/eye_in_hand_rgb"]
        f["data/demo_0/obs/eye_in_hand_rgb"] = frames.astype(np.float32)
    with pytest.raises(EpisodeFileError, match=error_about(path, "/data/demo_0/obs/eye_in_hand_rgb: expected uint8 frames")):
        read_libero_demo_file(path)


def test_steps_that_disagree_name_the_demo(libero_file):
    with h5py.File(libero_file, "a") as f:
        states = f["data/demo_0/robot_states"][()]
        del f["data/demo_0/robot_states"]
        f["data/demo_0/robot_states"] = states[:3]
    with pytest.raises(EpisodeFileError, match=error_about(libero_file, "/data/demo_0: proprio: expected 4 steps")):
        read_libero_demo_file(libero_file)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_demo_file(libero_file):
    truncate(libero_file)
    with pytest.raises(EpisodeFileError, match=error_about(libero_file, "truncated")):
        read_libero_demo_file(libero_file)


def test_truncated_aloha_file(aloha_release):
    root, _ = aloha_release
    path = root / "preprocessed" / "put_candies_in_bowl_1000_steps" / "train" / "episode_0.hdf5"
    truncate(path)
    with pytest.raises(EpisodeFileError, match=error_about(path, "truncated")):
        read_aloha_episode(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_jpeg_frame(libero_file, damage):
    with h5py.File(libero_file, "a") as f:
        ds = f["data/demo_0/obs/agentview_rgb_jpeg"]
        jpeg = ds[2].tobytes()
        bad = b"garbage!" * 20 if damage == "garbage" else jpeg[: len(jpeg) // 2]
        ds[2] = np.frombuffer(bad, dtype=np.uint8)
    expected = r"/data/demo_0/obs/agentview_rgb_jpeg\[2\]: corrupt JPEG"
    with pytest.raises(EpisodeFileError, match=error_about(libero_file, expected)):
        read_libero_demo_file(libero_file)


def test_robocasa_demo_without_task_description(tmp_path):
    path = tmp_path / "CloseDrawer" / "demo.hdf5"
    write_demo_file(path, ROBOCASA_OBS, {0: 3}, jpeg=True, action_dims=12)
    with pytest.raises(EpisodeFileError, match=error_about(path, "missing attribute 'task_description' on /data/demo_0")):
        read_robocasa_demo_file(path)


def test_robocasa_rollout_with_the_wrong_action_width(tmp_path):
    path = tmp_path / "all_episodes" / ROBOCASA_ROLLOUT.format(1, True)
    write_rollout_file(path, ("primary", "secondary", "wrist"), steps=3, action_dims=7, success=True, instruction="x")
    with pytest.raises(EpisodeFileError, match=error_about(path, r"/actions: expected shape \(steps, 12\)")):
        list(iter_robocasa_rollouts(tmp_path))


def test_robocasa_rollout_without_its_secondary_camera(tmp_path):
    path = tmp_path / "all_episodes" / ROBOCASA_ROLLOUT.format(1, True)
    write_rollout_file(path, ("primary", "wrist"), steps=3, action_dims=12, success=True, instruction="x")
    with pytest.raises(EpisodeFileError, match=error_about(path, "secondary_images_jpeg")):
        list(iter_robocasa_rollouts(tmp_path))


@pytest.fixture
def aloha_train(aloha_release) -> Path:
    root, _ = aloha_release
    return root / "preprocessed" / "put_candies_in_bowl_1000_steps" / "train"


def test_missing_mp4(aloha_train):
    (aloha_train / "episode_0_cam_left_wrist.mp4").unlink()
    path = aloha_train / "episode_0.hdf5"
    expected = "video_paths/cam_left_wrist: video file .*episode_0_cam_left_wrist.mp4 not found"
    with pytest.raises(EpisodeFileError, match=error_about(path, expected)):
        read_aloha_episode(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_mp4(aloha_train, damage):
    video = aloha_train / "episode_0_cam_high.mp4"
    if damage == "garbage":
        video.write_bytes(b"not a video" * 50)
    else:
        truncate(video)
    path = aloha_train / "episode_0.hdf5"
    with pytest.raises(EpisodeFileError, match=error_about(path, "video_paths/cam_high: .*episode_0_cam_high.mp4")):
        read_aloha_episode(path)


def test_video_paths_that_are_not_strings(aloha_train):
    path = aloha_train / "episode_0.hdf5"
    with h5py.File(path, "a") as f:
        del f["observations/video_paths/cam_right_wrist"]
        f["observations/video_paths/cam_right_wrist"] = np.arange(3)
    expected = "observations/video_paths/cam_right_wrist: expected a scalar string"
    with pytest.raises(EpisodeFileError, match=error_about(path, expected)):
        read_aloha_episode(path)


def test_video_with_a_different_number_of_frames(tmp_path):
    folder = tmp_path / "fold_shirt_1500_steps" / "train"
    write_aloha_episode(folder, 3, steps=5, video_steps=4)
    path = folder / "episode_3.hdf5"
    expected = "video_paths/cam_high: video .* has 4 frames but 'action' has 5 steps"
    with pytest.raises(EpisodeFileError, match=error_about(path, expected)):
        read_aloha_episode(path)


def test_aloha_action_of_the_wrong_width(aloha_train):
    path = aloha_train / "episode_0.hdf5"
    with h5py.File(path, "a") as f:
        del f["action"]
        f["action"] = np.zeros((5, 7), dtype=np.float32)
    with pytest.raises(EpisodeFileError, match=error_about(path, r"/action: expected shape \(steps, 14\), got \(5, 7\)")):
        read_aloha_episode(path)
