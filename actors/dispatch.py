"""Spreading jobs over a set of actors as they come free (collection rounds and evaluations alike).

An actor that dies mid-episode (kill -9, an out-of-memory kill, a lost node) must not end the job:
Ray restarts it (``max_restarts``), the episode it was playing is lost and counted, and the job is
played again, on whichever actor comes free first. Episodes are seeded, so the replay is the same
episode, and an evaluation keeps its fixed set of episodes.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence, TypeVar

import ray
from ray.exceptions import ActorDiedError, RayActorError

Job = TypeVar("Job")

ATTEMPTS = 3  # plays of one job that end in its actor's death before the job itself is taken to be the cause
RESTART_S = 300.0  # how long an actor may take to come back before the pool goes on without it


class LostTooOften(RuntimeError):
    """A job whose actor died ``ATTEMPTS`` times in a row: the job, not bad luck, kills its actors."""


def spread(actors: Sequence[Any], jobs: Sequence[Job], submit: Callable[[Any, Job], Any],
           on_result: Callable[[int, int], None] | None = None,
           on_lost: Callable[[Job, BaseException], None] | None = None, attempts: int = ATTEMPTS,
           restart_s: float = RESTART_S, on_done: Callable[[Job, Any], None] | None = None,
           stop: Callable[[], bool] | None = None) -> list[tuple[Job, Any]]:
    """Run every job, each on the next free actor (``submit(actor, job)`` returns the call's object ref).

    Returns (job, result) pairs in the order they finished; ``on_result(done, total)`` after each.
    A call that fails because its actor died (``RayActorError``, also when an actor it called died,
    such as the PolicyServer behind an EnvRunner) is reported to ``on_lost(job, error)`` and the job goes
    back to the head of the queue. The actor rejoins the pool once it answers again (Ray restarted it);
    one that cannot be restarted, or does not answer within ``restart_s``, leaves it, and with no actor
    left the spread fails. After ``attempts`` such failures of one job, ``LostTooOften`` names it. Any
    other error of a job is the job's own and ends the spread.

    ``on_done(job, result)`` hears of each result as it comes. Once ``stop()`` is true no job is started;
    the spread returns when the episodes being played have ended (what they recorded is kept).
    """
    queue: list[tuple[int, Job]] = list(enumerate(jobs))
    pending: dict[Any, tuple[Any, int, Job]] = {}
    probes: dict[Any, tuple[Any, float]] = {}  # an actor that lost its episode, and since when: back in the pool once it answers
    free = list(actors)
    failures = [0] * len(jobs)
    results: list[tuple[Job, Any]] = []
    while queue or pending or probes:  # the probes too: the next spread starts with its actors back, not restarting
        if stop is not None and stop():
            if not pending:
                break
            queue.clear()
        while free and queue:
            actor, (i, job) = free.pop(), queue.pop(0)
            pending[submit(actor, job)] = (actor, i, job)
        if queue and not pending and not probes:
            raise RuntimeError(f"spread: every actor died for good with {len(queue)} of {len(jobs)} jobs left")
        done, _ = ray.wait([*pending, *probes], num_returns=1)
        if done[0] in probes:
            actor, since = probes.pop(done[0])
            try:
                ray.get(done[0])
                free.append(actor)
            except ActorDiedError:  # dead for good (no restarts left): the pool goes on without it
                pass
            except RayActorError:  # still restarting: ask again, for as long as a restart may take
                if time.monotonic() - since < restart_s:
                    time.sleep(0.2)
                    probes[actor.__ray_ready__.remote()] = (actor, since)
            continue
        actor, i, job = pending.pop(done[0])
        try:
            value = ray.get(done[0])
        except RayActorError as exc:
            failures[i] += 1
            if on_lost is not None:
                on_lost(job, exc)
            if failures[i] >= attempts:
                raise LostTooOften(f"{job!r}: its actor died {failures[i]} times while playing it; last: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
            queue.insert(0, (i, job))
            probes[actor.__ray_ready__.remote()] = (actor, time.monotonic())
            continue
        free.append(actor)
        results.append((job, value))
        if on_done is not None:
            on_done(job, value)
        if on_result is not None:
            on_result(len(results), len(jobs))
    return results
