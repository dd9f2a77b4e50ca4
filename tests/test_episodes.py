"""The episode record and its HDF5 file: exact round trips, validation, and clear errors on bad files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from cosmos_policy.data.episode_file import EpisodeFileError, episode_file_name, read_episode, write_episode
from cosmos_policy.episode import Episode, ImageSequence, PlannerQuery, Source, encode_jpeg, jpeg_round_trip
from cosmos_policy.errors import InputError


def make_episode(steps: int = 6, size: int = 32, success: bool = True, seed: int = 0, **kwargs) -> Episode:
    rng = np.random.default_rng(seed)
    frames = {cam: rng.integers(0, 256, (steps, size, size, 3), dtype=np.uint8) for cam in ("primary", "wrist")}
    defaults = dict(
        instruction="put the bowl on the plate",
        success=success,
        task="libero_spatial/3",
        source=Source.SIM,
        seed=195,
        initial_state=rng.normal(size=20),
        policy_version=4,
        planning_version=5,
        planner=[PlannerQuery(step=0, candidate_values=[0.2, 0.7, 0.4], chosen=1, candidate_actions=rng.normal(size=(3, 4, 7)))],
        timestamps=1.7e9 + np.arange(steps) * 0.05,
        metadata={"suite": "libero_spatial", "trial": 3},
    )
    defaults.update(kwargs)
    return Episode.from_frames(frames, proprio=rng.normal(size=(steps, 9)), actions=rng.normal(size=(steps, 7)), **defaults)


def assert_same(a: Episode, b: Episode) -> None:
    assert a.images == b.images  # JPEG bytes identical
    for field in ("proprio", "actions", "timestamps", "initial_state"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    for field in ("instruction", "success", "task", "score", "source", "seed", "policy_version", "planning_version",
                  "interrupted", "episode_id", "metadata"):
        assert getattr(a, field) == getattr(b, field), field
    assert len(a.planner) == len(b.planner)
    for qa, qb in zip(a.planner, b.planner):
        assert qa.step == qb.step and qa.chosen == qb.chosen
        assert np.array_equal(qa.candidate_values, qb.candidate_values)
        assert np.array_equal(qa.candidate_actions, qb.candidate_actions)


def test_episode_written_and_read_back_is_identical(tmp_path):
    ep = make_episode()
    path = write_episode(tmp_path / episode_file_name(ep), ep)
    assert "success=True" in path.name and path.suffix == ".hdf5"
    back = read_episode(path)
    assert_same(ep, back)
    assert np.array_equal(back.frame("wrist", 3), ep.frame("wrist", 3))
    raw = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)  # make_episode's primary frames
    assert np.array_equal(ep.frame("primary", 3), jpeg_round_trip(raw[3]))  # JPEG q95 at rest
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_the_file_has_the_official_rollout_layout(tmp_path):
    path = write_episode(tmp_path / "ep.hdf5", make_episode(success=False))
    with h5py.File(path, "r") as f:
        assert {"primary_images_jpeg", "wrist_images_jpeg", "proprio", "actions"} <= set(f.keys())
        assert f["primary_images_jpeg"].shape == (6,) and f["primary_images_jpeg"][0].dtype == np.uint8
        assert f["proprio"].shape == (6, 9) and f["actions"].dtype == np.float32
        assert not bool(f.attrs["success"]) and f.attrs["task_description"] == "put the bowl on the plate"


def test_official_rollout_files_read(tmp_path):
    """A file with only the official fields, as run_libero_eval.py --data_collection writes it."""
    rng = np.random.default_rng(1)
    path = tmp_path / "episode_data--suite=libero_goal--task=2--ep=4--success=False--regen_demo.hdf5"
    jpegs = [encode_jpeg(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(5)]
    with h5py.File(path, "w") as f:
        for cam in ("primary", "wrist"):
            f.create_dataset(f"{cam}_images_jpeg", data=[np.frombuffer(j, np.uint8) for j in jpegs], dtype=h5py.vlen_dtype(np.uint8))
        f.create_dataset("proprio", data=rng.normal(size=(5, 9)).astype(np.float32))
        f.create_dataset("actions", data=rng.normal(size=(5, 7)).astype(np.float32))
        f.attrs["success"] = False
        f.attrs["task_description"] = "open the top drawer"
    ep = read_episode(path, source="sim")
    assert ep.num_steps == 5 and not ep.success and ep.score == 0.0 and ep.source is Source.SIM
    assert ep.images["primary"].jpegs == jpegs and ep.instruction == "open the top drawer"


def test_rewriting_replaces_the_file_completely(tmp_path):
    path = tmp_path / "ep.hdf5"
    write_episode(path, make_episode(steps=8))
    second = make_episode(steps=5, seed=3, planner=[])
    write_episode(path, second)
    assert_same(second, read_episode(path))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(proprio=np.zeros((5, 9))), r"proprio: expected 6 steps"),
        (dict(actions=np.full((6, 7), np.nan)), r"actions: non-finite value at step 0, dim 0"),
        (dict(source="simulator"), r"source: expected one of \['demo', 'sim', 'robot'\]"),
        (dict(success="yes"), r"success: expected a bool"),
        (dict(score=float("inf")), r"score: expected a finite number"),
        (dict(timestamps=np.zeros(3)), r"timestamps: expected 6 values"),
        (dict(planner=[PlannerQuery(step=9, candidate_values=[0.1], chosen=0)]), r"planner.step: query at step 9"),
    ],
)
def test_invalid_episodes_are_refused_on_construction(kwargs, message):
    ep = make_episode()
    fields = dict(images=ep.images, proprio=ep.proprio, actions=ep.actions, instruction=ep.instruction, success=True)
    fields.update(kwargs)
    with pytest.raises(InputError, match=message):
        Episode(**fields)


def test_invalid_planner_queries_and_frames():
    with pytest.raises(InputError, match=r"planner.chosen: expected an index in \[0, 2\)"):
        PlannerQuery(step=0, candidate_values=[0.1, 0.2], chosen=2)
    with pytest.raises(InputError, match=r"images\['wrist'\]: expected uint8 frames"):
        Episode.from_frames({"wrist": np.zeros((2, 8, 8, 3), np.float32)}, proprio=np.zeros((2, 1)), actions=np.zeros((2, 1)),
                            instruction="x", success=False)
    seq = ImageSequence([b"not a jpeg"], origin="ep.hdf5:/primary_images_jpeg")
    with pytest.raises(InputError, match=r"ep.hdf5:/primary_images_jpeg\[0\]: corrupt JPEG data"):
        seq.frame(0)


def _broken_copy(tmp_path, edit):
    path = write_episode(tmp_path / "ep.hdf5", make_episode())
    with h5py.File(path, "a") as f:
        edit(f)
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda f: f.__delitem__("proprio"), r"ep.hdf5: missing dataset 'proprio'"),
        (lambda f: f.attrs.__delitem__("success"), r"ep.hdf5: missing attribute 'success'"),
        (lambda f: (f.__delitem__("actions"), f.create_dataset("actions", data=np.zeros(6))), r"ep.hdf5:/actions: expected shape \(steps, dims\), got \(6,\)"),
        (lambda f: (f.__delitem__("actions"), f.create_dataset("actions", data=np.array([b"a"] * 6))), r"ep.hdf5:/actions: expected a numeric dataset"),
        (lambda f: (f.__delitem__("proprio"), f.create_dataset("proprio", data=np.zeros((4, 9)))), r"ep.hdf5: proprio: expected 6 steps"),
        (lambda f: f["proprio"].__setitem__((2, 1), np.nan), r"ep.hdf5:/proprio: non-finite value at step 2"),
        (lambda f: (f.__delitem__("primary_images_jpeg"), f.__delitem__("wrist_images_jpeg")), r"no '<camera>_images_jpeg' dataset"),
    ],
)
def test_bad_files_name_the_file_and_the_field(tmp_path, edit, message):
    with pytest.raises(EpisodeFileError, match=message):
        read_episode(_broken_copy(tmp_path, edit))


def test_truncated_and_corrupt_files(tmp_path):
    path = write_episode(tmp_path / "ep.hdf5", make_episode())
    data = path.read_bytes()
    truncated = tmp_path / "truncated.hdf5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(EpisodeFileError, match=r"truncated.hdf5: .*(truncated or corrupt)"):
        read_episode(truncated)
    with h5py.File(path, "a") as f:
        ds = f["wrist_images_jpeg"]
        frame = ds[2]
        ds[2] = frame[: len(frame) // 2]  # a frame cut off mid-stream
    with pytest.raises(EpisodeFileError, match=r"ep.hdf5:/wrist_images_jpeg\[2\]: corrupt JPEG data"):
        read_episode(path)
    with pytest.raises(EpisodeFileError, match="episode file not found"):
        read_episode(tmp_path / "missing.hdf5")


def test_predicted_future_images_of_official_eval_rollouts_are_not_cameras(tmp_path):
    path = write_episode(tmp_path / "ep.hdf5", make_episode())
    with h5py.File(path, "a") as f:
        data = np.empty(1, dtype=object)
        data[0] = f["primary_images_jpeg"][0]
        f.create_dataset("future_primary_images_jpeg", data=data, dtype=h5py.vlen_dtype(np.uint8))
    assert read_episode(path).cameras == ["primary", "wrist"]


def test_sparse_frames_round_trip_and_sample_steps(tmp_path):
    """Runners render at query steps only: frames exist every 4th step (and at the last)."""
    ep = make_episode(steps=13)
    keep = {0, 4, 8, 12}
    for seq in ep.images.values():
        seq._jpegs = [j if t in keep else b"" for t, j in enumerate(seq.jpegs)]
    assert ep.sample_steps(4).tolist() == [0, 4, 8, 12]  # t and min(t + 4, 12) both rendered
    assert ep.sample_steps(6).tolist() == [8, 12]  # 0 + 6 and 4 + 6 are not rendered; 8 + 6 -> 12 is
    with pytest.raises(InputError, match=r"\[5\]: no frame was rendered at this step"):
        ep.frame("wrist", 5)
    back = read_episode(write_episode(tmp_path / "sparse.hdf5", ep))
    assert back.images == ep.images and back.sample_steps(4).tolist() == [0, 4, 8, 12]
