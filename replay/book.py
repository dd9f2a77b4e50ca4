"""The bookkeeping of one replay table, whichever backend holds its items.

A ``Book`` lists a table's episodes, oldest first, and keeps the counts around them: live items
and bytes; the removers that let whole episodes leave (FIFO by ``max_items`` / ``max_bytes``, the
``age`` remover); the rate limiter's predicates on Reverb's (min_diff, max_diff) band over
inserted items * samples_per_insert - samples; waiting on them with the time spent blocked
counted and ``ReplayTimeout`` when it runs out; the signature check; statistics; and the counters
a checkpoint keeps. Where the items live is the subclass's business: ``replay.table.Table`` keeps
them in a sum tree in this process, ``replay.reverb_book.ReverbBook`` in a Reverb table. Each says
in ``_release`` what an episode's leaving means for its items and in ``mass`` how much sampling
weight it holds.

The two backends count samples differently for the limiter (``limited_by``): the in-process table
counts the items it handed out; Reverb counts every draw, the discarded ones included.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from cosmos_policy.episode import Episode
from cosmos_policy.errors import InputError
from replay.config import TableConfig


class SignatureError(InputError):
    """An episode does not match the table's signature; the table is unchanged."""


class ReplayTimeout(TimeoutError):
    """A rate-limited insert or sample waited longer than its timeout."""


@dataclass
class Entry:
    """One episode in a book: what statistics and the removers read, and which of its items are still in."""

    episode_id: str
    seq: int  # insertion number within the table: the FIFO order
    nbytes: int
    source: str
    success: bool
    policy_version: int | None
    live: np.ndarray  # (items,) bool: the item is still in the table
    inserted_at: float = field(default_factory=time.monotonic)

    @property
    def items(self) -> int:
        return int(self.live.sum())

    @staticmethod
    def facts(episode: Episode) -> dict[str, Any]:
        """The fields an entry takes from its episode."""
        return dict(episode_id=episode.episode_id, nbytes=episode.nbytes, source=episode.source.value,
                    success=episode.success, policy_version=episode.policy_version)


class Counters:
    """Running counts of a table (inserts, samples, draws, rejections, evictions) and the seconds spent blocked."""

    COUNTS = ("inserted_items", "inserted_episodes", "sampled_items", "draws", "discarded_draws", "rejected", "evicted_episodes")
    SECONDS = ("blocked_insert_s", "blocked_sample_s")

    def __init__(self) -> None:
        self.__dict__.update(dict.fromkeys(self.COUNTS, 0), **dict.fromkeys(self.SECONDS, 0.0))
        self.started = time.monotonic()

    def add(self, name: str, amount: float) -> None:
        setattr(self, name, getattr(self, name) + amount)


