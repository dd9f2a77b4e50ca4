"""Weight publication through the Ray object store: one put, many readers.

``RegistryWeights`` is both sides of the ``WeightPublisher`` / ``WeightSource`` contracts
(``cosmos_policy.contracts``) over one ``WeightRegistry`` actor, whose handle it carries (it is
pickled into the learner's ranks and the actors that read; nobody looks the registry up by name).
The learner's rank 0 packs the denoiser (bf16, plain numpy arrays), ``ray.put``s it once and
registers a ``WeightVersion``; readers ask for the version served of their target, fetch the
packed weights (the object store hands every reader on a node the same shared-memory copy),
verify the checksum and load them. Publishing costs the learner only the copy out of the engine
and the put; the registry keeps the last few versions alive so a slow reader never sees a
vanished object. The version numbers are the learner's (kept in its checkpoints): the registry
only carries them, with each one's status and evaluation (``Status``): under eval-gated promotion
(``launch.promotion``) a published version is a candidate, served only once the gate promotes it.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

import ray

from cosmos_policy.contracts import WeightVersion
from cosmos_policy.weights import Packed, checksum, nbytes, unpack, verify


class Status(StrEnum):
    """Where a published version stands (eval-gated promotion, ``launch.promotion``).

    Ungated, every version is promoted as it is published. Gated, a version is a candidate until the gate has
    played it: promoted (served) or rejected (never served); a promoted version that fails live is rolled back,
    and the one promoted before it is served again."""

    CANDIDATE = "candidate"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"


# max_task_retries=-1: a call that meets the registry while Ray restarts it (after its process died) waits for the new one
# instead of failing with ActorUnavailableError; the learner's publication must not fail because the registry restarts.
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class WeightRegistry:
    """The versions published per target ('policy', 'planning'): each one's record, status and evaluation, and the
    object refs of those a reader may still be handed (the served one, the one a rollback would serve, the newest
    candidates).

    ``gated``: a version is published as a candidate and served only once promoted (``decide``); else every
    version is served as it is published (the newest one). The serving version is the last promoted, not rolled
    back: after a rollback that is an older one, so readers take whatever is served that they do not have, not
    only newer versions.
    """

    def __init__(self, keep: int = 2, gated: bool = False) -> None:
        self.keep, self.gated = keep, gated
        self.entries: dict[str, dict[int, dict[str, Any]]] = {}  # target -> version -> entry (record, ref, status...)
        self.promoted: dict[str, list[int]] = {}  # target -> versions in the order they were promoted

    def publish(self, version: WeightVersion, ref: list, status: str | None = None) -> str:
        """Register a published version (``ref`` arrives wrapped in a list so Ray passes the reference, not the weights);
        returns its status: ``status`` if given (the starting weights of a gated job are promoted as published), else
        a candidate when gated and promoted when not."""
        status = Status(status or (Status.CANDIDATE if self.gated else Status.PROMOTED))
        entries = self.entries.setdefault(version.target, {})
        known = entries.get(version.version)
        if known is not None and known["record"].checksum == version.checksum and status is not Status.PROMOTED:
            known["ref"] = ref  # the same weights again (a resumed learner's last version): as decided before
            return known["status"].value
        entries[version.version] = {"record": version, "ref": ref, "status": status, "evaluation": {}, "since": time.time(),
                                    "pinned": False}
        if status is Status.PROMOTED:
            self._promote(version.target, version.version)
        self._drop_refs(version.target)
        return status.value

    def latest(self, target: str = "policy") -> tuple[WeightVersion, list] | None:
        """The version served now (the last promoted that was not rolled back) and its ref; None before any."""
        serving = self.serving(target)
        if serving is None:
            return None
        entry = self.entries[target][serving]
        return entry["record"], entry["ref"]

    def serving(self, target: str = "policy") -> int | None:
        live = [v for v in self.promoted.get(target, []) if self.entries[target][v]["status"] is Status.PROMOTED]
        return live[-1] if live else None

    def get(self, target: str, version: int) -> tuple[WeightVersion, list] | None:
        """A given version and its ref (the gate plays candidates it does not serve); None when its ref was let go."""
        entry = self.entries.get(target, {}).get(version)
        return None if entry is None or entry["ref"] is None else (entry["record"], entry["ref"])

    def pin(self, target: str, version: int) -> None:
        """Keep a candidate's weights until it is decided: the learner publishes on while the gate waits to play it."""
        self._entry(target, version)["pinned"] = True

    def decide(self, target: str, version: int, status: str, evaluation: dict[str, Any]) -> int | None:
        """A candidate promoted or rejected, with the evaluation that decided it; returns the version served now."""
        entry = self._entry(target, version)
        if entry["status"] is not Status.CANDIDATE:
            raise ValueError(f"{target} version {version} is {entry['status'].value}, not a candidate: it was decided before")
        entry["status"], entry["since"], entry["pinned"] = Status(status), time.time(), False
        entry["evaluation"].update(evaluation)
        if entry["status"] is Status.PROMOTED:
            self._promote(target, version)
        elif entry["status"] is not Status.REJECTED:
            raise ValueError(f"decide: status must be promoted or rejected, got {status!r}")
        self._drop_refs(target)
        return self.serving(target)

    def roll_back(self, target: str, version: int, evidence: dict[str, Any]) -> int | None:
        """The served ``version`` failed live: rolled back, and the version promoted before it is served again
        (returned). Refused when another version is served, or none was promoted before it."""
        if self.serving(target) != version:
            raise ValueError(f"roll_back: {target} version {version} is not the one served ({self.serving(target)})")
        before = [v for v in self.promoted[target][:-1] if self.entries[target][v]["status"] is Status.PROMOTED]
        if not before or self.entries[target][before[-1]]["ref"] is None:
            raise ValueError(f"roll_back: no {target} version promoted before {version} to serve again")
        entry = self.entries[target][version]
        entry["status"], entry["since"] = Status.ROLLED_BACK, time.time()
        entry["evaluation"].update(evidence)
        self.promoted[target].remove(version)
        self._drop_refs(target)
        return self.serving(target)

    def table(self, target: str | None = None) -> list[dict[str, Any]]:
        """Every version's record, status and evaluation (JSON-ready), oldest first."""
        return [{"target": t, "version": v, "step": e["record"].step, "status": e["status"].value, "since": e["since"],
                 "evaluation": dict(e["evaluation"])}
                for t, entries in sorted(self.entries.items()) if target in (None, t) for v, e in sorted(entries.items())]

    def _entry(self, target: str, version: int) -> dict[str, Any]:
        entry = self.entries.get(target, {}).get(version)
        if entry is None:
            raise KeyError(f"no {target} version {version} was published")
        return entry

    def _promote(self, target: str, version: int) -> None:
        order = self.promoted.setdefault(target, [])
        if version in order:
            order.remove(version)
        order.append(version)

    def _drop_refs(self, target: str) -> None:
        """Keep the weights of the served version and of the ``keep`` - 1 promoted before it (what a rollback serves),
        of the newest ``keep`` candidates and of pinned ones; let the others go (their records stay)."""
        entries = self.entries[target]
        promoted = [v for v in self.promoted.get(target, []) if entries[v]["status"] is Status.PROMOTED][-self.keep:]
        candidates = sorted(v for v, e in entries.items() if e["status"] is Status.CANDIDATE)[-self.keep:]
        for v, entry in entries.items():
            if v not in promoted and v not in candidates and not (entry["pinned"] and entry["status"] is Status.CANDIDATE):
                entry["ref"] = None


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

    def publish(self, packed: Packed, version: int, step: int, target: str, status: str | None = None) -> WeightVersion:
        """Put ``packed`` into the object store and register it (``status``: the registry's ``publish``)."""
        start = time.perf_counter()
        ref = ray.put(packed)
        record = WeightVersion(version=version, step=step, checksum=checksum(packed), nbytes=nbytes(packed), target=target)
        self.register(record, ref, status)
        self.publish_s.append(time.perf_counter() - start)
        return record

    def register(self, record: WeightVersion, ref: Any, status: str | None = None) -> str:
        """Register weights already in the object store (``ref``, their ``record``'s checksum computed where they were
        packed); returns their status. They live as long as the process that owns ``ref`` (Ray's ownership): the
        learner group's, not a rank's (``learner.group``)."""
        return ray.get(self.registry.publish.remote(record, [ref], status))

    def latest(self, target: str, have: int | None = None) -> tuple[WeightVersion, dict[str, Any]] | None:
        """The version served now (the newest published, or under eval-gated promotion the last promoted), unless it
        is ``have``: checksum verified. Not only a newer one: after a rollback the served version is an older one.

        The tensors are read-only views of the object store's copy (no second copy of the weights
        in this process): load them with ``load_state_dict``, which copies, and drop them.
        """
        latest = ray.get(self.registry.latest.remote(target))
        if latest is None or latest[0].version == have:
            return None
        return self._fetch(*latest)

    def version(self, target: str, version: int) -> tuple[WeightVersion, dict[str, Any]]:
        """A given published version (a candidate the gate plays), checksum verified; ``KeyError`` when gone."""
        got = ray.get(self.registry.get.remote(target, version))
        if got is None:
            raise KeyError(f"{target} version {version}: not published, or its weights were let go")
        return self._fetch(*got)

    def _fetch(self, record: WeightVersion, wrapped: list) -> tuple[WeightVersion, dict[str, Any]]:
        packed = ray.get(wrapped[0])
        verify(packed, record, self.verify_threads)
        return record, unpack(packed, copy=False)

    def serving(self, target: str) -> int | None:
        return ray.get(self.registry.serving.remote(target))

    def pin(self, target: str, version: int) -> None:
        ray.get(self.registry.pin.remote(target, version))

    def decide(self, target: str, version: int, status: str, evaluation: dict[str, Any]) -> int | None:
        return ray.get(self.registry.decide.remote(target, version, status, evaluation))

    def roll_back(self, target: str, version: int, evidence: dict[str, Any]) -> int | None:
        return ray.get(self.registry.roll_back.remote(target, version, evidence))

    def table(self, target: str | None = None) -> list[dict[str, Any]]:
        return ray.get(self.registry.table.remote(target))


def _named_registry(name: str, verify_threads: int | None) -> RegistryWeights:
    """A client of the named registry (``RegistryWeights.__reduce__``)."""
    return RegistryWeights(ray.get_actor(name), verify_threads, name)
