"""The tables of one replay shard, durable on local disk.

An insert is acknowledged only after its episode file is on disk (``replay.files``) and the
episode is in the table. Eviction deletes the file. A checkpoint records what the files cannot:
each table's order, priorities, sample counts and counters. After a crash the shard restores
from its checkpoint plus every episode file written since (those join with default priorities),
so nothing acknowledged is lost. An unreadable checkpoint is moved aside and the tables are
rebuilt from the episode files alone.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from cosmos_policy.atomic import atomic_write_bytes
from cosmos_policy.contracts import SampledItem
from cosmos_policy.episode import Episode
from cosmos_policy.errors import ConfigError
from replay.config import ReplayConfig
from replay.files import EpisodeFiles
from replay.table import Table

CHECKPOINT = "checkpoint.json"


class ReplayStore:
    def __init__(self, config: ReplayConfig, root: str | Path, seed: int = 0) -> None:
        self.config = config
        self.root = Path(root)
        self.files = EpisodeFiles(self.root)
        self.tables = {t.name: Table(t) for t in config.tables}
        self.rng = np.random.default_rng(seed)
        self._rng_lock = threading.Lock()
        self.restored: dict[str, int] = {}
        self.last_checkpoint = time.monotonic()
        self.restore()

    def table(self, name: str) -> Table:
        if not isinstance(name, str):
            raise ConfigError(f"replay: table: expected a table name (str) of {sorted(self.tables)}, got {type(name).__name__}")
        if name not in self.tables:
            raise ConfigError(f"replay: no table {name!r}; tables are {sorted(self.tables)}")
        return self.tables[name]

    # ---- the client API ----------------------------------------------------------------
    def insert(self, table: str, episode: Episode, priority: float | list[float] = 1.0, timeout: float | None = None) -> str:
        """Store ``episode`` durably in ``table``; returns its id once acknowledged.

        ``priority`` is one value for every step or one per step (prioritized tables). The episode and the
        priorities are checked before its file is written: a refused insert leaves no file and no item behind.
        """
        tbl = self.table(table)
        try:
            tbl.check_signature(episode)
            tbl.item_priorities(episode, priority, episode.sample_steps(tbl.config.window))
        except Exception:
            tbl.counters.add("rejected", 1)
            raise
        tbl.wait_for_insert(timeout)
        path = self.files.write(table, episode)
        try:
            evicted = tbl.add(episode, priority)
        except Exception:
            path.unlink(missing_ok=True)
            tbl.counters.add("rejected", 1)
            raise
        self.files.delete(table, evicted)
        self._maybe_checkpoint()
        return episode.episode_id

    def sample(self, table: str, n: int, timeout: float | None = None) -> list[SampledItem]:
        with self._rng_lock:
            rng = np.random.default_rng(self.rng.integers(2**63))
        items, gone = self.table(table).sample(n, rng, timeout)
        self.files.delete(table, gone)
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

    def close(self) -> None:
        self.checkpoint()

    # ---- durability --------------------------------------------------------------------
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
            try:
                saved = json.loads(ckpt.read_text())["tables"]
            except (OSError, ValueError, KeyError) as exc:  # restore from the episode files alone
                os.replace(ckpt, ckpt.with_suffix(".corrupt"))
                print(f"replay restore: moved unreadable {ckpt} aside ({exc!r}); restoring from the episode files", flush=True)
        for name, tbl in self.tables.items():
            files = self.files.scan(name)
            state = saved.get(name, {})
            for entry in state.get("episodes", []):
                path = files.get(entry["episode_id"])
                ep = None if path is None else self.files.read(path)
                if ep is not None:
                    tbl.add(ep, np.asarray(entry["priorities"]), np.asarray(entry["times_sampled"]), live=np.asarray(entry["live"]),
                            count_insert=False)
            tbl.load_counters(state.get("counters", state))  # older checkpoints kept the counters beside the episodes
            # Files written after the checkpoint: acknowledged inserts the checkpoint never saw.
            for path in self.files.late(name, tbl.episodes):
                ep = self.files.read(path)
                if ep is not None:
                    self.files.delete(name, tbl.add(ep))
            self.restored[name] = len(tbl.episodes)
