"""Float8 inference: the transformer blocks' token-wise linear layers as float8 matrix products (``server.float8``).

At the policy's shapes the network's time is its matrix products, and a Hopper GPU multiplies float8
operands at twice the bf16 rate. The layers are the learner's (``float8_layer``: the attention projections
and the MLP of each block, whose rows are tokens); the modulation layers and everything outside the blocks
stay in bf16, as they set the conditioning every token depends on.

Unlike training, inference keeps its weights fixed between versions, so each weight is quantized once per
loaded version (``Float8InferenceLinear.refresh``, run by a ``load_state_dict`` post-hook), and only the
activations are quantized per call. The bf16 weights stay the modules' parameters: state dicts, the checks
of published weights, loading and publishing see the network unchanged; the float8 copies are buffers
outside the state dict, rewritten in place, so CUDA graphs captured on them stay valid across versions.

Recipes: ``rowwise`` (one scale per token of the activations and per output row of the weights: the more
accurate), ``tensorwise`` (one scale per tensor: the fastest kernel), ``auto`` (``rowwise`` on a GPU with
float8 tensor cores, ``off`` elsewhere). ``torch._scaled_mm`` does the products; it also runs on a CPU,
where it is correct but no faster (the tests run it there).
"""

from __future__ import annotations

import torch

from cosmos_policy.config import INFERENCE_FLOAT8 as INFERENCE_RECIPES
from cosmos_policy.errors import ConfigError

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448

# Linear layers inside a transformer block whose rows are tokens (image/action tokens, or text
# tokens for the cross-attention keys and values). Everything under norm*/ is modulation.
_TOKEN_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                 "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def float8_layer(module: torch.nn.Module, name: str) -> bool:
    """Whether the linear layer ``name`` (a name inside the network) takes float8 matrix products.

    A token-wise layer of a transformer block whose sizes the float8 kernels accept (multiples of 16).
    """
    if not isinstance(module, torch.nn.Linear) or not name.startswith("transformer_blocks."):
        return False
    if not any(name.endswith("." + suffix) for suffix in _TOKEN_LAYERS):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def float8_gpu(device: torch.device) -> bool:
    """Whether ``device`` is a GPU with float8 tensor cores (compute capability >= 8.9: Ada, Hopper or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def resolve_inference_float8(recipe: str, device: torch.device, field: str = "server.float8") -> str:
    """The recipe to use on ``device``: ``auto`` -> ``rowwise`` on a float8 GPU, ``off`` elsewhere; an explicit recipe
    on a GPU without float8 tensor cores is a ``ConfigError`` (on a CPU it runs, slowly: what the tests use)."""
    if recipe not in INFERENCE_RECIPES:
        raise ConfigError(f"{field}: expected one of {INFERENCE_RECIPES}, got {recipe!r}")
    if recipe == "auto":
        return "rowwise" if float8_gpu(device) else "off"
    if recipe != "off" and device.type == "cuda" and not float8_gpu(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(f"{field}: {recipe!r} needs compute capability >= 8.9 (Ada, Hopper or newer), this GPU has "
                          f"{major}.{minor}: use {field}: off")
    return recipe


def _scale(x: torch.Tensor, rowwise: bool) -> torch.Tensor:
    """The float32 scale that maps ``x``'s largest magnitude (per row, or over the tensor) onto float8's largest."""
    amax = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
    return amax.float().clamp(min=1e-12) / E4M3_MAX


def _quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


class Float8InferenceLinear(torch.nn.Linear):
    """A ``Linear`` whose product runs in float8: its weight quantized once per version, its input per call."""

    weight_f8: torch.Tensor
    weight_scale: torch.Tensor

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, recipe: str) -> Float8InferenceLinear:
        """The same parameters (shared, not copied) with float8 buffers beside them."""
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight, module.bias = linear.weight, linear.bias
        module.rowwise = recipe == "rowwise"
        weight = linear.weight
        module.register_buffer("weight_f8", torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device), persistent=False)
        scale_shape = (1, weight.shape[0]) if module.rowwise else ()
        module.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=weight.device), persistent=False)
        module.register_load_state_dict_post_hook(lambda mod, _keys: mod.refresh())
        module.refresh()
        return module

    @torch.no_grad()
    def refresh(self) -> None:
        """Quantize the current weight into the float8 buffers, in place (their storage, and graphs captured on it, stay)."""
        weight = self.weight.detach()
        scale = _scale(weight, self.rowwise)  # (out, 1) or ()
        self.weight_f8.copy_(_quantize(weight, scale))
        self.weight_scale.copy_(scale.reshape(self.weight_scale.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        scale = _scale(rows, self.rowwise)  # (tokens, 1) or ()
        out = torch._scaled_mm(_quantize(rows, scale), self.weight_f8.t(), scale_a=scale, scale_b=self.weight_scale,
                               out_dtype=torch.bfloat16 if x.dtype == torch.float32 and x.device.type == "cuda" else x.dtype,
                               use_fast_accum=True)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, float8={'rowwise' if self.rowwise else 'tensorwise'}"


def convert_inference_float8(net: torch.nn.Module, recipe: str, field: str = "server.float8", fuse: bool = True) -> int:
    """Swap ``net``'s float8 layers (``float8_layer``) for ``Float8InferenceLinear``; returns how many.

    ``recipe`` is resolved already (``resolve_inference_float8``); ``off`` converts nothing. With ``rowwise`` and
    ``fuse``, each transformer block then runs its norms and GELU in kernels that hand the products their input
    quantized already (``cosmos_policy.fused_float8``: about 9 % more queries served, the same state dict);
    ``fuse=False`` keeps the plain layers, the baseline the benches compare against. Run it before compiling, with the
    network on its device: the float8 buffers then belong to the captured graphs, and every later ``load_state_dict``
    refreshes them in place.
    """
    if recipe == "off":
        return 0
    if recipe not in INFERENCE_RECIPES[2:]:
        raise ConfigError(f"{field}: expected one of {INFERENCE_RECIPES[2:]} (resolved), got {recipe!r}")
    chosen = [name for name, module in net.named_modules() if float8_layer(module, name) and not isinstance(module, Float8InferenceLinear)]
    if not chosen:
        raise ConfigError(f"{field}: {recipe!r} found no linear layer to convert in {type(net).__name__}")
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name)
        setattr(parent, child, Float8InferenceLinear.from_linear(getattr(parent, child), recipe))
    if recipe == "rowwise" and fuse:
        from cosmos_policy.fused_float8 import fuse_float8_blocks

        fuse_float8_blocks(net)
    return len(chosen)


__all__ = ["E4M3_MAX", "INFERENCE_RECIPES", "Float8InferenceLinear", "convert_inference_float8", "float8_gpu", "float8_layer",
           "resolve_inference_float8"]
