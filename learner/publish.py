"""Weight publication through the Ray object store: one put, many readers.

The learner's rank 0 packs the denoiser (bf16, plain numpy arrays), ``ray.put``s it once and
registers a ``WeightVersion`` with the ``WeightRegistry`` actor (named ``REGISTRY``). Actors and
policy servers (``actors.weights.WeightSubscriber``) ask the registry, by name, for the latest
version between episodes or batches, fetch the packed weights (the object store hands every
reader on a node the same shared-memory copy), verify the checksum and load them. Publishing costs the learner only the copy out of the engine and the put; the
registry keeps the last few versions alive so a slow reader never sees a vanished object.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from cosmos_policy.weights import REGISTRY, Packed, WeightVersion, checksum, nbytes


@ray.remote(num_cpus=0, max_restarts=-1)
class WeightRegistry:
    """Latest published versions per target ('policy', 'planning'), with their object refs."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self.versions: dict[str, list[tuple[WeightVersion, list]]] = {}

    def publish(self, version: WeightVersion, ref: list) -> None:
        # ``ref`` arrives wrapped in a list so Ray passes the reference instead of the weights.
        history = self.versions.setdefault(version.target, [])
        history.append((version, ref))
        del history[: -self.keep]

    def latest(self, target: str = "policy") -> tuple[WeightVersion, list] | None:
        history = self.versions.get(target)
        return history[-1] if history else None

    def version(self, target: str = "policy") -> int | None:
        history = self.versions.get(target)
        return history[-1][0].version if history else None


def registry(name: str = REGISTRY) -> Any:
    """The named registry actor, created on first use."""
    return WeightRegistry.options(name=name, get_if_exists=True, lifetime="detached").remote()


def publish(packed: Packed, version: int, step: int, target: str = "policy", name: str = REGISTRY) -> tuple[WeightVersion, float]:
    """Put ``packed`` into the object store and register it; returns the version and seconds spent."""
    start = time.perf_counter()
    ref = ray.put(packed)
    record = WeightVersion(version=version, step=step, checksum=checksum(packed), nbytes=nbytes(packed), target=target)
    ray.get(registry(name).publish.remote(record, [ref]))
    return record, time.perf_counter() - start
