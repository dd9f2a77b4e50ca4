"""The episode files of a replay store: ``root/<table>/<episode_id>.hdf5``.

Every backend writes an episode's file (``write_episode``: temporary file, fsync, rename) before
it acknowledges the insert and deletes it when the episode leaves, so after a crash the files
are the acknowledged episodes. A temporary file left behind belonged to an insert that was never
acknowledged; a file that cannot be read is moved aside as ``.corrupt`` and skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

from cosmos_policy.data.episode_file import EpisodeFileError, read_episode, write_episode
from cosmos_policy.episode import Episode


class EpisodeFiles:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, table: str, episode_id: str) -> Path:
        return self.root / table / f"{episode_id}.hdf5"

    def write(self, table: str, episode: Episode) -> Path:
        """Durable once this returns."""
        return write_episode(self.path(table, episode.episode_id), episode)

    def delete(self, table: str, episode_ids: list[str]) -> None:
        for eid in episode_ids:
            self.path(table, eid).unlink(missing_ok=True)

    def scan(self, table: str) -> dict[str, Path]:
        """episode id -> file of every episode file of ``table``, after clearing away unacknowledged inserts."""
        folder = self.root / table
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".*.tmp"):  # an insert that died before its rename was never acknowledged
            stale.unlink(missing_ok=True)
        return {p.stem: p for p in folder.glob("*.hdf5")}

    def late(self, table: str, known: set[str] | dict) -> list[Path]:
        """The files of ``table`` that a restored state does not name, oldest first (acknowledged after it)."""
        found = self.scan(table)
        return sorted((p for stem, p in found.items() if stem not in known), key=lambda p: p.stat().st_mtime)

    @staticmethod
    def read(path: Path) -> Episode | None:
        try:
            return read_episode(path)
        except EpisodeFileError as exc:  # a file that cannot be read was never a complete, acknowledged insert
            bad = path.with_suffix(".corrupt")
            os.replace(path, bad)
            print(f"replay restore: moved unreadable {path} aside to {bad} ({exc})", flush=True)
            return None
