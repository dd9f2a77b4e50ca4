"""Readers for the official Cosmos Policy dataset releases, each episode returned as an ``Episode``.

The layouts below were read off the official code (``cosmos_policy/datasets/{libero,robocasa,aloha}_dataset.py``,
``dataset_utils.py::get_hdf5_files``, ``experiments/robot/robocasa/regenerate_robocasa_dataset.py`` and
``experiments/robot/aloha/preprocess_split_aloha_data.py``) and the method sheet, section 7.

LIBERO-Cosmos-Policy (``nvidia/LIBERO-Cosmos-Policy``)
    ``success_only/<suite>_regen/<TASK_NAME>_demo.hdf5``, robomimic style:
    ``data/demo_<i>/obs/{agentview,eye_in_hand}_rgb_jpeg`` (vlen uint8 JPEG) or raw ``..._rgb`` (T, H, W, 3),
    ``data/demo_<i>/actions`` (T, 7), ``data/demo_<i>/robot_states`` (T, 9, the proprio).
    The instruction is in the file name only; all demos succeeded.
    ``all_episodes/episode_data--suite=..--<stamp>--task=<k>--ep=<n>--success=<bool>--regen_demo.hdf5``: one
    replayed demo (success or failure) per file in the rollout layout of ``episode_file.py``.
RoboCasa-Cosmos-Policy (``nvidia/RoboCasa-Cosmos-Policy``)
    ``success_only/**/<name>.hdf5``, the same robomimic layout with cameras ``robot0_agentview_left``,
    ``robot0_agentview_right``, ``robot0_eye_in_hand`` (raw ``_rgb`` as the regeneration script writes them, or
    ``_rgb_jpeg``), ``actions`` (T, 12: arm 6 + gripper 1 + mobile base 5) and ``robot_states`` (T, 9); the
    instruction is the ``task_description`` attribute of each ``data/demo_<i>`` group. Files keep their path in the
    original RoboCasa tree (the regeneration script mirrors it), so a folder named after one of the 24 tasks names the task.
    ``all_episodes/<Task>/**/episode_data--task=<instruction_with_underscores>--<stamp>--ep=<n>--success=<bool>
    --regen_demo.hdf5``: rollout layout with ``primary`` (left), ``secondary`` (right) and ``wrist`` images and
    12-d actions. The official loader keeps the first 7 action dims of both; so do these readers.
ALOHA-Cosmos-Policy (``nvidia/ALOHA-Cosmos-Policy``)
    ``preprocessed/<raw dataset name>/{train,val}/episode_<i>.hdf5`` with ``observations/qpos`` (T, 14, the
    proprio), ``action`` (T, 14, absolute joint targets), and ``observations/video_paths/<cam>``: a scalar
    UTF-8 string *dataset* holding the MP4 file name, relative to the HDF5 file's folder
    (``episode_<i>_<cam>.mp4``, 256 x 256, 25 fps). The instruction is not stored: the official loader derives
    it from the raw dataset name (the folder two levels above the file) with a fixed table, as done here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import av
import h5py
import numpy as np

from cosmos_policy.data.episode_file import EpisodeFileError, open_hdf5, read_episode, read_jpeg_dataset, read_matrix
from cosmos_policy.episode import Episode, ImageSequence, Source, encode_jpeg
from cosmos_policy.errors import ConfigError, InputError

LIBERO_CAMERAS = {"agentview": "primary", "eye_in_hand": "wrist"}
ROBOCASA_CAMERAS = {"robot0_agentview_left": "primary", "robot0_agentview_right": "secondary", "robot0_eye_in_hand": "wrist"}
ALOHA_CAMERAS = {"cam_high": "primary", "cam_left_wrist": "left_wrist", "cam_right_wrist": "right_wrist"}
PROPRIO_DIMS = 9  # LIBERO and RoboCasa: gripper qpos (2), EEF position (3), EEF quaternion (4)
LIBERO_ACTION_DIMS = 7
ROBOCASA_STORED_ACTION_DIMS = 12
ROBOCASA_ACTION_DIMS = 7  # the 5 mobile-base dims are dropped, as the official loader does
ALOHA_DIMS = 14
ALOHA_HZ = 25
ROBOCASA_TASKS = frozenset({
    "PnPCounterToCab", "PnPCabToCounter", "PnPCounterToSink", "PnPSinkToCounter", "PnPCounterToMicrowave",
    "PnPMicrowaveToCounter", "PnPCounterToStove", "PnPStoveToCounter", "OpenSingleDoor", "CloseSingleDoor",
    "OpenDoubleDoor", "CloseDoubleDoor", "OpenDrawer", "CloseDrawer", "TurnOnStove", "TurnOffStove",
    "TurnOnSinkFaucet", "TurnOffSinkFaucet", "TurnSinkSpout", "CoffeeSetupMug", "CoffeeServeMug",
    "CoffeePressButton", "TurnOnMicrowave", "TurnOffMicrowave",
})
# (substring of the raw dataset folder name, instruction), checked in this order as the official loader does;
# the instructions are the keys of the released t5_embeddings.pkl.
ALOHA_INSTRUCTIONS = (
    ("fold_shirt", "fold shirt"),
    ("candies_in_bowl", "put candies in bowl"),
    ("candy_in_bag", "put candy in bag"),
    ("flatten_shirt", "flatten shirt"),
    ("brown_chicken_wing_on_plate", "put brown chicken wing on plate"),
    ("purple_eggplant_on_plate", "put purple eggplant on plate"),
)
LIBERO_DEMO_SUFFIX = "_demo.hdf5"
_DEMO_KEY = re.compile(r"demo_(\d+)")
_NAME_FIELDS = ("suite", "task", "ep")  # fields of the official rollout file names kept in metadata


# ---------------------------------------------------------------------------------------------- LIBERO


def libero_instruction(file_name: str) -> str:
    """The instruction a LIBERO demo file name encodes: the words after the last ``...SCENE<n>`` word.

    ``KITCHEN_SCENE3_turn_on_the_stove_demo.hdf5`` -> ``turn on the stove``; names without a scene word (LIBERO-Object)
    are all instruction. This is how the official loader gets the text its T5 embeddings are keyed by.
    """
    words = file_name.removesuffix(LIBERO_DEMO_SUFFIX).split("_")
    last_scene = max((i for i, word in enumerate(words) if "SCENE" in word), default=-1)
    return " ".join(words[last_scene + 1 :])


def read_libero_demo_file(path: str | Path) -> list[Episode]:
    """All demos of one ``<TASK_NAME>_demo.hdf5`` file, in numeric demo order."""
    return list(_iter_libero_demo_file(Path(path)))


def iter_libero_demos(root: str | Path) -> Iterator[Episode]:
    """Every demo under ``root`` (the ``success_only`` folder or its parent), file by file."""
    files = _find_files(root, "success_only", f"*{LIBERO_DEMO_SUFFIX}")
    return (episode for path in files for episode in _iter_libero_demo_file(path))


def iter_libero_rollouts(root: str | Path) -> Iterator[Episode]:
    """Every replayed episode under ``root`` (the ``all_episodes`` folder or its parent), successes and failures."""
    files = _find_files(root, "all_episodes", "*.hdf5")
    return (_read_rollout(path, ("primary", "wrist"), LIBERO_ACTION_DIMS, LIBERO_ACTION_DIMS) for path in files)


def _iter_libero_demo_file(path: Path) -> Iterator[Episode]:
    if not path.name.endswith(LIBERO_DEMO_SUFFIX):
        raise EpisodeFileError(f"{path}: LIBERO demo file names end in {LIBERO_DEMO_SUFFIX!r} (the instruction comes from them)")
    instruction = libero_instruction(path.name)
    if not instruction:
        raise EpisodeFileError(f"{path}: the file name holds no instruction after its SCENE word")
    yield from _iter_demo_file(
        path,
        LIBERO_CAMERAS,
        action_dims=LIBERO_ACTION_DIMS,
        keep_action_dims=LIBERO_ACTION_DIMS,
        instruction=lambda group, where: instruction,
        task=path.name.removesuffix(LIBERO_DEMO_SUFFIX),
        metadata={"suite": path.parent.name, "file": str(path)},
    )


# -------------------------------------------------------------------------------------------- RoboCasa


def read_robocasa_demo_file(path: str | Path) -> list[Episode]:
    """All demos of one regenerated RoboCasa demo file, in numeric demo order."""
    return list(_iter_robocasa_demo_file(Path(path)))


def iter_robocasa_demos(root: str | Path) -> Iterator[Episode]:
    """Every demo under ``root`` (the ``success_only`` folder or its parent)."""
    files = _find_files(root, "success_only", "*.hdf5")
    return (episode for path in files for episode in _iter_robocasa_demo_file(path))


def iter_robocasa_rollouts(root: str | Path) -> Iterator[Episode]:
    """Every replayed episode under ``root`` (the ``all_episodes`` folder or its parent), successes and failures."""
    files = _find_files(root, "all_episodes", "*.hdf5")
    cameras = ("primary", "secondary", "wrist")
    return (
        _read_rollout(path, cameras, ROBOCASA_STORED_ACTION_DIMS, ROBOCASA_ACTION_DIMS, task=_robocasa_task(path))
        for path in files
    )


def _iter_robocasa_demo_file(path: Path) -> Iterator[Episode]:
    return _iter_demo_file(
        path,
        ROBOCASA_CAMERAS,
        action_dims=ROBOCASA_STORED_ACTION_DIMS,
        keep_action_dims=ROBOCASA_ACTION_DIMS,
        instruction=_task_description,
        task=_robocasa_task(path),
        metadata={"file": str(path)},
    )


def _robocasa_task(path: Path) -> str:
    """The nearest enclosing folder named after a RoboCasa task (the release keeps RoboCasa's folder tree), else ""."""
    return next((part for part in reversed(path.parts[:-1]) if part in ROBOCASA_TASKS), "")


def _task_description(group: h5py.Group, where: str) -> str:
    """RoboCasa demos carry their instruction (the episode's ``lang``) as a group attribute."""
    if "task_description" not in group.attrs:
        raise EpisodeFileError(f"{where}: missing attribute 'task_description' on {group.name}")
    value = group.attrs["task_description"]
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise EpisodeFileError(f"{where}: attribute 'task_description' on {group.name} is a {type(value).__name__}, not a string")
    return value


# ----------------------------------------------------------------------------------------------- ALOHA


def aloha_instruction(path: str | Path) -> tuple[str, str]:
    """(task, instruction) of a preprocessed ALOHA episode, from the raw dataset folder two levels above it."""
    path = Path(path)
    folder = path.parent.parent.name
    for key, instruction in ALOHA_INSTRUCTIONS:
        if key in folder:
            return instruction.replace(" ", "_"), instruction
    known = [key for key, _ in ALOHA_INSTRUCTIONS]
    raise EpisodeFileError(f"{path}: no known task in the dataset folder name {folder!r} (expected it to contain one of {known})")


def read_aloha_episode(path: str | Path) -> Episode:
    """One preprocessed ALOHA episode with its three MP4 videos (a successful demo at 25 Hz)."""
    path = Path(path)
    where = str(path)
    task, instruction = aloha_instruction(path)
    with open_hdf5(path) as f:
        proprio = read_matrix(f, "observations/qpos", where, dims=ALOHA_DIMS)
        actions = read_matrix(f, "action", where, dims=ALOHA_DIMS)
        names = {camera: _string_dataset(f, f"observations/video_paths/{camera}", where) for camera in ALOHA_CAMERAS}
    images = {}
    for camera, name in names.items():
        video = path.parent / name  # relative to the HDF5 file's folder, as the official loader resolves it
        field = f"{where}: observations/video_paths/{camera}"
        frames = _read_video(video, field)
        if len(frames) != len(actions):
            raise EpisodeFileError(f"{field}: video {video} has {len(frames)} frames but 'action' has {len(actions)} steps")
        images[ALOHA_CAMERAS[camera]] = frames
    metadata = {"file": where, "dataset": path.parent.parent.name, "split": path.parent.name, "control_hz": ALOHA_HZ}
    try:
        return Episode(images=images, proprio=proprio, actions=actions, instruction=instruction, success=True, task=task,
                       source=Source.DEMO, metadata=metadata)
    except InputError as exc:
        raise EpisodeFileError(f"{where}: {exc}") from exc


def iter_aloha_episodes(root: str | Path) -> Iterator[Episode]:
    """Every preprocessed episode (train and val) under ``root`` (the ``preprocessed`` folder or its parent)."""
    files = _find_files(root, "preprocessed", "*.hdf5")
    return (read_aloha_episode(path) for path in files)


def _string_dataset(f: h5py.File, key: str, where: str) -> str:
    """A scalar string dataset (how ``preprocess_split_aloha_data.py`` stores each video's file name)."""
    if key not in f:
        raise EpisodeFileError(f"{where}: missing dataset {key!r}")
    ds = f[key]
    value = ds[()] if isinstance(ds, h5py.Dataset) and ds.shape == () else None
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str) or not value:
        raise EpisodeFileError(f"{where}: {key}: expected a scalar string dataset naming an MP4 file")
    return value


