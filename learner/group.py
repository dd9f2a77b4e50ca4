"""The learner as a Ray worker group: one process per GPU (or CPU rank), restarted on failure.

Each ``LearnerWorker`` sets the distributed environment (rank, world size, a loopback or head-node
address and a free port), builds its ``Learner`` and resumes from the latest checkpoint. The
group drives all ranks in lockstep and publishes weights every ``publish_every`` steps (rank 0 packs them; the
group, which lives as long as the job, owns them in the object store and registers them). If a
worker dies (a crash, SIGKILL, a lost node), the group tears the others down, starts a fresh
set and they resume from the last checkpoint, while actors keep acting on the last published
weights.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray
from ray.exceptions import ActorDiedError, RayActorError

from cosmos_policy.contracts import Target, WeightPublisher, WeightVersion
from cosmos_policy.weights import Packed, checksum, nbytes
from learner.engine import Learner, LearnerConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PublishConfig:
    every: int = 0  # steps between publications; 0: never
    target: str = Target.POLICY.value  # which model the weights are for


@ray.remote
class LearnerWorker:
    def __init__(self, config: LearnerConfig, source: Callable, rank: int, world_size: int, address: str, port: int,
                 publish_cfg: PublishConfig, publisher: WeightPublisher | None) -> None:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0" if not ray.get_gpu_ids() else "0",
                          MASTER_ADDR=address, MASTER_PORT=str(port))
        self.learner = Learner(config, source)
        self.learner.versions_of = publish_cfg.target
        self.resumed = self.learner.resume()
        self.publish_cfg, self.publisher = publish_cfg, publisher

    def train(self, steps: int) -> list[dict[str, float]]:
        """``steps`` optimizer steps. A step that ends on a publication (the group publishes right after it) is
        checkpointed by ``pack``, after its version: a rank restarted from it goes on from that version."""
        out = []
        every = self.publish_cfg.every
        for _ in range(steps):
            out.append(self.learner.train_step(save=False))
            if self.learner.checkpoint_due() and not (every and self.learner.step % every == 0):
                self.learner.save()
        return out

    @ray.method(num_returns=2)
    def pack(self, bump: bool = True) -> tuple[WeightVersion | None, Packed | None]:
        """The weights packed for publication (every rank takes part: ZeRO-3 gathers), returned by rank 0 with their
        record, to the group, which registers them: a task's return belongs to its caller, so a version outlives
        the rank that packed it (killed right after, its group restarting it), where a ``ray.put`` of its own would
        be lost with it, while readers fetch it.

        ``bump``: as a new version (the next integer); without it, as the version they already are (a resumed
        job's servers get the weights its learner published before the stop)."""
        packed = self.learner.packed_weights()
        self.learner.version += int(bump)
        if bump and self.learner.checkpoint_due():  # (without a new version, ``train`` saved this step as it is)
            self.learner.save()
        if self.learner.rank != 0 or self.publisher is None:
            return None, None
        record = WeightVersion(version=self.learner.version, step=self.learner.step, checksum=checksum(packed),
                               nbytes=nbytes(packed), target=self.publish_cfg.target)
        return record, packed

    def save(self) -> str:
        return str(self.learner.save())

    def export(self, path: str) -> str | None:
        out = self.learner.export(path)
        return None if out is None else str(out)

    def progress(self) -> dict[str, Any]:
        """Step and version only: cheap, and local to this rank (no collective, unlike ``state`` under ZeRO-3)."""
        return {"step": self.learner.step, "version": self.learner.version, "resumed": self.resumed}

    def state(self) -> dict[str, Any]:
        """Progress plus a checksum of the full weights; under ZeRO-3 every rank must be asked at once (it gathers)."""
        from cosmos_policy.weights import checksum, pack

        return {"step": self.learner.step, "version": self.learner.version, "resumed": self.resumed,
                "checksum": checksum(pack(self.learner.full_state(), dtype=None)), "pid": os.getpid()}

    def evaluate(self, batch, seed: int = 0) -> float:
        """The loss on ``batch`` with fixed noise, without training (for tests and validation)."""
        return self.learner.evaluate(batch, seed)


class LearnerGroup:
    """Starts ``world_size`` workers and trains them in lockstep, restarting them on failure."""

    def __init__(self, config: LearnerConfig, source: Callable, world_size: int = 1, gpus_per_worker: float = 0,
                 cpus_per_worker: float = 1, publish_cfg: PublishConfig | None = None, publisher: WeightPublisher | None = None,
                 max_restarts: int = 3, waiting: Callable[[float], None] | None = None,
                 on_restart: Callable[[BaseException], None] | None = None) -> None:
        """``waiting(seconds)`` is called every 20 s while the workers start (model, DeepSpeed, a first JIT build of
        its ops: minutes on a busy CPU), so that a job's log says it is still starting; ``on_restart(error)`` when a
        rank died and the group starts a fresh set (the job reports it; actors keep acting meanwhile)."""
        self.config, self.source, self.world_size = config, source, world_size
        self.waiting, self.on_restart = waiting, on_restart
        self.gpus, self.cpus = gpus_per_worker, cpus_per_worker
        self.publish_cfg, self.publisher = publish_cfg or PublishConfig(), publisher
        self.max_restarts = max_restarts
        self.restarts = 0
        self.workers: list[Any] = []
        self.saved_at = time.monotonic()  # the last checkpoint (config.checkpoint_every_s counts from it)
        self.start()

    def start(self) -> None:
        address = "127.0.0.1" if self.world_size == 1 or len(ray.nodes()) == 1 else ray.util.get_node_ip_address()
        port = free_port()
        self.workers = [
            LearnerWorker.options(num_gpus=self.gpus, num_cpus=self.cpus).remote(
                self.config, self.source, rank, self.world_size, address, port, self.publish_cfg, self.publisher
            )
            for rank in range(self.world_size)
        ]
        start, ready = time.monotonic(), [w.progress.remote() for w in self.workers]
        pending = list(ready)
        while pending:  # wait until every rank is up (and resumed)
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=20)
            if pending and self.waiting is not None:
                self.waiting(time.monotonic() - start)
        ray.get(ready)  # a worker that died starting raises here

    def stop(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []

    def restart(self) -> None:
        self.stop()
        self.restarts += 1
        time.sleep(0.5)  # let the dead ranks' sockets close
        self.start()

    def train(self, steps: int, chunk: int = 1, on_metrics: Callable[[list[dict]], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> int:
        """Train until the group's step reaches its current step + ``steps``; returns the final step.

        ``should_stop`` is asked between chunks: a job being stopped (Ctrl-C) then waits for one
        chunk, not for the whole phase (minutes on a CPU)."""
        target = self.step() + steps
        while (step := self.step()) < target:
            if should_stop is not None and should_stop():
                break
            every = self.publish_cfg.every
            n = min(chunk, target - step, every - step % every if every else chunk)  # a chunk ends at a publication
            try:
                results = ray.get([w.train.remote(n) for w in self.workers])
                packed = self._pack(bump=True) if every and (step + n) % every == 0 else None
            except (RayActorError, ActorDiedError) as exc:
                if self.restarts >= self.max_restarts:
                    raise
                if self.on_restart is not None:
                    self.on_restart(exc)
                self.restart()  # the fresh workers resume from the last checkpoint
                continue
            if packed is not None:
                results[0][-1].update(self._register(*packed))
            if on_metrics is not None:
                on_metrics(results[0])
            if self.config.checkpoint_every_s and time.monotonic() - self.saved_at >= self.config.checkpoint_every_s:
                self.save()
        return self.step()

    def publish(self, bump: bool = True) -> int:
        """Publish the current weights now (every rank takes part: ZeRO-3 gathers); returns their version
        (a new one, or with ``bump`` false the one they have)."""
        self._register(*self._pack(bump))
        return ray.get(self.workers[0].progress.remote())["version"]

    def _pack(self, bump: bool) -> tuple[WeightVersion | None, Any, float]:
        """Every rank packs (``LearnerWorker.pack``); returns rank 0's record, the reference to its weights (which
        this process owns: they stay in the object store after the rank is gone) and when the publication began."""
        start = time.perf_counter()
        returned = [w.pack.remote(bump) for w in self.workers]
        records = ray.get([record for record, _ in returned])
        return records[0], returned[0][1], start

    def _register(self, record: WeightVersion | None, ref: Any, start: float) -> dict[str, float]:
        """The packed version registered with the publisher (outside the ranks' restarts: a registry that cannot be
        reached is not a learner's death); returns the publication's metrics."""
        if self.publisher is None or record is None:
            return {}
        self.publisher.register(record, ref)
        return {"published_version": record.version, "publish_s": time.perf_counter() - start}

    def step(self) -> int:
        return ray.get(self.workers[0].progress.remote())["step"]

    def states(self) -> list[dict[str, Any]]:
        return ray.get([w.state.remote() for w in self.workers])

    def save(self) -> str:
        """A checkpoint of every rank at once; returns rank 0's path."""
        path = ray.get([w.save.remote() for w in self.workers])[0]
        self.saved_at = time.monotonic()
        return path

    def export(self, path: str) -> str:
        return ray.get([w.export.remote(path) for w in self.workers])[0]
