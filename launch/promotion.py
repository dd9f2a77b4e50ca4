"""Eval-gated promotion: a published version is served only once a paired evaluation says it is no worse.

In continual learning a bad refinement would otherwise reach every actor at once and stay. With
``promotion.enabled`` the weight registry (``learner.publish.WeightRegistry``) takes each published
version as a candidate, and the PolicyServers serve only promoted ones. At each round's end the
gate plays the round's candidate on ``promotion.states`` held-out initial states per task (seeded
placements that neither the collection nor the evaluation plays), on a PolicyServer and EnvRunners
of its own, and the version served now on the same states and seeds; it promotes the candidate
unless its success is below the served version's by more than ``promotion.tolerance`` (a paired
difference, episode by episode), and rejects it otherwise: never served. The served version keeps
serving either way, and the learner goes on from its own weights.

Live, a promoted version is watched over its first ``promotion.live_window`` ordinary collection
episodes: if its success there falls below what the version before it showed (that version's own
last window of live episodes, or its gate evaluation) by more than ``promotion.live_tolerance``, it
is rolled back: the registry serves the version promoted before it again, and the servers take it
between batches. Every decision, with its evaluation, is in the registry's table, in
``metrics.jsonl`` / W&B (``promotion`` records) and on the plot.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray
from ray.exceptions import RayTaskError

from actors.dispatch import spread
from actors.env_runner import EpisodeResult
from cosmos_policy.errors import CheckpointError
from learner.publish import RegistryWeights, Status

Versions = dict[str, int]  # target -> version
Outcomes = dict[tuple[str, int], bool]  # (task, seed) -> success


def gate_states(tasks: list[str], states: int, seed: int) -> list[tuple[str, int]]:
    """The gate's (task, seed) episodes: the same every gate, and none the collection plays (whose seeds come from
    ``cosmos_policy.episode.episode_seed`` of two numbers; these from three)."""
    return [(task, int(np.random.SeedSequence([int(seed) % 2**63, 0x6A7E, i]).generate_state(1, dtype=np.uint32)[0]))
            for task in tasks for i in range(states)]


def paired_difference(candidate: Outcomes, served: Outcomes) -> dict[str, float]:
    """The candidate against the served version on the episodes both played (same task, state and seed): their
    success, the mean paired difference and its standard error, and the episodes only one succeeded on."""
    keys = sorted(set(candidate) & set(served))
    c = np.array([candidate[k] for k in keys], dtype=float)
    s = np.array([served[k] for k in keys], dtype=float)
    d = c - s
    return {"episodes": len(keys), "success": float(c.mean()) if keys else 0.0, "served_success": float(s.mean()) if keys else 0.0,
            "difference": float(d.mean()) if keys else 0.0,
            "difference_se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0,
            "only_candidate": int(((c == 1) & (s == 0)).sum()), "only_served": int(((c == 0) & (s == 1)).sum())}


@dataclass
class PromotionConfig:
    """What the gate and the live watch need (``launch.experiment.PromotionSection`` holds them for the job)."""

    states: int = 20
    tolerance: float = 0.05
    live_window: int = 20
    live_tolerance: float = 0.2
    plan: bool = True
    seed: int = 0


class Promotion:
    """The gate (``gate``) and the live watch (``observe``) over one registry, one gate PolicyServer (which must not
    poll: it serves what the gate asks) and the gate's EnvRunners (bound to that server).

    ``log(kind, record)`` hears of every decision (the job's ``Monitor.log``); ``keep``: a directory under which the
    promoted versions' exports are kept (``<target>_promoted``, and the one before as ``<target>_promoted_before``, which
    a rollback puts back), so a resumed job serves what was promoted, not the learner's newest candidate.
    """

    def __init__(self, config: PromotionConfig, weights: RegistryWeights, server: Any, runners: list[Any], tasks: list[str],
                 log: Callable[[str, dict[str, Any]], None] | None = None, keep: Path | None = None,
                 say: Callable[[str], None] = print) -> None:
        self.config, self.weights, self.server, self.runners, self.tasks = config, weights, server, runners, tasks
        self.log, self.keep, self.say = log or (lambda kind, record: None), keep, say
        self.states = gate_states(tasks, config.states, config.seed)
        self._lock = threading.Lock()
        self._gated: dict[tuple, Outcomes] = {}  # served set -> its gate outcomes
        self._before: dict[tuple, tuple] = {}  # a promoted set -> the set served before it
        self._live: dict[tuple, list[bool]] = {}  # served set -> its live outcomes, in order
        self._watched: set[tuple] = set()  # promoted sets whose first live window is still to be judged
        self.served: Versions = {}

    def begin(self, targets: list[str]) -> Versions:
        """The starting weights (the gate server's, which are the collection servers') become the first promoted
        version of each target with none served yet; returns the versions served of ``targets``."""
        ray.get(self.server.publish_served.remote(Status.PROMOTED.value))
        self.served = {t: v for t in targets if (v := self.weights.serving(t)) is not None}
        return dict(self.served)

    def pin(self, candidates: Versions) -> None:
        """Keep these candidates' weights until the gate has played them: the learner's thread calls it as a round's
        refinement ends, before it publishes the next round's versions (the registry keeps only the newest few)."""
        for target, version in candidates.items():
            if self.served.get(target) != version:
                self.weights.pin(target, version)

    def gate(self, candidates: Versions, round_: int, exported: dict[str, str | None] | None = None) -> dict[str, Any]:
        """Play ``candidates`` (target -> version) against the versions served, on the gate states; promote or reject
        them together. Returns the ``promotion`` record (also logged)."""
        with self._lock:
            served = dict(self.served)
        todo = {t: v for t, v in candidates.items() if served.get(t) != v}
        if not todo:  # nothing new (a resumed round publishing the version it had)
            return {"round": round_, "status": "served", **{f"{t}_version": v for t, v in candidates.items()}}
        key = _key(served)
        if key not in self._gated:
            self._gated[key] = self._play(served)
        record: dict[str, Any] = {"round": round_, "served": served, "candidates": todo}
        try:
            outcomes = self._play({**served, **todo})
            record.update(paired_difference(outcomes, self._gated[key]))
            promoted = record["difference"] >= -self.config.tolerance
            record["reason"] = (f"success {record['success']:.2f} against {record['served_success']:.2f} served "
                                f"({record['difference']:+.2f}, tolerance {self.config.tolerance})")
        except (CheckpointError, RayTaskError, KeyError) as exc:  # it cannot load or cannot act: never served
            outcomes, promoted = {}, False
            record["reason"] = f"it could not be played: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        status = Status.PROMOTED if promoted else Status.REJECTED
        evaluation = {k: v for k, v in record.items() if k not in ("served", "candidates")}
        for target, version in todo.items():
            self.weights.decide(target, version, status.value, {**evaluation, "served": served.get(target)})
        record["status"] = status.value
        with self._lock:
            if promoted:
                new = {**served, **todo}
                self._gated[_key(new)] = outcomes
                self._before[_key(new)] = key
                self._watched.add(_key(new))
                self.served = new
                self._keep_exports(exported or {})
        self.log("promotion", {**{f"{t}_version": v for t, v in todo.items()}, "promoted": int(promoted),  # (W&B charts numbers)
                               **{k: v for k, v in record.items() if k not in ("served", "candidates")}})
        self.say(f"round {round_}: {status.value} " + ", ".join(f"{t} version {v}" for t, v in todo.items()) + f": {record['reason']}")
        return record

    def observe(self, results: list[EpisodeResult]) -> dict[str, Any] | None:
        """Live episodes (ordinary collection episodes, not branches: their outcome is the served version's); rolls the
        served version back when its first window fails (see the module docstring). Returns the rollback record."""
        with self._lock:
            served = dict(self.served)
            key = _key(served)
            for r in results:
                if not r.interrupted and _played_on(r, served):
                    self._live.setdefault(key, []).append(bool(r.success))
            window = self.config.live_window
            live = self._live.get(key, [])
            if window <= 0 or key not in self._watched or len(live) < window:
                return None
            self._watched.discard(key)
            before = self._before[key]
            earlier = self._live.get(before, [])
            reference = float(np.mean(earlier[-window:])) if len(earlier) >= window else float(np.mean(list(self._gated[before].values())))
            success = float(np.mean(live[:window]))
            if success >= reference - self.config.live_tolerance:
                self.log("promotion", {**{f"{t}_version": v for t, v in served.items()}, "status": "kept", "rolled_back": 0, "live_success": success,
                                       "live_reference": reference, "live_episodes": window})
                return None
            evidence = {"live_success": success, "live_reference": reference, "live_episodes": window}
            back = {t: self.weights.roll_back(t, v, evidence) for t, v in served.items() if v != dict(before).get(t)}
            self.served = {**served, **{t: v for t, v in back.items() if v is not None}}
            self._restore_exports(list(back))
        record = {**{f"{t}_version": v for t, v in served.items()}, "status": Status.ROLLED_BACK.value, "rolled_back": 1, **evidence,
                  "serving_again": self.served}
        self.log("promotion", record)
        self.say(f"warning: rolled back {served}: live success {success:.2f} over {window} episodes against {reference:.2f} "
                 f"before it (promotion.live_tolerance {self.config.live_tolerance}); serving {self.served} again")
        return record

    def table(self) -> list[dict[str, Any]]:
        return self.weights.table()

    def _play(self, versions: Versions) -> Outcomes:
        """The gate states' episodes on the gate server serving ``versions`` (unrecorded)."""
        ray.get(self.server.serve_versions.remote(versions))
        played = spread(self.runners, self.states, lambda runner, job: runner.run.remote(
            job[0], job[1], None, {"gate": True}, self.config.plan, False))
        return {(job[0], job[1]): bool(r.success) for job, r in played if not r.interrupted}

    def _keep_exports(self, exported: dict[str, str | None]) -> None:
        if self.keep is None:
            return
        for target, path in exported.items():
            if not path or not Path(path).exists():
                continue
            kept, before = self.keep / f"{target}_promoted", self.keep / f"{target}_promoted_before"
            shutil.rmtree(before, ignore_errors=True)
            if kept.exists():
                kept.rename(before)
            tmp = self.keep / f".{target}_promoted.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            (shutil.copytree if Path(path).is_dir() else shutil.copy2)(path, tmp)
            tmp.rename(kept)

    def _restore_exports(self, targets: list[str]) -> None:
        if self.keep is None:
            return
        for target in targets:
            kept, before = self.keep / f"{target}_promoted", self.keep / f"{target}_promoted_before"
            if before.exists():
                shutil.rmtree(kept, ignore_errors=True)
                before.rename(kept)

    @staticmethod
    def promoted_export(keep: Path, target: str) -> Path | None:
        """The export a resumed gated job serves for ``target`` (None: its starting checkpoint)."""
        path = keep / f"{target}_promoted"
        return path if path.exists() else None


def _key(versions: Versions) -> tuple:
    return tuple(sorted(versions.items()))


def _played_on(result: EpisodeResult, served: Versions) -> bool:
    """Whether every model the episode used acted with the served version (a model it did not use reports None)."""
    used = {"policy": result.policy_version, "planning": result.planning_version}
    return all(used.get(t) in (None, v) for t, v in served.items()) and any(used.get(t) is not None for t in served)
