"""A bounded load test on loopback: 200 concurrent streaming requests (completions and chat) with mixed KV
specs and prompt lengths, one in five clients leaving mid-stream. Every request either completes or gets a
429 / 503; afterwards every KV block is free, ``/metrics`` accounts for every request and every
completion, and the process RSS is within 10% of its level before the load."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import openai
import pytest

from longctx import LLM
from tests.server.conftest import LiveServer, live_server

NUM_REQUESTS = 200
SPECS = ["full", "snapkv:32", "streamingllm:32", "h2o:0.5", "int8", "streamingllm:32 int8", "tova:32"]
MODEL = "tiny"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_checkpoint, torch_one_thread):  # noqa: ANN001, ANN201
    llm = LLM(tiny_checkpoint("llama")[0], max_num_seqs=32, max_waiting=24)
    with live_server(llm, served_model_name=MODEL) as srv:
        yield srv


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


async def _one(client: openai.AsyncOpenAI, i: int, rng: random.Random) -> str:
    """One streaming client; returns 'done', 'left' (disconnected on purpose) or 'rejected' (429 / 503)."""
    leave = i % 5 == 0
    spec = SPECS[i % len(SPECS)]
    prompt = "".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(5, 180)))
    max_tokens = 200 - len(prompt) if leave else rng.randint(4, 24)
    kw = dict(model=MODEL, max_tokens=max_tokens, temperature=0.8, seed=i, stream=True,
              extra_body={"kv": spec, "ignore_eos": True})
    try:
        if i % 2:
            stream = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
        else:
            stream = await client.completions.create(prompt=prompt, **kw)
    except (openai.RateLimitError, openai.InternalServerError) as e:
        assert e.status_code in (429, 503) and e.response.headers.get("retry-after")
        return "rejected"
    chunks = 0
    reasons = []
    async with stream:
        async for chunk in stream:
            chunks += 1
            reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
            if leave and chunks == 2:
                return "left"
    assert reasons == ["length"], reasons
    return "done"


async def _load(server: LiveServer, n: int, seed: int) -> Counter[str]:
    rng = random.Random(seed)
    async with server.async_client(timeout=120) as client:
        outcomes = await asyncio.gather(*(_one(client, i, rng) for i in range(n)))
    return Counter(outcomes)


def _sum(metrics: dict[str, float], prefix: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in metrics.items() if k.startswith(prefix + "{") and all(w in k for w in want))


def test_200_concurrent_streams_complete_or_are_refused_and_free_everything(server: LiveServer) -> None:
    asyncio.run(_load(server, 40, seed=1))  # warm up: pool tensors, thread pools, code paths
    server.wait_idle()
    rss_before = _rss_bytes()
    before = server.metrics()

    outcomes = asyncio.run(_load(server, NUM_REQUESTS, seed=2))

    server.wait_idle()
    rss_after = _rss_bytes()
    after = server.metrics()
    assert sum(outcomes.values()) == NUM_REQUESTS and set(outcomes) <= {"done", "left", "rejected"}, outcomes
    assert outcomes["done"] >= NUM_REQUESTS // 4 and outcomes["left"] > 0, outcomes
    # Whether the queue bound (24) is reached depends on timing (the client does not retry): the refusal
    # itself is tested deterministically in test_openai_api; here refused requests only have to be accounted.
    assert server.llm.pool.num_used_blocks == 0
    assert all(qp.num_used_blocks == 0 for qp in server.llm.pool.quant_pools.values())
    assert after['longctx_kv_blocks_used{model="tiny"}'] == 0

    def delta(prefix: str, **labels: str) -> float:
        return _sum(after, prefix, **labels) - _sum(before, prefix, **labels)

    endpoints = ("/v1/completions", "/v1/chat/completions")
    assert sum(delta("longctx_http_requests_total", endpoint=e) for e in endpoints) == NUM_REQUESTS
    assert sum(delta("longctx_http_requests_total", endpoint=e, status="200") for e in endpoints) == (
        outcomes["done"] + outcomes["left"])
    assert sum(delta("longctx_http_requests_total", endpoint=e, status="429") for e in endpoints) == (
        outcomes["rejected"])
    assert delta("longctx_completions_total", finish_reason="length") == outcomes["done"]
    assert delta("longctx_completions_total", finish_reason="abort") == outcomes["left"]
    assert delta("longctx_completions_total", finish_reason="error") == 0
    assert after['longctx_http_requests_in_flight{model="tiny"}'] == 1  # the scrape itself
    assert rss_after <= 1.10 * rss_before, (rss_before, rss_after)
