"""The vLLM-shaped Python API: input forms, SamplingParams options, outputs, chat and no leaked blocks."""

from __future__ import annotations

import random

import pytest
import torch

import longctx
from longctx import LLM, LongctxError, SamplingParams
from longctx.engine.sampler import apply_penalties
from longctx.kv.sequence import SequenceKV

PROMPT = [5, 9, 13, 17, 21, 25, 29, 33]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:  # noqa: ANN001
    return LLM(tiny_checkpoint("llama")[0])


def test_root_exports() -> None:
    assert longctx.LLM is LLM and longctx.SamplingParams is SamplingParams
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        longctx.nope  # noqa: B018


def test_prompt_forms_agree(llm: LLM) -> None:
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    a = llm.generate(PROMPT, sp)[0]
    b = llm.generate({"prompt_token_ids": PROMPT}, sampling_params=sp)[0]
    c = llm.generate([{"prompt_token_ids": PROMPT}], params=sp)[0]
    assert a.token_ids == b.token_ids == c.token_ids and len(a.token_ids) == 6
    text = llm.tokenizer.decode(PROMPT)
    d = llm.generate({"prompt": text}, sp)[0]
    e = llm.generate(text, sp)[0]
    assert d.token_ids == e.token_ids
    assert a.prompt_token_ids == PROMPT and a.request_id != "" and a.outputs[0].token_ids == a.token_ids
    assert a.outputs[0].finish_reason == "length"


@pytest.mark.parametrize(("prompt", "message"), [
    ({"text": "x"}, "a dict prompt must be"),
    ([{"role": "user", "content": "hi"}], "LLM.chat"),
    (3.5, "got float"),
    ([1, "a"], "list of ints"),
])
def test_bad_prompt_forms(llm: LLM, prompt: object, message: str) -> None:
    with pytest.raises(LongctxError, match=message):
        llm.generate(prompt, SamplingParams(max_tokens=2))  # type: ignore[arg-type]
    assert llm.pool.num_used_blocks == 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"top_k": -2}, "top_k must be >= -1"), ({"temperature": float("nan")}, "temperature must be a finite"),
    ({"n": 0}, "n must be >= 1"), ({"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"), ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"min_p": 1.5}, "min_p"), ({"logprobs": -1}, "logprobs"), ({"stop": [""]}, "stop"),
    ({"max_tokens": 2.5}, "max_tokens must be an integer"),
])
def test_sampling_params_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_top_k_minus_one_is_off() -> None:
    assert SamplingParams(top_k=-1).top_k == 0


def _greedy_with_penalties(llm: LLM, sp: SamplingParams) -> list[int]:
    """A direct computation: full forward over the whole sequence each step, penalties by hand."""
    ids = list(PROMPT)
    out: list[int] = []
    for _ in range(sp.max_tokens):
        logits = llm.prompt_logits(ids + out)[-1].float().clone()
        seen = set(ids) | set(out)
        for t in seen:
            v = logits[t]
            logits[t] = v / sp.repetition_penalty if v > 0 else v * sp.repetition_penalty
        for t in set(out):
            logits[t] -= sp.frequency_penalty * out.count(t) + sp.presence_penalty
        out.append(int(torch.argmax(logits)))
    return out


def test_greedy_with_penalties_equals_direct_computation(llm: LLM) -> None:
    sp = SamplingParams(max_tokens=8, ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.5,
                        frequency_penalty=0.4)
    got = llm.generate(PROMPT, sp)[0].token_ids
    assert got == _greedy_with_penalties(llm, sp)
    plain = llm.generate(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    strong = SamplingParams(max_tokens=8, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0)
    assert len(set(llm.generate(PROMPT, strong)[0].token_ids)) >= len(set(plain))


def test_apply_penalties_by_hand() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    sp = SamplingParams(repetition_penalty=2.0, presence_penalty=0.25, frequency_penalty=0.5)
    got = apply_penalties(logits, sp, prompt_ids=[0], output_ids=[1, 1, 3])
    assert torch.allclose(got, torch.tensor([1.0, -2.0 - 1.0 - 0.25, 0.5, 1.5 - 0.5 - 0.25]))


def test_n_with_seed_is_reproducible_and_distinct(llm: LLM) -> None:
    sp = SamplingParams(n=3, max_tokens=10, temperature=1.5, seed=7, ignore_eos=True)
    a = llm.generate(PROMPT, sp)[0]
    b = llm.generate(PROMPT, sp)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    assert llm.pool.num_used_blocks == 0


def test_min_tokens_bans_stop_ids(llm: LLM) -> None:
    first = llm.generate(PROMPT, SamplingParams(max_tokens=1, ignore_eos=True))[0].token_ids[0]
    stopped = llm.generate(PROMPT, SamplingParams(max_tokens=5, stop_token_ids=(first,)))[0]
    assert stopped.token_ids == [] and stopped.stats.finish_reason == "stop"
    held = llm.generate(PROMPT, SamplingParams(max_tokens=5, min_tokens=3, stop_token_ids=(first,)))[0]
    assert len(held.token_ids) >= 3 and first not in held.token_ids[:3]


def test_include_stop_str_in_output(llm: LLM) -> None:
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    text = llm.generate(PROMPT, sp)[0].text
    assert len(text) >= 3
    stop = text[2]
    cut = llm.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,)))[0].text
    kept = llm.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,),
                                               include_stop_str_in_output=True))[0].text
    assert kept == cut + stop and kept == text[: text.index(stop) + 1]


