"""The ``Policy`` contract's implementations for actors: built from checkpoints, local or served.

- ``PolicySpec``: where a policy and its planner come from (checkpoints in our format) and how
  they are queried; built where it runs (a PolicyServer's GPU, or an actor's own process), so
  weights are never shipped over the network.
- ``LocalPolicy``: a ``CosmosPolicy`` or ``Planner`` in this process that takes newer published
  weights from a ``WeightSource`` between episodes (at ``reset``), as actors must.
- ``ServerPolicy``: the client of a ``PolicyServer`` actor; the server takes new weights itself,
  between batches.
A weight version comes from the checkpoint it was built from (``metadata["version"]``, written by
the learner's export; 0 for a checkpoint without one), then from each version loaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cosmos_policy.config import PlannerConfig, PolicyConfig
from cosmos_policy.contracts import ActionChunk, Observation, Target, WeightSource
from cosmos_policy.errors import CheckpointError

if TYPE_CHECKING:  # the model's modules (torch, diffusers) load where a model is built, not in every EnvRunner
    from cosmos_policy.planner import Planner
    from cosmos_policy.policy import CosmosPolicy


@dataclass
class PolicySpec:
    """Where the models come from: checkpoints in our format, plus how to query them."""

    checkpoint: str
    planning_checkpoint: str | None = None
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    device: str = "cpu"
    dtype: str | None = None  # e.g. "bfloat16" on a GPU
    # Encode instructions missing from the checkpoint's cache: None (they are errors), "random"
    # (RandomTextEncoder: tiny models and the quickstart), or a local T5 encoder directory.
    text_encoder: str | None = None

    def build(self) -> tuple[CosmosPolicy, Planner | None]:
        import torch

        from cosmos_policy.checkpoint import load_checkpoint
        from cosmos_policy.planner import Planner
        from cosmos_policy.policy import CosmosPolicy
        from cosmos_policy.text import RandomTextEncoder, T5TextEncoder, TextEmbeddingCache

        dtype = getattr(torch, self.dtype) if self.dtype else None
        ckpt = load_checkpoint(self.checkpoint, device=self.device, dtype=dtype)
        if ckpt.stats is None or (ckpt.text is None and self.text_encoder is None):
            raise CheckpointError(f"{self.checkpoint}: a served checkpoint needs dataset_statistics.json and t5_embeddings.pkl")
        text_cfg = ckpt.model.config.text
        encoder = None
        if self.text_encoder == "random":
            encoder = RandomTextEncoder(text_cfg.embed_dim, text_cfg.max_length)
        elif self.text_encoder is not None:
            encoder = T5TextEncoder(self.text_encoder, text_cfg.max_length, device=self.device)
        policy = CosmosPolicy(ckpt.model, ckpt.stats, ckpt.text or TextEmbeddingCache(), self.policy, text_encoder=encoder)
        policy.version = int(ckpt.metadata.get("version", 0))
        planner = None
        if self.planning_checkpoint is not None:
            planning = load_checkpoint(self.planning_checkpoint, device=self.device, dtype=dtype, expected_layout=ckpt.model.layout)
            planner = Planner(policy, planning.model, self.planner)
            planner.version = int(planning.metadata.get("version", 0))
        return policy, planner


def take_served(model: CosmosPolicy | Planner, weights: WeightSource, target: Target | str) -> int | None:
    """Load ``target``'s served version into ``model`` unless it is the one there; returns it."""
    got = weights.latest(str(Target(target).value), have=model.version)
    if got is None:
        return None
    record, state = got
    model.load_weights(state, record.version)
    return record.version


class LocalPolicy:
    """A policy (or planner) in this process; with a weight source it takes newer versions at ``reset``."""

    def __init__(self, model: CosmosPolicy | Planner, target: Target | str, weights: WeightSource | None = None) -> None:
        self.model, self.target, self.weights = model, Target(target), weights

    def infer(self, observation: Observation, seed: int | None = None) -> ActionChunk:
        return self.model.infer(observation, seed)

    def reset(self) -> None:
        """Between episodes: never change weights inside one (the episode records the versions it acted with)."""
        if self.weights is not None:
            take_served(self.model, self.weights, self.target)
        self.model.reset()


def local_policies(spec: PolicySpec, weights: WeightSource | None = None) -> tuple[LocalPolicy, LocalPolicy | None]:
    """The acting policy and (with a planning checkpoint) the planner, built here from ``spec``."""
    policy, planner = spec.build()
    return LocalPolicy(policy, Target.POLICY, weights), None if planner is None else LocalPolicy(planner, Target.PLANNING, weights)


class ServerPolicy:
    """A ``PolicyServer`` actor's client: acting (``plan=False``) or best-of-N planning (``plan=True``).

    With ``name`` (the server's actor name) a copy travels as that name and finds the server again
    where it is used (no actor handle in another actor's constructor arguments: see
    ``replay.ray_backend.RayReplay.__reduce__``).
    """

    restart_wait_s = 300.0  # how long a call waits for its server to come back (Ray restarts it and it reloads its model)

    def __init__(self, server: Any, plan: bool = False, name: str | None = None) -> None:
        self.server, self.plan, self.name = server, plan, name

    def __reduce__(self) -> tuple:
        if self.name is None:
            return (ServerPolicy, (self.server, self.plan))
        return (_named_server_policy, (self.name, self.plan))

    def infer(self, observation: Observation, seed: int | None = None) -> ActionChunk:
        """The server's reply. A server that dies (kill -9, out of memory) is restarted by Ray with the newest
        published weights; the call is made again until it answers (the episode pauses, it is not lost), for
        up to ``restart_wait_s``. A request is a pure function of the observation, the seed and the weights,
        so asking again is safe."""
        import ray
        from ray.exceptions import RayActorError

        deadline = time.monotonic() + self.restart_wait_s
        while True:
            call = self.server.plan if self.plan else self.server.act
            try:
                return ray.get(call.remote(observation, seed))
            except RayActorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def reset(self) -> None:
        """Nothing to do: the server swaps new weights in between its batches."""

    def lease(self, holder: str, held: bool) -> dict[str, int | None] | None:
        """Keep the server on the versions it serves while ``holder`` (a robot) plays an episode (``PolicyServer.lease``);
        returns the versions served, or None when the server is gone (one restarted by Ray holds no leases)."""
        import ray
        from ray.exceptions import RayActorError

        try:
            return ray.get(self.server.lease.remote(holder, held))
        except RayActorError:
            return None


def _named_server_policy(name: str, plan: bool) -> ServerPolicy:
    import ray

    return ServerPolicy(ray.get_actor(name), plan, name)