def _read_video(video: Path, field: str) -> ImageSequence:
    """Decode an MP4 with PyAV, JPEG-encoding (q95) each frame as it comes so a 1,500-step video never sits raw in RAM."""
    if not video.is_file():
        raise EpisodeFileError(f"{field}: video file {video} not found")
    try:
        with av.open(str(video)) as container:
            if not container.streams.video:
                raise EpisodeFileError(f"{field}: no video stream in {video} (truncated, or not a video)")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            jpegs = [encode_jpeg(frame.to_ndarray(format="rgb24")) for frame in container.decode(stream)]
    except (av.FFmpegError, OSError) as exc:
        raise EpisodeFileError(f"{field}: cannot decode video {video} ({exc})") from exc
    return ImageSequence(jpegs, origin=f"{field} ({video.name})")


# ------------------------------------------------------------------------------------------- any kind

_READERS: dict[str, Callable[[str | Path], Iterator[Episode]]] = {
    "libero_demos": iter_libero_demos,
    "libero_rollouts": iter_libero_rollouts,
    "robocasa_demos": iter_robocasa_demos,
    "robocasa_rollouts": iter_robocasa_rollouts,
    "aloha": iter_aloha_episodes,
}
DATASET_KINDS = tuple(_READERS)


def iter_dataset(kind: str, root: str | Path) -> Iterator[Episode]:
    """The episodes of one official dataset; ``kind`` is one of ``DATASET_KINDS``."""
    if kind not in _READERS:
        raise ConfigError(f"dataset kind: expected one of {list(DATASET_KINDS)}, got {kind!r}")
    return _READERS[kind](root)


