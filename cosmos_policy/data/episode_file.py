"""One HDF5 file per episode, in the layout of the official Cosmos Policy rollout files.

Official part (what ``run_libero_eval.py --data_collection`` writes and the official datasets read):
    <camera>_images_jpeg   (T,) variable-length uint8 JPEG q95 bytes (primary, wrist, secondary...)
    proprio                (T, d_p) float32
    actions                (T, d_a) float32
    attrs success (bool), task_description (str)
Ours, added beside it (the official readers ignore them):
    timestamps (T,) float64, initial_state (S,) float64,
    planner/step (Q,), planner/chosen (Q,), planner/candidate_values (Q, N), planner/candidate_actions (Q, N, K, d_a)
    attrs format, format_version, episode_id, task, score, source, seed, policy_version,
          planning_version, interrupted, metadata (JSON)
Files are written to a temporary name, flushed and fsynced, then renamed: a reader (or a replay
service restoring after a crash) sees a complete file or none.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cosmos_policy.atomic import atomic_path
from cosmos_policy.episode import Episode, ImageSequence, PlannerQuery, Source
from cosmos_policy.errors import InputError

FORMAT = "cosmos-policy-online/episode"
FORMAT_VERSION = 1
IMAGE_SUFFIX = "_images_jpeg"
_JPEG_DTYPE = h5py.vlen_dtype(np.dtype("uint8"))


class EpisodeFileError(InputError):
    """An episode file is missing, truncated, or has missing / malformed fields."""


def episode_file_name(episode: Episode) -> str:
    """A name in the spirit of the official rollout files: task, id and outcome in the name."""
    task = re.sub(r"[^A-Za-z0-9_.-]+", "_", episode.task or episode.instruction)[:80] or "task"
    return f"episode_data--task={task}--ep={episode.episode_id}--success={episode.success}.hdf5"


def write_episode(path: str | Path, episode: Episode) -> Path:
    """Write ``episode`` to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for camera, seq in episode.images.items():
                data = np.empty(len(seq), dtype=object)
                data[:] = [np.frombuffer(j, dtype=np.uint8) for j in seq.jpegs]
                f.create_dataset(f"{camera}{IMAGE_SUFFIX}", data=data, dtype=_JPEG_DTYPE)
            f.create_dataset("proprio", data=episode.proprio.astype(np.float32))
            f.create_dataset("actions", data=episode.actions.astype(np.float32))
            if episode.timestamps is not None:
                f.create_dataset("timestamps", data=episode.timestamps)
            if episode.initial_state is not None:
                f.create_dataset("initial_state", data=episode.initial_state)
            if episode.planner:
                _write_planner(f, episode.planner)
            a = f.attrs
            a["success"] = bool(episode.success)
            a["task_description"] = episode.instruction
            a["format"] = FORMAT
            a["format_version"] = FORMAT_VERSION
            a["episode_id"] = episode.episode_id
            a["task"] = episode.task
            a["score"] = float(episode.score)  # type: ignore[arg-type]
            a["source"] = episode.source.value
            a["interrupted"] = bool(episode.interrupted)
            for key in ("seed", "policy_version", "planning_version"):
                value = getattr(episode, key)
                if value is not None:
                    a[key] = int(value)
            a["metadata"] = json.dumps(episode.metadata)
            f.flush()
    return path


def _write_planner(f: h5py.File, queries: list[PlannerQuery]) -> None:
    sizes = {len(q.candidate_values) for q in queries}
    if len(sizes) != 1:
        raise InputError(f"planner: every query of one episode must have the same number of candidates, got {sorted(sizes)}")
    g = f.create_group("planner")
    g.create_dataset("step", data=np.array([q.step for q in queries], dtype=np.int64))
    g.create_dataset("chosen", data=np.array([q.chosen for q in queries], dtype=np.int64))
    g.create_dataset("candidate_values", data=np.stack([q.candidate_values for q in queries]))
    if all(q.candidate_actions is not None for q in queries):
        g.create_dataset("candidate_actions", data=np.stack([q.candidate_actions for q in queries]))  # type: ignore[misc]


