"""longctx: a long-context inference engine with composable KV-cache methods.

The vLLM-shaped entry points are importable from the package root::

    from longctx import LLM, SamplingParams, KVSpec

They are loaded lazily, so ``import longctx`` stays cheap (no torch import until one is used).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "longctx.engine.llm",
    "SamplingParams": "longctx.engine.sampling",
    "RequestOutput": "longctx.engine.request",
    "CompletionOutput": "longctx.engine.request",
    "KVSpec": "longctx.kv.spec",
    "LongctxError": "longctx.errors",
}

__all__ = ["CompletionOutput", "KVSpec", "LLM", "LongctxError", "RequestOutput", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from longctx.engine.llm import LLM
    from longctx.engine.request import CompletionOutput, RequestOutput
    from longctx.engine.sampling import SamplingParams
    from longctx.errors import LongctxError
    from longctx.kv.spec import KVSpec


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'longctx' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
