"""The robot gateway's payloads: msgpack with numpy arrays, never pickle; every error a WireError naming the field."""

from __future__ import annotations

import math
import pickle

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from actors.robots import wire
from actors.robots.wire import WireError, WireTooLarge

DTYPES = [np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32, np.int64, np.uint64, np.float16, np.float32, np.float64]

arrays = st.sampled_from(DTYPES).flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20)
keys = st.text(min_size=1, max_size=10).filter(lambda k: k != wire.ND)
values = st.recursive(scalars | arrays, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=12)
messages = st.dictionaries(keys, values, max_size=5)


def same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_round_trip_of_nested_maps_of_arrays_and_scalars(msg):
    out = wire.decode(wire.encode(msg))
    assert same(msg, out)


def test_arrays_travel_as_openpi_does_little_endian_and_come_back_writable():
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
    raw = msgpack.unpackb(wire.encode({"a": big_endian}), raw=False)
    assert raw["a"] == {"__nd__": True, "data": np.arange(6, dtype="<i4").tobytes(), "dtype": "<i4", "shape": [2, 3]}
    out = wire.decode(wire.encode({"a": big_endian, "nan": np.array([np.nan, np.inf], np.float32), "s": np.float32(2.5)}))
    assert out["a"].flags.writeable and np.array_equal(out["a"], big_endian)
    assert np.isnan(out["nan"][0]) and out["nan"][1] == np.inf  # transport only: finiteness is the receiver's check
    assert out["s"] == 2.5 and isinstance(out["s"], float)
    assert wire.decode(wire.encode({"t": (1, 2)})) == {"t": [1, 2]}  # tuples travel as lists


@pytest.mark.parametrize("value, expected", [
    (np.array([object()], dtype=object), "obs.x: arrays of dtype object cannot travel"),
    (np.zeros(2, dtype=[("a", "<i4")]), r"obs.x: arrays of dtype \[\('a', '<i4'\)\] cannot travel"),
    (np.array(["text"]), "obs.x: arrays of dtype <U4 cannot travel"),
    (np.array(["2026-01-01"], dtype="datetime64[D]"), "obs.x: arrays of dtype datetime64"),
    (np.array([1 + 2j]), "obs.x: arrays of dtype complex128 cannot travel"),
    (object(), "obs.x: object cannot travel"),
    ({1: 2}, "obs.x: map keys must be str, got int"),
    ({"__nd__": 1}, "obs.x: the key '__nd__' is reserved"),
    (2**64, "obs.x: integer 18446744073709551616 does not fit 64 bits"),
    ({1.5}, "obs.x: set cannot travel"),
])
def test_encode_refuses_what_cannot_travel_naming_the_field(value, expected):
    with pytest.raises(WireError, match=expected):
        wire.encode({"x": value}, path="obs")


def nd(data: bytes, dtype: str, shape: list) -> bytes:
    return msgpack.packb({"obs": {"img": {"__nd__": True, "data": data, "dtype": dtype, "shape": shape}}}, use_bin_type=True)


MALFORMED = [
    (b"\x93\x01", "message: not a valid msgpack message"),
    (b"", "message: not a valid msgpack message"),
    (nd(b"\x00" * 3, "<f4", [1]), r"obs.img: 3 data bytes, expected 4 for float32 \(1,\)"),
    (nd(b"\x00" * 12, "<f4", [2, 2]), r"obs.img: 12 data bytes, expected 16 for float32 \(2, 2\)"),
    (nd(b"\x00" * 8, "|O", [1]), "obs.img: dtype '|O' cannot travel"),
    (nd(b"\x00" * 8, "V8", [1]), "obs.img: dtype 'V8' cannot travel"),
    (nd(b"\x00" * 8, ">f8", [1]), "obs.img: dtype '>f8' cannot travel"),  # the wire is little-endian only
    (nd(b"", "<f4", [-1]), "obs.img: shape must be a list"),
    (nd(b"", "<f4", [0, 2**62, 2**62]), "obs.img: cannot make a float32 array"),
    (nd(b"", "<f4", [1] * 9), "obs.img: shape must be a list of at most 8"),
    (msgpack.packb({"obs": {"__nd__": True, "data": b"", "dtype": "<f4", "shape": [0], "extra": 1}}), "obs: an array is a map of exactly"),
    (msgpack.packb({"obs": {b"k": 1}}, use_bin_type=True), "obs: map keys must be str, got bytes"),
    (msgpack.packb({1: 2}), "not a valid msgpack message"),
    (msgpack.packb(msgpack.ExtType(5, b"x")), "message: msgpack extension type 5 cannot travel"),
    (b"\x91" * 100_000, "nested deeper"),
    (msgpack.packb({"a": "x"}) + b"\x01", "not a valid msgpack message"),  # trailing bytes
    (b"\xa3\xff\xfe\xfd", "not a valid msgpack message"),  # a str that is not UTF-8
]