# ------------------------------------------------------------------------------------ shared plumbing


def _find_files(root: str | Path, subdir: str, pattern: str) -> list[Path]:
    """Files matching ``pattern`` anywhere under ``root/subdir`` (or ``root`` when it has no such folder), sorted.

    Symlinked folders are followed like the official ``get_hdf5_files`` does. Looking inside ``subdir`` first keeps
    ``success_only`` and ``all_episodes`` apart when given the release's top folder: the rollout names end in
    ``--regen_demo.hdf5`` and would otherwise pass for LIBERO demo files.
    """
    root = Path(root)
    if not root.is_dir():
        raise EpisodeFileError(f"{root}: dataset root not found or not a folder")
    base = root / subdir if (root / subdir).is_dir() else root
    found = sorted(
        Path(folder) / name
        for folder, _, names in os.walk(base, followlinks=True)
        for name in names
        if fnmatch.fnmatchcase(name, pattern)
    )
    if not found:
        raise EpisodeFileError(f"{root}: no files matching {pattern!r} under {base} (searched recursively)")
    return found


def _iter_demo_file(
    path: Path,
    cameras: Mapping[str, str],
    action_dims: int,
    keep_action_dims: int,
    instruction: Callable[[h5py.Group, str], str],
    task: str,
    metadata: dict[str, object],
) -> Iterator[Episode]:
    """The demos of a robomimic-style file (``data/demo_<i>/...``), read one at a time while the file stays open."""
    where = str(path)
    with open_hdf5(path) as f:
        for key, index in _demo_keys(f, where):
            base = f"data/{key}"
            images = {name: _read_camera(f, f"{base}/obs/{prefix}", where) for prefix, name in cameras.items()}
            actions = read_matrix(f, f"{base}/actions", where, dims=action_dims)[:, :keep_action_dims]
            proprio = read_matrix(f, f"{base}/robot_states", where, dims=PROPRIO_DIMS)
            text = instruction(f[base], where)
            try:
                episode = Episode(images=images, proprio=proprio, actions=actions, instruction=text, success=True, task=task,
                                  source=Source.DEMO, metadata={**metadata, "demo": index})
            except InputError as exc:
                raise EpisodeFileError(f"{where}:/{base}: {exc}") from exc
            yield episode


