"""The learner's settings (``LearnerConfig``) and the DeepSpeed config made from them (no torch: a config loads fast)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cosmos_policy.errors import ConfigError
from learner.schedule import ScheduleConfig

ENCODE_MODES = ("full", "needed")  # learner.encode: which frames the VAE encodes for the targets
FLOAT8_RECIPES = ("off", "auto", "tensorwise", "rowwise", "rowwise_with_gw_hp")  # auto: tensorwise where the GPU has float8


@dataclass(frozen=True)
class LearnerConfig:
    """One learner's settings. In an experiment, the job sets the fields it owns (model, layout,
    init_checkpoint, lr, micro_batch, checkpoint_dir, seed, the schedule's lengths) from its other
    sections; the rest are the ``learner`` section's."""

    model: str = "tiny"
    """Model size (configs/model) when not starting from a checkpoint (the job: model.size)."""
    layout: str = "libero"
    """Latent layout (configs/layout) of a model built from scratch (the job: model.layout)."""
    init_checkpoint: str | None = None
    """The weights to refine, a checkpoint in our format (the job: the phase's starting checkpoint)."""
    init_counts: bool = False
    """Continue the step and weight-version counts recorded in ``init_checkpoint`` (its export metadata),
    when ``checkpoint_dir`` holds no checkpoint of its own: a run moved without its learner checkpoints
    resumes from its latest export on the same schedule and version numbers, with a fresh optimizer state
    (the job: set when an online learner restarts from the run's latest export)."""
    lr: float = 1e-4
    """Peak learning rate (the job: offline.lr or online.lr)."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW's betas (method 3.6)."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clipping."""
    micro_batch: int = 4
    """Samples per process per micro-step (the job: the phase's batch / grad_accum)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (memory: the 2b model on one GPU takes 4 of 8)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0-3."""
    precision: str = "auto"
    """auto: bf16 on GPUs, fp32 on CPUs; or bf16, fp32."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """The two-cycle learning-rate schedule (the job sets its lengths from the phase)."""
    checkpoint_dir: str = "runs/learner/checkpoints"
    """Where DeepSpeed checkpoints go (the job: under run_dir/learner)."""
    checkpoint_every: int = 1000
    """Steps between checkpoints; 0: only when asked (and on shutdown)."""
    checkpoint_every_s: float = 600.0
    """Seconds between checkpoints besides the steps (a learner killed loses at most this much of its work);
    counted by the learner group between chunks of steps, every rank saving at once; 0: by steps only."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (the oldest are deleted)."""
    seed: int = 0
    """Seed of the data draws and the training noise (the job: seed)."""
    deterministic: bool = False
    """torch's deterministic algorithms (slower; for exactness tests)."""
    checkpoint_blocks: int | None = None
    """Gradient checkpointing of the first N transformer blocks; None: the model config's choice (2b: every block)."""
    compile: bool | None = None
    """torch.compile every transformer block; None: on GPUs (ZeRO <= 2)."""
    fused_optimizer: bool | None = None
    """Fused AdamW; None: on GPUs (DeepSpeed's torch AdamW, foreach, on CPUs)."""
    vae_encode: str = "needed"
    """needed: skip frames injection overwrites and the constant leading frames; full: encode all."""
    vae_batch: int = 8
    """Clips per VAE encoder call."""
    vae_compile: bool | None = None
    """torch.compile the VAE encoder; None: on GPUs."""
    vae_channels_last: bool | None = None
    """Channels-last 3-D convolutions in the VAE encoder; None: on GPUs."""
    vae_dtype: str = "auto"
    """auto: bf16 when training in bf16, else the VAE's own dtype; or bf16, fp32."""
    data_workers: int = 0
    """> 0: batches built ahead in this many worker processes (JPEG decoding, augmentation)."""
    prepare_ahead: bool | None = None
    """A host thread draws, checks and pins the next micro-batch; None: on GPUs."""
    cudnn_benchmark: bool = True
    """GPUs: let cuDNN time its convolution algorithms once (the VAE's shapes never change)."""
    float8: str = "off"
    """float8 matrix products in the blocks' token-wise layers (learner.float8): off, auto, tensorwise, rowwise, ..."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"learner.zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"learner.precision: expected auto, bf16 or fp32, got {self.precision!r}")
        for name in ("micro_batch", "grad_accum", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"learner.{name}: expected >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"learner.lr: expected > 0, got {self.lr}")
        # The optimizer's numbers, refused by name when the config loads: torch's AdamW would refuse some only
        # when a learner builds it, after the job has started, and a negative clipping norm nowhere.
        if not self.eps > 0:
            raise ConfigError(f"learner.eps: expected > 0, got {self.eps}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"learner.weight_decay: expected >= 0, got {self.weight_decay}")
        if not self.grad_clip >= 0:
            raise ConfigError(f"learner.grad_clip: expected a gradient norm >= 0 (0: no clipping), got {self.grad_clip}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"learner.betas: expected two values in [0, 1), got {list(self.betas)}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"learner.checkpoint_every: expected >= 0, got {self.checkpoint_every}")
        if not (isinstance(self.checkpoint_every_s, (int, float)) and self.checkpoint_every_s >= 0):
            raise ConfigError(f"learner.checkpoint_every_s: expected a number of seconds >= 0, got {self.checkpoint_every_s!r}")
        if self.checkpoint_blocks is not None and self.checkpoint_blocks < 0:
            raise ConfigError(f"learner.checkpoint_blocks: expected None or >= 0, got {self.checkpoint_blocks}")
        if self.vae_encode not in ENCODE_MODES:
            raise ConfigError(f"learner.vae_encode: expected one of {ENCODE_MODES}, got {self.vae_encode!r}")
        if self.vae_dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"learner.vae_dtype: expected auto, bf16 or fp32, got {self.vae_dtype!r}")
        if self.vae_batch < 1:
            raise ConfigError(f"learner.vae_batch: expected >= 1, got {self.vae_batch}")
        if self.data_workers < 0:
            raise ConfigError(f"learner.data_workers: expected >= 0, got {self.data_workers}")
        if self.float8 is False:  # YAML 1.1 reads a bare `off` (float8: off, learner.float8=off) as false
            object.__setattr__(self, "float8", "off")
        if self.float8 not in FLOAT8_RECIPES:
            raise ConfigError(f"learner.float8: expected one of {FLOAT8_RECIPES}, got {self.float8!r}")
        if self.compile is True and self.zero_stage == 3:
            raise ConfigError("learner.compile: not supported with zero_stage 3 (its parameter gathering hooks run inside "
                              "every block); use zero_stage <= 2 or compile: false")


def deepspeed_config(cfg: LearnerConfig, world_size: int, bf16: bool, client_optimizer: bool = False) -> dict[str, Any]:
    """The DeepSpeed config; with ``client_optimizer`` the AdamW is built by the learner (fused) and not named here."""
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if not client_optimizer:
        out["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay, "torch_adam": True},
        }
    return out
