"""The tables of one replay shard, durable on local disk.

An insert is acknowledged only after its episode file is on disk (``write_episode``: temporary
file, fsync, rename) and the episode is in the table. Eviction deletes the file. A checkpoint
records what the files cannot: each table's order, priorities, sample counts and rate-limiter
counters. After a crash the shard restores from its checkpoint plus every episode file written
since (those join with default priorities), so nothing acknowledged is lost.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from cosmos_policy.codec import atomic_write_bytes
from cosmos_policy.data.episode_file import EpisodeFileError, read_episode, write_episode
from cosmos_policy.episode import Episode
from cosmos_policy.errors import ConfigError
from replay.config import ReplayConfig
from replay.table import SampledItem, Table

CHECKPOINT = "checkpoint.json"


class ReplayStore:
    def __init__(self, config: ReplayConfig, root: str | Path, seed: int = 0) -> None:
        self.config = config
        self.root = Path(root)
        self.tables = {t.name: Table(t) for t in config.tables}
        self.rng = np.random.default_rng(seed)
        self._rng_lock = threading.Lock()
        self.restored: dict[str, int] = {}
        self.last_checkpoint = time.monotonic()
        self.restore()

    def table(self, name: str) -> Table:
        if name not in self.tables:
            raise ConfigError(f"replay: no table {name!r}; tables are {sorted(self.tables)}")
        return self.tables[name]

    def episode_path(self, table: str, episode_id: str) -> Path:
        return self.root / table / f"{episode_id}.hdf5"

    # ---- the client API ----------------------------------------------------------------
    def insert(self, table: str, episode: Episode, priority: float | list[float] = 1.0, timeout: float | None = None) -> str:
        """Store ``episode`` durably in ``table``; returns its id once acknowledged.

        ``priority`` is one value for every step or one per step (prioritized tables).
        """
        tbl = self.table(table)
        try:
            tbl.check_signature(episode)
        except Exception:
            tbl.counters.rejected += 1
            raise
        tbl.wait_for_insert(timeout)
        path = write_episode(self.episode_path(table, episode.episode_id), episode)
        try:
            evicted = tbl.add(episode, priority)
        except Exception:
            path.unlink(missing_ok=True)
            tbl.counters.rejected += 1
            raise
        self._delete(table, evicted)
        self._maybe_checkpoint()
        return episode.episode_id

    def sample(self, table: str, n: int, timeout: float | None = None) -> list[SampledItem]:
        with self._rng_lock:
            rng = np.random.default_rng(self.rng.integers(2**63))
        items, gone = self.table(table).sample(n, rng, timeout)
        self._delete(table, gone)
        return items

    def update_priorities(self, table: str, keys: list[tuple[str, int]], priorities: list[float]) -> int:
        return self.table(table).update_priorities(keys, priorities)

    def episode_ids(self, table: str) -> list[str]:
        return self.table(table).episode_ids()

    def weight(self, table: str) -> float:
        return self.table(table).weight()

    def set_version(self, version: int) -> None:
        for t in self.tables.values():
            t.version = int(version)

    def stats(self) -> dict[str, dict[str, float]]:
        return {name: t.stats() for name, t in self.tables.items()}

    # ---- durability --------------------------------------------------------------------
    def _delete(self, table: str, episode_ids: list[str]) -> None:
        for eid in episode_ids:
            self.episode_path(table, eid).unlink(missing_ok=True)

    def _maybe_checkpoint(self) -> None:
        if time.monotonic() - self.last_checkpoint >= self.config.checkpoint_every_s:
            self.checkpoint()

    def checkpoint(self) -> Path:
        """Write the tables' metadata atomically; the episode files are already durable."""
        state = {"version": 1, "tables": {name: t.state() for name, t in self.tables.items()}}
        path = self.root / CHECKPOINT
        atomic_write_bytes(path, json.dumps(state).encode())
        self.last_checkpoint = time.monotonic()
        return path

    def restore(self) -> None:
        """Rebuild the tables from the checkpoint and every episode file on disk."""
        self.root.mkdir(parents=True, exist_ok=True)
        saved: dict = {}
        ckpt = self.root / CHECKPOINT
        if ckpt.exists():
            saved = json.loads(ckpt.read_text()).get("tables", {})
        for name, tbl in self.tables.items():
            folder = self.root / name
            folder.mkdir(exist_ok=True)
            for stale in folder.glob(".*.tmp"):  # an insert that died before its rename was never acknowledged
                stale.unlink(missing_ok=True)
            files = {p.stem: p for p in folder.glob("*.hdf5")}
            state = saved.get(name, {})
            known = set()
            for entry in state.get("episodes", []):
                path = files.get(entry["episode_id"])
                if path is None:
                    continue
                ep = self._read(path)
                if ep is None:
                    continue
                tbl.add(ep, np.asarray(entry["priorities"]), np.asarray(entry["times_sampled"]), count_insert=False)
                dead = [s for s, live in zip(tbl.episodes[ep.episode_id].slots, entry["live"]) if not live]
                tbl._free_slots(np.asarray(dead, dtype=np.int64))
                known.add(entry["episode_id"])
            tbl.counters.inserted_items = int(state.get("inserted_items", 0))
            tbl.counters.sampled_items = int(state.get("sampled_items", 0))
            # Files written after the checkpoint: acknowledged inserts the checkpoint never saw.
            late = sorted((p for stem, p in files.items() if stem not in known), key=lambda p: p.stat().st_mtime)
            for path in late:
                ep = self._read(path)
                if ep is not None:
                    self._delete(name, tbl.add(ep))
            self.restored[name] = len(tbl.episodes)

    @staticmethod
    def _read(path: Path) -> Episode | None:
        try:
            return read_episode(path)
        except EpisodeFileError as exc:  # a file that cannot be read was never a complete, acknowledged insert
            bad = path.with_suffix(".corrupt")
            os.replace(path, bad)
            print(f"replay restore: moved unreadable {path} aside to {bad} ({exc})", flush=True)
            return None
