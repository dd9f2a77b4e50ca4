"""``<run_dir>/state.json``: which phases of a run are done and where their outputs are.

A restarted job with the same run directory reads it and skips what is done. It records phases
and paths only (paths inside the run directory relative to it, so the directory can move between
machines or folders): weight versions belong to the learner (its checkpoints, and the metadata of every
checkpoint it exports), so there is one owner of a version number.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


class RunState:
    """The run's progress, written atomically (a crash leaves the old file or the new one, never half)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "state.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self._lock = threading.Lock()  # the asynchronous loop's collector records its rounds from a thread of its own

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, **values: Any) -> None:
        with self._lock:
            self.data.update(values)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)

    def inside(self, path: str | Path) -> str:
        """``path`` as recorded: relative to the run directory where it lies inside it, else absolute."""
        root, path = self.path.parent.resolve(), Path(path).resolve()
        return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)

    def get_path(self, key: str) -> str | None:
        """A recorded path (``inside``; older runs recorded absolute ones), resolved against the run directory."""
        value = self.data.get(key)
        return None if value is None else str(self.path.parent.resolve() / value)
