"""DeepSpeed ZeRO stage 3 on CPUs (gloo): one rank in-process and two ranks in a Ray worker group.

ZeRO-3 partitions the parameters themselves, so these check what stages 1-2 never exercise:
the loss goes down, the weights gathered for export and publication are whole and equal on
every rank, a checkpoint resumes, and a compiled network is refused with a clear error.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from cosmos_policy.errors import ConfigError
from learner.data import SyntheticBatches, synthetic_source
from learner.engine import Learner, LearnerConfig
from learner.schedule import ScheduleConfig

FLAT = ScheduleConfig(warmup_steps=0, cycle_steps=1000, end_of_cycle=1.0)


def config(tmp_path, **kw) -> LearnerConfig:
    base = dict(micro_batch=2, lr=2e-3, schedule=FLAT, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=0, seed=0, zero_stage=3)
    base.update(kw)
    return LearnerConfig(**base)


def fixed_loss(learner: Learner, batch, seed: int = 0) -> float:
    model = learner.model
    model.denoiser.eval()
    with torch.no_grad():  # ZeRO-3's hooks gather the partitioned parameters for this forward
        loss = model.training_loss(batch.model, torch.Generator().manual_seed(seed)).loss
    model.denoiser.train()
    return float(loss)


def test_zero3_on_one_cpu_rank_lowers_the_loss_exports_and_resumes(tmp_path):
    from cosmos_policy.checkpoint import load_checkpoint
    from cosmos_policy.config import load_model_config
    from cosmos_policy.layout import load_layout
    from cosmos_policy.model import CosmosPolicyModel

    os.environ.update(MASTER_PORT="29651")
    learner = Learner(config(tmp_path), synthetic_source(2, fixed=True))
    assert type(learner.optimizer).__name__ == "DeepSpeedZeroOptimizer_Stage3"
    reference = CosmosPolicyModel.build(load_model_config("tiny"), load_layout("libero"))
    fixed = SyntheticBatches(reference, 2, fixed=True).batch(0)
    before = fixed_loss(learner, fixed)
    for _ in range(8):
        metrics = learner.train_step()
        assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    after = fixed_loss(learner, fixed)
    assert after < before * 0.8, (before, after)

    state = learner.full_state()  # gathered: whole tensors, not the empty local partitions
    shapes = {k: tuple(v.shape) for k, v in reference.denoiser.net.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    exported = load_checkpoint(learner.export(tmp_path / "export"))
    for k, v in exported.model.denoiser.net.state_dict().items():
        assert torch.equal(v, state[k]), k
    packed = learner.packed_weights()
    assert set(packed) == set(shapes)

    learner.save()
    resumed = Learner(config(tmp_path), synthetic_source(2, fixed=True))
    assert resumed.resume() and resumed.step == 8
    assert fixed_loss(resumed, fixed) == pytest.approx(after, rel=1e-5)
    resumed.train_step()
    assert resumed.step == 9


def test_zero3_refuses_compiled_blocks_naming_the_field():
    with pytest.raises(ConfigError, match="learner.compile"):
        LearnerConfig(zero_stage=3, compile=True)


def test_zero3_two_ranks_in_a_worker_group_agree(ray_local, tmp_path):
    from learner.group import LearnerGroup

    ray = ray_local
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    group = LearnerGroup(config(tmp_path), synthetic_source(2, fixed=True), world_size=2, cpus_per_worker=0.5)
    first = group.train(4, chunk=2)
    states = group.states()  # every rank gathers the full weights: one checksum
    assert first == 4 and len({s["checksum"] for s in states}) == 1 and all(s["step"] == 4 for s in states)
    group.stop()