@contextmanager
def open_hdf5(path: Path, what: str = "file") -> Iterator[h5py.File]:
    """Open an HDF5 file for reading; any failure while it is read becomes an ``EpisodeFileError`` naming the file."""
    where = str(path)
    if not path.is_file():
        raise EpisodeFileError(f"{where}: {what} not found")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise EpisodeFileError(f"{where}: not a readable HDF5 file, truncated or corrupt ({exc})") from exc
    with f:
        try:
            yield f
        except EpisodeFileError:
            raise
        except InputError as exc:
            raise EpisodeFileError(f"{where}: {exc}") from exc
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise EpisodeFileError(f"{where}: unreadable data, truncated or corrupt ({exc})") from exc


def read_episode(path: str | Path, source: Source | str | None = None) -> Episode:
    """Read an episode file (ours or an official rollout file); errors name the file and field.

    Official rollout files carry no source; ``source`` sets it (default ``sim``). Every field is
    checked for its type and shape as it is read: a damaged file (an attribute of the wrong type,
    a dataset of the wrong shape) is an ``EpisodeFileError`` naming the file and the field, never
    a value silently converted (``bool("no")`` is true) nor an IndexError deep in the reader.
    """
    path = Path(path)
    where = str(path)
    with open_hdf5(path, "episode file") as f:
        # Official eval rollouts may also hold the policy's predicted images per query
        # (future_<camera>_images_jpeg, one frame per query, not per step): not cameras.
        cameras = sorted(k[: -len(IMAGE_SUFFIX)] for k in f.keys() if k.endswith(IMAGE_SUFFIX) and not k.startswith("future_"))
        if not cameras:
            raise EpisodeFileError(f"{where}: no '<camera>{IMAGE_SUFFIX}' dataset (expected e.g. primary{IMAGE_SUFFIX})")
        fmt = _attribute(f, "format", where, f"{FORMAT!r} (or none: an official rollout file)", lambda v: _equal(_as_text(v), FORMAT), None)
        if fmt is not None:
            _attribute(f, "format_version", where, f"{FORMAT_VERSION}", lambda v: _equal(_as_count(v), FORMAT_VERSION))
        images = {cam: read_jpeg_dataset(f, f"{cam}{IMAGE_SUFFIX}", where) for cam in cameras}
        proprio = read_matrix(f, "proprio", where)
        actions = read_matrix(f, "actions", where)
        for cam, seq in images.items():  # named by dataset here; the Episode would say images['<camera>']
            if len(seq) != len(actions):
                raise EpisodeFileError(f"{where}:/{cam}{IMAGE_SUFFIX}: expected {len(actions)} frames (one per step of "
                                       f"actions), got {len(seq)}")
        kwargs: dict[str, Any] = dict(
            instruction=_attribute(f, "task_description", where, "a string", _as_text),
            success=_attribute(f, "success", where, "a bool", _as_flag),
            task=_attribute(f, "task", where, "a string", _as_text, ""),
            score=_attribute(f, "score", where, "a finite number", _as_number, None),
            source=_attribute(f, "source", where, f"one of {[s.value for s in Source]}", _as_source, Source(source or Source.SIM)),
            interrupted=_attribute(f, "interrupted", where, "a bool", _as_flag, False),
            metadata=_attribute(f, "metadata", where, "a JSON object (text)", _as_json_object, {}),
        )
        if source is not None:
            kwargs["source"] = Source(source)
        if "episode_id" in f.attrs:
            kwargs["episode_id"] = _attribute(f, "episode_id", where, "a non-empty string", lambda v: _as_text(v) or None)
        for key in ("seed", "policy_version", "planning_version"):
            if key in f.attrs:
                kwargs[key] = _attribute(f, key, where, "an integer >= 0", _as_count)
        if "timestamps" in f:
            kwargs["timestamps"] = read_vector(f, "timestamps", where)
        if "initial_state" in f:
            kwargs["initial_state"] = read_vector(f, "initial_state", where)
        if "planner" in f:
            kwargs["planner"] = _read_planner(f, where)
        return Episode(images=images, proprio=proprio, actions=actions, **kwargs)


