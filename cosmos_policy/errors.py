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


def existing_file(path: str | Path, what: str, error: type[ValueError]) -> Path:
    """``path``, or ``error`` saying that no ``what`` is there (a missing file is bad input, named as such)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    return path
