"""The offline phase's pieces that need no cluster: text embeddings, the held-out split, validation batches.

Shared by the main job (launch/online.py, which trains through Ray learner groups) and the Ray-free
trainer (launch/train.py), so that both hold out the same demonstrations, validate on the same
fixed batches and feed the learner the same sources.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cosmos_policy.codec import NormalizationStats
from cosmos_policy.config import load_model_config
from cosmos_policy.data.loader import collate
from cosmos_policy.data.samples import SampleBuilder
from cosmos_policy.episode import Episode
from cosmos_policy.errors import ConfigError
from cosmos_policy.layout import SampleKind, load_layout
from cosmos_policy.text import RandomTextEncoder, T5TextEncoder, TextEmbeddingCache
from launch.experiment import Experiment


VALIDATION_SEED = 12345  # the held-out batches' samples: fixed, so validation losses compare across calls


def text_cache(cfg: Experiment, instructions: list[str], existing: TextEmbeddingCache | None = None) -> TextEmbeddingCache:
    """Embeddings of every instruction the job will see (demonstrations and the environment's tasks)."""
    cache = existing or TextEmbeddingCache()
    missing = sorted({i for i in instructions if i not in cache})
    if missing:
        model_cfg = load_model_config(cfg.model.size)
        if cfg.model.text_encoder == "random":
            encoder: Any = RandomTextEncoder(model_cfg.text.embed_dim, model_cfg.text.max_length)
        elif cfg.model.text_encoder:
            encoder = T5TextEncoder(cfg.model.text_encoder, model_cfg.text.max_length)
        else:
            raise ConfigError(f"model.text_encoder: instructions {missing} have no embedding and no encoder is configured")
        for text, emb in zip(missing, encoder.encode(missing)):
            cache.add(text, emb)
    return cache


def source_kwargs(cfg: Experiment, stats: NormalizationStats, text: TextEmbeddingCache, batch: int) -> dict[str, Any]:
    """What every batch source of this experiment shares (learner.sources)."""
    return dict(stats=stats, text=text, batch_size=batch, gamma=cfg.data.gamma, augmentation=cfg.augment_config(), seed=cfg.seed,
                latent_cache=cfg.model.latent_cache)


def split_validation(cfg: Experiment, demos: list[Episode]) -> tuple[list[Episode], list[Episode]]:
    """(train, held out): the successful demonstrations, ``demos.validation_fraction`` of them held out.

    Failed demonstrations never teach the policy; with four or fewer successes nothing is held out
    (early stopping then has nothing to stop on and training runs its step budget).
    """
    successes = [e for e in demos if e.success]
    order = np.random.default_rng(cfg.seed).permutation(len(successes))
    n_val = int(round(len(successes) * cfg.demos.validation_fraction)) if len(successes) > 4 else 0
    return [successes[i] for i in order[n_val:]], [successes[i] for i in order[:n_val]]


def validation_batches(cfg: Experiment, stats: NormalizationStats, text: TextEmbeddingCache, val: list[Episode]) -> list[Any]:
    """Up to four fixed batches of policy samples from the held-out episodes (model batches, ready to score)."""
    if not val:
        return []
    batch = cfg.offline.batch
    layout = load_layout(cfg.model.layout)
    builder = SampleBuilder(layout, stats, image_size=load_model_config(cfg.model.size).image_size, gamma=cfg.data.gamma, augmentation=None)
    rng = np.random.default_rng(VALIDATION_SEED)
    steps = [(e, t) for e in val for t in e.sample_steps(layout.action_chunk)]
    picks = rng.choice(len(steps), size=min(len(steps), 4 * batch), replace=False)
    samples = [builder.build(steps[i][0], steps[i][1], SampleKind.POLICY, rng, pool="demo") for i in picks]
    return [collate(samples[i:i + batch], text).model for i in range(0, len(samples), batch)]
