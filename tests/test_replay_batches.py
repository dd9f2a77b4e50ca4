"""``learner.data.ReplayBatches`` against real replay clients (the in-process store and the Ray
shards): batch contents and shapes, pool and sample-kind proportions, empty tables, value labels,
and a learner step trained from replay with its staleness figure."""

from __future__ import annotations

import os

import threading
import time

import numpy as np
import pytest
import torch

from cosmos_policy.codec import NormalizationStats
from cosmos_policy.data.augment import AugmentConfig
from cosmos_policy.data.mixture import mixture_preset
from cosmos_policy.data.samples import SampleBuilder
from cosmos_policy.episode import Episode, Source
from cosmos_policy.errors import InputError
from cosmos_policy.layout import SampleKind
from cosmos_policy.text import RandomTextEncoder, TextEmbeddingCache
from learner.data import POOL_TABLES, ReplayBatches
from cosmos_policy.contracts import TableName
from replay.local import LocalReplay
from replay.config import ReplayConfig, default_tables

INSTRUCTION = "put the bowl on the plate"
STEPS = 24


def episode(success: bool, source: Source, seed: int, version: int | None = None, planning_version: int | None = None) -> Episode:
    rng = np.random.default_rng(seed)
    frames = {c: rng.integers(0, 256, (STEPS, 64, 64, 3), dtype=np.uint8) for c in ("primary", "wrist")}
    return Episode.from_frames(frames, proprio=rng.normal(size=(STEPS, 9)), actions=rng.uniform(-1, 1, (STEPS, 7)),
                               instruction=INSTRUCTION, success=success, source=source, policy_version=version,
                               planning_version=planning_version)


def fill(client, demos: int = 2, successes: int = 2, failures: int = 2) -> dict[str, set[str]]:
    """Insert episodes into the tables ``TableName.of`` picks; returns the episode ids per table."""
    ids: dict[str, set[str]] = {}
    specs = [(True, Source.DEMO, None)] * demos + [(True, Source.SIM, 3)] * successes + [(False, Source.SIM, 3)] * failures
    for i, (success, source, version) in enumerate(specs):
        ep = episode(success, source, seed=i, version=version, planning_version=None if version is None else 1)
        table = TableName.of(ep)
        client.insert(table, ep)
        ids.setdefault(table, set()).add(ep.episode_id)
    return ids


def make_source(client, libero, batch_size: int = 8, preset: str = "base") -> ReplayBatches:
    rng = np.random.default_rng(0)
    stats = NormalizationStats.compute(rng.uniform(-1, 1, (100, 7)), rng.normal(size=(100, 9)))
    builder = SampleBuilder(libero, stats, image_size=64, gamma=0.99, augmentation=AugmentConfig())
    text = TextEmbeddingCache()
    text.fill(RandomTextEncoder(32, 16), [INSTRUCTION])
    return ReplayBatches(client, mixture_preset(preset), builder, text, batch_size, seed=0, timeout_s=5.0)


@pytest.fixture
def local(tmp_path):
    client = LocalReplay(ReplayConfig(root=str(tmp_path / "replay"), tables=default_tables(window=16)))
    yield client
    client.close()


def test_a_replay_batch_holds_model_ready_samples_from_the_right_tables(local, libero):
    ids = fill(local)
    source = make_source(local, libero)
    batch = source.batch(0)
    model = batch.model
    assert model.batch_size == 8 and len(batch.pools) == 8
    for name in ("current_image.primary", "current_image.wrist", "future_image.primary", "future_image.wrist"):
        assert model.images[name].shape == (8, 64, 64, 3) and model.images[name].dtype == torch.uint8
    assert model.actions.shape == (8, 16, 7) and model.proprio.shape == (8, 9) and model.future_proprio.shape == (8, 9)
    assert model.text.shape == (8, 16, 32)
    allowed = {"demo": {SampleKind.POLICY}, "success": {SampleKind.WORLD_MODEL, SampleKind.VALUE},
               "failure": {SampleKind.WORLD_MODEL, SampleKind.VALUE}}
    for i, pool in enumerate(batch.pools):
        assert model.kinds[i] in allowed[pool]
        assert batch.episode_ids[i] in ids[POOL_TABLES[pool]]  # the sample came from its pool's table
        # Value labels: V(s') of a failed episode is -1, of a successful one above -1.
        assert (model.value[i] == -1.0) == (pool == "failure")
        assert batch.policy_versions[i] == (None if pool == "demo" else 3)
    assert source.wait_s > 0


