"""When to run a Triton kernel instead of its torch twin: CUDA tensors, Triton importable, not disabled, and
neither autograd nor autocast in play (the kernels have no backward and take one dtype; DuoAttention's
calibration differentiates through the model under bf16 autocast: it runs the torch twins)."""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor


@functools.cache
def has_triton() -> bool:
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def kernels_forced_off() -> bool:
    """``LONGCTX_KERNELS=torch`` runs every op's torch twin, also on CUDA."""
    return os.environ.get("LONGCTX_KERNELS", "").lower() == "torch"


def use_triton(x: Tensor, *more: Tensor) -> bool:
    """Whether the op on ``x`` (and its other tensor inputs ``more``) should launch its Triton kernel."""
    if not x.is_cuda or kernels_forced_off() or not has_triton():
        return False
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *more))
    return not tracked and not torch.is_autocast_enabled("cuda")
