"""Synthetic head-score files: a chosen fraction of a model's kv-heads marked retrieval at random, nothing measured.

They make the head budgets (duo, razor, headkv) measurable where no real scores exist: random-weight bench models
(``longctx bench --synthetic-heads F``) and the tiny test checkpoints (``scripts/gpu_check.py``). Speed and
memory do not depend on *which* heads are retrieval heads, only on how many.

A file is an ordinary :class:`~longctx.heads.store.HeadScores` bound to the model's content hash
(:func:`longctx.heads.binding.model_sha256`), so it loads through ``heads=FILE`` and passes the same model check
as a measured one. What says it is synthetic: ``settings`` = ``{"synthetic": true, "fraction", "seed",
"retrieval_rows", "model_hash"}`` (shown by ``longctx heads show``) and the ``synthetic_retrieval`` grid in
``extra`` (1 = retrieval). Exactly ``round(fraction * layers * kv_heads)`` rows, drawn by ``random.Random(seed)``
(the same on every machine), score in [0.75, 1); every other row scores in [0, 0.25). So

- ``duo`` (threshold 0.5, its default) and ``razor(threshold=0.5)`` keep exactly the chosen rows full;
- ``duo(retrieval=f)`` with f <= fraction keeps a subset of them;
- ``headkv`` splits budgets in proportion to the scores (streaming rows get little more than the floor).
"""

from __future__ import annotations

import random
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from longctx.heads import binding
from longctx.heads.store import HeadScores, save_scores

SYNTHETIC = "synthetic"  # the heads=... value the bench replaces with a synthetic file (--synthetic-heads)


def synthetic_scores(num_layers: int, num_kv_heads: int, num_heads: int, fraction: float, seed: int,
                     model_sha256: str, model_name: str, method: str = "duo", model_hash: str = "") -> HeadScores:
    """Scores with ``round(fraction * num_layers * num_kv_heads)`` retrieval rows chosen by ``seed``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rows = num_layers * num_kv_heads
    k = round(fraction * rows)
    rng = random.Random(seed)
    chosen = set(rng.sample(range(rows), k))
    mask = [[1.0 if layer * num_kv_heads + h in chosen else 0.0 for h in range(num_kv_heads)]
            for layer in range(num_layers)]
    scores = [[0.75 + 0.25 * rng.random() if m else 0.25 * rng.random() for m in row] for row in mask]
    settings: dict[str, Any] = {"synthetic": True, "fraction": fraction, "seed": seed, "retrieval_rows": k}
    if model_hash:
        settings["model_hash"] = model_hash
    return HeadScores(method=method, model_sha256=model_sha256, model_name=model_name, num_layers=num_layers,
                      num_kv_heads=num_kv_heads, num_heads=num_heads, settings=settings, scores=scores,
                      extra={"synthetic_retrieval": mask})


def write_for_llm(llm: Any, path: str | Path, fraction: float, seed: int = 0, method: str = "duo") -> Path:
    """Write a synthetic file for a loaded :class:`~longctx.engine.llm.LLM` (a checkpoint or weights built in
    memory, e.g. the bench's random model) to ``path``; returns the path."""
    cfg = llm.config
    scores = synthetic_scores(cfg.num_layers, cfg.num_kv_heads, cfg.num_heads, fraction, seed,
                              binding.model_sha256(llm), binding.model_name(llm), method, binding.hash_kind(llm))
    return save_scores(scores, path)


def write_for_checkpoint(model: str | Path, path: str | Path, fraction: float, seed: int = 0,
                         method: str = "duo") -> Path:
    """Write a synthetic file for a checkpoint folder or ``.gguf`` file without loading its weights."""
    from longctx.model.loader import read_config  # noqa: PLC0415

    cfg, source = read_config(model)
    scores = synthetic_scores(cfg.num_layers, cfg.num_kv_heads, cfg.num_heads, fraction, seed,
                              binding.checkpoint_sha256(source), source.name, method, "checkpoint")
    return save_scores(scores, path)


def write_for_random_model(model: Any, name: str, path: str | Path, fraction: float, seed: int = 0,
                           method: str = "duo") -> Path:
    """Write a synthetic file for a model drawn by ``longctx.bench.sweep.random_model`` (bound to its recipe hash,
    which an ``LLM`` over the same draw reproduces)."""
    cfg = model.config
    scores = synthetic_scores(cfg.num_layers, cfg.num_kv_heads, cfg.num_heads, fraction, seed,
                              binding.recipe_sha256(model), name, method, "random-recipe")
    return save_scores(scores, path)


def uses_synthetic(spec: Any) -> bool:
    """Whether a KV spec (text or ``KVSpec``) has ``heads=synthetic`` in its budget."""
    from longctx.kv.spec import KVSpec  # noqa: PLC0415

    return dict(KVSpec.parse(spec).budget.params).get("heads") == SYNTHETIC


def with_heads_file(spec: Any, path: str | Path) -> str:
    """The canonical text of ``spec`` with ``heads=synthetic`` replaced by ``heads=PATH`` (others unchanged)."""
    from longctx.errors import SpecError  # noqa: PLC0415
    from longctx.kv.spec import KVSpec, Method  # noqa: PLC0415

    parsed = KVSpec.parse(spec)
    if not uses_synthetic(parsed):
        return str(parsed) if not isinstance(spec, str) else spec
    if re.search(r"[\s,()]", str(path)):
        raise SpecError(f"synthetic heads file {path}: a path inside a KV spec cannot hold spaces, commas or "
                        f"parentheses; use another --out folder")
    params = tuple((k, str(path) if k == "heads" else v) for k, v in parsed.budget.params)
    return str(replace(parsed, budget=Method(parsed.budget.name, params)))
