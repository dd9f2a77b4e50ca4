"""Dynamic batching of many callers' requests, without Ray and as a Ray actor on a local cluster."""

from __future__ import annotations

import asyncio
import sys
import threading

import numpy as np
import pytest
import torch

from actors.policies import PolicySpec, ServerPolicy
from actors.policy_server import BatchingServer, PolicyServer, ServerConfig
from cosmos_policy.checkpoint import save_checkpoint
from cosmos_policy.codec import NormalizationStats
from cosmos_policy.errors import ConfigError, InputError
from cosmos_policy.model import CosmosPolicyModel
from cosmos_policy.planner import Planner, PlannerConfig
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


class SizesSeen(CosmosPolicy):
    """The real policy, noting the size of every batch it is given (what padding must make of the batches formed)."""

    sizes: list[int]

    def predict(self, observations, seeds=None, prepared=None):
        self.sizes.append(len(observations))
        return super().predict(observations, seeds, prepared)


def test_batches_are_padded_to_the_captured_sizes_and_the_padding_is_dropped(parts):
    """server.batch_sizes: every batch the network sees has one of the sizes (one CUDA graph each), the replies are the
    real requests' own (each row samples from its own seed), and the batches formed are counted before padding."""
    model, stats, text = parts
    policy = SizesSeen(model, stats, text, PolicyConfig(action_steps=1))
    policy.sizes = []
    server = BatchingServer(policy, config=ServerConfig(max_batch=6, max_wait_ms=100, batch_sizes=[1, 4, 8]))

    async def burst(seeds):
        return await asyncio.gather(*[server.act(observation(s), seed=s) for s in seeds])

    replies = asyncio.run(burst([0, 1, 2])) + asyncio.run(burst([3, 4, 5, 6, 7, 8]))  # a second event loop: it batches there too
    assert policy.sizes and set(policy.sizes) <= {1, 4, 8}, policy.sizes
    formed = sum(n * k for n, k in server.batch_sizes.items())
    assert formed == 9 and server.stats["padded_rows"] == sum(policy.sizes) - 9 > 0, (server.batch_sizes, policy.sizes)
    plain = CosmosPolicy(model, stats, text, PolicyConfig(action_steps=1))
    for seed, reply in enumerate(replies):
        assert np.allclose(reply.actions, plain.infer(observation(seed), seed=seed).actions, atol=1e-4), seed
    server.warm_up(observation(0))  # one batch of each size before the first caller
    assert policy.sizes[-3:] == [1, 4, 8]


class Overlapping(CosmosPolicy):
    """The real policy; the first batch's passes wait until the batch after it has been prepared (a server that
    prepared a batch only once the one before it had finished would leave them waiting out the timeout), and every
    batch's passes note the thread they ran on."""

    def arm(self) -> None:
        self.prepared: list[int] = []
        self.next_prepared = threading.Event()
        self.overlapped: bool | None = None
        self.armed = True

    def prepare(self, observations, stream=None):
        out = super().prepare(observations, stream)
        if getattr(self, "armed", False):
            self.prepared.append(len(observations))
            if len(self.prepared) >= 2:
                self.next_prepared.set()
        return out

    def predict(self, observations, seeds=None, prepared=None):
        self.pass_threads.add(threading.get_ident())
        if getattr(self, "armed", False) and self.overlapped is None:
            self.overlapped = self.next_prepared.wait(timeout=30)
        return super().predict(observations, seeds, prepared)


def test_the_next_batch_is_prepared_while_a_batch_runs_and_the_passes_keep_one_thread(parts):
    """server.prepare_ahead: preprocessing and the VAE encode of batch k+1 happen beside batch k's network passes (on a
    GPU: on a second CUDA stream), and the passes of every batch run on one thread: a compiled network's CUDA graphs belong to the
    thread that captured them (``warm_up`` captures on it too). The replies are the ones made one by one."""
    model, stats, text = parts
    policy = Overlapping(model, stats, text, PolicyConfig(action_steps=1))
    policy.pass_threads = set()
    config = ServerConfig(max_batch=2, max_wait_ms=100, batch_sizes=[1, 2], prepare_ahead=True)  # a GPU's default
    server = BatchingServer(policy, config=config)
    server.warm_up(observation(0))  # one batch of each size, on the passes' thread
    assert len(policy.pass_threads) == 1
    policy.arm()

    async def burst():
        return await asyncio.gather(*[server.act(observation(s), seed=s) for s in range(6)])

    replies = asyncio.run(burst())
    assert policy.overlapped is True and policy.prepared == [2, 2, 2], policy.prepared
    assert len(policy.pass_threads) == 1 and threading.get_ident() not in policy.pass_threads
    assert server.stats["prepare_s"] > 0 and server.stats["act_batches"] >= 3
    plain = CosmosPolicy(model, stats, text, PolicyConfig(action_steps=1))
    for seed, reply in enumerate(replies):
        assert np.allclose(reply.actions, plain.infer(observation(seed), seed=seed).actions, atol=1e-4), seed
    with pytest.raises(ConfigError, match=r"server.prepare_ahead: expected true, false or null \(on a GPU\), got 'yes'"):
        ServerConfig(prepare_ahead="yes")


