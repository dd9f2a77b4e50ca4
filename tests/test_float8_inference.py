"""Float8 inference (``server.float8``, ``cosmos_policy.float8``): the real float8 products, which run on a CPU too.

- the blocks' token-wise layers take them, the state dict stays the bf16/fp32 one, outputs stay near the exact ones;
- weights loaded later (a published version) reach the float8 copies, so a server never serves stale quantized weights;
- a server with float8 (and ``server.compile``, eager on a CPU) serves and swaps versions through its batching;
- bad settings are clear errors naming the field.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from actors.config import ServerConfig
from actors.policy_server import BatchingServer, accelerate, warm_up_observation
from cosmos_policy.codec import NormalizationStats
from cosmos_policy.errors import ConfigError
from cosmos_policy.float8 import Float8InferenceLinear, convert_inference_float8, float8_layer, resolve_inference_float8
from cosmos_policy.model import GRAPHS_OPTIONS, CosmosPolicyModel
from cosmos_policy.policy import CosmosPolicy, Observation, PolicyConfig
from cosmos_policy.text import RandomTextEncoder, TextEmbeddingCache
from launch.config import load_experiment

INSTRUCTION = "put the bowl on the plate"


def observation(seed: int) -> Observation:
    rng = np.random.default_rng(seed)
    return Observation(images={cam: rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for cam in ("primary", "wrist")},
                       proprio=rng.random(9), instruction=INSTRUCTION)


@pytest.fixture(scope="module")
def stats_text(tiny_config):
    rng = np.random.default_rng(0)
    text = TextEmbeddingCache()
    text.fill(RandomTextEncoder(tiny_config.text.embed_dim, tiny_config.text.max_length), [INSTRUCTION])
    return NormalizationStats.compute(rng.random((100, 7)), rng.random((100, 9))), text


def policy_of(tiny_config, libero, stats_text, float8: str = "off", state: dict | None = None) -> CosmosPolicy:
    """The seed-0 model (its network's weights ``state`` if given, loaded before any conversion) with ``float8``."""
    model = CosmosPolicyModel.build(tiny_config, libero, seed=0).eval()
    if state is not None:
        model.denoiser.net.load_state_dict(state)
    model.accelerate(float8)
    return CosmosPolicy(model, *stats_text, PolicyConfig(action_steps=2))


def test_float8_takes_the_token_wise_layers_and_keeps_the_state_dict(tiny_config, libero, stats_text):
    exact = policy_of(tiny_config, libero, stats_text)
    net = CosmosPolicyModel.build(tiny_config, libero, seed=0).eval().denoiser.net
    before = {k: (v.shape, v.dtype) for k, v in net.state_dict().items()}
    chosen = {name for name, module in net.named_modules() if float8_layer(module, name)}
    assert len(chosen) == 10 * tiny_config.network.num_layers  # 4 + 4 attention projections and 2 MLP layers per block
    assert convert_inference_float8(net, "rowwise") == len(chosen)
    assert {name for name, m in net.named_modules() if isinstance(m, Float8InferenceLinear)} == chosen
    assert {k: (v.shape, v.dtype) for k, v in net.state_dict().items()} == before  # the float8 copies are not state
    float8 = policy_of(tiny_config, libero, stats_text, float8="rowwise")
    for seed in range(3):
        a, b = exact.infer(observation(seed), seed=seed), float8.infer(observation(seed), seed=seed)
        assert not np.array_equal(a.actions, b.actions)  # the float8 products did run
        assert np.abs(a.actions - b.actions).mean() < 0.05 * np.abs(a.actions).mean() + 1e-3, seed
        assert abs(a.value - b.value) < 0.05


def another_version(tiny_config, libero, seed: int) -> dict[str, torch.Tensor]:
    """Network weights of a later version: the seed-0 network's, moved."""
    net = CosmosPolicyModel.build(tiny_config, libero, seed=0).denoiser.net
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in net.state_dict().items()}


