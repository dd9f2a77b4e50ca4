"""One replay table in memory: items, selectors, removers, rate limiting and statistics.

Items are the steps of the episodes inserted into the table; the episodes themselves are held
once (JPEG-compressed, as ``Episode`` keeps them) and a sampled item hands out its
``StepWindow``. Selection weights live in a sum tree, so uniform and prioritized sampling and
priority updates cost O(log n) per item. Inserts and samples block (up to a timeout) while the
rate limiter says the caller runs ahead; the time spent blocked is counted.

Thread-safe: one condition variable guards the table, so a sampling learner and inserting
actors can share a shard.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from cosmos_policy.episode import Episode, StepWindow
from cosmos_policy.errors import InputError
from replay.config import TableConfig


class SignatureError(InputError):
    """An episode does not match the table's signature; the table is unchanged."""


class ReplayTimeout(TimeoutError):
    """A rate-limited insert or sample waited longer than its timeout."""


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


@dataclass
class _Entry:
    episode: Episode
    steps: np.ndarray  # the episode's item steps (those with frames at t and at t + K)
    slots: np.ndarray  # the slot of each item
    seq: int
    inserted_at: float
    nbytes: int
    live: int

    def slot_of(self, step: int) -> int | None:
        i = int(np.searchsorted(self.steps, step))
        return int(self.slots[i]) if i < len(self.steps) and self.steps[i] == step else None


@dataclass
class SampledItem:
    """One sampled item: which step of which episode, its selection odds, and its window."""

    table: str
    episode_id: str
    step: int
    priority: float
    probability: float
    times_sampled: int
    window: StepWindow


@dataclass
class _Counters:
    inserted_items: int = 0
    inserted_episodes: int = 0
    sampled_items: int = 0
    rejected: int = 0
    evicted_episodes: int = 0
    blocked_insert_s: float = 0.0
    blocked_sample_s: float = 0.0
    started: float = field(default_factory=time.monotonic)


