"""The policy: raw observations in, action chunks (with predicted future state and value) out.

``CosmosPolicy.infer`` (the ``Policy`` contract of ``cosmos_policy.contracts``) turns one
observation (uint8 camera images as the environment gives them, proprio and the instruction, in
dataset units) into an ``ActionChunk``: the actions in dataset units, the predicted future proprio
and images, the predicted value in [0, 1], and the weight version that produced them. On the
way in it applies what training images went through (JPEG q95 round trip for JPEG-stored
datasets, the test-time centre crop of side sqrt(0.9), resize to the model's size) and normalizes
proprio with the demonstration statistics; on the way out it un-normalizes.

Two modes (method 4.2):
- parallel: one pass denoises actions, future state and value together (LIBERO, RoboCasa);
- autoregressive: actions first, then the future state with the generated action frame as
  conditioning, then the value with everything but the value frame as conditioning.
``next_action`` keeps the action-chunk queue: it queries once per ``execute`` actions (the whole
chunk for LIBERO and ALOHA, 16 of RoboCasa's 32) and hands out one action per call.
Non-finite outputs never leave: they raise ``FloatingPointError``.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from cosmos_policy.codec import NormalizationStats
from cosmos_policy.config import PolicyConfig
from cosmos_policy.contracts import ActionChunk, Observation
from cosmos_policy.data.augment import center_crop_resize, resize
from cosmos_policy.episode import jpeg_round_trip
from cosmos_policy.errors import ConfigError, InputError
from cosmos_policy.layout import SampleKind
from cosmos_policy.model import CosmosPolicyModel, ModelBatch, Prediction
from cosmos_policy.text import TextEmbeddingCache, TextEncoder
from cosmos_policy.weights import check_state, version_number


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """Threads for the JPEG round trips of a query's frames (created on first use, shared)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="jpeg")
    return _POOL


@dataclass
class PreparedBatch:
    """A batch's model inputs and the latents it is conditioned on, made before its network passes.

    What ``CosmosPolicy.prepare`` does (JPEG round trips, crop and resize, the VAE encode) depends on the frozen VAE and
    the observations only, so a server prepares its next batch, on a CUDA stream of its own, while the current batch's
    passes run; ``ready`` is the event that stream recorded at the end, which the passes wait for (None: made on the
    stream that uses it, or on a CPU).
    """

    batch: ModelBatch
    conditioning: torch.Tensor
    ready: torch.cuda.Event | None = None

    def use(self) -> None:
        """Make the current stream wait for the preparation, and tell the allocator that the prepared tensors are used
        on it (else their memory could be handed out again on the preparing stream while the passes still read it)."""
        if self.ready is None:
            return
        stream = torch.cuda.current_stream(self.conditioning.device)
        stream.wait_event(self.ready)
        for t in (self.conditioning, *self.batch.images.values()):
            if t.is_cuda:
                t.record_stream(stream)


