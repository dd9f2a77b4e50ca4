"""Pulling published weights: the actor side of weight publication.

The learner registers each version with a registry actor found by name (``REGISTRY``); a
subscriber asks it for the newest version of its target between episodes or batches, fetches
the packed weights from the object store, verifies the checksum and hands back tensors to load.
"""

from __future__ import annotations

from typing import Any

import ray

from cosmos_policy.weights import REGISTRY, WeightVersion, unpack, verify


class WeightSubscriber:
    def __init__(self, target: str = "policy", name: str = REGISTRY, verify_threads: int | None = None) -> None:
        """``verify_threads``: threads for the checksum (None: one per core; 1 where several readers share few cores)."""
        self.target = target
        self.name = name
        self.verify_threads = verify_threads
        self.version: int | None = None
        self._registry: Any = None

    def _handle(self) -> Any:
        if self._registry is None:
            try:
                self._registry = ray.get_actor(self.name)
            except ValueError:  # nothing published yet
                return None
        return self._registry

    def poll(self) -> tuple[WeightVersion, dict] | None:
        """The newest version's weights if it is newer than what this subscriber last took.

        The tensors are read-only views of the object store's copy (no second copy of the
        weights in this process): load them with ``load_state_dict``, which copies, and drop them.
        """
        handle = self._handle()
        latest = None if handle is None else ray.get(handle.latest.remote(self.target))
        if latest is None or (self.version is not None and latest[0].version <= self.version):
            return None
        record, (ref,) = latest
        packed = ray.get(ref)
        verify(packed, record, self.verify_threads)
        self.version = record.version
        return record, unpack(packed, copy=False)