def test_logprobs(llm: LLM) -> None:
    out = llm.generate(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True, logprobs=3))[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 4
    for tok, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert tok in entry and 3 <= len(entry) <= 4
        assert entry[tok] == pytest.approx(max(entry.values()))  # greedy picks the most likely
    assert out.cumulative_logprob == pytest.approx(sum(e[t] for e, t in zip(out.logprobs, out.token_ids,
                                                                             strict=True)))
    ref = torch.log_softmax(llm.prompt_logits(PROMPT)[-1].float(), -1)[out.token_ids[0]]
    assert out.logprobs[0][out.token_ids[0]] == pytest.approx(float(ref), abs=1e-4)


def test_chat_messages(llm: LLM) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "again"}]
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    one = llm.chat(messages, sp)
    two = llm.chat([messages, messages[:2]], sp)
    assert len(one) == 1 and len(two) == 2 and one[0].token_ids == two[0].token_ids
    text = llm.tokenizer.apply_chat_template(messages)
    assert one[0].prompt == text and "be brief" in text and "again" in text
    with pytest.raises(LongctxError, match="messages must be"):
        llm.chat("hello", sp)  # type: ignore[arg-type]


def test_dtype_auto_and_limits(tiny_checkpoint) -> None:  # noqa: ANN001
    m = LLM(tiny_checkpoint("llama")[0], dtype="auto", max_model_len=8)
    assert m.dtype == torch.float32 and m.max_model_len == 8
    with pytest.raises(LongctxError, match="context is 8"):
        m.generate(PROMPT + [1], SamplingParams(max_tokens=2))
    for kwargs in ({"max_num_seqs": 0}, {"block_size": 0}, {"max_model_len": -1}):
        with pytest.raises(LongctxError, match="must be a positive integer"):
            LLM(tiny_checkpoint("llama")[0], **kwargs)


@pytest.mark.parametrize("seed", range(6))
def test_no_block_leaks_after_failures_at_random_steps(llm: LLM, monkeypatch: pytest.MonkeyPatch,
                                                       seed: int) -> None:
    """Failures (errors and interrupts) injected at a random step, including while forking a shared
    prefix and with requests still waiting: afterwards the pool holds nothing."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 60) for _ in range(140)]
    prompts = [prefix + [rng.randrange(3, 60) for _ in range(rng.randrange(1, 9))] for _ in range(5)]
    fail_at = rng.randrange(0, 6)
    exc = KeyboardInterrupt if seed % 2 else RuntimeError
    real_run = llm.runner.run
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] > fail_at:
            raise exc("injected")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(llm.runner, "run", flaky)
    old = llm.max_num_seqs
    llm.max_num_seqs = 2  # some requests are still waiting when it fails
    try:
        with pytest.raises(exc):
            llm.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True), kv=["full", "snapkv:16"] * 2
                         + ["full"])
    finally:
        llm.max_num_seqs = old
    assert llm.pool.num_used_blocks == 0
    monkeypatch.setattr(llm.runner, "run", real_run)
    assert len(llm.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3
    assert llm.pool.num_used_blocks == 0


def test_fork_failure_releases_forked_members(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = list(range(3, 143))
    prompts = [prefix + [7], prefix + [8], prefix + [9]]
    real = SequenceKV.fork_from
    calls = {"n": 0}

    def flaky_fork(self, other):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of blocks while forking")
        return real(self, other)

    monkeypatch.setattr(SequenceKV, "fork_from", flaky_fork)
    with pytest.raises(RuntimeError, match="forking"):
        llm.generate(prompts, SamplingParams(max_tokens=2))
    assert calls["n"] == 3 and llm.pool.num_used_blocks == 0


@pytest.mark.parametrize("kv", ["full", "snapkv:4", "prefill=chunked(size=3)", "prefill=chunked(size=7)"])
def test_prompt_logprobs_equal_prompt_logits(llm: LLM, kv: str) -> None:
    out = llm.generate(PROMPT, SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=2), kv=kv)[0]
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(PROMPT) and plp[0] is None
    ref = torch.log_softmax(llm.prompt_logits(PROMPT, kv=kv).float(), -1)
    for t in range(1, len(PROMPT)):
        entry = plp[t]
        assert entry is not None and PROMPT[t] in entry and 2 <= len(entry) <= 3
        assert entry[PROMPT[t]] == pytest.approx(float(ref[t - 1, PROMPT[t]]), abs=1e-4)
    plain = llm.generate(PROMPT, SamplingParams(max_tokens=2, ignore_eos=True), kv=kv)[0]
    assert plain.token_ids == out.token_ids and plain.prompt_logprobs is None
    assert llm.pool.num_used_blocks == 0


def test_generation_config_sampling_defaults(tiny_checkpoint, tmp_path) -> None:  # noqa: ANN001
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_checkpoint("llama")[0], folder)
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    gen.update({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1,
                "max_new_tokens": 7})
    gen_path.write_text(json.dumps(gen))
    m = LLM(folder)
    d = m.get_default_sampling_params()
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty, d.max_tokens) == (0.6, 0.9, 20, 1.1, 7)
    assert len(m.generate(PROMPT)[0].outputs[0].token_ids) <= 7
    gen["do_sample"] = False
    gen_path.write_text(json.dumps(gen))
    assert LLM(folder).get_default_sampling_params().temperature == 0.0
    gen["top_p"] = "lots"
    gen_path.write_text(json.dumps(gen))
    with pytest.raises(LongctxError, match="generation_config.json has an invalid sampling default: top_p"):
        LLM(folder).generate(PROMPT)
