"""Instruction embeddings: the official pickle format, a safe reader, and the T5 path offline."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from cosmos_policy.errors import CheckpointError, InputError
from cosmos_policy.text import RandomTextEncoder, T5TextEncoder, TextEmbeddingCache


def test_official_pickle_format_round_trip(tmp_path):
    enc = RandomTextEncoder(embed_dim=32, max_length=16)
    cache = TextEmbeddingCache()
    assert cache.fill(enc, ["pick up the bowl", "open the drawer", "pick up the bowl"]) == 2
    path = tmp_path / "t5_embeddings.pkl"
    cache.save(path)
    with path.open("rb") as f:
        raw = pickle.load(f)  # what the official code reads: {instruction: (1, L, D) bfloat16}
    assert set(raw) == {"pick up the bowl", "open the drawer"}
    assert raw["open the drawer"].shape == (1, 16, 32) and raw["open the drawer"].dtype == torch.bfloat16
    again = TextEmbeddingCache.load(path)
    assert again.shape == (16, 32) and len(again) == 2
    got = again.lookup(["open the drawer", "pick up the bowl"])
    assert got.shape == (2, 16, 32) and got.dtype == torch.float32
    assert torch.equal(got[0], raw["open the drawer"][0].float())


def test_files_written_by_the_official_code_read(tmp_path):
    data = {"put the bowl on the plate": torch.randn(1, 512, 1024).to(torch.bfloat16)}
    path = tmp_path / "libero_t5_embeddings.pkl"
    path.write_bytes(pickle.dumps(data))
    cache = TextEmbeddingCache.load(path)
    assert cache.shape == (512, 1024)
    assert torch.equal(cache.lookup(["put the bowl on the plate"], dtype=torch.bfloat16)[0], data["put the bowl on the plate"][0])


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


def test_pickles_that_run_code_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"x": _Evil()}))
    with pytest.raises(CheckpointError, match="posix.system is not allowed|system is not allowed"):
        TextEmbeddingCache.load(path)
    assert not (tmp_path / "pwned_marker").exists()


def test_bad_caches_are_clear_errors(tmp_path):
    cache = TextEmbeddingCache({"a": torch.zeros(16, 32)})
    with pytest.raises(InputError, match=r"not in the text-embedding cache: \['b'\]"):
        cache.lookup(["a", "b"])
    with pytest.raises(InputError, match="differs from the cache's"):
        cache.add("c", torch.zeros(8, 32))
    with pytest.raises(InputError, match="non-finite"):
        cache.add("d", torch.full((16, 32), float("nan")))
    (tmp_path / "trunc.pkl").write_bytes(pickle.dumps({"a": torch.zeros(1, 4, 4)})[:40])
    with pytest.raises(CheckpointError, match="trunc.pkl: not a readable"):
        TextEmbeddingCache.load(tmp_path / "trunc.pkl")
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(CheckpointError, match="expected a dict"):
        TextEmbeddingCache.load(tmp_path / "list.pkl")
    with pytest.raises(CheckpointError, match="not found"):
        TextEmbeddingCache.load(tmp_path / "missing.pkl")


def test_random_encoder_is_stable_and_distinct():
    enc = RandomTextEncoder(embed_dim=8, max_length=4)
    a, b = enc.encode(["lift the cube", "open the door"])
    assert torch.equal(enc.encode(["lift the cube"])[0], a)
    assert not torch.allclose(a, b)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    """A real transformers T5 encoder and tokenizer, tiny, saved to a local directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "pick", "up", "the", "bowl", "open", "drawer", "put", "on", "plate"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    path = tmp_path_factory.mktemp("t5")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1)
    T5EncoderModel(config).save_pretrained(path)
    return path


def test_t5_encoder_path_fills_the_cache(tiny_t5, tmp_path):
    enc = T5TextEncoder(tiny_t5, max_length=16)
    assert enc.embed_dim == 32
    out = enc.encode(["pick up the bowl", "open the drawer"])
    assert out.shape == (2, 16, 32)
    # 4 words + </s> = 5 tokens: positions past the prompt are zeroed, as the official code does.
    assert torch.all(out[0, 5:] == 0) and torch.all(out[0, :5].abs().sum(-1) > 0)
    assert torch.all(out[1, 4:] == 0) and torch.all(out[1, :4].abs().sum(-1) > 0)
    cache = TextEmbeddingCache()
    cache.fill(enc, ["pick up the bowl"])
    cache.save(tmp_path / "t5.pkl")
    assert torch.allclose(TextEmbeddingCache.load(tmp_path / "t5.pkl").lookup(["pick up the bowl"])[0], out[0], atol=1e-2)


def test_t5_encoder_missing_directory_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no T5 encoder here"):
        T5TextEncoder(tmp_path)


def test_encode_instructions_cli(tiny_t5, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    listing = tmp_path / "instructions.txt"
    listing.write_text("pick up the bowl\nopen the drawer\n")
    out = tmp_path / "t5_embeddings.pkl"
    for extra in (["--instructions", str(listing)], ["put the bowl on the plate", "open the drawer"]):
        result = subprocess.run(
            [sys.executable, str(root / "launch" / "encode_instructions.py"), "--t5", str(tiny_t5), "--out", str(out),
             "--max-length", "16", *extra],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr[-2000:]
    assert "3 instructions (1 new)" in result.stdout
    assert sorted(TextEmbeddingCache.load(out).instructions()) == ["open the drawer", "pick up the bowl", "put the bowl on the plate"]
