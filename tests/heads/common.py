"""Helpers shared by the head-analysis tests (tests/heads, tests/kv/test_budget_heads.py)."""

from __future__ import annotations

from pathlib import Path

from longctx.engine.llm import LLM
from longctx.heads import binding
from longctx.heads.store import HeadScores, save_scores


def write_scores(llm: LLM, path: Path, grid: list[list[float]], method: str = "duo", sha: str | None = None,
                 extra: dict | None = None) -> Path:
    cfg = llm.config
    scores = HeadScores(method=method, model_sha256=sha or binding.model_sha256(llm), model_name="tiny",
                        num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, num_heads=cfg.num_heads,
                        settings={"probe": "test"}, scores=grid, extra=extra or {})
    return save_scores(scores, path)


def uniform_grid(llm: LLM, value: float) -> list[list[float]]:
    return [[value] * llm.config.num_kv_heads for _ in range(llm.config.num_layers)]
