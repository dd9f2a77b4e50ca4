"""Checkpoints: our format, and offline import of NVIDIA's files.

Our format is a directory written atomically (a temporary directory renamed into place):
    manifest.json             format version, SHA-256 of every file, free-form metadata
    config.yaml               the model config and the latent layout
    denoiser.safetensors      DiT weights (diffusers names)
    vae.safetensors           VAE weights (diffusers names)
    dataset_statistics.json   normalization statistics (official JSON keys), optional
    t5_embeddings.pkl         instruction embeddings (official pickle format), optional

NVIDIA's base ``model-480p-16fps.pt`` and the released Cosmos Policy ``.pt`` files hold the DiT
under ``net.`` (and, for the base model, an EMA copy under ``net_ema.``, which the official
fine-tuning loads into the trainable weights). They are renamed to diffusers' layout with
diffusers' own converter (``convert_cosmos_transformer_checkpoint_to_diffusers``) and loaded into
a network built from a local config, so nothing touches the network. The Wan VAE comes from a
local diffusers-format directory.
"""

from __future__ import annotations

import collections
import datetime as _dt
import hashlib
import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from cosmos_policy.codec import NormalizationStats
from cosmos_policy.config import ModelConfig, load_model_config, model_config_from_dict, model_config_to_dict
from cosmos_policy.errors import CheckpointError, ConfigError, StatisticsError
from cosmos_policy.layout import LatentLayout, layout_from_dict, load_layout
from cosmos_policy.manifest import DENOISER_FILE, FORMAT, FORMAT_VERSION, STATS_FILE, TEXT_FILE, VAE_FILE, read_manifest
from cosmos_policy.model import CosmosPolicyModel
from cosmos_policy.text import TextEmbeddingCache



@dataclass
class LoadedCheckpoint:
    """A model with what it needs to act: statistics and instruction embeddings."""

    model: CosmosPolicyModel
    stats: NormalizationStats | None = None
    text: TextEmbeddingCache | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


