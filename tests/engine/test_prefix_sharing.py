"""A context shared by several questions is prefilled once, with results equal to separate prefills;
teacher-forced streaming log-probs equal the one-pass ones under the full cache."""

from __future__ import annotations

import pytest
import torch

from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams

SPECS = ["full", "snapkv:32", "h2o:40", "tova:30", "streamingllm:20", "retain=snapkv budget=adaptive(tokens=24)",
         "streamingllm:24 positions=rerotate"]


def _questions(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(0, 256, (200,), generator=g).tolist()
    return [ctx + torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 40, 9)]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("spec", SPECS)
def test_shared_prefix_gives_the_same_tokens_as_separate_prefills(arch, spec, tiny_checkpoint,  # noqa: ANN001
                                                                  torch_one_thread) -> None:  # noqa: ANN001
    llm = LLM(tiny_checkpoint(arch)[0])
    prompts = _questions(1)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    shared = llm.generate(prompts, params, kv=spec, share_prefix=True)
    separate = llm.generate(prompts, params, kv=spec, share_prefix=False)
    assert [o.token_ids for o in shared] == [o.token_ids for o in separate]
    if arch == "llama":  # sliding layers trim with a block of slack, whose timing may differ
        assert [o.stats.kv_bytes_held for o in shared] == [o.stats.kv_bytes_held for o in separate]
    assert llm.pool.num_used_blocks == 0


def test_shared_prefix_runs_the_context_once(tiny_checkpoint, torch_one_thread, monkeypatch) -> None:  # noqa: ANN001
    llm = LLM(tiny_checkpoint("llama")[0])
    fed: list[int] = []
    run = llm.runner.run

    def counting_run(scheduled, all_logits=False):  # noqa: ANN001, ANN202
        fed.append(sum(n for _, n in scheduled))
        return run(scheduled, all_logits)

    monkeypatch.setattr(llm.runner, "run", counting_run)
    prompts = _questions(2)
    llm.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True), kv="snapkv:32")
    # 200 shared tokens once + each question's own tokens, instead of 3 x 200 + questions.
    assert sum(fed) == 200 + sum(len(p) - 200 for p in prompts)


def test_stream_logprobs_equal_one_pass_under_full_cache(tiny_checkpoint, torch_one_thread) -> None:  # noqa: ANN001
    llm = LLM(tiny_checkpoint("llama")[0])
    seq = torch.randint(0, 256, (120,), generator=torch.Generator().manual_seed(3)).tolist()
    streamed = llm.stream_logprobs([seq], "full")[0]
    one_pass = torch.log_softmax(llm.prompt_logits(seq), -1)[:-1].gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
    assert streamed.shape == (119,)
    assert (streamed - one_pass).abs().max() < 1e-4


def test_stream_logprobs_with_eviction_stay_finite_and_differ(tiny_checkpoint, torch_one_thread) -> None:  # noqa: ANN001
    llm = LLM(tiny_checkpoint("llama")[0])
    seq = torch.randint(0, 256, (120,), generator=torch.Generator().manual_seed(4)).tolist()
    full = llm.stream_logprobs([seq], "full")[0]
    streaming = llm.stream_logprobs([seq], "streamingllm:16")[0]
    assert torch.isfinite(streaming).all()
    assert not torch.allclose(full[40:], streaming[40:])
    assert llm.pool.num_used_blocks == 0


def test_generate_with_shared_prefix_after_stream_logprobs(tiny_checkpoint, torch_one_thread) -> None:  # noqa: ANN001
    """Pool blocks grown under inference mode (scoring) must stay usable by a later prefix fork."""
    llm = LLM(tiny_checkpoint("llama")[0], block_size=4)
    seq = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(5)).tolist()
    llm.stream_logprobs([seq], "full")
    outs = llm.generate(_questions(6), SamplingParams(max_tokens=2, ignore_eos=True), kv="full")
    assert all(len(o.token_ids) == 2 for o in outs)
