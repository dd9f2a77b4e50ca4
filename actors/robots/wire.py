"""The robot gateway's payloads: msgpack with numpy arrays, never pickle (numpy + msgpack only).

A robot host runs a thin client and may run another numpy or Python than the job, and a payload
comes from the network: so nothing that can run code on decode (pickle, as LeRobot's async
inference sends) and nothing whose meaning depends on the sender's library versions. What travels:
None, bool, int (64-bit), float, str, bytes, lists and str-keyed maps of those, and numpy arrays of
bool, integer or float dtypes as ``{"__nd__": True, "data": bytes, "dtype": "<f4", "shape": [...]}``
(little-endian, C order: openpi's layout). Object, structured, string and datetime dtypes are
refused on both ends.

Every error is a ``WireError`` (a ``ValueError``) that names the field path, e.g.
``observation.images.primary: expected uint8 (32, 32, 3), got float64 (2, 2)``; an oversize
message is the subclass ``WireTooLarge``, refused before any byte is decoded. The ``expect_*``
helpers check a decoded message against what the receiver needs, in the same words.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import msgpack
import numpy as np

PROTOCOL = 1  # bumped when a message's shape changes incompatibly; hello refuses another
SERVICE = "cosmos_policy.robots.Gateway"  # gRPC service name; methods are /SERVICE/<name>
METHODS = ("hello", "act", "plan", "put_episode", "heartbeat")  # all unary-unary, bodies are this module's bytes
AUTH_HEADER, ROBOT_HEADER = "authorization", "x-robot-id"  # per-call metadata: "Bearer <token>", the robot id
ND = "__nd__"  # the marker key of an encoded array; refused as a key of user maps
MAX_DEPTH = 32  # maps and lists nested deeper are refused (a message is a few levels deep)
MAX_NDIM = 8
DEFAULT_MAX_BYTES = 16 * 1024 * 1024

# Every dtype that may travel, in its little-endian wire spelling.
DTYPES = {np.dtype(t).newbyteorder("<").str: np.dtype(t).newbyteorder("<")
          for t in (np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64,
                    np.float16, np.float32, np.float64)}

_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1


class WireError(ValueError):
    """A payload that cannot be encoded, decoded, or is not what the receiver expects (names the field)."""


class WireTooLarge(WireError):
    """A payload over the size limit: refused before decoding (the gateway answers RESOURCE_EXHAUSTED)."""


def method_path(name: str) -> str:
    return f"/{SERVICE}/{name}"


# ---- encode --------------------------------------------------------------------------------------
def encode(obj: Any, max_bytes: int | None = None, path: str = "") -> bytes:
    """``obj`` as msgpack bytes; ``WireTooLarge`` when the result exceeds ``max_bytes``."""
    try:
        data = msgpack.packb(_to_wire(obj, path, 0), use_bin_type=True)
    except WireError:
        raise
    except (ValueError, TypeError, OverflowError) as exc:  # msgpack's own refusals (e.g. a >4 GiB bin)
        raise WireError(f"{_name(path)}: cannot encode ({exc})") from exc
    if max_bytes is not None and len(data) > max_bytes:
        raise WireTooLarge(f"{_name(path)}: {len(data)} bytes exceeds the limit of {max_bytes}")
    return data


def _to_wire(obj: Any, path: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise WireError(f"{_name(path)}: nested deeper than {MAX_DEPTH} levels")
    if obj is None or isinstance(obj, (bool, str, bytes)):
        return obj
    if isinstance(obj, int):
        if not _INT_MIN <= obj <= _UINT_MAX:
            raise WireError(f"{_name(path)}: integer {obj} does not fit 64 bits")
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, np.ndarray):
        return _array_to_wire(obj, path)
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in "biuf":
            raise WireError(f"{_name(path)}: numpy scalar of dtype {obj.dtype} cannot travel (only bool, integer and float)")
        return obj.item()
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise WireError(f"{_name(path)}: map keys must be str, got {type(key).__name__} {key!r}")
            if key == ND:
                raise WireError(f"{_name(path)}: the key {ND!r} is reserved for arrays")
            out[key] = _to_wire(value, _join(path, key), depth + 1)
        return out
    if isinstance(obj, (list, tuple)):
        return [_to_wire(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(obj)]
    raise WireError(f"{_name(path)}: {type(obj).__name__} cannot travel (only None, bool, int, float, str, bytes, lists, "
                    f"str-keyed maps and numpy arrays)")


def _array_to_wire(arr: np.ndarray, path: str) -> dict[str, Any]:
    if arr.dtype.fields is not None or arr.dtype.kind not in "biuf":
        raise WireError(f"{_name(path)}: arrays of dtype {arr.dtype} cannot travel (only bool, integer and float; no object or "
                        f"structured dtypes)")
    if arr.ndim > MAX_NDIM:
        raise WireError(f"{_name(path)}: {arr.ndim} dimensions, at most {MAX_NDIM}")
    little = arr.dtype.newbyteorder("<")
    data = np.ascontiguousarray(arr, dtype=little).tobytes()
    return {ND: True, "data": data, "dtype": little.str, "shape": list(arr.shape)}


# ---- decode --------------------------------------------------------------------------------------
def decode(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES, path: str = "") -> Any:
    """msgpack bytes -> Python values with numpy arrays (writable copies); anything malformed is a ``WireError``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"{_name(path)}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise WireTooLarge(f"{_name(path)}: {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        raw = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True, timestamp=0, ext_hook=_refuse_ext)
    except WireError as exc:  # from _refuse_ext
        raise WireError(f"{_name(path)}: {exc}") from None
    except msgpack.StackError:
        raise WireError(f"{_name(path)}: nested deeper than msgpack's limit") from None
    except Exception as exc:  # msgpack raises ValueError subclasses, TypeError, UnicodeDecodeError...: all malformed input
        raise WireError(f"{_name(path)}: not a valid msgpack message ({type(exc).__name__}: {exc})") from exc
    return _from_wire(raw, path, 0)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack extension type {code} cannot travel")