class CosmosPolicy:
    """A model with its statistics and instruction embeddings, acting on raw observations."""

    def __init__(
        self,
        model: CosmosPolicyModel,
        stats: NormalizationStats,
        text: TextEmbeddingCache,
        config: PolicyConfig | None = None,
        text_encoder: TextEncoder | None = None,
    ) -> None:
        self.model = model.eval()
        self.stats = stats
        self.text = text
        self.text_encoder = text_encoder
        self.config = config or PolicyConfig()
        if self.config.prefix_encode and model._prefix_encoder is None:
            model.enable_prefix_encoder()
        layout = model.layout
        if self.config.execute is not None and self.config.execute > layout.action_chunk:
            raise ConfigError(f"policy.execute: {self.config.execute} exceeds the chunk of {layout.action_chunk} actions")
        if stats.action_dim != layout.action_dim or (layout.has_proprio and stats.proprio_dim != layout.proprio_dim):
            raise ConfigError(
                f"statistics ({stats.action_dim} action, {stats.proprio_dim} proprio dims) do not match layout "
                f"{layout.name!r} ({layout.action_dim}, {layout.proprio_dim})"
            )
        self._queue: deque[np.ndarray] = deque()
        self.queries = 0
        self.version: int | None = None  # the weight version in the model (the checkpoint's, then each one loaded)

    def check_weights(self, state: dict[str, torch.Tensor], version: Any, finite: bool = True) -> int:
        """Raise ``CheckpointError`` (naming the tensor) unless ``state`` can replace the network's weights whole
        (``cosmos_policy.weights.check_state``); returns the version as an int. ``finite=False`` checks only names,
        shapes and dtypes (no pass over the values: what a caller can afford on an event loop)."""
        where = f"policy weights (version {version!r})"
        number = version_number(version, where)
        check_state(state, self.model.denoiser.net.state_dict(), where, finite)
        return number

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        """A published version of the network's weights (``load_state_dict`` copies them).

        Checked whole first (``check_weights``): a refused version raises ``CheckpointError`` and leaves the model
        and its version as they were, instead of half-loaded under the old version number.
        """
        number = self.check_weights(state, version)
        self.model.denoiser.net.load_state_dict(state)
        self.version = number

    @property
    def execute(self) -> int:
        return self.config.execute or self.model.layout.action_chunk

    # ---- inputs --------------------------------------------------------------------------
    def validate(self, obs: Observation) -> None:
        """Raise ``InputError`` naming the field unless ``obs`` can join a batch.

        Everything a batch would otherwise trip over later is checked here, where it costs one request and
        not the whole batch (the policy server validates each request before it joins one): empty images
        (the JPEG round trip cannot encode them), proprio that is not real numbers, and an instruction this
        policy cannot embed (not cached, and no text encoder to fill the cache).
        """
        layout = self.model.layout
        if not isinstance(obs, Observation):
            raise InputError(f"observation: expected an Observation, got {type(obs).__name__}")
        if not isinstance(obs.images, dict):
            raise InputError(f"observation.images: expected a dict camera -> uint8 (height, width, 3) image, got {type(obs.images).__name__}")
        for cam in layout.cameras:
            if cam not in obs.images:
                raise InputError(f"observation.images: missing camera {cam!r} (layout {layout.name!r} needs {list(layout.cameras)}, "
                                 f"got {sorted(map(str, obs.images))})")
            img = obs.images[cam]
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or 0 in img.shape:
                got = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
                raise InputError(f"observation.images[{cam!r}]: expected uint8 (height, width, 3) with height, width >= 1, got {got}")
        if layout.has_proprio:
            try:
                p = np.asarray(obs.proprio)
            except (TypeError, ValueError) as exc:  # e.g. a ragged list
                raise InputError(f"observation.proprio: expected ({layout.proprio_dim},) real numbers, got {type(obs.proprio).__name__} ({exc})") from None
            if p.shape != (layout.proprio_dim,):
                raise InputError(f"observation.proprio: expected shape ({layout.proprio_dim},), got {p.shape}")
            if p.dtype.kind not in "biuf":
                raise InputError(f"observation.proprio: expected real numbers, got dtype {p.dtype}")
            if not np.all(np.isfinite(p)):
                raise InputError(f"observation.proprio: non-finite values at dims {np.flatnonzero(~np.isfinite(p)).tolist()}")
        if not isinstance(obs.instruction, str) or not obs.instruction:
            got = type(obs.instruction).__name__ if not isinstance(obs.instruction, str) else "an empty string"
            raise InputError(f"observation.instruction: expected a non-empty string, got {got}")
        if self.text_encoder is None and obs.instruction not in self.text:
            raise InputError(f"observation.instruction: {obs.instruction[:80]!r} is not in the text-embedding cache and this policy "
                             "has no text encoder to add it")

    def prepare_image(self, image: np.ndarray) -> torch.Tensor:
        """The test-time transforms that match training: JPEG q95, centre crop, resize."""
        return self.prepare_images([image])[0]

    def prepare_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """``prepare_image`` for several frames: JPEG round trips in threads (the codec releases the
        GIL), then one crop-and-resize of the frames on the model's device (a GPU does it in
        microseconds; on the CPU it was most of a query's preprocessing)."""
        if self.config.jpeg_round_trip:
            images = list(_pool().map(jpeg_round_trip, images)) if len(images) > 1 else [jpeg_round_trip(images[0])]
        size = self.model.config.image_size
        transform = center_crop_resize if self.config.center_crop else resize
        if len({im.shape for im in images}) > 1:  # cameras of different sizes: one warp each
            return torch.cat([self.prepare_images_same_size([im], transform, size) for im in images])
        return self.prepare_images_same_size(images, transform, size)

    def prepare_images_same_size(self, images: list[np.ndarray], transform: Any, size: int) -> torch.Tensor:
        t = torch.from_numpy(np.stack([np.ascontiguousarray(im) for im in images]))
        device = self.model.device
        if device.type != "cpu":
            t = t.pin_memory().to(device, non_blocking=True)
        return transform(t, size)

    def batch(self, observations: Sequence[Observation], kind: SampleKind = SampleKind.POLICY) -> ModelBatch:
        """Model inputs for a batch of observations (current state only)."""
        for obs in observations:
            self.validate(obs)
        layout = self.model.layout
        frames = self.prepare_images([o.images[cam] for cam in layout.cameras for o in observations])
        n = len(observations)
        images = {f"current_image.{cam}": frames[i * n : (i + 1) * n] for i, cam in enumerate(layout.cameras)}
        proprio = None
        if layout.has_proprio:
            raw = torch.from_numpy(np.stack([np.asarray(o.proprio, dtype=np.float32) for o in observations]))
            proprio = self.stats.normalize_proprio(raw)
        instructions = [o.instruction for o in observations]
        if self.text_encoder is not None:
            self.text.fill(self.text_encoder, instructions)
        text = self.text.lookup(instructions)
        return ModelBatch(kinds=[kind] * len(observations), text=text, images=images, proprio=proprio)

    # ---- queries -------------------------------------------------------------------------
    @torch.no_grad()
    @torch.no_grad()
    def prepare(self, observations: Sequence[Observation], stream: torch.cuda.Stream | None = None) -> PreparedBatch:
        """The model inputs of ``observations`` and their conditioning latents (``PreparedBatch``), made on ``stream``
        when given (an event marks their end there) so that they can be made while another batch's passes run."""
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            batch = self.batch(observations)
            conditioning = self.model.conditioning(batch)
            ready = None
            if stream is not None:
                ready = torch.cuda.Event()
                ready.record(stream)
        return PreparedBatch(batch, conditioning, ready)

    def predict(self, observations: Sequence[Observation], seeds: Sequence[int] | None = None,
                prepared: PreparedBatch | None = None) -> list[ActionChunk]:
        """One query per observation, batched into as few passes as the mode allows; ``prepared``: their inputs made
        ahead by ``prepare`` (else made here)."""
        if not observations:
            return []
        cfg = self.config
        seeds = list(seeds) if seeds is not None else [cfg.seed] * len(observations)
        if prepared is None:
            prepared = self.prepare(observations)
        elif prepared.batch.batch_size != len(observations):
            raise InputError(f"prepared: expected a batch of {len(observations)} observations, got {prepared.batch.batch_size}")
        prepared.use()
        batch = prepared.batch
        pred = self.model.sample(batch, steps=cfg.action_steps, seed=seeds, clean_latents=prepared.conditioning)
        if cfg.mode == "autoregressive":
            pred = self.continue_autoregressively(batch, pred, seeds)
        self.queries += len(observations)
        return self.outputs(pred, batch)

    def continue_autoregressively(self, batch: ModelBatch, pred: Prediction, seeds: list[int]) -> Prediction:
        """Future state from the generated action frame, then the value from the whole state."""
        cfg = self.config
        wm = ModelBatch(kinds=[SampleKind.WORLD_MODEL] * batch.batch_size, text=batch.text)
        future = self.model.sample(wm, steps=cfg.future_steps, seed=seeds, clean_latents=pred.latents)
        value = ModelBatch(kinds=[SampleKind.VALUE] * batch.batch_size, text=batch.text)
        return self.model.sample(value, steps=cfg.value_steps, seed=seeds, clean_latents=future.latents)

    def outputs(self, pred: Prediction, batch: ModelBatch | None) -> list[ActionChunk]:
        """Un-normalized outputs; future images are decoded when configured and ``batch`` is given."""
        actions = self.stats.unnormalize_actions(pred.actions.double().cpu()).float().numpy()
        future_proprio = None
        if pred.future_proprio is not None and self.model.layout.has_proprio:
            future_proprio = self.stats.unnormalize_proprio(pred.future_proprio.double().cpu()).float().numpy()
        images = self.model.future_images(pred, batch) if self.config.decode_future_images and batch is not None else None
        values = pred.value.cpu().numpy()
        for name, arr in (("actions", actions), ("future_proprio", future_proprio), ("value", values)):
            if arr is not None and not np.all(np.isfinite(arr)):
                raise FloatingPointError(f"the model produced non-finite {name}; refusing to return them")
        return [
            ActionChunk(
                actions=actions[i],
                future_proprio=None if future_proprio is None else future_proprio[i],
                value=float(values[i]),
                future_images=None if images is None else {c: v[i].cpu().numpy() for c, v in images.items()},
                latents=pred.latents[i].cpu() if self.config.return_latents else None,
                policy_version=self.version,
            )
            for i in range(len(actions))
        ]

    def infer(self, observation: Observation, seed: int | None = None) -> ActionChunk:
        """One query: a new action chunk for this observation."""
        return self.predict([observation], None if seed is None else [seed])[0]

    def next_action(self, observation: Observation) -> np.ndarray:
        """The next action to execute; queries the model when the queue of the last chunk is used up."""
        if not self._queue:
            chunk = self.infer(observation).actions
            self._queue.extend(chunk[: self.execute])
        return self._queue.popleft()

    def reset(self) -> None:
        """Forget the queued actions (call at the start of every episode)."""
        self._queue.clear()
