"""Host-to-device copies that never stall the GPU.

A plain ``tensor.to("cuda")`` from pageable host memory synchronises with the device stream, so every small
table the engine uploads between kernels would drain the GPU and leave it idle while Python prepares the next
launch. :func:`to_device` stages through pinned memory (PyTorch's caching host allocator makes that cheap) and
copies asynchronously; the allocator keeps the staging buffer alive until the copy has run.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """``t`` (a CPU tensor) on ``device``, without a host synchronisation on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def tensor_on(data: object, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``torch.tensor(data, dtype=dtype)`` on ``device`` (asynchronously on CUDA)."""
    return to_device(torch.tensor(data, dtype=dtype), device)
