"""The server's small parts without a server: API-key check, metrics text and its label bound, error shapes,
sampling defaults."""

from __future__ import annotations

from types import SimpleNamespace

from longctx.errors import PromptTooLongError, QueueFullError, SpecError
from longctx.server.auth import key_matches
from longctx.server.errors import describe_validation, from_engine_error
from longctx.server.metrics import MAX_SPEC_LABELS, Metrics

ENGINE = SimpleNamespace(running=1, waiting=2, preempted=3, blocks_used=4, blocks_free=5, blocks_total=9,
                         kv_bytes_used=64, tokens_per_second=1.5)


def test_api_key_needs_the_bearer_scheme_and_the_exact_key() -> None:
    assert key_matches(b"Bearer s3cret", "s3cret") and key_matches(b"bearer s3cret", "s3cret")
    for header in (None, b"", b"s3cret", b"Basic s3cret", b"Bearer s3cre", b"Bearer s3cret2", b"Bearer "):
        assert not key_matches(header, "s3cret"), header


def test_metrics_text_and_the_bound_on_spec_labels() -> None:
    m = Metrics('m"1')
    m.observe_http("/v1/completions", 200)
    m.observe_http("/v1/whatever/else", 404)
    for i in range(MAX_SPEC_LABELS + 5):
        m.observe_finished(f"retain=full x{i}", "length", 3, ttft=0.02, tpot=0.003, e2e=0.05)
    text = m.render(ENGINE)
    assert 'longctx_http_requests_total{model="m\\"1",endpoint="/v1/completions",status="200"} 1' in text
    assert 'endpoint="other",status="404"} 1' in text
    assert len(m.ttft) == MAX_SPEC_LABELS + 1 and 'kv="other",le="+Inf"} 5' in text
    assert 'longctx_completions_total{model="m\\"1",finish_reason="length"} 37' in text
    assert 'longctx_kv_blocks_used{model="m\\"1"} 4' in text and "# TYPE longctx_preemptions_total counter" in text
    bucket = 'longctx_time_to_first_token_seconds_bucket{model="m\\"1",kv="retain=full x0",le="0.025"} 1'
    assert bucket in text and text.endswith("\n")


def test_engine_errors_map_to_statuses() -> None:
    assert from_engine_error(QueueFullError("full")).status == 429
    assert from_engine_error(QueueFullError("full")).headers == {"Retry-After": "1"}
    assert from_engine_error(SpecError("bad")).body()["error"]["param"] == "kv"
    assert from_engine_error(PromptTooLongError("long")).body()["error"]["code"] == "context_length_exceeded"


def test_validation_errors_read_as_one_line() -> None:
    e = describe_validation([{"loc": ("body", "max_tokens"), "msg": "Input should be a valid integer",
                              "type": "int_type"}, {"loc": ("body", "n"), "msg": "x", "type": "int_type"}])
    assert e.status == 400 and e.message == "max_tokens: Input should be a valid integer (and 1 more error)"
    assert e.param == "max_tokens"
    e = describe_validation([{"loc": ("body", "frob"), "msg": "Extra inputs are not permitted",
                              "type": "extra_forbidden"}])
    assert e.message.startswith("unknown field 'frob'")


def test_a_stream_chunk_carries_its_token_ids_while_the_text_is_held_back() -> None:
    from longctx.engine.request import CompletionOutput, RequestOutput, RequestStats  # noqa: PLC0415
    from longctx.engine.sampling import SamplingParams  # noqa: PLC0415
    from longctx.kv.spec import KVSpec  # noqa: PLC0415
    from longctx.server.inputs import Plan  # noqa: PLC0415
    from longctx.server.outputs import Formatter, TokenTexts  # noqa: PLC0415

    def out(ids: list[int], new: list[int], delta: str) -> RequestOutput:
        comp = CompletionOutput(0, delta, ids, "", RequestStats(prompt_tokens=3), new_token_ids=new, text_delta=delta)
        return RequestOutput([1, 2, 3], delta, ids, "retain=full", comp.stats, outputs=[comp], finished=False)

    plan = Plan(prompts=[[1, 2, 3]], prompt_texts=[""], choices=[(0, SamplingParams())], spec=KVSpec.parse("full"),
                return_token_ids=True)
    fmt = Formatter(plan, "cmpl-1", "m", chat=False, texts=TokenTexts(None))
    held = fmt.chunk(0, out([7], [7], ""), [None])  # the first byte of a character: no text yet
    assert held is not None and held["choices"][0]["token_ids"] == [7] and held["choices"][0]["text"] == ""
    assert fmt.chunk(0, out([7, 8], [8], "é"), [None])["choices"][0]["token_ids"] == [8]
    plain = Formatter(Plan(prompts=[[1, 2, 3]], prompt_texts=[""], choices=[(0, SamplingParams())],
                           spec=KVSpec.parse("full")), "cmpl-2", "m", chat=False, texts=TokenTexts(None))
    assert plain.chunk(0, out([7], [7], ""), [None]) is None  # without token ids a held-back step sends nothing