def test_act_and_plan_requests_mixed_get_their_own_replies(parts, tiny_config, libero):
    """Act and plan requests arriving together: each kind is batched with its own kind, one batch on the device at a
    time, and every caller gets the reply it would get alone."""
    model, stats, text = parts
    policy = CosmosPolicy(model, stats, text, PolicyConfig(action_steps=1))
    planner = Planner(policy, CosmosPolicyModel.build(tiny_config, libero, seed=5).eval(),
                      PlannerConfig(num_candidates=2, future_steps=[1], value_steps=[1]))
    server = BatchingServer(policy, planner, ServerConfig(max_batch=8, max_wait_ms=50, batch_sizes=[2, 4, 8]))

    async def main():
        calls = [server.plan(observation(i), seed=10 * i) if i % 3 == 0 else server.act(observation(i), seed=i) for i in range(7)]
        return await asyncio.gather(*calls)

    replies = asyncio.run(main())
    for i, reply in enumerate(replies):
        alone = planner.infer(observation(i), seed=10 * i) if i % 3 == 0 else policy.infer(observation(i), seed=i)
        assert np.allclose(reply.actions, alone.actions, atol=1e-4), i
        assert (reply.planner is not None) == (i % 3 == 0)
    assert server.stats["plan_batches"] >= 1 and server.stats["act_batches"] >= 1 and server.stats["batches"] < 7


def test_batch_sizes_must_hold_the_largest_batch() -> None:
    with pytest.raises(ConfigError, match=r"server.batch_sizes: expected increasing integers >= 1 whose last holds server.max_batch \(8\)"):
        ServerConfig(max_batch=8, batch_sizes=[1, 4])
    with pytest.raises(ConfigError, match="server.batch_sizes"):
        ServerConfig(max_batch=2, batch_sizes=[4, 2])


@pytest.fixture(scope="module")
def checkpoints(parts, tmp_path_factory, tiny_config, libero):
    model, stats, text = parts
    root = tmp_path_factory.mktemp("served")
    # The versions a served checkpoint was exported at (the learner writes them) are what the server reports.
    save_checkpoint(root / "policy", model, stats=stats, text=text, metadata={"version": 7})
    save_checkpoint(root / "planning", CosmosPolicyModel.build(tiny_config, libero, seed=5), stats=stats, text=text, metadata={"version": 2})
    return root


def test_the_serving_bench_joins_calls_of_one_machine_and_refuses_others() -> None:
    """bench/serving.py --merge: a run split over device calls joins its tables by N (the later call's row of an N
    wins); a file of another machine or setting is refused, naming the field, before any minutes of compiling."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("serving_bench", Path(__file__).resolve().parents[1] / "bench" / "serving.py")
    bench, path = importlib.util.module_from_spec(spec), list(sys.path)
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.path[:] = path  # the bench puts bench/ first on the path for its own imports
    settings = {"machine": "NVIDIA H200", "model": "2b", "compiled": True, "max_wait_ms": 2.0, "plan_every": 0, "float8": "rowwise"}
    earlier = {**settings, "command": "python bench/serving.py --batch-sizes 1,4 --clients 1,4", "batch_sizes": [1, 4], "warm_up_s": 200.0,
               "date": "2026-12-07", "table": [{"clients": 1, "queries_per_s": 11.0}, {"clients": 4, "queries_per_s": 14.0}]}
    bench.check_mergeable(earlier, settings, "a.json")
    calls = [{"command": "python bench/serving.py --batch-sizes 4,8 --clients 4,8", "batch_sizes": [4, 8]}]
    table, joined = bench.merged_table(earlier, [{"clients": 8, "queries_per_s": 16.0, "batch_sizes": [4, 8]},
                                                 {"clients": 4, "queries_per_s": 14.5, "batch_sizes": [4, 8]}], calls)
    assert [(r["clients"], r["queries_per_s"], r["batch_sizes"]) for r in table] == [(1, 11.0, [1, 4]), (4, 14.5, [4, 8]), (8, 16.0, [4, 8])]
    assert [c["command"] for c in joined] == [earlier["command"], calls[0]["command"]]
    with pytest.raises(SystemExit, match=r"--merge a.json: its machine is 'NVIDIA H100 80GB HBM3', this run's is 'NVIDIA H200'"):
        bench.check_mergeable({**earlier, "machine": "NVIDIA H100 80GB HBM3"}, settings, "a.json")
    with pytest.raises(SystemExit, match=r"--merge a.json: its float8 is 'off'"):
        bench.check_mergeable({**earlier, "float8": "off"}, settings, "a.json")
    with pytest.raises(SystemExit, match=r"--merge a.json: expected a 'table' list of rows"):
        bench.check_mergeable({**settings, "table": None}, settings, "a.json")


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
