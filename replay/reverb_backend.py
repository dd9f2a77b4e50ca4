"""The replay client API on a DeepMind Reverb server (``dm-reverb`` 0.14, the optional ``reverb`` extra).

``ReverbReplay`` owns a ``reverb.Server`` in a child process and talks to it over gRPC on
127.0.0.1. Reverb stores the data, selects items (uniform, prioritized, FIFO), removes the oldest
items when a table is full, enforces its rate limiters and checkpoints its tables; the service
around it (this module, in the caller's process) keeps a small book per table (which episodes
and steps are in it, their priorities, the Reverb keys it has seen) and supplies what Reverb
lacks. Its semantics are those of ``LocalReplay`` / ``RayReplay``, with the exceptions named below.

Layout. One Reverb item per episode step. An episode is appended step by step to a
``TrajectoryWriter`` (per step: the JPEG bytes of every camera as a ``tf.string`` vector, proprio,
the action; at step 0 only: the episode's facts), then one item per step is created over
slices of that history: the frames and proprio at t and at min(t + K, T - 1), the actions
a[t : t + K] (padded with the last action when sampled) and the facts. Items of one episode
share the chunks; a sample yields exactly the step's ``StepWindow``. Every table gets a Reverb
signature (dimensions our ``Signature`` leaves open stay open).

Emulated in the service, because Reverb 0.14 lacks it:
- Episode-granular admission. Reverb's rate limiters admit item by item, ours admit an
  episode whole (while the inserter is not yet a whole item past the band) and a sample batch
  whole, so an episode is never left half inserted and a batch never half drawn. The service
  waits (condition variable, timeout -> ``ReplayTimeout`` with the in-process wording, blocked
  time counted) on counters that mirror Reverb's limiter (inserted items, draws). Reverb's
  table carries the same limiter, ``MinSize(min_size)`` or ``SampleToInsertRatio(samples_per_insert,
  min_size, error_buffer)`` with the band given as (min_diff, max_diff) and widened by what
  whole-episode admission can overshoot: (max_items - 1) * samples_per_insert above, max_items
  below (draws of items the service discards, see tombstones). It therefore never stalls an
  operation the service admitted; if it still does (a Reverb-side limiter timeout,
  ``rate_limiter_timeout_ms`` / DeadlineExceeded), that is reported as ``ReplayTimeout`` too.
  With ``max_times_sampled`` set, Reverb's ``min_size_to_sample`` is 1: items retired during a
  batch must not stall it half way (the service checks ``min_size`` before the batch).
- Whole-episode eviction (FIFO by ``max_items``, ``max_bytes``, the ``age`` remover) and
  per-episode bookkeeping, episode listing, staleness, statistics, signature checks that name
  our fields (the in-process table's own check, same messages).
- Item keys. Reverb's writers generate item keys in C++ and hand them out only with sampled
  items (a maintainer confirms there is no other way: google-deepmind/reverb#125). The service
  learns each (episode, step) -> key from the samples (the item data carries episode id, step
  and an insertion sequence number). So ``update_priorities`` reaches the items sampled at least
  once since they were inserted; an item never sampled is "not found" (the learner updates what
  it sampled, so this is its case). Items of an episode that leaves are deleted by key where the
  key is known; the others become *tombstones*: they are the oldest items, so Reverb's FIFO
  remover (``max_size = max_items``) pushes them out as new items arrive, and one that is drawn
  first is deleted and drawn again for. Rejection leaves the selection distribution over live
  items exact; reported probabilities are corrected for the tombstones' weight. Draws of
  tombstones count against the sample-to-insert ratio, as Reverb counts them. Until they go,
  tombstones take room in Reverb: a table bounded by ``max_bytes`` or the age remover rather
  than by ``max_items`` may hold up to ``max_items`` items on the server, dead ones included.
- ``max_times_sampled`` is Reverb's: an item leaves the moment it reaches the limit, so one
  batch never hands it out more often (the in-process table retires items after the batch).
- ``fifo`` sampler: Reverb's FIFO selector hands out the oldest item on every draw. With
  ``max_times_sampled=1`` (a queue, what it is for) that is the in-process behaviour; without
  it, Reverb hands out the oldest item n times where the in-process table hands out the n
  oldest items in turn.

Durability, as in the other backends: an episode's file is written (``write_episode``, atomic)
before its insert is acknowledged. ``checkpoint()`` is Reverb's checkpoint
(``DefaultCheckpointer``; Reverb keeps the latest) plus the books as JSON, written around it so
that a crash at any point leaves a matching pair. When the server process dies (SIGKILL
included), the next call restarts it: Reverb restores the tables from its checkpoint (same
items, same keys, same order, same limiter counts) and the service re-inserts every episode
file written since (with default priorities), so every acknowledged episode is back; what
happened after the checkpoint (sample counts, priority updates) is lost, as with the other
backends. Where the Reverb checkpoint and the books do not match, or the late files would carry
Reverb's restored limiter past its bound, the tables are rebuilt from the episode files alone
(default priorities; the rate-limiter counts start over, as on a new Reverb server).

Reverb gotchas handled here: its server binds every interface and its Python API has no host
option (clients here connect to 127.0.0.1 only; keep the port firewalled); two servers can hold
one port (gRPC sets SO_REUSEPORT), so the child picks a free port with portpicker and checks in
/proc that no other socket listens on it; ``server.wait()`` blocks Python signal handlers, so
the child sleeps in a loop, stops the server on SIGTERM / SIGINT and also when its parent is
gone; calls to a dead server hang, so every call runs on a daemon thread that the service
abandons when the server process exits; TensorFlow's log noise is cut with
TF_CPP_MIN_LOG_LEVEL=2 in both processes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

SERVER_READY = "REVERB_SERVER_READY"
CHECKPOINTS = "reverb"  # Reverb's own checkpoints, under the replay root
SERVICE_STATE = "reverb-service.json"  # the books matching the latest Reverb checkpoint
PENDING_STATE = "reverb-service.pending.json"  # written just before a Reverb checkpoint is taken


# ---- the server process: standard library and Reverb only ---------------------------------
def item_signature(tf: Any, cameras: int | None, proprio_dim: int | None, action_dim: int | None) -> dict[str, Any]:
    """The structure of one item (a step window); ``None`` leaves a dimension open."""
    spec, s = tf.TensorSpec, tf.string
    return {
        "episode_id": spec([], s),
        "seq": spec([], tf.int64),  # which insertion of the episode: tells a live item from a tombstone
        "step": spec([], tf.int32),
        "num_steps": spec([], tf.int32),
        "cameras": spec([cameras], s),
        "current": spec([cameras], s),
        "future": spec([cameras], s),
        "actions": spec([None, action_dim], tf.float32),  # a[t : t + K], at most K rows
        "proprio": spec([proprio_dim], tf.float32),
        "future_proprio": spec([proprio_dim], tf.float32),
        "instruction": spec([], s),
        "success": spec([], tf.bool),
        "score": spec([], tf.float64),
        "source": spec([], s),
        "policy_version": spec([], tf.int64),
        "has_policy_version": spec([], tf.bool),
        "origin": spec([], s),
        # (cameras, proprio_dim, action_dim): samples are decoded in padded batches, cut back with these
        "dims": spec([3], tf.int32),
    }


def _reverb_table(reverb: Any, tf: Any, spec: dict[str, Any]) -> Any:
    """A ``reverb.Table`` from the plain spec the service wrote (see ``ReverbReplay._server_spec``)."""
    selectors = {
        "uniform": lambda: reverb.selectors.Uniform(),
        "prioritized": lambda: reverb.selectors.Prioritized(priority_exponent=spec["priority_exponent"]),
        "fifo": lambda: reverb.selectors.Fifo(),
    }
    rl = spec["rate_limiter"]
    if rl["kind"] == "min_size":
        limiter = reverb.rate_limiters.MinSize(rl["min_size"])
    else:
        limiter = reverb.rate_limiters.SampleToInsertRatio(
            samples_per_insert=rl["samples_per_insert"],
            min_size_to_sample=rl["min_size"],
            error_buffer=(rl["min_diff"], rl["max_diff"]),
        )
    sig = spec["signature"]
    return reverb.Table(
        name=spec["name"],
        sampler=selectors[spec["sampler"]](),
        remover=reverb.selectors.Fifo(),
        max_size=spec["max_size"],
        max_times_sampled=spec["max_times_sampled"],
        rate_limiter=limiter,
        signature=item_signature(tf, sig["cameras"], sig["proprio_dim"], sig["action_dim"]),
    )


def _listener_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on ``port`` (IPv4 and IPv6) in this network namespace."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _sole_listener(port: int) -> bool:
    """True when every socket listening on ``port`` is this process's (no second server shares it)."""
    mine = set()
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.add(target[len("socket:[") : -1])
    listening = _listener_inodes(port)
    if not os.path.isdir("/proc/net"):
        return True  # nothing to check against (Reverb itself runs on Linux only)
    return bool(listening) and listening <= mine


