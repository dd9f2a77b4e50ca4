"""The one episode record: demonstrations, simulator rollouts and robot rollouts alike.

Per step: one image per camera (uint8 H x W x 3, held JPEG-encoded at rest), the proprio state,
and the action executed after that observation. Per episode: what was attempted (task,
instruction), how it went (success, score), how to reproduce it (seed, initial state), which
weights acted (policy and planning-model versions), what the planner saw at each query
(candidate values, the chosen candidate), wall-clock timestamps, and where it came from.

Validation happens on construction, and again where an episode enters replay (``Episode.validate``:
an episode is a mutable dataclass, and a field set after construction must not reach replay's files
unchecked), so a malformed episode never reaches replay or the learner; errors name the field and
what was expected.
"""

from __future__ import annotations

import io
import math
import numbers
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from cosmos_policy.errors import InputError

JPEG_QUALITY = 95  # the official datasets' quality (method 3.7)


class Source(str, Enum):
    DEMO = "demo"
    SIM = "sim"
    ROBOT = "robot"


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """uint8 (H, W, 3) -> JPEG bytes (4:2:0, as PIL and the official code write them)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data: bytes | np.ndarray, where: str = "jpeg") -> np.ndarray:
    """JPEG bytes -> uint8 (H, W, 3); a corrupt stream raises ``InputError`` naming ``where``."""
    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format != "JPEG":
                raise InputError(f"{where}: not a JPEG image (format {img.format})")
            return np.array(img.convert("RGB"))  # a writable copy: torch.from_numpy warns on read-only arrays
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{where}: corrupt JPEG data ({exc})") from exc


def jpeg_round_trip(image: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """What training images went through: encode at quality 95 and decode (applied to live frames)."""
    return decode_jpeg(encode_jpeg(image, quality))


class ImageSequence:
    """One camera's frames: JPEG bytes at rest, decoded one frame at a time on demand.

    A frame may be absent (empty bytes): runners render cameras only at policy-query steps, so
    an episode they record has images at the steps a training sample can start from (and at its
    future step) and nothing in between. ``present`` says which steps have a frame.
    """

    def __init__(self, jpegs: Sequence[bytes], shape: tuple[int, int] | None = None, origin: str = "images") -> None:
        self._jpegs = [bytes(j) for j in jpegs]
        self._shape = shape
        self.origin = origin  # named in decode errors, e.g. "ep.hdf5:primary_images_jpeg"

    @classmethod
    def from_frames(cls, frames: np.ndarray | Sequence[np.ndarray], quality: int = JPEG_QUALITY, name: str = "images") -> "ImageSequence":
        arr = np.asarray(frames) if not isinstance(frames, np.ndarray) else frames
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise InputError(f"{name}: expected uint8 frames of shape (steps, height, width, 3), got {arr.dtype} {arr.shape}")
        return cls([encode_jpeg(f, quality) for f in arr], shape=(arr.shape[1], arr.shape[2]), origin=name)

    def __len__(self) -> int:
        return len(self._jpegs)

    @property
    def jpegs(self) -> list[bytes]:
        return self._jpegs

    @property
    def nbytes(self) -> int:
        return sum(len(j) for j in self._jpegs)

    def frame(self, t: int) -> np.ndarray:
        if not -len(self._jpegs) <= t < len(self._jpegs):
            raise IndexError(f"{self.origin}: step {t} out of range for {len(self._jpegs)} frames")
        if not self._jpegs[t]:
            raise InputError(f"{self.origin}[{t}]: no frame was rendered at this step")
        return decode_jpeg(self._jpegs[t], f"{self.origin}[{t}]")

    def frames(self) -> np.ndarray:
        return np.stack([self.frame(t) for t in range(len(self)) if self._jpegs[t]])

    @property
    def present(self) -> np.ndarray:
        """(T,) bool: which steps have a frame."""
        return np.array([bool(j) for j in self._jpegs], dtype=bool)

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the frames (read from the first present frame when not known)."""
        if self._shape is None:
            first = next((t for t, j in enumerate(self._jpegs) if j), None)
            if first is None:
                raise InputError(f"{self.origin}: no frame at any step")
            self._shape = tuple(self.frame(first).shape[:2])  # type: ignore[assignment]
        return self._shape  # type: ignore[return-value]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageSequence) and self._jpegs == other._jpegs


