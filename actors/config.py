"""The actors' settings that an experiment sets: how a PolicyServer batches (no torch or Ray: a config loads fast)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cosmos_policy.config import INFERENCE_FLOAT8
from cosmos_policy.errors import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    """How a PolicyServer batches requests and takes new weights."""

    max_batch: int = 8
    """Requests per batched query (the experiment's default: max(8, online.runners))."""
    max_wait_ms: float = 5.0
    """How long the first request of a batch waits for company."""
    batch_sizes: list[int] = field(default_factory=list)
    """Sizes a batch is padded up to (the smallest that holds it, repeating its last request; the padding's replies are
    dropped): a network compiled into CUDA graphs then has one graph per size for every batch; empty: no padding."""
    poll_weights_s: float = 0.5
    """How often the Ray actor asks its weight source for a newer version (0: never)."""
    compile: bool = False
    """On a GPU, compile the networks: the acting network whole into CUDA graphs, one per size of ``batch_sizes``
    (captured when the server starts, a few minutes), the planning network block by block; several times faster per
    query. Needs ``batch_sizes``. A server on a CPU runs eagerly and says so."""
    float8: str = "off"
    """float8 products in the blocks' token-wise layers (``cosmos_policy.float8``): off, auto (rowwise on a GPU with
    float8 tensor cores, off elsewhere), rowwise or tensorwise. Outputs change by float8's rounding (``python
    bench/inference_speed.py --float8 rowwise`` measures it against bf16)."""
    prepare_ahead: bool | None = None
    """Prepare the next batch (JPEG round trips, resize, the VAE encode) while the current one runs its network passes;
    None: on a GPU, where it runs on a CUDA stream of its own. It hides the host's part of a batch (JPEG round trips,
    gathering, copies) where more callers wait than one batch holds; the VAE encode is the same GPU's work and is shared
    with the passes, not hidden (research/serving: 93 % GPU utilization against 91 %). On a CPU both would share the same cores, and a batch
    gathered once the running one has ended holds everyone who waited for it (fuller batches), so it is off there."""
    lease_max_s: float = 60.0
    """The longest a robot's episode may keep the server on the versions it began with (a lease, ``PolicyServer.lease``):
    newer published weights wait until no robot is mid-episode, or this long; an episode that outlasts it records the
    versions it acted with (``versions_changed``)."""

    def __post_init__(self) -> None:
        if self.float8 is False:  # YAML 1.1 reads a bare `off` (server.float8: off) as false
            object.__setattr__(self, "float8", "off")
        if self.float8 not in INFERENCE_FLOAT8:
            raise ConfigError(f"server.float8: expected one of {INFERENCE_FLOAT8}, got {self.float8!r}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"server.compile: expected true or false, got {self.compile!r}")
        if self.prepare_ahead is not None and not isinstance(self.prepare_ahead, bool):
            raise ConfigError(f"server.prepare_ahead: expected true, false or null (on a GPU), got {self.prepare_ahead!r}")
        if self.max_batch < 1:
            raise ConfigError(f"server.max_batch: expected >= 1, got {self.max_batch}")
        sizes = list(self.batch_sizes)
        if sizes and (any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in sizes) or sizes != sorted(set(sizes))
                      or sizes[-1] < self.max_batch):
            raise ConfigError(f"server.batch_sizes: expected increasing integers >= 1 whose last holds server.max_batch "
                              f"({self.max_batch}), or [], got {sizes}")
        if self.compile and not sizes:
            raise ConfigError("server.compile: needs server.batch_sizes, the batch sizes whose CUDA graphs are captured at the "
                              "start (e.g. [1, 2, 4, 8, 16]); without them every new size would be compiled while callers wait")
        if self.max_wait_ms < 0:
            raise ConfigError(f"server.max_wait_ms: expected >= 0, got {self.max_wait_ms}")
        if not self.poll_weights_s >= 0:
            raise ConfigError(f"server.poll_weights_s: expected seconds >= 0 (0: never), got {self.poll_weights_s}")
        if not self.lease_max_s >= 0:
            raise ConfigError(f"server.lease_max_s: expected seconds >= 0, got {self.lease_max_s}")
