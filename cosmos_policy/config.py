"""The model's configuration: one OmegaConf schema for every model size, and how the model is queried.

``PolicyConfig`` (how the policy queries the model) and ``PlannerConfig`` (best-of-N planning)
live here too, beside the sizes, so that reading any config loads no torch or diffusers: a job
reports a mistake in its config in a second.

The YAML files in ``configs/model/`` fill this schema; anything not given keeps the method's
numbers (``cosmos_policy_method.md`` sections 3 and 4). Validation happens once, here, so a
typo in a config fails at load time with the field's name instead of deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cosmos_policy.errors import ConfigError


def _config_root() -> Path:
    """The YAML configs: the source tree's ``configs/`` in a checkout (editable install included),
    else the copy a wheel ships as ``cosmos_policy/_configs`` (pyproject.toml maps it onto ``configs/``)."""
    package = Path(__file__).resolve().parent
    source = package.parent / "configs"
    if (package.parent / "pyproject.toml").is_file() and source.is_dir():
        return source
    return package / "_configs"


CONFIG_ROOT = _config_root()

# The Wan 2.1 VAE compresses 8x in space and 4x in time; the DiT patches 2x2 in space.
VAE_SPATIAL_COMPRESSION = 8
VAE_TEMPORAL_COMPRESSION = 4


@dataclass
class NetworkConfig:
    """Arguments of diffusers' ``CosmosTransformer3DModel`` that differ between sizes."""

    num_layers: int = 28
    """Transformer blocks (the 2B network's 28)."""
    num_attention_heads: int = 16
    """Attention heads per block."""
    attention_head_dim: int = 128
    """Width per head: the model width is heads x head dim (2,048 for the 2B network)."""
    mlp_ratio: float = 4.0
    """Feed-forward width over model width."""
    adaln_lora_dim: int = 256
    """Rank of the low-rank adaptive-norm modulation from the timestep embedding."""
    max_size: list[int] = field(default_factory=lambda: [128, 240, 240])
    """Largest latent (frames, height, width) the positional embedding covers."""
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    """Latent patch per token (frames, height, width)."""
    rope_scale: list[float] = field(default_factory=lambda: [1.0, 3.0, 3.0])
    """Rotary position scaling per axis (frames, height, width)."""


@dataclass
class VAEConfig:
    """Arguments of diffusers' ``AutoencoderKLWan``; the defaults are Wan 2.1's."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    temperal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])


@dataclass
class TextConfig:
    """Shape of the text embeddings the network cross-attends to (T5-11B encoder: 512 x 1024)."""

    embed_dim: int = 1024
    max_length: int = 512


@dataclass
class TrainingNoiseConfig:
    """Hybrid sigma distribution of training (method 3.2)."""

    lognormal_probability: float = 0.7
    lognormal_mean: float = math.log(4.0)
    lognormal_std: float = 1.2
    uniform_low: float = 1.0
    uniform_high: float = 85.0
    # Base Predict2's adjust_video_noise: sigma times sqrt(number of latent frames).
    scale_by_sqrt_frames: bool = True


@dataclass
class DiffusionConfig:
    """Preconditioning and loss (method 3.1)."""

    sigma_data: float = 1.0
    sigma_conditional: float = 0.0
    loss_scale: float = 10.0
    noise: TrainingNoiseConfig = field(default_factory=TrainingNoiseConfig)


@dataclass
class SamplerConfig:
    """Inference sampler (method 4.1): Karras ladder 80 -> 4, second-order multistep."""

    sigma_max: float = 80.0
    sigma_min: float = 4.0
    rho: float = 7.0
    solver: str = "2ab"
    steps: int = 5


@dataclass
class ModelConfig:
    """Everything needed to build a Cosmos Policy model of one size."""

    name: str = "custom"
    image_size: int = 224
    dtype: str = "bfloat16"
    gradient_checkpointing: bool = False
    network: NetworkConfig = field(default_factory=NetworkConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    @property
    def latent_frame_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one latent frame, e.g. (16, 28, 28) at 224 pixels."""
        side = self.image_size // VAE_SPATIAL_COMPRESSION
        return (self.vae.z_dim, side, side)


_DTYPES = ("float32", "bfloat16", "float16")
_SOLVERS = ("2ab", "euler")


