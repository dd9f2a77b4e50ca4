"""Spreading jobs over a set of actors as they come free (collection rounds and evaluations alike)."""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

import ray

Job = TypeVar("Job")


def spread(actors: Sequence[Any], jobs: Sequence[Job], submit: Callable[[Any, Job], Any],
           on_result: Callable[[int, int], None] | None = None) -> list[tuple[Job, Any]]:
    """Run every job, each on the next free actor (``submit(actor, job)`` returns the call's object ref).

    Returns (job, result) pairs in the order they finished; ``on_result(done, total)`` after each.
    """
    queue, pending, free = list(jobs), {}, list(actors)
    results: list[tuple[Job, Any]] = []
    while queue or pending:
        while free and queue:
            actor, job = free.pop(), queue.pop(0)
            pending[submit(actor, job)] = (actor, job)
        done, _ = ray.wait(list(pending), num_returns=1)
        actor, job = pending.pop(done[0])
        results.append((job, ray.get(done[0])))
        free.append(actor)
        if on_result is not None:
            on_result(len(results), len(jobs))
    return results
