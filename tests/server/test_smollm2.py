"""The server over the real SmolLM2-135M-Instruct (its chat template and BPE tokenizer), through the openai
client. Few and short: a 135M model on a 2-core CPU."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from longctx import LLM, SamplingParams
from tests.server.conftest import LiveServer, live_server
from tests.test_real_model import SNIPPET

pytestmark = pytest.mark.real_model
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def server(smollm2_path: Path):  # noqa: ANN201
    with live_server(LLM(smollm2_path, max_num_seqs=8)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return server.client()


def test_chat_answers_through_the_template(client: openai.OpenAI, server: LiveServer) -> None:
    model = client.models.list().data[0].id
    assert model == "SmolLM2-135M-Instruct.Q4_1"
    r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16, temperature=0, logprobs=True)
    text = r.choices[0].message.content
    assert "Paris" in text and r.choices[0].finish_reason == "stop"
    assert text == server.llm.chat(QUESTION, SamplingParams(max_tokens=16))[0].text
    tokens = r.choices[0].logprobs.content
    assert "".join(t.token for t in tokens) == text
    assert b"".join(bytes(t.bytes) for t in tokens).decode() == text
    streamed = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text


def test_a_compressed_spec_holds_less_kv_on_a_long_prompt(client: openai.OpenAI) -> None:
    prompt = " ".join([SNIPPET] * 6)  # ~450 tokens
    kw = dict(model="SmolLM2-135M-Instruct.Q4_1", prompt=prompt, max_tokens=8, temperature=0)
    full = client.completions.create(**kw)
    small = client.completions.create(**kw, extra_body={"kv": "snapkv:128"})
    assert small.kv.startswith("retain=snapkv") and full.kv == "retain=full"
    assert small.usage.kv_bytes < full.usage.kv_bytes / 2
    assert small.usage.kv_bytes_full == full.usage.kv_bytes_full and small.usage.prompt_tokens > 400
