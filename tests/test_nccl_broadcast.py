"""The bucketed weight broadcast (``learner.nccl_broadcast``), over gloo on CPUs: 1 sender, 2 receivers."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _net(seed: int, width: int = 24) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(width, 40), torch.nn.LayerNorm(40), torch.nn.Linear(40, 7)).to(torch.bfloat16)


def _worker(rank: int, world: int, port: int, results: dict) -> None:
    from cosmos_policy.errors import CheckpointError
    from learner.nccl_broadcast import NcclBroadcaster

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net = _net(seed=rank)  # every rank starts from other weights
    caster = NcclBroadcaster(net, src=0, bucket_mb=0)  # bucket_mb 0: one tensor per bucket, many broadcasts
    assert len(caster.buckets) == len(caster.tensors)
    caster.broadcast()
    results[rank] = {k: v.float().clone() for k, v in net.state_dict().items()}
    # A receiver whose network has other shapes refuses before any weights move.
    other = NcclBroadcaster(_net(seed=rank, width=24 if rank == 0 else 25), src=0)
    try:
        other.broadcast()
        results[f"refused{rank}"] = False
    except CheckpointError as exc:  # receivers name themselves; the sender names a receiver
        results[f"refused{rank}"] = "differs from the sender's" in str(exc)
    dist.destroy_process_group()


def test_every_receiver_loads_the_sender_weights_and_a_mismatch_is_refused():
    world = 3
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), results), nprocs=world, join=True)
        results = dict(results)
    sender = results[0]
    assert sender["0.weight"].abs().sum() > 0
    for rank in (1, 2):
        for name, value in sender.items():
            assert torch.equal(results[rank][name], value), (rank, name)
    assert all(results[f"refused{rank}"] for rank in range(world))
    assert torch.equal(sender["0.weight"], _net(seed=0).state_dict()["0.weight"].float())  # the sender's own weights are untouched
