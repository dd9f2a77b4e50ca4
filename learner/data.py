"""Where the learner's batches come from: demonstrations plus experience, in configured proportions.

Both sources build the same ``TrainingBatch`` with the same sample builder; they differ only in
where (episode, step) draws come from:
- ``EpisodeBatches``: episodes in memory (a dataset, or the quickstart's demonstrations);
- ``ReplayBatches``: replay tables (``demos``, ``experience_success``, ``experience_failure``),
  whose items are step windows; the time spent waiting on replay is reported.
Batches are a pure function of (seed, rank, step): a resumed run sees the same data it would
have seen, and ranks never draw the same samples.
"""

from __future__ import annotations

import itertools
import signal
import time
from typing import Protocol

import numpy as np
import torch
import torch.utils.data

from cosmos_policy.contracts import ReplayClient, TableName
from cosmos_policy.data.loader import TrainingBatch, collate
from cosmos_policy.data.mixture import MixtureConfig, MixtureSampler
from cosmos_policy.data.samples import SampleBuilder, TrainingSample
from cosmos_policy.errors import InputError
from cosmos_policy.layout import SampleKind
from cosmos_policy.text import TextEmbeddingCache

# Mixture pool -> replay table.
POOL_TABLES = {"demo": TableName.DEMOS.value, "success": TableName.EXPERIENCE_SUCCESS.value, "failure": TableName.EXPERIENCE_FAILURE.value}


class BatchSource(Protocol):
    def batch(self, step: int) -> TrainingBatch: ...


def _rng(seed: int, rank: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, rank, step])


class EpisodeBatches:
    """Batches drawn from episodes held in memory."""

    def __init__(self, sampler: MixtureSampler, builder: SampleBuilder, text: TextEmbeddingCache, batch_size: int,
                 seed: int = 0, rank: int = 0) -> None:
        for pool in sampler.pools.values():
            for ep in pool.episodes:
                builder.check(ep)
        self.sampler, self.builder, self.text = sampler, builder, text
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.wait_s = 0.0

    def batch(self, step: int) -> TrainingBatch:
        rng = _rng(self.seed, self.rank, step)
        samples = []
        for _ in range(self.batch_size):
            pool, kind, episode, t = self.sampler.draw(rng)
            samples.append(self.builder.build(episode, t, kind, rng, pool=pool))
        return collate(samples, self.text)


class ReplayBatches:
    """Batches sampled from replay tables in the mixture's proportions.

    Per batch, the number of samples from each table is multinomial in the pool probabilities
    (tables with no items yet are skipped and the rest renormalized); each sample's kind is then
    drawn with the pool's kind probabilities.
    """

    def __init__(self, replay: ReplayClient, config: MixtureConfig, builder: SampleBuilder, text: TextEmbeddingCache, batch_size: int,
                 seed: int = 0, rank: int = 0, timeout_s: float | None = 600.0) -> None:
        self.replay, self.config, self.builder, self.text = replay, config, builder, text
        self.batch_size, self.seed, self.rank, self.timeout_s = batch_size, seed, rank, timeout_s
        self.wait_s = 0.0
        self._kinds = {p: ([SampleKind(k) for k in d], np.array(list(d.values()))) for p, d in config.kinds.items()}

    def batch(self, step: int) -> TrainingBatch:
        rng = _rng(self.seed, self.rank, step)
        start = time.perf_counter()
        pools = self._pools_with_items(start)
        probs = np.array([self.config.pools[p] for p in pools])
        counts = rng.multinomial(self.batch_size, probs / probs.sum())
        samples: list[TrainingSample] = []
        drawn = {p: self.replay.sample(POOL_TABLES[p], int(c), timeout=self.timeout_s) for p, c in zip(pools, counts) if c > 0}
        self.wait_s += time.perf_counter() - start
        for pool, items in drawn.items():
            kinds, kind_probs = self._kinds[pool]
            for item in items:
                kind = kinds[int(rng.choice(len(kinds), p=kind_probs))]
                samples.append(self.builder.build_window(item.window, kind, rng, pool=pool))
        order = rng.permutation(len(samples))
        return collate([samples[i] for i in order], self.text)


    def _pools_with_items(self, start: float) -> list[str]:
        """The mixture's pools whose tables hold items; while none does (a learner started beside the first
        collection), waits for the first insert up to ``timeout_s``, then fails naming the tables."""
        while True:
            stats = self.replay.stats()
            pools = [p for p, prob in self.config.pools.items() if prob > 0 and stats.get(POOL_TABLES[p], {}).get("items", 0) > 0]
            waited = time.perf_counter() - start
            if pools:
                return pools
            if self.timeout_s is not None and waited >= self.timeout_s:
                raise InputError(f"replay: no items in any of the tables {[POOL_TABLES[p] for p in self.config.pools]} "
                                 f"after waiting {waited:.0f} s")
            time.sleep(0.2)


