"""Host-to-accelerator copies that do not stall the accelerator's queue.

A plain ``cpu_tensor.to("cuda")`` copies from pageable memory and then waits for the stream:
every such copy in a training step lets the GPU run dry while the host prepares the next
kernels (measured on the 2b learner: about 15 % of each step idle). Copying through pinned
memory with ``non_blocking`` queues the copy behind the work already launched instead; PyTorch's
pinned-memory allocator keeps the staging buffer alive until the copy has run.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``: asynchronously through pinned memory for CPU -> CUDA, else ``t.to(device)``."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def tensor_to_device(data: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A tensor built from Python values on the host, then moved with ``to_device``."""
    return to_device(torch.tensor(data, dtype=dtype), device)
