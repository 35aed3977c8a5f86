"""When to run a Triton kernel instead of its torch twin: CUDA tensors, Triton importable, not disabled."""

from __future__ import annotations

import functools
import os

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


def use_triton(x: Tensor) -> bool:
    """Whether the op on ``x`` should launch its Triton kernel."""
    return x.is_cuda and not kernels_forced_off() and has_triton()
