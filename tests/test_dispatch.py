"""Jobs spread over actors that die mid-job (actors/dispatch.py), on a real local Ray cluster: the job is played
again elsewhere and counted, a restarted actor rejoins the pool, one that cannot restart leaves it, and a job
that kills every actor it meets is named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from actors.dispatch import LostTooOften, spread


def _player(ray, max_restarts: int):
    @ray.remote(num_cpus=0, max_restarts=max_restarts)
    class Player:
        """Plays a job (returns job * 10); ``kill`` lists jobs that end its process (kill -9 alike) the first
        time they are played, or every time with ``always``; a ``raise`` job fails as the job's own error."""

        def play(self, job: int, kill: list[int], marks: str, always: bool = False) -> int:
            mark = Path(marks) / str(job)
            if job in kill and (always or not mark.exists()):
                mark.touch()
                os._exit(1)
            if job < 0:
                raise ValueError(f"job {job} is bad")
            return job * 10

        def pid(self) -> int:
            return os.getpid()

    return Player


def test_a_job_whose_actor_dies_is_played_again_and_the_actor_rejoins(ray_local, tmp_path):
    ray = ray_local
    players = [_player(ray, max_restarts=-1).remote() for _ in range(2)]
    pids = ray.get([p.pid.remote() for p in players])
    lost: list[int] = []
    results = spread(players, list(range(6)), lambda p, job: p.play.remote(job, [2], str(tmp_path)),
                     on_lost=lambda job, exc: lost.append(job))
    assert sorted(results) == [(j, j * 10) for j in range(6)] and lost == [2]
    # The pool is whole again when spread returns: the restarted actor answers at once (a new process).
    now = ray.get([p.pid.remote() for p in players], timeout=5)
    assert len(set(now) - set(pids)) == 1


def test_an_actor_that_cannot_restart_leaves_the_pool(ray_local, tmp_path):
    ray = ray_local
    mortal, keeper = _player(ray, max_restarts=0).remote(), _player(ray, max_restarts=-1).remote()
    ray.get([mortal.pid.remote(), keeper.pid.remote()])
    lost: list[int] = []
    results = spread([keeper, mortal], list(range(8)), lambda p, job: p.play.remote(job, [0] if p is mortal else [], str(tmp_path)),
                     on_lost=lambda job, exc: lost.append(job))
    assert sorted(results) == [(j, j * 10) for j in range(8)] and lost == [0]
    with pytest.raises(ray.exceptions.ActorDiedError):
        ray.get(mortal.pid.remote(), timeout=30)


def test_a_job_that_kills_every_actor_is_named_and_an_own_error_is_raised(ray_local, tmp_path):
    ray = ray_local
    players = [_player(ray, max_restarts=-1).remote() for _ in range(2)]
    lost: list[int] = []
    with pytest.raises(LostTooOften, match="^5: its actor died 3 times"):
        spread(players, [4, 5], lambda p, job: p.play.remote(job, [5], str(tmp_path), True), on_lost=lambda job, exc: lost.append(job))
    assert lost == [5, 5, 5]
    with pytest.raises(ValueError, match="job -1 is bad"):
        spread(players, [1, -1], lambda p, job: p.play.remote(job, [], str(tmp_path)))


def test_a_full_disk_is_found_under_a_remote_error(ray_local):
    """A write that fills the disk inside an actor's call (a learner's export, a replay insert) reaches the job as
    Ray's wrapper of it; ``disk_full`` finds the ENOSPC under it, which the job reports as one line
    (tests/test_first_contact.py). /dev/full fails every write with ENOSPC, as a full disk does."""
    from cosmos_policy.errors import disk_full

    ray = ray_local

    @ray.remote(num_cpus=0)
    def export() -> None:
        with open("/dev/full", "wb") as f:
            f.write(b"weights")

    with pytest.raises(Exception) as caught:
        ray.get(export.remote())
    assert disk_full(caught.value) is not None and "No space left on device" in str(disk_full(caught.value))
    assert disk_full(ValueError("a bad value")) is None