def serve(spec_path: str) -> int:
    """Run a Reverb server for the spec at ``spec_path`` until SIGTERM / SIGINT or the parent exits."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import portpicker
    import reverb
    import tensorflow as tf

    spec = json.loads(Path(spec_path).read_text())
    parent = os.getppid()
    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    server = None
    for _ in range(8):
        port = portpicker.pick_unused_port()
        server = reverb.Server(
            tables=[_reverb_table(reverb, tf, t) for t in spec["tables"]],
            port=port,
            checkpointer=reverb.checkpointers.DefaultCheckpointer(path=spec["checkpoints"]),
        )
        if _sole_listener(port):
            break
        print(f"reverb server: another socket listens on port {port} too; picking another", file=sys.stderr, flush=True)
        server.stop()
        server = None
    if server is None:
        print("reverb server: found no port that only this server listens on", file=sys.stderr, flush=True)
        return 1
    print(f"{SERVER_READY} {port}", flush=True)
    # Not server.wait(): it blocks Python's signal handlers. Stop when told or orphaned.
    while not stop and os.getppid() == parent:
        time.sleep(0.1)
    server.stop()
    return 0


if __name__ == "__main__":
    # Run as a script (``python -P reverb_backend.py SPEC``), this file is the server process. It
    # stops here, before the imports below pull in the project (torch, diffusers) that a Reverb
    # server has no use for.
    sys.exit(serve(sys.argv[1]))


# ---- the service, in the caller's process ---------------------------------------------------
import collections  # noqa: E402
import heapq  # noqa: E402
import math  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported (by reverb)

import numpy as np  # noqa: E402
import reverb  # noqa: E402
import tensorflow as tf  # noqa: E402

from cosmos_policy.codec import atomic_write_bytes  # noqa: E402
from cosmos_policy.data.episode_file import EpisodeFileError, read_episode, write_episode  # noqa: E402
from cosmos_policy.episode import Episode, Source, StepWindow  # noqa: E402
from cosmos_policy.errors import ConfigError, InputError  # noqa: E402
from replay.config import ReplayConfig, TableConfig  # noqa: E402
from replay.table import ReplayTimeout, SampledItem, Table  # noqa: E402

POLL_S = 0.1  # how often a caller waiting on Reverb looks whether the server process is still alive
STALL_GRACE_S = 10.0  # an admitted write that Reverb holds back this long (past the caller's timeout) has stalled
START_TIMEOUT_S = 300.0  # restoring a large checkpoint takes a while
RETRIES = 3  # server restarts within one call before giving up
# The counters a checkpoint keeps (they move with Reverb's table); the others are this process's statistics.
LIMITER_COUNTERS = ("inserted_items", "draws", "inserted_episodes", "sampled_items", "discarded_draws")


class ReverbServerError(RuntimeError):
    """The Reverb server process could not be started, or keeps dying."""


class _ServerDied(Exception):
    """The server process exited while a call was waiting on it (the call is abandoned)."""


class _Stalled(Exception):
    """A Reverb call outlived the caller's deadline (Reverb blocked something the service admitted)."""


