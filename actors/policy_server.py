"""The policy server: many callers, few forward passes.

Environments on CPUs send ``act`` (one chunk) and ``plan`` (best-of-N) requests; the server
collects them for up to ``max_wait_ms`` or until ``max_batch`` have arrived, runs them as one
batched query, and routes each reply back to its caller as an ``ActionChunk`` that names the
weight versions that produced it. A batch is prepared (JPEG round trips, crop, resize, the VAE encode: on a CUDA
stream of its own) while the batch before it runs its network passes, which always run on one thread (a compiled
network's CUDA graphs belong to the thread that captured them). A malformed request
fails alone: it is validated (observation and seed) before it joins a batch. New weights are staged by ``set_weights``
(or taken from a ``WeightSource`` by the actor) and swapped in between batches, never during one. Damaged weights
are refused whole and the models go on serving the versions they have: ``set_weights`` refuses wrong names, shapes
and dtypes at once, and the swap refuses non-finite values (counted on the model's device) before copying anything.

``BatchingServer`` is plain asyncio (it runs without Ray, e.g. on the GPU machine);
``PolicyServer`` is the Ray actor around it; ``actors.policies.ServerPolicy`` is its client.
"""

from __future__ import annotations

import asyncio
import numbers
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

try:
    import ray
    from ray.exceptions import RayError
except ImportError:  # optional where only the Ray-free parts run (e.g. a GPU machine without the Ray wheel)
    ray = None

    class RayError(Exception):  # type: ignore[no-redef]  (nothing raises it without Ray)
        pass

from actors.config import ServerConfig
from actors.policies import PolicySpec
from cosmos_policy.contracts import ActionChunk, Observation, Target, WeightSource
from cosmos_policy.errors import CheckpointError, ConfigError, InputError

if TYPE_CHECKING:  # the server builds its models in its own process; a process holding a handle to it (Ray imports the
    # actor's module to make one: every EnvRunner, the RobotHub) must not load torch and diffusers for that
    import torch

    from cosmos_policy.planner import Planner
    from cosmos_policy.policy import CosmosPolicy, PreparedBatch


@dataclass
class _Request:
    observation: Observation
    seed: int
    future: asyncio.Future = field(repr=False)