class _StepBatches(torch.utils.data.Dataset):
    """A map-style view of a source: item ``step`` is ``source.batch(step)``."""

    def __init__(self, source: BatchSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return 2**62  # endless; the sampler decides which steps are built

    def __getitem__(self, step: int) -> TrainingBatch:
        return self.source.batch(step)


def _worker_init(_: int) -> None:
    """Each worker is one core's worth of JPEG decoding and augmentation, and leaves stopping to the learner.

    Ctrl-C in a terminal, ``timeout`` and job stops signal the whole process group. A worker killed
    by that signal fails the learner's next batch, so the learner, which saves its state on the
    signal and then stops the workers itself (``close``), could not save. The workers still exit with
    their parent (the DataLoader's watchdog) when it dies.
    """
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class PrefetchBatches:
    """Builds a source's batches for the next steps in worker processes while the GPU trains.

    The source's batches are a pure function of the step, so building them ahead changes
    nothing about which data a step sees: ``batch(step)`` returns exactly ``source.batch(step)``.
    Steps are expected in order; asking for another step (a resumed run) restarts the workers
    there. The source is copied into each worker process (fork), so it must hold its data
    (``EpisodeBatches``), not a connection that cannot cross a fork. ``wait_s`` is the time the
    learner spent waiting for a batch that was not ready: a data-loading stall.
    """

    def __init__(self, source: BatchSource, workers: int = 2, depth: int = 2) -> None:
        if workers < 1:
            raise InputError(f"data_workers: expected >= 1 worker for prefetching, got {workers}")
        self.source, self.workers, self.depth = source, workers, depth
        self.wait_s = 0.0
        self._next: int | None = None
        self._iter = None

    def _start(self, step: int) -> None:
        self.close()
        loader = torch.utils.data.DataLoader(
            _StepBatches(self.source), batch_size=None, sampler=itertools.count(step), num_workers=self.workers,
            prefetch_factor=self.depth, worker_init_fn=_worker_init, collate_fn=_identity,
        )
        self._iter = iter(loader)
        self._next = step

    def batch(self, step: int) -> TrainingBatch:
        if self._iter is None or step != self._next:
            self._start(step)
        start = time.perf_counter()
        out = next(self._iter)  # type: ignore[arg-type]
        self.wait_s += time.perf_counter() - start
        self._next = step + 1
        return out

    def close(self) -> None:
        """Stop the worker processes."""
        it, self._iter = self._iter, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _identity(batch: TrainingBatch) -> TrainingBatch:
    return batch


class SyntheticBatches:
    """Random batches in model units (``cosmos_policy.synthetic``): smoke runs, speed and fault tests.

    ``fixed``: the same batch every step (an overfitting check); otherwise one per (seed, rank, step).
    """

    def __init__(self, model, batch_size: int, kinds: tuple[str, ...] = ("policy", "world_model", "value"), seed: int = 0,
                 rank: int = 0, fixed: bool = False) -> None:
        from cosmos_policy.synthetic import random_batch

        self._make = lambda s: random_batch(model.config, model.layout, [kinds[i % len(kinds)] for i in range(batch_size)], seed=s)
        self.seed, self.rank, self.fixed = seed, rank, fixed
        self._fixed = self._wrap(self._make(seed)) if fixed else None
        self.wait_s = 0.0

    @staticmethod
    def _wrap(batch) -> TrainingBatch:
        n = batch.batch_size
        return TrainingBatch(model=batch, pools=["demo"] * n, episode_ids=[""] * n, steps=[0] * n, policy_versions=[None] * n,
                             planning_versions=[None] * n)

    def batch(self, step: int) -> TrainingBatch:
        if self._fixed is not None:
            return self._fixed
        return self._wrap(self._make(hash((self.seed, self.rank, step)) & 0x7FFF_FFFF))


def synthetic_source(batch_size: int, fixed: bool = False, seed: int = 0):
    """A picklable factory (model, rank) -> SyntheticBatches for worker groups."""
    return _SyntheticFactory(batch_size, fixed, seed)


class _SyntheticFactory:
    def __init__(self, batch_size: int, fixed: bool, seed: int) -> None:
        self.batch_size, self.fixed, self.seed = batch_size, fixed, seed

    def __call__(self, model, rank: int) -> SyntheticBatches:
        return SyntheticBatches(model, self.batch_size, seed=self.seed, rank=rank, fixed=self.fixed)
