"""The errors this package raises on bad input.

Each is a ``ValueError`` so callers that only care about "the input was wrong" can catch that,
while tests and services can tell a bad config from a bad checkpoint. Messages always name the
field (or file) and what was expected.
"""

from __future__ import annotations

from pathlib import Path


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""


class InputError(ValueError):
    """A tensor handed to the model has the wrong shape, dtype or non-finite values."""


class StatisticsError(ValueError):
    """Normalization statistics are missing, non-finite or degenerate."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match the model it is loaded into."""


class StorageFull(OSError):
    """The disk filled up while the program wrote (``disk_full`` finds it under whatever wrapped it)."""


NO_SPACE = ("No space left on device", "os error 28", "Disk quota exceeded")


def disk_full(exc: BaseException) -> BaseException | None:
    """The error in ``exc``'s chain that says the disk is full (ENOSPC or EDQUOT, however wrapped: a Ray task's
    error keeps it as ``cause``; torch and safetensors report it in their message), or None."""
    import errno

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or any(m in str(e) for m in NO_SPACE):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def existing_file(path: str | Path, what: str, error: type[ValueError]) -> Path:
    """``path``, or ``error`` saying that no ``what`` is there (a missing file is bad input, named as such)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    return path
