"""The VAE wrapper: clip assembly, posterior-mean encoding, prefix encoding, future-image decoding."""

from __future__ import annotations

import pytest
import torch

from cosmos_policy.errors import InputError
from cosmos_policy.layout import SampleKind
from cosmos_policy.synthetic import random_batch


def test_clip_assembly_black_frame_and_four_copies(tiny_model, tiny_config, libero):
    batch = random_batch(tiny_config, libero, [SampleKind.POLICY] * 2)
    clip = tiny_model.tokenizer.assemble_clip(batch.images)
    assert clip.shape == (2, 3, 33, 64, 64)
    assert torch.all(clip[:, :, 0] == -1.0)  # black frame 0 (uint8 0 -> -1)
    for i, slot in enumerate(libero.slots[1:], start=1):
        frames = clip[:, :, 1 + 4 * (i - 1) : 1 + 4 * i]
        assert torch.equal(frames, frames[:, :, :1].expand_as(frames)), slot.name  # one slot = 4 identical frames
        if slot.kind.value == "image":
            expected = batch.images[slot.name].permute(0, 3, 1, 2).float() / 127.5 - 1
            assert torch.equal(frames[:, :, 0], expected)
        else:
            assert torch.all(frames == -1.0), slot.name  # proprio/action/value placeholders are black


def test_missing_future_image_takes_the_current_one(tiny_model, tiny_config, libero):
    batch = random_batch(tiny_config, libero, [SampleKind.POLICY])
    current = {k: v for k, v in batch.images.items() if k.startswith("current")}
    clip = tiny_model.tokenizer.assemble_clip(current)
    assert torch.equal(clip[:, :, 1 + 4 * 5], clip[:, :, 1 + 4 * 1])  # future wrist = current wrist


def test_encode_is_the_normalized_posterior_mean(tiny_model, tiny_config, libero):
    batch = random_batch(tiny_config, libero, [SampleKind.POLICY])
    tok = tiny_model.tokenizer
    clip = tok.assemble_clip(batch.images)
    latents = tok.encode(clip)
    assert latents.shape == (1, 16, 9, 8, 8) and latents.dtype == torch.float32
    with torch.no_grad():
        mean = tok.vae.encode(clip).latent_dist.mean
    mu = torch.tensor(tok.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    sd = torch.tensor(tok.vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert torch.allclose(latents, (mean - mu) / sd, atol=1e-6)
    assert torch.equal(tok.encode(clip), latents)  # no sampling: deterministic


def test_prefix_encoding_equals_full_encoding_on_those_frames(tiny_model, tiny_config, libero):
    """The causal VAE lets inference encode only the conditioning frames."""
    batch = random_batch(tiny_config, libero, [SampleKind.POLICY] * 2)
    full = tiny_model.encode(batch)
    prefix = tiny_model.encode(batch, num_frames=4)
    assert torch.allclose(prefix[:, :, :4], full[:, :, :4], atol=1e-5)
    assert torch.all(prefix[:, :, 4:] == 0)


def test_decode_future_images_undoes_injection(tiny_model, tiny_config, libero):
    batch = random_batch(tiny_config, libero, [SampleKind.POLICY])
    reference = tiny_model.encode(batch)
    injected = tiny_model.inject(reference, batch)
    images = tiny_model.tokenizer.decode_future_images(injected, reference)
    assert set(images) == {"wrist", "primary"}
    assert images["wrist"].shape == (1, 64, 64, 3) and images["wrist"].dtype == torch.uint8
    # Whatever was injected into the non-image frames, the decoded future images are the same.
    other = injected.clone()
    other[:, :, libero.injected_indices()] = 5.0
    again = tiny_model.tokenizer.decode_future_images(other, reference)
    assert torch.equal(again["primary"], images["primary"])
    # ...and they are the frames the decoder gives for the clean clip at pixel index 4(k-1)+1.
    pixels = tiny_model.tokenizer.decode(reference)
    expected = ((pixels[:, :, 1 + 4 * (6 - 1)] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(images["wrist"], expected)


def test_bad_images_are_clear_errors(tiny_model, tiny_config, libero):
    batch = random_batch(tiny_config, libero, [SampleKind.POLICY])
    tok = tiny_model.tokenizer
    with pytest.raises(InputError, match=r"images\['current_image.wrist'\]: expected uint8"):
        tok.assemble_clip({"current_image.wrist": batch.images["current_image.wrist"].float()})
    with pytest.raises(InputError, match="expected 64x64 pixels"):
        tok.assemble_clip({"current_image.wrist": torch.zeros(1, 32, 32, 3, dtype=torch.uint8)})
    with pytest.raises(InputError, match="no image slot named"):
        tok.assemble_clip({"current_image.left": batch.images["current_image.wrist"]})
    with pytest.raises(InputError, match=r"clip: expected \(batch, 3, 1 \+ 4k"):
        tok.encode(torch.zeros(1, 3, 6, 64, 64))
