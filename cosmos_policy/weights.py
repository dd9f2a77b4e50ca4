"""Packed weights: how a version of the network crosses from the learner to the actors (``WeightVersion`` is in contracts).

A published version is the denoiser's state dict packed as plain numpy arrays (bf16 as its raw
16-bit words, since numpy has no bf16), so the Ray object store hands readers zero-copy views
instead of unpickling tensors; plus a ``WeightVersion`` record with a checksum the reader
verifies before loading. The checksum is XXH3-128 over every tensor's name, dtype, shape and
bytes: a real hash (any flipped, swapped or truncated word changes it) that runs at memory
speed (about 10 GB/s per core here, so 0.2 s for the 2B model's 3.9 GB in bf16 on two cores).

Everything that crosses is checked before it is used, and refused whole with a ``CheckpointError``
that names the tensor and what was expected: ``verify`` checks the payload's structure and size
against the record before hashing it, ``unpack`` checks each entry against its own dtype and
shape, and ``check_state`` checks unpacked tensors against the network they are loaded into
(names, shapes, dtypes, finite values) before a single one is copied, so a refused version leaves
the model serving the one it had.

``Packer`` keeps the packed arrays between publications and overwrites them in place (the cast
to bf16 happens in the same pass as the copy): allocating 3.9 GB of fresh memory for every
version costs page faults that, on a virtual machine, run far slower than the copy itself.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import xxhash

from cosmos_policy.contracts import WeightVersion
from cosmos_policy.errors import CheckpointError

_VIEW = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float32: np.float32, torch.int64: np.int64}
Packed = dict[str, tuple[np.ndarray, str, tuple[int, ...]]]
# The numpy dtypes a packed array of each torch dtype may arrive as (bf16 travels as its 16-bit words: ``Packer``
# writes int16, a view of uint16 is the same words).
_ARRIVES_AS = {"torch.bfloat16": (np.dtype(np.int16), np.dtype(np.uint16)), "torch.float16": (np.dtype(np.float16),),
               "torch.float32": (np.dtype(np.float32),), "torch.int64": (np.dtype(np.int64),)}


def pack(state: dict[str, torch.Tensor], dtype: torch.dtype | None = torch.bfloat16) -> Packed:
    """Tensors -> (numpy array, torch dtype name, shape); floating tensors cast to ``dtype`` (fresh arrays)."""
    return Packer(dtype).pack(state)


class Packer:
    """``pack`` into arrays kept from the previous call (same names, shapes and dtypes), written in place.

    The arrays returned are overwritten by the next ``pack``: hand them to something that copies
    them (``ray.put`` copies into the object store) before packing again.
    """

    def __init__(self, dtype: torch.dtype | None = torch.bfloat16) -> None:
        self.dtype = dtype
        self._buffers: dict[str, torch.Tensor] = {}

    def pack(self, state: dict[str, torch.Tensor]) -> Packed:
        out: Packed = {}
        for name, t in state.items():
            t = t.detach()
            target = self.dtype if (self.dtype is not None and t.is_floating_point()) else t.dtype
            if target not in _VIEW:
                raise CheckpointError(f"pack: tensor {name!r} has unsupported dtype {t.dtype}")
            buf = self._buffers.get(name)
            if buf is None or buf.shape != t.shape or buf.dtype != target:
                buf = self._buffers[name] = torch.empty(t.shape, dtype=target)
            buf.copy_(t)  # cast and copy (from any device) in one pass
            arr = buf.view(_to_view_dtype(target)).numpy() if target == torch.bfloat16 else buf.numpy()
            out[name] = (arr, str(target), tuple(t.shape))
        for name in set(self._buffers) - set(state):
            del self._buffers[name]
        return out


def _to_view_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.int16 if dtype == torch.bfloat16 else dtype


def check_packed(packed: Any, where: str = "weights") -> None:
    """Raise ``CheckpointError`` naming the entry unless ``packed`` is a dict of (array, dtype name, shape) as ``pack``
    writes them, each array of its dtype's numpy type and of its shape's size.

    Metadata only (no pass over the bytes): ``verify`` and ``unpack`` call it first, so a malformed payload is
    refused by name instead of surfacing as a numpy or torch error from deep inside them.
    """
    if not isinstance(packed, Mapping):
        raise CheckpointError(f"{where}: expected a dict of packed tensors (name -> (array, dtype, shape)), got {type(packed).__name__}")
    for name, entry in packed.items():
        at = f"{where}: tensor {name!r}"
        if not isinstance(name, str):
            raise CheckpointError(f"{where}: tensor names must be strings, got {type(name).__name__} {name!r}")
        if not isinstance(entry, (tuple, list)) or len(entry) != 3:
            got = f"a {type(entry).__name__} of {len(entry)}" if isinstance(entry, (tuple, list)) else type(entry).__name__
            raise CheckpointError(f"{at}: expected (array, dtype name, shape), got {got}")
        arr, dtype_name, shape = entry
        if not isinstance(arr, np.ndarray):
            raise CheckpointError(f"{at}: expected a numpy array, got {type(arr).__name__}")
        if dtype_name not in _ARRIVES_AS:
            raise CheckpointError(f"{at}: dtype: expected one of {sorted(_ARRIVES_AS)}, got {dtype_name!r}")
        if arr.dtype not in _ARRIVES_AS[dtype_name]:
            raise CheckpointError(f"{at}: a {dtype_name} tensor travels as {_ARRIVES_AS[dtype_name][0]}, got a {arr.dtype} array")
        if not isinstance(shape, (tuple, list)) or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CheckpointError(f"{at}: shape: expected a tuple of sizes >= 0, got {shape!r}")
        if math.prod(shape) != arr.size:
            raise CheckpointError(f"{at}: shape {tuple(shape)} needs {math.prod(shape)} values, the array has {arr.size}")


def unpack(packed: Packed, copy: bool = True) -> dict[str, torch.Tensor]:
    """Back to tensors: copies (writable, independent of the object store), or with ``copy=False``
    read-only views of the packed arrays, for a caller that only copies them on (``load_state_dict``).

    A malformed entry is refused by name (``check_packed``)."""
    check_packed(packed)
    out = {}
    for name, (arr, dtype_name, shape) in packed.items():
        dtype = getattr(torch, dtype_name.replace("torch.", ""))
        if copy:
            t = torch.from_numpy(np.array(arr, copy=True))
        else:
            with warnings.catch_warnings():  # object-store arrays are read-only; the views are never written
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                t = torch.from_numpy(arr)
        out[name] = (t.view(dtype) if dtype == torch.bfloat16 else t).reshape(tuple(shape))
    return out


def checksum(packed: Packed, threads: int | None = None) -> str:
    """XXH3-128 of the per-tensor XXH3-128 digests (each over name, dtype, shape and bytes), in name order.

    Tensors are hashed on ``threads`` threads (default: one per core); xxhash releases the GIL, so
    the 2B model's 3.9 GB takes about 0.2 s on two cores.
    """
    check_packed(packed)  # the publisher's side too: a malformed payload is refused by name before it is hashed
    names = sorted(packed)

    def one(name: str) -> bytes:
        arr, dtype_name, shape = packed[name]
        flat = np.ascontiguousarray(arr).reshape(-1)
        h = xxhash.xxh3_128(f"{name}|{dtype_name}|{shape}|{flat.nbytes}|".encode())
        h.update(flat.view(np.uint8))
        return h.digest()

    workers = threads or os.cpu_count() or 1
    if workers == 1 or len(names) < 2:
        digests = [one(n) for n in names]
    else:
        with ThreadPoolExecutor(workers) as pool:
            digests = list(pool.map(one, names))
    return xxhash.xxh3_128(b"".join(digests)).hexdigest()


def nbytes(packed: Packed) -> int:
    return sum(arr.nbytes for arr, _, _ in packed.values())


def verify(packed: Packed, version: WeightVersion, threads: int | None = None) -> None:
    """Raise ``CheckpointError`` unless ``packed`` is exactly what ``version`` describes.

    The structure (``check_packed``) and the size (the record's ``nbytes``) are checked before the checksum: a
    truncated or malformed payload is refused by what is wrong with it, not as a bare mismatch of hashes.
    """
    where = f"weights version {version.version}"
    check_packed(packed, where)
    size = nbytes(packed)
    if size != version.nbytes:
        raise CheckpointError(f"{where}: nbytes: expected {version.nbytes} (the record's), the payload has {size}; not loading them")
    got = checksum(packed, threads)
    if got != version.checksum:
        raise CheckpointError(f"weights version {version.version}: checksum mismatch ({got[:12]} != {version.checksum[:12]}); not loading them")


def version_number(version: Any, where: str) -> int:
    """``version`` as an int, or ``CheckpointError``: a weight version is a whole number >= 0 (``int()`` would take
    3.7 as 3 or "7" as 7, and a reply would then name a version that never existed)."""
    if isinstance(version, bool) or not isinstance(version, numbers.Integral) or version < 0:
        raise CheckpointError(f"{where}: version: expected an int >= 0, got {type(version).__name__} {version!r}")
    return int(version)


def check_state(state: Any, expected: Mapping[str, torch.Tensor], where: str, finite: bool = True) -> None:
    """Raise ``CheckpointError`` unless ``state`` can replace ``expected`` (a network's state dict) whole.

    The same names, each a tensor of the expected shape; floating-point where the network's is (any width: bf16
    versions load into float32 networks), the network's own dtype elsewhere; and with ``finite``, no NaN or inf
    (counted on the device of the tensor it replaces: on a GPU this costs a copy at transfer speed, where a CPU pass
    over a 2B model's weights would take seconds). ``load_state_dict`` copies every tensor that fits before it
    reports one that does not, and a NaN weight makes every later query fail: checking all of it first is what lets
    a refused version leave the model serving its previous one.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where}: expected a dict of tensors (name -> tensor), got {type(state).__name__}")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {len(missing)} tensors (e.g. {missing[:3]})"] if missing else []) + (
            [f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"] if unexpected else [])
        raise CheckpointError(f"{where}: the tensors do not match the network's {len(expected)}: " + "; ".join(parts))
    for name, want in expected.items():
        got = state[name]
        at = f"{where}: tensor {name!r}"
        if not isinstance(got, torch.Tensor):
            raise CheckpointError(f"{at}: expected a tensor, got {type(got).__name__}")
        if got.shape != want.shape:
            raise CheckpointError(f"{at}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
        if want.is_floating_point() != got.is_floating_point() or (not want.is_floating_point() and got.dtype != want.dtype):
            kind = "a floating-point dtype" if want.is_floating_point() else str(want.dtype)
            raise CheckpointError(f"{at}: expected {kind} (the network's is {want.dtype}), got {got.dtype}")
    if not finite:
        return
    floating = [name for name, want in expected.items() if want.is_floating_point()]
    if not floating:
        return
    flags = torch.stack([torch.isfinite(state[n].to(expected[n].device, non_blocking=True)).all().cpu() for n in floating])
    bad = [n for n, ok in zip(floating, flags.tolist()) if not ok]
    if bad:
        t = state[bad[0]]
        count = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{where}: tensor {bad[0]!r}: expected finite values, got {count} NaN or inf "
                              f"({len(bad)} tensors have some); not loading them")