class BatchingServer:
    """Dynamic batching of act / plan requests around a policy and an optional planner.

    Two threads of its own: one prepares batches (``CosmosPolicy.prepare``, on a second CUDA stream on a GPU), one
    runs their network passes, one batch at a time. With ``config.prepare_ahead`` (on a GPU by default) the next batch
    is gathered and prepared while one runs, so a busy server's device goes from one batch's passes to the next without
    waiting for preprocessing or the VAE; without it a batch is prepared on the passes' thread, as part of its passes.
    """

    def __init__(self, policy: CosmosPolicy, planner: Planner | None = None, config: ServerConfig | None = None) -> None:
        self.policy = policy
        self.planner = planner
        self.config = config or ServerConfig()
        self._pending_weights: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}
        self._queues: dict[str, asyncio.Queue[_Request]] = {}
        self._workers: dict[str, asyncio.Task] = {}
        self._running: set[asyncio.Task] = set()  # batches on the device (at most one) and their replies
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the event loop the batching tasks run on
        self._device = ThreadPoolExecutor(1, thread_name_prefix="policy-server-passes")
        self._preparer = ThreadPoolExecutor(1, thread_name_prefix="policy-server-prepare")
        self._stream: torch.cuda.Stream | None = None  # the preparing thread's CUDA stream (made there on first use)
        self.stats = {"requests": 0, "batches": 0, "act_batches": 0, "plan_batches": 0, "busy_s": 0.0, "prepare_s": 0.0,
                      "refused_weights": 0, "padded_rows": 0}
        self.batch_sizes: dict[int, int] = {}  # batches formed, by their size before padding
        self.refused: list[str] = []  # why staged weight versions were refused at the swap (the latest few)

    @property
    def versions(self) -> dict[str, int | None]:
        """The weight versions in the models now (what the next batch runs with, unless new ones are staged)."""
        return {"policy": self.policy.version, "planning": None if self.planner is None else self.planner.version}

    async def act(self, observation: Observation, seed: int | None = None) -> ActionChunk:
        return await self._submit("act", observation, self.policy.config.seed if seed is None else seed)

    async def plan(self, observation: Observation, seed: int | None = None) -> ActionChunk:
        if self.planner is None:
            raise ConfigError("plan: this server has no planning model")
        return await self._submit("plan", observation, 0 if seed is None else seed)

    def set_weights(self, version: int, state_dict: dict[str, torch.Tensor], target: str = "policy") -> None:
        """Stage network weights for ``target`` ('policy' or 'planning'); applied before the next batch.

        Names, shapes, dtypes and the version are checked here (``CheckpointError`` naming the tensor, nothing
        staged): a payload that cannot load is refused to its sender instead of failing a later batch. The values
        are checked for NaN and inf at the swap (a pass over them: not on the event loop).
        """
        if target not in ("policy", "planning") or (target == "planning" and self.planner is None):
            raise ConfigError(f"set_weights: unknown or absent target {target!r}")
        model = self.policy if target == "policy" else self.planner
        number = model.check_weights(state_dict, version, finite=False)  # type: ignore[union-attr]
        self._pending_weights[target] = (number, state_dict)

    async def _submit(self, kind: str, observation: Observation, seed: int) -> ActionChunk:
        self.policy.validate(observation)  # a bad request fails alone, before it can spoil a batch
        seed = _seed(seed)
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (asyncio.run again): the batching tasks of the last one died with it
            self._loop, self._queues, self._workers, self._running, self._lock = loop, {}, {}, set(), None
        if kind not in self._queues:
            self._queues[kind] = asyncio.Queue()
            self._workers[kind] = loop.create_task(self._serve(kind))
        request = _Request(observation, seed, loop.create_future())
        self.stats["requests"] += 1
        await self._queues[kind].put(request)
        return await request.future

    async def _gather(self, queue: asyncio.Queue[_Request]) -> list[_Request]:
        """The next batch: the first request, and those that come within ``max_wait_ms`` of it (up to ``max_batch``)."""
        loop = asyncio.get_running_loop()
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
        return batch

    async def _serve(self, kind: str) -> None:
        """Gather a batch, prepare it (beside the batch running now), wait for the device, start its passes; again."""
        queue = self._queues[kind]
        loop = asyncio.get_running_loop()
        if self._lock is None:
            self._lock = asyncio.Lock()  # one batch at a time on the device, act and plan alike
        ahead = self.config.prepare_ahead
        if ahead is None:
            ahead = self.policy.model.device.type == "cuda"
        while True:
            batch = await self._gather(queue)
            prepared = None
            if ahead:
                start = time.perf_counter()
                try:
                    prepared = await loop.run_in_executor(self._preparer, self._prepare, batch)
                except Exception as exc:  # e.g. a VAE that failed: every caller of the batch is told
                    _fail(batch, exc)
                    continue
                finally:
                    self.stats["prepare_s"] += time.perf_counter() - start
            await self._lock.acquire()
            task = loop.create_task(self._generate(kind, batch, prepared))  # releases the lock when its passes end
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            if not ahead:  # prepared in the passes: the next batch is gathered once this one is done
                await task

    async def _generate(self, kind: str, batch: list[_Request], prepared: PreparedBatch | None) -> None:
        assert self._lock is not None and self._lock.locked()
        start = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._device, self._run, kind, batch, prepared)
        except Exception as exc:  # the whole batch failed (e.g. non-finite outputs): tell every caller
            _fail(batch, exc)
            return
        finally:
            self.stats["busy_s"] += time.perf_counter() - start
            self._lock.release()
        for r, res in zip(batch, results):
            if not r.future.done():
                r.future.set_result(res)

    async def apply_pending(self) -> None:
        """Swap staged weights in now if no batch is running (else the next batch does it first).

        Without this an idle server would report its old version until a request arrived; the
        lock keeps the swap between batches, never inside one. A version refused at the swap raises
        its ``CheckpointError`` here, after the models were left serving the versions they had.
        """
        if not self._pending_weights:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            refused = await asyncio.get_running_loop().run_in_executor(self._device, self._apply_weights)
        if refused:
            raise refused[0]

    def _padded(self, batch: list[_Request]) -> tuple[list[Observation], list[int]]:
        """The batch's observations and seeds, padded up to the next of ``config.batch_sizes`` with the last request
        again (each row samples from its own seed: the real rows' replies are unchanged)."""
        observations, seeds = [r.observation for r in batch], [r.seed for r in batch]
        pad = padded_size(len(batch), self.config.batch_sizes) - len(batch)
        return observations + [observations[-1]] * pad, seeds + [seeds[-1]] * pad

    def _prepare(self, batch: list[_Request]) -> PreparedBatch:
        """The batch's inputs and conditioning latents (on the preparing thread, on its own CUDA stream on a GPU)."""
        device = self.policy.model.device
        if self._stream is None and device.type == "cuda":
            import torch

            self._stream = torch.cuda.Stream(device)
        return self.policy.prepare(self._padded(batch)[0], self._stream)

    def _run(self, kind: str, batch: list[_Request], prepared: PreparedBatch | None = None) -> list[ActionChunk]:
        """The network passes of one batch (on the passes' thread), after any staged weights were swapped in."""
        self._apply_weights()
        observations, seeds = self._padded(batch)
        self.stats["batches"] += 1
        self.stats[f"{kind}_batches"] += 1
        self.batch_sizes[len(batch)] = self.batch_sizes.get(len(batch), 0) + 1
        self.stats["padded_rows"] += len(observations) - len(batch)
        if kind == "act":
            return self.policy.predict(observations, seeds, prepared)[: len(batch)]
        return self.planner.plan_batch(observations, seeds, prepared)[: len(batch)]  # type: ignore[union-attr]

    def warm_up(self, observation: Observation, kinds: tuple[str, ...] = ("act",)) -> None:
        """One batch of each padded size (``config.batch_sizes``) and kind, on the threads that serve them, so that a
        compiled network captures its graphs (for the passes' thread: CUDA graphs are per thread) before the first
        caller waits for them (a capture takes seconds)."""
        for kind in kinds:
            for size in self.config.batch_sizes or [1]:
                requests = [_Request(observation, i, None) for i in range(size)]  # type: ignore[arg-type]
                prepared = self._preparer.submit(self._prepare, requests).result()
                self._device.submit(self._run, kind, requests, prepared).result()

    def _apply_weights(self) -> list[CheckpointError]:
        """Load the staged versions; returns the refusals (the models keep their versions, the batch runs on them).

        A staged version leaves the queue before it loads, so one that cannot load is tried once: left staged, it
        would fail every batch after it, and no request would be served again.
        """
        refused = []
        for target in list(self._pending_weights):
            version, state = self._pending_weights.pop(target)
            try:
                (self.policy if target == "policy" else self.planner).load_weights(state, version)  # type: ignore[union-attr]
            except CheckpointError as exc:  # checked whole before any tensor was copied: the old version serves on
                self.stats["refused_weights"] += 1
                self.refused = (self.refused + [str(exc)])[-8:]
                print(f"policy server: refused {target} weights: {exc}", flush=True)
                refused.append(exc)
        return refused