def _demo_keys(f: h5py.File, where: str) -> list[tuple[str, int]]:
    """``demo_<i>`` groups sorted by ``i`` (numerically: demo_10 comes after demo_2, as in the official loaders)."""
    if not isinstance(f.get("data"), h5py.Group):
        raise EpisodeFileError(f"{where}: missing group 'data' (expected data/demo_<i>)")
    keys = [(key, int(match.group(1))) for key in f["data"] if (match := _DEMO_KEY.fullmatch(key))]
    if not keys:
        raise EpisodeFileError(f"{where}: no 'data/demo_<i>' groups")
    return sorted(keys, key=lambda item: item[1])


def _read_camera(f: h5py.File, stem: str, where: str) -> ImageSequence:
    """``<stem>_rgb_jpeg`` kept byte for byte, else raw ``<stem>_rgb`` frames encoded as JPEG q95."""
    jpeg_key, raw_key = f"{stem}_rgb_jpeg", f"{stem}_rgb"
    if jpeg_key in f:
        return read_jpeg_dataset(f, jpeg_key, where)
    if raw_key in f:
        ds = f[raw_key]
        if ds.dtype != np.uint8 or ds.ndim != 4 or ds.shape[-1] != 3:
            expected = "uint8 frames of shape (steps, height, width, 3)"
            raise EpisodeFileError(f"{where}:{ds.name}: expected {expected}, got {ds.dtype} {ds.shape}")
        return ImageSequence.from_frames(ds[()], name=f"{where}:{ds.name}")
    raise EpisodeFileError(f"{where}: missing dataset {jpeg_key!r} (JPEG frames) or {raw_key!r} (raw frames)")


