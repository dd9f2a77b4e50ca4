"""Instruction embeddings: a cache filled offline, looked up at train and act time.

The network cross-attends to T5-11B encoder states (512 tokens x 1024, padding positions
zeroed; method 3.5). The official code precomputes one embedding per unique instruction into a
pickle ``{instruction: tensor (1, 512, 1024) bfloat16}`` (``t5_embeddings.pkl``); this module
reads and writes that format. The 11B encoder is only needed offline to fill the cache
(``T5TextEncoder``, through ``transformers``); tests and the quickstart use ``RandomTextEncoder``.

Pickle can run code on load, so the reader only accepts the few globals a pickled dict of torch
tensors needs, and re-loads tensor storages with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import torch

from cosmos_policy.atomic import atomic_write_bytes
from cosmos_policy.errors import CheckpointError, InputError, existing_file


class TextEncoder(Protocol):
    """Anything that turns instructions into (B, max_length, embed_dim) float tensors."""

    embed_dim: int
    max_length: int

    def encode(self, instructions: Sequence[str]) -> torch.Tensor: ...


def _load_storage(data: bytes) -> object:
    return torch.load(io.BytesIO(data), weights_only=True)


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _TensorDictUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a text-embedding pickle") from None


class TextEmbeddingCache:
    """instruction -> (max_length, embed_dim) embedding."""

    def __init__(self, embeddings: dict[str, torch.Tensor] | None = None) -> None:
        self._emb: dict[str, torch.Tensor] = {}
        for text, emb in (embeddings or {}).items():
            self.add(text, emb)

    def __len__(self) -> int:
        return len(self._emb)

    def __contains__(self, text: object) -> bool:
        return text in self._emb

    def instructions(self) -> list[str]:
        return list(self._emb)

    @property
    def shape(self) -> tuple[int, int] | None:
        """(max_length, embed_dim) shared by every entry, or None when empty."""
        first = next(iter(self._emb.values()), None)
        return None if first is None else tuple(first.shape)  # type: ignore[return-value]

    def add(self, text: str, embedding: torch.Tensor) -> None:
        if not isinstance(text, str):
            raise InputError(f"text embedding key: expected an instruction string, got {type(text).__name__}")
        if not isinstance(embedding, torch.Tensor):
            raise InputError(f"text embedding for {text!r}: expected a tensor, got {type(embedding).__name__}")
        emb = embedding.detach().cpu()
        if emb.ndim == 3 and emb.shape[0] == 1:
            emb = emb[0]
        if emb.ndim != 2:
            raise InputError(f"text embedding for {text!r}: expected (length, dim) or (1, length, dim), got {tuple(embedding.shape)}")
        if not torch.isfinite(emb.float()).all():
            raise InputError(f"text embedding for {text!r}: non-finite values")
        if self.shape is not None and tuple(emb.shape) != self.shape:
            raise InputError(f"text embedding for {text!r}: shape {tuple(emb.shape)} differs from the cache's {self.shape}")
        self._emb[text] = emb

    def lookup(self, instructions: Sequence[str], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, length, dim) embeddings for a batch of instructions; unknown ones are an error."""
        missing = [t for t in dict.fromkeys(instructions) if t not in self._emb]
        if missing:
            raise InputError(
                f"instructions not in the text-embedding cache: {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                "fill the cache offline with fill_cache(T5TextEncoder(...), instructions)"
            )
        return torch.stack([self._emb[t] for t in instructions]).to(device=device, dtype=dtype)

    def fill(self, encoder: TextEncoder, instructions: Iterable[str], batch_size: int = 8) -> int:
        """Encode instructions not yet cached; returns how many were added."""
        todo = [t for t in dict.fromkeys(instructions) if t not in self._emb]
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            for text, emb in zip(chunk, encoder.encode(chunk)):
                self.add(text, emb)
        return len(todo)

    # ---- the official pickle format ----------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write ``{instruction: (1, length, dim) bfloat16 tensor}`` as the official code does."""
        data = {t: e.unsqueeze(0).to(torch.bfloat16).contiguous() for t, e in self._emb.items()}
        atomic_write_bytes(Path(path), pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))

    @classmethod
    def load(cls, path: str | Path) -> "TextEmbeddingCache":
        path = existing_file(path, "text-embedding pickle", CheckpointError)
        try:
            with path.open("rb") as f:
                data = _TensorDictUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path}: not a readable text-embedding pickle ({exc})") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a dict of instruction -> tensor, got {type(data).__name__}")
        try:
            return cls(data)
        except InputError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc


class RandomTextEncoder:
    """A tiny stand-in encoder for tests and the quickstart: a fixed random embedding per text.

    The embedding is seeded by the instruction's SHA-256, so it is stable across processes and
    machines; different instructions get different (unrelated) embeddings. It carries no
    language meaning: use ``T5TextEncoder`` for real models.
    """

    def __init__(self, embed_dim: int, max_length: int, scale: float = 0.2) -> None:
        self.embed_dim = embed_dim
        self.max_length = max_length
        self.scale = scale

    def encode(self, instructions: Sequence[str]) -> torch.Tensor:
        rows = []
        for text in instructions:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            g = torch.Generator().manual_seed(seed)
            rows.append(self.scale * torch.randn(self.max_length, self.embed_dim, generator=g))
        return torch.stack(rows)


class T5TextEncoder:
    """The T5 encoder used by Cosmos-Predict2, loaded from a local directory (no network).

    The directory holds a ``transformers`` T5 encoder (``config.json`` + weights) and its
    tokenizer, e.g. a local copy of ``google-t5/t5-11b``. Embeddings are the encoder's last hidden
    states at ``max_length`` tokens with positions past each instruction's length zeroed.
    """

    def __init__(self, path: str | Path, max_length: int = 512, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoTokenizer, T5EncoderModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no T5 encoder here (config.json missing)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = T5EncoderModel.from_pretrained(str(path), local_files_only=True, dtype=dtype).to(device).eval()
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot load the T5 encoder or its tokenizer ({exc})") from exc
        self.device = device
        self.max_length = max_length
        self.embed_dim = int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, instructions: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(instructions), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return (states * mask.unsqueeze(-1)).cpu()
