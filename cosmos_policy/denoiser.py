"""The denoiser: diffusers' Cosmos DiT with rectified-flow preconditioning in sigma space.

With sigma_data = 1 and t = sigma / (1 + sigma) (method 3.1, NVIDIA's ``RectifiedFlowScaling``):
    network input  c_in  x_sigma = x_sigma / (1 + sigma)      (the rectified-flow interpolant)
    timestep       c_noise = t, fed per latent frame as (B, 1, T, 1, 1)
    x0 prediction  c_skip x_sigma + c_out F = (1 - t) x_sigma - t F
Clean (conditioning) frames are fed as their clean latents with t = 0 (sigma_conditional = 0)
and their x0 is overwritten with the clean latents after every evaluation, so they never drift
and carry no loss. The condition mask (1 on clean frames) and an all-zero padding-mask channel
are passed as two extra input channels: the network has 18 input channels and never touches
diffusers' torchvision-based padding-mask path. ``fps=None`` keeps the RoPE unmodulated, as in
NVIDIA's released checkpoints (diffusers issue #14768).

Per-frame modulation: the timestep is per latent frame, which diffusers expands to every token
before the blocks, so each block's three AdaLN-LoRA projections (2048 -> 256 -> 3 x 2048) run on
all 1,764 tokens of a LIBERO sample, about 8 % of the network's FLOPs, to produce one distinct
row per frame. ``Denoiser`` makes those norms ``PerFrameAdaLayerNormZero``, which projects
one row per frame and broadcasts it: the same numbers, the same parameters and state dict,
9 rows instead of 1,764.

Precision: the preconditioning runs in float32 whatever the network's dtype. In bfloat16,
1 - t at sigma = 80 would be 0.0117 instead of 0.0123 (a 5 % error on every input), so c_in is
computed as 1 / (1 + sigma) in float32 and only the network's input is cast.
"""

from __future__ import annotations

import torch
from diffusers import CosmosTransformer3DModel
from diffusers.models.transformers.transformer_cosmos import CosmosAdaLayerNormZero
from torch import nn

from cosmos_policy.config import ModelConfig

LATENT_CHANNELS_PLUS_MASKS = 2  # condition mask + zero padding mask


def build_network(cfg: ModelConfig) -> CosmosTransformer3DModel:
    """The Cosmos-Predict2 Video2World DiT in diffusers' layout, sized by ``cfg.network``."""
    n = cfg.network
    net = CosmosTransformer3DModel(
        in_channels=cfg.vae.z_dim + LATENT_CHANNELS_PLUS_MASKS,
        out_channels=cfg.vae.z_dim,
        num_attention_heads=n.num_attention_heads,
        attention_head_dim=n.attention_head_dim,
        num_layers=n.num_layers,
        mlp_ratio=n.mlp_ratio,
        text_embed_dim=cfg.text.embed_dim,
        adaln_lora_dim=n.adaln_lora_dim,
        max_size=tuple(n.max_size),
        patch_size=tuple(n.patch_size),
        rope_scale=tuple(n.rope_scale),
        concat_padding_mask=False,
        extra_pos_embed_type=None,
    )
    if cfg.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    return net


class PerFrameAdaLayerNormZero(CosmosAdaLayerNormZero):
    """diffusers' Cosmos AdaLN-Zero norm that projects one timestep row per latent frame.

    Diffusers hands the norm the per-token expansion of a per-frame embedding (tokens are
    frame-major: (T, H, W) flattened), so the first token of each frame carries the frame's row.
    Inputs of any other shape (one timestep per sample) take the parent's ``forward``. Swapping
    an instance's class keeps its parameters, state dict, copies and pickles as they are.
    """

    tokens_per_frame: int

    def forward(self, hidden_states: torch.Tensor, embedded_timestep: torch.Tensor,
                temb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        tpf = self.tokens_per_frame
        if embedded_timestep.ndim != 3 or hidden_states.shape[1] % tpf:
            return super().forward(hidden_states, embedded_timestep, temb)
        b, n, d = hidden_states.shape
        f = n // tpf
        e = embedded_timestep.view(b, f, tpf, -1)[:, :, 0]
        e = self.linear_2(self.linear_1(self.activation(e)))
        if temb is not None:
            e = e + temb.view(b, f, tpf, -1)[:, :, 0]
        shift, scale, gate = e.chunk(3, dim=-1)  # each (B, T, D)
        x = self.norm(hidden_states).view(b, f, tpf, d)
        x = (x * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)).view(b, n, d)
        return x, gate.unsqueeze(2).expand(b, f, tpf, d).reshape(b, n, d)


