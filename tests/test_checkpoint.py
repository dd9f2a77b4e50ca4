"""Our checkpoint format round trip, and NVIDIA checkpoints imported offline."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cosmos_policy.checkpoint import import_nvidia_checkpoint, load_checkpoint, save_checkpoint
from cosmos_policy.codec import NormalizationStats
from cosmos_policy.errors import CheckpointError
from cosmos_policy.layout import FrameRole, SampleKind
from cosmos_policy.model import CosmosPolicyModel
from cosmos_policy.synthetic import random_batch
from cosmos_policy.text import RandomTextEncoder, TextEmbeddingCache


def _stats():
    g = torch.Generator().manual_seed(0)
    return NormalizationStats.compute(torch.rand(50, 7, generator=g).numpy(), torch.rand(50, 9, generator=g).numpy())


def _trained(tiny_config, libero):
    """A model whose weights differ from a fresh build (a few optimizer steps)."""
    model = CosmosPolicyModel.build(tiny_config, libero, seed=1)
    batch = random_batch(tiny_config, libero, [SampleKind.POLICY, SampleKind.VALUE])
    opt = torch.optim.AdamW(model.denoiser.parameters(), lr=1e-2)
    for i in range(3):
        out = model.training_loss(batch, torch.Generator().manual_seed(i))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval()


def test_round_trip_is_bit_exact(tmp_path, tiny_config, libero):
    model = _trained(tiny_config, libero)
    text = TextEmbeddingCache()
    text.fill(RandomTextEncoder(32, 16), ["lift the cube"])
    stats = _stats()
    path = save_checkpoint(tmp_path / "ckpt", model, stats=stats, text=text, metadata={"step": 3})
    loaded = load_checkpoint(path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
        assert loaded.model.state_dict()[name].dtype == tensor.dtype
    assert loaded.model.config == model.config and loaded.model.layout == model.layout
    assert loaded.metadata == {"step": 3}
    assert torch.equal(torch.as_tensor(loaded.stats.actions_max), torch.as_tensor(stats.actions_max))
    assert torch.equal(loaded.text.lookup(["lift the cube"]), text.lookup(["lift the cube"]).bfloat16().float())
    batch = random_batch(tiny_config, libero, [SampleKind.POLICY])
    assert torch.equal(loaded.model.sample(batch, seed=3).latents, model.sample(batch, seed=3).latents)
    assert not any(p.requires_grad for p in loaded.model.tokenizer.parameters())
    # Saving again over the same path replaces it completely.
    save_checkpoint(path, model)
    assert load_checkpoint(path).stats is None


def test_corrupt_truncated_and_missing_files_are_clear_errors(tmp_path, tiny_config, libero):
    model = CosmosPolicyModel.build(tiny_config, libero)
    path = save_checkpoint(tmp_path / "ckpt", model, stats=_stats())
    weights = path / "denoiser.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="denoiser.safetensors: checksum mismatch"):
        load_checkpoint(path)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="denoiser.safetensors: unreadable safetensors file"):
        load_checkpoint(path, verify=False)
    (path / "vae.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing vae.safetensors"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="manifest.json: missing"):
        load_checkpoint(tmp_path / "empty")


def test_mismatched_config_is_a_clear_error(tmp_path, tiny_config, libero, robocasa):
    model = CosmosPolicyModel.build(tiny_config, libero)
    path = save_checkpoint(tmp_path / "ckpt", model)
    with pytest.raises(CheckpointError, match="differs from the expected layout 'robocasa'"):
        load_checkpoint(path, expected_layout=robocasa)
    # A config edited to another size no longer matches the weights.
    cfg = path / "config.yaml"
    cfg.write_text(cfg.read_text().replace("num_layers: 2", "num_layers: 3"))
    with pytest.raises(CheckpointError, match="config.yaml: checksum mismatch"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"weights do not match the model config: \d+ missing \(e.g. \['transformer_blocks.2"):
        load_checkpoint(path, verify=False)
    cfg.write_text(cfg.read_text().replace("num_layers: 3", "num_layers: -1"))
    with pytest.raises(CheckpointError, match="num_layers: expected a positive integer"):
        load_checkpoint(path, verify=False)


# diffusers -> NVIDIA names: the inverse of diffusers' Cosmos 2.0 converter, written out here so the
# test builds a state dict exactly as NVIDIA's `.pt` files name it.
TO_NVIDIA = [
    ("time_embed.t_embedder", "t_embedder.1"),
    ("time_embed.norm", "t_embedding_norm"),
    ("transformer_blocks", "blocks"),
    ("norm1.linear_1", "adaln_modulation_self_attn.1"),
    ("norm1.linear_2", "adaln_modulation_self_attn.2"),
    ("norm2.linear_1", "adaln_modulation_cross_attn.1"),
    ("norm2.linear_2", "adaln_modulation_cross_attn.2"),
    ("norm3.linear_1", "adaln_modulation_mlp.1"),
    ("norm3.linear_2", "adaln_modulation_mlp.2"),
    ("attn1", "self_attn"),
    ("attn2", "cross_attn"),
    ("to_q", "q_proj"),
    ("to_k", "k_proj"),
    ("to_v", "v_proj"),
    ("to_out.0", "output_proj"),
    ("norm_q", "q_norm"),
    ("norm_k", "k_norm"),
    ("ff.net.0.proj", "mlp.layer1"),
    ("ff.net.2", "mlp.layer2"),
    ("patch_embed.proj", "x_embedder.proj.1"),
    ("norm_out.linear_1", "final_layer.adaln_modulation.1"),
    ("norm_out.linear_2", "final_layer.adaln_modulation.2"),
    ("proj_out", "final_layer.linear"),
]


def nvidia_state(net: torch.nn.Module, prefix: str = "net.") -> dict[str, torch.Tensor]:
    out = {}
    for key, value in net.state_dict().items():
        for ours, theirs in TO_NVIDIA:
            key = key.replace(ours, theirs)
        out[prefix + key] = value.clone()
    # What NVIDIA's training state carries besides weights; the importer must drop it.
    out[prefix + "pos_embedder.dim_spatial_range"] = torch.arange(4)
    out[prefix + "pos_embedder.dim_temporal_range"] = torch.arange(4)
    out[prefix + "accum_iteration"] = torch.tensor(1000)
    out[prefix + "blocks.0.self_attn.q_proj._extra_state"] = torch.zeros(0)
    return out


def _save_vae(model, path):
    model.tokenizer.vae.save_pretrained(path)
    return path


def test_nvidia_key_names_import_with_identical_outputs(tmp_path, tiny_config, libero):
    source = _trained(tiny_config, libero)
    state = nvidia_state(source.denoiser.net)
    assert "net.blocks.0.self_attn.q_proj.weight" in state and "net.x_embedder.proj.1.weight" in state
    pt = tmp_path / "Cosmos-Policy-LIBERO-Predict2-2B.pt"
    torch.save({"model": state, "iteration": 40000}, pt)
    stats = tmp_path / "libero_dataset_statistics.json"
    _stats().save(stats)
    text = TextEmbeddingCache()
    text.fill(RandomTextEncoder(32, 16), ["put the bowl on the plate"])
    text.save(tmp_path / "libero_t5_embeddings.pkl")

    loaded = import_nvidia_checkpoint(
        pt, vae=_save_vae(source, tmp_path / "vae"), config=tiny_config, layout="libero",
        statistics=stats, text_embeddings=tmp_path / "libero_t5_embeddings.pkl",
    )
    model = loaded.model
    assert loaded.stats.action_dim == 7 and "put the bowl on the plate" in loaded.text
    for name, tensor in source.denoiser.net.state_dict().items():
        assert torch.equal(model.denoiser.net.state_dict()[name], tensor), name
    batch = random_batch(tiny_config, libero, [SampleKind.POLICY, SampleKind.WORLD_MODEL])
    x = torch.randn(2, 16, 9, 8, 8)
    roles = libero.role_tensor(batch.kinds)
    with torch.no_grad():
        a = source.denoiser(x, torch.tensor([5.0, 20.0]), x, roles == FrameRole.CLEAN, batch.text)
        b = model.denoiser(x, torch.tensor([5.0, 20.0]), x, roles == FrameRole.CLEAN, batch.text)
    assert torch.equal(a, b)
    assert torch.equal(model.sample(batch, seed=1).latents, source.sample(batch, seed=1).latents)
    # And it saves in our format like any model.
    save_checkpoint(tmp_path / "ours", model, stats=loaded.stats, text=loaded.text)
    assert load_checkpoint(tmp_path / "ours").text.instructions() == ["put the bowl on the plate"]


def test_base_checkpoint_prefers_ema_weights(tmp_path, tiny_config, libero):
    """NVIDIA's base model keeps an EMA copy; the official fine-tuning loads it into the net."""
    regular = CosmosPolicyModel.build(tiny_config, libero, seed=1)
    ema = CosmosPolicyModel.build(tiny_config, libero, seed=2)
    pt = tmp_path / "model-480p-16fps.pt"
    torch.save({**nvidia_state(regular.denoiser.net), **nvidia_state(ema.denoiser.net, "net_ema.")}, pt)
    vae = _save_vae(regular, tmp_path / "vae")
    with_ema = import_nvidia_checkpoint(pt, vae=vae, config=tiny_config, layout=libero)
    without = import_nvidia_checkpoint(pt, vae=vae, config=tiny_config, layout=libero, prefer_ema=False)
    key = "transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(with_ema.model.denoiser.net.state_dict()[key], ema.denoiser.net.state_dict()[key])
    assert torch.equal(without.model.denoiser.net.state_dict()[key], regular.denoiser.net.state_dict()[key])


