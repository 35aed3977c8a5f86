"""Host-to-device copies that never stall the GPU.

A plain ``tensor.to("cuda")`` from pageable host memory synchronises with the device stream, so every small
table the engine uploads between kernels would drain the GPU and leave it idle while Python prepares the next
launch. :func:`to_device` stages through pinned memory (PyTorch's caching host allocator makes that cheap) and
copies asynchronously; the allocator keeps the staging buffer alive until the copy has run.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device | str, idle: bool = False) -> Tensor:
    """``t`` (a CPU tensor) on ``device``, without a host synchronisation on CUDA.

    ``idle``: the caller knows the device has no queued work (a decode step between the sampler's
    synchronisation and the next launch); a plain copy is then cheaper than staging (~0.1 ms per pin)."""
    device = torch.device(device)
    if device.type != "cuda" or idle:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def tensor_on(data: object, dtype: torch.dtype, device: torch.device | str, idle: bool = False) -> Tensor:
    """``torch.tensor(data, dtype=dtype)`` on ``device`` (asynchronously on CUDA; see :func:`to_device`)."""
    return to_device(torch.tensor(data, dtype=dtype), device, idle)