def _read_rollout(path: Path, cameras: tuple[str, ...], action_dims: int, keep_action_dims: int, task: str = "") -> Episode:
    """An official rollout file (``read_episode``), checked for the benchmark's cameras and widths.

    ``suite``, ``task`` and ``ep`` from the official file name go into the metadata.
    """
    where = str(path)
    episode = read_episode(path, source=Source.SIM)
    missing = [f"{camera}_images_jpeg" for camera in cameras if camera not in episode.images]
    if missing:
        raise EpisodeFileError(f"{where}: missing dataset(s) {missing}")
    for field, value, dims in (("actions", episode.actions, action_dims), ("proprio", episode.proprio, PROPRIO_DIMS)):
        if value.shape[1] != dims:
            raise EpisodeFileError(f"{where}:/{field}: expected shape (steps, {dims}), got {value.shape}")
    metadata = {**episode.metadata, **_name_fields(path.name), "file": where}
    actions = episode.actions[:, :keep_action_dims]
    return dataclasses.replace(episode, actions=actions, task=episode.task or task, metadata=metadata)


def _name_fields(name: str) -> dict[str, str | int]:
    """``suite``/``task``/``ep`` from ``episode_data--suite=libero_10--<stamp>--task=3--ep=7--success=True--....hdf5``."""
    fields: dict[str, str | int] = {}
    for part in Path(name).stem.split("--"):
        key, sep, value = part.partition("=")
        if sep and key in _NAME_FIELDS:
            fields[key] = int(value) if value.isdigit() else value
    return fields
