"""Batch-source factories handed to learner ranks (picklable; each builds its source inside its rank).

A ``Learner`` calls ``factory(model, rank)`` once its model exists. The factories carry plain
data (episodes, statistics, text embeddings, configs) or, for experience, the job's replay client
(a ``ReplayClient``, whatever its backend), and build the sample builder and the mixture inside
the rank's process. When augmentation
is off they also turn on the model's latent cache: the VAE is frozen, so every (episode, step)
clip is encoded once instead of at every visit (most of a tiny model's step on a CPU).
"""

from __future__ import annotations

from typing import Any

from cosmos_policy.codec import NormalizationStats
from cosmos_policy.contracts import ReplayClient
from cosmos_policy.data.augment import AugmentConfig
from cosmos_policy.data.mixture import MixtureConfig, MixtureSampler
from cosmos_policy.data.samples import SampleBuilder
from cosmos_policy.episode import Episode
from cosmos_policy.text import TextEmbeddingCache
from learner.data import EpisodeBatches, ReplayBatches


class _Factory:
    def __init__(self, mixture: MixtureConfig, stats: NormalizationStats, text: TextEmbeddingCache, batch_size: int, gamma: float,
                 augmentation: AugmentConfig | None, seed: int, latent_cache: int) -> None:
        self.mixture, self.stats, self.text = mixture, stats, text
        self.batch_size, self.gamma, self.augmentation = batch_size, gamma, augmentation
        self.seed, self.latent_cache = seed, latent_cache

    def builder(self, model: Any) -> SampleBuilder:
        if self.augmentation is None and self.latent_cache:
            model.enable_latent_cache(self.latent_cache)
        return SampleBuilder(model.layout, self.stats, image_size=model.config.image_size, gamma=self.gamma, augmentation=self.augmentation)


class EpisodeSource(_Factory):
    """Batches from episodes held in memory (demonstrations), in the mixture's proportions."""

    def __init__(self, episodes: list[Episode], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.episodes = episodes

    def __call__(self, model: Any, rank: int) -> EpisodeBatches:
        builder = self.builder(model)
        sampler = MixtureSampler.from_episodes(self.mixture, self.episodes, chunk=model.layout.action_chunk)
        return EpisodeBatches(sampler, builder, self.text, self.batch_size, seed=self.seed, rank=rank)


class ReplaySource(_Factory):
    """Batches sampled from the replay tables (demonstrations and experience) of a running job."""

    def __init__(self, replay: ReplayClient, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.replay = replay

    def __call__(self, model: Any, rank: int) -> ReplayBatches:
        return ReplayBatches(self.replay, self.mixture, self.builder(model), self.text, self.batch_size, seed=self.seed, rank=rank)