def _from_wire(obj: Any, path: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise WireError(f"{_name(path)}: nested deeper than {MAX_DEPTH} levels")
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, dict):
        if ND in obj:
            return _array_from_wire(obj, path)
        for key in obj:
            if not isinstance(key, str):  # strict_map_key also admits bytes keys
                raise WireError(f"{_name(path)}: map keys must be str, got {type(key).__name__}")
        return {k: _from_wire(v, _join(path, k), depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_wire(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(obj)]
    raise WireError(f"{_name(path)}: {type(obj).__name__} cannot travel")


def _array_from_wire(obj: dict, path: str) -> np.ndarray:
    if obj.get(ND) is not True or set(obj) != {ND, "data", "dtype", "shape"}:
        raise WireError(f"{_name(path)}: an array is a map of exactly __nd__=True, data, dtype, shape; "
                        f"got keys {sorted(map(str, obj))}")
    data, dtype, shape = obj["data"], obj["dtype"], obj["shape"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise WireError(f"{_name(path)}: dtype {dtype!r} cannot travel (one of {sorted(DTYPES)})")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise WireError(f"{_name(path)}: shape must be a list of at most {MAX_NDIM} non-negative ints, got {shape!r}")
    if not isinstance(data, bytes):
        raise WireError(f"{_name(path)}: data must be bytes, got {type(data).__name__}")
    dt = DTYPES[dtype]
    expected = dt.itemsize * math.prod(shape)  # Python ints: no overflow on a hostile shape
    if len(data) != expected:
        raise WireError(f"{_name(path)}: {len(data)} data bytes, expected {expected} for {dt.name} {tuple(shape)}")
    # A writable copy in native byte order: torch warns on read-only arrays, and callers may modify theirs.
    try:
        return np.frombuffer(data, dtype=dt).astype(dt.newbyteorder("="), copy=True).reshape(shape)
    except ValueError as exc:  # an empty array of absurd dimensions
        raise WireError(f"{_name(path)}: cannot make a {dt.name} array of shape {tuple(shape)} ({exc})") from exc


# ---- what a receiver expects ----------------------------------------------------------------------
def field(msg: Any, key: str, path: str, default: Any = ...) -> Any:
    """``msg[key]`` of a decoded map at ``path``; a missing key is an error unless a default is given."""
    if not isinstance(msg, dict):
        raise WireError(f"{_name(path)}: expected a map, got {describe(msg)}")
    if key not in msg:
        if default is ...:
            raise WireError(f"{_join(path, key)}: missing")
        return default
    return msg[key]


def expect_str(value: Any, path: str, non_empty: bool = False) -> str:
    if not isinstance(value, str) or (non_empty and not value):
        raise WireError(f"{_name(path)}: expected a{' non-empty' if non_empty else ''} str, got {describe(value)}")
    return value


def expect_int(value: Any, path: str, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"{_name(path)}: expected an int{' or None' if optional else ''}, got {describe(value)}")
    return value


def expect_float(value: Any, path: str, finite: bool = True, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise WireError(f"{_name(path)}: expected a number{' or None' if optional else ''}, got {describe(value)}")
    if finite and not math.isfinite(value):
        raise WireError(f"{_name(path)}: expected a finite number, got {value}")
    return float(value)


def expect_bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise WireError(f"{_name(path)}: expected a bool, got {describe(value)}")
    return value


def expect_map(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WireError(f"{_name(path)}: expected a map, got {describe(value)}")
    return value


def expect_array(value: Any, path: str, dtype: str | Sequence[str], shape: Sequence[int | str],
                 finite: bool = False) -> np.ndarray:
    """An array of ``dtype`` (a numpy name, or several accepted) and ``shape`` (ints, or names for free sizes: "n").

    The error says what was expected and what came: ``expected uint8 (32, 32, 3), got float64 (2, 2)``.
    """
    names = (dtype,) if isinstance(dtype, str) else tuple(dtype)
    want = f"{'/'.join(names)} ({', '.join(str(n) for n in shape)}{',' if len(shape) == 1 else ''})"
    if not isinstance(value, np.ndarray):
        raise WireError(f"{_name(path)}: expected {want}, got {describe(value)}")
    ok = value.dtype.name in names and value.ndim == len(shape) and all(
        isinstance(w, str) or w == n for w, n in zip(shape, value.shape))
    if not ok:
        raise WireError(f"{_name(path)}: expected {want}, got {describe(value)}")
    if finite and value.dtype.kind == "f" and not np.all(np.isfinite(value)):
        bad = np.argwhere(~np.isfinite(value))[0].tolist()
        raise WireError(f"{_name(path)}: expected finite values, got {value[tuple(bad)]} at index {bad}")
    return value


def describe(value: Any) -> str:
    """How an error names what came: ``float64 (2, 2)``, ``str 'abc'``, ``bytes of length 900``, ``NoneType``."""
    if isinstance(value, np.ndarray):
        return f"{value.dtype.name} {tuple(value.shape)}"
    if isinstance(value, (str, bytes, list, dict)) and len(value) > 40:
        return f"{type(value).__name__} of length {len(value)}"
    if isinstance(value, (bool, int, float, str)):
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__


def _join(path: str, key: str) -> str:
    """``observation.images`` + ``primary``; at the root a key is its own path."""
    return f"{path}.{key}" if path else key


def _name(path: str) -> str:
    return path or "message"