def accelerate(policy: CosmosPolicy, planner: Planner | None, config: ServerConfig) -> str:
    """Apply ``config.float8`` and ``config.compile`` to the served models; returns what was done, for the log.

    The acting network is compiled whole into CUDA graphs (one per padded batch size; ``BatchingServer.warm_up``
    captures them), its VAE encoder too, batches of up to 16 clips per call; a separate planning network is compiled
    block by block (its row counts vary with the plan's stages). On a CPU nothing is compiled.
    """
    model = policy.model
    on_gpu = model.device.type == "cuda"
    recipe = model.accelerate(config.float8, "graphs" if config.compile and on_gpu else "off")
    if config.compile and on_gpu and policy.config.prefix_encode:
        model.enable_prefix_encoder(max_clips=min(16, config.batch_sizes[-1]), compile=True, channels_last=True)
    if planner is not None and planner.planning is not model:
        planner.planning.accelerate(config.float8, "blocks" if config.compile and on_gpu else "off")
    done = [f"float8 {recipe}" if recipe != "off" else "bf16" if on_gpu else str(next(model.parameters()).dtype).replace("torch.", "")]
    if config.compile:
        done.append(f"CUDA graphs for batches of {config.batch_sizes}" if on_gpu else "eager (server.compile needs a GPU)")
    return ", ".join(done)


