"""The DeepSpeed learner on CPUs (gloo): training, agreement across ranks, exact resume,
recovery from a killed worker, weight publication to policy servers, and clear errors."""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pytest
import torch

from cosmos_policy.errors import CheckpointError, ConfigError
from learner.data import SyntheticBatches, synthetic_source
from learner.engine import Learner, LearnerConfig
from learner.schedule import ScheduleConfig, lr_multiplier

FLAT = ScheduleConfig(warmup_steps=0, cycle_steps=1000, end_of_cycle=1.0)


def config(tmp_path, **kw) -> LearnerConfig:
    base = dict(micro_batch=2, lr=2e-3, schedule=FLAT, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=0, seed=0)
    base.update(kw)
    return LearnerConfig(**base)


def test_schedule_is_the_official_two_cycle_linear_one():
    cfg = ScheduleConfig()
    assert lr_multiplier(0, cfg) == pytest.approx(1e-6)
    assert lr_multiplier(500, cfg) == pytest.approx(0.5, abs=1e-6)
    assert lr_multiplier(1000, cfg) == pytest.approx(1.0)
    assert lr_multiplier(15500, cfg) == pytest.approx(0.65)
    assert lr_multiplier(29999, cfg) == pytest.approx(0.3, abs=1e-4)
    assert lr_multiplier(30000, cfg) == 0.06 and lr_multiplier(10**6, cfg) == 0.06
    with pytest.raises(ConfigError, match=r"learner.schedule.cycle_steps: expected more than warmup_steps \(40\), got 30"):
        ScheduleConfig(warmup_steps=40, cycle_steps=30)


def test_resumed_run_repeats_the_uninterrupted_loss_sequence(tmp_path):
    """Deterministic mode: 3 steps, checkpoint, a new learner resumes, 3 more == 6 straight steps."""
    os.environ.update(MASTER_PORT="29633")
    straight = Learner(config(tmp_path / "a", deterministic=True), synthetic_source(2))
    losses = [straight.train_step()["loss"] for _ in range(6)]
    first = Learner(config(tmp_path / "b", deterministic=True), synthetic_source(2))
    part = [first.train_step()["loss"] for _ in range(3)]
    first.save()
    second = Learner(config(tmp_path / "b", deterministic=True), synthetic_source(2))
    assert second.resume() and second.step == 3
    part += [second.train_step()["loss"] for _ in range(3)]
    assert np.allclose(part, losses, rtol=1e-5), (part, losses)
    assert losses[-1] != losses[0]
    torch.use_deterministic_algorithms(False)


def test_a_learner_without_its_checkpoints_continues_from_its_export(tmp_path):
    """learner.init_counts: a run moved without its learner checkpoints restarts from the latest export on the
    same step, weight version and learning rate (a fresh optimizer state); without it, the counts start at 0."""
    os.environ.update(MASTER_PORT="29635")
    schedule = ScheduleConfig(warmup_steps=0, cycle_steps=10, end_of_cycle=0.5)
    first = Learner(config(tmp_path / "a", schedule=schedule), synthetic_source(2))
    for _ in range(3):
        first.train_step()
    first.version = 2  # two publications (the group's publish counts them)
    export = first.export(tmp_path / "export")
    moved = Learner(config(tmp_path / "b", schedule=schedule, init_checkpoint=str(export), init_counts=True), synthetic_source(2))
    assert not moved.resume()  # nothing of its own under checkpoint_dir
    assert (moved.step, moved.version, moved.samples) == (3, 2, first.samples)
    assert moved.scheduler.get_last_lr() == pytest.approx(first.scheduler.get_last_lr())  # 2e-3 * (1 - 0.5 * 3 / 10)
    assert moved.train_step()["lr"] == pytest.approx(first.train_step()["lr"])
    fresh = Learner(config(tmp_path / "c", schedule=schedule, init_checkpoint=str(export)), synthetic_source(2))
    assert (fresh.step, fresh.version) == (0, 0)


def test_bad_configs_and_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="learner.zero_stage"):
        LearnerConfig(zero_stage=4)
    with pytest.raises(ConfigError, match="learner.micro_batch"):
        LearnerConfig(micro_batch=0)
    os.environ.update(MASTER_PORT="29634")
    learner = Learner(config(tmp_path), synthetic_source(2))
    learner.train_step()
    saved = learner.save()
    # Corrupt: the model states file overwritten with garbage.
    states = next(saved.glob("*model_states.pt"))
    states.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="cannot resume from this learner checkpoint"):
        Learner(config(tmp_path), synthetic_source(2)).resume()
    # Mismatched: a checkpoint of a 3-block network resumed by a 2-block one.
    other = Learner(config(tmp_path / "big"), synthetic_source(2), model=None)
    other.save()
    import shutil

    shutil.rmtree(tmp_path / "ckpt")
    shutil.copytree(tmp_path / "big" / "ckpt", tmp_path / "ckpt")
    from cosmos_policy.config import load_model_config
    from cosmos_policy.layout import load_layout
    from cosmos_policy.model import CosmosPolicyModel

    bigger = CosmosPolicyModel(load_model_config("tiny", ["network.num_layers=3"]), load_layout("libero"))
    with pytest.raises(CheckpointError, match="cannot resume"):
        Learner(config(tmp_path), synthetic_source(2), model=bigger).resume()


