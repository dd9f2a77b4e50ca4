"""Dynamic batching of many callers' requests, without Ray and as a Ray actor on a local cluster."""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import pytest
import torch

from actors.policies import PolicySpec, ServerPolicy
from actors.policy_server import BatchingServer, PolicyServer, ServerConfig
from cosmos_policy.checkpoint import save_checkpoint
from cosmos_policy.codec import NormalizationStats
from cosmos_policy.errors import InputError
from cosmos_policy.model import CosmosPolicyModel
from cosmos_policy.planner import PlannerConfig
from cosmos_policy.policy import CosmosPolicy, Observation, PolicyConfig
from cosmos_policy.text import RandomTextEncoder, TextEmbeddingCache

INSTRUCTIONS = ["open the drawer", "put the bowl on the plate"]


def observation(seed: int) -> Observation:
    rng = np.random.default_rng(seed)
    return Observation(
        images={cam: rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for cam in ("primary", "wrist")},
        proprio=rng.random(9),
        instruction=INSTRUCTIONS[seed % 2],
    )


@pytest.fixture(scope="module")
def parts(tiny_config, libero):
    rng = np.random.default_rng(0)
    stats = NormalizationStats.compute(rng.random((100, 7)), rng.random((100, 9)))
    text = TextEmbeddingCache()
    text.fill(RandomTextEncoder(tiny_config.text.embed_dim, tiny_config.text.max_length), INSTRUCTIONS)
    return CosmosPolicyModel.build(tiny_config, libero, seed=0).eval(), stats, text


def test_concurrent_requests_share_batches_without_ray(parts):
    model, stats, text = parts
    policy = CosmosPolicy(model, stats, text, PolicyConfig(action_steps=2))
    policy.version = 3
    server = BatchingServer(policy, config=ServerConfig(max_batch=8, max_wait_ms=50))

    async def main():
        return await asyncio.gather(*[server.act(observation(i), seed=i) for i in range(8)])

    replies = asyncio.run(main())
    assert server.stats["requests"] == 8 and server.stats["batches"] < 8
    for i, reply in enumerate(replies):
        expected = policy.infer(observation(i), seed=i)
        assert np.allclose(reply.actions, expected.actions, atol=1e-4)
        assert reply.policy_version == 3
    assert server.stats["act_batches"] < len(replies)  # requests shared batches


def test_a_malformed_request_fails_alone(parts):
    model, stats, text = parts
    server = BatchingServer(CosmosPolicy(model, stats, text, PolicyConfig(action_steps=1)), config=ServerConfig(max_wait_ms=50))
    bad = observation(1)
    bad.proprio[0] = np.nan

    async def main():
        return await asyncio.gather(server.act(observation(0)), server.act(bad), return_exceptions=True)

    good, err = asyncio.run(main())
    assert good.actions.shape == (16, 7)
    assert isinstance(err, InputError) and "observation.proprio: non-finite" in str(err)


@pytest.fixture(scope="module")
def checkpoints(parts, tmp_path_factory, tiny_config, libero):
    model, stats, text = parts
    root = tmp_path_factory.mktemp("served")
    # The versions a served checkpoint was exported at (the learner writes them) are what the server reports.
    save_checkpoint(root / "policy", model, stats=stats, text=text, metadata={"version": 7})
    save_checkpoint(root / "planning", CosmosPolicyModel.build(tiny_config, libero, seed=5), stats=stats, text=text, metadata={"version": 2})
    return root


def test_eight_ray_callers_get_their_own_replies_in_fewer_passes(ray_local, parts, checkpoints):
    ray = ray_local
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    spec = PolicySpec(checkpoint=str(checkpoints / "policy"), planning_checkpoint=str(checkpoints / "planning"),
                      policy=PolicyConfig(action_steps=2), planner=PlannerConfig(num_candidates=2, future_steps=[1], value_steps=[1]))
    server = PolicyServer.options(num_cpus=1).remote(spec, ServerConfig(max_batch=8, max_wait_ms=200))

    @ray.remote(num_cpus=0)
    def caller(client, seed):
        chunk = client.infer(observation(seed), seed=seed)  # the Policy contract, through the server
        return seed, chunk.actions, chunk.policy_version, None

    results = ray.get([caller.remote(ServerPolicy(server), i) for i in range(8)])
    model, stats, text = parts
    local = CosmosPolicy(model, stats, text, PolicyConfig(action_steps=2))
    for seed, actions, version, _ in results:
        assert np.allclose(actions, local.infer(observation(seed), seed=seed).actions, atol=1e-4), seed
        assert version == 7
    node_ips = {n["NodeManagerAddress"] for n in ray.nodes()}
    assert node_ips == {"127.0.0.1"}  # nothing beyond loopback
    stats_now = ray.get(server.stats.remote())
    assert stats_now["requests"] == 8 and stats_now["act_batches"] < 8
    # Planning requests are batched too and report both versions.
    plans = ray.get([server.plan.remote(observation(i), seed=10 * i) for i in range(3)])
    assert all(p.planner.candidate_actions.shape == (2, 16, 7) and (p.policy_version, p.planning_version) == (7, 2) for p in plans)
    # Bad input reaches the caller as the same error type.
    bad = observation(0)
    bad.images.pop("wrist")
    with pytest.raises(InputError, match="missing camera 'wrist'"):
        ray.get(server.act.remote(bad))
    # New weights are swapped in between batches; replies say which version produced them.
    before = ray.get(server.act.remote(observation(0), seed=0)).actions
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in model.denoiser.net.state_dict().items()}
    ray.get(server.set_weights.remote(8, state))
    after = ray.get(server.act.remote(observation(0), seed=0))
    assert after.policy_version == 8 and not np.allclose(after.actions, before)
    ray.kill(server)
