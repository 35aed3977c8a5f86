"""Perplexity task: token-by-token with the KV method active equals one pass for ``full``; stays finite past a
StreamingLLM budget; windows are deterministic."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from longctx.engine.llm import LLM
from longctx.errors import LongctxError
from longctx.eval.haystack import load_haystack
from longctx.eval.ppl import PerplexityTask, bucket_edges

pytestmark = pytest.mark.usefixtures("torch_one_thread")

HAYSTACK = load_haystack(None)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Callable[[str], tuple[Path, Any]]) -> LLM:
    return LLM(tiny_checkpoint("llama")[0])


def test_bucket_edges_cover_the_window() -> None:
    assert bucket_edges(100, 8) == [0, 12, 25, 38, 50, 62, 75, 88, 100]
    assert bucket_edges(3, 8) == [0, 1, 2, 3]


def test_windows_are_deterministic_and_exact_length(llm: LLM) -> None:
    task = PerplexityTask()
    a = task.windows(llm.tokenizer, 120, 3, seed=7, haystack=HAYSTACK)
    b = task.windows(llm.tokenizer, 120, 3, seed=7, haystack=HAYSTACK)
    c = task.windows(llm.tokenizer, 120, 3, seed=8, haystack=HAYSTACK)
    assert a == b and a != c
    assert all(len(w.ids) == 120 for w in a) and len({w.sample_id for w in a}) == 3
    with pytest.raises(LongctxError, match="too few"):
        task.windows(llm.tokenizer, 500, 1, seed=0, haystack="Short text. Very short.")


def test_full_token_by_token_ppl_equals_one_pass(llm: LLM) -> None:
    task = PerplexityTask(num_buckets=8)
    windows = task.windows(llm.tokenizer, 150, 2, seed=1, haystack=HAYSTACK)
    for res in task.evaluate(llm, windows, "full"):
        one = res["one_pass"]
        assert res["count"] == one["count"] == 149
        assert math.isclose(res["ppl"], one["ppl"], rel_tol=1e-4)
        assert math.isclose(res["nll"], one["nll"], rel_tol=1e-4)
        assert sum(b["count"] for b in res["buckets"]) == 149 and len(res["buckets"]) == 8
        pooled = sum(b["nll_sum"] for b in res["buckets"]) / 149
        assert math.isclose(pooled, res["nll"], rel_tol=1e-9)


def test_streamingllm_ppl_stays_finite_past_budget(llm: LLM) -> None:
    task = PerplexityTask(num_buckets=8)
    windows = task.windows(llm.tokenizer, 200, 2, seed=2, haystack=HAYSTACK)
    full = task.evaluate(llm, windows, "full")
    stream = task.evaluate(llm, windows, "streamingllm:32")
    for f, s in zip(full, stream, strict=True):
        assert s["finite"] and math.isfinite(s["ppl"]) and "one_pass" not in s
        late = [b for b in s["buckets"] if b["start"] >= 64]
        assert late and all(math.isfinite(b["ppl"]) for b in late)
        # Before the budget is exceeded nothing is evicted: the first bucket matches full.
        assert math.isclose(s["buckets"][0]["nll"], f["buckets"][0]["nll"], rel_tol=1e-4)
        assert s["ppl"] != f["ppl"]  # and past it, eviction really happened
