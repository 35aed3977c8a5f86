"""SamplingParams validation and the sampling/stopping behaviour of ``LLM.generate`` on a tiny llama."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from longctx.engine.llm import LLM
from longctx.engine.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PROMPTS = ["Hello there, how are you doing today?", "The quick brown fox", "abc"]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Callable[[str], tuple[Path, Any]]) -> LLM:
    folder, _ = tiny_checkpoint("llama")
    return LLM(folder)


@pytest.fixture(autouse=True)
def _no_leaked_blocks(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "llm" in request.fixturenames:
        pool = request.getfixturevalue("llm").pool
        assert pool.num_used_blocks == 0, f"{pool.num_used_blocks} KV blocks still held after the test"
        pool.check_invariants()


def greedy(llm: LLM, prompt: str | list[int], n: int = 30) -> tuple[list[int], str]:
    out = llm.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True))[0]
    return out.token_ids, out.text


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", 0), ("max_tokens", -3), ("temperature", -0.5), ("top_k", -2),
    ("top_p", 0.0), ("top_p", -0.1), ("top_p", 1.5),
])
def test_invalid_sampling_params_raise_value_error_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field) as exc:
        SamplingParams(**{field: value})
    assert str(value) in str(exc.value)


def test_nan_temperature_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=math.nan)


def test_valid_sampling_params_normalise_stop_and_stop_token_ids_to_tuples() -> None:
    p = SamplingParams(stop="##", stop_token_ids=[3, 4])  # type: ignore[arg-type]
    assert p.stop == ("##",) and p.stop_token_ids == (3, 4)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]
    SamplingParams(max_tokens=1, temperature=0.0, top_k=0, top_p=1.0)  # the boundaries are valid
    SamplingParams(temperature=2.0, top_k=5, top_p=1e-9, seed=0)


# ---------------------------------------------------------------- determinism and seeds


def test_greedy_generation_is_deterministic(llm: LLM) -> None:
    first = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True))]
    again = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True))]
    alone = [greedy(llm, p, 16)[0] for p in PROMPTS]
    assert first == again == alone
    assert all(len(ids) == 16 for ids in first)


def test_seeded_sampling_is_reproducible(llm: LLM) -> None:
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=1234, ignore_eos=True)
    a = llm.generate(PROMPTS[0], params)[0].token_ids
    b = llm.generate(PROMPTS[0], params)[0].token_ids
    # Same seed, same prompt, now in a batch next to other (unseeded and seeded) requests.
    others = [SamplingParams(max_tokens=7, temperature=1.0, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=0.7, seed=1, ignore_eos=True)]
    c = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [others[0], params, others[1]])[1].token_ids
    assert a == b == c
    assert len(a) == 20


def test_different_seeds_give_different_samples(llm: LLM) -> None:
    samples = {tuple(llm.generate(PROMPTS[0], SamplingParams(max_tokens=20, temperature=1.0, seed=s,
                                                             ignore_eos=True))[0].token_ids)
               for s in range(4)}
    assert len(samples) > 1, "four seeds sampled the same 20 tokens"


def test_top_k_1_equals_greedy(llm: LLM) -> None:
    for prompt in PROMPTS:
        ref, _ = greedy(llm, prompt, 20)
        out = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=1.5, top_k=1, seed=7,
                                                  ignore_eos=True))[0]
        assert out.token_ids == ref


def test_tiny_top_p_equals_greedy(llm: LLM) -> None:
    ref, _ = greedy(llm, PROMPTS[0], 20)
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=20, temperature=1.5, top_p=1e-6, seed=7,
                                                  ignore_eos=True))[0]
    assert out.token_ids == ref


def test_top_k_sampling_only_draws_from_the_k_most_likely_tokens(llm: LLM) -> None:
    k = 3
    prompt = llm.encode(PROMPTS[1])
    out = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=5.0, top_k=k, seed=3,
                                              ignore_eos=True))[0].token_ids
    for i, tok in enumerate(out):
        logits = llm.prompt_logits(prompt + out[:i])[-1]
        assert tok in torch.topk(logits, k).indices.tolist(), f"step {i}: token {tok} outside the top {k}"
    # At temperature 5 without top-k, 12 draws from ~300 tokens would almost never all be top-3.
    assert len(set(out)) > 1


# ---------------------------------------------------------------- stopping


def _ascii_stop(text: str) -> str:
    """A 2-character printable-ASCII substring of ``text`` whose first occurrence is not at the start."""
    for i in range(1, len(text) - 1):
        s = text[i : i + 2]
        if s.isascii() and s.isprintable() and text.find(s) > 0:
            return s
    raise AssertionError(f"no ASCII stop string candidate in {text!r}")


def test_stop_string_truncates_text_before_its_first_occurrence(llm: LLM) -> None:
    full_ids, full_text = greedy(llm, PROMPTS[0], 30)
    stop = _ascii_stop(full_text)
    cut = full_text.find(stop)
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=30, ignore_eos=True, stop=(stop,)))[0]
    assert out.text == full_text[:cut]
    assert stop not in out.text
    assert out.stats.finish_reason == "stop"
    assert out.token_ids == full_ids[: len(out.token_ids)] and len(out.token_ids) < len(full_ids)
    # Of several stop strings the earliest in the text wins, whatever their order.
    later = full_text[cut + 1 : cut + 3]
    if later and full_text.find(later) > cut:
        out2 = llm.generate(PROMPTS[0], SamplingParams(max_tokens=30, ignore_eos=True, stop=(later, stop)))[0]
        assert out2.text == full_text[:cut]


def test_stop_string_at_the_start_of_the_output_gives_empty_text(llm: LLM) -> None:
    candidates = [*PROMPTS, "hello world", "Once upon a time"]
    runs = [(p, *greedy(llm, p, 12)) for p in candidates]
    prompt, full_ids, full_text = next(r for r in runs if r[2][:1].isascii() and r[2][:1].isprintable())
    stop = full_text[0]  # a plain ASCII character that is the first character of the output
    out = llm.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,)))[0]
    assert out.stats.finish_reason == "stop"
    assert out.token_ids == full_ids[: len(out.token_ids)]
    assert out.text == "", f"stop string {stop!r} opens the output, yet text is {out.text!r}"


def test_stop_token_ids_stop_generation(llm: LLM) -> None:
    full_ids, _ = greedy(llm, PROMPTS[0], 30)
    stop_tok = full_ids[2]
    first = full_ids.index(stop_tok)
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=(stop_tok,)))[0]
    assert out.token_ids == full_ids[:first]  # the stop token itself is not returned
    assert out.stats.finish_reason == "stop"
    assert out.stats.generated_tokens == first + 1


def test_eos_stops_generation_unless_ignore_eos(llm: LLM) -> None:
    eos = llm.tokenizer.stop_ids
    assert eos, "the tiny tokenizer has an end-of-sequence id"
    for prompt in PROMPTS:
        full_ids, _ = greedy(llm, prompt, 30)
        out = llm.generate(prompt, SamplingParams(max_tokens=30))[0]
        hits = [i for i, t in enumerate(full_ids) if t in eos]
        if hits:
            assert out.token_ids == full_ids[: hits[0]] and out.stats.finish_reason == "stop"
        else:
            assert out.token_ids == full_ids and out.stats.finish_reason == "length"
    assert any(t in eos for p in PROMPTS for t in greedy(llm, p, 30)[0]), "no prompt reaches EOS: weak test"


@pytest.mark.parametrize("max_tokens", [1, 2, 9, 25])
def test_max_tokens_is_respected(llm: LLM, max_tokens: int) -> None:
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    for o in outs:
        assert len(o.token_ids) == max_tokens == o.stats.generated_tokens
        assert o.stats.finish_reason == "length"
    sampled = llm.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0))
    assert all(len(o.token_ids) <= max_tokens for o in sampled)


# ---------------------------------------------------------------- resources


def test_generate_returns_every_block_to_the_pool(tiny_checkpoint: Callable[[str], tuple[Path, Any]]) -> None:
    folder, _ = tiny_checkpoint("llama")
    llm = LLM(folder, block_size=4, max_num_seqs=2)  # small blocks, and requests queue behind each other
    full_ids, full_text = greedy(llm, PROMPTS[0], 30)
    assert llm.pool.num_used_blocks == 0
    params = [SamplingParams(max_tokens=30, ignore_eos=True, stop=(_ascii_stop(full_text),)),
              SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=(full_ids[2],)),
              SamplingParams(max_tokens=30),
              SamplingParams(max_tokens=3, temperature=1.0, seed=5),
              SamplingParams(max_tokens=17, ignore_eos=True)]
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[2], "x" * 70]
    outs = llm.generate(prompts, params)
    assert {o.stats.finish_reason for o in outs} == {"stop", "length"}
    assert llm.pool.num_used_blocks == 0
    assert llm.pool.peak_used_blocks > 0
    llm.pool.check_invariants()
    llm.prompt_logits(PROMPTS[0])
    assert llm.pool.num_used_blocks == 0
    llm.pool.check_invariants()


def test_unseeded_sampling_leaves_the_global_torch_rng_untouched(llm: LLM) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    llm.generate(PROMPTS[2], SamplingParams(max_tokens=2, temperature=1.0))
    assert torch.equal(torch.rand(3), expected), "generate() reseeded torch's global RNG"


def test_batched_sampler_equals_per_request_sampler() -> None:
    """``sample_batch`` draws what ``sample`` draws row by row, for the same seeds: greedy, penalised,
    banned ids, temperature with min-p / top-k / top-p."""
    from longctx.engine.sampler import sample, sample_batch  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 50, generator=g) * 3
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.3), SamplingParams(),
              SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=1.2, top_k=5, seed=2),
              SamplingParams(temperature=1.0, top_p=0.7, min_p=0.05, seed=3), SamplingParams(temperature=0.5, seed=4)]
    banned = [frozenset(), frozenset(), frozenset({int(logits[2].argmax())}), frozenset(), frozenset({1, 2}),
              frozenset(), frozenset()]
    prompt, output = [1, 2, 3], [int(logits[1].argmax()), 4]

    def gens() -> list[torch.Generator | None]:
        out = []
        for p in params:
            gen = None
            if p.temperature > 0:
                gen = torch.Generator()
                gen.manual_seed(p.seed)
            out.append(gen)
        return out

    for _ in range(3):  # three sets of logits
        banned[2] = frozenset({int(logits[2].argmax())})
        one, many = gens(), gens()
        expected = [sample(logits[i], p, one[i], prompt, output, banned[i]) for i, p in enumerate(params)]
        got = sample_batch(logits, [(p, many[i], prompt, output, banned[i]) for i, p in enumerate(params)])
        assert got == expected
        assert got[2] != int(logits[2].argmax())  # the banned id was masked
        logits = logits.roll(1, dims=1)