# ---- our format ------------------------------------------------------------------------
def save_checkpoint(
    path: str | Path,
    model: CosmosPolicyModel,
    stats: NormalizationStats | None = None,
    text: TextEmbeddingCache | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory; an existing one at ``path`` is replaced only when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(_contiguous(model.denoiser.net.state_dict()), str(tmp / DENOISER_FILE))
        save_file(_contiguous(model.tokenizer.vae.state_dict()), str(tmp / VAE_FILE))
        config = {"model": model_config_to_dict(model.config), "layout": model.layout.to_dict()}
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
        if stats is not None:
            stats.save(tmp / STATS_FILE)
        if text is not None:
            text.save(tmp / TEXT_FILE)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "files": files,
            "metadata": metadata or {},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        _fsync_files(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_checkpoint(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    expected_layout: LatentLayout | None = None,
    verify: bool = True,
) -> LoadedCheckpoint:
    """Load a checkpoint directory written by ``save_checkpoint``.

    ``verify`` checks every file's SHA-256 against the manifest first, so a truncated or
    corrupted file is reported by name instead of as a shape error later.
    """
    path = Path(path)
    manifest = read_manifest(path)
    files: dict[str, str] = manifest["files"]
    for name, digest in files.items():
        if verify and _sha256(path / name) != digest:
            raise CheckpointError(f"{path / name}: checksum mismatch, the file is corrupt or was modified after saving")

    config, layout = _read_config(path / "config.yaml")
    if expected_layout is not None and layout != expected_layout:
        raise CheckpointError(f"{path}: checkpoint layout {layout.name!r} differs from the expected layout {expected_layout.name!r}")

    with torch.device("meta"):
        model = CosmosPolicyModel(config, layout)
    _load_weights(model.denoiser.net, _read_safetensors(path / DENOISER_FILE), path / DENOISER_FILE, one_dtype=True)
    _load_weights(model.tokenizer.vae, _read_safetensors(path / VAE_FILE), path / VAE_FILE, one_dtype=True)
    stats = _load_stats(path / STATS_FILE, layout) if STATS_FILE in files else None
    text = TextEmbeddingCache.load(path / TEXT_FILE) if TEXT_FILE in files else None
    if text is not None and text.shape is not None and text.shape != (config.text.max_length, config.text.embed_dim):
        # The network cross-attends to (max_length, embed_dim) embeddings: others fail at the first query, far from here.
        first = text.instructions()[0]
        raise CheckpointError(f"{path / TEXT_FILE}: key {first!r}: expected shape {(config.text.max_length, config.text.embed_dim)} "
                              f"(the model config's text max_length, embed_dim), got {text.shape}")
    model = _materialize(model, device, dtype)
    return LoadedCheckpoint(model=model, stats=stats, text=text, metadata=manifest.get("metadata", {}))


def _read_config(path: Path) -> tuple[ModelConfig, LatentLayout]:
    """A checkpoint's config.yaml: the model config and the layout; errors name the file and the key.

    A file that is not YAML, or whose sections are missing or of the wrong type, is a
    ``CheckpointError`` here rather than a YAML parser's or a KeyError's traceback."""
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a mapping with keys 'model' and 'layout', got {type(data).__name__}")
    for key in ("model", "layout"):
        if not isinstance(data.get(key), dict):
            what = "missing" if key not in data else f"expected a mapping, got {data[key]!r}"
            raise CheckpointError(f"{path}: key '{key}': {what}")
    try:
        config = model_config_from_dict(data["model"], source=str(path))
        layout = layout_from_dict(data["layout"])
    except ConfigError as exc:
        raise CheckpointError(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}") from None
    return config, layout


# ---- NVIDIA files ----------------------------------------------------------------------
_COSMOS2_MARKER = "net.blocks.0.self_attn.q_proj.weight"
# Entries of NVIDIA's training state that are not network weights.
_NON_WEIGHT_MARKERS = ("accum_", "_extra_state", "pos_embedder.", "logvar")


def import_nvidia_checkpoint(
    weights: str | Path,
    vae: str | Path,
    config: ModelConfig | str = "2b",
    layout: LatentLayout | str = "libero",
    statistics: str | Path | None = None,
    text_embeddings: str | Path | None = None,
    prefer_ema: bool = True,
    allow_pickle: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> LoadedCheckpoint:
    """Import NVIDIA's DiT ``.pt`` (base Predict2 or released Cosmos Policy) with its side files.

    Args:
        weights: the ``.pt`` file (``model-480p-16fps.pt``, ``Cosmos-Policy-LIBERO-Predict2-2B.pt``...).
        vae: a diffusers-format ``AutoencoderKLWan`` directory (the Wan 2.1 VAE).
        config / layout: names under ``configs/`` or objects; the network is built from the config.
        statistics / text_embeddings: the official ``*_dataset_statistics.json`` and ``*_t5_embeddings.pkl``.
        prefer_ema: use ``net_ema.`` weights when the file has them (the official base-model recipe).
        allow_pickle: permit arbitrary pickled objects in ``weights``; only for files you trust.
    """
    _check_import_files(weights, vae, statistics, text_embeddings)
    cfg = load_model_config(config) if isinstance(config, str) else config
    lay = load_layout(layout) if isinstance(layout, str) else layout
    weights = Path(weights)
    raw = _torch_load(weights, allow_pickle)
    net_state = extract_network_state(raw, prefer_ema, source=str(weights))
    with torch.device("meta"):
        model = CosmosPolicyModel(cfg, lay)
    _load_weights(model.denoiser.net, convert_nvidia_network_state(net_state, source=str(weights)), weights)
    _load_vae_into(model.tokenizer.vae, Path(vae))
    model = _materialize(model, device, dtype)
    stats = _load_stats(Path(statistics)) if statistics is not None else None
    text = TextEmbeddingCache.load(text_embeddings) if text_embeddings is not None else None
    return LoadedCheckpoint(model=model, stats=stats, text=text, metadata={"imported_from": str(weights)})


def _check_import_files(weights: str | Path, vae: str | Path, statistics: str | Path | None, text_embeddings: str | Path | None) -> None:
    """Every file the import reads, checked before any is: each missing or empty one named, all in one error."""
    problems = []
    files = [("weights", weights), ("statistics", statistics), ("text_embeddings", text_embeddings)]
    vae = Path(vae)
    files += [("vae", vae / "config.json")] if vae.is_dir() else []
    for what, path in files:
        if path is None:
            continue
        path = Path(path)
        if not path.is_file():
            problems.append(f"{what}: {path} not found")
        elif path.stat().st_size == 0:
            problems.append(f"{what}: {path} is empty (0 bytes)")
    if not vae.is_dir():
        problems.append(f"vae: {vae} is not a directory (expected a diffusers AutoencoderKLWan directory: config.json + *.safetensors)")
    elif not any(vae.glob("*.safetensors")):
        problems.append(f"vae: no *.safetensors in {vae}")
    if problems:
        raise CheckpointError("import_nvidia_checkpoint: " + "; ".join(problems))


def extract_network_state(raw: Any, prefer_ema: bool, source: str) -> dict[str, torch.Tensor]:
    """Find the ``net.``-prefixed DiT tensors in a loaded NVIDIA checkpoint object."""
    candidates = [raw]
    while candidates:
        obj = candidates.pop(0)
        if not isinstance(obj, Mapping):
            continue
        keys = [k for k in obj if isinstance(k, str)]
        ema = {k[len("net_ema.") :]: v for k, v in obj.items() if isinstance(k, str) and k.startswith("net_ema.")}
        net = {k[len("net.") :]: v for k, v in obj.items() if isinstance(k, str) and k.startswith("net.")}
        chosen = ema if (prefer_ema and ema) or not net else net
        if chosen:
            state = {f"net.{k}": v for k, v in chosen.items() if isinstance(v, torch.Tensor)}
            if _COSMOS2_MARKER not in state:
                raise CheckpointError(
                    f"{source}: found 'net.' weights but no {_COSMOS2_MARKER!r}; not a Cosmos-Predict2 (2.0) DiT checkpoint"
                )
            return state
        for k in ("model", "state_dict", "ema", "module", "net"):
            if k in keys:
                candidates.append(obj[k])
    raise CheckpointError(f"{source}: no 'net.'-prefixed DiT weights found (looked at the top level and model/state_dict/ema)")


def convert_nvidia_network_state(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """NVIDIA ``net.*`` names -> diffusers ``CosmosTransformer3DModel`` names (diffusers' converter)."""
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    kept = {k: v for k, v in state.items() if not any(m in k for m in _NON_WEIGHT_MARKERS)}
    try:
        return convert_cosmos_transformer_checkpoint_to_diffusers(dict(kept))
    except (KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{source}: diffusers could not convert the DiT weights ({exc})") from exc


# ---- helpers ---------------------------------------------------------------------------
def _torch_load(path: Path, allow_pickle: bool) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: holds pickled objects besides tensors; pass allow_pickle=True only if you trust this file ({exc})"
            ) from exc
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({str(exc) or type(exc).__name__})") from exc


def _load_vae_into(vae: nn.Module, path: Path) -> None:
    """Fill the VAE from a diffusers-format ``AutoencoderKLWan`` directory (config.json + safetensors)."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not (path / "config.json").is_file() or not files:
        raise CheckpointError(
            f"{path}: expected a diffusers AutoencoderKLWan directory (config.json + *.safetensors), e.g. a local copy of "
            "Wan-AI/Wan2.1-T2V-1.3B-Diffusers/vae; a Wan 2.1 .pth converts to one with "
            "AutoencoderKLWan.from_single_file(path, config=<that directory>).save_pretrained(...)"
        )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_read_safetensors(f))
    _check_vae_config(vae, path / "config.json")
    _load_weights(vae, state, path)


def _check_vae_config(vae: nn.Module, config_path: Path) -> None:
    theirs = json.loads(config_path.read_text())
    for key in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample"):
        if key in theirs and list(_as_list(theirs[key])) != list(_as_list(vae.config[key])):
            raise CheckpointError(f"{config_path}: VAE {key} is {theirs[key]}, the model config expects {vae.config[key]}")
    for key in ("latents_mean", "latents_std"):
        if key in theirs and [float(x) for x in theirs[key]] != [float(x) for x in vae.config[key]]:
            raise CheckpointError(f"{config_path}: VAE {key} differs from the Wan 2.1 statistics the model normalizes with")


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupt ({exc})") from exc


def _load_weights(module: nn.Module, state: dict[str, torch.Tensor], source: Path | str, one_dtype: bool = False) -> None:
    """Strict load with a readable report of missing, unexpected, mis-shaped and mis-typed tensors.

    Dtypes: an integer or bool tensor where the model holds floats (or the reverse) would fail
    inside torch's ``load_state_dict`` with its own traceback. With ``one_dtype`` (our format,
    where a file is one module's state in one precision) a floating tensor whose dtype differs
    from the file's other floating tensors is refused too: it would load, and the module would
    then run in mixed precision and fail (or silently differ) at its first forward pass.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shared = [k for k in expected if k in state]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in shared if state[k].shape != expected[k].shape]
    floats = collections.Counter(state[k].dtype for k in shared if state[k].is_floating_point())
    common = floats.most_common(1)[0][0] if floats else None
    dtypes = []
    for k in shared:
        theirs, ours = state[k].dtype, expected[k].dtype
        if theirs.is_floating_point != ours.is_floating_point or (not ours.is_floating_point and theirs != ours):
            dtypes.append(f"{k}: file {theirs} vs model {ours}")
        elif one_dtype and ours.is_floating_point and theirs != common:
            dtypes.append(f"{k}: file {theirs} vs {common} (the file's other weights)")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if shapes:
        problems.append(f"{len(shapes)} with other shapes (e.g. {shapes[:3]})")
    if dtypes:
        problems.append(f"{len(dtypes)} with other dtypes (e.g. {dtypes[:3]})")
    if problems:
        raise CheckpointError(f"{source}: weights do not match the model config: " + "; ".join(problems))
    module.load_state_dict(state, strict=True, assign=True)


def _materialize(model: CosmosPolicyModel, device: torch.device | str, dtype: torch.dtype | None) -> CosmosPolicyModel:
    """Finish a model built on the meta device and filled by ``_load_weights``, then move it."""
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"tensors without values after loading: {leftover[:5]}")
    model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _load_stats(path: Path, layout: LatentLayout | None = None) -> NormalizationStats:
    """The statistics file; with ``layout``, its vectors must have the layout's action and proprio sizes (statistics of
    another robot would load, and then normalize every action and proprio state wrongly or fail at the first query)."""
    try:
        stats = NormalizationStats.load(path)
    except StatisticsError as exc:
        raise CheckpointError(str(exc)) from exc
    if layout is not None:
        sizes = [("actions", "action_dim", stats.action_dim, layout.action_dim)]
        sizes += [("proprio", "proprio_dim", stats.proprio_dim, layout.proprio_dim)] if layout.has_proprio else []
        for group, field_name, have, want in sizes:
            if have != want:
                raise CheckpointError(f"{path}: key '{group}_min': expected {want} values (the layout's {field_name}), got {have}")
    return stats


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_files(path: Path) -> None:
    for p in path.iterdir():
        with p.open("rb") as f:
            os.fsync(f.fileno())
