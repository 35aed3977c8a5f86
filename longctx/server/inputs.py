"""From an OpenAI request to what the engine runs: prompt token ids, one ``SamplingParams`` per choice, a KV spec.

Everything a request can get wrong is found here, before anything reaches the engine, and raised as a 400
:class:`~longctx.server.errors.APIError` naming the parameter: an unknown or malformed ``kv`` spec (with the
spec parser's message), a prompt longer than the context or one that leaves no room for ``max_tokens``,
token ids outside the vocabulary, sampling values ``SamplingParams`` rejects, chat messages the template
cannot render, parameters this server does not support. Tokenizing and template rendering take CPU time,
so the app calls these functions in a worker thread.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from longctx.engine.sampling import SamplingParams
from longctx.errors import LongctxError
from longctx.kv.spec import KVSpec
from longctx.server.errors import APIError, bad_request, from_engine_error
from longctx.server.protocol import ChatCompletionRequest, CompletionRequest

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (as vLLM): dividing logits by ~0 overflows
MIN_TOP_P = 1e-6  # smaller top_p values keep the likeliest token only, as this does; they round to 0 in fp32
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
RESERVED_TEMPLATE_KEYS = ("messages", "tools", "add_generation_prompt")


@dataclass
class Settings:
    """What the server's operator chose (the ``longctx serve`` flags that shape requests)."""

    default_kv: str = "full"
    max_choices: int = 128  # prompts x n in one request
    defaults: dict[str, Any] = field(default_factory=dict)  # sampling defaults (temperature, top_p, ...)


@dataclass
class Plan:
    """One request, ready for the engine. ``choices[i]`` = (prompt index, params); choice i is OpenAI's
    ``index`` i (prompt-major: the n choices of prompt 0, then those of prompt 1, ...)."""

    prompts: list[list[int]]
    prompt_texts: list[str]  # for ``echo``
    choices: list[tuple[int, SamplingParams]]
    spec: KVSpec
    include_usage: bool = False
    continuous_usage: bool = False
    echo: bool = False
    logprobs: int | None = None
    return_token_ids: bool = False

    @functools.cached_property
    def spec_text(self) -> str:  # (str(KVSpec) rebuilds the default methods: ~60 us, once per chunk otherwise)
        return str(self.spec)


def sampling_defaults(llm: Any) -> dict[str, Any]:
    """OpenAI's defaults (temperature 1, top_p 1) overridden by the checkpoint's ``generation_config.json``
    (its temperature only where it sets ``do_sample: true``, as Hugging Face reads it)."""
    base = llm.get_default_sampling_params()
    gen = llm.tokenizer.generation_config if llm.tokenizer is not None else {}
    temperature = base.temperature if gen.get("do_sample") is True and gen.get("temperature") is not None else 1.0
    return {"temperature": temperature, "top_p": base.top_p, "top_k": base.top_k, "min_p": base.min_p,
            "repetition_penalty": base.repetition_penalty}


def parse_spec(text: str | None, settings: Settings) -> KVSpec:
    try:
        return KVSpec.parse(settings.default_kv if text is None else text)
    except (LongctxError, ValueError, TypeError) as e:
        raise bad_request(f"invalid kv spec {text!r}: {e}", param="kv", code="invalid_kv_spec") from None


def completion_plan(req: CompletionRequest, llm: Any, settings: Settings) -> Plan:
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix", code="unsupported")
    if req.best_of not in (None, 1, req.n):
        raise bad_request("best_of other than n is not supported", param="best_of", code="unsupported")
    if req.echo and req.logprobs is not None:
        raise bad_request("echo with logprobs (prompt log-probabilities) is not supported", param="echo",
                          code="unsupported")
    spec = parse_spec(req.kv, settings)
    prompts = _completion_prompts(req.prompt, llm)
    texts = [llm.tokenizer.decode(ids) if req.echo and llm.tokenizer is not None else "" for ids in prompts]
    params = _params(req, req.max_tokens, prompts, llm, spec, settings, logprobs=req.logprobs,
                     default_max=COMPLETIONS_DEFAULT_MAX_TOKENS)
    return _plan(req, prompts, texts, params, spec, echo=req.echo, logprobs=req.logprobs)


def chat_plan(req: ChatCompletionRequest, llm: Any, settings: Settings) -> Plan:
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    if llm.tokenizer is None:
        raise bad_request("this model has no tokenizer, so it cannot render chat messages", param="messages")
    kwargs = dict(req.chat_template_kwargs or {})
    for key in RESERVED_TEMPLATE_KEYS:
        if key in kwargs:
            raise bad_request(f"chat_template_kwargs must not set {key!r}", param="chat_template_kwargs")
    spec = parse_spec(req.kv, settings)
    messages = [_message_dict(m) for m in req.messages]
    try:
        text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=req.tools, **kwargs)
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
    except LongctxError as e:
        raise bad_request(str(e), param="messages", code="invalid_messages") from None
    if not ids:
        raise bad_request("the chat template rendered an empty prompt", param="messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = _params(req, req.max_completion_tokens or req.max_tokens, [ids], llm, spec, settings,
                     logprobs=logprobs, default_max=None)
    return _plan(req, [ids], [text], params, spec, logprobs=logprobs)


