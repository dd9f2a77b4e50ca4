"""The book of one Reverb table: the shared ``Book`` plus what Reverb's side needs.

Reverb holds the items; the service keeps per table the episodes in it with their priorities,
the Reverb item keys it has learned from samples, and *tombstones*: items of episodes that left
whose keys were unknown, so they are still in Reverb (see ``replay.reverb_backend``). Reverb's
limiter counts every draw, tombstones included, so this book's limiter does too
(``limited_by="draws"``). ``table_spec`` is what the server builds the table from: Reverb's own
limiter with the band widened by what whole-episode admission can overshoot.
"""

from __future__ import annotations

import heapq
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from replay.book import Book, Entry
from replay.config import TableConfig

# The counters a checkpoint keeps (they move with Reverb's table); the others are this process's statistics.
LIMITER_COUNTERS = ("inserted_items", "draws", "inserted_episodes", "sampled_items", "discarded_draws")


@dataclass(kw_only=True)
class ReverbEntry(Entry):
    """An episode whose items are in Reverb: one item per step."""

    priorities: np.ndarray  # (T,) float64, as set in Reverb
    keys: dict[int, int] = field(default_factory=dict)  # step -> Reverb item key, learned from samples


class ReverbBook(Book):
    persisted = LIMITER_COUNTERS

    def __init__(self, config: TableConfig, cond: threading.Condition) -> None:
        super().__init__(config, cond=cond, limited_by="draws")

    def clear(self) -> None:
        super().clear()
        self.tombstones: dict[tuple[int, int], tuple[int | None, float]] = {}  # (seq, step) -> (key, weight)
        self._tomb_heap: list[tuple[int, int]] = []  # (seq, step), oldest first; entries gone from the dict are skipped
        self._mass = 0.0
        # Reverb's limiter counts restart from the checkpoint's (or from zero on a rebuild).
        self.load_counters({})

    # ---- live items ---------------------------------------------------------------------
    def mass(self) -> float:
        return max(0.0, self._mass) if self.items else 0.0

    def enter(self, entry: ReverbEntry) -> None:  # type: ignore[override]
        super().enter(entry)
        self._mass += float(self.weights(entry.priorities[entry.live]).sum())

    def _release(self, entry: ReverbEntry) -> None:
        """Its items still in Reverb become tombstones (deleted by key where the key is known)."""
        w = self.weights(entry.priorities)
        for step in np.flatnonzero(entry.live):
            self.tomb(entry.seq, int(step), entry.keys.get(int(step)), float(w[step]))
        self._mass -= float(w[entry.live].sum())

    def retire(self, entry: ReverbEntry, index: np.ndarray | list[int]) -> bool:  # type: ignore[override]
        steps = np.unique(np.asarray(index, dtype=np.int64))
        steps = steps[entry.live[steps]]
        self._mass -= float(self.weights(entry.priorities[steps]).sum())
        for step in steps:
            entry.keys.pop(int(step), None)
        return super().retire(entry, steps)

    def set_priority(self, entry: ReverbEntry, step: int, priority: float) -> None:
        if entry.live[step]:
            new, old = self.weights(np.array([priority, entry.priorities[step]]))
            self._mass += float(new - old)
        entry.priorities[step] = priority

    def on_draw(self, episode_id: str, seq: int, step: int, key: int) -> ReverbEntry | None:
        """Follow one item Reverb handed out; None for a tombstone (which the caller deletes in Reverb)."""
        self.counters.add("draws", 1)
        entry = self.episodes.get(episode_id)
        if entry is None or entry.seq != seq or not entry.live[step]:
            self.tombstones.pop((seq, step), None)
            self.counters.add("discarded_draws", 1)
            return None
        entry.keys[step] = key
        return entry

    def live_probability(self, priority: float, probability: float) -> float:
        """An item's selection probability among live items, from Reverb's (which counts the tombstones too)."""
        if self.config.sampler == "fifo":
            return 1.0 / max(1, self.items)
        tomb_weight = sum(w for _, w in self.tombstones.values())
        if tomb_weight <= 0 or probability <= 0:
            return probability
        w = float(self.weights(np.array([priority]))[0])
        live_weight = w / probability - tomb_weight
        return w / live_weight if live_weight > 0 else probability

    # ---- Reverb's view: live items plus tombstones, in FIFO order ---------------------------
    @property
    def reverb_size(self) -> int:
        return self.items + len(self.tombstones)

    def tomb(self, seq: int, step: int, key: int | None, weight: float) -> None:
        self.tombstones[(seq, step)] = (key, weight)
        heapq.heappush(self._tomb_heap, (seq, step))

    def _oldest_tomb(self) -> tuple[int, int] | None:
        while self._tomb_heap and self._tomb_heap[0] not in self.tombstones:
            heapq.heappop(self._tomb_heap)
        return self._tomb_heap[0] if self._tomb_heap else None

    def known_tomb_keys(self) -> list[int]:
        """Pops the tombstones whose keys are known: those can be deleted in Reverb right away."""
        known = [(k, key) for k, (key, _) in self.tombstones.items() if key is not None]
        for k, _ in known:
            del self.tombstones[k]
        return [key for _, key in known]

    def reverb_removes(self, count: int) -> list[str]:
        """Reverb's FIFO remover is about to drop the ``count`` oldest items: follow it in the book.

        Normally those are all tombstones. Should a live episode's item be among them (tombstones
        left in the middle by a restore), that episode leaves whole, so no episode is ever left
        with items missing.
        """
        evicted = []
        while count > 0:
            tomb = self._oldest_tomb()
            oldest = next(iter(self.episodes.values()), None)
            if tomb is not None and (oldest is None or tomb[0] < oldest.seq):
                del self.tombstones[tomb]
                count -= 1
            elif oldest is not None:
                evicted.append(self.evict(oldest.episode_id))
            else:
                break
        return evicted

    # ---- checkpoint -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        episodes = [
            {"episode_id": e.episode_id, "seq": e.seq, "nbytes": e.nbytes, "source": e.source, "success": e.success,
             "policy_version": e.policy_version, "priorities": e.priorities.tolist(), "live": e.live.tolist(),
             "keys": {str(s): k for s, k in e.keys.items()}}
            for e in self.episodes.values()
        ]
        tombs = [[seq, step, key, w] for (seq, step), (key, w) in self.tombstones.items()]
        return {"episodes": episodes, "tombstones": tombs, "next_seq": self.next_seq, "counters": self.saved_counters()}

    def learned_keys(self) -> dict[str, tuple[int, dict[int, int]]]:
        """episode id -> (seq, step -> key): the keys learned so far, to carry over a restore."""
        return {e.episode_id: (e.seq, dict(e.keys)) for e in self.episodes.values()}

    def load(self, state: dict[str, Any], learned: dict[str, tuple[int, dict[int, int]]], present: Callable[[str], bool]) -> list[str]:
        """Refill from a saved ``state``; episodes not ``present`` (file gone) become tombstones. Returns the ids restored."""
        restored = []
        for e in state["episodes"]:
            keys = {int(s): int(k) for s, k in e["keys"].items()}
            seq_now, keys_now = learned.get(e["episode_id"], (None, {}))
            if seq_now == e["seq"]:  # keys learned since the checkpoint still name the same Reverb items
                keys.update(keys_now)
            self.enter(ReverbEntry(
                episode_id=e["episode_id"], seq=e["seq"], nbytes=e["nbytes"], source=e["source"], success=e["success"],
                policy_version=e["policy_version"], live=np.asarray(e["live"], dtype=bool),
                priorities=np.asarray(e["priorities"], dtype=np.float64), keys=keys,
            ))
            if present(e["episode_id"]):
                restored.append(e["episode_id"])
            else:  # left after the checkpoint (evicted or used up): its items are tombstones now
                self.drop(e["episode_id"])
        for seq, step, key, weight in state["tombstones"]:
            self.tomb(seq, step, key, weight)
        self.next_seq = state["next_seq"]
        self.load_counters(state["counters"])
        return restored


