"""The learner core: one process of a DeepSpeed data-parallel run. No Ray.

The denoiser is the only trainable module (the VAE and text encoder stay frozen): DeepSpeed
wraps it (ZeRO stage 2 by default, 3 optional; bf16 on GPUs; gradient clipping 1.0; gradient
accumulation) with AdamW (lr 1e-4, betas (0.9, 0.99), weight decay 0.1; torch's AdamW so no op
has to compile) and the official two-cycle schedule. Processes find each other through the
usual RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT variables, which a Ray worker group
(``learner.group``) or torchrun sets; gloo on CPUs, NCCL on GPUs.

Batches come from a ``BatchSource`` as a function of (seed, rank, step), and the noise of every
step from a generator seeded the same way, so a run stopped after k steps and resumed from its
checkpoint continues with exactly the steps it would have taken.

Speed options (``LearnerConfig``; all but ``float8`` change only how things are computed, not what):
- ``checkpoint_blocks``: gradient checkpointing of the first N transformer blocks only
  (selective: recompute just enough blocks for the activations to fit);
- ``compile``: each transformer block through ``torch.compile`` (fuses the norms, RoPE and
  modulation around the matrix products);
- ``fused_optimizer``: torch's fused AdamW kernel (one pass over the fp32 master weights and
  moments instead of one per operation);
- ``vae_encode="needed"`` with ``vae_batch`` / ``vae_compile`` / ``vae_dtype``: the training
  targets without encoding frames that injection overwrites or that are the same for every
  sample (``learner.encode``);
- ``float8``: float8 matrix products for the blocks' token-wise linear layers on GPUs that have
  them (``learner.float8``; this one changes the numbers by float8 rounding, off by default);
- ``data_workers``: samples built (JPEG decode, augmentation) in worker processes ahead of the
  step that needs them (``learner.data.PrefetchBatches``), still as a function of the step.
See ``bench/learner_speed.py`` for what each buys on one H100.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import re
import shutil
import socket
import threading
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cosmos_policy.checkpoint import load_checkpoint, save_checkpoint
from cosmos_policy.codec import NormalizationStats
from cosmos_policy.config import load_model_config
from cosmos_policy.errors import CheckpointError, ConfigError
from cosmos_policy.layout import load_layout
from cosmos_policy.model import CosmosPolicyModel
from cosmos_policy.objective import TrainingNoise
from cosmos_policy.text import TextEmbeddingCache
from cosmos_policy.weights import Packed, Packer
from learner.data import BatchSource, PrefetchBatches
from learner.encode import TargetEncoder
from learner.float8 import convert_float8, resolve_float8
from learner.config import LearnerConfig, deepspeed_config
from learner.schedule import lr_multiplier

_TAG = re.compile(r"^step(\d+)$")


def configure_blocks(net: torch.nn.Module, checkpoint_blocks: int | None, compile: bool) -> int:
    """Selective gradient checkpointing and per-block compilation of the DiT; returns how many blocks are checkpointed.

    diffusers checkpoints all blocks or none; here the first ``checkpoint_blocks`` blocks are
    recomputed in the backward pass and the rest keep their activations, so memory can be
    traded for speed one block at a time. Each block's ``forward`` is wrapped on the instance,
    so parameter names, state dicts and checkpoints are unchanged. Compiling block by block
    gives one graph that all (identical) blocks share.
    """
    import functools

    blocks = getattr(net, "transformer_blocks", None)
    if blocks is None:
        raise ConfigError("learner.checkpoint_blocks / learner.compile: the network has no transformer_blocks")
    n = len(blocks) if checkpoint_blocks is None and getattr(net, "gradient_checkpointing", False) else (checkpoint_blocks or 0)
    if n > len(blocks):
        raise ConfigError(f"learner.checkpoint_blocks: the network has {len(blocks)} blocks, got {n}")
    if hasattr(net, "disable_gradient_checkpointing") and getattr(net, "gradient_checkpointing", False):
        net.disable_gradient_checkpointing()  # the per-block wrappers below take over
    for i, block in enumerate(blocks):
        forward = block.forward
        if compile:
            forward = torch.compile(forward, dynamic=False)
        if i < n:
            forward = functools.partial(_checkpointed, forward)
        if forward is not block.forward:
            block.forward = forward
    return n


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


PG_TIMEOUT = datetime.timedelta(minutes=30)  # DeepSpeed's default for its own process group


def init_on_loopback(backend: str, cuda: bool) -> None:
    """The ranks' process group, when they meet on this machine (a loopback ``MASTER_ADDR``), over a store that
    listens on that address only.

    torch's TCPStore server listens on every interface, whatever ``MASTER_ADDR`` says: a learner on one
    machine would accept connections from the network on ``MASTER_PORT``. Rank 0 hands it a socket bound to
    the loopback address instead (``master_listen_fd``); gloo's own sockets follow the address the ranks
    resolve to. Elsewhere (ranks on several hosts) DeepSpeed's ``env://`` rendezvous does it, as before.
    """
    import torch.distributed as dist

    addr = os.environ["MASTER_ADDR"]
    try:
        loopback = addr == "localhost" or ipaddress.ip_address(addr).is_loopback
    except ValueError:
        loopback = False
    if dist.is_initialized() or not loopback:
        return
    addr = "127.0.0.1" if addr == "localhost" else addr
    port, rank, world = int(os.environ["MASTER_PORT"]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank == 0:
        sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(128)
        # detach: the store owns the descriptor from here (closing it twice would close another's)
        store = dist.TCPStore(addr, port, world, True, PG_TIMEOUT, master_listen_fd=sock.detach())
    else:
        store = dist.TCPStore(addr, port, world, False, PG_TIMEOUT)
    kwargs: dict[str, Any] = {}
    if cuda and world > 1:  # as DeepSpeed binds it (not on one rank: every later group would be split from it)
        kwargs["device_id"] = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=PG_TIMEOUT, **kwargs)


def skip_shared_memory_all_reduce() -> None:
    """Tell DeepSpeed's CPU backend not to build its shared-memory all-reduce. Its C++ extension is compiled on the
    first ``init_distributed`` of every machine and environment (about a minute on 2 cores) but serves only
    ``inference_all_reduce``, which training never calls: gloo does the learner's all-reduces either way. DeepSpeed
    reads ``deepspeed.ops.__compatible_ops__`` to decide, and keeps edits to it (one dict per process)."""
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


class Learner:
    """One rank of the learner."""

    def __init__(self, config: LearnerConfig, source: BatchSource | Callable[[CosmosPolicyModel, int], BatchSource],
                 model: CosmosPolicyModel | None = None) -> None:
        if not torch.cuda.is_available():  # say so, or DeepSpeed warns on every rank that it found no GPU to use
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        if not torch.cuda.is_available():
            skip_shared_memory_all_reduce()

        self.config = config
        self.cuda = torch.cuda.is_available()
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.manual_seed(config.seed)
        backend = "nccl" if self.cuda else "gloo"
        init_on_loopback(backend, self.cuda)
        deepspeed.init_distributed(dist_backend=backend, verbose=False)  # takes the group made above, if any
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if self.cuda else torch.device("cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = config.cudnn_benchmark
        self.stats: NormalizationStats | None = None
        self.text: TextEmbeddingCache | None = None
        self._packer = Packer(torch.bfloat16)  # publication buffers, reused version after version
        self._init_metadata: dict[str, Any] = {}  # the init checkpoint's export metadata (step, version)
        self.model = model if model is not None else self._initial_model()
        self.bf16 = config.precision == "bf16" or (config.precision == "auto" and self.cuda)
        self._vae_export_dtype = self.model.tokenizer.dtype
        self.model.tokenizer.to(self.device)
        if config.vae_dtype == "bf16" or (config.vae_dtype == "auto" and self.bf16):
            self.model.tokenizer.vae.to(torch.bfloat16)  # frozen: bf16 weights and activations, as for inference
        elif config.vae_dtype == "fp32":
            self.model.tokenizer.vae.to(torch.float32)
        compile_blocks = config.compile if config.compile is not None else (self.cuda and config.zero_stage <= 2)
        compile_vae = config.vae_compile if config.vae_compile is not None else self.cuda
        self.float8 = resolve_float8(config.float8)  # the recipe in use (auto resolved for this device)
        self.float8_layers = convert_float8(self.model.denoiser.net, self.float8)  # before compiling and the optimizer
        self.checkpointed_blocks = configure_blocks(self.model.denoiser.net, config.checkpoint_blocks, compile_blocks)
        channels_last = config.vae_channels_last if config.vae_channels_last is not None else self.cuda
        self.targets = TargetEncoder(self.model, config.vae_encode, config.vae_batch, compile_vae, channels_last)
        params = [p for p in self.model.denoiser.parameters() if p.requires_grad]
        fused = config.fused_optimizer if config.fused_optimizer is not None else self.cuda
        optimizer = None
        if fused:
            optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
                                          fused=True)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model.denoiser,
            model_parameters=params,
            optimizer=optimizer,
            config=deepspeed_config(config, self.world_size, self.bf16, client_optimizer=optimizer is not None),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, config.schedule)),
        )
        self.model.denoiser = self.engine.module  # the same module, now owned by DeepSpeed
        self.source = source(self.model, self.rank) if callable(source) and not hasattr(source, "batch") else source
        if config.data_workers > 0:
            self.source = PrefetchBatches(self.source, workers=config.data_workers)
        self.step = 0
        self.version = 0
        self.samples = 0
        # Whose weight versions this learner publishes, and so which of an episode's versions its staleness compares
        # with: the planning model's learner against the planning versions that played the episode.
        self.versions_of = "policy"
        if config.init_counts and self._init_metadata:  # resume() below still prefers a checkpoint of its own
            self._continue_counts(self._init_metadata)
        # GPUs: a host thread prepares the next micro-batch (source, checks, pinning) during this one.
        self.prepare_ahead = config.prepare_ahead if config.prepare_ahead is not None else self.cuda
        self._ahead: tuple[int, Future] | None = None

    def _initial_model(self) -> CosmosPolicyModel:
        cfg = self.config
        if cfg.init_checkpoint:
            ckpt = load_checkpoint(cfg.init_checkpoint)
            self.stats, self.text, self._init_metadata = ckpt.stats, ckpt.text, ckpt.metadata
            model = ckpt.model
            model.denoiser.train()
            for p in model.denoiser.parameters():
                p.requires_grad_(True)
            return model
        return CosmosPolicyModel.build(load_model_config(cfg.model), load_layout(cfg.layout), seed=cfg.seed)

    def _continue_counts(self, metadata: dict[str, Any]) -> None:
        """Step, weight version and samples from an export's metadata, and the schedule moved to that step."""
        self.step, self.version = int(metadata.get("step", 0)), int(metadata.get("version", 0))
        self.samples = int(metadata.get("samples", 0))
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": no step is taken here
            warnings.simplefilter("ignore")
            self.scheduler.last_epoch = self.step - 1
            self.scheduler.step()

    # ---- training ----------------------------------------------------------------------
    def generator(self, micro: int, step: int | None = None) -> torch.Generator:
        """The noise generator of (seed, rank, step, micro-step): a resumed run draws what it would have drawn."""
        step = self.step if step is None else step
        return torch.Generator().manual_seed(hash((self.config.seed, self.rank, step, micro)) & 0x7FFF_FFFF_FFFF)

    def train_step(self, save: bool = True) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics (this rank's).

        ``save``: the checkpoint every ``checkpoint_every`` steps is taken here (without: by the caller, as the
        worker does after the step's publication, so that the checkpoint holds the version it published)."""
        cfg = self.config
        start = time.perf_counter()
        wait_before = getattr(self.source, "wait_s", 0.0)
        versions: list[int] = []
        self.engine.train()
        sums: dict[str, list[torch.Tensor]] = {}
        for micro in range(cfg.grad_accum):
            index = self.step * cfg.grad_accum + micro
            batch, noise = self._prepared(index)
            if self.prepare_ahead:  # the next micro-batch is drawn, checked and pinned while this one trains
                self._ahead = (index + 1, self._prepare_in_background(index + 1))
            # Checked on the host, then copied without waiting: nothing in the micro-steps reads a
            # value back from the GPU, so the host queues work ahead of it (metrics are read once below).
            model_batch = batch.model.to(self.device)
            x0 = self.targets(model_batch, validate=False)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out = self.model.training_loss(model_batch, x0=x0, validate=False, noise=noise)
            self.engine.backward(out.loss)
            self.engine.step()
            for k, v in out.metric_tensors.items():
                sums.setdefault(k, []).append(v.detach().float())
            versions += batch.versions(self.versions_of)
        means = torch.stack([torch.stack(v).mean() for v in sums.values()]).tolist() if sums else []
        metrics = dict(zip(sums, means))
        self.step += 1
        self.samples += cfg.micro_batch * cfg.grad_accum * self.world_size
        elapsed = time.perf_counter() - start
        norm = self.engine.get_global_grad_norm()
        metrics.update({
            "step": self.step,
            "lr": float(self.scheduler.get_last_lr()[0]),
            "grad_norm": float(norm) if norm is not None else float("nan"),
            "samples_per_s": cfg.micro_batch * cfg.grad_accum * self.world_size / elapsed,
            "staleness_versions": float(self.version - np.mean(versions)) if versions else 0.0,
            "staleness_max_versions": float(self.version - min(versions)) if versions else 0.0,
            "replay_wait_s": getattr(self.source, "wait_s", 0.0) - wait_before,
        })
        if save and self.checkpoint_due():
            self.save()
        return metrics

    def checkpoint_due(self) -> bool:
        return bool(self.config.checkpoint_every) and self.step % self.config.checkpoint_every == 0

    def evaluate(self, batch: Any, seed: int = 0) -> float:
        """The loss on ``batch`` (a Batch or a ModelBatch) with fixed noise, without training: held-out
        validation, comparable between calls because the noise is seeded."""
        model = self.model
        model.denoiser.eval()
        with torch.no_grad():
            loss = model.training_loss(getattr(batch, "model", batch).to(self.device), torch.Generator().manual_seed(seed)).loss
        model.denoiser.train()
        return float(loss)

    def _prepare(self, index: int) -> tuple[Any, TrainingNoise]:
        """Micro-batch ``index`` from the source, checked, and its noise drawn (all pinned on GPUs): the
        host's share of a micro-step.

        On a GPU this runs in a thread one micro-batch ahead: checking and pinning a batch and
        drawing its noise take tens of milliseconds of host time (measured: 0.3 s of GPU idle per 2b
        step when done inline). The noise comes from the generator of (step, micro-step), so it is
        the same whether drawn ahead or not.
        """
        batch = self.source.batch(index)
        self.model.validate(batch.model, kinds_need_targets=True)
        step, micro = divmod(index, self.config.grad_accum)
        noise = self.model.training_noise(batch.model.batch_size, self.generator(micro, step))
        if self.cuda:
            batch = dataclasses.replace(batch, model=batch.model.pinned()) if dataclasses.is_dataclass(batch) else batch
            noise = noise.pinned()
        return batch, noise

    def _prepare_in_background(self, index: int) -> Future:
        """``_prepare(index)`` in a daemon thread (one that never holds up the process's exit, e.g. while a
        replay source waits for data at shutdown)."""
        future: Future = Future()

        def work() -> None:
            try:
                future.set_result(self._prepare(index))
            except BaseException as exc:  # handed to the training thread, which raises it
                future.set_exception(exc)

        threading.Thread(target=work, name=f"learner-prep-{index}", daemon=True).start()
        return future

    def _prepared(self, index: int) -> Any:
        ahead = self._ahead
        self._ahead = None
        if ahead is not None:
            batch = ahead[1].result()  # also when it is not the one asked for: the source is never used by two threads
            if ahead[0] == index:
                return batch
        return self._prepare(index)

    # ---- checkpoints -------------------------------------------------------------------
    def save(self) -> Path:
        """DeepSpeed checkpoint of model, optimizer, schedule, step and data position (all ranks call)."""
        root = Path(self.config.checkpoint_dir)
        tag = f"step{self.step:08d}"
        self.engine.save_checkpoint(str(root), tag=tag, client_state={"step": self.step, "version": self.version, "samples": self.samples})
        if self.rank == 0:
            tags = sorted(p.name for p in root.iterdir() if p.is_dir() and _TAG.match(p.name))
            for old in tags[: -self.config.keep_checkpoints]:
                shutil.rmtree(root / old, ignore_errors=True)
        return root / tag

    def resume(self) -> bool:
        """Load the latest checkpoint in ``checkpoint_dir`` if there is one; returns whether it did."""
        root = Path(self.config.checkpoint_dir)
        if not (root / "latest").is_file():
            return False
        tag = (root / "latest").read_text().strip()
        try:
            path, client = self.engine.load_checkpoint(str(root), tag=tag)
        except Exception as exc:  # torch, pickle and DeepSpeed each fail in their own way on a bad file
            raise CheckpointError(f"{root / tag}: cannot resume from this learner checkpoint, corrupt or from another model ({exc})") from exc
        if path is None:
            raise CheckpointError(f"{root / tag}: the learner checkpoint named in 'latest' is missing")
        self.step, self.version, self.samples = int(client["step"]), int(client["version"]), int(client.get("samples", 0))
        return True

    def full_state(self) -> dict[str, torch.Tensor]:
        """The denoiser's full weights on every rank (gathered under ZeRO-3)."""
        if self.config.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.denoiser.net.parameters()), modifier_rank=None):
                return {k: v.detach().clone().cpu() for k, v in self.model.denoiser.net.state_dict().items()}
        return {k: v.detach().cpu() for k, v in self.model.denoiser.net.state_dict().items()}

    def export(self, path: str | Path) -> Path | None:
        """A consolidated checkpoint in our format (rank 0 writes it; every rank must call)."""
        state = self.full_state()
        if self.rank != 0:
            return None
        cfg = self.model.config
        vae = self.model.tokenizer.vae
        if self.model.tokenizer.dtype != self._vae_export_dtype:  # cast for training speed: export it as it came
            import copy

            vae = copy.deepcopy(vae).to("cpu", self._vae_export_dtype)
        with torch.device("cpu"):
            out = CosmosPolicyModel(cfg, self.model.layout, vae=vae)
        out.denoiser.net.load_state_dict(state)
        return save_checkpoint(path, out, stats=self.stats, text=self.text,
                               metadata={"step": self.step, "version": self.version, "samples": self.samples})

    def packed_weights(self) -> Packed:
        """The denoiser weights packed for publication (bf16), into arrays reused from the last publication."""
        return self._packer.pack(self.full_state())
