"""duo / razor / headkv budgets: per-(layer, kv-head) budgets from a head-score file, real rows of those lengths.

Every head retrieval: each equals the full cache exactly. Every head streaming: duo equals streamingllm with the
same sinks and window. Razor's compensation slot holds the mean of everything a row dropped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams
from longctx.errors import SpecError
from longctx.kv.pool import BlockPool
from longctx.kv.sequence import SequenceKV
from longctx.kv.spec import KVSpec
from tests.heads.common import uniform_grid, write_scores

SINKS, WINDOW = 3, 8


def _prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPT = _prompt(50)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(autouse=True)
def _user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def llm(tiny_checkpoint, torch_one_thread) -> LLM:  # noqa: ANN001
    folder, _ = tiny_checkpoint("llama")
    return LLM(folder)


@pytest.fixture(scope="module")
def files(llm: LLM, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("heads")
    mixed = [[1.0, 0.0] for _ in range(llm.config.num_layers)]
    return {"all": write_scores(llm, d / "all.json", uniform_grid(llm, 1.0)),
            "none": write_scores(llm, d / "none.json", uniform_grid(llm, 0.0)),
            "mixed": write_scores(llm, d / "mixed.json", mixed),
            "skew": write_scores(llm, d / "skew.json", [[1.0, 3.0] for _ in range(llm.config.num_layers)],
                                 method="retrieval")}


def _all_retrieval_specs(path: Path) -> list[str]:
    out = []
    for prefill in ("dense", "chunked(size=16)"):
        for positions in ("native", "rerotate"):
            tail = f" prefill={prefill} positions={positions}"
            out += [f"budget=duo(heads={path},sinks={SINKS},window={WINDOW})" + tail,
                    f"budget=razor(heads={path},sinks={SINKS},window={WINDOW},threshold=0.5)" + tail,
                    f"retain=snapkv budget=headkv(heads={path},tokens=10000)" + tail,
                    f"retain=h2o budget=headkv(heads={path},tokens=10000,scope=global)" + tail]
    return out


def test_every_head_retrieval_equals_full_cache(llm: LLM, files: dict[str, Path]) -> None:
    full = llm.generate(PROMPT, GREEDY, kv="full")[0].token_ids
    full_logits = llm.prompt_logits(PROMPT, "full")
    specs = _all_retrieval_specs(files["all"])
    outs = llm.generate([PROMPT] * len(specs), GREEDY, kv=specs)
    for spec, out in zip(specs, outs, strict=True):
        assert out.token_ids == full, spec
        assert out.stats.kv.num_evictions == 0, spec
    for spec in specs[:4]:
        torch.testing.assert_close(llm.prompt_logits(PROMPT, spec), full_logits, atol=1e-5, rtol=0, msg=spec)
    assert llm.pool.num_used_blocks == 0


@pytest.mark.parametrize("prefill", ["dense", "chunked(size=16)"])
def test_every_head_streaming_duo_equals_streamingllm(llm: LLM, files: dict[str, Path], prefill: str) -> None:
    duo = llm.generate(PROMPT, GREEDY, kv=f"budget=duo(heads={files['none']},sinks={SINKS},window={WINDOW}) "
                                          f"prefill={prefill}")[0]
    ref = llm.generate(PROMPT, GREEDY, kv=f"retain=streamingllm(num_sinks={SINKS}) "
                                          f"budget=uniform(tokens={SINKS + WINDOW}) prefill={prefill}")[0]
    assert duo.token_ids == ref.token_ids
    assert duo.stats.kv.final_tokens_per_row == ref.stats.kv.final_tokens_per_row
    assert duo.stats.kv.final_bytes == ref.stats.kv.final_bytes
    assert all(n == SINKS + WINDOW for row in duo.stats.kv.final_tokens_per_row for n in row)


def test_mixed_heads_hold_their_own_lengths_and_admission_counts_them(llm: LLM, files: dict[str, Path]) -> None:
    spec = f"budget=duo(heads={files['mixed']},sinks={SINKS},window={WINDOW})"
    out = llm.generate(PROMPT, GREEDY, kv=spec)[0]
    total = len(PROMPT) + GREEDY.max_tokens
    for row in out.stats.kv.final_tokens_per_row:
        assert row == [total - 1, SINKS + WINDOW]  # retrieval head: every token stored; streaming: sinks + window
    full = llm.generate(PROMPT, GREEDY, kv="full")[0]
    assert out.stats.kv.final_bytes < full.stats.kv.final_bytes
    seq = SequenceKV(llm.pool, llm.config, KVSpec.parse(spec), len(PROMPT))
    assert seq.head_budgets is not None and seq.head_budgets[0][1] == SINKS + WINDOW
    req = llm.engine.make_request(PROMPT, GREEDY, KVSpec.parse(spec), prompt=PROMPT)
    full_req = llm.engine.make_request(PROMPT, GREEDY, KVSpec.parse("full"), prompt=PROMPT)
    for r in (req, full_req):  # once the prompt is in, a streaming row commits only its budget
        r.num_computed_tokens = r.num_prompt_tokens
    assert llm.engine.kv.peak_blocks(req) < llm.engine.kv.peak_blocks(full_req)
    for r in (req, full_req):
        r.kv.release()
    seq.release()


def test_headkv_splits_each_layer_budget_by_score(llm: LLM, files: dict[str, Path]) -> None:
    spec = KVSpec.parse(f"retain=snapkv(window=4) budget=headkv(heads={files['skew']},tokens=20,beta=2.0)")
    seq = SequenceKV(llm.pool, llm.config, spec, len(PROMPT))
    # floor 20 - 20/2 = 10 per head, pool 2 * 10 split 1:3
    assert seq.head_budgets == [[15, 25]] * llm.config.num_layers
    seq.release()
    out = llm.generate(PROMPT, GREEDY, kv=spec)[0]
    assert all(row[0] < row[1] for row in out.stats.kv.final_tokens_per_row)
    glob = KVSpec.parse(f"retain=snapkv budget=headkv(heads={files['skew']},tokens=20,beta=2.0,scope=global)")
    seq = SequenceKV(llm.pool, llm.config, glob, len(PROMPT))
    assert sum(map(sum, seq.head_budgets)) == 20 * llm.config.num_layers * llm.config.num_kv_heads
    seq.release()


def test_compensation_token_is_the_mean_of_what_was_dropped(llm: LLM, files: dict[str, Path]) -> None:
    cfg = llm.config
    spec = KVSpec.parse(f"budget=razor(heads={files['none']},sinks={SINKS},window={WINDOW},threshold=0.5)")
    seq = SequenceKV(BlockPool(cfg.head_dim, block_size=4, num_blocks=64), cfg, spec, prompt_len=30)
    budget = SINKS + WINDOW + 1
    assert seq.head_budgets == [[budget] * cfg.num_kv_heads] * cfg.num_layers
    g = torch.Generator().manual_seed(0)
    H, D = cfg.num_kv_heads, cfg.head_dim
    k_all, v_all = torch.randn(40, H, D, generator=g), torch.randn(40, H, D, generator=g)
    layer = 0

    def add(start: int, end: int) -> None:
        seq.rows.append(layer, k_all[start:end], v_all[start:end], torch.arange(start, end))
        seq._evict(layer, seq.rows.gather(layer), False, None, None)

    add(0, 30)  # first cut: tokens SINKS .. 30 - WINDOW dropped
    view = seq.rows.gather(layer)
    for h in range(H):
        assert int(view.lengths[h]) == budget
        dropped = list(range(SINKS, 30 - WINDOW))
        assert view.pos[h].tolist() == [*range(SINKS), dropped[-1], *range(30 - WINDOW, 30)]
        torch.testing.assert_close(view.k[h, SINKS], k_all[dropped, h].mean(0))
        torch.testing.assert_close(view.v[h, SINKS], v_all[dropped, h].mean(0))
        torch.testing.assert_close(view.k[h, SINKS + 1 :], k_all[30 - WINDOW : 30, h])
    add(30, 40)  # second cut: the slot now summarises every token dropped so far
    view = seq.rows.gather(layer)
    dropped = list(range(SINKS, 40 - WINDOW))
    for h in range(H):
        assert int(view.lengths[h]) == budget
        torch.testing.assert_close(view.k[h, SINKS], k_all[dropped, h].mean(0))
        torch.testing.assert_close(view.v[h, SINKS], v_all[dropped, h].mean(0))
        assert view.pos[h, SINKS].item() == dropped[-1]
    seq.release()
    out = llm.generate(PROMPT, GREEDY, kv=spec)[0]  # end to end: every row holds sinks + slot + window
    assert all(n == budget for row in out.stats.kv.final_tokens_per_row for n in row)
    assert llm.pool.num_used_blocks == 0


def test_head_budget_specs_fail_at_parse_time_with_a_clear_message() -> None:
    with pytest.raises(SpecError, match="leave retain at full"):
        KVSpec.parse("retain=snapkv budget=duo(heads=x.json)")
    with pytest.raises(SpecError, match="quant=none"):
        KVSpec.parse("budget=razor(heads=x.json) int8")
    with pytest.raises(SpecError, match="not used by duo"):
        KVSpec.parse("budget=duo(heads=x.json,tokens=64)")
    spec = KVSpec.parse("budget=duo(heads=/some/file.json,retrieval=0.25)")
    assert KVSpec.parse(str(spec)) == spec
