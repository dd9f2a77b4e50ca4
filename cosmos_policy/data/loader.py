"""The stream of training batches the learner reads, built in worker processes.

``TrainingStream`` is an endless ``IterableDataset``: each worker draws (pool, kind, episode,
step) from the mixture with its own seeded generator and builds the sample (JPEG decode,
augmentation, normalization); ``collate`` stacks samples into a ``TrainingBatch`` whose
``model`` field is the ``ModelBatch`` the model trains on. Worker seeds derive from one seed,
the worker id and a restart counter, so runs are reproducible and restarted loaders do not repeat
the same draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cosmos_policy.data.mixture import MixtureSampler
from cosmos_policy.data.samples import SampleBuilder, TrainingSample
from cosmos_policy.model import ModelBatch
from cosmos_policy.text import TextEmbeddingCache


@dataclass
class TrainingBatch:
    """A model batch plus where each sample came from (for staleness and priority bookkeeping)."""

    model: ModelBatch
    pools: list[str]
    episode_ids: list[str]
    steps: list[int]
    policy_versions: list[int | None]
    planning_versions: list[int | None] = field(default_factory=list)

    def versions(self, target: str) -> list[int]:
        """The known weight versions of ``target`` (policy or planning) that played each sample's episode."""
        return [v for v in (self.planning_versions if target == "planning" else self.policy_versions) if v is not None]


class TrainingStream(IterableDataset):
    """Endless training samples from a mixture of episode pools."""

    def __init__(self, sampler: MixtureSampler, builder: SampleBuilder, seed: int = 0, restart: int = 0) -> None:
        super().__init__()
        for pool in sampler.pools.values():
            for ep in pool.episodes:
                builder.check(ep)  # fail at construction, naming the episode, not inside a worker
        self.sampler = sampler
        self.builder = builder
        self.seed = seed
        self.restart = restart

    def __iter__(self) -> Iterator[TrainingSample]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, worker, self.restart])
        while True:
            pool, kind, episode, step = self.sampler.draw(rng)
            yield self.builder.build(episode, step, kind, rng, pool=pool)


def collate(samples: list[TrainingSample], text: TextEmbeddingCache) -> TrainingBatch:
    """Stack samples into tensors; instructions become embeddings through the cache."""
    first = samples[0]

    def vectors(name: str) -> torch.Tensor | None:
        values = [getattr(s, name) for s in samples]
        return None if values[0] is None else torch.from_numpy(np.stack(values)).float()

    model = ModelBatch(
        kinds=[s.kind for s in samples],
        text=text.lookup([s.instruction for s in samples]),
        images={name: torch.stack([s.images[name] for s in samples]) for name in first.images},
        proprio=vectors("proprio"),
        future_proprio=vectors("future_proprio"),
        actions=vectors("actions"),
        value=torch.tensor([s.value for s in samples], dtype=torch.float32),
    )
    return TrainingBatch(
        model=model,
        pools=[s.pool for s in samples],
        episode_ids=[s.episode_id for s in samples],
        steps=[s.step for s in samples],
        policy_versions=[s.policy_version for s in samples],
        planning_versions=[s.planning_version for s in samples],
    )


class _Collate:
    """A picklable collate function (worker processes receive it)."""

    def __init__(self, text: TextEmbeddingCache) -> None:
        self.text = text

    def __call__(self, samples: list[TrainingSample]) -> TrainingBatch:
        return collate(samples, self.text)


def _one_thread(_: int) -> None:
    # Each worker is one core's worth of decoding and augmentation; torch's intra-op threads
    # would only oversubscribe the machine.
    torch.set_num_threads(1)


def make_loader(stream: TrainingStream, text: TextEmbeddingCache, batch_size: int, num_workers: int = 0, prefetch: int = 2) -> DataLoader:
    """A DataLoader over the stream; with workers, each builds whole batches in its own process."""
    kwargs = {"prefetch_factor": prefetch, "persistent_workers": True, "worker_init_fn": _one_thread} if num_workers > 0 else {}
    return DataLoader(stream, batch_size=batch_size, collate_fn=_Collate(text), num_workers=num_workers, **kwargs)
