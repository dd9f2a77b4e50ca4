"""The replay client API on a DeepMind Reverb server (``dm-reverb`` 0.14, the optional ``reverb`` extra).

``ReverbReplay`` owns a ``reverb.Server`` in a child process (``replay.reverb_process``) and talks
to it over gRPC on 127.0.0.1. Reverb stores the data (``replay.reverb_items``: one item per step),
selects items (uniform, prioritized, FIFO), removes the oldest items when a table is full,
enforces its rate limiters and checkpoints its tables; the service around it (this module, in
the caller's process: a test, a tool, or a ``replay.ray_backend.ReplayShard``) keeps the shared
``replay.book.Book`` per table (``replay.reverb_book.ReverbBook``) and supplies what Reverb lacks.
Its semantics are those of ``LocalReplay`` / ``RayReplay``, with the exceptions named below.

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

Durability, as in the other backends: an episode's file is written (``replay.files``) before its
insert is acknowledged. ``checkpoint()`` is Reverb's checkpoint plus the books
(``replay.reverb_restore``). When the server process dies (SIGKILL included), the next call
restarts it: Reverb restores the tables from its checkpoint (same items, same keys, same order,
same limiter counts) and the service re-inserts every episode file written since (with default
priorities), so every acknowledged episode is back; what happened after the checkpoint (sample
counts, priority updates) is lost, as with the other backends. Where the Reverb checkpoint and
the books do not match, or the late files would carry Reverb's restored limiter past its bound,
the tables are rebuilt from the episode files alone (default priorities; the rate-limiter counts
start over, as on a new Reverb server).
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from cosmos_policy.contracts import SampledItem  # noqa: E402
from cosmos_policy.episode import Episode  # noqa: E402
from cosmos_policy.errors import ConfigError, InputError  # noqa: E402
from replay import reverb_restore  # noqa: E402
from replay.config import ReplayConfig  # noqa: E402
from replay.files import EpisodeFiles  # noqa: E402
from replay.reverb_book import ReverbBook, ReverbEntry, table_spec  # noqa: E402
from replay.reverb_items import draw, step_window, write_items  # noqa: E402
from replay.reverb_process import ReverbServerError, ReverbServerProcess, ServerDied, Stalled  # noqa: E402
from replay.reverb_server import item_signature  # noqa: E402

__all__ = ["ReverbReplay", "ReverbServerError"]

STALL_GRACE_S = 10.0  # an admitted write that Reverb holds back this long (past the caller's timeout) has stalled
RETRIES = 3  # server restarts within one call before giving up


class ReverbReplay:
    """``ReplayClient`` backed by a Reverb server in a child process this object owns."""

    def __init__(self, config: ReplayConfig, root: str | Path | None = None) -> None:
        self.config = config
        self.root = Path(root or config.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.files = EpisodeFiles(self.root)
        self._cond = threading.Condition(threading.RLock())
        self._books = {t.name: ReverbBook(t, self._cond) for t in config.tables}
        self._specs = [table_spec(t) for t in config.tables]
        self._signatures = {t["name"]: item_signature(tf, **t["signature"]) for t in self._specs}
        self._server = ReverbServerProcess(self.root)
        self.restored: dict[str, int] = {}
        self.restored_from: dict[str, dict[str, int]] = {}  # table -> episodes from the Reverb checkpoint / from files
        self.last_checkpoint = time.monotonic()
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
                pr = book.item_priorities(episode, priority, np.arange(episode.num_steps))
            except Exception:
                book.counters.add("rejected", 1)
                raise
            book.wait(book.can_insert, timeout, "insert", "blocked_insert_s")
            path = self.files.write(table, episode)  # durable before the ack
            stall = None if deadline is None else max(deadline, time.monotonic() + STALL_GRACE_S)
            try:
                self._with_server(lambda: self._insert_live(book, episode, pr, stall))
            except Stalled:
                path.unlink(missing_ok=True)
                self._server.stop()  # Reverb held back what the service admitted: resync from disk
                self._with_server(lambda: None)
                raise book.timeout_error("insert", timeout or 0.0, " on the Reverb server") from None
            except BaseException:
                if episode.episode_id not in book.episodes:
                    path.unlink(missing_ok=True)
                    book.counters.add("rejected", 1)
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
                book.wait(lambda: book.can_sample(n), remaining, f"sample of {n}", "blocked_sample_s", shown=timeout)
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
                        if entry is None or not 0 <= step < len(entry.live) or not entry.live[step] or step not in entry.keys:
                            continue
                        updates[entry.keys[step]] = float(p)
                        book.set_priority(entry, step, float(p))
                finally:
                    if updates:
                        self._server.call(lambda: self._server.client.mutate_priorities(table, updates=updates))
                return len(updates)

            return self._with_server(attempt)

    def episode_ids(self, table: str) -> list[str]:
        """Ids of the episodes in the table, oldest first."""
        return self._book(table).episode_ids()

    def weight(self, table: str) -> float:
        """This server's share of the table's sampling mass (live items, or their total priority)."""
        return self._book(table).weight()

    def stats(self) -> dict[str, dict[str, float]]:
        with self._cond:
            info = self._with_server(lambda: self._server.call(lambda: self._server.client.server_info()))
            return {name: {**book.stats(), "reverb_items": int(info[name].current_size),  # live items plus tombstones
                           "discarded_draws": book.counters.discarded_draws} for name, book in self._books.items()}

    def checkpoint(self) -> Path:
        """Reverb's checkpoint of every table plus the books, as one consistent pair."""
        with self._cond:
            path = self._with_server(lambda: reverb_restore.checkpoint(self.root, self._books, self._server))
            self.last_checkpoint = time.monotonic()
            return path

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
                self._server.close()

    def server_pid(self) -> int | None:
        """The Reverb server process (None while none runs)."""
        return self._server.pid

    @property
    def address(self) -> str:
        """host:port of the Reverb server (it changes on a restart).

        For looking at the server (``server_info``); a Reverb client that inserts or samples past
        this service would leave its books behind.
        """
        return self._server.address

    # ---- inserting ------------------------------------------------------------------------
    def _insert_live(self, book: ReverbBook, episode: Episode, pr: np.ndarray, deadline: float | None) -> None:
        if episode.episode_id in book.episodes:
            return  # a restart within this call already brought it back from its file
        self._admit(book, episode, pr, deadline)

    def _admit(self, book: ReverbBook, episode: Episode, pr: np.ndarray, deadline: float | None = None) -> None:
        """Make room, write the episode's items to Reverb, enter it in the book (no rate limiting)."""
        name = book.config.name
        # Items are the steps a training sample can start from (frames at t and t + K), as in the in-process
        # table: an episode recorded with frames at its query steps only has no item in between.
        steps = episode.sample_steps(book.config.window)
        live = np.zeros(episode.num_steps, dtype=bool)
        live[steps] = True
        evicted = book.make_room(len(steps), episode.nbytes)
        self._delete_keys(name, book.known_tomb_keys())
        evicted += book.reverb_removes(book.reverb_size + len(steps) - book.config.max_items)
        seq = book.take_seq()
        self._server.call(lambda: write_items(self._server.client, book.config, episode, pr, seq, steps), deadline)
        entry = ReverbEntry(**ReverbEntry.facts(episode), seq=seq, live=live, priorities=pr)
        book.enter(entry)
        book.count_insert(entry)
        self._delete_keys(name, book.known_tomb_keys())
        self.files.delete(name, evicted)

    # ---- sampling ---------------------------------------------------------------------------
    def _expire(self, book: ReverbBook) -> None:
        gone = book.remove_expired()
        if gone:
            self._delete_keys(book.config.name, book.known_tomb_keys())
            self.files.delete(book.config.name, gone)

    def _draw_items(self, book: ReverbBook, n: int, deadline: float | None, timeout: float | None) -> list[SampledItem]:
        """Draw until ``n`` live items: tombstones drawn on the way are deleted and drawn again for."""
        cfg, limit = book.config, book.config.max_times_sampled
        items: list[SampledItem] = []
        discard: list[int] = []
        retired: list[str] = []
        try:
            while len(items) < n:
                want = n - len(items)
                timeout_ms = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
                started = time.monotonic()
                drawn = self._server.call(
                    lambda count=want, ms=timeout_ms: draw(self._server.address, cfg, self._signatures[cfg.name], count, ms))
                for info, data in drawn:
                    step = int(data["step"])
                    entry = book.on_draw(data["episode_id"].decode(), int(data["seq"]), step, info["key"])
                    if entry is None:  # a tombstone
                        discard.append(info["key"])
                        continue
                    items.append(SampledItem(
                        table=cfg.name, episode_id=entry.episode_id, step=step, priority=info["priority"],
                        probability=book.live_probability(info["priority"], info["probability"]),
                        times_sampled=info["times_sampled"], window=step_window(cfg, data),
                    ))
                    if limit is not None and info["times_sampled"] >= limit and book.retire(entry, [step]):  # Reverb removed it
                        retired.append(entry.episode_id)
                if len(drawn) < want:  # Reverb's limiter held the rest back past rate_limiter_timeout_ms
                    book.counters.add("blocked_sample_s", time.monotonic() - started)
                    raise book.timeout_error(f"sample of {n}", timeout or 0.0, " on the Reverb server")
        finally:
            self._delete_keys(cfg.name, discard)
            self.files.delete(cfg.name, retired)
        book.counters.add("sampled_items", n)
        return items

    def _delete_keys(self, table: str, keys: list[int]) -> None:
        if keys:
            self._server.call(lambda: self._server.client.mutate_priorities(table, deletes=list(keys)))

    # ---- the server's life: checkpoints, restarts and restores ------------------------------
    def _maybe_checkpoint(self) -> None:
        if time.monotonic() - self.last_checkpoint >= self.config.checkpoint_every_s:
            self.checkpoint()

    def _start_server(self) -> None:
        self._server.start(self._specs, self.root / reverb_restore.CHECKPOINTS)

    def _restore(self) -> None:
        """(Re)start the server from Reverb's checkpoint and the books, then re-insert the files written since."""
        self._server.stop()
        learned = {name: book.learned_keys() for name, book in self._books.items()}
        saved = reverb_restore.warm_start(self.root, self._books, self.files)
        self._start_server()
        if saved is not None and not reverb_restore.server_matches(self._server, self._books, saved):
            self._server.stop()
            reverb_restore.discard(self.root)
            saved = None
            self._start_server()
        for name, book in self._books.items():
            book.clear()
            from_checkpoint = [] if saved is None else book.load(
                saved["tables"][name], learned[name], lambda eid, table=name: self.files.path(table, eid).exists())
            self._delete_keys(name, book.known_tomb_keys())
            files = 0
            for path in self.files.late(name, book.episodes):
                ep = self.files.read(path)
                if ep is None or ep.episode_id in book.episodes:
                    continue
                self._admit(book, ep, book.item_priorities(ep, 1.0, np.arange(ep.num_steps)))
                files += 1
            self.restored[name] = len(book.episodes)
            self.restored_from[name] = {"checkpoint": len(from_checkpoint), "files": files}

    def _with_server(self, op: Callable[[], Any]) -> Any:
        """Run ``op`` against a live server; when the server dies under it, restore and run it again."""
        for _ in range(RETRIES):
            try:
                if not self._server.alive():
                    self._restore()
                return op()
            except ServerDied:
                continue
        raise ReverbServerError(
            f"the Reverb server died {RETRIES} times in one call (see {self._server.log_path}):\n{self._server.log_tail()}"
        )

    def _book(self, table: str) -> ReverbBook:
        if table not in self._books:
            raise ConfigError(f"replay: no table {table!r}; tables are {sorted(self._books)}")
        return self._books[table]

    def __del__(self) -> None:
        try:
            self._server.stop()
        except Exception:
            pass