def test_loaded_weights_reach_the_float8_copies(tiny_config, libero, stats_text):
    """A version loaded into a float8 policy serves exactly what a policy built with those weights serves."""
    served = policy_of(tiny_config, libero, stats_text, float8="tensorwise")
    state = another_version(tiny_config, libero, seed=3)
    fresh = policy_of(tiny_config, libero, stats_text, float8="tensorwise", state=state)
    old = served.infer(observation(0), seed=0).actions
    served.load_weights(state, 4)
    new = served.infer(observation(0), seed=0).actions
    assert served.version == 4 and not np.allclose(new, old)
    assert np.allclose(new, fresh.infer(observation(0), seed=0).actions, atol=1e-6)


def test_a_float8_server_serves_and_takes_new_versions(tiny_config, libero, stats_text):
    policy = CosmosPolicy(CosmosPolicyModel.build(tiny_config, libero, seed=0).eval(), *stats_text, PolicyConfig(action_steps=2))
    config = ServerConfig(max_batch=4, max_wait_ms=50, batch_sizes=[1, 4], compile=True, float8="rowwise")
    assert accelerate(policy, None, config) == "float8 rowwise, eager (server.compile needs a GPU)"
    server = BatchingServer(policy, config=config)
    server.warm_up(warm_up_observation(policy))  # a valid request of each size from the model's own layout and cache
    assert server.stats["padded_rows"] == 0 and server.stats["act_batches"] == 2

    async def burst():
        return await asyncio.gather(*[server.act(observation(s), seed=s) for s in range(3)])

    # A row's float8 scales are its own, but a batch's sums may round apart from a lone query's and move a value across a
    # float8 step: batched replies match lone ones to well within float8's error, not to the last bit.
    reference = policy_of(tiny_config, libero, stats_text, float8="rowwise")
    first = asyncio.run(burst())
    for seed, reply in enumerate(first):
        assert np.allclose(reply.actions, reference.infer(observation(seed), seed=seed).actions, atol=0.02), seed
    state = another_version(tiny_config, libero, seed=7)
    newer = policy_of(tiny_config, libero, stats_text, float8="rowwise", state=state)
    server.set_weights(9, state)
    replies = asyncio.run(burst())
    assert {r.policy_version for r in replies} == {9}
    for seed, reply in enumerate(replies):
        assert np.allclose(reply.actions, newer.infer(observation(seed), seed=seed).actions, atol=0.02), seed
        assert np.abs(reply.actions - first[seed].actions).max() > 0.05, seed  # the new version, not the old one


def test_float8_and_compile_settings_are_checked(tiny_config, libero):
    with pytest.raises(ConfigError, match=r"server.float8: expected one of \('off', 'auto', 'rowwise', 'tensorwise'\), got 'e4m3'"):
        ServerConfig(float8="e4m3")
    assert ServerConfig(float8=False).float8 == "off"  # YAML's bare `off`
    with pytest.raises(ConfigError, match="server.compile: needs server.batch_sizes"):
        ServerConfig(compile=True)
    with pytest.raises(ConfigError, match="server.compile: expected true or false"):
        ServerConfig(compile="yes", batch_sizes=[8])
    assert load_experiment("quickstart", ["server.float8=off"]).server.float8 == "off"
    assert resolve_inference_float8("auto", torch.device("cpu")) == "off"  # auto: float8 only where it pays
    model = CosmosPolicyModel.build(tiny_config, libero, seed=0)
    with pytest.raises(ConfigError, match="server.compile: expected 'off', 'graphs' or 'blocks', got 'cuda'"):
        model.accelerate("off", "cuda")
    with pytest.raises(ConfigError, match="bench.float8: expected one of"):
        model.accelerate("fp8", field="bench")
    # The graphs' inductor options name settings this torch has (a name it lacks would fail every GPU server's start).
    with torch._inductor.config.patch({**GRAPHS_OPTIONS, "triton.cudagraphs": True}):
        assert torch._inductor.config.triton.multi_kernel == 1 and torch._inductor.config.fx_graph_cache is False