def test_pool_and_kind_proportions_follow_the_mixture(local, libero):
    fill(local)
    source = make_source(local, libero, batch_size=16)
    pools, kinds = [], []
    for step in range(30):
        b = source.batch(step)
        pools += b.pools
        kinds += [SampleKind(k).value for k in b.model.kinds]
    n = len(pools)
    share = {p: pools.count(p) / n for p in ("demo", "success", "failure")}
    assert share["demo"] == pytest.approx(0.5, abs=0.07)
    assert share["success"] == pytest.approx(0.25, abs=0.06) and share["failure"] == pytest.approx(0.25, abs=0.06)
    kind_share = {k: kinds.count(k) / n for k in ("policy", "world_model", "value")}
    assert kind_share["policy"] == pytest.approx(0.5, abs=0.07)
    assert kind_share["world_model"] == pytest.approx(0.25, abs=0.06) and kind_share["value"] == pytest.approx(0.25, abs=0.06)


def test_planning_preset_draws_vsprime_value_samples(local, libero):
    fill(local)
    source = make_source(local, libero, batch_size=16, preset="planning")
    kinds = {SampleKind(k) for step in range(4) for k in source.batch(step).model.kinds}
    assert SampleKind.VALUE_SPRIME in kinds and SampleKind.VALUE not in kinds


def test_empty_tables_are_skipped_and_no_items_is_a_clear_error(local, libero):
    source = make_source(local, libero)
    source.timeout_s = 1.0
    with pytest.raises(InputError, match=r"no items in any of the tables .* after waiting 1 s"):
        source.batch(0)
    # A learner started beside the first collection waits for its first episodes (no experience yet:
    # everything from the demonstrations).
    source.timeout_s = 30.0
    filler = threading.Timer(1.0, lambda: fill(local, demos=2, successes=0, failures=0))
    filler.start()
    start = time.time()
    batch = source.batch(0)
    filler.join()
    assert time.time() - start >= 0.9 and source.wait_s >= 0.9
    assert set(batch.pools) == {"demo"} and set(batch.model.kinds) == {SampleKind.POLICY}


def test_the_learner_trains_from_replay_and_reports_staleness(local, libero, tmp_path):
    from learner.engine import Learner, LearnerConfig
    from learner.schedule import ScheduleConfig

    fill(local)
    source = make_source(local, libero, batch_size=4)
    os.environ.update(MASTER_PORT="29641")
    cfg = LearnerConfig(micro_batch=4, lr=1e-3, schedule=ScheduleConfig(warmup_steps=0, cycle_steps=100, end_of_cycle=1.0),
                        checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=0)
    learner = Learner(cfg, source)
    learner.version = 5  # five versions published since the experience was collected with version 3
    metrics = [learner.train_step() for _ in range(2)]
    for m in metrics:
        assert np.isfinite(m["loss"]) and m["replay_wait_s"] >= 0
        assert m["staleness_versions"] == pytest.approx(2.0)  # only experience samples carry a version
        assert m["staleness_max_versions"] == pytest.approx(2.0)
    assert learner.step == 2 and learner.samples == 8
    # The planning model's learner measures against the planning versions that played the episodes (1), not the
    # policy's: its own version 5 is four ahead of them.
    learner.versions_of = "planning"
    assert learner.train_step()["staleness_versions"] == pytest.approx(4.0)


def test_replay_batches_over_ray_shards(ray_local, libero, tmp_path):
    from replay.ray_backend import RayReplay

    cfg = ReplayConfig(root=str(tmp_path / "replay"), shards=2, tables=default_tables(window=16))
    client = RayReplay(cfg, seed=0)
    try:
        ids = fill(client)
        batch = make_source(client, libero).batch(0)
        assert batch.model.batch_size == 8
        for pool, eid in zip(batch.pools, batch.episode_ids):
            assert eid in ids[POOL_TABLES[pool]]
    finally:
        client.close()
        for shard in client.shards:
            ray_local.kill(shard)
