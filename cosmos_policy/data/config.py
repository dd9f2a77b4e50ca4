"""Per-benchmark data settings (``configs/data/<benchmark>.yaml``): layout, discount, mixture."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cosmos_policy.config import resolve_config_path
from cosmos_policy.data.augment import AugmentConfig
from cosmos_policy.data.mixture import MixtureConfig, mixture_preset
from cosmos_policy.errors import ConfigError


@dataclass
class DataConfig:
    """How training samples are made for one benchmark."""

    layout: str = "libero"
    gamma: float = 0.99  # Monte Carlo discount: 0.99 LIBERO and RoboCasa, 0.998 ALOHA (method 6.1)
    augmentation: bool = True  # the "stronger" augmentation of every official recipe
    mixture: str = "base"  # preset: base (50/25/25) or planning (10/45/45)
    mixture_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError(f"data.gamma: expected a discount in (0, 1], got {self.gamma}")

    def mixture_config(self) -> MixtureConfig:
        return mixture_preset(self.mixture, **self.mixture_overrides)

    def augment_config(self) -> AugmentConfig | None:
        return AugmentConfig() if self.augmentation else None


def load_data_config(name_or_path: str | Path, overrides: list[str] | None = None) -> DataConfig:
    path = resolve_config_path("data", name_or_path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(path), OmegaConf.from_dotlist(overrides or []))
        cfg: DataConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    cfg.mixture_config()  # validate the mixture now
    return cfg