def _dataset(group: h5py.Group, key: str, where: str) -> h5py.Dataset:
    """``group[key]``, which must be a dataset (a group there fails with its own AttributeError later)."""
    if key not in group:
        raise EpisodeFileError(f"{where}: missing dataset {key!r}")
    ds = group[key]
    if not isinstance(ds, h5py.Dataset):
        raise EpisodeFileError(f"{where}:{ds.name}: expected a dataset, got a {type(ds).__name__}")
    return ds


def _values(ds: h5py.Dataset, where: str) -> Any:
    """A dataset's contents; a read that fails (a truncated file) names the dataset."""
    try:
        return ds[()]
    except (OSError, ValueError, TypeError) as exc:
        raise EpisodeFileError(f"{where}:{ds.name}: unreadable data, truncated or corrupt ({exc})") from exc


def read_jpeg_dataset(group: h5py.Group, key: str, where: str) -> ImageSequence:
    """A (T,) dataset of JPEG bytes (vlen uint8 or bytes) -> ImageSequence, header-checked."""
    ds = _dataset(group, key, where)
    if ds.ndim != 1 or not (h5py.check_vlen_dtype(ds.dtype) is not None or ds.dtype.kind in "SO"):
        raise EpisodeFileError(f"{where}:{ds.name}: expected a 1-D dataset of JPEG byte strings, got shape {ds.shape} dtype {ds.dtype}")
    jpegs = []
    for i, item in enumerate(_values(ds, where)):
        if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
            raw = item.tobytes()
        elif isinstance(item, bytes):
            raw = bytes(item)
        else:
            raise EpisodeFileError(f"{where}:{ds.name}[{i}]: expected JPEG bytes, got {type(item).__name__}")
        # Empty: no frame rendered at this step. Otherwise a JPEG starts with SOI (FF D8) and ends
        # with EOI (FF D9): that catches truncated frames cheaply.
        if raw and (len(raw) < 4 or raw[:2] != b"\xff\xd8" or raw.rstrip(b"\x00")[-2:] != b"\xff\xd9"):
            raise EpisodeFileError(f"{where}:{ds.name}[{i}]: corrupt JPEG data (missing start or end marker)")
        jpegs.append(raw)
    return ImageSequence(jpegs, origin=f"{where}:{ds.name}")


def read_matrix(group: h5py.Group, key: str, where: str, dims: int | None = None) -> np.ndarray:
    """A (T, d) numeric dataset -> float32, with shape, dtype and finiteness checked."""
    ds = _dataset(group, key, where)
    if ds.dtype.kind not in "fiu":
        raise EpisodeFileError(f"{where}:{ds.name}: expected a numeric dataset, got dtype {ds.dtype}")
    if ds.ndim != 2 or (dims is not None and ds.shape[1] != dims):
        expected = f"(steps, {dims})" if dims is not None else "(steps, dims)"
        raise EpisodeFileError(f"{where}:{ds.name}: expected shape {expected}, got {ds.shape}")
    with np.errstate(over="ignore"):  # a value beyond float32's range is non-finite, reported below
        arr = _values(ds, where).astype(np.float32)
    if not np.all(np.isfinite(arr)):
        step = int(np.argwhere(~np.isfinite(arr))[0][0])
        raise EpisodeFileError(f"{where}:{ds.name}: non-finite value at step {step}")
    return arr


def read_vector(group: h5py.Group, key: str, where: str) -> np.ndarray:
    """A 1-D numeric dataset of finite values -> float64 (timestamps, a simulator's initial state)."""
    ds = _dataset(group, key, where)
    if ds.dtype.kind not in "fiu" or ds.ndim != 1:
        raise EpisodeFileError(f"{where}:{ds.name}: expected a 1-D numeric dataset, got shape {ds.shape} dtype {ds.dtype}")
    arr = _values(ds, where).astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise EpisodeFileError(f"{where}:{ds.name}: non-finite value at index {int(np.flatnonzero(~np.isfinite(arr))[0])}")
    return arr


