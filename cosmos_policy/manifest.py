"""A checkpoint's manifest: what a checkpoint directory holds, checked without loading it (no torch).

``load_checkpoint`` reads it before the weights; a job checks every checkpoint it names with it
before anything starts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cosmos_policy.errors import CheckpointError

FORMAT = "cosmos-policy-online/checkpoint"
FORMAT_VERSION = 1
DENOISER_FILE = "denoiser.safetensors"
VAE_FILE = "vae.safetensors"
STATS_FILE = "dataset_statistics.json"
TEXT_FILE = "t5_embeddings.pkl"
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    _check_fields(manifest_path, manifest)
    files = manifest["files"]
    for required in (DENOISER_FILE, VAE_FILE, "config.yaml"):
        if required not in files:
            raise CheckpointError(f"{manifest_path}: key 'files': lists no {required}")
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)} (listed in the manifest)")
    return manifest


def _check_fields(manifest_path: Path, manifest: Any) -> None:
    """The manifest's shape, each field by name: a damaged one would otherwise fail as an AttributeError
    or TypeError deep in the loader, and a file name like ``../x`` would be read from outside the checkpoint."""
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_path}: expected a JSON object (format, version, files, metadata), got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: key 'format': expected {FORMAT!r}, got {manifest.get('format')!r}")
    version = manifest.get("version")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: key 'version': expected {FORMAT_VERSION}, got {version!r}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{manifest_path}: key 'files': expected an object of file name -> SHA-256, got {files!r}")
    for name, digest in files.items():
        if not name or "/" in name or "\\" in name or name in (".", "..") or name == "manifest.json":
            raise CheckpointError(f"{manifest_path}: key 'files': expected names of files in the checkpoint directory, got {name!r}")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise CheckpointError(f"{manifest_path}: key 'files.{name}': expected a SHA-256 hex digest, got {digest!r}")
    if not isinstance(manifest.get("metadata", {}), dict):
        raise CheckpointError(f"{manifest_path}: key 'metadata': expected a JSON object, got {manifest['metadata']!r}")
