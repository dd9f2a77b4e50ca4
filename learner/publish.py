"""Weight publication through the Ray object store: one put, many readers.

``RegistryWeights`` is both sides of the ``WeightPublisher`` / ``WeightSource`` contracts
(``cosmos_policy.contracts``) over one ``WeightRegistry`` actor, whose handle it carries (it is
pickled into the learner's ranks and the actors that read; nobody looks the registry up by name).
The learner's rank 0 packs the denoiser (bf16, plain numpy arrays), ``ray.put``s it once and
registers a ``WeightVersion``; readers ask for the newest version of their target, fetch the
packed weights (the object store hands every reader on a node the same shared-memory copy),
verify the checksum and load them. Publishing costs the learner only the copy out of the engine
and the put; the registry keeps the last few versions alive so a slow reader never sees a
vanished object. The version numbers are the learner's (kept in its checkpoints): the registry
only carries them.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from cosmos_policy.contracts import WeightVersion
from cosmos_policy.weights import Packed, checksum, nbytes, unpack, verify


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


class RegistryWeights:
    """Publish to and read from one ``WeightRegistry`` (a ``WeightPublisher`` and a ``WeightSource``).

    ``verify_threads``: threads for the reader's checksum (None: one per core; 1 where several
    readers share few cores).
    """

    def __init__(self, registry: Any, verify_threads: int | None = None, name: str | None = None) -> None:
        """``name``: the registry's actor name, if it has one; a copy then travels as the name (``__reduce__``)."""
        self.registry, self.verify_threads, self.name = registry, verify_threads, name
        self.publish_s: list[float] = []  # seconds per publication (copy into the object store, checksum, register)

    def __reduce__(self) -> tuple:
        """A named registry travels as its name and is found again where the copy is used: an actor handle in a
        restartable actor's constructor arguments (a PolicyServer's) makes Ray keep them in the object store and
        log an error about its restart (as ``replay.ray_backend.RayReplay.__reduce__``)."""
        if self.name is None:
            return (RegistryWeights, (self.registry, self.verify_threads))
        return (_named_registry, (self.name, self.verify_threads))

    def publish(self, packed: Packed, version: int, step: int, target: str) -> WeightVersion:
        start = time.perf_counter()
        ref = ray.put(packed)
        record = WeightVersion(version=version, step=step, checksum=checksum(packed), nbytes=nbytes(packed), target=target)
        ray.get(self.registry.publish.remote(record, [ref]))
        self.publish_s.append(time.perf_counter() - start)
        return record

    def latest(self, target: str, newer_than: int | None = None) -> tuple[WeightVersion, dict[str, Any]] | None:
        """The newest version of ``target`` if newer than ``newer_than``, checksum verified.

        The tensors are read-only views of the object store's copy (no second copy of the weights
        in this process): load them with ``load_state_dict``, which copies, and drop them.
        """
        latest = ray.get(self.registry.latest.remote(target))
        if latest is None or (newer_than is not None and latest[0].version <= newer_than):
            return None
        record, (ref,) = latest
        packed = ray.get(ref)
        verify(packed, record, self.verify_threads)
        return record, unpack(packed, copy=False)


def _named_registry(name: str, verify_threads: int | None) -> RegistryWeights:
    """A client of the named registry (``RegistryWeights.__reduce__``)."""
    return RegistryWeights(ray.get_actor(name), verify_threads, name)