@dataclass
class _Entry:
    """One episode in a table's book. The data is in Reverb; this is what the service needs besides."""

    episode_id: str
    seq: int  # insertion number within the table: Reverb's FIFO order, and which insertion an item belongs to
    num_steps: int
    nbytes: int
    source: str
    success: bool
    policy_version: int | None
    priorities: np.ndarray  # (T,) float64, as set in Reverb
    live: np.ndarray  # (T,) bool: the step's item is still in the table
    keys: dict[int, int] = field(default_factory=dict)  # step -> Reverb item key, learned from samples
    inserted_at: float = field(default_factory=time.monotonic)


@dataclass
class _Counters:
    inserted_items: int = 0  # Reverb's limiter counts these ...
    draws: int = 0  # ... and these: every item Reverb handed out, kept or discarded
    inserted_episodes: int = 0
    sampled_items: int = 0  # items handed to callers
    discarded_draws: int = 0  # tombstones drawn (and deleted)
    rejected: int = 0
    evicted_episodes: int = 0
    blocked_insert_s: float = 0.0
    blocked_sample_s: float = 0.0
    started: float = field(default_factory=time.monotonic)


class _Book:
    """What the service knows about one Reverb table: episodes, tombstones, counters."""

    def __init__(self, config: TableConfig) -> None:
        self.config = config
        self.version = 0
        self.counters = _Counters()
        self.clear()

    def clear(self) -> None:
        """Forget the contents (a restore refills them); the version and the statistics stay."""
        self.episodes: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self.tombstones: dict[tuple[int, int], tuple[int | None, float]] = {}  # (seq, step) -> (key, weight)
        self._tomb_heap: list[tuple[int, int]] = []  # (seq, step), oldest first; entries gone from the dict are skipped
        self.items = 0
        self.nbytes = 0
        self.next_seq = 0
        # Reverb's limiter counts restart from the checkpoint's (or from zero on a rebuild).
        for name in LIMITER_COUNTERS:
            setattr(self.counters, name, 0)

    # -- checks shared with the in-process table ------------------------------------------
    def check_signature(self, episode: Episode) -> None:
        # The in-process table's check, run on this book (it reads ``config`` and ``episodes``),
        # so that both backends reject the same episodes with the same messages.
        Table.check_signature(self, episode)  # type: ignore[arg-type]

    def weight(self, priority: float) -> float:
        if self.config.sampler == "prioritized":
            return float(np.power(priority, self.config.priority_exponent))
        return 1.0

    # -- the rate limiter, at the granularity of episodes and batches -----------------------
    def diff(self) -> float:
        return self.counters.inserted_items * self.config.rate_limiter.samples_per_insert - self.counters.draws

    def can_insert(self) -> bool:
        rl = self.config.rate_limiter
        return rl.kind == "min_size" or self.diff() + rl.samples_per_insert <= rl.bounds()[1]

    def can_sample(self, n: int) -> bool:
        rl = self.config.rate_limiter
        if self.items < max(rl.min_size, 1):
            return False
        return rl.kind == "min_size" or self.diff() - n >= rl.bounds()[0]

    def timeout_error(self, what: str, timeout: float, where: str = "") -> ReplayTimeout:
        rl, c = self.config.rate_limiter, self.counters
        return ReplayTimeout(
            f"table {self.config.name!r}: {what} blocked for {timeout:.3g} s by the {rl.kind} rate limiter{where} "
            f"(items {self.items}, inserted {c.inserted_items}, sampled {c.draws}, "
            f"allowed inserts*{rl.samples_per_insert:g} - samples in {rl.bounds()})"
        )

    # -- Reverb's view: live items plus tombstones, in FIFO order ---------------------------
    @property
    def reverb_size(self) -> int:
        return self.items + len(self.tombstones)

    def tomb(self, seq: int, step: int, key: int | None, weight: float) -> None:
        self.tombstones[(seq, step)] = (key, weight)
        heapq.heappush(self._tomb_heap, (seq, step))

    def oldest_tomb(self) -> tuple[int, int] | None:
        while self._tomb_heap and self._tomb_heap[0] not in self.tombstones:
            heapq.heappop(self._tomb_heap)
        return self._tomb_heap[0] if self._tomb_heap else None

    def known_tomb_keys(self) -> list[int]:
        """Pops the tombstones whose keys are known: those can be deleted in Reverb right away."""
        known = [(k, key) for k, (key, _) in self.tombstones.items() if key is not None]
        for k, _ in known:
            del self.tombstones[k]
        return [key for _, key in known]

    def add(self, entry: _Entry) -> None:
        self.episodes[entry.episode_id] = entry
        self.items += int(entry.live.sum())
        self.nbytes += entry.nbytes

    def drop(self, episode_id: str) -> _Entry:
        """The episode leaves; its items still in Reverb become tombstones (deleted by key where known)."""
        entry = self.episodes.pop(episode_id)
        for step in np.flatnonzero(entry.live):
            self.tomb(entry.seq, int(step), entry.keys.get(int(step)), self.weight(float(entry.priorities[step])))
        self.items -= int(entry.live.sum())
        self.nbytes -= entry.nbytes
        return entry

    def make_room(self, items: int, nbytes: int) -> list[str]:
        """The in-process FIFO remover: the oldest episodes leave until the new one fits."""
        cfg, evicted = self.config, []
        while self.episodes and (
            self.items + items > cfg.max_items or (cfg.max_bytes is not None and self.nbytes + nbytes > cfg.max_bytes)
        ):
            evicted.append(self.drop(next(iter(self.episodes))).episode_id)
            self.counters.evicted_episodes += 1
        return evicted

    def reverb_removes(self, count: int) -> list[str]:
        """Reverb's FIFO remover is about to drop the ``count`` oldest items: follow it in the book.

        Normally those are all tombstones. Should a live episode's item be among them (tombstones
        left in the middle by a restore), that episode leaves whole, so no episode is ever left
        with items missing.
        """
        evicted = []
        while count > 0:
            tomb = self.oldest_tomb()
            oldest = next(iter(self.episodes.values()), None)
            if tomb is not None and (oldest is None or tomb[0] < oldest.seq):
                del self.tombstones[tomb]
                count -= 1
            elif oldest is not None:
                evicted.append(self.drop(oldest.episode_id).episode_id)
                self.counters.evicted_episodes += 1
            else:
                break
        return evicted

    def expired(self, now: float) -> list[str]:
        """The age remover: episodes inserted more than ``max_age_s`` ago leave."""
        if self.config.remover != "age":
            return []
        gone = [eid for eid, e in self.episodes.items() if now - e.inserted_at > self.config.max_age_s]  # type: ignore[operator]
        for eid in gone:
            self.drop(eid)
            self.counters.evicted_episodes += 1
        return gone

    # -- checkpoint -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        c = self.counters
        return {
            "episodes": [
                {
                    "episode_id": e.episode_id, "seq": e.seq, "num_steps": e.num_steps, "nbytes": e.nbytes, "source": e.source,
                    "success": e.success, "policy_version": e.policy_version, "priorities": e.priorities.tolist(),
                    "live": e.live.tolist(), "keys": {str(s): k for s, k in e.keys.items()},
                }
                for e in self.episodes.values()
            ],
            "tombstones": [[seq, step, key, w] for (seq, step), (key, w) in self.tombstones.items()],
            "next_seq": self.next_seq,
            "counters": {k: getattr(c, k) for k in LIMITER_COUNTERS},
        }

    def stats(self, reverb_items: int) -> dict[str, float]:
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
            "reverb_items": reverb_items,  # Reverb's table size: live items plus tombstones not yet gone
            "discarded_draws": c.discarded_draws,
        }


