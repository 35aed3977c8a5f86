"""Request and response bodies of the HTTP API, in OpenAI's shapes (pydantic), plus longctx's fields.

Requests are validated strictly: a field of the wrong JSON type (``"max_tokens": "8"``, ``"n": true``), a
non-finite number or an unknown field is a 400, as OpenAI answers. Beside OpenAI's parameters a request may
carry longctx's and vLLM's extras: ``kv`` (a KV spec, see ``longctx methods``), ``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``include_stop_str_in_output``,
``return_token_ids`` and, for chat, ``chat_template_kwargs``. Responses echo the spec that ran (``kv``) and
report the KV memory in ``usage.kv_bytes`` (held at the end) and ``usage.kv_bytes_full`` (what a full cache
would hold).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

MAX_N = 128  # OpenAI's bound on n
MAX_LOGPROBS = 20  # OpenAI's bound on top_logprobs
MAX_STOP = 16  # stop strings per request
INT64 = 1 << 63


def _expect(what: str) -> WrapValidator:
    """Replace pydantic's one-error-per-union-member report by one line naming what the field takes."""

    def check(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("invalid_type", "must be {what}", {"what": what}) from None

    return WrapValidator(check)


Prompt = Annotated[str | list[str] | list[int] | list[list[int]],
                   _expect("a string, a list of strings, a list of token ids or a list of token-id lists")]
Stop = Annotated[str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP)] | None,
                 _expect(f"a non-empty string or a list of at most {MAX_STOP} non-empty strings")]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage in every chunk


class _Sampling(_Strict):
    """The parameters both endpoints share."""

    model: str | None = Field(None, description="the served model name (default: the one served)")
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=100)  # past ~100 sampling is uniform anyway
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Stop = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="not supported: only null or {}")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # longctx
    kv: str | None = Field(None, max_length=4096, description="KV method spec for this request, e.g. 'snapkv:1024' "
                           "(default: the server's --kv)")
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)  # further out, logits overflow
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=INT64)]] | None = Field(None, max_length=256)
    include_stop_str_in_output: bool = False
    return_token_ids: bool = Field(False, description="add the generated token ids to each choice (and each "
                                   "stream chunk), as vLLM does")


class CompletionRequest(_Sampling):
    prompt: Prompt
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="only equal to n (or 1) is supported")
    suffix: str | None = Field(None, description="not supported: only null or ''")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


Content = Annotated[str | list[TextPart] | None,
                    _expect("a string, a list of {\"type\": \"text\", \"text\": ...} parts or null")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text"] = Field(description="only 'text' is supported")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto"] | None = Field(None, description="tools are shown to the chat template; "
                                                         "tool calls are returned as text")
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


# ---- responses ----------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    kv_bytes: int = Field(description="KV cache bytes the request's completions held at the end (summed over n)")
    kv_bytes_full: int = Field(description="what a full cache would hold for the same tokens (summed over n)")
    kv_bytes_read_per_step: float | None = Field(
        default=None, description="mean KV bytes one decode step read, when the request's select method narrows "
        "reads (mean over n); absent under select=all")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    token_ids: list[int] | None = Field(None, description="with return_token_ids")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    kv: str = Field(description="the KV spec that ran, in its canonical form")
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    token_ids: list[int] | None = Field(None, description="with return_token_ids")


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    kv: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    kv: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "longctx"
    max_model_len: int
    default_kv: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
