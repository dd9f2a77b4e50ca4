"""The replay service over Ray: shard actors, each hosting the store of ``config.backend``, and their client.

A ``ReplayShard`` holds one store under ``root/shard-<i>``: a ``ReplayStore`` (backend "ray":
tables in the actor, JPEG-compressed episodes in memory, their files on the node's disk) or a
``ReverbReplay`` (backend "reverb": its own Reverb server in a child process of the actor). Each
shard owns the episodes whose id hashes to it (for every table). A shard actor restarts by itself
after a crash and restores from its own directory; callers' in-flight requests are retried, so
an insert that returned was durable and one that was interrupted is sent again.

``RayReplay`` is the client of either: it holds actor handles only, so it pickles, and the copies
an EnvRunner (inserting) and a learner (sampling) receive reach the same shards. Sampling spreads
a batch over the shards in proportion to their share of the table's sampling mass (items, or
total priority for prioritized tables), refreshed from every reply. Rate limits apply per shard
(each shard limits its own items), as they would across Reverb servers.
"""

from __future__ import annotations

import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import ray

from cosmos_policy.contracts import SampledItem
from cosmos_policy.episode import Episode
from cosmos_policy.errors import ConfigError
from replay.config import ReplayConfig
from replay.service import open_store


@ray.remote(max_restarts=-1, max_task_retries=-1, max_concurrency=64)
class ReplayShard:
    """One shard: the store of ``config.backend`` under ``root/shard-<i>`` in a threaded actor.

    Threaded (``max_concurrency``), so an insert or sample blocked by the rate limiter does not
    stop the other side from making the progress it waits for.
    """

    def __init__(self, config: ReplayConfig, index: int) -> None:
        self.index = index
        self.store = open_store(config, Path(config.root) / f"shard-{index}", seed=index)
        with warnings.catch_warnings():  # the property reads Ray's deprecated actor_id (Ray 2.60 warns at every start)
            warnings.simplefilter("ignore")
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if restarted:  # Ray restarted it: say so in the job's log
            kept = ", ".join(f"{n} {t}" for t, n in self.store.restored.items() if n) or "none"
            print(f"warning: replay shard {index} was restarted (its process died); restored its acknowledged episodes from "
                  f"{Path(config.root) / f'shard-{index}'} ({kept}); inserts and samples go on", flush=True)

    def insert(self, table: str, episode: Episode, priority: float | list[float], timeout: float | None) -> tuple[str, float]:
        return self.store.insert(table, episode, priority, timeout), self.store.weight(table)

    def sample(self, table: str, n: int, timeout: float | None) -> tuple[list[SampledItem], float]:
        return self.store.sample(table, n, timeout), self.store.weight(table)

    def update_priorities(self, table: str, keys: list[tuple[str, int]], priorities: list[float]) -> int:
        return self.store.update_priorities(table, keys, priorities)

    def weight(self, table: str) -> float:
        return self.store.weight(table)

    def episode_ids(self, table: str) -> list[str]:
        return self.store.episode_ids(table)

    def stats(self) -> dict[str, dict[str, float]]:
        return self.store.stats()

    def checkpoint(self) -> str:
        return str(self.store.checkpoint())

    def set_version(self, version: int) -> None:
        self.store.set_version(version)

    def restored(self) -> dict[str, int]:
        return dict(self.store.restored)

    def pid(self) -> int:
        return os.getpid()