@dataclass
class PlannerQuery:
    """What the planner saw at one policy query."""

    step: int  # the episode step at which the chunk was chosen
    candidate_values: np.ndarray  # (N,) aggregated value of each candidate, [0, 1]
    chosen: int  # index of the executed candidate
    candidate_actions: np.ndarray | None = None  # (N, K, d_a) in dataset units, optional
    # What the planner aggregated, for analysis at the query (not kept in episode files):
    member_values: np.ndarray | None = field(default=None, repr=False)  # (N, members) raw value predictions
    seeds: list[int] = field(default_factory=list)  # each candidate's sampling seed

    def __post_init__(self) -> None:
        self.candidate_values = np.asarray(self.candidate_values, dtype=np.float32).reshape(-1)
        n = len(self.candidate_values)
        if n == 0:
            raise InputError("planner.candidate_values: expected at least one candidate")
        if not 0 <= int(self.chosen) < n:
            raise InputError(f"planner.chosen: expected an index in [0, {n}), got {self.chosen}")
        if not np.all(np.isfinite(self.candidate_values)):
            raise InputError("planner.candidate_values: non-finite values")
        if self.candidate_actions is not None:
            self.candidate_actions = np.asarray(self.candidate_actions, dtype=np.float32)
            if self.candidate_actions.ndim != 3 or self.candidate_actions.shape[0] != n:
                raise InputError(f"planner.candidate_actions: expected ({n}, chunk, action_dim), got {self.candidate_actions.shape}")


