"""Float8 inference (``server.float8``, ``cosmos_policy.float8``): the real float8 products, which run on a CPU too.

- the blocks' token-wise layers take them, the state dict stays the bf16/fp32 one, outputs stay near the exact ones;
- weights loaded later (a published version) reach the float8 copies, so a server never serves stale quantized weights;
- a server with float8 (and ``server.compile``, eager on a CPU) serves and swaps versions through its batching;
- bad settings are clear errors naming the field.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

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


def test_fused_blocks_compute_the_plain_float8_blocks_numbers(tiny_config, libero, stats_text):
    """The fused blocks (``cosmos_policy.fused_float8``, rowwise's default) give the plain float8 layers' actions, keep the
    state dict, take loaded versions into their joined q, k, v copy in place, and trace whole under torch.compile."""
    from cosmos_policy.fused_float8 import FusedFloat8Block, add_norm_quantize, gelu_quantize_rows, norm_quantize

    fused = policy_of(tiny_config, libero, stats_text, float8="rowwise")
    plain_model = CosmosPolicyModel.build(tiny_config, libero, seed=0).eval()
    before = {k: (v.shape, v.dtype) for k, v in plain_model.denoiser.net.state_dict().items()}
    convert_inference_float8(plain_model.denoiser.net, "rowwise", fuse=False)
    plain = CosmosPolicy(plain_model, *stats_text, PolicyConfig(action_steps=2))
    net = fused.model.denoiser.net
    assert sum(isinstance(b, FusedFloat8Block) for b in net.transformer_blocks) == tiny_config.network.num_layers
    assert not any(isinstance(b, FusedFloat8Block) for b in plain_model.denoiser.net.transformer_blocks)
    assert {k: (v.shape, v.dtype) for k, v in net.state_dict().items()} == before
    for seed in range(2):
        assert np.allclose(fused.infer(observation(seed), seed=seed).actions, plain.infer(observation(seed), seed=seed).actions, atol=1e-5)

    joined = net.transformer_blocks[0].attn1.qkv_f8
    pointer, state = joined.data_ptr(), another_version(tiny_config, libero, seed=5)
    fused.load_weights(state, 2)
    plain.load_weights(state, 2)
    assert net.transformer_blocks[0].attn1.qkv_f8.data_ptr() == pointer  # in place: captured graphs stay valid
    assert np.allclose(fused.infer(observation(0), seed=0).actions, plain.infer(observation(0), seed=0).actions, atol=1e-5)

    # A block called with shapes the kernels are not written for (no whole frames) runs the block's own forward.
    block, other = net.transformer_blocks[0], plain_model.denoiser.net.transformer_blocks[0]
    tpf, d = block.norm1.tokens_per_frame, block.norm1.norm.normalized_shape[0]
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, 5, tiny_config.text.embed_dim, generator=g)
    for tokens in (2 * tpf, tpf + 1):
        x, e = torch.randn(2, tokens, d, generator=g), torch.randn(2, tokens, d, generator=g)
        assert torch.allclose(block(x, text, e), other(x, text, e), atol=1e-5), tokens

    # The kernels' fake shapes agree with what they compute, so whole-graph compiles trace them.
    rows, frames = 2 * tpf, 2
    x, y = torch.randn(rows, d), torch.randn(rows, d)
    gate, shift, scale = (torch.randn(frames, d) for _ in range(3))
    torch.library.opcheck(add_norm_quantize, (x, y, gate, shift, scale, tpf, 1e-6))
    torch.library.opcheck(norm_quantize, (x, shift, scale, tpf, 1e-6))
    torch.library.opcheck(gelu_quantize_rows, (torch.randn(rows, 4 * d),))
    calls: list[str] = []

    def backend(graph: torch.fx.GraphModule, _inputs: list) -> object:
        calls.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return graph.forward

    traced = torch.compile(block, backend=backend, fullgraph=True)
    x, e = torch.randn(2, 2 * tpf, d, generator=g), torch.randn(2, 2 * tpf, d, generator=g)
    assert torch.allclose(traced(x, text, e), block(x, text, e))
    assert sum("cosmos_policy" in c for c in calls) == 4, calls  # the fused path ran: norm, two add-norms, GELU


def test_the_float8_success_bench_pairs_the_same_episodes() -> None:
    """bench/float8_success.py compares recipes episode by episode: the discordant counts, the paired difference and
    McNemar's exact p-value; evaluations of different episodes are refused."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from float8_success import mcnemar_exact_p, paired

    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(5, 0) == pytest.approx(2 / 32)  # five discordant episodes all one way: 2 x (1/2)^5
    assert mcnemar_exact_p(3, 3) == 1.0
    first = [{"seed": s, "task": "lift", "trial": t, "success": t < 6} for s in (0, 1) for t in range(10)]
    second = [{**e, "success": e["trial"] < 5 or e["trial"] == 9} for e in reversed(first)]  # order does not matter
    figures = paired(first, second)
    # per seed: trial 5 succeeds under the first only, trial 9 under the second only
    assert (figures["episodes"], figures["only_first"], figures["only_second"], figures["difference_points"]) == (20, 2, 2, 0.0)
    assert figures["mcnemar_exact_p"] == 1.0
    with pytest.raises(SystemExit, match="same episodes"):
        paired(first, second[:-1])