@pytest.mark.parametrize("world_size", [1, 2])
def test_ranks_lower_the_loss_and_keep_identical_weights(ray_local, tmp_path, world_size):
    from cosmos_policy.config import load_model_config
    from cosmos_policy.layout import load_layout
    from cosmos_policy.model import CosmosPolicyModel
    from learner.group import LearnerGroup

    ray = ray_local
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    group = LearnerGroup(config(tmp_path), synthetic_source(2, fixed=True), world_size=world_size, cpus_per_worker=0.5)
    model = CosmosPolicyModel.build(load_model_config("tiny"), load_layout("libero"))
    fixed = SyntheticBatches(model, 2, fixed=True).batch(0)
    before = ray.get(group.workers[0].evaluate.remote(fixed))
    group.train(8, chunk=4)
    after = ray.get(group.workers[0].evaluate.remote(fixed))
    assert after < before * 0.8, (before, after)
    states = group.states()
    assert len({s["checksum"] for s in states}) == 1 and all(s["step"] == 8 for s in states)
    group.stop()


def test_a_killed_worker_is_restarted_from_the_last_checkpoint(ray_local, tmp_path):
    from learner.group import LearnerGroup

    group = LearnerGroup(config(tmp_path, checkpoint_every=2), synthetic_source(2), world_size=2, cpus_per_worker=0.5)
    group.train(4, chunk=2)
    os.kill(group.states()[1]["pid"], signal.SIGKILL)
    assert group.train(4, chunk=2) == 8
    assert group.restarts == 1
    states = group.states()
    assert all(s["resumed"] for s in states) and len({s["checksum"] for s in states}) == 1
    # A job being stopped ends a phase after the current chunk: asked before each chunk, the first
    # "stop" leaves the group 2 steps on, not 6.
    answers = iter([False, True])
    assert group.train(6, chunk=2, should_stop=lambda: next(answers)) == 10
    group.stop()


def test_a_learner_checkpoints_by_time_between_chunks(ray_local, tmp_path):
    """learner.checkpoint_every_s: with no step interval, a learner killed after 3 steps comes back at step 3, not 0."""
    from learner.group import LearnerGroup

    with pytest.raises(ConfigError, match="learner.checkpoint_every_s: expected a number of seconds >= 0"):
        config(tmp_path, checkpoint_every_s=-1)
    group = LearnerGroup(config(tmp_path, checkpoint_every=0, checkpoint_every_s=1e-3), synthetic_source(2), world_size=1, cpus_per_worker=0.5)
    assert group.train(3, chunk=1) == 3
    os.kill(group.states()[0]["pid"], signal.SIGKILL)
    group.restart()
    assert group.step() == 3 and group.states()[0]["resumed"]
    group.stop()


