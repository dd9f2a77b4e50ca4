"""The replay service: one test suite for every backend (in-process store, Ray shards, Reverb).

The Reverb backend needs the optional ``reverb`` extra (Python <= 3.11, TensorFlow 2.15); its
tests skip where it is not installed and run in CI's Reverb environment (``make test-reverb``),
which sets REQUIRE_REVERB=1 so that a missing Reverb fails them instead of skipping them.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cosmos_policy.contracts import TableName
from cosmos_policy.episode import Episode, EpisodeRecorder, Source
from replay.local import LocalReplay
from replay.config import RateLimiterConfig, ReplayConfig, Signature, TableConfig, default_tables
from replay.table import ReplayTimeout, SignatureError

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["local", "ray", "reverb"]
ON_RAY = ("ray", "ray-reverb")  # RayReplay over shards hosting a ReplayStore, or a ReverbReplay each


def require_reverb() -> None:
    """Skip without dm-reverb, unless REQUIRE_REVERB=1 (the Reverb venv), where its absence is a failure."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads: keep its log noise out
    if os.environ.get("REQUIRE_REVERB") == "1":
        import reverb  # noqa: F401  (an ImportError here fails the test loudly)
    else:
        pytest.importorskip("reverb", reason="dm-reverb is an optional extra (see make test-reverb)")


def episode(steps: int = 10, success: bool = True, source: Source = Source.SIM, seed: int = 0, version: int | None = None,
            size: int = 16, **kw) -> Episode:
    rng = np.random.default_rng(seed)
    frames = {c: rng.integers(0, 256, (steps, size, size, 3), dtype=np.uint8) for c in ("primary", "wrist")}
    return Episode.from_frames(frames, proprio=rng.normal(size=(steps, 9)), actions=rng.normal(size=(steps, 7)),
                               instruction="lift the cube", success=success, source=source, policy_version=version, **kw)


@pytest.fixture
def make(request, tmp_path):
    """make(tables, **config) -> a client of the backend under test, rooted in tmp_path."""
    backend = request.param
    clients = []
    if backend in ON_RAY:
        request.getfixturevalue("ray_local")
    if "reverb" in backend:
        require_reverb()

    def factory(tables: list[TableConfig], names: list[str] | None = None, **kwargs):
        cfg = ReplayConfig(backend="reverb" if "reverb" in backend else "ray", root=str(tmp_path / f"replay{len(clients)}"),
                           tables=tables, **kwargs)
        if backend == "local":
            client = LocalReplay(cfg)
        elif backend in ON_RAY:
            from replay.ray_backend import RayReplay

            client = RayReplay(cfg, names=names, seed=0)
        else:
            from replay.reverb_backend import ReverbReplay

            client = ReverbReplay(cfg)
        client.backend = backend
        clients.append(client)
        return client

    factory.backend = backend
    yield factory
    for c in clients:
        try:
            c.close()
        except Exception:
            pass
        if backend in ON_RAY:
            import ray

            for s in c.shards:
                ray.kill(s)


all_backends = pytest.mark.parametrize("make", BACKENDS, indirect=True)


@all_backends
def test_insert_sample_and_step_windows(make):
    replay = make(default_tables(window=4))
    ep = episode(steps=10, seed=1, version=3, planning_version=2)
    assert replay.insert(TableName.of(ep), ep) == ep.episode_id
    items = replay.sample("experience_success", 32, timeout=10)
    assert len(items) == 32
    for it in items:
        assert it.episode_id == ep.episode_id and 0 <= it.step < 10
        w = it.window
        assert w.future_step == min(it.step + 4, 9) and w.actions.shape == (4, 7)
        assert (w.policy_version, w.planning_version) == (3, 2)  # each learner's staleness reads its own
        assert w.current["wrist"] == ep.images["wrist"].jpegs[it.step]
        assert np.array_equal(w.proprio, ep.proprio[it.step]) and w.num_steps == 10 and w.success
    assert replay.episode_ids("experience_success") == [ep.episode_id]