class Table:
    def __init__(self, config: TableConfig, clock=time.monotonic) -> None:
        self.config = config
        self.clock = clock
        cap = config.max_items
        self.tree = SumTree(cap)
        self.priority = np.zeros(cap, dtype=np.float64)
        self.times_sampled = np.zeros(cap, dtype=np.int64)
        self.slot_episode: list[str | None] = [None] * cap
        self.slot_step = np.zeros(cap, dtype=np.int64)
        self.free: collections.deque[int] = collections.deque(range(cap))
        self.episodes: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self.nbytes = 0
        self.items = 0
        self.seq = 0
        self.version = 0
        self.counters = _Counters()
        self.cond = threading.Condition()

    # ---- validation --------------------------------------------------------------------
    def check_signature(self, episode: Episode) -> None:
        sig, name = self.config.signature, self.config.name
        if not isinstance(episode, Episode):
            raise SignatureError(f"table {name!r}: expected an Episode, got {type(episode).__name__}")
        if sig.cameras and sorted(episode.cameras) != sorted(sig.cameras):
            raise SignatureError(f"table {name!r}: episode cameras {sorted(episode.cameras)} do not match the signature {sorted(sig.cameras)}")
        if sig.proprio_dim is not None and episode.proprio.shape[1] != sig.proprio_dim:
            raise SignatureError(f"table {name!r}: proprio has {episode.proprio.shape[1]} dims, the signature says {sig.proprio_dim}")
        if sig.action_dim is not None and episode.actions.shape[1] != sig.action_dim:
            raise SignatureError(f"table {name!r}: actions have {episode.actions.shape[1]} dims, the signature says {sig.action_dim}")
        if sig.image_shape is not None:
            for cam, seq in episode.images.items():
                if list(seq.shape) != list(sig.image_shape):
                    raise SignatureError(f"table {name!r}: camera {cam!r} frames are {list(seq.shape)}, the signature says {list(sig.image_shape)}")
        items = len(episode.sample_steps(self.config.window))
        if items == 0:
            raise SignatureError(f"table {name!r}: episode {episode.episode_id} has no step with frames at t and t + {self.config.window}")
        if items > self.config.max_items:
            raise SignatureError(f"table {name!r}: an episode of {items} items exceeds max_items {self.config.max_items}")
        if episode.episode_id in self.episodes:
            raise SignatureError(f"table {name!r}: episode {episode.episode_id} is already in the table")

    # ---- rate limiting -----------------------------------------------------------------
    def _diff(self) -> float:
        return self.counters.inserted_items * self.config.rate_limiter.samples_per_insert - self.counters.sampled_items

    def _can_insert(self) -> bool:
        rl = self.config.rate_limiter
        if rl.kind == "min_size":
            return True
        # Let an episode in while the inserter is not yet a whole item ahead of the allowed band.
        return self._diff() + rl.samples_per_insert <= rl.bounds()[1]

    def _can_sample(self, n: int) -> bool:
        rl = self.config.rate_limiter
        if self.items < max(rl.min_size, 1):
            return False
        return rl.kind == "min_size" or self._diff() - n >= rl.bounds()[0]

    def _wait(self, ready, timeout: float | None, what: str, counter: str) -> None:
        """Wait (holding ``cond``) until ``ready()``; the time spent counts as blocked, timeouts too."""
        start = self.clock()
        deadline = None if timeout is None else start + timeout
        try:
            while not ready():
                remaining = None if deadline is None else deadline - self.clock()
                if remaining is not None and remaining <= 0:
                    rl = self.config.rate_limiter
                    raise ReplayTimeout(
                        f"table {self.config.name!r}: {what} blocked for {timeout:.3g} s by the {rl.kind} rate limiter "
                        f"(items {self.items}, inserted {self.counters.inserted_items}, sampled {self.counters.sampled_items}, "
                        f"allowed inserts*{rl.samples_per_insert:g} - samples in {rl.bounds()})"
                    )
                self.cond.wait(remaining)
        finally:
            setattr(self.counters, counter, getattr(self.counters, counter) + self.clock() - start)

    def wait_for_insert(self, timeout: float | None = None) -> None:
        """Block while the rate limiter holds inserts back (call before writing the episode file)."""
        with self.cond:
            self._wait(self._can_insert, timeout, "insert", "blocked_insert_s")

    # ---- insert / remove ---------------------------------------------------------------
    def add(self, episode: Episode, priorities: np.ndarray | float = 1.0, times_sampled: np.ndarray | None = None,
            count_insert: bool = True) -> list[str]:
        """Add an episode's items; returns the ids of episodes evicted to make room.

        ``priorities`` is one value, or one per episode step (steps that are not items are
        ignored); ``times_sampled`` (restore) is one count per item.
        """
        self.check_signature(episode)
        steps = episode.sample_steps(self.config.window)
        t = len(steps)
        given = np.asarray(priorities, dtype=np.float64)
        pr = (given[steps] if given.ndim == 1 and len(given) == episode.num_steps else np.broadcast_to(given, (t,))).copy()
        if np.any(pr < 0) or not np.all(np.isfinite(pr)):
            raise InputError(f"table {self.config.name!r}: priorities must be finite and >= 0")
        with self.cond:
            evicted = self._make_room(t, episode.nbytes)
            slots = np.array([self.free.popleft() for _ in range(t)], dtype=np.int64)
            for s, step in zip(slots, steps):
                self.slot_episode[s] = episode.episode_id
                self.slot_step[s] = step
            self.priority[slots] = pr
            self.times_sampled[slots] = 0 if times_sampled is None else times_sampled
            self.tree.set(slots, self._weights(pr))
            self.episodes[episode.episode_id] = _Entry(episode, steps, slots, self.seq, self.clock(), episode.nbytes, t)
            self.seq += 1
            self.items += t
            self.nbytes += episode.nbytes
            if count_insert:
                self.counters.inserted_items += t
                self.counters.inserted_episodes += 1
            self.cond.notify_all()
            return evicted

    def _weights(self, priorities: np.ndarray) -> np.ndarray:
        if self.config.sampler == "prioritized":
            return np.power(priorities, self.config.priority_exponent)
        return np.ones_like(priorities)

    def _make_room(self, items: int, nbytes: int) -> list[str]:
        cfg = self.config
        evicted = []
        while self.episodes and (
            self.items + items > cfg.max_items or (cfg.max_bytes is not None and self.nbytes + nbytes > cfg.max_bytes)
        ):
            oldest = next(iter(self.episodes))  # FIFO remover: the oldest episode leaves first
            self._drop_episode(oldest)
            evicted.append(oldest)
        return evicted

    def _drop_episode(self, episode_id: str) -> None:
        entry = self.episodes.pop(episode_id)
        live = entry.slots[[self.slot_episode[s] == episode_id for s in entry.slots]]
        self._free_slots(live)
        self.nbytes -= entry.nbytes
        self.counters.evicted_episodes += 1

    def _free_slots(self, slots: np.ndarray) -> None:
        if len(slots) == 0:
            return
        self.tree.set(slots, np.zeros(len(slots)))
        for s in slots:
            self.slot_episode[s] = None
            self.free.append(int(s))
        self.items -= len(slots)

    def remove_expired(self) -> list[str]:
        """The age remover: episodes inserted more than ``max_age_s`` ago leave."""
        if self.config.remover != "age":
            return []
        with self.cond:
            now, gone = self.clock(), []
            for eid, entry in list(self.episodes.items()):
                if now - entry.inserted_at > self.config.max_age_s:  # type: ignore[operator]
                    self._drop_episode(eid)
                    gone.append(eid)
            return gone

    # ---- sampling ----------------------------------------------------------------------
    def sample(self, n: int, rng: np.random.Generator, timeout: float | None = None) -> tuple[list[SampledItem], list[str]]:
        """``n`` items by the table's selector; also returns episodes that left (all items used up)."""
        if n < 1:
            raise InputError(f"sample: expected n >= 1, got {n}")
        gone = self.remove_expired()
        with self.cond:
            self._wait(lambda: self._can_sample(n), timeout, f"sample of {n}", "blocked_sample_s")
            slots, probs = self._select(n, rng)
            self.times_sampled[slots] += 1
            items = []
            for s, p in zip(slots, probs):
                eid = self.slot_episode[s]
                entry = self.episodes[eid]  # type: ignore[index]
                items.append(
                    SampledItem(
                        table=self.config.name, episode_id=eid, step=int(self.slot_step[s]), priority=float(self.priority[s]),  # type: ignore[arg-type]
                        probability=float(p), times_sampled=int(self.times_sampled[s]),
                        window=entry.episode.window(int(self.slot_step[s]), self.config.window),
                    )
                )
            self.counters.sampled_items += n
            gone += self._retire(slots)
            self.cond.notify_all()
            return items, gone

    def _select(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self.config.sampler == "fifo":
            slots = []
            for entry in self.episodes.values():  # oldest episode first, steps in order
                live = [s for s in entry.slots if self.slot_episode[s] == entry.episode.episode_id]
                slots.extend(live[: n - len(slots)])
                if len(slots) == n:
                    break
            slots = (slots * (n // max(1, len(slots)) + 1))[:n] if slots else slots
            return np.array(slots, dtype=np.int64), np.full(n, 1.0 / max(1, self.items))
        total = self.tree.total
        targets = rng.random(n) * total
        slots = np.minimum(self.tree.find(targets), self.tree.size - 1)
        return slots, self.tree.get(slots) / total

    def _retire(self, slots: np.ndarray) -> list[str]:
        limit = self.config.max_times_sampled
        if limit is None:
            return []
        done = np.unique(slots[self.times_sampled[slots] >= limit])
        done = np.array([s for s in done if self.slot_episode[s] is not None], dtype=np.int64)
        owners = {self.slot_episode[s] for s in done}
        self._free_slots(done)
        gone = []
        for eid in owners:
            entry = self.episodes[eid]  # type: ignore[index]
            entry.live = int(sum(self.slot_episode[s] == eid for s in entry.slots))
            if entry.live == 0:
                self.episodes.pop(eid)  # type: ignore[arg-type]
                self.nbytes -= entry.nbytes
                gone.append(eid)  # type: ignore[arg-type]
        return gone

    def update_priorities(self, keys: Iterable[tuple[str, int]], priorities: Iterable[float]) -> int:
        """Set the priority of (episode_id, step) items still in the table; returns how many were found."""
        found = 0
        with self.cond:
            for (eid, step), p in zip(keys, priorities):
                if not math.isfinite(p) or p < 0:
                    raise InputError(f"update_priorities: priority of ({eid}, {step}) must be finite and >= 0, got {p}")
                entry = self.episodes.get(eid)
                s = None if entry is None else entry.slot_of(int(step))
                if s is None or self.slot_episode[s] != eid:
                    continue
                self.priority[s] = p
                self.tree.set(np.array([s]), self._weights(np.array([p])))
                found += 1
        return found

    # ---- state -------------------------------------------------------------------------
    def episode_ids(self) -> list[str]:
        """Ids of the episodes in the table, oldest first."""
        with self.cond:
            return list(self.episodes)

    def weight(self) -> float:
        """How much of the table's sampling mass this shard holds (items, or total priority)."""
        with self.cond:
            return self.tree.total if self.config.sampler == "prioritized" else float(self.items)

    def state(self) -> dict:
        """What a checkpoint keeps besides the episode files: order, priorities, counters."""
        with self.cond:
            eps = []
            for eid, entry in self.episodes.items():
                live = [self.slot_episode[s] == eid for s in entry.slots]
                eps.append({
                    "episode_id": eid,
                    "priorities": self.priority[entry.slots].tolist(),
                    "times_sampled": self.times_sampled[entry.slots].tolist(),
                    "live": live,
                })
            c = self.counters
            return {"episodes": eps, "inserted_items": c.inserted_items, "sampled_items": c.sampled_items}

    def stats(self) -> dict[str, float]:
        with self.cond:
            c = self.counters
            elapsed = max(1e-9, time.monotonic() - c.started)
            by_source = collections.Counter(e.episode.source.value for e in self.episodes.values())
            versions = [e.episode.policy_version for e in self.episodes.values() if e.episode.policy_version is not None]
            return {
                "items": self.items,
                "episodes": len(self.episodes),
                "bytes": self.nbytes,
                **{f"episodes_{k}": v for k, v in sorted(by_source.items())},
                "episodes_success": sum(e.episode.success for e in self.episodes.values()),
                "episodes_failure": sum(not e.episode.success for e in self.episodes.values()),
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