class NotATensor:
    pass


def test_bad_nvidia_files_are_clear_errors(tmp_path, tiny_config, libero):
    model = CosmosPolicyModel.build(tiny_config, libero)
    vae = _save_vae(model, tmp_path / "vae")
    good = tmp_path / "good.pt"
    torch.save(nvidia_state(model.denoiser.net), good)

    with pytest.raises(CheckpointError, match="weights: .*missing.pt not found"):
        import_nvidia_checkpoint(tmp_path / "missing.pt", vae=vae, config=tiny_config, layout=libero)
    # Every missing or empty file is named at once, before anything is read.
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"weights: .*empty.pt is empty \(0 bytes\); statistics: .*nope.json not found; "
                                              r"text_embeddings: .*nope.pkl not found; vae: .*no_vae is not a directory"):
        import_nvidia_checkpoint(empty, vae=tmp_path / "no_vae", config=tiny_config, layout=libero, statistics=tmp_path / "nope.json",
                                 text_embeddings=tmp_path / "nope.pkl")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable PyTorch checkpoint"):
        import_nvidia_checkpoint(truncated, vae=vae, config=tiny_config, layout=libero)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"encoder.layer.0.weight": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError, match="no 'net.'-prefixed DiT weights"):
        import_nvidia_checkpoint(other, vae=vae, config=tiny_config, layout=libero)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": nvidia_state(model.denoiser.net), "extra": NotATensor()}, pickled)
    with pytest.raises(CheckpointError, match="allow_pickle=True only if you trust this file"):
        import_nvidia_checkpoint(pickled, vae=vae, config=tiny_config, layout=libero)
    assert import_nvidia_checkpoint(pickled, vae=vae, config=tiny_config, layout=libero, allow_pickle=True).model is not None
    # Weights of another size (a 3-block network) against the tiny config.
    bigger = tiny_config.__class__(**{**tiny_config.__dict__})
    bigger.network = tiny_config.network.__class__(**{**tiny_config.network.__dict__, "num_layers": 3})
    mismatched = tmp_path / "mismatched.pt"
    torch.save(nvidia_state(CosmosPolicyModel.build(bigger, libero).denoiser.net), mismatched)
    with pytest.raises(CheckpointError, match=r"mismatched.pt: weights do not match the model config: \d+ unexpected"):
        import_nvidia_checkpoint(mismatched, vae=vae, config=tiny_config, layout=libero)
    # A VAE directory whose config is not the model's.
    cfg = json.loads((vae / "config.json").read_text())
    wrong_vae = tmp_path / "wrong_vae"
    shutil.copytree(vae, wrong_vae)
    (wrong_vae / "config.json").write_text(json.dumps({**cfg, "base_dim": 96}))
    with pytest.raises(CheckpointError, match="VAE base_dim is 96"):
        import_nvidia_checkpoint(good, vae=wrong_vae, config=tiny_config, layout=libero)
    with pytest.raises(CheckpointError, match="vae: .*config.json not found"):
        import_nvidia_checkpoint(good, vae=tmp_path, config=tiny_config, layout=libero)


def test_legacy_torch_save_format_imports(tmp_path, tiny_config, libero):
    model = CosmosPolicyModel.build(tiny_config, libero)
    pt = tmp_path / "legacy.pt"
    torch.save(nvidia_state(model.denoiser.net), pt, _use_new_zipfile_serialization=False)
    loaded = import_nvidia_checkpoint(pt, vae=_save_vae(model, tmp_path / "vae"), config=tiny_config, layout=libero)
    key = "proj_out.weight"
    assert torch.equal(loaded.model.denoiser.net.state_dict()[key], model.denoiser.net.state_dict()[key])