def limiter_spec(cfg: TableConfig) -> dict[str, Any]:
    """Reverb's rate limiter for the table: the configured one, its band widened by what the service admits at once."""
    rl = cfg.rate_limiter
    # Retiring items during a batch must not stall it half way: the service checks min_size first.
    min_size = rl.min_size if cfg.max_times_sampled is None else 1
    if rl.kind == "min_size":
        return {"kind": "min_size", "min_size": min_size}
    lo, hi = rl.bounds()
    return {
        "kind": "sample_to_insert", "samples_per_insert": rl.samples_per_insert, "min_size": min_size,
        "min_diff": lo - cfg.max_items,  # draws of tombstones, discarded
        "max_diff": hi + (cfg.max_items - 1) * rl.samples_per_insert,  # an episode admitted whole
    }


def table_spec(cfg: TableConfig) -> dict[str, Any]:
    """The plain description ``replay/reverb_server.py`` builds the Reverb table from."""
    sig = cfg.signature
    return {
        "name": cfg.name, "sampler": cfg.sampler, "priority_exponent": cfg.priority_exponent, "max_size": cfg.max_items,
        "max_times_sampled": cfg.max_times_sampled or 0, "rate_limiter": limiter_spec(cfg),
        "signature": {"cameras": len(sig.cameras) or None, "proprio_dim": sig.proprio_dim, "action_dim": sig.action_dim},
    }