class Book:
    """One table's episodes and counters; ``cond`` guards it (several books may share one)."""

    persisted: tuple[str, ...] = ("inserted_items", "inserted_episodes", "sampled_items")  # the counters a checkpoint keeps

    def __init__(self, config: TableConfig, cond: threading.Condition | None = None, clock: Callable[[], float] = time.monotonic,
                 limited_by: str = "sampled_items") -> None:
        self.config = config
        self.clock = clock
        self.cond = cond or threading.Condition()  # re-entrant: its lock is an RLock
        self.limited_by = limited_by  # the counter of samples the rate limiter weighs against inserts
        self.version = 0
        self.counters = Counters()
        self.clear()

    def clear(self) -> None:
        """Forget the contents (a restore refills them); the version and the statistics stay."""
        self.episodes: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.items = 0
        self.nbytes = 0
        self.next_seq = 0

    # ---- what a backend says --------------------------------------------------------------
    def _release(self, entry: Any) -> None:
        """The episode of ``entry`` leaves: free its live items' storage (called before the counts change)."""
        raise NotImplementedError

    def mass(self) -> float:
        """The total selection weight of the live items (prioritized tables)."""
        raise NotImplementedError

    # ---- validation --------------------------------------------------------------------
    def check_signature(self, episode: Episode) -> None:
        """Raise ``InputError`` (``SignatureError`` for the table's own rules) unless ``episode`` may enter the table.

        The episode's own fields are checked again first (``Episode.validate``: a field set after construction is
        caught here, before anything is written), then what its file needs: an id that is a plain file name (it
        names ``<table>/<id>.hdf5``; a path separator or a leading dot would write elsewhere or be swept away as a
        temporary file) and metadata that JSON can write.
        """
        sig, name = self.config.signature, self.config.name
        if not isinstance(episode, Episode):
            raise SignatureError(f"table {name!r}: expected an Episode, got {type(episode).__name__}")
        episode.validate()
        eid = episode.episode_id
        if any(c in eid for c in "/\\\0") or eid.startswith("."):
            raise InputError(f"episode_id: expected a plain file name (no path separator, NUL or leading dot), got {eid!r}")
        try:
            json.dumps(episode.metadata)
        except (TypeError, ValueError) as exc:
            raise InputError(f"metadata: expected values JSON can write (the episode file keeps them as JSON): {exc}") from None
        if sig.cameras and sorted(episode.cameras) != sorted(sig.cameras):
            raise SignatureError(f"table {name!r}: episode cameras {sorted(episode.cameras)} do not match the signature {sorted(sig.cameras)}")
        if sig.proprio_dim is not None and episode.proprio.shape[1] != sig.proprio_dim:
            raise SignatureError(f"table {name!r}: proprio has {episode.proprio.shape[1]} dims, the signature says {sig.proprio_dim}")
        if sig.action_dim is not None and episode.actions.shape[1] != sig.action_dim:
            raise SignatureError(f"table {name!r}: actions have {episode.actions.shape[1]} dims, the signature says {sig.action_dim}")
        if sig.image_shape is not None:
            for cam, seq in episode.images.items():
                if not seq.present.any():  # no frame to read a size from: say which camera, not "images: no frame"
                    raise SignatureError(f"table {name!r}: camera {cam!r} has no frame at any step")
                if list(seq.shape) != list(sig.image_shape):
                    raise SignatureError(f"table {name!r}: camera {cam!r} frames are {list(seq.shape)}, the signature says {list(sig.image_shape)}")
        items = len(episode.sample_steps(self.config.window))
        if items == 0:
            raise SignatureError(f"table {name!r}: episode {episode.episode_id} has no step with frames at t and t + {self.config.window}")
        if items > self.config.max_items:
            raise SignatureError(f"table {name!r}: an episode of {items} items exceeds max_items {self.config.max_items}")
        if episode.episode_id in self.episodes:
            raise SignatureError(f"table {name!r}: episode {episode.episode_id} is already in the table")

    def item_priorities(self, episode: Episode, priority: float | list[float] | np.ndarray, steps: np.ndarray) -> np.ndarray:
        """One priority per item: ``priority`` is one value, one per episode step (steps that are not items are ignored),
        or one per item (as a checkpoint keeps them); anything else is an ``InputError``, not a numpy broadcasting error."""
        where = f"table {self.config.name!r}: priority"
        try:
            given = np.asarray(priority, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{where}: expected a number or one per step, got {type(priority).__name__}") from None
        per_step = given.ndim == 1 and len(given) == episode.num_steps
        if not per_step and not (given.ndim == 0 or (given.ndim == 1 and len(given) in (1, len(steps)))):
            raise InputError(f"{where}: expected one value, {episode.num_steps} (one per step) or {len(steps)} (one per item), "
                             f"got shape {given.shape}")
        pr = (given[steps] if per_step else np.broadcast_to(given, (len(steps),))).copy()
        if np.any(pr < 0) or not np.all(np.isfinite(pr)):
            raise InputError(f"{where}: expected finite values >= 0")
        return pr

    def weights(self, priorities: np.ndarray) -> np.ndarray:
        """Selection weights of items with these priorities."""
        if self.config.sampler == "prioritized":
            return np.power(priorities, self.config.priority_exponent)
        return np.ones_like(priorities)

    # ---- rate limiting -----------------------------------------------------------------
    def _diff(self) -> float:
        return self.counters.inserted_items * self.config.rate_limiter.samples_per_insert - getattr(self.counters, self.limited_by)

    def can_insert(self) -> bool:
        rl = self.config.rate_limiter
        # Let an episode in while the inserter is not yet a whole item ahead of the allowed band.
        return rl.kind == "min_size" or self._diff() + rl.samples_per_insert <= rl.bounds()[1]

    def can_sample(self, n: int) -> bool:
        rl = self.config.rate_limiter
        if self.items < max(rl.min_size, 1):
            return False
        return rl.kind == "min_size" or self._diff() - n >= rl.bounds()[0]

    def timeout_error(self, what: str, timeout: float, where: str = "") -> ReplayTimeout:
        rl, c = self.config.rate_limiter, self.counters
        return ReplayTimeout(
            f"table {self.config.name!r}: {what} blocked for {timeout:.3g} s by the {rl.kind} rate limiter{where} "
            f"(items {self.items}, inserted {c.inserted_items}, sampled {getattr(c, self.limited_by)}, "
            f"allowed inserts*{rl.samples_per_insert:g} - samples in {rl.bounds()})"
        )

    def wait(self, ready: Callable[[], bool], timeout: float | None, what: str, counter: str, shown: float | None = None) -> None:
        """Wait (holding ``cond``) until ``ready()``; the time spent counts as blocked, timeouts too.

        ``shown``: the timeout the message names, where the caller spent part of it already.
        """
        start = self.clock()
        deadline = None if timeout is None else start + timeout
        try:
            while not ready():
                remaining = None if deadline is None else deadline - self.clock()
                if remaining is not None and remaining <= 0:
                    raise self.timeout_error(what, timeout if shown is None else shown)  # type: ignore[arg-type]
                self.cond.wait(remaining)
        finally:
            self.counters.add(counter, self.clock() - start)

    def wait_for_insert(self, timeout: float | None = None) -> None:
        """Block while the rate limiter holds inserts back (call before writing the episode file)."""
        with self.cond:
            self.wait(self.can_insert, timeout, "insert", "blocked_insert_s")

    # ---- episodes in and out ---------------------------------------------------------------
    def take_seq(self) -> int:
        self.next_seq += 1
        return self.next_seq - 1

    def enter(self, entry: Entry) -> None:
        self.episodes[entry.episode_id] = entry
        self.items += entry.items
        self.nbytes += entry.nbytes

    def count_insert(self, entry: Entry) -> None:
        self.counters.add("inserted_items", entry.items)
        self.counters.add("inserted_episodes", 1)

    def drop(self, episode_id: str) -> Any:
        """The episode leaves (with the items it has left); returns its entry."""
        entry = self.episodes[episode_id]
        self._release(entry)
        del self.episodes[episode_id]
        self.items -= entry.items
        self.nbytes -= entry.nbytes
        return entry

    def evict(self, episode_id: str) -> str:
        self.drop(episode_id)
        self.counters.add("evicted_episodes", 1)
        return episode_id

    def retire(self, entry: Entry, index: np.ndarray | list[int]) -> bool:
        """Items of ``entry`` were used up (``max_times_sampled``); True when that was its last and it left."""
        index = np.unique(np.asarray(index, dtype=np.int64))
        index = index[entry.live[index]]
        entry.live[index] = False
        self.items -= len(index)
        if entry.live.any():
            return False
        del self.episodes[entry.episode_id]
        self.nbytes -= entry.nbytes
        return True

    def make_room(self, items: int, nbytes: int) -> list[str]:
        """The FIFO remover: the oldest episodes leave until one of ``items`` items and ``nbytes`` bytes fits."""
        cfg, evicted = self.config, []
        while self.episodes and (
            self.items + items > cfg.max_items or (cfg.max_bytes is not None and self.nbytes + nbytes > cfg.max_bytes)
        ):
            evicted.append(self.evict(next(iter(self.episodes))))
        return evicted

    def remove_expired(self) -> list[str]:
        """The age remover: episodes inserted more than ``max_age_s`` ago leave."""
        if self.config.remover != "age":
            return []
        with self.cond:
            now = self.clock()
            old = [eid for eid, e in self.episodes.items() if now - e.inserted_at > self.config.max_age_s]  # type: ignore[operator]
            return [self.evict(eid) for eid in old]

    # ---- state -------------------------------------------------------------------------
    def episode_ids(self) -> list[str]:
        """Ids of the episodes in the table, oldest first."""
        with self.cond:
            return list(self.episodes)

    def weight(self) -> float:
        """How much of the table's sampling mass this book holds (items, or total priority for prioritized tables)."""
        with self.cond:
            return self.mass() if self.config.sampler == "prioritized" else float(self.items)

    def saved_counters(self) -> dict[str, float]:
        return {k: getattr(self.counters, k) for k in self.persisted}

    def load_counters(self, saved: dict[str, Any]) -> None:
        for k in self.persisted:
            setattr(self.counters, k, saved.get(k, 0))

    def stats(self) -> dict[str, float]:
        with self.cond:
            c = self.counters
            elapsed = max(1e-9, time.monotonic() - c.started)
            entries = list(self.episodes.values())
            by_source = collections.Counter(e.source for e in entries)
            versions = [e.policy_version for e in entries if e.policy_version is not None]
            return {
                "items": self.items,
                "episodes": len(entries),
                "bytes": self.nbytes,
                **{f"episodes_{k}": v for k, v in sorted(by_source.items())},
                "episodes_success": sum(e.success for e in entries),
                "episodes_failure": sum(not e.success for e in entries),
                "inserted_items": c.inserted_items,
                "inserted_episodes": c.inserted_episodes,
                "sampled_items": c.sampled_items,
                "insert_items_per_s": c.inserted_items / elapsed,
                "sample_items_per_s": c.sampled_items / elapsed,
                "blocked_insert_s": c.blocked_insert_s,
                "blocked_sample_s": c.blocked_sample_s,
                "rejected": c.rejected,
                "evicted_episodes": c.evicted_episodes,
                "staleness_versions": float(np.mean([self.version - v for v in versions])) if versions else 0.0,
            }
