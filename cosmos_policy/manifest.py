"""A checkpoint's manifest: what a checkpoint directory holds, checked without loading it (no torch).

``load_checkpoint`` reads it before the weights; a job checks every checkpoint it names with it
before anything starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cosmos_policy.errors import CheckpointError

FORMAT = "cosmos-policy-online/checkpoint"
FORMAT_VERSION = 1
DENOISER_FILE = "denoiser.safetensors"
VAE_FILE = "vae.safetensors"
STATS_FILE = "dataset_statistics.json"
TEXT_FILE = "t5_embeddings.pkl"


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the checkpoint directory ``path``; ``CheckpointError`` naming what is missing or wrong."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing (not a checkpoint written by save_checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: format {manifest.get('format')!r} v{manifest.get('version')} is not {FORMAT!r} v{FORMAT_VERSION}")
    files = manifest.setdefault("files", {})
    for required in (DENOISER_FILE, VAE_FILE, "config.yaml"):
        if required not in files:
            raise CheckpointError(f"{manifest_path}: lists no {required}")
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)} (listed in the manifest)")
    return manifest