def validate_model_config(cfg: ModelConfig) -> ModelConfig:
    """Check the values no schema type can check; raise ``ConfigError`` naming the field."""
    patch = VAE_SPATIAL_COMPRESSION * cfg.network.patch_size[1]
    if cfg.image_size <= 0 or cfg.image_size % patch:
        raise ConfigError(f"model.image_size: expected a positive multiple of {patch}, got {cfg.image_size}")
    if cfg.dtype not in _DTYPES:
        raise ConfigError(f"model.dtype: expected one of {_DTYPES}, got {cfg.dtype!r}")
    if list(cfg.network.patch_size)[0] != 1:
        raise ConfigError("model.network.patch_size: the temporal patch must be 1 (per-frame timesteps need it)")
    for name in ("num_layers", "num_attention_heads", "attention_head_dim", "adaln_lora_dim"):
        if getattr(cfg.network, name) <= 0:
            raise ConfigError(f"model.network.{name}: expected a positive integer, got {getattr(cfg.network, name)}")
    if cfg.text.embed_dim <= 0 or cfg.text.max_length <= 0:
        raise ConfigError("model.text: embed_dim and max_length must be positive")
    s = cfg.sampler
    if not 0 < s.sigma_min < s.sigma_max:
        raise ConfigError(f"model.sampler: expected 0 < sigma_min < sigma_max, got {s.sigma_min}, {s.sigma_max}")
    if s.solver not in _SOLVERS:
        raise ConfigError(f"model.sampler.solver: expected one of {_SOLVERS}, got {s.solver!r}")
    if s.steps < 1:
        raise ConfigError(f"model.sampler.steps: expected >= 1, got {s.steps}")
    n = cfg.diffusion.noise
    if not 0.0 <= n.lognormal_probability <= 1.0:
        raise ConfigError(f"model.diffusion.noise.lognormal_probability: expected [0, 1], got {n.lognormal_probability}")
    if not 0 < n.uniform_low < n.uniform_high:
        raise ConfigError("model.diffusion.noise: expected 0 < uniform_low < uniform_high")
    if abs(cfg.diffusion.sigma_data - 1.0) > 1e-9:
        raise ConfigError("model.diffusion.sigma_data: rectified-flow preconditioning requires 1.0")
    return cfg


