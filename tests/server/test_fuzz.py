"""Property-based fuzzing of the live API: schemathesis over the server's own OpenAPI document (valid and
invalid bodies, query strings and paths for every operation) plus hypothesis-made raw bodies (any bytes,
any JSON value, deeply nested arrays, odd content types). No case may get a 5xx, every error must be
OpenAI's error JSON, and afterwards the process is alive and the KV pool empty.

Deterministic (``derandomize``) and bounded: the server runs with a 64-token context and at most 8 choices
per request, so a valid case costs at most a few hundred tiny-model steps."""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longctx import LLM
from tests.server.conftest import API_KEY, LiveServer, live_server

schemathesis = pytest.importorskip("schemathesis")

SCHEMA_EXAMPLES = 150  # per operation and mode (valid / invalid inputs)
RAW_EXAMPLES = 250  # per endpoint (2 endpoints)
MIN_CASES = 1000
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SETTINGS = dict(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
cases: dict[str, int] = {"schema": 0, "raw": 0}
statuses: Counter[tuple[str, str, int]] = Counter()  # (path, mode, status)


@pytest.fixture(scope="module")
def fuzz_server(tiny_checkpoint, torch_one_thread):  # noqa: ANN001, ANN201
    llm = LLM(tiny_checkpoint("llama")[0], max_num_seqs=8, max_model_len=64, max_waiting=64)
    with live_server(llm, api_key=API_KEY, served_model_name="tiny", max_body_bytes=16 << 10, max_choices=8) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(fuzz_server: LiveServer):  # noqa: ANN201
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


OPERATIONS = [("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"), ("POST", "/v1/completions"),
              ("POST", "/v1/chat/completions"), ("GET", "/health"), ("GET", "/metrics")]
WITH_BODIES = [op for op in OPERATIONS if op[0] == "POST"]
RUNS = [(*op, "positive") for op in OPERATIONS] + [(*op, "negative") for op in WITH_BODIES]  # (any path is valid)


def _check(response: httpx.Response | object, what: str) -> None:
    status = response.status_code  # type: ignore[attr-defined]
    assert status < 500, f"{what}: {status} {response.text[:500]}"  # type: ignore[attr-defined]
    if status >= 400 and status != 405:
        body = response.json()  # type: ignore[attr-defined]
        assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body


def test_every_operation_is_fuzzed(api_schema) -> None:  # noqa: ANN001
    found = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), RUNS)
def test_schema_cases_never_get_a_5xx(api_schema, fuzz_server: LiveServer, method: str, path: str,  # noqa: ANN001
                                      mode: str) -> None:
    from schemathesis.generation.modes import GenerationMode

    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))

    @settings(max_examples=SCHEMA_EXAMPLES, **SETTINGS)
    @given(case=strategy)
    def run(case) -> None:  # noqa: ANN001
        response = case.call(headers=AUTH, timeout=60)
        cases["schema"] += 1
        statuses[(path, mode, response.status_code)] += 1
        _check(response, f"{case.method} {case.formatted_path} {str(case.body)[:300]}")

    run()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20)
fields = st.sampled_from(["model", "prompt", "messages", "max_tokens", "n", "temperature", "top_p", "stop", "seed",
                          "stream", "logprobs", "top_logprobs", "kv", "stream_options", "echo", "min_tokens",
                          "stop_token_ids", "chat_template_kwargs", "tools", "best_of", "logit_bias"])
VALID = {"/v1/completions": {"prompt": "hi", "max_tokens": 4},
         "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}}


def bodies(path: str) -> st.SearchStrategy[bytes]:
    """Any bytes, any JSON, a valid body with a few fields replaced by any JSON, deep nesting."""
    return st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(fields, json_values, max_size=3).map(lambda d: json.dumps({**VALID[path], **d}).encode()),
        st.integers(1, 20000).map(lambda depth: b"[" * depth + b"]" * depth),
        st.integers(1, 20000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    )


content_types = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", "", "a/b"])


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_raw_bodies_never_get_a_5xx(fuzz_server: LiveServer, path: str) -> None:
    with httpx.Client(base_url=fuzz_server.url, timeout=60) as http:

        @settings(max_examples=RAW_EXAMPLES, **SETTINGS)
        @given(body=bodies(path), content_type=content_types)
        def run(body: bytes, content_type: str) -> None:
            response = http.post(path, content=body, headers={**AUTH, "Content-Type": content_type})
            cases["raw"] += 1
            statuses[(path, "raw", response.status_code)] += 1
            _check(response, f"POST {path} {body[:200]!r}")

        run()


def test_the_server_survived_every_case(fuzz_server: LiveServer) -> None:
    total = cases["schema"] + cases["raw"]
    print(f"fuzz cases: {cases}; statuses: {sorted(statuses.items())}")
    assert total >= MIN_CASES, cases
    for path in ("/v1/completions", "/v1/chat/completions"):  # valid cases did reach the engine
        assert statuses[(path, "positive", 200)] >= 10, statuses
    assert httpx.get(fuzz_server.url + "/health").json() == {"status": "ok"}
    fuzz_server.wait_idle()
    assert fuzz_server.llm.pool.num_used_blocks == 0
    assert fuzz_server.state.engine.errors == 0
