"""Which loaded model a :class:`~longctx.model.config.ModelConfig` belongs to, and that model's content hash.

A KV spec's budget only sees the model config (``SequenceKV`` is built from the pool, the config and the spec).
``LLM`` binds its config to itself here when it loads, so a budget that reads head scores can check that a
score file was made for this very model (its content hash) and can run the probe for ``heads=auto``. The
binding holds the config strongly (so its ``id`` is never reused) and the ``LLM`` weakly.

A model's content hash (:func:`model_sha256`) is, by what the model came from:

- a checkpoint (folder or ``.gguf``): the sha256 of its files (:func:`checkpoint_sha256`);
- random weights from ``longctx.bench.sweep.random_model`` (the bench's shapes): the sha256 of the recipe that
  drew them plus a strided sample of every tensor (:func:`recipe_sha256`). Hashing all the bytes of an 8B-shape
  model means copying 16 GB off the GPU and hashing it on the host (minutes); the recipe (shape, dtype, seed,
  device type, torch version) fixes the weights, and the sample (a few thousand elements per tensor) ties the
  hash to the numbers the recipe really produced, so another RNG (a CPU vs a GPU draw, another torch) gives
  another hash. It is not a hash of every byte: only models built by ``random_model`` (which tags them with
  ``random_recipe``) get it, never checkpoints;
- any other model built in memory: the sha256 of all its parameters' and buffers' bytes (:func:`weights_sha256`).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path
from typing import Any

import torch

from longctx.model.config import ModelConfig

_BOUND: dict[int, tuple[ModelConfig, weakref.ref]] = {}
_SHA: dict[int, str] = {}  # id(llm) -> content hash, dropped with the llm
RECIPE_ATTR = "random_recipe"  # set by longctx.bench.sweep.random_model on the models it draws
SAMPLE = 2048  # elements of each tensor hashed for a random model: a strided sample ...
TAIL = 64  # ... plus its last elements


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
    """Content hash of ``llm``'s model (see the module docstring): of its checkpoint files (cached by size + mtime in
    the user cache), of its random-weights recipe, or of its parameters' bytes; computed once per ``LLM``."""
    key = id(llm)
    if key in _SHA:
        return _SHA[key]
    kind = hash_kind(llm)
    if kind == "checkpoint":
        digest = checkpoint_sha256(llm.source)
    elif kind == "random-recipe":
        digest = recipe_sha256(llm.model)
    else:
        digest = weights_sha256(llm.model)
    _SHA[key] = digest
    return digest


def hash_kind(llm: Any) -> str:
    """What :func:`model_sha256` of ``llm`` hashes: ``checkpoint``, ``random-recipe`` or ``weights``."""
    source = getattr(llm, "source", None)
    if source is not None and Path(source).exists():
        return "checkpoint"
    return "random-recipe" if getattr(llm.model, RECIPE_ATTR, None) is not None else "weights"


def checkpoint_sha256(source: str | Path) -> str:
    """sha256 of a checkpoint folder's model files or of a ``.gguf`` file (without loading it)."""
    from longctx.eval.provenance import HASH_CACHE_NAME, model_fingerprint  # noqa: PLC0415
    from longctx.model.default_model import cache_dir  # noqa: PLC0415

    return model_fingerprint(source, cache_dir() / HASH_CACHE_NAME)["sha256"]


def weights_sha256(model: Any) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a module's parameters and buffers."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(_bytes(t.detach().reshape(-1)))
    return h.hexdigest()


def recipe_sha256(model: Any) -> str:
    """sha256 of a random model's recipe (``model.random_recipe``) and of a strided sample of each tensor: about
    ``SAMPLE + TAIL`` elements per tensor, read in place (the same before and after ``fuse_projections``)."""
    recipe = getattr(model, RECIPE_ATTR)
    h = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLE)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(_bytes(flat[::step][:SAMPLE]))
        h.update(_bytes(flat[-TAIL:]))
    return h.hexdigest()


def _bytes(t: torch.Tensor) -> bytes:
    return t.cpu().contiguous().view(dtype=torch.uint8).numpy().tobytes()


def scores_cache_path(llm: Any, method: str, key: str) -> Path:
    """Where the scores of ``llm`` under (``method``, settings ``key``) are cached: ``<cache>/heads/``, beside the
    cached models."""
    from longctx.model.default_model import cache_dir  # noqa: PLC0415

    sha = model_sha256(llm)
    return cache_dir() / "heads" / f"{model_name(llm)}-{sha[:12]}-{method}-{key}.json"
