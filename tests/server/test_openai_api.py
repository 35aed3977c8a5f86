"""The official ``openai`` client against a live server on loopback (tiny random model): completions, chat,
streaming, n, per-request KV specs, stop strings, usage, log-probabilities, and every error case surfacing
as the client's own exception type with the server's message."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from longctx import LLM, KVSpec, SamplingParams
from tests.server.conftest import API_KEY, LiveServer, live_server

MODEL = "tiny"
PROMPT = "Once upon a time"
CHAT = [{"role": "user", "content": "Say something."}]
HOLD_SPEC = "streamingllm:32 rerotate"  # extends the context: a request can run until its client leaves


@pytest.fixture(scope="module")
def server(tiny_llm: LLM):  # noqa: ANN201
    with live_server(tiny_llm, api_key=API_KEY, served_model_name=MODEL, max_body_bytes=64 << 10) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return server.client()


def _engine_text(llm: LLM, prompt: str | list[int], **kw) -> str:  # noqa: ANN003
    return llm.generate(prompt, SamplingParams(**kw))[0].text


# ---- happy paths --------------------------------------------------------------------------------------
def test_models_list_and_retrieve(client: openai.OpenAI, server: LiveServer) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.owned_by == "longctx" and card.max_model_len == server.llm.max_model_len
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")
    assert server.state.settings.defaults["temperature"] == 1.0  # OpenAI's default: no generation_config.json


def test_completion_greedy_equals_the_engine(client: openai.OpenAI, server: LiveServer) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    assert r.choices[0].text == _engine_text(server.llm, PROMPT, max_tokens=12, ignore_eos=True)
    assert r.choices[0].finish_reason == "length"
    prompt_tokens = len(server.llm.tokenizer.encode(PROMPT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        prompt_tokens, 12, prompt_tokens + 12)
    assert r.kv == "retain=full" and r.usage.kv_bytes > 0 and r.usage.kv_bytes_full > 0


def test_token_id_prompts_and_prompt_lists(client: openai.OpenAI, server: LiveServer) -> None:
    ids = server.llm.tokenizer.encode(PROMPT)
    abc = server.llm.tokenizer.encode("abc")
    r = client.completions.create(model=MODEL, prompt=[ids, abc], max_tokens=4, temperature=0, n=2,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == _engine_text(server.llm, ids, max_tokens=4, ignore_eos=True)
    assert r.choices[2].text == _engine_text(server.llm, "abc", max_tokens=4, ignore_eos=True)
    assert r.usage.prompt_tokens == len(ids) + 3 and r.usage.completion_tokens == 16
    want = server.llm.generate(abc, SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert r.choices[2].token_ids == want.token_ids
    texts = client.completions.create(model=MODEL, prompt=[PROMPT, "abc"], max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in texts.choices] == [r.choices[0].text, r.choices[2].text]


def test_chat_greedy_equals_the_engine(client: openai.OpenAI, server: LiveServer) -> None:
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    want = server.llm.chat(CHAT, SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.usage.completion_tokens == 10
    # max_completion_tokens is the newer name of max_tokens; content parts and "developer" are accepted
    r2 = client.chat.completions.create(
        model=MODEL, max_completion_tokens=10, temperature=0, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say something."}]}])
    assert r2.choices[0].message.content == want.text


@pytest.mark.parametrize("chat", [False, True])
def test_stream_reassembles_to_the_non_streamed_text(client: openai.OpenAI, chat: bool) -> None:
    kw = dict(model=MODEL, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    if chat:
        whole = client.chat.completions.create(messages=CHAT, **kw).choices[0].message.content
        chunks = list(client.chat.completions.create(messages=CHAT, stream=True,
                                                     stream_options={"include_usage": True}, **kw))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        whole = client.completions.create(prompt=PROMPT, **kw).choices[0].text
        chunks = list(client.completions.create(prompt=PROMPT, stream=True, stream_options={"include_usage": True},
                                                **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.kv_bytes > 0 and all(c.kv == "retain=full" for c in chunks)


def test_return_token_ids_streams_every_token(client: openai.OpenAI, server: LiveServer) -> None:
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    whole = client.completions.create(**kw).choices[0].token_ids
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw)]
    assert len(whole) == 12 and [t for c in chunks for t in c.token_ids] == whole
    # every chunk carries the tokens it adds (several when the consumer fell behind the engine: the async
    # engine then joins its deltas); the held-back-text case is checked on the Formatter in test_parts
    assert all(c.token_ids for c in chunks)


def test_n2_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    a = client.completions.create(n=2, **kw)
    b = client.completions.create(n=2, **kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text  # seeds 7 and 8
    single = client.completions.create(n=1, **{**kw, "seed": 8})
    assert single.choices[0].text == a.choices[1].text
    assert a.usage.completion_tokens == 16
    streamed = client.completions.create(n=2, stream=True, **kw)
    texts = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in a.choices]


def test_per_request_kv_spec_is_echoed_with_its_memory(client: openai.OpenAI, server: LiveServer) -> None:
    prompt = "x" * 150
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    small = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                      extra_body={"kv": "streamingllm:32"})
    assert small.kv == str(KVSpec.parse("streamingllm:32")) and full.kv == "retain=full"
    assert small.usage.kv_bytes < full.usage.kv_bytes
    assert small.usage.kv_bytes_full == full.usage.kv_bytes_full
    assert small.usage.kv_bytes < small.usage.kv_bytes_full
    quant = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, extra_body={"kv": "int8"})
    assert quant.kv == str(KVSpec.parse("int8"))


def test_stop_string_cuts_the_text(client: openai.OpenAI, server: LiveServer) -> None:
    whole = _engine_text(server.llm, PROMPT, max_tokens=24, ignore_eos=True)
    k, stop = next((k, ch) for k, ch in enumerate(whole) if k > 0 and ch.isascii() and ch.isalnum()
                   and ch not in whole[:k])
    for stream in (False, True):
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                      stream=stream, extra_body={"ignore_eos": True})
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert (text, reason) == (whole[:k], "stop")


def test_logprobs_in_openai_shapes(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and 3 <= len(top) <= 4 and top[token] == value
        assert value == max(top.values())  # greedy picks the likeliest
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    c = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert isinstance(entry.bytes, list)
    streamed = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                              top_logprobs=2, stream=True, extra_body={"ignore_eos": True})
    joined = [e for ch in streamed for choice in ch.choices if choice.logprobs for e in choice.logprobs.content]
    assert [(e.token, e.logprob) for e in joined] == [(e.token, e.logprob) for e in content]


def test_health_and_metrics_text(server: LiveServer) -> None:
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    for name in ("longctx_http_requests_total", "longctx_requests_running", "longctx_requests_waiting",
                 "longctx_preemptions_total", "longctx_kv_blocks_used", "longctx_kv_blocks_free",
                 "longctx_prompt_tokens_total", "longctx_generation_tokens_total",
                 "longctx_time_to_first_token_seconds", "longctx_time_per_output_token_seconds"):
        assert f"# TYPE {name} " in r.text
    assert 'longctx_time_to_first_token_seconds_bucket{model="tiny",kv="retain=full",le="+Inf"}' in r.text
    assert 'endpoint="/v1/completions",status="200"' in r.text


# ---- errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"extra_body": {"kv": "snapkv:lots"}}, "budget 'lots' must be a token count"),
    ({"extra_body": {"kv": "bogus"}}, "not a KV method"),
    ({"prompt": "x" * 300}, "context is 256"),
    ({"max_tokens": 250}, "context is 256 tokens, but"),
    ({"max_tokens": "8"}, "max_tokens: Input should be a valid integer"),
    ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ({"temperature": -1}, "temperature: Input should be greater than or equal to 0"),
    ({"top_p": 0}, "top_p"),
    ({"n": True}, "n: Input should be a valid integer"),
    ({"n": 1000}, "n: Input should be less than or equal to 128"),
    ({"prompt": [999999]}, "token ids out of range"),
    ({"prompt": []}, "must not be an empty list"),
    ({"prompt": 5}, "prompt: must be a string, a list of strings"),
    ({"stop": [""]}, "stop: must be a non-empty string"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias is not supported"),
    ({"extra_body": {"frobnicate": 1}}, "unknown field 'frobnicate'"),
    ({"extra_body": {"min_tokens": 9}, "max_tokens": 3}, "min_tokens (9) must be <= max_tokens (3)"),
    ({"stream_options": {"include_usage": True}}, "only allowed with stream: true"),
])
def test_bad_completion_requests_are_400_with_the_reason(client: openai.OpenAI, kwargs: dict, message: str) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**body)
    assert message in err.value.message
    assert err.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"messages": []}, "messages: List should have at least 1 item"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content: must be a string, a list of"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ({"response_format": {"type": "json_object"}}, "response_format.type"),
    ({"extra_body": {"chat_template_kwargs": {"messages": []}}}, "must not set 'messages'"),
    ({"extra_body": {"kv": "snapkv:16 retain=h2o"}}, "axis 'retain' given twice"),
    ({"messages": [{"role": "user", "content": "y" * 400}]}, "context is 256"),
])
def test_bad_chat_requests_are_400_with_the_reason(client: openai.OpenAI, kwargs: dict, message: str) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**body)
    assert message in err.value.message


def test_bad_kv_spec_carries_the_parsers_message(client: openai.OpenAI) -> None:
    try:
        KVSpec.parse("retain=snapkv(window=-3) budget=uniform(tokens=8)")
        raise AssertionError("the spec should be invalid")
    except ValueError as e:
        parser_message = str(e)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2,
                                  extra_body={"kv": "retain=snapkv(window=-3) budget=uniform(tokens=8)"})
    assert parser_message in err.value.message
    assert err.value.body["param"] == "kv" and err.value.body["code"] == "invalid_kv_spec"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist") as err:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHAT, max_tokens=2)


def test_missing_or_wrong_api_key_is_401(server: LiveServer) -> None:
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        server.client(api_key="wrong").completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT})
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open


def test_body_over_the_limit_is_413(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=MODEL, prompt="z" * (100 << 10), max_tokens=2)
    assert err.value.status_code == 413 and "exceeds the server's limit of 65536 bytes" in err.value.message


def test_malformed_json_and_wrong_routes(server: LiveServer) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    for body, message in ((b"{not json", "not valid JSON"), (b"[1, 2]", "valid dictionary"), (b"", "missing"),
                          (b'{"prompt": "a", "max_tokens": 1e999}', "max_tokens"), (b"[" * 50000, "")):
        r = httpx.post(server.url + "/v1/completions", content=body, headers=auth)
        assert r.status_code == 400, (body[:20], r.text)
        assert message in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/completions", headers=auth)
    assert r.status_code == 405 and "error" in r.json()


def test_client_disconnect_mid_stream_frees_the_blocks(server: LiveServer) -> None:
    before = server.metrics()
    key = 'longctx_completions_total{model="tiny",finish_reason="abort"}'
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 100_000, "stream": True, "ignore_eos": True,
            "kv": HOLD_SPEC}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # (kept: a dropped line iterator closes the stream)
        next(lines)
        assert server.llm.engine.stats().blocks_used > 0
    server.wait_idle()
    assert server.llm.pool.num_used_blocks == 0
    assert server.metrics()[key] == before[key] + 1


# ---- a full waiting queue, and a client that leaves while queued ---------------------------------------
@pytest.fixture(scope="module")
def busy_server(tiny_checkpoint):  # noqa: ANN001, ANN201
    llm = LLM(tiny_checkpoint("llama")[0], max_num_seqs=1, max_waiting=1)
    with live_server(llm, served_model_name=MODEL) as srv:
        yield srv


def _hold(srv: LiveServer) -> tuple[threading.Thread, threading.Event]:
    """Start one endless streamed request in a thread (it holds the only running slot until ``stop`` is set,
    when its client disconnects)."""
    stop = threading.Event()

    def run() -> None:
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60, json={
                "prompt": "a", "max_tokens": 100_000, "stream": True, "ignore_eos": True, "kv": HOLD_SPEC}) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while not srv.llm.engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.005)
    return t, stop


def test_full_waiting_queue_is_429_with_retry_after(busy_server: LiveServer) -> None:
    t, stop = _hold(busy_server)
    queued = threading.Thread(target=lambda: httpx.post(busy_server.url + "/v1/completions", timeout=60,
                                                        json={"prompt": "b", "max_tokens": 2}))
    queued.start()
    deadline = time.monotonic() + 10
    while not busy_server.llm.engine.scheduler.waiting and time.monotonic() < deadline:
        time.sleep(0.005)
    with pytest.raises(openai.RateLimitError, match="waiting queue is full") as err:
        busy_server.client().completions.create(model=MODEL, prompt="c", max_tokens=2)
    assert err.value.response.headers["retry-after"] == "1"
    stop.set()
    t.join()
    queued.join()
    busy_server.wait_idle()
    assert busy_server.llm.pool.num_used_blocks == 0


def test_client_leaving_while_queued_aborts_its_request(busy_server: LiveServer) -> None:
    t, stop = _hold(busy_server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(busy_server.url + "/v1/completions", timeout=0.5, json={"prompt": "b", "max_tokens": 2})
    deadline = time.monotonic() + 5
    while busy_server.llm.engine.scheduler.waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not busy_server.llm.engine.scheduler.waiting  # aborted while the long request still runs
    assert t.is_alive()
    stop.set()
    t.join()
    busy_server.wait_idle()
    m = busy_server.metrics()
    assert m['longctx_http_requests_total{model="tiny",endpoint="/v1/completions",status="499"}'] >= 1


@pytest.fixture(scope="module")
def one_slot_server(tiny_checkpoint):  # noqa: ANN001, ANN201
    llm = LLM(tiny_checkpoint("llama")[0], max_num_seqs=1, max_waiting=4)
    with live_server(llm, served_model_name=MODEL) as srv:
        yield srv


def test_choices_admitted_one_after_another_on_a_one_slot_server(one_slot_server: LiveServer) -> None:
    """Choice 0 finishes before choice 1 is admitted (one running slot): the response still has both."""
    client = one_slot_server.client()
    r = client.completions.create(model=MODEL, prompt=["a", "bb"], max_tokens=1, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 2
    c = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, n=2, extra_body={"ignore_eos": True})
    assert len(c.choices) == 2 and c.usage.completion_tokens == 4
    with pytest.raises(openai.RateLimitError):  # the sixth choice finds the queue (4) full: none of them runs
        # (long enough that the first choice is still running when the sixth is submitted)
        client.completions.create(model=MODEL, prompt=["a", "bb", "c", "d", "e", "f"], max_tokens=120,
                                  extra_body={"ignore_eos": True})
    one_slot_server.wait_idle()
    assert one_slot_server.llm.pool.num_used_blocks == 0


def test_heads_auto_without_cached_scores_is_refused_not_calibrated(client: openai.OpenAI, monkeypatch,
                                                                    tmp_path) -> None:  # noqa: ANN001
    """Calibrating heads inside a request would stall every other request for minutes: the server refuses it."""
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path))  # no cached head scores
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2,
                                  extra_body={"kv": "budget=duo(heads=auto)"})
    assert "does not score heads while serving" in err.value.message
    assert not (tmp_path / "heads").exists()  # nothing was scored
