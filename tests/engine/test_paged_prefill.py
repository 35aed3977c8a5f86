"""Prompt chunks attended in place (``LONGCTX_PAGED_PREFILL=1``, the varlen paged prefill path; on the CPU its
plain-torch twin) give the tokens and logits of the default path, for specs it serves and specs it hands back."""

from __future__ import annotations

import pytest
import torch

from longctx.engine import context
from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams

PROMPT_LENS = (57, 41, 66, 33)


def _run(folder, spec: str, monkeypatch: pytest.MonkeyPatch, paged: bool) -> tuple[list[list[int]], torch.Tensor]:  # noqa: ANN001
    with monkeypatch.context() as m:
        if paged:
            m.setenv("LONGCTX_PAGED_PREFILL", "1")
        else:
            m.delenv("LONGCTX_PAGED_PREFILL", raising=False)
        llm = LLM(folder, max_num_batched_tokens=24)  # prompts prefill in chunks, several sequences per step
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]
        outs = llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True), kv=spec)
        return [o.token_ids for o in outs], llm.prompt_logits(prompts[2], kv=spec)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])  # gemma3: sliding layers go the gathered way
@pytest.mark.parametrize("spec", ["full", "snapkv:24", "streamingllm:20", "quant=int8(group=16,residual=16)"])
def test_in_place_prompt_chunks_equal_the_gathered_path(tiny_checkpoint, torch_one_thread, arch: str, spec: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = tiny_checkpoint(arch)
    calls = []
    real = context.attend_in_place

    def counted(seqs, layer, queries):  # noqa: ANN001, ANN202
        calls.append(len(seqs))
        return real(seqs, layer, queries)

    monkeypatch.setattr(context, "attend_in_place", counted)
    base_tokens, base_logits = _run(folder, spec, monkeypatch, paged=False)
    assert not calls
    tokens, logits = _run(folder, spec, monkeypatch, paged=True)
    assert tokens == base_tokens
    torch.testing.assert_close(logits, base_logits, rtol=1e-4, atol=1e-4)
    if spec.startswith("quant"):
        assert not calls  # quantized rows are handed back to the gathered path
    else:
        assert calls  # the path ran (for snapkv / streamingllm: the chunks before a row is over its budget)
    if spec == "full":
        assert max(calls) > 1  # several sequences' chunks in one launch
