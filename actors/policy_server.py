"""The policy server: many callers, few forward passes.

Environments on CPUs send ``act`` (one chunk) and ``plan`` (best-of-N) requests; the server
collects them for up to ``max_wait_ms`` or until ``max_batch`` have arrived, runs them as one
batched query, and routes each reply, with the weight version that produced it, back to its
caller. A malformed request fails alone: it is validated before it joins a batch. New weights
are staged by ``set_weights`` and swapped in between batches, never during one.

``BatchingServer`` is plain asyncio (it runs without Ray, e.g. on the GPU machine);
``PolicyServer`` is the Ray actor around it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

try:
    import ray
except ImportError:  # optional where only the Ray-free parts run (e.g. a GPU machine without the Ray wheel)
    ray = None
import torch

from cosmos_policy.checkpoint import load_checkpoint
from cosmos_policy.weights import REGISTRY
from cosmos_policy.errors import CheckpointError, ConfigError
from cosmos_policy.planner import Plan, Planner, PlannerConfig
from cosmos_policy.policy import CosmosPolicy, Observation, PolicyConfig, PolicyOutput
from cosmos_policy.text import RandomTextEncoder, T5TextEncoder, TextEmbeddingCache


@dataclass
class ServerConfig:
    max_batch: int = 8  # requests per batched query
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    poll_weights_s: float = 0.0  # > 0: pull newly published weights this often (Ray actor only)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"server.max_batch: expected >= 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"server.max_wait_ms: expected >= 0, got {self.max_wait_ms}")


@dataclass
class Reply:
    """A result and the weight versions that produced it."""

    result: PolicyOutput | Plan
    policy_version: int
    planning_version: int | None
    batch_size: int  # how many requests shared the forward passes


@dataclass
class _Request:
    observation: Observation
    seed: int
    future: asyncio.Future = field(repr=False)


class BatchingServer:
    """Dynamic batching of act / plan requests around a policy and an optional planner."""

    def __init__(self, policy: CosmosPolicy, planner: Planner | None = None, config: ServerConfig | None = None,
                 policy_version: int = 0, planning_version: int | None = None) -> None:
        self.policy = policy
        self.planner = planner
        self.config = config or ServerConfig()
        self.versions = {"policy": policy_version, "planning": planning_version if planner is not None else None}
        self._pending_weights: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}
        self._queues: dict[str, asyncio.Queue[_Request]] = {}
        self._workers: dict[str, asyncio.Task] = {}
        self._lock: asyncio.Lock | None = None
        self.stats = {"requests": 0, "batches": 0, "act_batches": 0, "plan_batches": 0, "busy_s": 0.0}

    async def act(self, observation: Observation, seed: int | None = None) -> Reply:
        return await self._submit("act", observation, self.policy.config.seed if seed is None else seed)

    async def plan(self, observation: Observation, seed: int = 0) -> Reply:
        if self.planner is None:
            raise ConfigError("plan: this server has no planning model")
        return await self._submit("plan", observation, seed)

    def set_weights(self, version: int, state_dict: dict[str, torch.Tensor], target: str = "policy") -> None:
        """Stage network weights for ``target`` ('policy' or 'planning'); applied before the next batch."""
        if target not in ("policy", "planning") or (target == "planning" and self.planner is None):
            raise ConfigError(f"set_weights: unknown or absent target {target!r}")
        self._pending_weights[target] = (int(version), state_dict)

    async def _submit(self, kind: str, observation: Observation, seed: int) -> Reply:
        self.policy.validate(observation)  # a bad request fails alone, before it can spoil a batch
        loop = asyncio.get_running_loop()
        if kind not in self._queues:
            self._queues[kind] = asyncio.Queue()
            self._workers[kind] = loop.create_task(self._serve(kind))
        request = _Request(observation, int(seed), loop.create_future())
        self.stats["requests"] += 1
        await self._queues[kind].put(request)
        return await request.future

    async def _serve(self, kind: str) -> None:
        queue = self._queues[kind]
        loop = asyncio.get_running_loop()
        if self._lock is None:
            self._lock = asyncio.Lock()  # one batch at a time on the device, act and plan alike
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.config.max_wait_ms / 1000.0
            while len(batch) < self.config.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            async with self._lock:
                start = time.perf_counter()
                try:
                    results = await loop.run_in_executor(None, self._run, kind, batch)
                except Exception as exc:  # the whole batch failed (e.g. non-finite outputs): tell every caller
                    for r in batch:
                        if not r.future.done():
                            r.future.set_exception(exc)
                    continue
                finally:
                    self.stats["busy_s"] += time.perf_counter() - start
            for r, res in zip(batch, results):
                if not r.future.done():
                    r.future.set_result(Reply(res, self.versions["policy"], self.versions["planning"], len(batch)))

    async def apply_pending(self) -> None:
        """Swap staged weights in now if no batch is running (else the next batch does it first).

        Without this an idle server would report its old version until a request arrived; the
        lock keeps the swap between batches, never inside one.
        """
        if not self._pending_weights:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(None, self._apply_weights)

    def _run(self, kind: str, batch: list[_Request]) -> list[Any]:
        self._apply_weights()
        observations, seeds = [r.observation for r in batch], [r.seed for r in batch]
        self.stats["batches"] += 1
        self.stats[f"{kind}_batches"] += 1
        if kind == "act":
            return self.policy.predict(observations, seeds)
        return self.planner.plan_batch(observations, seeds)  # type: ignore[union-attr]

    def _apply_weights(self) -> None:
        for target, (version, state) in list(self._pending_weights.items()):
            model = self.policy.model if target == "policy" else self.planner.planning  # type: ignore[union-attr]
            model.denoiser.net.load_state_dict(state)
            self.versions[target] = version
            del self._pending_weights[target]


@dataclass
class PolicySpec:
    """Where a server's models come from: checkpoints in our format, plus how to query them."""

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
        planner = None
        if self.planning_checkpoint is not None:
            planning = load_checkpoint(self.planning_checkpoint, device=self.device, dtype=dtype, expected_layout=ckpt.model.layout)
            planner = Planner(policy, planning.model, self.planner)
        return policy, planner


