"""End-to-end checks with the real SmolLM2-135M-Instruct (GGUF from PyPI, cached once).

Short contexts only: a 2K-token forward pass takes seconds on a 2-core CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams
from longctx.eval.needle import build_needle_prompt, is_correct

pytestmark = pytest.mark.real_model

SNIPPET = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters."
)


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> LLM:
    return LLM(smollm2_path)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_path: Path):  # noqa: ANN201
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    )
    return model.eval()


def test_gguf_logits_match_transformers_on_real_text(smollm2: LLM, hf_smollm2, torch_one_thread) -> None:  # noqa: ANN001
    ids = smollm2.tokenizer.encode(SNIPPET)
    ours = smollm2.prompt_logits(ids)
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0].float()
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-3, f"max abs logit diff {diff}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_gguf_greedy_continuation_matches_transformers(smollm2: LLM, hf_smollm2, torch_one_thread) -> None:  # noqa: ANN001
    ids = smollm2.tokenizer.encode(SNIPPET)
    ours = smollm2.generate([ids], SamplingParams(max_tokens=20, ignore_eos=True))[0].token_ids
    with torch.no_grad():
        ref = hf_smollm2.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    assert ours == ref


def test_needle_answered_by_full_and_snapkv_and_missed_by_streamingllm_outside_its_window(smollm2: LLM) -> None:
    """The methods really change what the model sees: StreamingLLM keeps sinks + recent tokens only, so a
    needle in the middle is lost, while SnapKV keeps it (the question attends to it) at the same budget."""
    middle = build_needle_prompt(smollm2.tokenizer, 2000, 0.5)
    end = build_needle_prompt(smollm2.tokenizer, 2000, 0.95)
    specs = ["full", "snapkv:512", "streamingllm:512", "streamingllm:512"]
    prompts = [middle.text, middle.text, middle.text, end.text]
    outs = smollm2.generate(prompts, SamplingParams(max_tokens=20), kv=specs, chat=True)
    right = [is_correct(o.text, middle.answer) for o in outs]
    assert right == [True, True, False, True], [o.text for o in outs]
    full_bytes = outs[0].stats.kv_bytes_held
    for o in outs[1:]:
        assert o.stats.kv_bytes_held < full_bytes / 3, (o.kv_spec, o.stats.kv_bytes_held, full_bytes)
    assert smollm2.pool.num_used_blocks == 0


def test_full_cache_finds_the_needle_at_three_depths_of_2k_tokens(smollm2: LLM) -> None:
    prompts = [build_needle_prompt(smollm2.tokenizer, 2000, depth) for depth in (0.25, 0.5, 0.75)]
    outs = smollm2.generate([p.text for p in prompts], SamplingParams(max_tokens=20), kv="full", chat=True)
    assert [is_correct(o.text, p.answer) for o, p in zip(outs, prompts, strict=True)] == [True, True, True], \
        [o.text for o in outs]