def _plan(req: Any, prompts: list[list[int]], texts: list[str], params: list[list[SamplingParams]], spec: KVSpec,
          **kwargs: Any) -> Plan:
    opts = req.stream_options
    if opts is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true", param="stream_options")
    choices = [(p, sp) for p, per_prompt in enumerate(params) for sp in per_prompt]
    return Plan(prompts, texts, choices, spec, include_usage=bool(opts and opts.include_usage),
                continuous_usage=bool(opts and opts.continuous_usage_stats), return_token_ids=req.return_token_ids,
                **kwargs)


def _completion_prompts(prompt: Any, llm: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif not prompt:
        raise bad_request("prompt must not be an empty list", param="prompt")
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    out = []
    for item in items:
        try:
            out.append(llm.encode(item))
        except LongctxError as e:
            raise bad_request(f"prompt: {e}", param="prompt") from None
    return out


def _message_dict(m: Any) -> dict[str, Any]:
    """A chat message as the template sees it: text parts joined, ``developer`` read as ``system``."""
    content = m.content
    if isinstance(content, list):
        content = "\n".join(part.text for part in content)
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                           "content": "" if content is None and not m.tool_calls else content}
    for key in ("name", "tool_calls", "tool_call_id"):
        if getattr(m, key) is not None:
            out[key] = getattr(m, key)
    return out


def _params(req: Any, max_tokens: int | None, prompts: list[list[int]], llm: Any, spec: KVSpec,
            settings: Settings, logprobs: int | None, default_max: int | None) -> list[list[SamplingParams]]:
    """n ``SamplingParams`` per prompt (seeds seed, seed + 1, ...), after checking every prompt fits."""
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", param="logit_bias", code="unsupported")
    count = len(prompts) * req.n
    if count > settings.max_choices:
        raise bad_request(f"{len(prompts)} prompt(s) x n={req.n} asks for {count} completions; this server "
                          f"allows at most {settings.max_choices} per request", param="n")
    vocab = llm.config.vocab_size
    bad = [t for t in req.stop_token_ids or () if t >= vocab]
    if bad:
        raise bad_request(f"stop_token_ids must be token ids below the vocabulary size {vocab}, got {bad[:5]}",
                          param="stop_token_ids")
    if req.min_tokens and len(set(req.stop_token_ids or ()) | set(getattr(llm.tokenizer, "stop_ids", ()))) >= vocab:
        raise bad_request("stop_token_ids with min_tokens would ban every token", param="stop_token_ids")
    extends = llm.extends_context(spec)
    limit = llm.max_model_len
    d = settings.defaults
    out = []
    for ids in prompts:
        try:
            llm.check_length(ids, spec)
        except LongctxError as e:
            raise from_engine_error(e) from None
        room = limit - len(ids)
        want = max_tokens if max_tokens is not None else default_max
        if want is None:  # chat without max_tokens: the rest of the context
            want = room if room > 0 else limit
        if not extends and want > room:
            raise APIError(400, f"this model's context is {limit} tokens, but {len(ids) + want} were requested "
                                f"({len(ids)} in the prompt, {want} for the completion); shorten the prompt or "
                                f"lower max_tokens", param="max_tokens", code="context_length_exceeded")
        temperature = d.get("temperature", 1.0) if req.temperature is None else req.temperature
        values = dict(
            max_tokens=want,
            temperature=0.0 if temperature < GREEDY_BELOW else temperature,
            top_p=max(_pick(req.top_p, d, "top_p", 1.0), MIN_TOP_P),
            top_k=_pick(req.top_k, d, "top_k", 0),
            min_p=_pick(req.min_p, d, "min_p", 0.0),
            repetition_penalty=_pick(req.repetition_penalty, d, "repetition_penalty", 1.0),
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            stop=(req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ()),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            logprobs=logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output,
        )
        seed = None if req.seed is None else req.seed % (1 << 63)  # OpenAI takes any int64; torch wants >= 0
        try:
            out.append([SamplingParams(**values, seed=None if seed is None else seed + i) for i in range(req.n)])
        except (ValueError, TypeError, LongctxError) as e:
            raise bad_request(str(e), param=str(e).split(" ", 1)[0]) from None
    return out


def _pick(value: Any, defaults: dict[str, Any], key: str, fallback: Any) -> Any:
    return value if value is not None else defaults.get(key, fallback)