@all_backends
def test_fifo_eviction_at_max_size(make):
    replay = make([TableConfig(name="t", max_items=25, window=2)])
    eps = [episode(steps=10, seed=i) for i in range(5)]
    for ep in eps:
        replay.insert("t", ep)
    # 25 items hold two 10-step episodes: the three oldest were evicted, in insertion order.
    assert sorted(replay.episode_ids("t")) == sorted(e.episode_id for e in eps[3:])
    assert replay.stats()["t"]["items"] == 20
    sampled = {it.episode_id for it in replay.sample("t", 200, timeout=10)}
    assert sampled == {eps[3].episode_id, eps[4].episode_id}


CHI2_CRITICAL_DF9_P001 = 27.877  # chi-square critical value, 9 degrees of freedom, alpha = 0.001


@all_backends
def test_prioritized_sampling_frequencies_match_priorities(make):
    replay = make([TableConfig(name="p", sampler="prioritized", priority_exponent=1.0, window=1)], shards=2)
    eps = [episode(steps=5, seed=i) for i in range(2)]
    priorities = [float(k + 1) for k in range(10)]
    replay.insert("p", eps[0], priority=priorities[:5])
    replay.insert("p", eps[1], priority=priorities[5:])
    keys = [(eps[i // 5].episode_id, i % 5) for i in range(10)]
    n = 20000
    counts = {k: 0 for k in keys}
    for _ in range(n // 1000):
        for it in replay.sample("p", 1000, timeout=10):
            counts[(it.episode_id, it.step)] += 1
    expected = np.array(priorities) / sum(priorities) * n
    observed = np.array([counts[k] for k in keys])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_CRITICAL_DF9_P001, (chi2, observed, expected)


@all_backends
def test_min_size_blocks_sampling_and_times_out_clearly(make):
    replay = make([TableConfig(name="t", window=1, rate_limiter=RateLimiterConfig(kind="min_size", min_size=15))])
    replay.insert("t", episode(steps=10))
    start = time.monotonic()
    with pytest.raises(ReplayTimeout, match=r"table 't': sample of 4 blocked for 0.5 s by the min_size rate limiter"):
        replay.sample("t", 4, timeout=0.5)
    assert time.monotonic() - start >= 0.45
    replay.insert("t", episode(steps=10, seed=3))
    assert len(replay.sample("t", 4, timeout=5)) == 4
    assert replay.stats()["t"]["blocked_sample_s"] >= 0.45


@all_backends
def test_sample_to_insert_ratio_blocks_the_side_that_runs_ahead(make):
    # diff = inserted items x 1 - sampled items must stay in [1 - 5, 1 + 5]; an episode may enter
    # while the inserter is not yet one item past the upper bound.
    limiter = RateLimiterConfig(kind="sample_to_insert", samples_per_insert=1.0, min_size=1, error_buffer=5)
    replay = make([TableConfig(name="t", window=1, rate_limiter=limiter)])
    replay.insert("t", episode(steps=10, seed=0))  # diff 0 -> 10
    with pytest.raises(ReplayTimeout, match="insert blocked for 0.3 s by the sample_to_insert rate limiter"):
        replay.insert("t", episode(steps=10, seed=1), timeout=0.3)  # 10 + 1 > 6: inserts ran ahead
    replay.sample("t", 10, timeout=5)  # sampling catches up: diff 0
    replay.insert("t", episode(steps=10, seed=2), timeout=5)  # now allowed; diff 10
    with pytest.raises(ReplayTimeout, match=r"sample of 22 blocked"):
        replay.sample("t", 22, timeout=0.3)  # 10 - 22 < -4: samples would run ahead
    stats = replay.stats()["t"]
    assert stats["blocked_insert_s"] >= 0.25 and stats["blocked_sample_s"] >= 0.25


@all_backends
def test_signature_mismatch_is_rejected_and_service_keeps_serving(make):
    sig = Signature(cameras=["primary", "wrist"], image_shape=[16, 16], proprio_dim=9, action_dim=7)
    replay = make([TableConfig(name="t", window=2, signature=sig)])
    replay.insert("t", episode(seed=0))
    wrong = Episode.from_frames({"primary": np.zeros((10, 16, 16, 3), np.uint8)}, proprio=np.zeros((10, 9)),
                                actions=np.zeros((10, 6)), instruction="x", success=False)
    with pytest.raises(SignatureError, match=r"table 't': episode cameras \['primary'\] do not match the signature"):
        replay.insert("t", wrong)
    bad_actions = episode(seed=1)
    bad_actions.actions = np.zeros((10, 6), np.float32)
    with pytest.raises(SignatureError, match="actions have 6 dims, the signature says 7"):
        replay.insert("t", bad_actions)
    replay.insert("t", episode(seed=2))
    assert len(replay.sample("t", 8, timeout=5)) == 8
    assert replay.stats()["t"]["episodes"] == 2


@all_backends
def test_statistics(make):
    replay = make(default_tables(window=2))
    replay.insert("demos", episode(steps=6, source=Source.DEMO, seed=0))
    replay.insert("experience_success", episode(steps=8, seed=1, version=3))
    replay.insert("experience_failure", episode(steps=4, success=False, seed=2, version=1))
    replay.set_version(5)
    replay.sample("experience_success", 5, timeout=5)
    stats = replay.stats()
    assert stats["demos"]["items"] == 6 and stats["demos"]["episodes_demo"] == 1
    s = stats["experience_success"]
    assert s["items"] == 8 and s["episodes_sim"] == 1 and s["episodes_success"] == 1 and s["bytes"] > 0
    assert s["sampled_items"] == 5 and s["inserted_items"] == 8 and s["insert_items_per_s"] > 0
    assert s["staleness_versions"] == pytest.approx(2.0)
    assert stats["experience_failure"]["episodes_failure"] == 1 and stats["experience_failure"]["staleness_versions"] == pytest.approx(4.0)


@all_backends
def test_a_stream_of_steps_closes_into_an_episode(make):
    replay = make(default_tables(window=2))
    recorder = EpisodeRecorder(["primary"])
    rng = np.random.default_rng(0)
    for t in range(6):
        recorder.add({"primary": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)}, rng.normal(size=9), rng.normal(size=7))
    ep = recorder.episode(instruction="open the drawer", success=False, task="drawer", seed=7, policy_version=2)
    replay.insert(TableName.of(ep), ep)
    assert replay.episode_ids("experience_failure") == [ep.episode_id]
    assert ep.num_steps == 6 and ep.seed == 7 and len(ep.timestamps) == 6


# ---- crashes ---------------------------------------------------------------------------
WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    sys.path.insert(0, {root!r})
    from cosmos_policy.episode import Episode
    from replay.config import ReplayConfig, TableConfig
    from replay.service import make_replay
    cfg = ReplayConfig(backend={backend!r}, root={store!r}, tables=[TableConfig(name="t", window=1)], checkpoint_every_s=0.2)
    replay = make_replay(cfg, local=True)
    print("SERVER", replay.server_pid() if hasattr(replay, "server_pid") else 0, flush=True)
    rng = np.random.default_rng(0)
    for i in range(10_000):
        frames = {{"primary": rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)}}
        ep = Episode.from_frames(frames, proprio=np.zeros((5, 9)), actions=np.zeros((5, 7)), instruction="x", success=True)
        print("ACK", replay.insert("t", ep), flush=True)
    """
)


def kill_writer_mid_stream(store: Path, backend: str) -> tuple[list[str], int]:
    """Run WRITER in a process, SIGKILL it after 40 acknowledged inserts; returns every id it acknowledged and its server pid."""
    writer = WRITER.format(root=str(ROOT), store=str(store), backend=backend)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    server, acked = 0, []
    for line in proc.stdout:
        if line.startswith("SERVER"):
            server = int(line.split()[1])
        if line.startswith("ACK"):
            acked.append(line.split()[1])
        if len(acked) >= 40:
            break
    proc.send_signal(signal.SIGKILL)  # mid-stream (a Reverb service with its server): an insert may be half-written
    rest = proc.stdout.read()
    proc.wait()
    return acked + [line.split()[1] for line in rest.splitlines() if line.startswith("ACK")], server


def test_local_store_killed_mid_stream_keeps_every_acknowledged_episode(tmp_path):
    store = tmp_path / "store"
    acked, _ = kill_writer_mid_stream(store, "ray")
    restored = LocalReplay(ReplayConfig(root=str(store), tables=[TableConfig(name="t", window=1)]))
    assert set(acked) <= set(restored.episode_ids("t"))
    assert not list((store / "t").glob(".*.tmp"))  # half-written inserts were cleaned up
    assert len(restored.sample("t", 10, timeout=5)) == 10


def test_unreadable_files_are_moved_aside_and_the_rest_restored(tmp_path):
    cfg = ReplayConfig(root=str(tmp_path / "store"), tables=[TableConfig(name="t", window=1)])
    replay = LocalReplay(cfg)
    eps = [episode(steps=5, seed=i) for i in range(3)]
    for ep in eps:
        replay.insert("t", ep)
    replay.checkpoint()
    (tmp_path / "store" / "checkpoint.json").write_text('{"tables": ')  # cut short
    (tmp_path / "store" / "t" / f"{eps[0].episode_id}.hdf5").write_bytes(b"not an episode")
    restored = LocalReplay(cfg)
    assert sorted(restored.episode_ids("t")) == sorted(e.episode_id for e in eps[1:])
    assert (tmp_path / "store" / "checkpoint.corrupt").exists() and (tmp_path / "store" / "t" / f"{eps[0].episode_id}.corrupt").exists()
    assert len(restored.sample("t", 10, timeout=5)) == 10


@pytest.mark.parametrize("backend", ON_RAY)
def test_ray_shard_killed_mid_stream_keeps_every_acknowledged_episode(backend, ray_local, tmp_path):
    if backend == "ray-reverb":
        require_reverb()
    from replay.ray_backend import RayReplay

    ray = ray_local
    cfg = ReplayConfig(backend="reverb" if backend == "ray-reverb" else "ray", root=str(tmp_path / "store"), shards=2,
                       tables=[TableConfig(name="t", window=1)], checkpoint_every_s=0.5)
    replay = RayReplay(cfg, seed=0)
    try:
        acked = []
        pids = ray.get([s.pid.remote() for s in replay.shards])
        for i in range(30):
            if i == 12:
                os.kill(pids[0], signal.SIGKILL)  # the shard process dies mid-stream; Ray restarts it
            acked.append(replay.insert("t", episode(steps=5, seed=i)))
        new_pids = ray.get([s.pid.remote() for s in replay.shards])
        assert new_pids[0] != pids[0] and ray.get(replay.shards[0].restored.remote())["t"] >= 1
        assert sorted(replay.episode_ids("t")) == sorted(acked)
        assert len(replay.sample("t", 20, timeout=10)) == 20
    finally:
        for s in replay.shards:
            ray.kill(s)


@pytest.mark.parametrize("make", ["ray"], indirect=True)  # Reverb shards: tests/test_online.py runs a whole job on them
def test_a_pickled_client_samples_what_another_inserted(make):
    # An EnvRunner and a learner each get a copy of the client, serialized as Ray hands it to an actor.
    import ray

    from replay.ray_backend import RayReplay

    shards = 2 if make.backend == "ray" else 1  # a Reverb shard starts TensorFlow twice (actor and server): keep it to one
    names = [f"pickled-{os.getpid()}-{time.monotonic_ns()}-{i}" for i in range(shards)]
    inserter = make(default_tables(window=2), names=names, shards=shards)
    learner = ray.get(ray.put(inserter))
    eps = [episode(steps=6, seed=i) for i in range(4)]
    for ep in eps:
        inserter.insert(TableName.of(ep), ep)
    assert sorted(learner.episode_ids("experience_success")) == sorted(e.episode_id for e in eps)
    assert {it.episode_id for it in learner.sample("experience_success", 80, timeout=10)} == {e.episode_id for e in eps}
    assert pickle.loads(pickle.dumps(learner)).episode_ids("experience_success") == learner.episode_ids("experience_success")
    again = RayReplay(inserter.config, names=names)  # named shards are found again, not created twice
    assert ray.get([s.pid.remote() for s in again.shards]) == ray.get([s.pid.remote() for s in inserter.shards])


def test_reverb_server_killed_mid_stream_keeps_every_acknowledged_episode(tmp_path):
    require_reverb()
    from replay.reverb_backend import ReverbReplay

    cfg = ReplayConfig(backend="reverb", root=str(tmp_path / "store"), tables=[TableConfig(name="t", window=1)],
                       checkpoint_every_s=3600)
    replay = ReverbReplay(cfg)
    try:
        acked = []
        pid = replay.server_pid()
        for i in range(30):
            if i == 7:
                replay.checkpoint()  # Reverb's checkpoint holds episodes 0-6; later ones exist only as files when it dies
            if i == 12:
                os.kill(pid, signal.SIGKILL)  # the server process dies mid-stream; the next call restarts it
            acked.append(replay.insert("t", episode(steps=5, seed=i)))
        assert replay.server_pid() != pid
        assert replay.restored_from["t"] == {"checkpoint": 7, "files": 6}  # 7-11, and 12 whose file was written first
        assert sorted(replay.episode_ids("t")) == sorted(acked)
        assert {it.episode_id for it in replay.sample("t", 300, timeout=10)} == set(acked)
        assert replay.stats()["t"]["items"] == 150
    finally:
        replay.close()


def test_reverb_service_killed_mid_stream_keeps_every_acknowledged_episode(tmp_path):
    require_reverb()
    from replay.reverb_backend import ReverbReplay

    store = tmp_path / "store"
    acked, server = kill_writer_mid_stream(store, "reverb")
    deadline = time.monotonic() + 10
    while Path(f"/proc/{server}").exists() and time.monotonic() < deadline:  # an orphaned server stops by itself
        time.sleep(0.1)
    assert not Path(f"/proc/{server}").exists()
    restored = ReverbReplay(ReplayConfig(backend="reverb", root=str(store), tables=[TableConfig(name="t", window=1)]))
    try:
        assert restored.restored_from["t"]["checkpoint"] >= 1  # Reverb's checkpoint, plus the files written since
        assert set(acked) <= set(restored.episode_ids("t"))
        assert not list((store / "t").glob(".*.tmp"))  # half-written inserts were cleaned up
        assert len(restored.sample("t", 10, timeout=5)) == 10
    finally:
        restored.close()


@pytest.mark.parametrize("make", ["local"], indirect=True)
def test_checkpoint_restores_priorities_and_counters(make, tmp_path):
    replay = make([TableConfig(name="p", sampler="prioritized", window=1)])
    ep = episode(steps=5)
    replay.insert("p", ep, priority=0.0)
    replay.update_priorities("p", [(ep.episode_id, 3)], [2.0])
    replay.sample("p", 7, timeout=5)
    replay.checkpoint()
    again = LocalReplay(replay.store.config)
    assert {it.step for it in again.sample("p", 20, timeout=5)} == {3}
    stats = again.stats()["p"]
    assert stats["inserted_items"] == 5 and stats["sampled_items"] == 27 and stats["inserted_episodes"] == 1


@all_backends
def test_priority_updates_of_sampled_items_change_what_is_sampled(make):
    replay = make([TableConfig(name="p", sampler="prioritized", priority_exponent=1.0, window=1)])
    ep = episode(steps=6)
    replay.insert("p", ep, priority=1.0)
    items = replay.sample("p", 60, timeout=5)
    # The learner's update: all weight on step 2 (e.g. by value error), nothing on the others.
    keys = sorted({(it.episode_id, it.step) for it in items})
    assert replay.update_priorities("p", keys, [5.0 if step == 2 else 0.0 for _, step in keys]) == len(keys)
    assert {it.step for it in replay.sample("p", 50, timeout=5)} == {2}


@all_backends
def test_items_only_where_frames_were_rendered(make):
    """Runners render cameras at query steps only: items are the steps with frames at t and t + K, in every backend."""
    replay = make([TableConfig(name="t", window=4)])
    ep = episode(steps=13)
    for seq in ep.images.values():
        seq._jpegs = [j if t % 4 == 0 else b"" for t, j in enumerate(seq.jpegs)]
    replay.insert("t", ep)
    assert replay.stats()["t"]["items"] == 4
    assert {it.step for it in replay.sample("t", 100, timeout=5)} == {0, 4, 8, 12}
