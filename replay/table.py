"""One replay table in memory: the items of a ``Book`` in a sum tree, with the three selectors.

Items are the steps of the episodes inserted into the table; the episodes themselves are held
once (JPEG-compressed, as ``Episode`` keeps them) and a sampled item hands out its
``StepWindow``. Selection weights live in a sum tree, so uniform and prioritized sampling and
priority updates cost O(log n) per item. Episodes, removers, rate limiting, waiting and
statistics are the ``Book``'s (shared with the Reverb backend).

Thread-safe: the book's condition variable guards the table, so a sampling learner and inserting
actors can share a shard.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from cosmos_policy.contracts import SampledItem
from cosmos_policy.episode import Episode
from cosmos_policy.errors import InputError
from replay.book import Book, Entry, ReplayTimeout, SignatureError
from replay.config import TableConfig

__all__ = ["ReplayTimeout", "SignatureError", "SumTree", "Table"]


class SumTree:
    """Binary tree of non-negative weights; sampling by prefix sums, updates in O(log n)."""

    def __init__(self, capacity: int) -> None:
        self.size = 1 << max(0, math.ceil(math.log2(max(1, capacity))))
        self.tree = np.zeros(2 * self.size, dtype=np.float64)

    def set(self, index: np.ndarray, value: np.ndarray) -> None:
        idx = np.asarray(index, dtype=np.int64) + self.size
        if len(idx) == 0:
            return
        self.tree[idx] = value
        idx = np.unique(idx // 2)
        while idx[0] >= 1:  # recompute every ancestor, level by level, up to the root (node 1)
            self.tree[idx] = self.tree[2 * idx] + self.tree[2 * idx + 1]
            idx = np.unique(idx // 2)

    def get(self, index: np.ndarray) -> np.ndarray:
        return self.tree[np.asarray(index, dtype=np.int64) + self.size]

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def find(self, targets: np.ndarray) -> np.ndarray:
        """Leaf index whose prefix-sum interval contains each target in [0, total)."""
        node = np.ones(len(targets), dtype=np.int64)
        t = np.asarray(targets, dtype=np.float64).copy()
        while node[0] < self.size:
            left = 2 * node
            go_right = t >= self.tree[left]
            t = np.where(go_right, t - self.tree[left], t)
            node = np.where(go_right, left + 1, left)
        return node - self.size


@dataclass(kw_only=True)
class _Entry(Entry):
    episode: Episode
    steps: np.ndarray  # the episode's item steps (those with frames at t and at t + K)
    slots: np.ndarray  # the slot of each item

    def index_of(self, step: int) -> int | None:
        i = int(np.searchsorted(self.steps, step))
        return i if i < len(self.steps) and self.steps[i] == step else None


class Table(Book):
    def __init__(self, config: TableConfig, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(config, clock=clock)
        cap = config.max_items
        self.tree = SumTree(cap)
        self.priority = np.zeros(cap, dtype=np.float64)
        self.times_sampled = np.zeros(cap, dtype=np.int64)
        self.slot_episode: list[str | None] = [None] * cap
        self.slot_step = np.zeros(cap, dtype=np.int64)
        self.free: collections.deque[int] = collections.deque(range(cap))

    # ---- insert / remove ---------------------------------------------------------------
    def add(self, episode: Episode, priorities: np.ndarray | float = 1.0, times_sampled: np.ndarray | None = None,
            live: np.ndarray | None = None, count_insert: bool = True) -> list[str]:
        """Add an episode's items; returns the ids of episodes evicted to make room.

        ``priorities`` is one value, or one per episode step (steps that are not items are
        ignored); ``times_sampled`` and ``live`` (restore) are one per item.
        """
        self.check_signature(episode)
        steps = episode.sample_steps(self.config.window)
        pr = self.item_priorities(episode, priorities, steps)
        with self.cond:
            evicted = self.make_room(len(steps), episode.nbytes)
            slots = np.array([self.free.popleft() for _ in steps], dtype=np.int64)
            for s, step in zip(slots, steps):
                self.slot_episode[s] = episode.episode_id
                self.slot_step[s] = step
            self.priority[slots] = pr
            self.times_sampled[slots] = 0 if times_sampled is None else times_sampled
            self.tree.set(slots, self.weights(pr))
            entry = _Entry(**Entry.facts(episode), seq=self.take_seq(), live=np.ones(len(steps), dtype=bool),
                           inserted_at=self.clock(), episode=episode, steps=steps, slots=slots)
            if live is not None:  # restored: items used up before the checkpoint stay out
                entry.live = np.asarray(live, dtype=bool).copy()
                self._free_slots(slots[~entry.live])
            self.enter(entry)
            if count_insert:
                self.count_insert(entry)
            self.cond.notify_all()
            return evicted

    def _release(self, entry: _Entry) -> None:
        self._free_slots(entry.slots[entry.live])

    def _free_slots(self, slots: np.ndarray) -> None:
        if len(slots) == 0:
            return
        self.tree.set(slots, np.zeros(len(slots)))
        for s in slots:
            self.slot_episode[s] = None
            self.free.append(int(s))

    def mass(self) -> float:
        return self.tree.total

    # ---- sampling ----------------------------------------------------------------------
    def sample(self, n: int, rng: np.random.Generator, timeout: float | None = None) -> tuple[list[SampledItem], list[str]]:
        """``n`` items by the table's selector; also returns episodes that left (all items used up)."""
        if n < 1:
            raise InputError(f"sample: expected n >= 1, got {n}")
        gone = self.remove_expired()
        with self.cond:
            self.wait(lambda: self.can_sample(n), timeout, f"sample of {n}", "blocked_sample_s")
            slots, probs = self._select(n, rng)
            self.times_sampled[slots] += 1
            items = []
            for s, p in zip(slots, probs):
                eid, step = self.slot_episode[s], int(self.slot_step[s])
                entry = self.episodes[eid]
                items.append(
                    SampledItem(
                        table=self.config.name, episode_id=eid, step=step, priority=float(self.priority[s]),  # type: ignore[arg-type]
                        probability=float(p), times_sampled=int(self.times_sampled[s]),
                        window=entry.episode.window(step, self.config.window),
                    )
                )
            self.counters.add("sampled_items", n)
            gone += self._retire(slots)
            self.cond.notify_all()
            return items, gone

    def _select(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self.config.sampler == "fifo":
            slots: list[int] = []
            for entry in self.episodes.values():  # oldest episode first, steps in order
                slots.extend(entry.slots[entry.live][: n - len(slots)].tolist())
                if len(slots) == n:
                    break
            slots = (slots * (n // max(1, len(slots)) + 1))[:n] if slots else slots
            return np.array(slots, dtype=np.int64), np.full(n, 1.0 / max(1, self.items))
        total = self.tree.total
        targets = rng.random(n) * total
        slots_ = np.minimum(self.tree.find(targets), self.tree.size - 1)
        return slots_, self.tree.get(slots_) / total

    def _retire(self, slots: np.ndarray) -> list[str]:
        limit = self.config.max_times_sampled
        if limit is None:
            return []
        by_episode: dict[str, list[int]] = {}
        for s in np.unique(slots[self.times_sampled[slots] >= limit]):
            by_episode.setdefault(self.slot_episode[s], []).append(int(s))  # type: ignore[arg-type]
        gone = []
        for eid, used in by_episode.items():
            entry, used_slots = self.episodes[eid], np.array(used, dtype=np.int64)
            index = np.searchsorted(entry.steps, self.slot_step[used_slots])
            self._free_slots(used_slots)
            if self.retire(entry, index):
                gone.append(eid)
        return gone

    def update_priorities(self, keys: Iterable[tuple[str, int]], priorities: Iterable[float]) -> int:
        """Set the priority of (episode_id, step) items still in the table; returns how many were found."""
        found = 0
        with self.cond:
            for (eid, step), p in zip(keys, priorities):
                if not math.isfinite(p) or p < 0:
                    raise InputError(f"update_priorities: priority of ({eid}, {step}) must be finite and >= 0, got {p}")
                entry = self.episodes.get(eid)
                i = None if entry is None else entry.index_of(int(step))
                if i is None or not entry.live[i]:
                    continue
                s = entry.slots[i]
                self.priority[s] = p
                self.tree.set(np.array([s]), self.weights(np.array([p])))
                found += 1
        return found

    # ---- state -------------------------------------------------------------------------
    def state(self) -> dict:
        """What a checkpoint keeps besides the episode files: order, priorities, liveness, counters."""
        with self.cond:
            eps = [
                {
                    "episode_id": eid,
                    "priorities": self.priority[entry.slots].tolist(),
                    "times_sampled": self.times_sampled[entry.slots].tolist(),
                    "live": entry.live.tolist(),
                }
                for eid, entry in self.episodes.items()
            ]
            return {"episodes": eps, "counters": self.saved_counters()}