@pytest.mark.parametrize("payload, expected", MALFORMED, ids=[f"{i}-{e[:30]}" for i, (_, e) in enumerate(MALFORMED)])
def test_decode_refuses_malformed_payloads_naming_the_field(payload, expected):
    with pytest.raises(WireError, match=expected):
        wire.decode(payload)


def test_pickle_never_runs():
    class Boom:
        def __reduce__(self):
            return (print, ("pickle ran",))

    with pytest.raises(WireError, match="not a valid msgpack message|cannot travel"):
        wire.decode(pickle.dumps(Boom()))
    with pytest.raises(WireError):
        wire.encode({"x": Boom()})


def test_size_limits_are_checked_before_decoding():
    data = wire.encode({"img": np.zeros(1000, np.uint8)})
    with pytest.raises(WireTooLarge, match=f"message: {len(data)} bytes exceeds the limit of 100"):
        wire.decode(data, max_bytes=100)
    with pytest.raises(WireTooLarge, match="exceeds the limit of 100"):
        wire.encode({"img": np.zeros(1000, np.uint8)}, max_bytes=100)
    assert issubclass(WireTooLarge, WireError) and issubclass(WireError, ValueError)


def test_expect_helpers_say_what_was_expected_and_what_came():
    with pytest.raises(WireError, match=r"observation.images.primary: expected uint8 \(32, 32, 3\), got float64 \(2, 2\)"):
        wire.expect_array(np.zeros((2, 2)), "observation.images.primary", "uint8", (32, 32, 3))
    with pytest.raises(WireError, match=r"observation.proprio: expected finite values, got nan at index \[1\]"):
        wire.expect_array(np.array([0.0, np.nan]), "observation.proprio", ("float32", "float64"), (2,), finite=True)
    with pytest.raises(WireError, match=r"proprio: expected float32/float64 \(n, 9\), got str 'x'"):
        wire.expect_array("x", "proprio", ("float32", "float64"), ("n", 9))
    assert wire.expect_array(np.zeros((5, 9)), "proprio", "float64", ("n", 9)).shape == (5, 9)
    with pytest.raises(WireError, match="observation.instruction: expected a non-empty str, got int 3"):
        wire.expect_str(3, "observation.instruction", non_empty=True)
    with pytest.raises(WireError, match="seed: expected an int or None, got bool"):
        wire.expect_int(True, "seed", optional=True)
    with pytest.raises(WireError, match="score: expected a finite number, got inf"):
        wire.expect_float(math.inf, "score")
    with pytest.raises(WireError, match="observation.images: missing"):
        wire.field({"observation": {}}["observation"], "images", "observation")


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_wire_errors(data):
    try:
        wire.decode(data)
    except WireError:
        pass


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages, st.data())
def test_mutated_payloads_raise_only_wire_errors(msg, data):
    """Valid messages with bytes flipped, cut or inserted: a decoded value or a WireError, never anything else."""
    raw = bytearray(wire.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del raw[pos:]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        wire.decode(bytes(raw))
    except WireError:
        pass
