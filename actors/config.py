"""The actors' settings that an experiment sets: how a PolicyServer batches (no torch or Ray: a config loads fast)."""

from __future__ import annotations

from dataclasses import dataclass

from cosmos_policy.errors import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    """How a PolicyServer batches requests and takes new weights."""

    max_batch: int = 8
    """Requests per batched query (the experiment's default: max(8, online.runners))."""
    max_wait_ms: float = 5.0
    """How long the first request of a batch waits for company."""
    poll_weights_s: float = 0.5
    """How often the Ray actor asks its weight source for a newer version (0: never)."""

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"server.max_batch: expected >= 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"server.max_wait_ms: expected >= 0, got {self.max_wait_ms}")