def use_per_frame_modulation(net: nn.Module, tokens_per_frame: int) -> int:
    """Make every transformer block's AdaLN-Zero norms ``PerFrameAdaLayerNormZero``; returns how many."""
    count = 0
    for block in getattr(net, "transformer_blocks", []):
        for name in ("norm1", "norm2", "norm3"):
            norm = getattr(block, name, None)
            if isinstance(norm, CosmosAdaLayerNormZero):
                norm.__class__ = PerFrameAdaLayerNormZero
                norm.tokens_per_frame = int(tokens_per_frame)
                count += 1
    return count


class Denoiser(nn.Module):
    """x0 = D(x_sigma; sigma, clean frames, text) around the DiT."""

    def __init__(self, net: CosmosTransformer3DModel, sigma_conditional: float = 0.0, tokens_per_frame: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.sigma_conditional = float(sigma_conditional)
        if tokens_per_frame:
            use_per_frame_modulation(net, tokens_per_frame)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def forward(
        self,
        x_sigma: torch.Tensor,
        sigma: torch.Tensor,
        clean_latents: torch.Tensor,
        clean_mask: torch.Tensor,
        text: torch.Tensor,
    ) -> torch.Tensor:
        """Predict clean latents.

        Args:
            x_sigma: noisy latents (B, C, T, H, W), x0 + sigma * eps.
            sigma: noise level per sample (B,) or per frame (B, T).
            clean_latents: latents to impose on the clean frames (B, C, T, H, W).
            clean_mask: (B, T) bool, True on conditioning frames.
            text: text embeddings (B, L, D).
        Returns:
            x0 prediction in float32, equal to ``clean_latents`` on clean frames.
        """
        b, _, t_frames, h, w = x_sigma.shape
        sigma_bt = sigma.float().reshape(b, -1).expand(b, t_frames)
        clean = clean_mask.reshape(b, t_frames).bool()
        sigma_c = torch.full_like(sigma_bt, self.sigma_conditional)
        sigma_eff = torch.where(clean, sigma_c, sigma_bt)
        t_noise = sigma_eff / (1.0 + sigma_eff)
        c_in = (1.0 / (1.0 + sigma_bt)).view(b, 1, t_frames, 1, 1)
        t_out = (sigma_bt / (1.0 + sigma_bt)).view(b, 1, t_frames, 1, 1)
        clean5 = clean.view(b, 1, t_frames, 1, 1)

        x32 = x_sigma.float()
        clean32 = clean_latents.float()
        net_in = torch.where(clean5, clean32, c_in * x32)
        cond = clean5.to(torch.float32).expand(b, 1, t_frames, h, w)
        masks = torch.cat([cond, torch.zeros_like(cond)], dim=1)
        dtype = self.dtype
        out = self.net(
            hidden_states=net_in.to(dtype),
            timestep=t_noise.view(b, 1, t_frames, 1, 1),
            encoder_hidden_states=text.to(dtype),
            condition_mask=masks.to(dtype),
            fps=None,
            return_dict=False,
        )[0].float()
        x0 = c_in * x32 - t_out * out  # (1 - t) = 1 / (1 + sigma) = c_in
        return torch.where(clean5, clean32, x0)