class PolicyServer:
    """Ray actor serving one policy (and optionally a planner) to many EnvRunners.

    The models are built inside the actor from ``spec`` (checkpoints on shared storage), where
    they run, instead of being shipped over; a callable returning (policy, planner) also works.
    """

    def __init__(self, spec: PolicySpec | Callable[[], tuple[CosmosPolicy, Planner | None]], config: ServerConfig | None = None,
                 policy_version: int = 0, planning_version: int | None = None) -> None:
        policy, planner = spec.build() if isinstance(spec, PolicySpec) else spec()
        self.server = BatchingServer(policy, planner, config, policy_version, planning_version)
        self._poller: asyncio.Task | None = None
        self._registry = REGISTRY

    async def set_registry(self, name: str) -> None:
        """Which weight registry to pull from (one per experiment)."""
        self._registry = name

    async def _poll_weights(self) -> None:
        """Stage every newly published version; the batching loop swaps it in between batches."""
        from actors.weights import WeightSubscriber

        targets = ["policy"] + (["planning"] if self.server.planner is not None else [])
        subscribers = {t: WeightSubscriber(t, self._registry) for t in targets}
        loop = asyncio.get_running_loop()
        while True:
            for target, sub in list(subscribers.items()):
                if sub.name != self._registry:  # the registry was changed after polling started
                    sub = subscribers[target] = WeightSubscriber(target, self._registry)
                got = await loop.run_in_executor(None, sub.poll)
                if got is not None:
                    record, state = got
                    self.server.set_weights(record.version, state, target)
                    await self.server.apply_pending()
            await asyncio.sleep(self.server.config.poll_weights_s)

    async def start_polling(self) -> None:
        if self.server.config.poll_weights_s > 0 and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_weights())

    async def act(self, observation: Observation, seed: int | None = None) -> Reply:
        await self.start_polling()
        return await self.server.act(observation, seed)

    async def plan(self, observation: Observation, seed: int = 0) -> Reply:
        await self.start_polling()
        return await self.server.plan(observation, seed)

    async def set_weights(self, version: int, state_dict: dict[str, torch.Tensor], target: str = "policy") -> None:
        self.server.set_weights(version, state_dict, target)

    async def versions(self) -> dict[str, int | None]:
        await self.start_polling()
        return dict(self.server.versions)

    async def stats(self) -> dict[str, float]:
        return dict(self.server.stats)


if ray is not None:  # the Ray actor; without Ray, BatchingServer and PolicySpec serve in-process
    PolicyServer = ray.remote(PolicyServer)
