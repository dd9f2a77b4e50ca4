"""Weight broadcast over NCCL: the learner's GPU sends the denoiser straight into policy servers' GPUs.

The object-store path (``learner.publish``) copies the weights GPU -> host -> shared memory ->
host -> GPU and suits actors anywhere in a cluster. Where the learner and the policy servers
share a host (or an NVLink / InfiniBand fabric), one NCCL broadcast moves them GPU to GPU: the
sender packs its tensors into fixed-size bf16 buckets (so no second full copy of the model is
ever allocated), broadcasts bucket by bucket, and every receiver copies each bucket straight
into its network's parameters. All members of the process group call ``broadcast`` together;
the group is any ``torch.distributed`` group whose rank ``src`` is the learner (torchrun, or a
Ray collective group). A shape or name mismatch is found before any bytes move: every member
checks the same layout digest first, and all of them stop if any differs.
"""

from __future__ import annotations

import hashlib
import time

import torch
import torch.distributed as dist

from cosmos_policy.errors import CheckpointError


def layout_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Names, shapes and element counts in order: what sender and receivers must agree on."""
    h = hashlib.sha256()
    for name, t in tensors.items():
        h.update(f"{name}|{tuple(t.shape)}|".encode())
    return h.hexdigest()


class NcclBroadcaster:
    """Broadcast a module's parameters and buffers from ``src`` to every rank of ``group``.

    Args:
        module: the network whose ``state_dict`` tensors travel (the sender's are read, the
            receivers' are overwritten in place; same architecture on every rank).
        src: the sending rank (the learner).
        bucket_mb: size of one bf16 bucket; memory for one bucket is allocated once per rank.
        dtype: the wire dtype (bf16: what policy servers run in).
    """

    def __init__(self, module: torch.nn.Module, src: int = 0, group: dist.ProcessGroup | None = None, bucket_mb: int = 512,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        self.tensors = {k: v for k, v in module.state_dict(keep_vars=True).items() if v.is_floating_point()}
        self.src, self.group, self.dtype = src, group, dtype
        # NCCL needs the module on a GPU; the same code runs over gloo on CPUs (the tests).
        self.device = next(iter(self.tensors.values())).device
        self.bucket_elems = max(1, bucket_mb * 2**20 // (torch.finfo(dtype).bits // 8))
        self.buckets = self._plan()
        self.buffer = torch.empty(max(sum(t.numel() for _, t in b) for b in self.buckets), dtype=dtype, device=self.device)
        self.digest = layout_digest(self.tensors)
        self.checked = False

    def _plan(self) -> list[list[tuple[str, torch.Tensor]]]:
        """Consecutive tensors grouped into buckets of at most ``bucket_elems`` (a bigger tensor goes alone)."""
        buckets: list[list[tuple[str, torch.Tensor]]] = [[]]
        size = 0
        for name, t in self.tensors.items():
            if buckets[-1] and size + t.numel() > self.bucket_elems:
                buckets.append([])
                size = 0
            buckets[-1].append((name, t))
            size += t.numel()
        return buckets

    def _check_layout(self) -> None:
        mine = torch.tensor(list(bytes.fromhex(self.digest)), dtype=torch.uint8, device=self.device)
        theirs = mine.clone()
        dist.broadcast(theirs, src=self.src, group=self.group)
        same = torch.equal(mine, theirs)
        agree = torch.tensor([1 if same else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(agree, op=dist.ReduceOp.MIN, group=self.group)  # every rank, the sender too, learns of a mismatch
        if not same:
            raise CheckpointError("nccl broadcast: this rank's network differs from the sender's (names or shapes); not loading")
        if not int(agree):
            raise CheckpointError("nccl broadcast: a receiver's network differs from the sender's (names or shapes); nothing sent")
        self.checked = True

    @torch.no_grad()
    def broadcast(self) -> float:
        """Send (rank ``src``) or receive-and-load (every other rank) the weights; returns seconds on this rank."""
        start = time.perf_counter()
        if not self.checked:
            self._check_layout()
        sender = dist.get_rank() == self.src if self.group is None else dist.get_rank(self.group) == self.src
        for bucket in self.buckets:
            n = sum(t.numel() for _, t in bucket)
            flat = self.buffer[:n]
            if sender:
                offset = 0
                for _, t in bucket:
                    flat[offset : offset + t.numel()].copy_(t.detach().reshape(-1))
                    offset += t.numel()
            dist.broadcast(flat, src=self.src, group=self.group)
            if not sender:
                offset = 0
                for _, t in bucket:
                    t.data.copy_(flat[offset : offset + t.numel()].view(t.shape))
                    offset += t.numel()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start
