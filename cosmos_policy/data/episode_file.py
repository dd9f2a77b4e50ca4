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
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cosmos_policy.codec import atomic_path
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

    Official rollout files carry no source; ``source`` sets it (default ``sim``).
    """
    path = Path(path)
    where = str(path)
    with open_hdf5(path, "episode file") as f:
        # Official eval rollouts may also hold the policy's predicted images per query
        # (future_<camera>_images_jpeg, one frame per query, not per step): not cameras.
        cameras = sorted(k[: -len(IMAGE_SUFFIX)] for k in f.keys() if k.endswith(IMAGE_SUFFIX) and not k.startswith("future_"))
        if not cameras:
            raise EpisodeFileError(f"{where}: no '<camera>{IMAGE_SUFFIX}' dataset (expected e.g. primary{IMAGE_SUFFIX})")
        images = {cam: read_jpeg_dataset(f, f"{cam}{IMAGE_SUFFIX}", where) for cam in cameras}
        proprio = read_matrix(f, "proprio", where)
        actions = read_matrix(f, "actions", where)
        a = f.attrs
        if "success" not in a:
            raise EpisodeFileError(f"{where}: missing attribute 'success'")
        if "task_description" not in a:
            raise EpisodeFileError(f"{where}: missing attribute 'task_description'")
        kwargs: dict[str, Any] = dict(
            instruction=_text(a["task_description"]),
            success=bool(a["success"]),
            task=_text(a.get("task", "")),
            score=float(a["score"]) if "score" in a else None,
            source=Source(_text(a["source"])) if "source" in a else Source(source or Source.SIM),
            interrupted=bool(a.get("interrupted", False)),
            metadata=json.loads(_text(a["metadata"])) if "metadata" in a else {},
        )
        if source is not None:
            kwargs["source"] = Source(source)
        if "episode_id" in a:
            kwargs["episode_id"] = _text(a["episode_id"])
        for key in ("seed", "policy_version", "planning_version"):
            if key in a:
                kwargs[key] = int(a[key])
        if "timestamps" in f:
            kwargs["timestamps"] = f["timestamps"][()]
        if "initial_state" in f:
            kwargs["initial_state"] = f["initial_state"][()]
        if "planner" in f:
            kwargs["planner"] = _read_planner(f["planner"], where)
        return Episode(images=images, proprio=proprio, actions=actions, **kwargs)


def read_jpeg_dataset(group: h5py.Group, key: str, where: str) -> ImageSequence:
    """A (T,) dataset of JPEG bytes (vlen uint8 or bytes) -> ImageSequence, header-checked."""
    if key not in group:
        raise EpisodeFileError(f"{where}: missing dataset {key!r}")
    ds = group[key]
    if ds.ndim != 1:
        raise EpisodeFileError(f"{where}:{ds.name}: expected a 1-D dataset of JPEG byte strings, got shape {ds.shape}")
    jpegs = []
    for i, item in enumerate(ds[()]):
        raw = item.tobytes() if isinstance(item, np.ndarray) else bytes(item)
        # Empty: no frame rendered at this step. Otherwise a JPEG starts with SOI (FF D8) and ends
        # with EOI (FF D9): that catches truncated frames cheaply.
        if raw and (len(raw) < 4 or raw[:2] != b"\xff\xd8" or raw.rstrip(b"\x00")[-2:] != b"\xff\xd9"):
            raise EpisodeFileError(f"{where}:{ds.name}[{i}]: corrupt JPEG data (missing start or end marker)")
        jpegs.append(raw)
    return ImageSequence(jpegs, origin=f"{where}:{ds.name}")


def read_matrix(group: h5py.Group, key: str, where: str, dims: int | None = None) -> np.ndarray:
    """A (T, d) numeric dataset -> float32, with shape, dtype and finiteness checked."""
    if key not in group:
        raise EpisodeFileError(f"{where}: missing dataset {key!r}")
    ds = group[key]
    if ds.dtype.kind not in "fiu":
        raise EpisodeFileError(f"{where}:{ds.name}: expected a numeric dataset, got dtype {ds.dtype}")
    if ds.ndim != 2 or (dims is not None and ds.shape[1] != dims):
        expected = f"(steps, {dims})" if dims is not None else "(steps, dims)"
        raise EpisodeFileError(f"{where}:{ds.name}: expected shape {expected}, got {ds.shape}")
    arr = ds[()].astype(np.float32)
    if not np.all(np.isfinite(arr)):
        step = int(np.argwhere(~np.isfinite(arr))[0][0])
        raise EpisodeFileError(f"{where}:{ds.name}: non-finite value at step {step}")
    return arr


def _read_planner(g: h5py.Group, where: str) -> list[PlannerQuery]:
    for key in ("step", "chosen", "candidate_values"):
        if key not in g:
            raise EpisodeFileError(f"{where}: missing dataset 'planner/{key}'")
    steps, chosen, values = g["step"][()], g["chosen"][()], g["candidate_values"][()]
    actions = g["candidate_actions"][()] if "candidate_actions" in g else None
    return [
        PlannerQuery(step=int(steps[i]), chosen=int(chosen[i]), candidate_values=values[i], candidate_actions=None if actions is None else actions[i])
        for i in range(len(steps))
    ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
