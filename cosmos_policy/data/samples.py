"""Training samples from episodes, exactly as the official datasets build them (method 3.4, 6.1).

For a step t of an episode of T steps and chunk size K:
- the current state is step t, the future state is step min(t + K, T - 1);
- the action chunk is actions[t : t + K], padded at the episode's end by repeating the last action;
- the value label is the Monte Carlo return at the *future* step (it is V(s')): with a sparse
  terminal reward R, G_t = gamma^(T - 1 - t) R, rescaled to [-1, 1] as 2 G_t / R - 1 when R > 0
  (so any positive score gives the full-success curve, as in the official code) and -1 when R = 0;
- every image of the sample (current and future, every camera) gets the same augmentation;
- actions and proprio are min-max normalized with the demonstrations' statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cosmos_policy.codec import NormalizationStats
from cosmos_policy.data.augment import AugmentConfig, augment, resize
from cosmos_policy.episode import Episode, StepWindow, action_chunk  # noqa: F401 (action_chunk re-exported)
from cosmos_policy.errors import InputError
from cosmos_policy.layout import LatentLayout, SampleKind, SlotTime


def value_labels(num_steps: int, score: float, gamma: float) -> np.ndarray:
    """Per-step value labels in [-1, 1] for an episode with terminal reward ``score``."""
    if num_steps <= 0:
        raise InputError(f"num_steps: expected a positive episode length, got {num_steps}")
    if not 0.0 < gamma <= 1.0:
        raise InputError(f"gamma: expected a discount in (0, 1], got {gamma}")
    if score <= 0:
        return np.full(num_steps, -1.0, dtype=np.float32)
    steps_to_go = np.arange(num_steps - 1, -1, -1, dtype=np.float64)
    return (2.0 * gamma**steps_to_go - 1.0).astype(np.float32)


def value_label(num_steps: int, step: int, score: float, gamma: float) -> float:
    """The label of one step: 2 gamma^(T - 1 - step) - 1 after a success, -1 after a failure."""
    if not 0 <= step < num_steps:
        raise InputError(f"step: expected 0 <= step < {num_steps}, got {step}")
    return float(np.float32(2.0 * gamma ** (num_steps - 1 - step) - 1.0)) if score > 0 else -1.0


def episode_origin(episode: Episode) -> str:
    """How to name an episode in an error: its file when it came from one, else its id."""
    return str(episode.metadata.get("file", f"episode {episode.episode_id}"))


@dataclass
class TrainingSample:
    """One sample in model units, before batching."""

    kind: SampleKind
    pool: str
    images: dict[str, torch.Tensor]  # slot name -> uint8 (S, S, 3)
    proprio: np.ndarray | None  # (d_p,) normalized
    future_proprio: np.ndarray | None
    actions: np.ndarray  # (K, d_a) normalized
    value: float  # in [-1, 1]
    instruction: str
    episode_id: str
    step: int
    policy_version: int | None  # the weight versions the sample's episode was played with (staleness)
    planning_version: int | None = None


class SampleBuilder:
    """Turns (episode, step, kind) into a ``TrainingSample`` for one latent layout."""

    def __init__(
        self,
        layout: LatentLayout,
        stats: NormalizationStats,
        image_size: int,
        gamma: float,
        augmentation: AugmentConfig | None = AugmentConfig(),
    ) -> None:
        if stats.action_dim != layout.action_dim:
            raise InputError(f"statistics: {stats.action_dim} action dims, layout {layout.name!r} expects {layout.action_dim}")
        if layout.has_proprio and stats.proprio_dim != layout.proprio_dim:
            raise InputError(f"statistics: {stats.proprio_dim} proprio dims, layout {layout.name!r} expects {layout.proprio_dim}")
        self.layout = layout
        self.stats = stats
        self.image_size = image_size
        self.gamma = gamma
        self.augmentation = augmentation

    def check(self, episode: Episode) -> None:
        """Raise ``InputError`` naming the episode when it cannot give samples for this layout."""
        where = episode_origin(episode)
        layout = self.layout
        if episode.num_steps < layout.action_chunk:
            raise InputError(f"{where}: episode of {episode.num_steps} steps is shorter than the action chunk ({layout.action_chunk})")
        if episode.actions.shape[1] != layout.action_dim:
            raise InputError(f"{where}: actions have {episode.actions.shape[1]} dims, layout {layout.name!r} expects {layout.action_dim}")
        if layout.has_proprio and episode.proprio.shape[1] != layout.proprio_dim:
            raise InputError(f"{where}: proprio has {episode.proprio.shape[1]} dims, layout {layout.name!r} expects {layout.proprio_dim}")
        missing = [c for c in layout.cameras if c not in episode.images]
        if missing:
            raise InputError(f"{where}: no images for cameras {missing} (has {episode.cameras})")

    def build(self, episode: Episode, t: int, kind: SampleKind, rng: np.random.Generator, pool: str = "") -> TrainingSample:
        self.check(episode)
        return self.build_window(episode.window(t, self.layout.action_chunk), kind, rng, pool)

    def build_window(self, window: StepWindow, kind: SampleKind, rng: np.random.Generator, pool: str = "") -> TrainingSample:
        """A sample from a step window (what replay hands out), with one augmentation draw."""
        layout = self.layout
        if window.actions.shape != (layout.action_chunk, layout.action_dim):
            raise InputError(f"{window.origin or window.episode_id}: action chunk {window.actions.shape}, layout {layout.name!r} "
                             f"expects {(layout.action_chunk, layout.action_dim)}")
        cameras = layout.cameras
        raw = [window.frame(c, future=False) for c in cameras] + [window.frame(c, future=True) for c in cameras]
        if len({img.shape for img in raw}) != 1:
            raise InputError(f"{window.origin or window.episode_id}: cameras have different image sizes {sorted({img.shape for img in raw})}")
        stack = torch.from_numpy(np.stack(raw))
        if self.augmentation is not None:
            out, _ = augment(stack, rng, self.image_size, self.augmentation)
        else:
            out = resize(stack, self.image_size)
        names = [f"current_image.{c}" for c in cameras] + [f"future_image.{c}" for c in cameras]
        actions = self.stats.normalize_actions(torch.from_numpy(np.array(window.actions))).numpy()  # replay arrays are read-only
        proprio = future_proprio = None
        if layout.proprio_index(SlotTime.CURRENT) is not None:
            pair = self.stats.normalize_proprio(torch.from_numpy(np.stack([window.proprio, window.future_proprio]))).numpy()
            proprio, future_proprio = pair[0], pair[1]
        return TrainingSample(
            kind=SampleKind(kind),
            pool=pool,
            images=dict(zip(names, out.unbind(0))),
            proprio=proprio,
            future_proprio=future_proprio,
            actions=actions,
            value=value_label(window.num_steps, window.future_step, window.score, self.gamma),
            instruction=window.instruction,
            episode_id=window.episode_id,
            step=window.step,
            policy_version=window.policy_version,
            planning_version=window.planning_version,
        )