class RayReplay:
    """``ReplayClient`` over ``config.shards`` shard actors: ``shards`` given, or created here.

    ``names`` (one per shard, the caller's) makes the shards named actors, found again when they
    exist (``get_if_exists``); without them the shards are anonymous, reachable through this
    object and its pickled copies while the process that created them lives.
    """

    def __init__(self, config: ReplayConfig, shards: list | None = None, names: list[str] | None = None,
                 seed: int | None = None) -> None:
        self.config = config
        if shards is None:
            if names is not None and len(names) != config.shards:
                raise ConfigError(f"replay: {config.shards} shards need {config.shards} actor names, got {len(names)}")
            shards = [self._shard(config, i, None if names is None else names[i]) for i in range(config.shards)]
        self.shards = list(shards)
        self.names, self.seed = names, seed
        self._weights: dict[str, np.ndarray] = {}
        self.rng = np.random.default_rng(seed)

    def __reduce__(self) -> tuple:
        """Named shards travel as their names and are found again where the copy is used.

        An actor handle in an actor's constructor arguments puts those arguments in the object
        store, and Ray then logs an error for every restartable actor built with them (its restart
        would need them; ray-project/ray#53727); names need nothing kept alive. Anonymous shards
        travel as handles.
        """
        if self.names is None:
            return (RayReplay, (self.config, self.shards, None, self.seed))
        return (_named, (self.config, self.names, self.seed))

    @staticmethod
    def _shard(config: ReplayConfig, index: int, name: str | None):
        named = {} if name is None else {"name": name, "get_if_exists": True}
        return ReplayShard.options(num_cpus=0.5, **named).remote(config, index)

    def shard_of(self, episode_id: str) -> int:
        return zlib.crc32(episode_id.encode()) % len(self.shards)

    def insert(self, table: str, episode: Episode, priority: float | list[float] = 1.0, timeout: float | None = None) -> str:
        i = self.shard_of(episode.episode_id)
        eid, weight = ray.get(self.shards[i].insert.remote(table, episode, priority, timeout))
        self._weights.setdefault(table, np.zeros(len(self.shards)))[i] = weight
        return eid

    def sample(self, table: str, n: int, timeout: float | None = None) -> list[SampledItem]:
        weights = self._weights.get(table)
        if weights is None or weights.sum() <= 0:
            weights = np.array(ray.get([s.weight.remote(table) for s in self.shards]), dtype=np.float64)
        if weights.sum() <= 0:  # nothing anywhere yet: let one shard's rate limiter do the waiting
            weights = np.ones(len(self.shards))
        counts = self.rng.multinomial(n, weights / weights.sum())
        calls = {i: self.shards[i].sample.remote(table, int(c), timeout) for i, c in enumerate(counts) if c > 0}
        items: list[SampledItem] = []
        fresh = weights.copy()
        for i, ref in calls.items():
            got, fresh[i] = ray.get(ref)
            items.extend(got)
        self._weights[table] = fresh
        return items

    def update_priorities(self, table: str, keys: list[tuple[str, int]], priorities: list[float]) -> int:
        groups: dict[int, tuple[list, list]] = {}
        for key, p in zip(keys, priorities):
            g = groups.setdefault(self.shard_of(key[0]), ([], []))
            g[0].append(key)
            g[1].append(p)
        return sum(ray.get([self.shards[i].update_priorities.remote(table, k, p) for i, (k, p) in groups.items()]))

    def episode_ids(self, table: str) -> list[str]:
        return [eid for ids in ray.get([s.episode_ids.remote(table) for s in self.shards]) for eid in ids]

    def stats(self) -> dict[str, dict[str, float]]:
        """Per-table statistics summed over shards (staleness averaged)."""
        merged: dict[str, dict[str, float]] = {}
        per_shard = ray.get([s.stats.remote() for s in self.shards])
        for shard_stats in per_shard:
            for table, values in shard_stats.items():
                out = merged.setdefault(table, {})
                for k, v in values.items():
                    out[k] = out.get(k, 0.0) + v
        for values in merged.values():
            values["staleness_versions"] = values.get("staleness_versions", 0.0) / len(self.shards)
        return merged

    def checkpoint(self) -> None:
        ray.get([s.checkpoint.remote() for s in self.shards])

    def set_version(self, version: int) -> None:
        ray.get([s.set_version.remote(version) for s in self.shards])

    def close(self) -> None:
        self.checkpoint()


def _named(config: ReplayConfig, names: list[str], seed: int | None) -> RayReplay:
    """A client of the named shards (``RayReplay.__reduce__``)."""
    replay = RayReplay(config, shards=[ray.get_actor(n) for n in names], seed=seed)
    replay.names = names
    return replay
