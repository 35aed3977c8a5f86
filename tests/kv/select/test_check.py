"""The GPU check of the select axis runs on CPU too (both sides on CPU): every method's selection is
reproducible from the same inputs and its output matches the torch twin."""

from __future__ import annotations

from longctx.kv.select import check


def test_select_check_passes_on_cpu() -> None:
    results = check.run_all("cpu")
    assert results and all(ok for _, ok, _ in results), results
