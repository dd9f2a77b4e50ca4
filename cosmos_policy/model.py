"""The Cosmos Policy model: layout + frozen VAE + denoiser, trained and sampled as the method says.

It consumes a ``ModelBatch`` and produces a ``Prediction`` (``cosmos_policy.batch``), both in model
units. The model knows nothing of datasets, episodes or statistics files; the data pipeline and
the policy normalize before and un-normalize after.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import nn

from cosmos_policy.batch import ModelBatch, Prediction
from cosmos_policy.codec import tile_into_frame, untile_from_frame, value_from_frame, value_into_frame
from cosmos_policy.config import ModelConfig
from cosmos_policy.denoiser import Denoiser, build_network
from cosmos_policy.prefix_encode import PrefixCachedEncoder
from cosmos_policy.errors import ConfigError, InputError
from cosmos_policy.layout import FrameRole, LatentLayout, SampleKind, SlotKind, SlotTime
from cosmos_policy.objective import LossOutput, TrainingNoise, diffusion_loss
from cosmos_policy.sampler import sample as run_sampler
from cosmos_policy.sampler import seeded_noise
from cosmos_policy.tokenizer import VideoTokenizer, build_vae
from cosmos_policy.transfer import to_device


# Inductor's options for the whole network compiled into CUDA graphs (``compile="graphs"``, a GPU; with CUDA graphs on
# top). multi_kernel: the wide rows' reductions (the float8 quantization of the MLP's 8,192-wide GELU output: a row's
# largest magnitude, then its scaled copy) are written both as one persistent pass and as a loop, and the faster is
# kept; on an H100 that took the GELU-and-quantize kernel from 398 to 263 us a block at batch 8. fx_graph_cache off:
# torch 2.11 fails to load a multi_kernel graph from inductor's cache (BackendCompilerFailed at a second start on the
# same machine), so each start compiles afresh (about 90 s a captured size on an H100; research/serving). The planner's
# block-by-block compile keeps inductor's defaults: not measured with these.
GRAPHS_OPTIONS = {"triton.multi_kernel": 1, "fx_graph_cache": False}


class CosmosPolicyModel(nn.Module):
    def __init__(self, config: ModelConfig, layout: LatentLayout, network: nn.Module | None = None, vae: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.layout = layout
        net = network if network is not None else build_network(config)
        _, h, w = config.latent_frame_shape
        _, ph, pw = net.config.patch_size
        self.denoiser = Denoiser(net, config.diffusion.sigma_conditional, tokens_per_frame=(h // ph) * (w // pw))
        self.tokenizer = VideoTokenizer(vae if vae is not None else build_vae(config), layout, config.image_size)
        frame = config.latent_frame_shape
        if layout.action_size > frame[0] * frame[1] * frame[2]:
            raise ConfigError(
                f"layout {layout.name!r}: an action chunk of {layout.action_size} numbers does not fit a latent frame of "
                f"{frame} at image_size {config.image_size}"
            )
        self._prefix_encoder: PrefixCachedEncoder | None = None
        self._latent_cache: OrderedDict[bytes, torch.Tensor] | None = None
        self._latent_cache_items = 0
        self.latent_cache_hits = 0
        self.latent_cache_misses = 0

    def enable_prefix_encoder(self, max_clips: int = 8, compile: bool = False, channels_last: bool = False) -> None:
        """Encode through ``PrefixCachedEncoder``: the constant leading frames once, nothing after the frames asked for.

        The policy turns this on for its queries (LIBERO: 8 of the 13 conditioning pixel frames go
        through the VAE instead of all 13). The latents equal the whole-clip encode's up to rounding.
        """
        self._prefix_encoder = PrefixCachedEncoder(self, max_clips, compile, channels_last)

    def accelerate(self, float8: str = "off", compile: str = "off", field: str = "server") -> str:
        """Make queries faster without changing the method: float8 products, compiled network; returns the float8
        recipe in use (``auto`` resolved for this device).

        ``float8`` (``cosmos_policy.float8``): the blocks' token-wise layers in float8, weights quantized once per
        loaded version. ``compile``: ``graphs`` compiles the whole network for fixed shapes into CUDA graphs (one per
        batch size: the policy server pads its batches to a few sizes, so each is captured once), ``blocks`` compiles
        each transformer block (the identical blocks share a graph per row count: what the planner's varied batches
        need, compiled in seconds), ``off`` runs eagerly. Call once, before the first query.
        """
        from cosmos_policy.float8 import convert_inference_float8, resolve_inference_float8

        if compile not in ("off", "graphs", "blocks"):
            raise ConfigError(f"{field}.compile: expected 'off', 'graphs' or 'blocks', got {compile!r}")
        recipe = resolve_inference_float8(float8, self.device, f"{field}.float8")
        convert_inference_float8(self.denoiser.net, recipe, f"{field}.float8")  # before compiling: the graphs hold its buffers
        if compile == "graphs":
            on_gpu = self.device.type == "cuda"
            self.denoiser.net.compile(fullgraph=True, dynamic=False, options={**GRAPHS_OPTIONS, "triton.cudagraphs": True} if on_gpu else None)
        elif compile == "blocks":
            torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)  # a graph per row count
            for block in self.denoiser.net.transformer_blocks:
                block.compile(dynamic=False)
        return recipe

    def enable_latent_cache(self, max_items: int) -> None:
        """Remember the VAE latents of up to ``max_items`` clips, keyed by their pixels (0 turns it off).

        The VAE is frozen, so a clip's latents depend only on its pixels: when training without
        augmentation (the quickstart on a CPU) the same (episode, step) clips come back every
        epoch and encoding them again is most of a tiny model's step. Keys are a hash of every
        image slot's bytes and the number of frames encoded, so a hit is exactly the clip that was
        encoded; with augmentation on, nothing repeats and the cache only costs the hashing.
        """
        if max_items < 0:
            raise ConfigError(f"latent_cache: expected a number of clips >= 0, got {max_items}")
        self._latent_cache = OrderedDict() if max_items else None
        self._latent_cache_items = max_items

    @classmethod
    def build(cls, config: ModelConfig, layout: LatentLayout, seed: int = 0) -> "CosmosPolicyModel":
        """A randomly initialized model (reproducible from ``seed``)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config, layout)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return self.config.latent_frame_shape

    # ---- inputs --------------------------------------------------------------------------
    def validate(self, batch: ModelBatch, kinds_need_targets: bool, latents_given: bool = False) -> None:
        """Check shapes, dtypes and finiteness of what the batch holds.

        With ``kinds_need_targets`` (training) every field is required; otherwise only what the
        clean frames of each sample kind need, and nothing when ``latents_given`` (the clean
        frames then come from precomputed latents).
        """
        layout, b = self.layout, batch.batch_size
        if b == 0:
            raise InputError("kinds: empty batch")
        for k in batch.kinds:
            try:
                SampleKind(k)
            except ValueError:
                raise InputError(f"kinds: unknown sample kind {k!r}; expected one of {[s.value for s in SampleKind]}") from None
        length, dim = self.config.text.max_length, self.config.text.embed_dim
        _check(batch.text, "text", (b, length, dim))
        required = set() if latents_given else self._required_fields(batch.kinds, everything=kinds_need_targets)
        for name in sorted(required - {"images"}):
            if getattr(batch, name) is None:
                raise InputError(f"{name}: required for sample kinds {sorted({SampleKind(k).value for k in batch.kinds})}, got None")
        checks = {
            "proprio": (b, layout.proprio_dim),
            "future_proprio": (b, layout.proprio_dim),
            "actions": (b, layout.action_chunk, layout.action_dim),
            "value": (b,),
        }
        for name, shape in checks.items():
            if getattr(batch, name) is not None:
                _check(getattr(batch, name), name, shape)
        size = self.config.image_size
        for name, img in batch.images.items():
            if img.dtype != torch.uint8:
                raise InputError(f"images[{name!r}]: expected uint8, got {img.dtype}")
            if tuple(img.shape) != (b, size, size, 3):
                raise InputError(f"images[{name!r}]: expected shape {(b, size, size, 3)}, got {tuple(img.shape)}")
        needed = set() if latents_given else self._needed_images(batch.kinds, everything=kinds_need_targets)
        missing = sorted(needed - set(batch.images))
        if missing:
            raise InputError(f"images: missing camera slots {missing} (layout {layout.name!r} expects {sorted(needed)})")

    def _required_fields(self, kinds: list[SampleKind], everything: bool) -> set[str]:
        if everything:
            fields = {"actions", "value"}
            if self.layout.has_proprio:
                fields |= {"proprio", "future_proprio"}
            return fields
        fields: set[str] = set()
        for kind in kinds:
            roles = self.layout.frame_roles(kind)
            for slot, role in zip(self.layout.slots, roles):
                if role is not FrameRole.CLEAN:
                    continue
                if slot.kind is SlotKind.ACTION:
                    fields.add("actions")
                elif slot.kind is SlotKind.PROPRIO:
                    fields.add("proprio" if slot.time is SlotTime.CURRENT else "future_proprio")
        return fields

    def _needed_images(self, kinds: list[SampleKind], everything: bool) -> set[str]:
        layout = self.layout
        names = set()
        for kind in kinds:
            roles = layout.frame_roles(kind)
            for slot, role in zip(layout.slots, roles):
                if slot.kind is SlotKind.IMAGE and (everything or role is FrameRole.CLEAN):
                    names.add(slot.name)
        return names

    # ---- latents -------------------------------------------------------------------------
    def encode(self, batch: ModelBatch, num_frames: int | None = None) -> torch.Tensor:
        """VAE latents of the first ``num_frames`` slots (zeros after), before injection."""
        layout = self.layout
        k = layout.num_frames if num_frames is None else num_frames
        device = self.device
        if self._latent_cache is not None:
            latents = self._encode_cached(batch, k)
        elif self._prefix_encoder is not None:
            return self._prefix_encoder.latents(batch, k)  # already zeros after frame k
        else:
            images = {name: img.to(device) for name, img in batch.images.items()}
            latents = self.tokenizer.encode(self.tokenizer.assemble_clip(images, k))
        if k < layout.num_frames:
            pad = latents.new_zeros(latents.shape[0], latents.shape[1], layout.num_frames - k, *latents.shape[3:])
            latents = torch.cat([latents, pad], dim=2)
        return latents

    def _encode_cached(self, batch: ModelBatch, k: int) -> torch.Tensor:
        """``encode`` through the latent cache: only the clips not seen before go through the VAE."""
        cache = self._latent_cache
        assert cache is not None
        names = sorted(batch.images)
        cpu = {n: batch.images[n].detach().cpu().contiguous() for n in names}
        keys = []
        for row in range(batch.batch_size):
            h = hashlib.blake2b(k.to_bytes(2, "little"), digest_size=20)
            for n in names:
                h.update(n.encode())
                h.update(cpu[n][row].numpy().tobytes())
            keys.append(h.digest())
        missing = [i for i, key in enumerate(keys) if key not in cache]
        self.latent_cache_hits += len(keys) - len(missing)
        self.latent_cache_misses += len(missing)
        if missing:
            rows = torch.tensor(missing)
            images = {n: batch.images[n][rows].to(self.device) for n in names}
            fresh = self.tokenizer.encode(self.tokenizer.assemble_clip(images, k))
            for i, lat in zip(missing, fresh):
                cache[keys[i]] = lat.detach().clone()
        out = torch.stack([cache[key] for key in keys]).to(self.device)
        for key in keys:
            cache.move_to_end(key)
        while len(cache) > self._latent_cache_items:
            cache.popitem(last=False)
        return out

    def inject(self, latents: torch.Tensor, batch: ModelBatch) -> torch.Tensor:
        """Overwrite the proprio, action and value frames with the batch's tiled vectors."""
        layout, frame = self.layout, self.frame_shape
        out = latents.clone()
        device = out.device
        b = out.shape[0]
        if batch.actions is not None:
            out[:, :, layout.action_index] = tile_into_frame(to_device(batch.actions.reshape(b, -1).float(), device), frame)
        for time, vec in ((SlotTime.CURRENT, batch.proprio), (SlotTime.FUTURE, batch.future_proprio)):
            idx = layout.proprio_index(time)
            if idx is not None and vec is not None:
                out[:, :, idx] = tile_into_frame(to_device(vec.float(), device), frame)
        if batch.value is not None:
            out[:, :, layout.value_index] = value_into_frame(to_device(batch.value.float(), device), frame)
        return out

    def targets(self, batch: ModelBatch) -> torch.Tensor:
        """Training targets x0: the whole clip encoded, then every non-image frame injected."""
        return self.inject(self.encode(batch), batch)

    # ---- training ------------------------------------------------------------------------
    def training_loss(self, batch: ModelBatch, generator: torch.Generator | None = None, x0: torch.Tensor | None = None,
                      validate: bool = True, noise: TrainingNoise | None = None) -> LossOutput:
        """The method's loss on one batch; ``x0`` may be given when latents were precomputed.

        ``noise``: the draws, when the caller drew them ahead (``training_noise``); else from ``generator``.

        ``validate=False`` skips the input checks for a batch the caller checked already (on the
        host: checking a batch on the GPU reads values back, which stalls the GPU's queue).
        """
        if validate:
            self.validate(batch, kinds_need_targets=True)
        kinds = [SampleKind(k) for k in batch.kinds]
        if x0 is None:
            x0 = self.targets(batch)
        roles = self.layout.role_tensor(kinds)  # host; the loss copies it over without a sync
        text = to_device(batch.text, x0.device)
        return diffusion_loss(self.denoiser, x0, roles, text, kinds, self.layout, self.config.diffusion, generator, noise)

    def training_noise(self, batch_size: int, generator: torch.Generator | None = None) -> TrainingNoise:
        """The noise ``training_loss`` would draw from ``generator`` for a batch of this size (host tensors)."""
        return TrainingNoise.draw((batch_size, *self._latent_shape()), self.config.diffusion, generator)

    # ---- sampling ------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        batch: ModelBatch,
        steps: int | list[int] | None = None,
        seed: int | list[int] = 0,
        solver: str | None = None,
        clean_latents: torch.Tensor | None = None,
    ) -> Prediction:
        """Generate every non-clean frame of each sample's kind.

        ``steps`` is one count or one per sample (rows with fewer steps drop out of the batched
        loop early). ``seed`` is one seed for every sample or one per sample; a seed always gives the same
        initial noise, on any device. ``clean_latents`` may carry conditioning latents computed
        earlier (e.g. a generated action frame, for autoregressive world-model queries): they
        are used as they are, nothing is encoded.
        """
        self.validate(batch, kinds_need_targets=False, latents_given=True)  # the frames' inputs: in ``conditioning``
        cfg = self.config.sampler
        kinds = [SampleKind(k) for k in batch.kinds]
        b = len(kinds)
        seeds = [seed] * b if isinstance(seed, int) else list(seed)
        if len(seeds) != b:
            raise InputError(f"seed: expected one seed or {b} seeds, got {len(seeds)}")
        if clean_latents is None:
            clean_latents = self.conditioning(batch)
        elif tuple(clean_latents.shape) != (b, *self._latent_shape()):
            raise InputError(f"clean_latents: expected shape {(b, *self._latent_shape())}, got {tuple(clean_latents.shape)}")
        clean_latents = clean_latents.to(self.device).float()
        roles = self.layout.role_tensor(kinds, device=self.device)
        clean = roles == FrameRole.CLEAN
        text = batch.text.to(self.device)

        def x0_fn(x: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return self.denoiser(x.float(), sigma.float(), clean_latents[rows], clean[rows], text[rows])

        noise = seeded_noise(self._latent_shape(), seeds, self.device)
        x0 = run_sampler(
            x0_fn,
            noise,
            steps=cfg.steps if steps is None else steps,
            sigma_min=cfg.sigma_min,
            sigma_max=cfg.sigma_max,
            rho=cfg.rho,
            solver=cfg.solver if solver is None else solver,
        ).float()
        x0 = torch.where(clean.view(b, 1, -1, 1, 1), clean_latents, x0)
        if not torch.isfinite(x0).all():
            raise FloatingPointError("sampling produced non-finite latents")
        return self.read_outputs(x0)

    @torch.no_grad()
    def conditioning(self, batch: ModelBatch) -> torch.Tensor:
        """The latents ``sample`` conditions on: the VAE encode of the clean prefix of each row's kind (zeros after it)
        with the batch's proprio (and any given action or value) injected. A function of the frozen VAE and the batch
        only, not of the network's weights: a server computes it for its next batch while the current one runs."""
        self.validate(batch, kinds_need_targets=False)
        kinds = [SampleKind(k) for k in batch.kinds]
        return self.inject(self.encode(batch, max(self.layout.clean_prefix(k) for k in kinds)), batch)

    def read_outputs(self, latents: torch.Tensor) -> Prediction:
        """Decode actions, future proprio and value from latent frames (no VAE needed)."""
        layout = self.layout
        b = latents.shape[0]
        actions = untile_from_frame(latents[:, :, layout.action_index], layout.action_size).reshape(b, layout.action_chunk, layout.action_dim)
        idx = layout.proprio_index(SlotTime.FUTURE)
        future_proprio = untile_from_frame(latents[:, :, idx], layout.proprio_dim) if idx is not None else None
        value = value_from_frame(latents[:, :, layout.value_index])
        return Prediction(latents=latents, actions=actions, future_proprio=future_proprio, value=value)

    def future_images(self, prediction: Prediction, batch: ModelBatch) -> dict[str, torch.Tensor]:
        """Decode predicted future camera images (uint8 per camera) for a sampled batch."""
        reference = self.encode(batch)
        return self.tokenizer.decode_future_images(prediction.latents, reference)

    def _latent_shape(self) -> tuple[int, int, int, int]:
        c, h, w = self.frame_shape
        return (c, self.layout.num_frames, h, w)


def _check(t: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name}: expected a tensor of shape {shape}, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise InputError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise InputError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise InputError(f"{name}: non-finite value (NaN or inf) at index {bad}")