def warm_up_observation(policy: CosmosPolicy) -> Observation:
    """A valid observation for capturing graphs: black images at the model's size, zero proprio, a known instruction."""
    import numpy as np

    layout, size = policy.model.layout, policy.model.config.image_size
    known = policy.text.instructions()
    return Observation(images={c: np.zeros((size, size, 3), np.uint8) for c in layout.cameras},
                       proprio=np.zeros(layout.proprio_dim, np.float32) if layout.has_proprio else None,
                       instruction=known[0] if known else "warm up")


def _fail(batch: list[_Request], exc: BaseException) -> None:
    for r in batch:
        if not r.future.done():
            r.future.set_exception(exc)


def padded_size(n: int, sizes: list[int]) -> int:
    """The smallest of ``sizes`` that holds ``n`` rows (``n`` itself without sizes, or beyond the largest)."""
    return next((size for size in sizes if size >= n), n)


def _seed(seed: object) -> int:
    """A request's sampling seed, or ``InputError``: an int in [0, 2**63) (numpy's too, never a bool). The
    planner derives its candidates' seeds by adding to it, and a seed torch's generator cannot take would fail
    the whole batch it joined; ``int()`` would take 2.5 as 2 and "7" as 7."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise InputError(f"seed: expected an int in [0, 2**63), got {type(seed).__name__} {seed!r}")
    return int(seed)


class PolicyServer:
    """Ray actor serving one policy (and optionally a planner) to many EnvRunners.

    The models are built inside the actor from ``spec`` (checkpoints on shared storage), where
    they run, instead of being shipped over; a callable returning (policy, planner) also works.
    With ``weights`` it takes every newly published version (``config.poll_weights_s``), except while its
    versions are held (``hold_weights``: an evaluation of the versions it serves runs while the learner goes on)
    or leased (``lease``: a robot is mid-episode, and takes new weights only between its episodes).
    """

    def __init__(self, spec: PolicySpec | Callable[[], tuple[CosmosPolicy, Planner | None]], config: ServerConfig | None = None,
                 weights: WeightSource | None = None) -> None:
        # The weight source's blocking ray.get runs on an executor thread, never on the event loop, which Ray's
        # warning about blocking calls in async actors cannot tell apart: it would only alarm the job's log.
        os.environ.setdefault("RAY_WARN_BLOCKING_GET_INSIDE_ASYNC", "0")
        policy, planner = spec.build() if isinstance(spec, PolicySpec) else spec()
        self.server = BatchingServer(policy, planner, config)
        config = self.server.config
        if config.compile or config.float8 != "off":
            start = time.perf_counter()
            done = accelerate(policy, planner, config)
            if config.compile and policy.model.device.type == "cuda":
                self.server.warm_up(warm_up_observation(policy))
            print(f"policy server: {done} ({time.perf_counter() - start:.0f} s)", flush=True)
        self.weights = weights
        self._poller: asyncio.Task | None = None
        self.held = False
        self._leases: dict[str, float] = {}  # holder -> when its episode began (time.monotonic)
        # Restarted by Ray after a crash (max_restarts), the server is built from its first checkpoint again: the
        # newest published weights go in before its first batch, so no request is served with older ones.
        # A published version refused here (checksum, shapes...) or out of reach (the registry restarting) leaves it on
        # its checkpoint's: raising would make Ray restart it into the same refusal, forever.
        self._refusal: dict[str, str] = {}  # target -> why its newest published version was last refused
        if weights is not None:
            for target in [Target.POLICY] + ([Target.PLANNING] if planner is not None else []):
                try:
                    got = weights.latest(target.value, self.server.versions[target.value])
                    if got is not None:
                        self.server.set_weights(got[0].version, got[1], target.value)
                except (CheckpointError, RayError) as exc:
                    self._refused(target.value, exc)
        with warnings.catch_warnings():  # the property reads Ray's deprecated actor_id (Ray 2.60 warns at every start)
            warnings.simplefilter("ignore")
            try:
                restarted = ray is not None and ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed
            except AssertionError:  # not an actor: the class used in-process by a driver of a cluster
                restarted = False
        if restarted:  # Ray restarted it: say so in the job's log
            staged = {t: v[0] for t, v in self.server._pending_weights.items()}
            print(f"warning: a PolicyServer was restarted (its process died); it serves {dict(self.server.versions, **staged)} "
                  "and its callers' requests are asked again", flush=True)

    async def _poll_weights(self) -> None:
        """Take every newly published version while nothing holds or leases the served ones."""
        while True:
            if not self.held and not self._leased():
                await self._take_published()
            await asyncio.sleep(self.server.config.poll_weights_s)

    async def _take_published(self) -> None:
        """Stage the newest published version of each model and swap it in between batches."""
        if self.weights is None:
            return
        loop = asyncio.get_running_loop()
        for target in [Target.POLICY] + ([Target.PLANNING] if self.server.planner is not None else []):
            staged = self.server._pending_weights.get(target.value)
            current = staged[0] if staged else self.server.versions[target.value]
            try:
                got = await loop.run_in_executor(None, self.weights.latest, target.value, current)
                if got is not None:
                    record, state = got
                    self.server.set_weights(record.version, state, target.value)
                    await self.server.apply_pending()
                    self._refusal.pop(target.value, None)  # taken: a later failure is news again
            except (CheckpointError, RayError) as exc:  # a damaged version, or the registry out of reach: serve on with
                self._refused(target.value, exc)  # the version we have, take the next one published

    def _refused(self, target: str, exc: CheckpointError | RayError) -> None:
        """Note a published version refused (``CheckpointError``: its checksum, shapes...) or out of reach (``RayError``:
        the registry restarting after a crash), printed once per reason, not on every poll that finds it again.

        The poller goes on: raised out of it, the error would end the polling task, and the server would never
        take another version."""
        if isinstance(exc, CheckpointError):
            reason, said = str(exc), f"refused the published {target} weights"
        else:  # a Ray error's text names object ids and runs over many lines: its first line, once per kind
            reason, said = type(exc).__name__, f"could not read the published {target} weights ({type(exc).__name__})"
        if self._refusal.get(target) != reason:
            detail = str(exc) if isinstance(exc, CheckpointError) else (str(exc).strip().splitlines() or [""])[0]
            print(f"policy server: {said}, serving version {self.server.versions[target]} on: {detail}", flush=True)
        self._refusal[target] = reason

    def _leased(self) -> bool:
        """Whether a robot's episode holds the served versions now (a lease past ``lease_max_s`` is let go: a robot that
        died mid-episode, or a long episode, must not keep every caller of this server on old weights)."""
        now, limit = time.monotonic(), self.server.config.lease_max_s
        for holder, since in list(self._leases.items()):
            if now - since > limit:
                del self._leases[holder]
        return bool(self._leases)

    async def start_polling(self) -> None:
        if self.weights is not None and self.server.config.poll_weights_s > 0 and self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_weights())
            self._poller.add_done_callback(self._poller_ended)

    def _poller_ended(self, task: asyncio.Task) -> None:
        """An error the poller does not expect ends its task: say so, and let the next call start it again (else the
        server would serve its versions for ever, in silence)."""
        self._poller = None
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            print(f"policy server: taking published weights failed ({type(exc).__name__}: {exc}); polling again", flush=True)

    async def act(self, observation: Observation, seed: int | None = None) -> ActionChunk:
        await self.start_polling()
        return await self.server.act(observation, seed)

    async def plan(self, observation: Observation, seed: int | None = None) -> ActionChunk:
        await self.start_polling()
        return await self.server.plan(observation, seed)

    async def set_weights(self, version: int, state_dict: dict[str, torch.Tensor], target: str = "policy") -> None:
        self.server.set_weights(version, state_dict, target)

    async def hold_weights(self, held: bool) -> dict[str, int | None]:
        """Keep serving the versions served now (``held``), or take published ones again; returns the versions served.

        A restarted server (after a crash) takes the newest published weights and is not held."""
        self.held = bool(held)
        return dict(self.server.versions)

    async def lease(self, holder: str, held: bool) -> dict[str, int | None]:
        """A robot's episode begins (``held``) or ends: its versions stay served until it ends, so the robot takes new
        weights only between episodes, as one with a model of its own would. Beginning with no other lease or hold
        takes the newest published weights first; the last lease ending takes those published meanwhile. Returns the
        versions served (what the episode acts with, while no lease passes ``lease_max_s``)."""
        await self.start_polling()
        if held:
            if not self.held and not self._leased():
                await self._take_published()
            self._leases[str(holder)] = time.monotonic()
        else:
            self._leases.pop(str(holder), None)
            if not self.held and not self._leased():
                await self._take_published()
        return dict(self.server.versions)

    async def versions(self) -> dict[str, int | None]:
        await self.start_polling()
        return dict(self.server.versions)

    async def serve_versions(self, versions: dict[str, int]) -> dict[str, int | None]:
        """Serve these published versions (target -> version), candidates included: the promotion gate's own server
        plays a candidate and the version served to the actors in turn (``launch.promotion``). It must not poll
        (``poll_weights_s`` 0), or it would go back to the served version. Returns the versions served."""
        loop = asyncio.get_running_loop()
        for target, version in versions.items():
            if self.server.versions.get(target) != version:
                record, state = await loop.run_in_executor(None, self.weights.version, target, int(version))  # type: ignore[union-attr]
                self.server.set_weights(record.version, state, target)
        await self.server.apply_pending()  # a version refused here raises its CheckpointError to the gate
        return dict(self.server.versions)

    async def publish_served(self, status: str) -> dict[str, int | None]:
        """Publish the weights this server serves (its checkpoint's) with ``status``, for each target the registry
        serves nothing of yet: under eval-gated promotion the job's starting weights are the first promoted version,
        the one a rollback of the first promoted candidate serves again. Returns the versions served."""
        from cosmos_policy.weights import pack

        loop = asyncio.get_running_loop()
        for target, model in (("policy", self.server.policy), ("planning", self.server.planner)):
            if model is None or await loop.run_in_executor(None, self.weights.serving, target) is not None:  # type: ignore[union-attr]
                continue
            packed = pack(model.model.denoiser.net.state_dict() if target == "policy" else model.planning.denoiser.net.state_dict())
            await loop.run_in_executor(None, lambda: self.weights.publish(packed, model.version, 0, target, status))  # type: ignore[union-attr]
        return dict(self.server.versions)

    async def stats(self) -> dict[str, object]:
        """The batching counters, and the batches formed by size (before padding)."""
        return {**self.server.stats, "batch_sizes": dict(self.server.batch_sizes)}


if ray is not None:  # the Ray actor; without Ray, BatchingServer and PolicySpec serve in-process
    PolicyServer = ray.remote(max_restarts=-1)(PolicyServer)  # a crashed server comes back (ServerPolicy's calls wait for it)
