"""Fixtures of the head-analysis tests: one tiny random Llama loaded once, the user cache in a temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from longctx.engine.llm import LLM


@pytest.fixture(autouse=True)
def _user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def llm(tiny_checkpoint, torch_one_thread) -> LLM:  # noqa: ANN001
    folder, _ = tiny_checkpoint("llama")
    return LLM(folder)
