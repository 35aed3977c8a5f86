"""``heads=FILE|auto`` of a head-score budget -> validated :class:`~longctx.heads.store.HeadScores` for a model.

A file is checked against the model its config is bound to (``longctx.heads.binding``): same content hash and
shape, else a one-line :class:`~longctx.heads.store.HeadScoresError`. Without a bound model (a bare
``SequenceKV`` in tests) only the shape can be checked. ``auto`` loads the cached scores of the bound model
under the given method and settings (``<cache>/heads/``), or runs the probe once and caches them — unless the
``LLM`` has ``allow_head_scoring = False`` (the server sets it: scoring inside a request would stall every other
request for minutes), which refuses ``auto`` without cached scores with a one-line error. Parsed files
are memoised by (path, size, mtime), so building a request's budgets does not re-read JSON.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from longctx.heads import binding
from longctx.heads.store import HeadScores, HeadScoresError, check_model, load_scores, save_scores, settings_key
from longctx.model.config import ModelConfig

_MEMO: dict[tuple[str, int, int], HeadScores] = {}


def _load_memo(path: Path) -> HeadScores:
    try:
        st = path.stat()
    except OSError:
        return load_scores(path)  # raises the clear message
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _MEMO:
        _MEMO[key] = load_scores(path)
    return _MEMO[key]


def resolve_scores(heads: str, cfg: ModelConfig, method: str, settings: Any) -> HeadScores:
    """Scores for the model of ``cfg``: from the file ``heads`` or, for ``auto``, by ``method`` with ``settings``
    (a ``RetrievalSettings`` / ``DuoSettings``), cached in the user cache."""
    llm = binding.bound_llm(cfg)
    shape = (cfg.num_layers, cfg.num_kv_heads)
    if heads != "auto":
        path = Path(heads).expanduser()
        scores = _load_memo(path)
        check_model(scores, path, binding.model_sha256(llm) if llm is not None else None, shape)
        return scores
    if llm is None:
        raise HeadScoresError("heads=auto needs a model loaded with longctx.LLM; pass heads=FILE (see "
                              "`longctx heads score`)")
    return cached_or_scored(llm, method, settings)


def cached_or_scored(llm: Any, method: str, settings: Any, progress: bool = True) -> HeadScores:
    """The cached scores of ``llm`` under (method, settings), computing and caching them when missing."""
    sha = binding.model_sha256(llm)
    path = binding.scores_cache_path(llm, method, settings_key(method, asdict(settings)))
    if path.exists():
        scores = _load_memo(path)
        check_model(scores, path, sha, (llm.config.num_layers, llm.config.num_kv_heads))
        return scores
    if not getattr(llm, "allow_head_scoring", True):
        raise HeadScoresError(f"heads=auto: no cached {method} scores for {binding.model_name(llm)} and this engine "
                              f"does not score heads while serving (minutes of work); run `longctx heads score "
                              f"--method {method} --model MODEL` first, or pass heads=FILE")
    if progress:
        print(f"longctx: scoring attention heads ({method}) of {binding.model_name(llm)}; cached in {path}",
              file=sys.stderr)
    scores = run_scoring(llm, method, settings, sha)
    save_scores(scores, path)
    return scores


def run_scoring(llm: Any, method: str, settings: Any, sha: str | None = None, bar: Any = None) -> HeadScores:
    """Run ``method`` ("retrieval" or "duo") on ``llm``'s model; ``bar``: an optional tqdm bar to advance."""
    from longctx.heads.duo import score_duo  # noqa: PLC0415
    from longctx.heads.retrieval import score_retrieval  # noqa: PLC0415

    sha = sha or binding.model_sha256(llm)
    name = binding.model_name(llm)
    if method == "retrieval":
        return score_retrieval(llm.model, llm.tokenizer, settings, sha, name,
                               progress=(lambda n: bar.update(n)) if bar is not None else None)
    if method == "duo":
        def step(n: int, loss: float) -> None:
            if bar is not None:
                bar.update(n)
                bar.set_postfix(loss=f"{loss:.4f}")

        return score_duo(llm.model, llm.tokenizer, settings, sha, name, progress=step)
    raise HeadScoresError(f"unknown head-scoring method {method!r}; choose retrieval or duo")