def _read_planner(f: h5py.File, where: str) -> list[PlannerQuery]:
    """planner/step and planner/chosen (Q,) integers, candidate_values (Q, N), candidate_actions (Q, N, K, d) if there."""
    g = f["planner"]
    if not isinstance(g, h5py.Group):
        raise EpisodeFileError(f"{where}:/planner: expected a group of datasets, got a {type(g).__name__}")
    shapes = {"step": ("integers", "(queries,)"), "chosen": ("integers", "(queries,)"),
              "candidate_values": ("numbers", "(queries, candidates)"),
              "candidate_actions": ("numbers", "(queries, candidates, chunk, action_dim)")}
    arrays: dict[str, np.ndarray] = {}
    for key, (what, shape) in shapes.items():
        if key == "candidate_actions" and key not in g:
            continue
        ds = _dataset(g, key, where)
        kinds = "iu" if what == "integers" else "fiu"
        if ds.dtype.kind not in kinds or ds.ndim != len(shape.strip("(,)").split(", ")):
            raise EpisodeFileError(f"{where}:{ds.name}: expected {what} of shape {shape}, got shape {ds.shape} dtype {ds.dtype}")
        if len(ds) != len(g["step"]):
            raise EpisodeFileError(f"{where}:{ds.name}: expected {len(g['step'])} rows (one per query, as planner/step), got {len(ds)}")
        arrays[key] = _values(ds, where)
        with np.errstate(over="ignore"):  # beyond float32's range is non-finite as the episode holds it
            finite = what == "integers" or np.all(np.isfinite(arrays[key].astype(np.float32)))
        if not finite:
            raise EpisodeFileError(f"{where}:{ds.name}: non-finite values")
    values, actions = arrays["candidate_values"], arrays.get("candidate_actions")
    if actions is not None and actions.shape[1] != values.shape[1]:
        raise EpisodeFileError(f"{where}:/planner/candidate_actions: expected {values.shape[1]} candidates per query "
                               f"(as planner/candidate_values), got {actions.shape[1]}")
    return [
        PlannerQuery(step=int(arrays["step"][i]), chosen=int(arrays["chosen"][i]), candidate_values=values[i],
                     candidate_actions=None if actions is None else actions[i])
        for i in range(len(values))
    ]


# ---- attributes: each read as the type it must have ------------------------------------
_REQUIRED = object()


def _attribute(f: h5py.File, key: str, where: str, expected: str, convert: Callable[[Any], Any], default: Any = _REQUIRED) -> Any:
    """The root attribute ``key`` through ``convert``, which returns None for a value that is not ``expected``."""
    if key not in f.attrs:
        if default is _REQUIRED:
            raise EpisodeFileError(f"{where}: missing attribute {key!r}")
        return default
    try:
        raw = f.attrs[key]
    except (OSError, TypeError, ValueError) as exc:
        raise EpisodeFileError(f"{where}: attribute {key!r}: unreadable ({exc})") from exc
    value = convert(raw)
    if value is None:
        raise EpisodeFileError(f"{where}: attribute {key!r}: expected {expected}, got {raw!r}")
    return value


def _as_text(value: Any) -> str | None:
    """UTF-8 text: a str, or bytes that decode (h5py hands undecodable bytes back as a str with surrogates)."""
    try:
        text = value.decode() if isinstance(value, bytes) else value
        if isinstance(text, str):
            text.encode()  # a str with surrogates fails here
            return str(text)
    except UnicodeError:
        pass
    return None


def _as_flag(value: Any) -> bool | None:
    """A bool, or an integer 0 / 1 (writers that store flags as integers); not any truthy value."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    return None


def _as_count(value: Any) -> int | None:
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= 0:
        return int(value)
    return None


def _as_number(value: Any) -> float | None:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value):
        return float(value)
    return None


def _as_source(value: Any) -> Source | None:
    text = _as_text(value)
    return Source(text) if text in [s.value for s in Source] else None


def _as_json_object(value: Any) -> dict[str, Any] | None:
    text = _as_text(value)
    try:
        data = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _equal(value: Any, expected: Any) -> Any:
    return value if value == expected else None

