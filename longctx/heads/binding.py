"""Which loaded model a :class:`~longctx.model.config.ModelConfig` belongs to, and that model's content hash.

A KV spec's budget only sees the model config (``SequenceKV`` is built from the pool, the config and the spec).
``LLM`` binds its config to itself here when it loads, so a budget that reads head scores can check that a
score file was made for this very model (its content hash) and can run the probe for ``heads=auto``. The
binding holds the config strongly (so its ``id`` is never reused) and the ``LLM`` weakly.
"""

from __future__ import annotations

import hashlib
import weakref
from pathlib import Path
from typing import Any

import torch

from longctx.model.config import ModelConfig

_BOUND: dict[int, tuple[ModelConfig, weakref.ref]] = {}
_SHA: dict[int, str] = {}  # id(llm) -> content hash, dropped with the llm


def bind_model(llm: Any) -> None:
    """Record that ``llm.config`` is the config of ``llm`` (an :class:`~longctx.engine.llm.LLM`)."""
    cfg = llm.config
    key = id(cfg)
    _BOUND[key] = (cfg, weakref.ref(llm, lambda _ref, key=key: _BOUND.pop(key, None)))
    weakref.finalize(llm, _SHA.pop, id(llm), None)


def bound_llm(cfg: ModelConfig) -> Any | None:
    """The live ``LLM`` whose config is ``cfg``, or None."""
    entry = _BOUND.get(id(cfg))
    if entry is None or entry[0] is not cfg:
        return None
    return entry[1]()


def model_name(llm: Any) -> str:
    source = getattr(llm, "source", None)
    return Path(source).name if source else "model"


def model_sha256(llm: Any) -> str:
    """Content hash of ``llm``'s model: the sha256 of its checkpoint files (cached by size + mtime in the user
    cache), or, for a model built in memory (no files), of its parameters' bytes."""
    key = id(llm)
    if key in _SHA:
        return _SHA[key]
    from longctx.eval.provenance import HASH_CACHE_NAME, model_fingerprint  # noqa: PLC0415
    from longctx.model.default_model import cache_dir  # noqa: PLC0415

    source = getattr(llm, "source", None)
    if source is not None and Path(source).exists():
        digest = model_fingerprint(source, cache_dir() / HASH_CACHE_NAME)["sha256"]
    else:
        digest = weights_sha256(llm.model)
    _SHA[key] = digest
    return digest


def weights_sha256(model: Any) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a module's parameters and buffers."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def scores_cache_path(llm: Any, method: str, key: str) -> Path:
    """Where the scores of ``llm`` under (``method``, settings ``key``) are cached: ``<cache>/heads/``, beside the
    cached models."""
    from longctx.model.default_model import cache_dir  # noqa: PLC0415

    sha = model_sha256(llm)
    return cache_dir() / "heads" / f"{model_name(llm)}-{sha[:12]}-{method}-{key}.json"
