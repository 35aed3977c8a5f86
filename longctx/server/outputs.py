"""Engine outputs in OpenAI's response shapes: whole responses, stream chunks, usage and log-probabilities.

One :class:`Formatter` per HTTP request keeps what streaming needs between chunks (log-probabilities and
text offsets already sent, per choice). Both endpoints share it; ``chat`` selects the chat shapes
(``message`` / ``delta``, ``logprobs.content``) over the legacy completion ones (``text``, ``logprobs``
with ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``).

Log-probabilities: the engine records, per generated token, the sampled token and the k most likely ones.
Completions return that dict as ``top_logprobs`` (OpenAI: "up to logprobs + 1 elements"); chat returns the
k most likely, sorted, as ``top_logprobs`` and the sampled one as the entry itself.
"""

from __future__ import annotations

import time
from typing import Any

from longctx.engine.request import RequestOutput
from longctx.server.errors import APIError
from longctx.server.inputs import Plan

FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length"}
LOGPROB_FLOOR = -9999.0  # JSON has no -inf: impossible tokens get this (as vLLM)


class TokenTexts:
    """Token id -> its text (special tokens included) and its bytes, cached: a vocabulary is decoded once at
    most. A token holding part of a multi-byte character decodes to U+FFFD; its ``bytes`` are then read from
    the vocabulary entry (byte-level BPE's printable alphabet, or SentencePiece's ``<0xHH>``), so a client
    can join the bytes of consecutive tokens into the character, as OpenAI's ``bytes`` field intends."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> str:
        return self._entry(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return self._entry(token_id)[1]

    def _entry(self, token_id: int) -> tuple[str, list[int]]:
        entry = self._cache.get(token_id)
        if entry is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else ""
            raw = self._raw_bytes(token_id) if "\ufffd" in text else None
            entry = self._cache[token_id] = (text, list(raw if raw is not None else text.encode("utf-8")))
        return entry

    def _raw_bytes(self, token_id: int) -> bytes | None:
        from longctx.model.gguf_tokenizer import byte_alphabet  # noqa: PLC0415

        piece = getattr(getattr(self.tokenizer, "tok", None), "id_to_token", lambda _: None)(token_id)
        if not piece:
            return None
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                return None
        inverse = {ch: b for b, ch in byte_alphabet().items()}
        if all(ch in inverse for ch in piece):
            return bytes(inverse[ch] for ch in piece)
        return None


class Formatter:
    def __init__(self, plan: Plan, request_id: str, model: str, chat: bool, texts: TokenTexts) -> None:
        self.plan, self.id, self.model, self.chat, self.texts = plan, request_id, model, chat, texts
        self.created = int(time.time())
        n = len(plan.choices)
        self._sent_tokens = [0] * n  # generated tokens already sent (and their log-probabilities)
        self._offset = [len(plan.prompt_texts[p]) if plan.echo else 0 for p, _ in plan.choices]
        self._echoed = [False] * n

    # ---- whole responses -----------------------------------------------------------------------------
    def response(self, finals: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for i, out in enumerate(finals):
            comp = out.outputs[0]
            _check_error(out)
            lps = self._logprobs(i, comp.token_ids, comp.logprobs, 0) if self.plan.logprobs is not None else None
            reason = FINISH_REASONS.get(comp.finish_reason, "stop")
            if self.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": comp.text}, "logprobs": lps,
                          "finish_reason": reason}
            else:
                text = (self.plan.prompt_texts[self.plan.choices[i][0]] if self.plan.echo else "") + comp.text
                choice = {"index": i, "text": text, "logprobs": lps, "finish_reason": reason}
            if self.plan.return_token_ids:
                choice["token_ids"] = list(comp.token_ids)
            choices.append(choice)
        obj = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "kv": self.plan.spec_text, "choices": choices, "usage": self.usage(finals)}

    def usage(self, outs: list[RequestOutput | None]) -> dict[str, int | float]:
        """Prompt tokens once per prompt (as OpenAI counts); completion tokens and KV bytes summed over choices."""
        prompt = sum(len(ids) for ids in self.plan.prompts)
        done = [o for o in outs if o is not None]
        completion = sum(len(o.outputs[0].token_ids) for o in done)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "kv_bytes": sum(o.stats.kv_bytes_held for o in done),
                "kv_bytes_full": sum(o.stats.kv_bytes_full for o in done),
                **_read_per_step(done)}

    # ---- streams --------------------------------------------------------------------------------------
    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, int | float] | None = None) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "kv": self.plan.spec_text,
               "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def first_chunks(self) -> list[dict[str, Any]]:
        """Chat streams open every choice with the assistant role (OpenAI's first chunk)."""
        if not self.chat:
            return []
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(len(self.plan.choices))]

    def chunk(self, i: int, out: RequestOutput, last: list[RequestOutput | None]) -> dict[str, Any] | None:
        """The chunk for one output of choice ``i`` (None when it adds nothing); ``last`` holds every
        choice's latest output (for ``continuous_usage_stats``)."""
        _check_error(out)
        comp = out.outputs[0]
        text = comp.text_delta
        if self.plan.echo and not self._echoed[i]:
            self._echoed[i] = True
            text = self.plan.prompt_texts[self.plan.choices[i][0]] + text
        start = self._sent_tokens[i]
        new = comp.new_token_ids
        self._sent_tokens[i] = start + len(new)
        lps = self._logprobs(i, new, comp.logprobs, start) if self.plan.logprobs is not None and new else None
        reason = FINISH_REASONS.get(comp.finish_reason, "stop") if out.finished else None
        ids = self.plan.return_token_ids and bool(new)
        if not text and lps is None and reason is None and not ids:
            return None
        if self.chat:
            delta = {"content": text} if text or reason is None else {}
            choice = {"index": i, "delta": delta, "logprobs": lps, "finish_reason": reason}
        else:
            choice = {"index": i, "text": text, "logprobs": lps, "finish_reason": reason}
        if self.plan.return_token_ids:
            choice["token_ids"] = list(new)
        return self._chunk([choice], self.usage(last) if self.plan.continuous_usage else None)

    def usage_chunk(self, last: list[RequestOutput | None]) -> dict[str, Any]:
        return self._chunk([], self.usage(last))

    # ---- log-probabilities ----------------------------------------------------------------------------
    def _logprobs(self, i: int, ids: list[int], entries: list[dict[int, float]] | None, start: int
                  ) -> dict[str, Any] | None:
        """Log-probabilities of generated tokens ``ids`` (the tokens from number ``start`` on)."""
        if entries is None:
            return None
        rows = list(zip(ids, entries[start : start + len(ids)], strict=False))
        k = self.plan.logprobs or 0
        if self.chat:
            content = []
            for tid, entry in rows:
                top = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
                content.append({**self._token(tid, entry[tid]),
                                "top_logprobs": [self._token(t, lp) for t, lp in top]})
            return {"content": content, "refusal": None}
        tokens, values, tops, offsets = [], [], [], []
        for tid, entry in rows:
            text = self.texts(tid)
            tokens.append(text)
            values.append(_finite(entry[tid]))
            tops.append({self.texts(t): _finite(lp) for t, lp in sorted(entry.items(), key=lambda kv: -kv[1])})
            offsets.append(self._offset[i])
            self._offset[i] += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _token(self, tid: int, logprob: float) -> dict[str, Any]:
        text = self.texts(tid)
        return {"token": text, "logprob": _finite(logprob), "bytes": self.texts.bytes(tid)}


def _finite(value: float) -> float:
    return value if value >= LOGPROB_FLOOR else LOGPROB_FLOOR  # also maps NaN (every comparison is False)


def _check_error(out: RequestOutput) -> None:
    if not out.finished:
        return
    reason = out.outputs[0].finish_reason
    if reason == "error":
        raise APIError(500, f"the engine failed on this request: {out.error}", type="server_error",
                       code="engine_error")
    if reason == "abort":  # the engine aborted it: only a shutdown does that to a request with a client
        raise APIError(503, "the request was aborted: the server is shutting down", type="service_unavailable",
                       code="shutting_down")


def _read_per_step(done: list[RequestOutput]) -> dict[str, float]:
    """``kv_bytes_read_per_step`` (mean over the choices) when a select method narrowed reads."""
    reads = [o.stats.kv_bytes_read_per_step for o in done if o.stats.kv_bytes_read_per_step is not None]
    return {"kv_bytes_read_per_step": sum(reads) / len(reads)} if reads else {}