def _priorities(table: str, priority: float | list[float], steps: int) -> np.ndarray:
    """One priority per step, validated as the in-process table validates them."""
    pr = np.broadcast_to(np.asarray(priority, dtype=np.float64), (steps,)).copy()
    if np.any(pr < 0) or not np.all(np.isfinite(pr)):
        raise InputError(f"table {table!r}: priorities must be finite and >= 0")
    return pr


class ReverbReplay:
    """``ReplayClient`` backed by a Reverb server in a child process this object owns."""

    def __init__(self, config: ReplayConfig, root: str | Path | None = None) -> None:
        self.config = config
        self.root = Path(root or config.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._books = {t.name: _Book(t) for t in config.tables}
        self._cond = threading.Condition(threading.RLock())
        self._proc: subprocess.Popen | None = None
        self._client: Any = None
        self._address = ""
        self._log = None
        self.restored: dict[str, int] = {}
        self.restored_from: dict[str, dict[str, int]] = {}  # table -> episodes from the Reverb checkpoint / from files
        self.last_checkpoint = time.monotonic()
        self._signatures: dict[str, dict[str, Any]] = {}
        with self._cond:
            self._with_server(lambda: None)  # starts the server and restores what root holds

    # ---- the client API -------------------------------------------------------------------
    def insert(self, table: str, episode: Episode, priority: float | list[float] = 1.0, timeout: float | None = None) -> str:
        """Store ``episode`` durably in ``table``; returns its id once acknowledged."""
        book = self._book(table)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            try:
                book.check_signature(episode)
                pr = _priorities(table, priority, episode.num_steps)
            except Exception:
                book.counters.rejected += 1
                raise
            self._wait(book, book.can_insert, timeout, "insert", "blocked_insert_s")
            path = write_episode(self._episode_path(table, episode.episode_id), episode)  # durable before the ack
            stall = None if deadline is None else max(deadline, time.monotonic() + STALL_GRACE_S)
            try:
                self._with_server(lambda: self._insert_live(book, episode, pr, stall))
            except _Stalled:
                path.unlink(missing_ok=True)
                self._stop_server()  # Reverb held back what the service admitted: resync from disk
                self._with_server(lambda: None)
                raise book.timeout_error("insert", timeout or 0.0, " on the Reverb server") from None
            except BaseException:
                if episode.episode_id not in book.episodes:
                    path.unlink(missing_ok=True)
                    book.counters.rejected += 1
                raise
            self._cond.notify_all()
            self._maybe_checkpoint()
        return episode.episode_id

    def sample(self, table: str, n: int, timeout: float | None = None) -> list[SampledItem]:
        """``n`` items by the table's selector, all or none; blocks (up to ``timeout``) while rate limited."""
        if n < 1:
            raise InputError(f"sample: expected n >= 1, got {n}")
        book = self._book(table)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            def attempt() -> list[SampledItem]:
                self._expire(book)
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._wait(book, lambda: book.can_sample(n), remaining, f"sample of {n}", "blocked_sample_s", shown=timeout)
                return self._draw_items(book, n, deadline, timeout)

            items = self._with_server(attempt)
            self._cond.notify_all()
        return items

    def update_priorities(self, table: str, keys: list[tuple[str, int]], priorities: list[float]) -> int:
        """Set the priority of (episode_id, step) items; returns how many were found.

        Found: still in the table and sampled at least once since inserted (Reverb gives out an
        item's key only with a sample; see the module docstring).
        """
        book = self._book(table)
        with self._cond:
            def attempt() -> int:
                updates: dict[int, float] = {}
                try:
                    for (eid, step), p in zip(keys, priorities):
                        if not math.isfinite(p) or p < 0:
                            raise InputError(f"update_priorities: priority of ({eid}, {step}) must be finite and >= 0, got {p}")
                        entry = book.episodes.get(eid)
                        if entry is None or not 0 <= step < entry.num_steps or not entry.live[step] or step not in entry.keys:
                            continue
                        updates[entry.keys[step]] = float(p)
                        entry.priorities[step] = float(p)
                finally:
                    if updates:
                        self._call(lambda: self._client.mutate_priorities(table, updates=updates))
                return len(updates)

            return self._with_server(attempt)

    def episode_ids(self, table: str) -> list[str]:
        """Ids of the episodes in the table, oldest first."""
        book = self._book(table)
        with self._cond:
            return list(book.episodes)

    def stats(self) -> dict[str, dict[str, float]]:
        with self._cond:
            info = self._with_server(lambda: self._call(lambda: self._client.server_info()))
            return {name: book.stats(int(info[name].current_size)) for name, book in self._books.items()}

    def checkpoint(self) -> None:
        """Reverb's checkpoint of every table plus the books, as one consistent pair."""
        with self._cond:
            self._with_server(self._checkpoint)

    def set_version(self, version: int) -> None:
        with self._cond:
            for book in self._books.values():
                book.version = int(version)

    def close(self) -> None:
        """Checkpoint and stop the server (a later call starts it again and restores)."""
        with self._cond:
            try:
                self.checkpoint()
            finally:
                self._stop_server()
                if self._log is not None:
                    self._log.close()
                    self._log = None

    def server_pid(self) -> int | None:
        """The Reverb server process (None while none runs)."""
        return None if self._proc is None else self._proc.pid

    @property
    def address(self) -> str:
        """host:port of the Reverb server (it changes on a restart).

        For looking at the server (``server_info``); a Reverb client that inserts or samples past
        this service would leave its books behind.
        """
        return self._address

    # ---- rate limiting ----------------------------------------------------------------------
    def _wait(self, book: _Book, ready: Callable[[], bool], timeout: float | None, what: str, counter: str,
              shown: float | None = None) -> None:
        """Wait (holding ``_cond``) until ``ready()``; the time spent counts as blocked, timeouts too."""
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        try:
            while not ready():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise book.timeout_error(what, shown if shown is not None else timeout)  # type: ignore[arg-type]
                self._cond.wait(remaining)
        finally:
            setattr(book.counters, counter, getattr(book.counters, counter) + time.monotonic() - start)

    # ---- inserting ------------------------------------------------------------------------
    def _insert_live(self, book: _Book, episode: Episode, pr: np.ndarray, deadline: float | None) -> None:
        if episode.episode_id in book.episodes:
            return  # a restart within this call already brought it back from its file
        self._admit(book, episode, pr, deadline)

    def _admit(self, book: _Book, episode: Episode, pr: np.ndarray, deadline: float | None = None) -> None:
        """Make room, write the episode's items to Reverb, enter it in the book (no rate limiting)."""
        name, t = book.config.name, episode.num_steps
        evicted = book.make_room(t, episode.nbytes)
        self._delete_keys(name, book.known_tomb_keys())
        evicted += book.reverb_removes(book.reverb_size + t - book.config.max_items)
        seq = book.next_seq
        book.next_seq += 1
        self._call(lambda: self._write(book, episode, pr, seq), deadline)
        book.add(_Entry(
            episode_id=episode.episode_id, seq=seq, num_steps=t, nbytes=episode.nbytes, source=episode.source.value,
            success=episode.success, policy_version=episode.policy_version, priorities=pr, live=np.ones(t, dtype=bool),
        ))
        book.counters.inserted_items += t
        book.counters.inserted_episodes += 1
        self._delete_keys(name, book.known_tomb_keys())
        self._delete_files(name, evicted)

    def _write(self, book: _Book, episode: Episode, pr: np.ndarray, seq: int) -> None:
        """All steps into a TrajectoryWriter, then one item per step over slices of that history."""
        name, k, t = book.config.name, book.config.window, episode.num_steps
        cams = episode.cameras
        jpegs = [episode.images[c].jpegs for c in cams]
        writer = self._client.trajectory_writer(num_keep_alive_refs=t)
        try:
            for step in range(t):
                data: dict[str, Any] = {
                    "step": np.int32(step),
                    "jpeg": np.array([j[step] for j in jpegs], dtype=object),
                    "proprio": episode.proprio[step],
                    "action": episode.actions[step],
                }
                if step == 0:  # per-episode facts: appended once, referenced by every item
                    data["facts"] = {
                        "episode_id": episode.episode_id,
                        "seq": np.int64(seq),
                        "num_steps": np.int32(t),
                        "cameras": np.array(cams, dtype=object),
                        "instruction": episode.instruction,
                        "success": np.bool_(episode.success),
                        "score": np.float64(episode.score),
                        "source": episode.source.value,
                        "policy_version": np.int64(episode.policy_version or 0),
                        "has_policy_version": np.bool_(episode.policy_version is not None),
                        "origin": str(episode.metadata.get("file", "")),
                        "dims": np.array([len(cams), episode.proprio.shape[1], episode.actions.shape[1]], dtype=np.int32),
                    }
                writer.append(data)
            h, facts = writer.history, writer.history["facts"]
            for step in range(t):
                future = min(step + k, t - 1)
                stop = step + k if step + k < t else None  # the history's slices need None to reach the end
                item = {name_: facts[name_][0] for name_ in facts}
                item.update({
                    "step": h["step"][step], "current": h["jpeg"][step], "future": h["jpeg"][future],
                    "actions": h["action"][step:stop], "proprio": h["proprio"][step], "future_proprio": h["proprio"][future],
                })
                writer.create_item(name, float(pr[step]), item)
            writer.flush()
            writer.end_episode()
        finally:
            writer.close()

    # ---- sampling ---------------------------------------------------------------------------
    def _expire(self, book: _Book) -> None:
        gone = book.expired(time.monotonic())
        if gone:
            self._delete_keys(book.config.name, book.known_tomb_keys())
            self._delete_files(book.config.name, gone)

    def _draw_items(self, book: _Book, n: int, deadline: float | None, timeout: float | None) -> list[SampledItem]:
        """Draw until ``n`` live items: tombstones drawn on the way are deleted and drawn again for."""
        name, limit = book.config.name, book.config.max_times_sampled
        items: list[SampledItem] = []
        discard: list[int] = []
        retired: list[str] = []
        try:
            while len(items) < n:
                want = n - len(items)
                timeout_ms = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
                started = time.monotonic()
                drawn = self._call(lambda count=want, ms=timeout_ms: self._draw(name, count, ms))
                for info, data in drawn:
                    book.counters.draws += 1
                    eid, seq, step = data["episode_id"].decode(), int(data["seq"]), int(data["step"])
                    entry = book.episodes.get(eid)
                    if entry is None or entry.seq != seq or not entry.live[step]:  # a tombstone
                        book.tombstones.pop((seq, step), None)
                        book.counters.discarded_draws += 1
                        discard.append(info["key"])
                        continue
                    entry.keys[step] = info["key"]
                    items.append(self._sampled_item(book, entry, info, data))
                    if limit is not None and info["times_sampled"] >= limit:  # Reverb has removed it
                        entry.live[step] = False
                        entry.keys.pop(step, None)
                        book.items -= 1
                        if not entry.live.any():
                            book.episodes.pop(eid)
                            book.nbytes -= entry.nbytes
                            retired.append(eid)
                if len(drawn) < want:  # Reverb's limiter held the rest back past rate_limiter_timeout_ms
                    book.counters.blocked_sample_s += time.monotonic() - started
                    raise book.timeout_error(f"sample of {n}", timeout or 0.0, " on the Reverb server")
        finally:
            self._delete_keys(name, discard)
            self._delete_files(name, retired)
        book.counters.sampled_items += n
        return items

    def _draw(self, table: str, count: int, timeout_ms: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """``count`` items from Reverb (fewer when its rate limiter times out); runs on the worker thread.

        Decoded as one padded batch (4x faster than item by item), then each row is cut back to
        its own shape with its ``dims``.
        """
        spec, window = self._signatures[table], self._books[table].config.window
        dataset = reverb.TrajectoryDataset(
            self._address, table,
            dtypes={k: s.dtype for k, s in spec.items()}, shapes={k: s.shape for k, s in spec.items()},
            max_in_flight_samples_per_worker=min(count, 256), num_workers_per_iterator=1,  # one worker: FIFO order holds
            rate_limiter_timeout_ms=timeout_ms, max_samples=count,
        )
        rows = []
        for batch in dataset.padded_batch(count).as_numpy_iterator():
            info, data = batch.info, batch.data
            for i in range(len(info.key)):
                (cams, proprio_dim, action_dim), step, t = data["dims"][i], int(data["step"][i]), int(data["num_steps"][i])
                row = {k: v[i] for k, v in data.items()}
                row.update({
                    "cameras": data["cameras"][i, :cams],
                    "current": data["current"][i, :cams], "future": data["future"][i, :cams],
                    "actions": data["actions"][i, : min(window, t - step), :action_dim],
                    "proprio": data["proprio"][i, :proprio_dim], "future_proprio": data["future_proprio"][i, :proprio_dim],
                })
                meta = {"key": int(info.key[i]), "probability": float(info.probability[i]), "priority": float(info.priority[i]),
                        "times_sampled": int(info.times_sampled[i])}
                rows.append((meta, row))
        return rows

    def _sampled_item(self, book: _Book, entry: _Entry, info: dict[str, Any], data: dict[str, Any]) -> SampledItem:
        cfg = book.config
        step, t = int(data["step"]), int(data["num_steps"])
        cams = [c.decode() for c in data["cameras"]]
        actions = data["actions"]
        if len(actions) < cfg.window:  # the chunk past the episode's end repeats its last action
            actions = np.concatenate([actions, np.repeat(actions[-1:], cfg.window - len(actions), axis=0)], axis=0)
        window = StepWindow(
            episode_id=entry.episode_id, step=step, future_step=min(step + cfg.window, t - 1), num_steps=t,
            current=dict(zip(cams, (bytes(j) for j in data["current"]), strict=True)),
            future=dict(zip(cams, (bytes(j) for j in data["future"]), strict=True)),
            actions=actions, proprio=data["proprio"], future_proprio=data["future_proprio"],
            instruction=data["instruction"].decode(), success=bool(data["success"]), score=float(data["score"]),
            source=Source(data["source"].decode()),
            policy_version=int(data["policy_version"]) if data["has_policy_version"] else None, origin=data["origin"].decode(),
        )
        return SampledItem(
            table=cfg.name, episode_id=entry.episode_id, step=step, priority=info["priority"],
            probability=self._probability(book, info), times_sampled=info["times_sampled"], window=window,
        )

    def _probability(self, book: _Book, info: dict[str, Any]) -> float:
        """The item's selection probability among live items (Reverb's counts the tombstones too)."""
        if book.config.sampler == "fifo":
            return 1.0 / max(1, book.items)
        tomb_weight = sum(w for _, w in book.tombstones.values())
        if tomb_weight <= 0 or info["probability"] <= 0:
            return info["probability"]
        w = book.weight(info["priority"])
        live_weight = w / info["probability"] - tomb_weight
        return w / live_weight if live_weight > 0 else info["probability"]

    # ---- deleting -------------------------------------------------------------------------
    def _delete_keys(self, table: str, keys: list[int]) -> None:
        if keys:
            self._call(lambda: self._client.mutate_priorities(table, deletes=list(keys)))

    def _delete_files(self, table: str, episode_ids: list[str]) -> None:
        for eid in episode_ids:
            self._episode_path(table, eid).unlink(missing_ok=True)

    # ---- checkpoint and restore ---------------------------------------------------------------
    def _maybe_checkpoint(self) -> None:
        if time.monotonic() - self.last_checkpoint >= self.config.checkpoint_every_s:
            self.checkpoint()

    def _checkpoint(self) -> None:
        state = {"version": 1, "tables": {name: book.state() for name, book in self._books.items()}}
        # The books first (a Reverb checkpoint without its books is unusable), then Reverb's
        # checkpoint, then the books again naming it: a crash anywhere leaves a matching pair.
        atomic_write_bytes(self.root / PENDING_STATE, json.dumps(state).encode())
        path = self._call(self._client.checkpoint)
        state["reverb_checkpoint"] = Path(path).name
        atomic_write_bytes(self.root / SERVICE_STATE, json.dumps(state).encode())
        (self.root / PENDING_STATE).unlink(missing_ok=True)
        self.last_checkpoint = time.monotonic()

    def _latest_reverb_checkpoint(self) -> str | None:
        folder = self.root / CHECKPOINTS
        done = sorted(p.name for p in folder.iterdir() if (p / "DONE").exists()) if folder.is_dir() else []
        return done[-1] if done else None

    def _saved_state(self) -> dict[str, Any] | None:
        """The books that match Reverb's latest checkpoint, or None when there is no such pair."""
        latest = self._latest_reverb_checkpoint()
        final, pending = self._read_json(self.root / SERVICE_STATE), self._read_json(self.root / PENDING_STATE)
        chosen = None
        if latest is not None and final is not None and final.get("reverb_checkpoint") == latest:
            chosen = final
        elif latest is not None and pending is not None:  # Reverb's checkpoint finished, the final books were not written
            chosen = {**pending, "reverb_checkpoint": latest}
            atomic_write_bytes(self.root / SERVICE_STATE, json.dumps(chosen).encode())
        (self.root / PENDING_STATE).unlink(missing_ok=True)
        return chosen

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _restore(self) -> None:
        """(Re)start the server from Reverb's checkpoint and the books, then re-insert the files written since."""
        self._stop_server()
        learned = {name: {e.episode_id: (e.seq, dict(e.keys)) for e in b.episodes.values()} for name, b in self._books.items()}
        for name in self._books:
            folder = self.root / name
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob(".*.tmp"):  # an insert that died before its rename was never acknowledged
                stale.unlink(missing_ok=True)
        folder = self.root / CHECKPOINTS
        for unfinished in (p for p in folder.iterdir() if not (p / "DONE").exists()) if folder.is_dir() else []:
            shutil.rmtree(unfinished, ignore_errors=True)  # a Reverb checkpoint cut short
        saved = self._saved_state()
        if saved is not None and not self._warm_restore_fits(saved):
            saved = None
        if saved is None:
            shutil.rmtree(folder, ignore_errors=True)  # no matching books: rebuild from the episode files
        self._start_server()
        if saved is not None and not self._server_matches(saved):
            self._stop_server()
            shutil.rmtree(folder, ignore_errors=True)
            saved = None
            self._start_server()
        for name, book in self._books.items():
            book.clear()
            state = None if saved is None else saved["tables"][name]
            from_checkpoint = self._restore_book(book, state, learned[name])
            late = [p for p in (self.root / name).glob("*.hdf5") if p.stem not in book.episodes]
            files = 0
            for path in sorted(late, key=lambda p: p.stat().st_mtime):
                ep = self._read(path)
                if ep is None or ep.episode_id in book.episodes:
                    continue
                self._admit(book, ep, _priorities(name, 1.0, ep.num_steps))
                files += 1
            self.restored[name] = len(book.episodes)
            self.restored_from[name] = {"checkpoint": len(from_checkpoint), "files": files}

    def _restore_book(self, book: _Book, state: dict[str, Any] | None,
                      learned: dict[str, tuple[int, dict[int, int]]]) -> list[str]:
        """Fill ``book`` from its saved state; episodes whose file is gone become tombstones. Returns the ids restored."""
        if state is None:
            return []
        name, restored = book.config.name, []
        for e in state["episodes"]:
            keys = {int(s): int(k) for s, k in e["keys"].items()}
            seq_now, keys_now = learned.get(e["episode_id"], (None, {}))
            if seq_now == e["seq"]:  # keys learned since the checkpoint still name the same Reverb items
                keys.update(keys_now)
            entry = _Entry(
                episode_id=e["episode_id"], seq=e["seq"], num_steps=e["num_steps"], nbytes=e["nbytes"], source=e["source"],
                success=e["success"], policy_version=e["policy_version"],
                priorities=np.asarray(e["priorities"], dtype=np.float64), live=np.asarray(e["live"], dtype=bool), keys=keys,
            )
            book.add(entry)
            if self._episode_path(name, entry.episode_id).exists():
                restored.append(entry.episode_id)
            else:  # left after the checkpoint (evicted or used up): its items are tombstones now
                book.drop(entry.episode_id)
        for seq, step, key, weight in state["tombstones"]:
            book.tomb(seq, step, key, weight)
        book.next_seq = state["next_seq"]
        for k, v in state["counters"].items():
            setattr(book.counters, k, v)
        self._delete_keys(name, book.known_tomb_keys())
        return restored

    def _warm_restore_fits(self, saved: dict[str, Any]) -> bool:
        """Whether re-inserting the files written since the checkpoint stays inside Reverb's restored limiter."""
        for name, book in self._books.items():
            state = saved.get("tables", {}).get(name)
            if state is None:
                return False
            rl = book.config.rate_limiter
            if rl.kind == "min_size":
                continue
            known = {e["episode_id"] for e in state["episodes"]}
            late_items = 0
            for path in (self.root / name).glob("*.hdf5"):
                if path.stem not in known:
                    ep = self._read(path)
                    late_items += 0 if ep is None else ep.num_steps
            c = state["counters"]
            if (c["inserted_items"] + late_items) * rl.samples_per_insert - c["draws"] > self._limiter(book.config)["max_diff"]:
                return False
        return True

    def _server_matches(self, saved: dict[str, Any]) -> bool:
        """Whether the restored Reverb tables are the configured ones and hold what the books say."""
        info = self._call(lambda: self._client.server_info())
        if set(info) != set(self._books):
            return False
        for name, book in self._books.items():
            table, state, spec = info[name], saved["tables"][name], self._table_spec(book.config)
            rl, lim = table.rate_limiter_info, spec["rate_limiter"]
            size = sum(sum(e["live"]) for e in state["episodes"]) + len(state["tombstones"])
            expected = (spec["max_size"], spec["max_times_sampled"], float(lim.get("min_diff", -sys.float_info.max)),
                        float(lim.get("max_diff", sys.float_info.max)), lim["min_size"], size)
            found = (table.max_size, table.max_times_sampled, rl.min_diff, rl.max_diff, rl.min_size_to_sample, table.current_size)
            if expected != found:
                return False
        return True

    @staticmethod
    def _read(path: Path) -> Episode | None:
        try:
            return read_episode(path)
        except EpisodeFileError as exc:  # a file that cannot be read was never a complete, acknowledged insert
            bad = path.with_suffix(".corrupt")
            os.replace(path, bad)
            print(f"replay restore: moved unreadable {path} aside to {bad} ({exc})", flush=True)
            return None

    # ---- the server process ---------------------------------------------------------------
    @staticmethod
    def _limiter(cfg: TableConfig) -> dict[str, Any]:
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

    def _table_spec(self, cfg: TableConfig) -> dict[str, Any]:
        sig = cfg.signature
        return {
            "name": cfg.name, "sampler": cfg.sampler, "priority_exponent": cfg.priority_exponent, "max_size": cfg.max_items,
            "max_times_sampled": cfg.max_times_sampled or 0, "rate_limiter": self._limiter(cfg),
            "signature": {"cameras": len(sig.cameras) or None, "proprio_dim": sig.proprio_dim, "action_dim": sig.action_dim},
        }

    def _start_server(self) -> None:
        spec = {"tables": [self._table_spec(t) for t in self.config.tables],
                "checkpoints": str((self.root / CHECKPOINTS).resolve())}
        spec_path = self.root / "reverb-server.json"
        atomic_write_bytes(spec_path, json.dumps(spec).encode())
        self._signatures = {t["name"]: item_signature(tf, **t["signature"]) for t in spec["tables"]}
        if self._log is None:
            self._log = open(self.root / "reverb-server.log", "ab")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        # -P: the script's folder (replay/, with config.py, client.py...) must not shadow modules.
        proc = subprocess.Popen([sys.executable, "-P", str(Path(__file__).resolve()), str(spec_path)], stdout=subprocess.PIPE,
                                stderr=self._log, env=env, start_new_session=True)
        port = self._await_ready(proc)
        self._proc = proc
        self._address = f"127.0.0.1:{port}"
        self._client = reverb.Client(self._address)

    def _await_ready(self, proc: subprocess.Popen) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        assert proc.stdout is not None
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], POLL_S)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                line += chunk
                if b"\n" in line:
                    first = line.split(b"\n", 1)[0].decode(errors="replace")
                    if first.startswith(SERVER_READY):
                        return int(first.split()[1])
                    break
                if not chunk:
                    break
            if proc.poll() is not None and not ready:
                break
        proc.kill()
        proc.wait()
        raise ReverbServerError(f"the Reverb server did not start (see {self.root / 'reverb-server.log'}):\n{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.root / "reverb-server.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _stop_server(self) -> None:
        """Stop the server process (SIGTERM, then SIGKILL) and abandon calls still waiting on it."""
        proc, self._proc = self._proc, None
        self._client = None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def _ensure_server(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self._restore()

    def _with_server(self, op: Callable[[], Any]) -> Any:
        """Run ``op`` against a live server; when the server dies under it, restore and run it again."""
        for _ in range(RETRIES):
            try:
                self._ensure_server()
                return op()
            except _ServerDied:
                continue
        raise ReverbServerError(
            f"the Reverb server died {RETRIES} times in one call (see {self.root / 'reverb-server.log'}):\n{self._log_tail()}"
        )

    def _call(self, fn: Callable[[], Any], deadline: float | None = None) -> Any:
        """Run a Reverb call on a daemon thread while watching the server process.

        A call to a dead server hangs (gRPC keeps reconnecting), so the caller gives up on it when
        the process exits and the thread is left behind; a daemon thread, unlike an executor's
        worker, does not hold up the interpreter's exit.
        """
        proc = self._proc
        assert proc is not None
        outcome: list[tuple[bool, Any]] = []

        def run() -> None:
            try:
                outcome.append((True, fn()))
            except BaseException as exc:  # handed to the caller below
                outcome.append((False, exc))

        worker = threading.Thread(target=run, name="reverb-call", daemon=True)
        worker.start()
        while not outcome:
            worker.join(POLL_S)
            if outcome:
                break
            if proc.poll() is not None:
                self._stop_server()
                raise _ServerDied()
            if deadline is not None and time.monotonic() > deadline:
                raise _Stalled()
        ok, value = outcome[0]
        if ok:
            return value
        # A dying server can fail a call a moment before its process is gone: look again, briefly.
        try:
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            raise value from None
        self._stop_server()
        raise _ServerDied() from value

    def _book(self, table: str) -> _Book:
        if table not in self._books:
            raise ConfigError(f"replay: no table {table!r}; tables are {sorted(self._books)}")
        return self._books[table]

    def _episode_path(self, table: str, episode_id: str) -> Path:
        return self.root / table / f"{episode_id}.hdf5"

    def __del__(self) -> None:
        try:
            self._stop_server()
        except Exception:
            pass