def test_published_weights_reach_two_policy_servers(ray_local, tmp_path):
    from actors.policies import PolicySpec
    from actors.policy_server import PolicyServer, ServerConfig
    from cosmos_policy.checkpoint import save_checkpoint
    from cosmos_policy.codec import NormalizationStats
    from cosmos_policy.config import load_model_config
    from cosmos_policy.layout import load_layout
    from cosmos_policy.model import CosmosPolicyModel
    from cosmos_policy.policy import Observation, PolicyConfig
    from cosmos_policy.text import RandomTextEncoder, TextEmbeddingCache
    from learner.group import LearnerGroup, PublishConfig
    from learner.publish import RegistryWeights, WeightRegistry

    ray = ray_local
    rng = np.random.default_rng(0)
    model = CosmosPolicyModel.build(load_model_config("tiny"), load_layout("libero"), seed=0)
    text = TextEmbeddingCache()
    text.fill(RandomTextEncoder(32, 16), ["lift the cube"])
    stats = NormalizationStats.compute(rng.random((50, 7)), rng.random((50, 9)))
    ckpt = save_checkpoint(tmp_path / "policy", model, stats=stats, text=text)
    spec = PolicySpec(checkpoint=str(ckpt), policy=PolicyConfig(action_steps=1))
    weights = RegistryWeights(WeightRegistry.remote())  # handed to the learner (publisher) and the servers (source)
    servers = [PolicyServer.options(num_cpus=0.25).remote(spec, ServerConfig(poll_weights_s=0.2, lease_max_s=8.0), weights)
               for _ in range(2)]
    obs = Observation(images={c: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for c in ("primary", "wrist")},
                      proprio=rng.random(9), instruction="lift the cube")
    before = [ray.get(s.act.remote(obs, 0)) for s in servers]
    assert all(r.policy_version == 0 for r in before)
    group = LearnerGroup(config(tmp_path, init_checkpoint=str(ckpt)), synthetic_source(2), world_size=1, cpus_per_worker=0.5,
                         publish_cfg=PublishConfig(every=2), publisher=weights)
    group.train(2)
    import time

    deadline = time.time() + 30
    replies = before
    while time.time() < deadline:
        replies = [ray.get(s.act.remote(obs, 0)) for s in servers]
        if all(r.policy_version == 1 for r in replies):
            break
        time.sleep(0.3)
    assert all(r.policy_version == 1 for r in replies)
    for b, a in zip(before, replies):
        assert not np.allclose(a.actions, b.actions)
    # kill -9 a server: Ray restarts it from its checkpoint (version 0), it takes the newest published weights
    # before its first batch, and a client's call waits for it instead of failing the episode.
    import os
    import signal

    from actors.policies import ServerPolicy

    pid = ray.get(servers[0].__ray_call__.remote(lambda actor: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    reply = ServerPolicy(servers[0]).infer(obs, 0)
    assert reply.policy_version == 1 and np.allclose(reply.actions, replies[0].actions)
    assert ray.get(servers[0].__ray_call__.remote(lambda actor: os.getpid())) != pid
    # A server whose versions are held (an evaluation of them runs) keeps serving version 1 while the learner
    # publishes version 2, which the other server takes; released, it takes it too.
    assert ray.get(servers[1].hold_weights.remote(True)) == {"policy": 1, "planning": None}
    group.train(2)

    def served(server) -> int:
        return ray.get(server.act.remote(obs, 0)).policy_version

    deadline = time.time() + 30
    while served(servers[0]) != 2 and time.time() < deadline:
        time.sleep(0.3)
    time.sleep(1.0)  # five polls of the registry
    assert served(servers[0]) == 2 and served(servers[1]) == 1
    ray.get(servers[1].hold_weights.remote(False))
    deadline = time.time() + 30
    while served(servers[1]) != 2 and time.time() < deadline:
        time.sleep(0.3)
    assert served(servers[1]) == 2
    # A robot's episode leases a server: no newer weights until it ends (taken at once then), or until lease_max_s
    # (a robot that died mid-episode must not keep the server's other callers on old weights for ever).
    client = ServerPolicy(servers[1])
    assert client.lease("arm-1", True) == {"policy": 2, "planning": None}
    group.train(2)
    deadline = time.time() + 30
    while served(servers[0]) != 3 and time.time() < deadline:
        time.sleep(0.3)
    assert served(servers[0]) == 3 and served(servers[1]) == 2
    assert client.lease("arm-1", False) == {"policy": 3, "planning": None} and served(servers[1]) == 3
    leased_at = time.time()
    assert client.lease("arm-2", True) == {"policy": 3, "planning": None}  # never released
    group.train(2)
    while served(servers[1]) != 4 and time.time() < leased_at + 30:
        time.sleep(0.3)
    assert served(servers[1]) == 4 and time.time() - leased_at > 8.0
    # kill -9 of the registry: Ray restarts it, empty. The servers poll on through its absence and serve version 4
    # until the learner publishes the next one, which they take.
    registry_pid = ray.get(weights.registry.__ray_call__.remote(lambda actor: os.getpid()))
    os.kill(registry_pid, signal.SIGKILL)
    time.sleep(1.0)  # polls meeting the dead registry, then the restarted one with nothing published
    assert served(servers[0]) == 4 and served(servers[1]) == 4
    group.train(2)
    deadline = time.time() + 30
    while {served(s) for s in servers} != {5} and time.time() < deadline:
        time.sleep(0.3)
    assert {served(s) for s in servers} == {5}
    # kill -9 of the learner's rank just after it published (its group would restart it): the version's weights are
    # the registry's, not the dead rank's, and servers that had not fetched them yet still do.
    for s in servers:
        ray.get(s.hold_weights.remote(True))
    group.train(2)
    os.kill(group.states()[0]["pid"], signal.SIGKILL)
    time.sleep(1.0)  # the rank's process is gone before the servers read version 6
    for s in servers:
        ray.get(s.hold_weights.remote(False))
    deadline = time.time() + 30
    while {served(s) for s in servers} != {6} and time.time() < deadline:
        time.sleep(0.3)
    assert {served(s) for s in servers} == {6}
    group.stop()
    for s in servers:
        ray.kill(s)
