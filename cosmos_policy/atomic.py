"""Files written so that a reader sees either the old or the complete new content, even after a crash.

Kept apart from the model's modules (no torch): the replay shards, the EnvRunners' episode files and
every small state file of a job write through these, and importing them must not load a model stack.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; on success it is fsynced and renamed onto ``path``, on failure removed.

    Readers see either the old or the complete new content, even after a crash (a leftover
    ``.<name>.*.tmp`` was never renamed: never acknowledged).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old or the complete new content."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