def load_model_config(name_or_path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> ModelConfig:
    """Load ``configs/model/<name>.yaml`` (or a YAML path) onto the schema, apply overrides.

    Overrides are a dict or dotlist (``["sampler.steps=10"]``); unknown keys are errors.
    """
    path = resolve_config_path("model", name_or_path)
    return model_config_from_dict(OmegaConf.load(path), overrides, source=str(path))


def config_names(group: str) -> list[str]:
    """The named configs of a group: ``configs/<group>/*.yaml`` stems."""
    return sorted(p.stem for p in (CONFIG_ROOT / group).glob("*.yaml"))


def resolve_config_path(group: str, name_or_path: str | Path) -> Path:
    """``configs/<group>/<name>.yaml`` for a name, the path itself for a ``.yaml`` path; must exist."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_ROOT / group / f"{name_or_path}.yaml"
    if not path.is_file():
        known = config_names(group)
        raise ConfigError(f"{group} config {str(name_or_path)!r}: no file {path} (known: {known})")
    return path


# ---- values checked against a schema's field types, before OmegaConf merges them -------------
_TRUE, _FALSE = ("true", "yes", "y", "on"), ("false", "no", "n", "off")  # the words OmegaConf reads as a bool


def check_field_types(source: str, values: dict[Any, Any], cls: type, prefix: str = "") -> None:
    """Each value of ``values`` (plain data for the dataclass ``cls``) against the type of its field.

    OmegaConf converts what it can, so a wrong type would pass unnoticed: a bool field takes
    ``-3`` (as true), a string field ``true`` (as "True"), a float field ``nan``; and a list given
    where a mapping belongs (or a mapping for a list) fails inside its merge with a TypeError, or
    a "Merge error", that names no key. Each is a ``ConfigError`` here naming ``source``, the
    dotted key (``prefix`` + the field path) and what was expected. Unknown keys are left to
    the merge, whose message suggests the key meant.
    """
    types_ = _field_types(cls)
    for key, value in values.items():
        if key in types_:
            _check_value(source, f"{prefix}{key}", value, types_[key])


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_value(source: str, key: str, value: Any, tp: Any) -> None:
    if isinstance(value, str) and "${" in value:
        return  # an interpolation: OmegaConf resolves and checks it
    args = typing.get_args(tp)
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        optional = len(kinds) < len(args)
        tp = kinds[0] if len(kinds) == 1 else Any
        args = typing.get_args(tp)
    if tp is Any or (value is None and optional):
        return
    origin = typing.get_origin(tp)
    expected = None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            expected = f"a mapping of {tp.__name__}'s fields"
        else:
            check_field_types(source, value, tp, f"{key}.")
    elif origin in (list, tuple):
        if not isinstance(value, list):
            expected = "a list"
        elif origin is tuple and args and Ellipsis not in args and len(value) != len(args):
            expected = f"a list of {len(args)} values"
        else:
            for i, item in enumerate(value):
                _check_value(source, f"{key}[{i}]", item, args[0] if args else Any)
    elif origin is dict or tp is dict:
        expected = None if isinstance(value, dict) else "a mapping"
    elif tp is bool:
        ok = isinstance(value, bool) or (isinstance(value, str) and value.lower() in _TRUE + _FALSE)
        expected = None if ok else "true or false"
    elif tp is int:
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and _parses(int, value))
        expected = None if ok else "an integer"
    elif tp is float:
        number = (isinstance(value, (int, float)) and not isinstance(value, bool)) or (isinstance(value, str) and _parses(float, value))
        finite = number and (isinstance(value, int) or math.isfinite(float(value)))  # float(10**400) would overflow
        expected = None if finite else "a finite number"
    elif tp is str:
        expected = None if isinstance(value, (str, int, float)) and not isinstance(value, bool) else "a string"
    if expected is not None:
        shown = "null" if value is None else repr(value)
        raise ConfigError(f"{source}: {key}: expected {expected}{' or null' if optional else ''}, got {shown}")


def _parses(kind: type, text: str) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _model_schema() -> DictConfig:
    """``ModelConfig`` as an OmegaConf config, built once (most of the time a checkpoint's config took to read);
    ``OmegaConf.merge`` copies its first argument, so this one is never changed."""
    return OmegaConf.structured(ModelConfig)


def model_config_from_dict(
    data: DictConfig | dict[str, Any], overrides: dict[str, Any] | list[str] | None = None, source: str = "config"
) -> ModelConfig:
    """Merge plain data (e.g. a checkpoint's saved config) onto the schema and validate it."""
    plain = OmegaConf.to_container(data, resolve=False) if isinstance(data, DictConfig) else data
    if not isinstance(plain, dict):
        raise ConfigError(f"{source}: model: expected a mapping of ModelConfig's fields, got {plain!r}")
    check_field_types(source, plain, ModelConfig, "model.")
    schema = _model_schema()
    try:
        merged = OmegaConf.merge(schema, data)
        if overrides:
            extra = OmegaConf.from_dotlist(list(overrides)) if isinstance(overrides, list) else OmegaConf.create(overrides)
            merged = OmegaConf.merge(merged, extra)
    except OmegaConfBaseException as exc:  # one line naming the key (OmegaConf's own message spreads it over several)
        first = str(exc).splitlines()[0].strip() if str(exc).strip() else type(exc).__name__
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"{source}: model.{key}: {first}" if key else f"{source}: {first}") from exc
    cfg: ModelConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    return validate_model_config(cfg)


def model_config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """Plain-data form for saving next to weights."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


# ---- how the model is queried: the policy and best-of-N planning (method sections 4 and 5) ---------------
AGGREGATIONS = ("majority_mean", "mean", "lcb", "success_vote")
VALUE_KINDS = ("value_sprime", "value", "q_value")


INFERENCE_FLOAT8 = ("off", "auto", "rowwise", "tensorwise")
"""float8 recipes of a query's network (``server.float8``; ``cosmos_policy.float8`` runs them)."""


@dataclass(frozen=True)
class PolicyConfig:
    """How the policy queries the model. Defaults are LIBERO's (method 4.2, 4.3)."""

    mode: str = "parallel"
    """parallel: actions, future state and value in one pass; autoregressive: one after the other (method 4.2)."""
    action_steps: int = 5
    """Denoising steps of the action pass (ALOHA: 10)."""
    future_steps: int = 5
    """Denoising steps of the future-state pass (autoregressive mode only)."""
    value_steps: int = 5
    """Denoising steps of the value pass (autoregressive mode only)."""
    execute: int | None = None
    """Actions executed per query; None = the whole chunk."""
    jpeg_round_trip: bool = True
    """JPEG q95 round trip of live frames, as training images went through (LIBERO, RoboCasa; not ALOHA's MP4)."""
    center_crop: bool = True
    """Centre crop of side sqrt(0.9), for a model trained with the random-crop augmentation (the experiment's default: data.augmentation)."""
    decode_future_images: bool = False
    """VAE-decode the predicted future images (costs a decode)."""
    return_latents: bool = False
    """Also return the final latents (debugging, analysis)."""
    prefix_encode: bool = True
    """Encode the conditioning frames with the constant leading frames' VAE state computed once (8 instead of 13 pixel frames in LIBERO)."""
    seed: int = 0
    """Sampling seed of a query that names none."""

    def __post_init__(self) -> None:
        if self.mode not in ("parallel", "autoregressive"):
            raise ConfigError(f"policy.mode: expected 'parallel' or 'autoregressive', got {self.mode!r}")
        for name in ("action_steps", "future_steps", "value_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"policy.{name}: expected >= 1, got {getattr(self, name)}")
        if self.execute is not None and self.execute < 1:
            raise ConfigError(f"policy.execute: expected >= 1 or None, got {self.execute}")
        if not 0 <= self.seed < 2**63:  # a torch generator's seed
            raise ConfigError(f"policy.seed: expected an integer in [0, 2**63), got {self.seed}")


@dataclass(frozen=True)
class PlannerConfig:
    """Best-of-N settings; the defaults are the official ALOHA deployment's (method 4.2, 5.1)."""

    num_candidates: int = 8
    """N: action chunks the policy proposes per query, each from its own seed."""
    future_steps: list[int] = field(default_factory=lambda: [1, 3, 5])
    """Denoising steps of each future-state ensemble member (one member per entry)."""
    value_steps: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """Denoising steps of each value ensemble member, per future state (one member per entry)."""
    aggregation: str = "majority_mean"
    """How a candidate's member values become its score: majority_mean, mean, lcb or success_vote (method 5.1)."""
    success_threshold: float = 0.05
    """A value above this counts as predicted success (majority_mean, success_vote)."""
    lcb_k: float = 1.0
    """lcb aggregation: mean - k * std of the member values."""
    value_kind: str = "value_sprime"
    """value_sprime: V(s') of each predicted future; value: V(s, a, s'); q_value: model-free Q(s, a), no world model."""
    depth: int = 1
    """Planning depth: > 1 re-plans from the imagined future state that many times."""
    depth_value: str = "last"
    """With depth > 1: the last depth's value, or the mean over depths."""
    max_batch: int = 64
    """Rows per forward pass (GPU memory)."""
    common_judge_seeds: bool = False
    """Judge all candidates of a query with the same world-model and value seeds, so score differences come from the actions.

    With per-candidate seeds (the official choice) a small judge's sampling noise can exceed the
    differences between candidates; the learning proof's judge ranks with shared seeds.
    """
    candidate_noise: float = 0.0
    """Std of a constant per-dimension offset (normalized action units) added to every candidate but the first (0: off).

    Widens the candidates of a policy whose samples barely differ from seed to seed; the first
    stays the policy's own sample, so ties keep its choice. Used by the learning proof's branching
    collection and planner (0.1).
    """

    def __post_init__(self) -> None:
        if self.num_candidates < 1:
            raise ConfigError(f"planner.num_candidates: expected >= 1, got {self.num_candidates}")
        for name in ("future_steps", "value_steps"):
            steps = list(getattr(self, name))
            if not steps or any(int(s) < 1 for s in steps):
                raise ConfigError(f"planner.{name}: expected a non-empty list of step counts >= 1, got {steps}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"planner.aggregation: expected one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.value_kind not in VALUE_KINDS:
            raise ConfigError(f"planner.value_kind: expected one of {VALUE_KINDS}, got {self.value_kind!r}")
        if self.depth < 1:
            raise ConfigError(f"planner.depth: expected >= 1, got {self.depth}")
        if self.depth_value not in ("last", "mean"):
            raise ConfigError(f"planner.depth_value: expected 'last' or 'mean', got {self.depth_value!r}")
        if self.max_batch < 1:
            raise ConfigError(f"planner.max_batch: expected >= 1, got {self.max_batch}")
        if not 0 <= self.success_threshold <= 1:  # values are in [0, 1]: outside it every candidate (or none) counts as success
            raise ConfigError(f"planner.success_threshold: expected a value in [0, 1], got {self.success_threshold}")
        if not self.lcb_k >= 0:  # a negative k ranks by an upper bound: the opposite of what lcb is for
            raise ConfigError(f"planner.lcb_k: expected >= 0, got {self.lcb_k}")
        if not self.candidate_noise >= 0:
            raise ConfigError(f"planner.candidate_noise: expected a std >= 0, got {self.candidate_noise}")