@dataclass
class Episode:
    """One episode. ``images`` maps camera names (``primary``, ``wrist``...) to their frames."""

    images: dict[str, ImageSequence]
    proprio: np.ndarray  # (T, d_p) float32
    actions: np.ndarray  # (T, d_a) float32, the action executed at each step
    instruction: str
    success: bool
    task: str = ""
    score: float | None = None  # task progress in [0, 1]; defaults to 1.0 / 0.0 from success
    source: Source = Source.SIM
    seed: int | None = None
    initial_state: np.ndarray | None = None  # simulator state to reset to (flattened)
    policy_version: int | None = None
    planning_version: int | None = None
    planner: list[PlannerQuery] = field(default_factory=list)
    timestamps: np.ndarray | None = None  # (T,) seconds since the epoch, per step
    interrupted: bool = False  # ended early (simulator crash, stop); its outcome is not a real label
    episode_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (and bring arrays to their dtypes), raising ``InputError`` naming the field.

        Idempotent: construction runs it, and replay runs it again at insert, for fields changed since.
        """
        self.source = _enum(Source, self.source, "source")
        if not isinstance(self.success, (bool, np.bool_)):
            raise InputError(f"success: expected a bool, got {type(self.success).__name__}")
        self.success = bool(self.success)
        if self.score is None:
            self.score = 1.0 if self.success else 0.0
        if isinstance(self.score, bool) or not isinstance(self.score, numbers.Real):
            raise InputError(f"score: expected a number in [0, 1], got {type(self.score).__name__}")
        self.score = float(self.score)
        if not math.isfinite(self.score):
            raise InputError(f"score: expected a finite number, got {self.score}")
        if not isinstance(self.instruction, str):
            raise InputError(f"instruction: expected a string, got {type(self.instruction).__name__}")
        if not isinstance(self.task, str):
            raise InputError(f"task: expected a string, got {type(self.task).__name__}")
        for name in ("seed", "policy_version", "planning_version"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise InputError(f"{name}: expected an int or None, got {type(value).__name__} {value!r}")
        if not isinstance(self.interrupted, (bool, np.bool_)):
            raise InputError(f"interrupted: expected a bool, got {type(self.interrupted).__name__}")
        if not isinstance(self.episode_id, str) or not self.episode_id:
            raise InputError(f"episode_id: expected a non-empty string, got {self.episode_id!r}")
        if not isinstance(self.metadata, dict):
            raise InputError(f"metadata: expected a dict, got {type(self.metadata).__name__}")
        self.proprio = _matrix(self.proprio, "proprio")
        self.actions = _matrix(self.actions, "actions")
        steps = len(self.actions)
        if steps == 0:
            raise InputError("actions: an episode needs at least one step")
        if len(self.proprio) != steps:
            raise InputError(f"proprio: expected {steps} steps (as many as actions), got {len(self.proprio)}")
        if not isinstance(self.images, dict) or not self.images:
            raise InputError(f"images: an episode needs at least one camera (a dict camera -> ImageSequence), got {self.images!r:.80}")
        for name, seq in self.images.items():
            if not isinstance(name, str) or not name:
                raise InputError(f"images: camera names must be non-empty strings, got {name!r}")
            if not isinstance(seq, ImageSequence):
                raise InputError(f"images[{name!r}]: expected an ImageSequence, got {type(seq).__name__}")
            if len(seq) != steps:
                raise InputError(f"images[{name!r}]: expected {steps} frames (as many as actions), got {len(seq)}")
        if self.timestamps is not None:
            self.timestamps = _numbers(self.timestamps, "timestamps").reshape(-1)
            if len(self.timestamps) != steps:
                raise InputError(f"timestamps: expected {steps} values, got {len(self.timestamps)}")
        if self.initial_state is not None:
            self.initial_state = _numbers(self.initial_state, "initial_state")
        if not isinstance(self.planner, list):
            raise InputError(f"planner: expected a list of PlannerQuery, got {type(self.planner).__name__}")
        for q in self.planner:
            if not isinstance(q, PlannerQuery):
                raise InputError(f"planner: expected PlannerQuery entries, got {type(q).__name__}")
            if not 0 <= q.step < steps:
                raise InputError(f"planner.step: query at step {q.step} is outside the episode's {steps} steps")

    @property
    def num_steps(self) -> int:
        return len(self.actions)

    @property
    def cameras(self) -> list[str]:
        return list(self.images)

    @property
    def nbytes(self) -> int:
        """Approximate size at rest: JPEG bytes plus the arrays."""
        return sum(s.nbytes for s in self.images.values()) + self.proprio.nbytes + self.actions.nbytes

    def sample_steps(self, chunk: int) -> np.ndarray:
        """Steps a training sample can start from: every camera has a frame at t and at min(t + K, T - 1)."""
        present = np.logical_and.reduce([s.present for s in self.images.values()])
        future = np.minimum(np.arange(self.num_steps) + chunk, self.num_steps - 1)
        return np.flatnonzero(present & present[future])

    def frame(self, camera: str, t: int) -> np.ndarray:
        if camera not in self.images:
            raise InputError(f"images: episode {self.episode_id} has no camera {camera!r} (has {self.cameras})")
        return self.images[camera].frame(t)

    def window(self, t: int, chunk: int) -> StepWindow:
        """The step window of a training sample at step ``t`` with action chunk size ``chunk``."""
        if not 0 <= t < self.num_steps:
            raise InputError(f"{self.metadata.get('file', self.episode_id)}: step {t} outside the episode's {self.num_steps} steps")
        future = min(t + chunk, self.num_steps - 1)
        return StepWindow(
            episode_id=self.episode_id,
            step=t,
            future_step=future,
            num_steps=self.num_steps,
            current={c: s.jpegs[t] for c, s in self.images.items()},
            future={c: s.jpegs[future] for c, s in self.images.items()},
            actions=action_chunk(self.actions, t, chunk),
            proprio=self.proprio[t],
            future_proprio=self.proprio[future],
            instruction=self.instruction,
            success=self.success,
            score=float(self.score),  # type: ignore[arg-type]
            source=self.source,
            policy_version=self.policy_version,
            planning_version=self.planning_version,
            origin=str(self.metadata.get("file", "")),
        )

    @classmethod
    def from_frames(cls, frames: dict[str, np.ndarray], proprio: np.ndarray, actions: np.ndarray, **kwargs: Any) -> "Episode":
        """Build from decoded frames (uint8 (T, H, W, 3) per camera), encoding them as JPEG q95."""
        images = {name: ImageSequence.from_frames(f, name=f"images[{name!r}]") for name, f in frames.items()}
        return cls(images=images, proprio=proprio, actions=actions, **kwargs)


class EpisodeRecorder:
    """Builds an episode step by step, frames JPEG-encoded as they arrive (an open episode holds bytes only).

    Simulator runners render cameras only at query steps: a step given no image for a camera
    records an empty frame there (``ImageSequence`` reads it as absent).
    """

    def __init__(self, cameras: Sequence[str]) -> None:
        self.cameras = tuple(cameras)
        self.jpegs: dict[str, list[bytes]] = {c: [] for c in self.cameras}
        self.proprio: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.timestamps: list[float] = []
        self.planner: list[PlannerQuery] = []
        self._sizes: dict[str, tuple[int, ...]] = {}  # camera -> (height, width) of its first frame

    @property
    def steps(self) -> int:
        return len(self.actions)

    def add(self, images: dict[str, np.ndarray], proprio: np.ndarray, action: np.ndarray, timestamp: float | None = None) -> None:
        """One step: the observation's frames (where rendered), proprio, and the action executed after it.

        A step that does not fit the steps before it (other proprio or action dims, another frame size) is
        refused here, naming the field, and not recorded: caught only when the episode is built, it would be
        a bare numpy error about stacking, with the whole episode lost.
        """
        if not isinstance(images, dict):
            raise InputError(f"images: expected a dict camera -> uint8 (height, width, 3) frame, got {type(images).__name__}")
        unknown = sorted(map(str, set(images) - set(self.cameras)))
        if unknown:
            raise InputError(f"images: cameras {unknown} are not the episode's {list(self.cameras)}")
        step = len(self.actions)
        for cam in self.cameras:
            img = images.get(cam)
            if img is None:
                continue
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or 0 in img.shape:
                got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
                raise InputError(f"images[{cam!r}]: expected uint8 (height, width, 3) with height, width >= 1, got {got}")
            size = self._sizes.setdefault(cam, img.shape[:2])
            if img.shape[:2] != size:
                raise InputError(f"images[{cam!r}]: step {step} is {img.shape[:2]}, earlier frames are {size}")
        p, a = _numbers(proprio, "proprio", np.float32), _numbers(action, "action", np.float32)
        for name, arr, earlier in (("proprio", p, self.proprio), ("action", a, self.actions)):
            want = earlier[0].shape if earlier else None
            if arr.ndim != 1 or (want is not None and arr.shape != want):
                raise InputError(f"{name}: expected shape {want or '(dims,)'} at step {step} (as at step 0), got {arr.shape}")
        if timestamp is not None and (isinstance(timestamp, bool) or not isinstance(timestamp, numbers.Real)):
            raise InputError(f"timestamp: expected seconds since the epoch, got {type(timestamp).__name__}")
        for cam in self.cameras:
            img = images.get(cam)
            self.jpegs[cam].append(encode_jpeg(img) if img is not None else b"")
        self.proprio.append(p)
        self.actions.append(a)
        self.timestamps.append(time.time() if timestamp is None else float(timestamp))

    def episode(self, **fields: Any) -> Episode | None:
        """The episode so far (None before its first step), with the given per-episode fields."""
        if not self.actions:
            return None
        return Episode(images={c: ImageSequence(j, origin=f"episode[{c!r}]") for c, j in self.jpegs.items()},
                       proprio=np.stack(self.proprio), actions=np.stack(self.actions), timestamps=np.asarray(self.timestamps),
                       planner=list(self.planner), **fields)


@dataclass
class StepWindow:
    """What one training sample needs from an episode: step t, its future step, and the chunk between.

    This is what replay hands the learner per sampled item, instead of the whole episode: the
    JPEG frames of every camera at t and at min(t + K, T - 1), the action chunk a[t : t + K]
    (padded with the episode's last action), proprio at both steps, and the episode facts the
    value label needs (length, outcome).
    """

    episode_id: str
    step: int
    future_step: int
    num_steps: int
    current: dict[str, bytes]  # camera -> JPEG at step
    future: dict[str, bytes]  # camera -> JPEG at future_step
    actions: np.ndarray  # (K, d_a)
    proprio: np.ndarray  # (d_p,)
    future_proprio: np.ndarray  # (d_p,)
    instruction: str
    success: bool
    score: float
    source: Source
    policy_version: int | None = None  # the weight versions that acted in the episode (staleness)
    planning_version: int | None = None
    origin: str = ""  # where the episode came from, for error messages

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.current.values()) + sum(len(b) for b in self.future.values()) + self.actions.nbytes + 2 * self.proprio.nbytes

    def frame(self, camera: str, future: bool) -> np.ndarray:
        frames = self.future if future else self.current
        if camera not in frames:
            raise InputError(f"{self.origin or self.episode_id}: no images for camera {camera!r} (has {sorted(frames)})")
        return decode_jpeg(frames[camera], f"{self.origin or self.episode_id}:{camera}[{self.future_step if future else self.step}]")


def episode_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th episode of a batch seeded ``seed``: distinct across batches, 32 bits."""
    return int(np.random.SeedSequence([int(seed) % 2**63, int(index)]).generate_state(1, dtype=np.uint32)[0])


def action_chunk(actions: np.ndarray, t: int, chunk: int) -> np.ndarray:
    """actions[t : t + chunk], padded at the episode's end by repeating its last action (method 3.4)."""
    window = actions[t : t + chunk]
    if len(window) < chunk:
        window = np.concatenate([window, np.repeat(actions[-1:], chunk - len(window), axis=0)], axis=0)
    return window


def _numbers(x: Any, name: str, dtype: type = np.float64) -> np.ndarray:
    """``x`` as an array of ``dtype``, or ``InputError`` naming ``name``: real numbers only (a cast would drop the
    imaginary part of complex values with a warning, and strings or objects fail inside numpy)."""
    try:
        raw = np.asarray(x)
    except (TypeError, ValueError) as exc:  # e.g. a ragged list
        raise InputError(f"{name}: expected an array of numbers ({exc})") from None
    if raw.dtype.kind not in "biuf":
        raise InputError(f"{name}: expected real numbers, got dtype {raw.dtype}")
    return raw.astype(dtype, copy=False)


def _matrix(x: Any, name: str) -> np.ndarray:
    arr = _numbers(x, name, np.float32)
    if arr.ndim != 2:
        raise InputError(f"{name}: expected shape (steps, dims), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0].tolist()
        raise InputError(f"{name}: non-finite value at step {bad[0]}, dim {bad[1]}")
    return arr


def _enum(kind: type[Enum], value: Any, name: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise InputError(f"{name}: expected one of {[e.value for e in kind]}, got {value!r}") from None
