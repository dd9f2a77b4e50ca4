"""Training samples: Monte Carlo labels, chunk padding, augmentation, mixture proportions, the loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cosmos_policy.data.loader import TrainingStream, collate, make_loader
from cosmos_policy.data.mixture import EpisodePool, MixtureConfig, MixtureSampler, mixture_preset
from cosmos_policy.data.samples import SampleBuilder, action_chunk, value_labels
from cosmos_policy.data.statistics import compute_statistics, load_or_compute
from cosmos_policy.episode import Episode, Source
from cosmos_policy.errors import ConfigError, InputError, StatisticsError
from cosmos_policy.layout import SampleKind
from cosmos_policy.model import CosmosPolicyModel
from cosmos_policy.text import RandomTextEncoder, TextEmbeddingCache


def episode(steps: int, success: bool, source: Source = Source.SIM, seed: int = 0, size: int = 72, **kwargs) -> Episode:
    rng = np.random.default_rng(seed)
    frames = {c: rng.integers(0, 256, (steps, size, size, 3), dtype=np.uint8) for c in ("primary", "wrist")}
    actions = np.arange(steps * 7, dtype=np.float32).reshape(steps, 7) / (steps * 7)
    return Episode.from_frames(frames, proprio=rng.uniform(-1, 1, (steps, 9)), actions=actions,
                               instruction=kwargs.pop("instruction", "lift the cube"), success=success, source=source, **kwargs)


def test_monte_carlo_labels_match_hand_computation():
    gamma = 0.9
    # Success, 5 steps, R = 1: G_t = 0.9^(4 - t); label 2 G_t - 1.
    expected = [2 * 0.9**4 - 1, 2 * 0.9**3 - 1, 2 * 0.9**2 - 1, 2 * 0.9 - 1, 1.0]
    assert np.allclose(value_labels(5, 1.0, gamma), expected)
    assert np.allclose(value_labels(5, 0.0, gamma), [-1.0] * 5)  # failure: -1 throughout
    # A partial score (ALOHA's success_score) cancels out: the same curve as a full success.
    assert np.allclose(value_labels(5, 0.7, gamma), expected)
    assert np.allclose(value_labels(3, 1.0, 0.99), [2 * 0.99**2 - 1, 2 * 0.99 - 1, 1.0])


def test_padded_chunk_at_the_end_repeats_the_last_action():
    actions = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    chunk = action_chunk(actions, 7, 5)
    assert np.array_equal(chunk[:3], actions[7:10])
    assert np.array_equal(chunk[3:], np.repeat(actions[9:10], 2, axis=0))
    assert np.array_equal(action_chunk(actions, 2, 5), actions[2:7])


@pytest.fixture
def setup(tiny_config, libero):
    demos = [episode(30, True, Source.DEMO, seed=i) for i in range(3)]
    stats = compute_statistics(demos)
    builder = SampleBuilder(libero, stats, image_size=tiny_config.image_size, gamma=0.99)
    return demos, stats, builder


def test_sample_at_the_episode_end(setup, libero):
    demos, stats, builder = setup
    ep = demos[0]
    t = 25  # future index min(25 + 16, 29) = 29
    sample = builder.build(ep, t, SampleKind.POLICY, np.random.default_rng(0))
    chunk = np.concatenate([ep.actions[25:30], np.repeat(ep.actions[29:30], 11, axis=0)])
    assert np.allclose(sample.actions, stats.normalize_actions(torch.from_numpy(chunk)).numpy())
    assert np.allclose(sample.future_proprio, stats.normalize_proprio(torch.from_numpy(ep.proprio[29])).numpy())
    assert np.allclose(sample.proprio, stats.normalize_proprio(torch.from_numpy(ep.proprio[25])).numpy())
    assert sample.value == pytest.approx(1.0)  # the label at the future (last) step
    mid = builder.build(ep, 3, SampleKind.POLICY, np.random.default_rng(0))
    assert mid.value == pytest.approx(2 * 0.99 ** (29 - 19) - 1)  # label at step 3 + 16 = 19
    assert set(sample.images) == {"current_image.wrist", "current_image.primary", "future_image.wrist", "future_image.primary"}
    assert sample.images["current_image.wrist"].shape == (64, 64, 3) and sample.images["current_image.wrist"].dtype == torch.uint8


def test_augmentation_is_identical_across_the_images_of_a_sample(setup):
    demos, _, builder = setup
    ep = demos[1]
    last = ep.num_steps - 1  # current and future are the same frame at the last step
    for seed in range(5):
        s = builder.build(ep, last, SampleKind.POLICY, np.random.default_rng(seed))
        assert torch.equal(s.images["current_image.primary"], s.images["future_image.primary"])
        assert torch.equal(s.images["current_image.wrist"], s.images["future_image.wrist"])
    a = builder.build(ep, last, SampleKind.POLICY, np.random.default_rng(1))
    b = builder.build(ep, last, SampleKind.POLICY, np.random.default_rng(2))
    assert not torch.equal(a.images["current_image.primary"], b.images["current_image.primary"])


def test_episodes_that_cannot_give_samples_are_clear_errors(setup):
    _, _, builder = setup
    short = episode(10, True, metadata={"file": "/data/short_demo.hdf5"})
    with pytest.raises(InputError, match=r"/data/short_demo.hdf5: episode of 10 steps is shorter than the action chunk \(16\)"):
        builder.build(short, 0, SampleKind.POLICY, np.random.default_rng(0))
    one_cam = Episode.from_frames({"primary": np.zeros((20, 8, 8, 3), np.uint8)}, proprio=np.zeros((20, 9)),
                                  actions=np.zeros((20, 7)), instruction="x", success=True)
    with pytest.raises(InputError, match=r"no images for cameras \['wrist'\]"):
        builder.check(one_cam)


def test_statistics_from_demonstrations(tmp_path, setup):
    demos, stats, _ = setup
    all_actions = np.concatenate([d.actions for d in demos])
    assert np.allclose(stats.actions_min, all_actions.min(0)) and np.allclose(stats.actions_max, all_actions.max(0))
    with pytest.raises(StatisticsError, match="from demonstrations only"):
        compute_statistics([episode(20, True, Source.SIM)])
    path = tmp_path / "dataset_statistics.json"
    first = load_or_compute(path, demos)
    assert path.exists()
    again = load_or_compute(path, [])  # read back, nothing recomputed
    assert np.array_equal(again.proprio_max, first.proprio_max)
    # Rollouts are normalized with the demo statistics: out-of-range values leave [-1, 1].
    assert stats.normalize_actions(torch.tensor([[2.0] * 7])).max() > 1.0


@pytest.mark.parametrize("preset", ["base", "planning"])
def test_mixture_proportions_over_ten_thousand_draws(preset):
    cfg = mixture_preset(preset)
    eps = [episode(20, True, Source.DEMO, seed=0, size=8), episode(25, True, seed=1, size=8), episode(40, False, seed=2, size=8)]
    sampler = MixtureSampler.from_episodes(cfg, eps)
    rng = np.random.default_rng(0)
    n = 10_000
    pools, kinds = {}, {}
    for _ in range(n):
        pool, kind, ep, step = sampler.draw(rng)
        assert 0 <= step < ep.num_steps
        pools[pool] = pools.get(pool, 0) + 1
        kinds[kind.value] = kinds.get(kind.value, 0) + 1
    for pool, p in cfg.pools.items():
        assert abs(pools.get(pool, 0) / n - p) < 0.02, (pool, pools)
    expected = cfg.expected_kinds()
    assert expected == pytest.approx(
        {"policy": 0.5, "world_model": 0.25, "value": 0.25} if preset == "base" else {"policy": 0.1, "world_model": 0.45, "value_sprime": 0.45}
    )
    for kind, p in expected.items():
        assert abs(kinds.get(kind, 0) / n - p) < 0.02, (kind, kinds)


def test_steps_are_uniform_over_the_pool():
    pool = EpisodePool("success", [episode(10, True, size=8, seed=0), episode(30, True, size=8, seed=1)])
    rng = np.random.default_rng(0)
    long_share = np.mean([pool.draw(rng)[0].num_steps == 30 for _ in range(4000)])
    assert abs(long_share - 0.75) < 0.03


def test_empty_pools_renormalize_and_interrupted_episodes_join_none():
    cfg = mixture_preset("base")
    eps = [episode(20, True, Source.DEMO, size=8), episode(20, False, size=8, interrupted=True)]
    sampler = MixtureSampler.from_episodes(cfg, eps)
    assert len(sampler.pools["failure"]) == 0 and len(sampler.pools["demo"]) == 1
    rng = np.random.default_rng(0)
    assert {sampler.draw(rng)[0] for _ in range(50)} == {"demo"}
    assert sampler.skipped == 50
    demos_too = MixtureSampler.from_episodes(mixture_preset("base", demos_as_success_rollouts=True), eps)
    assert len(demos_too.pools["success"]) == 1
    failed_demo = episode(20, False, Source.DEMO, size=8)
    as_rollouts = MixtureSampler.from_episodes(mixture_preset("planning", demos_as_success_rollouts=True), eps + [failed_demo])
    assert len(as_rollouts.pools["failure"]) == 1 and len(as_rollouts.pools["success"]) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pools={"demo": 0.5, "success": 0.6}), "mixture.pools: probabilities must sum to 1"),
        (dict(pools={"demos": 1.0}), "mixture.pools: unknown entry 'demos'"),
        (dict(pools={"demo": 1.5, "success": -0.5}), r"mixture.pools.demo: expected a probability >= 0|mixture.pools.success"),
        (dict(pools={"demo": 1.0}, kinds={"demo": {"policy": 0.5, "critic": 0.5}}), "mixture.kinds.demo: unknown entry 'critic'"),
        (dict(kinds={"demo": {"policy": 1.0}}), "mixture.kinds: no sample kinds for pool 'success'"),
    ],
)
def test_invalid_mixtures_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MixtureConfig(**kwargs)
    with pytest.raises(ConfigError, match="mixture preset 'fast'"):
        mixture_preset("fast")


def test_loader_batches_train_the_model(setup, tiny_config, libero):
    demos, _, builder = setup
    rollouts = [episode(24, True, seed=10), episode(28, False, seed=11, instruction="open the drawer")]
    sampler = MixtureSampler.from_episodes(mixture_preset("base"), demos + rollouts)
    text = TextEmbeddingCache()
    text.fill(RandomTextEncoder(tiny_config.text.embed_dim, tiny_config.text.max_length), ["lift the cube", "open the drawer"])
    stream = TrainingStream(sampler, builder, seed=3)
    loader = make_loader(stream, text, batch_size=4, num_workers=2)
    batches = []
    for i, batch in enumerate(loader):
        batches.append(batch)
        if i == 3:
            break
    model = CosmosPolicyModel.build(tiny_config, libero)
    for batch in batches:
        assert batch.model.images["current_image.primary"].shape == (4, 64, 64, 3)
        assert batch.model.actions.shape == (4, 16, 7) and batch.model.value.shape == (4,)
        out = model.training_loss(batch.model, torch.Generator().manual_seed(0))
        assert torch.isfinite(out.loss)
    # The two workers draw different samples.
    keys = {(b.episode_ids[0], b.steps[0]) for b in batches}
    assert len(keys) > 1
    # Reproducible: the same seed in one process gives the same first samples.
    first = [next(iter(TrainingStream(sampler, builder, seed=3))) for _ in range(2)]
    assert first[0].episode_id == first[1].episode_id and first[0].step == first[1].step
    single = collate([first[0]], text)
    assert single.model.kinds == [first[0].kind]


def test_per_benchmark_data_defaults_reach_the_experiment():
    """configs/data/<benchmark>.yaml gives an experiment's data section its defaults (ALOHA's gamma 0.998)."""
    from launch.config import load_experiment

    libero, aloha = load_experiment("quickstart"), load_experiment("quickstart", ["model.layout=aloha"])
    robocasa = load_experiment("quickstart", ["data.benchmark=robocasa"])
    assert (libero.data.gamma, robocasa.data.gamma, aloha.data.gamma) == (0.99, 0.99, 0.998)
    assert aloha.mixture("policy").demos_as_success_rollouts and not libero.mixture("policy").demos_as_success_rollouts
    assert load_experiment("quickstart", ["data.benchmark=aloha", "data.gamma=0.9"]).data.gamma == 0.9  # the experiment wins
    assert libero.mixture("planning").pools == {"demo": 0.1, "success": 0.45, "failure": 0.45}
    with pytest.raises(ConfigError, match="data.gamma"):
        load_experiment("quickstart", ["data.gamma=1.5"])
    with pytest.raises(ConfigError, match="mixture preset 'fastest'"):
        load_experiment("quickstart", ["data.policy_mixture=fastest"])
    with pytest.raises(ConfigError, match="data config 'atari'"):
        load_experiment("quickstart", ["data.benchmark=atari"])


def test_one_label_equals_the_label_curve():
    from cosmos_policy.data.samples import value_label

    curve = value_labels(40, 1.0, 0.99)
    assert all(value_label(40, t, 1.0, 0.99) == pytest.approx(float(curve[t])) for t in range(40))
    assert value_label(40, 5, 0.0, 0.99) == -1.0


def test_step_windows_carry_what_a_sample_needs(setup):
    demos, _, builder = setup
    ep = demos[2]
    w = ep.window(20, 16)
    assert (w.step, w.future_step, w.num_steps) == (20, 29, 30)
    assert w.current["wrist"] == ep.images["wrist"].jpegs[20] and w.future["primary"] == ep.images["primary"].jpegs[29]
    assert np.array_equal(w.actions, action_chunk(ep.actions, 20, 16))
    rng_a, rng_b = np.random.default_rng(4), np.random.default_rng(4)
    a, b = builder.build(ep, 20, SampleKind.VALUE, rng_a), builder.build_window(w, SampleKind.VALUE, rng_b)
    assert a.value == b.value and np.array_equal(a.actions, b.actions)
    assert all(torch.equal(a.images[k], b.images[k]) for k in a.images)
