"""Float8 matrix products for the transformer blocks' token-wise linear layers (``learner.float8``).

On Hopper-class GPUs (compute capability >= 8.9) a float8 matrix product runs at twice the bf16
rate; the DiT's linear layers over the token sequence (attention projections and the MLP) are
most of the 2B learner's matrix work. torchao swaps those ``nn.Linear`` modules for its
``Float8Linear``: the weights (and so state dicts, checkpoints and published weights) stay bf16 /
fp32 masters; only the three matrix products of each layer (output, input gradient, weight
gradient) take float8 operands scaled on the fly. The modulation layers (a handful of rows per
sample) and the layers outside the blocks stay in bf16: float8 would not pay for its scaling
there, and they set the conditioning that every token depends on.

Recipes (torchao's names; ``auto`` is ``tensorwise`` on a float8 GPU and ``off`` elsewhere): ``tensorwise`` (one scale per tensor, the fastest), ``rowwise`` (one
scale per row, more accurate), ``rowwise_with_gw_hp`` (rowwise, weight gradient in bf16: the most
accurate). The training loss differs from bf16 training by the float8 rounding; the inference
path has float8 of its own, with the same layers (``cosmos_policy.float8``, ``server.float8``).
"""

from __future__ import annotations

import torch

from cosmos_policy.errors import ConfigError
from cosmos_policy.float8 import float8_layer  # the layers inference converts too (cosmos_policy.float8)
from learner.config import FLOAT8_RECIPES


def resolve_float8(recipe: str) -> str:
    """``auto`` -> ``tensorwise`` on a GPU with float8 tensor cores (compute capability >= 8.9), else ``off``."""
    if recipe != "auto":
        return recipe
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        return "tensorwise"
    return "off"


def check_float8_support(recipe: str) -> None:
    """Raise ``ConfigError`` unless ``recipe`` can run here (a known name; a float8-capable GPU and torchao)."""
    if recipe not in FLOAT8_RECIPES:
        raise ConfigError(f"learner.float8: expected one of {FLOAT8_RECIPES}, got {recipe!r}")
    if recipe == "off":
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"learner.float8: {recipe!r} needs a CUDA GPU with float8 tensor cores (compute capability >= 8.9); "
                          "this process has none: use float8: off")
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        raise ConfigError(f"learner.float8: {recipe!r} needs compute capability >= 8.9 (Ada, Hopper or newer), this GPU has "
                          f"{capability[0]}.{capability[1]}: use float8: off")
    try:
        import torchao.float8  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"learner.float8: {recipe!r} needs the torchao package (pip install '.[gpu]', or "
                          f"torchao>=0.18), or set learner.float8: off: {exc}") from exc


def convert_float8(net: torch.nn.Module, recipe: str) -> int:
    """Swap ``net``'s float8 layers (``float8_layer``) for torchao's ``Float8Linear`` with ``recipe``; returns how many.

    Must run before the blocks are compiled and before the optimizer sees the parameters (the
    parameters themselves are kept, so optimizer state and checkpoints are unaffected).
    """
    recipe = resolve_float8(recipe)
    check_float8_support(recipe)
    if recipe == "off":
        return 0
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    chosen = [name for name, module in net.named_modules() if float8_layer(module, name)]
    if not chosen:
        raise ConfigError(f"learner.float8: {recipe!r} found no linear layer to convert in {type(net).__name__}")
    convert_to_float8_training(net, module_filter_fn=float8_layer, config=Float8LinearConfig.from_recipe_name(recipe))
    return len(chosen)


__all__ = ["FLOAT8_RECIPES", "check_float8_support", "convert_float8", "float8_layer", "resolve_float8"]
