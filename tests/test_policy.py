"""The policy on raw observations, the action-chunk queue, and best-of-N planning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cosmos_policy.codec import NormalizationStats
from cosmos_policy.errors import ConfigError, InputError
from cosmos_policy.layout import SampleKind
from cosmos_policy.model import CosmosPolicyModel
from cosmos_policy.planner import Planner, PlannerConfig, aggregate
from cosmos_policy.policy import CosmosPolicy, Observation, PolicyConfig
from cosmos_policy.text import RandomTextEncoder, TextEmbeddingCache

INSTRUCTION = "put the bowl on the plate"


@pytest.fixture(scope="module")
def stats():
    # Dataset units far from [-1, 1], so un-normalization is visible.
    rng = np.random.default_rng(0)
    return NormalizationStats.compute(100.0 + 10.0 * rng.random((200, 7)), -5.0 + rng.random((200, 9)))


@pytest.fixture(scope="module")
def text(tiny_config):
    cache = TextEmbeddingCache()
    cache.fill(RandomTextEncoder(tiny_config.text.embed_dim, tiny_config.text.max_length), [INSTRUCTION])
    return cache


def observation(seed: int = 0, size: int = 256) -> Observation:
    rng = np.random.default_rng(seed)
    return Observation(
        images={cam: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for cam in ("primary", "wrist")},
        proprio=-5.0 + rng.random(9),
        instruction=INSTRUCTION,
    )


@pytest.fixture
def policy(tiny_model, stats, text):
    return CosmosPolicy(tiny_model, stats, text, PolicyConfig(action_steps=3, return_latents=True))


def test_actions_come_back_in_dataset_units(policy, stats):
    out = policy.infer(observation())
    assert out.actions.shape == (16, 7) and out.actions.dtype == np.float32
    normalized = stats.normalize_actions(torch.from_numpy(out.actions).double())
    assert torch.allclose(normalized.float(), policy.model.read_outputs(out.latents[None]).actions[0], atol=1e-4)
    assert np.all(out.actions > 80) and np.all(out.actions < 130)  # around [100, 110], not [-1, 1]
    assert out.future_proprio.shape == (9,) and np.all(out.future_proprio < 0)
    assert 0.0 <= out.value <= 1.0
    # Deterministic for a seed; another seed gives another chunk.
    assert np.array_equal(policy.infer(observation()).actions, out.actions)
    assert not np.array_equal(policy.infer(observation(), seed=5).actions, out.actions)


def test_the_queue_hands_out_the_configured_number_of_actions(tiny_model, stats, text):
    policy = CosmosPolicy(tiny_model, stats, text, PolicyConfig(action_steps=1, execute=4))
    obs = observation()
    handed = [policy.next_action(obs) for _ in range(10)]
    assert policy.queries == 3  # 4 + 4 + 2 of the third chunk
    chunk = policy.infer(obs).actions
    assert all(np.array_equal(a, chunk[i % 4]) for i, a in enumerate(handed))
    policy.reset()
    before = policy.queries
    policy.next_action(obs)
    assert policy.queries == before + 1
    with pytest.raises(ConfigError, match="policy.execute: 17 exceeds the chunk of 16"):
        CosmosPolicy(tiny_model, stats, text, PolicyConfig(execute=17))


def test_autoregressive_mode_and_future_images(tiny_model, stats, text):
    calls = []
    hook = tiny_model.denoiser.net.register_forward_pre_hook(lambda m, a, k: calls.append(k["condition_mask"][:, 0, :, 0, 0].clone()), with_kwargs=True)
    policy = CosmosPolicy(tiny_model, stats, text, PolicyConfig(mode="autoregressive", action_steps=2, future_steps=2, value_steps=1,
                                                                 decode_future_images=True))
    out = policy.infer(observation())
    hook.remove()
    assert len(calls) == 2 + 2 + 1
    # Pass 1 policy (frames 0-3 clean), pass 2 world model (action frame 4 clean), pass 3 value (all but 8 clean).
    assert calls[0][0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert calls[2][0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0]
    assert calls[4][0].tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 0]
    assert set(out.future_images) == {"primary", "wrist"} and out.future_images["wrist"].shape == (64, 64, 3)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda o: o.images.pop("wrist"), r"observation.images: missing camera 'wrist'"),
        (lambda o: o.images.__setitem__("wrist", np.zeros((256, 256), np.uint8)), r"observation.images\['wrist'\]: expected uint8 \(height, width, 3\)"),
        (lambda o: o.images.__setitem__("primary", np.zeros((256, 256, 3), np.float32)), r"observation.images\['primary'\]: expected uint8"),
        (lambda o: o.proprio.__setitem__(2, np.nan), r"observation.proprio: non-finite values at dims \[2\]"),
        (lambda o: setattr(o, "proprio", np.zeros(8)), r"observation.proprio: expected shape \(9,\), got \(8,\)"),
        (lambda o: setattr(o, "instruction", "dance"), r"observation.instruction: 'dance' is not in the text-embedding cache and this policy has no text encoder"),
    ],
)
def test_malformed_observations_are_clear_errors(policy, mutate, message):
    obs = observation()
    mutate(obs)
    with pytest.raises(InputError, match=message):
        policy.infer(obs)


def test_non_finite_outputs_never_leave(tiny_config, libero, stats, text):
    model = CosmosPolicyModel.build(tiny_config, libero)
    with torch.no_grad():
        model.denoiser.net.proj_out.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        CosmosPolicy(model, stats, text, PolicyConfig(action_steps=1)).infer(observation())


# ---- aggregation ---------------------------------------------------------------------
def test_aggregations_match_hand_computation():
    v = np.array([[0.9, 0.8, 0.01, 0.02], [0.9, 0.01, 0.02, 0.03], [0.3, 0.5, 0.7, 0.9]])
    assert np.allclose(aggregate(v, "majority_mean"), [0.85, 0.0, 0.6])  # 2/4 >= half; 1/4 < half; all
    assert np.allclose(aggregate(v, "mean"), [0.4325, 0.24, 0.6])
    std0 = np.sqrt(np.mean((v[0] - 0.4325) ** 2))
    assert np.isclose(aggregate(v, "lcb")[0], 0.4325 - std0)
    assert np.isclose(aggregate(v, "lcb", lcb_k=2.0)[2], 0.6 - 2 * np.std(v[2]))
    assert np.allclose(aggregate(v, "success_vote"), [0.5, 0.25, 1.0])
    assert np.allclose(aggregate(np.array([[0.2, 0.3]]), "majority_mean", threshold=0.25), [0.3])
    with pytest.raises(ConfigError, match="planner.aggregation"):
        aggregate(v, "max")


# ---- planning ------------------------------------------------------------------------
class ControlledValue:
    """Forward hooks on a real planning model's network that control what it predicts.

    World-model rows (action frame clean, future proprio generated) predict a future proprio
    frame equal to the mean of the candidate's action frame; value rows (future proprio clean,
    value generated) predict a value frame equal to the mean of the clean future-proprio frame.
    So each candidate's value is (mean of its normalized actions + 1) / 2, known in advance.
    The network still runs; only its output on those frames is replaced.
    """

    def __init__(self, model: CosmosPolicyModel) -> None:
        layout = model.layout
        self.a, self.fp, self.v = layout.action_index, layout.proprio_index("future"), layout.value_index
        self.n = layout.action_size
        self.calls = 0
        self.handle = model.denoiser.net.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output):
        self.calls += 1
        x, t, clean = kwargs["hidden_states"], kwargs["timestep"], kwargs["condition_mask"][:, 0, :, 0, 0] > 0.5
        f = output[0].clone()
        for row in range(x.shape[0]):
            if clean[row, self.a] and not clean[row, self.fp]:
                flat = x[row, :, self.a].flatten()
                self._set(f, x, t, row, self.fp, flat[: len(flat) // self.n * self.n].mean())  # the complete copies
            if clean[row, self.fp] and not clean[row, self.v]:
                self._set(f, x, t, row, self.v, x[row, :, self.fp].mean())
        return (f,)

    @staticmethod
    def _set(f, x, t, row, frame, target):
        # x0 = c_in x - t F and the network's input is c_in x: F = (input - target) / t gives x0 = target.
        f[row, :, frame] = (x[row, :, frame] - target) / t[row, 0, frame]


@pytest.fixture
def planning_model(tiny_config, libero, tiny_model):
    model = CosmosPolicyModel(tiny_config, libero, vae=tiny_model.tokenizer.vae)  # the planning model shares the VAE
    torch.manual_seed(11)
    return model.eval()


def test_planner_picks_the_candidate_the_aggregation_ranks_first(policy, planning_model, stats):
    control = ControlledValue(planning_model)
    planner = Planner(policy, planning_model, PlannerConfig(num_candidates=6, future_steps=[1, 3, 5], value_steps=[1, 2, 3]))
    plan = planner.infer(observation(), seed=40)
    control.handle.remove()
    cands = plan.planner.candidate_actions
    assert cands.shape == (6, 16, 7) and plan.planner.member_values.shape == (6, 9)
    assert len({a.tobytes() for a in cands}) == 6  # distinct seeds give distinct candidates
    assert plan.planner.seeds == [40, 41, 42, 43, 44, 45]
    normalized = stats.normalize_actions(torch.from_numpy(cands).double())
    expected = ((normalized.mean(dim=(1, 2)) + 1) / 2).clamp(0, 1).numpy()
    assert np.allclose(plan.planner.member_values, expected[:, None], atol=2e-3)
    assert np.allclose(plan.planner.candidate_values, aggregate(plan.planner.member_values, "majority_mean"), atol=1e-6)
    assert plan.planner.chosen == int(np.argmax(plan.planner.candidate_values))
    assert np.array_equal(plan.actions, cands[plan.planner.chosen]) and plan.value == pytest.approx(plan.planner.candidate_values[plan.planner.chosen])
    # Batched: policy 5 steps + world model [1, 3, 5] + value [1, 2, 3] in 5 + 5 + 3 forward passes.
    assert control.calls == 5 + 3


def test_planner_variants_and_batching(policy, planning_model):
    obs = [observation(0), observation(1)]
    calls = []
    h = planning_model.denoiser.net.register_forward_pre_hook(lambda m, a, k: calls.append(k["hidden_states"].shape[0]), with_kwargs=True)
    planner = Planner(policy, planning_model, PlannerConfig(num_candidates=3, future_steps=[1, 2], value_steps=[1, 1], max_batch=5))
    plans = planner.plan_batch(obs, seeds=[0, 100])
    h.remove()
    assert [p.planner.seeds for p in plans] == [[0, 1, 2], [100, 101, 102]]
    assert all(b <= 5 for b in calls)  # never more rows per pass than max_batch
    for kind in ("q_value", "value"):
        plan = Planner(policy, planning_model, PlannerConfig(num_candidates=2, future_steps=[1], value_steps=[1, 2], value_kind=kind)).infer(obs[0])
        assert plan.planner.member_values.shape == (2, 2)
    deep = Planner(policy, planning_model, PlannerConfig(num_candidates=2, future_steps=[1], value_steps=[1], depth=2, depth_value="mean")).infer(obs[0])
    assert deep.planner.candidate_values.shape == (2,) and np.all(np.isfinite(deep.planner.candidate_values))
    with pytest.raises(ConfigError, match="planner.value_kind"):
        PlannerConfig(value_kind="advantage")


class _IdenticalCandidates(Planner):
    """Every candidate is a copy of the first: any spread in their judgement is sampling noise."""

    def _sample(self, model, kind, text, clean, steps, seeds):
        out = super()._sample(model, kind, text, clean, steps, seeds)
        return out[:1].expand_as(out).clone() if kind is SampleKind.POLICY else out


def test_common_judge_seeds_leave_only_the_candidates_differences(policy, planning_model):
    cfg = dict(num_candidates=4, future_steps=[1], value_steps=[1, 2])
    shared = _IdenticalCandidates(policy, planning_model, PlannerConfig(common_judge_seeds=True, **cfg)).infer(observation(), seed=3)
    assert np.allclose(shared.planner.member_values, shared.planner.member_values[0]) and shared.planner.chosen == 0
    own = _IdenticalCandidates(policy, planning_model, PlannerConfig(**cfg)).infer(observation(), seed=3)
    assert not np.allclose(own.planner.member_values, own.planner.member_values[0])  # per-candidate seeds: noise alone ranks them
    real = Planner(policy, planning_model, PlannerConfig(common_judge_seeds=True, **cfg)).infer(observation(), seed=3)
    assert real.planner.seeds == [3, 4, 5, 6] and len({a.tobytes() for a in real.planner.candidate_actions}) == 4  # candidates still differ


def test_candidate_noise_offsets_all_but_the_first_candidate(policy, planning_model, stats):
    cfg = dict(num_candidates=3, future_steps=[1], value_steps=[1], common_judge_seeds=True)
    plain = Planner(policy, planning_model, PlannerConfig(**cfg)).infer(observation(), seed=5)
    moved = Planner(policy, planning_model, PlannerConfig(candidate_noise=0.2, **cfg)).infer(observation(), seed=5)
    norm = lambda a: stats.normalize_actions(torch.from_numpy(a).double()).numpy()  # noqa: E731
    assert np.allclose(moved.planner.candidate_actions[0], plain.planner.candidate_actions[0])  # the policy's own sample, untouched
    for c in (1, 2):
        delta = norm(moved.planner.candidate_actions[c]) - norm(plain.planner.candidate_actions[c])
        inside = np.abs(norm(plain.planner.candidate_actions[c]) + delta[0]) < 0.99  # not clipped at +-1
        assert np.abs(delta).max() > 0.01 and np.allclose(delta[inside], np.broadcast_to(delta[0], delta.shape)[inside], atol=2e-3)
    with pytest.raises(ConfigError, match="planner.candidate_noise"):
        PlannerConfig(candidate_noise=-0.1)


def test_the_judge_sees_held_action_dimensions_as_executed(tiny_model, planning_model, text):
    """A dimension the demonstrations never varied is executed as their constant; the judge must see
    that constant too (as in every training sample), not the policy's noise or an exploration offset."""
    rng = np.random.default_rng(1)
    actions = 100.0 + 10.0 * rng.random((200, 7))
    actions[:, 3] = 7.0  # held: the scripted expert never rotates about this axis
    held_stats = NormalizationStats.compute(actions, -5.0 + rng.random((200, 9)))
    assert held_stats.held_action_dims().tolist() == [False, False, False, True, False, False, False]
    policy = CosmosPolicy(tiny_model, held_stats, text, PolicyConfig(action_steps=3, return_latents=True))
    control = ControlledValue(planning_model)
    plan = Planner(policy, planning_model, PlannerConfig(num_candidates=4, future_steps=[1], value_steps=[1], candidate_noise=0.3,
                                                         common_judge_seeds=True)).infer(observation(), seed=9)
    control.handle.remove()
    assert np.all(plan.planner.candidate_actions[:, :, 3] == 7.0)  # executed as the constant
    judged = held_stats.normalize_actions(torch.from_numpy(plan.planner.candidate_actions).double())  # what the judge saw, if fixed
    assert np.allclose(plan.planner.member_values[:, 0], ((judged.mean(dim=(1, 2)) + 1) / 2).clamp(0, 1).numpy(), atol=2e-3)


def test_chunks_name_the_weight_versions_that_made_them(policy, planning_model):
    """The one policy contract: a local policy and a planner both answer ``infer`` with an ``ActionChunk``
    that carries the weight versions (and, planned, the planner's record)."""
    assert policy.infer(observation()).policy_version is None  # built, not loaded from a published version
    before = policy.infer(observation()).actions
    policy.load_weights({k: v + 0.05 for k, v in policy.model.denoiser.net.state_dict().items()}, version=3)
    after = policy.infer(observation())
    assert after.policy_version == 3 and after.planner is None and not np.allclose(after.actions, before)
    planner = Planner(policy, planning_model, PlannerConfig(num_candidates=2, future_steps=[1], value_steps=[1]))
    planner.load_weights(planning_model.denoiser.net.state_dict(), version=5)
    chunk = planner.infer(observation(), seed=1)
    assert (chunk.policy_version, chunk.planning_version) == (3, 5)
    assert chunk.planner.candidate_values.shape == (2,) and np.array_equal(chunk.actions, chunk.planner.candidate_actions[chunk.planner.chosen])
