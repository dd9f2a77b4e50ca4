"""Packed weight versions: packing in place, the checksum readers verify, and unpacking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cosmos_policy.errors import CheckpointError
from cosmos_policy.weights import Packer, WeightVersion, checksum, nbytes, pack, unpack, verify


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"blocks.0.w": torch.randn(4, 6, generator=g), "blocks.0.b": torch.randn(6, generator=g),
            "pos": torch.arange(5, dtype=torch.int64), "t": torch.randn(3, 2, generator=g).t()}  # "t" is not contiguous


def test_packer_reuses_its_arrays_and_matches_a_fresh_pack():
    packer = Packer(torch.bfloat16)
    first = packer.pack(_state(0))
    addresses = {k: v[0].ctypes.data for k, v in first.items()}
    assert checksum(first) == checksum(pack(_state(0)))
    second = packer.pack(_state(1))
    assert all(second[k][0].ctypes.data == addresses[k] for k in second)  # the same memory, overwritten in place
    assert checksum(second) == checksum(pack(_state(1))) != checksum(pack(_state(0)))
    assert second["blocks.0.w"][1] == "torch.bfloat16" and second["pos"][1] == "torch.int64"  # integers keep their dtype
    back = unpack(second)
    for k, v in _state(1).items():
        expected = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert back[k].dtype == expected.dtype and torch.equal(back[k], expected), k
    assert nbytes(second) == sum(v.numel() * (2 if v.is_floating_point() else 8) for v in _state(1).values())


def test_unpack_without_copy_gives_views_of_read_only_arrays():
    packed = pack(_state(0))
    for arr, _, _ in packed.values():
        arr.setflags(write=False)  # as the object store hands them out
    views = unpack(packed, copy=False)
    assert views["blocks.0.w"].data_ptr() == packed["blocks.0.w"][0].ctypes.data
    model = torch.nn.Linear(6, 4)
    model.load_state_dict({"weight": views["blocks.0.w"], "bias": torch.zeros(4)})  # copies out of the view
    assert torch.equal(model.weight.data, _state(0)["blocks.0.w"].to(torch.bfloat16).float())


@pytest.mark.parametrize("corrupt", ["flip_bit", "swap_words", "rename", "reshape", "truncate"])
def test_the_checksum_catches_any_change(corrupt: str):
    packed = pack(_state(0))
    record = WeightVersion(version=3, step=30, checksum=checksum(packed), nbytes=nbytes(packed))
    verify(packed, record)
    arr, dtype, shape = packed["blocks.0.w"]
    arr = arr.copy()
    if corrupt == "flip_bit":
        arr.reshape(-1)[5] ^= 1
        packed["blocks.0.w"] = (arr, dtype, shape)
    elif corrupt == "swap_words":  # same words, same sum, other order
        flat = arr.reshape(-1)
        flat[[0, 1]] = flat[[1, 0]]
        assert flat[0] != flat[1]
        packed["blocks.0.w"] = (arr, dtype, shape)
    elif corrupt == "rename":
        packed["blocks.1.w"] = packed.pop("blocks.0.w")
    elif corrupt == "reshape":
        packed["blocks.0.w"] = (arr.reshape(6, 4), dtype, (6, 4))
    else:
        packed["blocks.0.w"] = (arr.reshape(-1)[:-1], dtype, shape)
    # A truncated array no longer fits its own shape: refused by name before it is hashed.
    expected = r"tensor 'blocks.0.w': shape \(4, 6\) needs 24 values, the array has 23" if corrupt == "truncate" else "checksum mismatch"
    with pytest.raises(CheckpointError, match=f"weights version 3: {expected}"):
        verify(packed, record)


def test_unsupported_dtypes_are_refused_by_name():
    with pytest.raises(CheckpointError, match="tensor 'flags' has unsupported dtype torch.bool"):
        pack({"flags": torch.zeros(3, dtype=torch.bool)})
    assert pack({"x": torch.ones(2)})["x"][0].dtype == np.int16  # bf16 travels as its 16-bit words
