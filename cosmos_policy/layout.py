"""The latent layout: which latent frame holds what, and which frames are clean per sample kind.

Cosmos Policy encodes a robot "video" [blank, s, a, s', V] as a fixed sequence of latent frames
(method sheet section 1). This module is the one place that knows that sequence. A layout is
declared in YAML (``configs/layout/``) as a list of slots; everything else (indices, masks,
pixel-frame counts) is derived from it, so a user-defined robot only needs a new YAML file.

Each slot belongs to one group of the tuple (s, a, s', V):
- ``state``  current proprio and current camera images (s)
- ``action`` the action chunk (a)
- ``future`` future proprio and future camera images (s')
- ``value``  the value of the future state (V)
The blank frame 0 is always clean: it absorbs the VAE's uncompressed first frame.

A sample kind says, per group, whether its frames are CLEAN (conditioning, fed clean with
t = 0), GENERATED (noised and in the loss) or MASKED (noised like generated frames but out of
the loss: the planning model's input masking, method 1.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from omegaconf import OmegaConf

from cosmos_policy.config import VAE_TEMPORAL_COMPRESSION, resolve_config_path
from cosmos_policy.errors import ConfigError

if TYPE_CHECKING:
    import torch


class SlotKind(str, Enum):
    BLANK = "blank"
    PROPRIO = "proprio"
    IMAGE = "image"
    ACTION = "action"
    VALUE = "value"


class SlotTime(str, Enum):
    CURRENT = "current"
    FUTURE = "future"


class FrameRole(IntEnum):
    CLEAN = 0
    GENERATED = 1
    MASKED = 2


class SampleKind(str, Enum):
    """What a sample teaches (training) or asks for (inference)."""

    POLICY = "policy"  # p(a, s', V | s)
    WORLD_MODEL = "world_model"  # p(s', V | s, a)
    VALUE = "value"  # p(V | s, a, s')
    VALUE_SPRIME = "value_sprime"  # p(V | s'): planning value, current state and action masked
    Q_VALUE = "q_value"  # p(V | s, a): future state masked


_C, _G, _M = FrameRole.CLEAN, FrameRole.GENERATED, FrameRole.MASKED
# Per sample kind, the role of each group (state, action, future, value): method 1.3's tables.
ROLE_TABLE: dict[SampleKind, dict[str, FrameRole]] = {
    SampleKind.POLICY: {"state": _C, "action": _G, "future": _G, "value": _G},
    SampleKind.WORLD_MODEL: {"state": _C, "action": _C, "future": _G, "value": _G},
    SampleKind.VALUE: {"state": _C, "action": _C, "future": _C, "value": _G},
    SampleKind.VALUE_SPRIME: {"state": _M, "action": _M, "future": _C, "value": _G},
    SampleKind.Q_VALUE: {"state": _C, "action": _C, "future": _M, "value": _G},
}
SAMPLE_KINDS: tuple[SampleKind, ...] = tuple(SampleKind)


@dataclass(frozen=True)
class Slot:
    """One latent frame of the layout."""

    kind: SlotKind
    time: SlotTime | None = None
    camera: str | None = None

    @property
    def name(self) -> str:
        """Stable key, e.g. ``blank``, ``action``, ``current_proprio``, ``future_image.wrist``."""
        if self.kind is SlotKind.IMAGE:
            return f"{self.time.value}_image.{self.camera}"  # type: ignore[union-attr]
        if self.kind is SlotKind.PROPRIO:
            return f"{self.time.value}_proprio"  # type: ignore[union-attr]
        return self.kind.value

    @property
    def group(self) -> str | None:
        """The (s, a, s', V) group; None for the blank frame."""
        if self.kind is SlotKind.BLANK:
            return None
        if self.kind is SlotKind.ACTION:
            return "action"
        if self.kind is SlotKind.VALUE:
            return "value"
        return "state" if self.time is SlotTime.CURRENT else "future"


@dataclass(frozen=True)
class LatentLayout:
    """A benchmark's latent frame sequence plus the action and proprio sizes it carries."""

    name: str
    action_chunk: int
    action_dim: int
    proprio_dim: int
    slots: tuple[Slot, ...]

    def __post_init__(self) -> None:
        _validate(self)

    # ---- sizes -------------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        """Latent frames (``state_t``): 9 for LIBERO, 11 for RoboCasa and ALOHA."""
        return len(self.slots)

    @property
    def num_pixel_frames(self) -> int:
        """Frames of the pixel clip: the blank frame plus 4 copies of every other slot."""
        return 1 + VAE_TEMPORAL_COMPRESSION * (self.num_frames - 1)

    @property
    def cameras(self) -> tuple[str, ...]:
        """Camera names in the order of the current-image slots."""
        return tuple(s.camera for s in self.slots if s.kind is SlotKind.IMAGE and s.time is SlotTime.CURRENT)  # type: ignore[misc]

    @property
    def has_proprio(self) -> bool:
        return any(s.kind is SlotKind.PROPRIO for s in self.slots)

    @property
    def action_size(self) -> int:
        """Numbers in one flattened action chunk (K x d)."""
        return self.action_chunk * self.action_dim

    # ---- indices -----------------------------------------------------------------------
    def index(self, name: str) -> int:
        """Latent frame index of the slot named ``name`` (see ``Slot.name``)."""
        for i, slot in enumerate(self.slots):
            if slot.name == name:
                return i
        raise KeyError(f"layout {self.name!r} has no slot {name!r}; slots: {[s.name for s in self.slots]}")

    @property
    def action_index(self) -> int:
        return self.index("action")

    @property
    def value_index(self) -> int:
        return self.index("value")

    def proprio_index(self, time: SlotTime | str) -> int | None:
        name = f"{SlotTime(time).value}_proprio"
        return self.index(name) if self.has_proprio else None

    def image_index(self, time: SlotTime | str, camera: str) -> int:
        return self.index(f"{SlotTime(time).value}_image.{camera}")

    def image_indices(self, time: SlotTime | str) -> list[int]:
        t = SlotTime(time)
        return [i for i, s in enumerate(self.slots) if s.kind is SlotKind.IMAGE and s.time is t]

    def injected_indices(self) -> list[int]:
        """Frames whose latent is overwritten after encoding (everything but the images)."""
        return [i for i, s in enumerate(self.slots) if s.kind is not SlotKind.IMAGE]

    # ---- masks -------------------------------------------------------------------------
    def frame_roles(self, kind: SampleKind | str) -> tuple[FrameRole, ...]:
        """Role of every latent frame for one sample kind."""
        table = ROLE_TABLE[SampleKind(kind)]
        return tuple(FrameRole.CLEAN if s.group is None else table[s.group] for s in self.slots)

    def role_tensor(self, kinds: Sequence[SampleKind | str], device: torch.device | str | None = None) -> torch.Tensor:
        """(B, T) int64 tensor of ``FrameRole`` values for a batch of sample kinds."""
        import torch  # here, not at the top: reading a layout (a config) loads no torch

        rows = [[int(r) for r in self.frame_roles(k)] for k in kinds]
        return torch.tensor(rows, dtype=torch.long, device=device)

    def clean_prefix(self, kind: SampleKind | str) -> int:
        """How many leading latent frames must be VAE-encoded to have every clean image frame.

        The VAE is causal, so encoding this prefix of the clip gives exactly the latents a full
        encode would give for those frames; later frames are either injected or generated.
        """
        roles = self.frame_roles(kind)
        clean_images = [i for i, (s, r) in enumerate(zip(self.slots, roles)) if r is FrameRole.CLEAN and s.kind is SlotKind.IMAGE]
        return (max(clean_images) + 1) if clean_images else 1

    def to_dict(self) -> dict[str, Any]:
        slots = []
        for s in self.slots:
            entry: dict[str, Any] = {"kind": s.kind.value}
            if s.time is not None:
                entry["time"] = s.time.value
            if s.camera is not None:
                entry["camera"] = s.camera
            slots.append(entry)
        return {
            "name": self.name,
            "action_chunk": self.action_chunk,
            "action_dim": self.action_dim,
            "proprio_dim": self.proprio_dim,
            "slots": slots,
        }


def _validate(layout: LatentLayout) -> None:
    where = f"layout {layout.name!r}"
    for field_name in ("action_chunk", "action_dim"):
        value = getattr(layout, field_name)
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{where}: {field_name} must be a positive integer, got {value!r}")
    if not isinstance(layout.proprio_dim, int) or layout.proprio_dim < 0:
        raise ConfigError(f"{where}: proprio_dim must be a non-negative integer, got {layout.proprio_dim!r}")
    slots = layout.slots
    if len(slots) < 3:
        raise ConfigError(f"{where}: needs at least blank, action and value slots, got {len(slots)}")
    if slots[0].kind is not SlotKind.BLANK:
        raise ConfigError(f"{where}: slot 0 must be 'blank' (it absorbs the VAE's uncompressed first frame)")
    counts = {k: sum(s.kind is k for s in slots) for k in SlotKind}
    for kind in (SlotKind.BLANK, SlotKind.ACTION, SlotKind.VALUE):
        if counts[kind] != 1:
            raise ConfigError(f"{where}: expected exactly one {kind.value!r} slot, got {counts[kind]}")
    names = [s.name for s in slots]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: duplicate slots {sorted(n for n in names if names.count(n) > 1)}")
    for i, s in enumerate(slots):
        if s.kind in (SlotKind.IMAGE, SlotKind.PROPRIO) and s.time is None:
            raise ConfigError(f"{where}: slot {i} ({s.kind.value}) needs time: current or future")
        if s.kind is SlotKind.IMAGE and not s.camera:
            raise ConfigError(f"{where}: slot {i} (image) needs a camera name")
    current = [s.camera for s in slots if s.kind is SlotKind.IMAGE and s.time is SlotTime.CURRENT]
    future = [s.camera for s in slots if s.kind is SlotKind.IMAGE and s.time is SlotTime.FUTURE]
    if not current:
        raise ConfigError(f"{where}: needs at least one current camera image")
    if current != future:
        raise ConfigError(f"{where}: future cameras {future} must match current cameras {current} in order")
    proprio_times = [s.time for s in slots if s.kind is SlotKind.PROPRIO]
    if proprio_times and sorted(t.value for t in proprio_times) != ["current", "future"]:  # type: ignore[union-attr]
        raise ConfigError(f"{where}: proprio needs exactly one current and one future slot, got {proprio_times}")
    if bool(proprio_times) != (layout.proprio_dim > 0):
        raise ConfigError(f"{where}: proprio_dim is {layout.proprio_dim} but proprio slots are {'present' if proprio_times else 'absent'}")
    # Frames must read (s, a, s', V) in time order so a prefix of the clip is the conditioning.
    order = {"state": 0, "action": 1, "future": 2, "value": 3}
    seq = [order[s.group] for s in slots if s.group is not None]
    if seq != sorted(seq):
        raise ConfigError(f"{where}: slots must be ordered current state, action, future state, value")


_LAYOUT_KEYS = ("name", "action_chunk", "action_dim", "proprio_dim", "slots")
_SLOT_KEYS = ("kind", "time", "camera")


def layout_from_dict(data: dict[str, Any]) -> LatentLayout:
    """Build a layout from plain data (a YAML file or a checkpoint's saved config).

    Every field is checked here, by name (``layout.slots[2].kind: expected one of [...]``): a
    damaged checkpoint's config would otherwise surface as a bare KeyError, TypeError or
    ``'x' is not a valid SlotKind`` that says neither which field nor which slot. Unknown keys are
    refused too: a misspelt ``proprio_dims`` would silently leave proprio_dim at 0.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"layout: expected a mapping of {list(_LAYOUT_KEYS)}, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in _LAYOUT_KEYS)
    if unknown:
        raise ConfigError(f"layout: unknown key(s) {unknown} (expected {list(_LAYOUT_KEYS)})")
    for key in ("action_chunk", "action_dim", "slots"):
        if key not in data:
            raise ConfigError(f"layout: missing field '{key}'")
    sizes = {}
    for key in ("action_chunk", "action_dim", "proprio_dim"):
        value = data.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"layout.{key}: expected an integer, got {value!r}")
        sizes[key] = value
    name = data.get("name", "custom")
    if not isinstance(name, str):
        raise ConfigError(f"layout.name: expected a string, got {name!r}")
    raw_slots = data["slots"]
    if not isinstance(raw_slots, (list, tuple)):
        raise ConfigError(f"layout.slots: expected a list of slots, got {raw_slots!r}")
    slots = []
    for i, entry in enumerate(raw_slots):
        where = f"layout.slots[{i}]"
        if isinstance(entry, str):
            entry = {"kind": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a slot kind or a mapping of {list(_SLOT_KEYS)}, got {entry!r}")
        unknown = sorted(str(k) for k in entry if k not in _SLOT_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} (expected {list(_SLOT_KEYS)})")
        if entry.get("kind") not in [k.value for k in SlotKind]:
            raise ConfigError(f"{where}.kind: expected one of {[k.value for k in SlotKind]}, got {entry.get('kind')!r}")
        time = entry.get("time")
        if time is not None and time not in [t.value for t in SlotTime]:
            raise ConfigError(f"{where}.time: expected one of {[t.value for t in SlotTime]} or null, got {time!r}")
        camera = entry.get("camera")
        if camera is not None and not isinstance(camera, str):
            raise ConfigError(f"{where}.camera: expected a camera name, got {camera!r}")
        slots.append(Slot(kind=SlotKind(entry["kind"]), time=SlotTime(time) if time is not None else None, camera=camera))
    return LatentLayout(name=name, slots=tuple(slots), **sizes)


def load_layout(name_or_path: str | Path) -> LatentLayout:
    """Load ``configs/layout/<name>.yaml`` or a YAML path."""
    path = resolve_config_path("layout", name_or_path)
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return layout_from_dict(data)  # type: ignore[arg-type]
