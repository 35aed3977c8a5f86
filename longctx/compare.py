"""``longctx compare``: one document and question, answered under several KV specs in one batched call.

:func:`run_compare` returns one result dict per spec; :func:`format_table` renders them as a table. The
input helpers (:func:`read_text`, :func:`load_messages`, :func:`parse_specs`, :func:`build_messages`)
raise one-line :class:`LongctxError` messages naming the option at fault.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from longctx.errors import LongctxError

Message = dict[str, Any]
RESULT_KEYS = ("kv", "text", "kv_bytes_held", "kv_bytes_full", "prompt_tokens", "generated_tokens", "ttft_s",
               "tpot_s", "total_s", "finish_reason")


def read_text(path: str, option: str, *, allow_empty: bool = False) -> str:
    """The UTF-8 text of file ``path`` (``-``: standard input), for ``option`` (named in errors)."""
    if path == "-":
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError:
            raise LongctxError(f"{option} -: standard input is not UTF-8 text") from None
        where = f"{option} -: standard input"
    else:
        p = Path(path)
        if not p.is_file():
            raise LongctxError(f"{option} {path}: {'not a file' if p.exists() else 'no such file'}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LongctxError(f"{option} {path}: not UTF-8 text") from None
        except OSError as e:
            raise LongctxError(f"{option} {path}: cannot be read ({e.strerror or e})") from None
        where = f"{option} {path}"
    if not allow_empty and not text.strip():
        raise LongctxError(f"{where} is empty")
    return text


def load_messages(path: str, option: str = "--messages-file") -> list[Message]:
    """Chat messages from a JSON file (``-``: standard input): a non-empty list of ``{"role", "content"}``."""
    text = read_text(path, option)
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as e:
        raise LongctxError(f"{option} {path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else type(messages).__name__
        raise LongctxError(f'{option} {path}: expected a list of {{"role", "content"}} messages, got {got}')
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LongctxError(f"{option} {path}: message {i} must be an object with 'role' and 'content', "
                               f"got {type(m).__name__}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise LongctxError(f"{option} {path}: message {i} needs a 'role' string")
        if not isinstance(m.get("content"), (str, list)):
            raise LongctxError(f"{option} {path}: message {i} needs a 'content' string")
    return messages


def parse_specs(text: str, option: str = "--kv") -> list[str]:
    """KV specs separated by ``;``, each checked (a bad one is a one-line error naming it)."""
    from longctx.kv.spec import KVSpec  # noqa: PLC0415

    specs = [s.strip() for s in text.split(";") if s.strip()]
    if not specs:
        raise LongctxError(f"{option}: no KV spec given; e.g. --kv 'full; snapkv:512; streamingllm:512'")
    for s in specs:
        try:
            KVSpec.parse(s)
        except LongctxError as e:
            raise LongctxError(f"{option}: {e}") from None
    return specs


def build_messages(document: str | None, question: str | None = None, messages: list[Message] | None = None,
                   system: str | None = None, option: str = "--messages-file") -> list[Message]:
    """One conversation: the document then the question as a user turn (after ``system``, if any), or
    ``messages`` with the document prepended to the first user message."""
    if messages is None:
        if question is None or not question.strip():
            raise LongctxError("give a question with --question TEXT or --messages-file FILE")
        user = f"{document.strip()}\n\n{question}" if document else question
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    out = [dict(m) for m in messages]
    if system:
        if out[0]["role"] == "system":
            raise LongctxError(f"--system: {option} already starts with a system message")
        out.insert(0, {"role": "system", "content": system})
    if document:
        first = next((i for i, m in enumerate(out) if m["role"] == "user"), None)
        if first is None:
            raise LongctxError(f"{option}: no user message to prepend the document to")
        content = out[first]["content"]
        if isinstance(content, list):
            out[first]["content"] = [{"type": "text", "text": document.strip()}, *content]
        else:
            out[first]["content"] = f"{document.strip()}\n\n{content}"
    return out


def run_compare(llm: Any, messages: list[Message], specs: list[str], max_tokens: int = 128,  # noqa: ANN401
                progress: bool = False) -> list[dict[str, Any]]:
    """Answer ``messages`` once per KV spec in one batched ``llm.chat`` call; one result dict per spec."""
    from longctx.engine.sampling import SamplingParams  # noqa: PLC0415

    outs = llm.chat([messages] * len(specs), SamplingParams(max_tokens=max_tokens), kv=specs, progress=progress)
    results = []
    for spec, out in zip(specs, outs, strict=True):
        comp, s = out.outputs[0], out.stats
        results.append({
            "kv": spec,
            "text": comp.text,
            "kv_bytes_held": s.kv_bytes_held,
            "kv_bytes_full": s.kv_bytes_full,
            "prompt_tokens": len(out.prompt_token_ids),
            "generated_tokens": s.generated_tokens,
            "ttft_s": s.time_to_first_token,
            "tpot_s": s.time_per_output_token,
            "total_s": s.time_to_first_token + s.time_per_output_token * max(s.generated_tokens - 1, 0),
            "finish_reason": comp.finish_reason,
        })
    return results


def _one_line(text: str, width: int) -> str:
    line = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return line if len(line) <= width else line[: max(width - 3, 0)] + "..."


def format_table(results: list[dict[str, Any]], width: int | None = None) -> str:
    """A text table of :func:`run_compare` results, the answer column cut to fit ``width`` (default: the
    terminal's width)."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    headers = ("spec", "answer", "KV held (MiB)", "% of full", "prompt tok", "TTFT", "total")
    rows = []
    for r in results:
        pct = 100 * r["kv_bytes_held"] / r["kv_bytes_full"] if r["kv_bytes_full"] else 0.0
        rows.append([r["kv"], r["text"], f"{r['kv_bytes_held'] / (1 << 20):.2f}", f"{pct:.1f}%",
                     str(r["prompt_tokens"]), f"{r['ttft_s'] * 1000:.0f} ms", f"{r['total_s']:.2f} s"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    fixed = sum(w for i, w in enumerate(widths) if i != 1) + 2 * (len(headers) - 1)
    widths[1] = max(len(headers[1]), min(max((len(_one_line(row[1], 1 << 30)) for row in rows), default=0),
                                         width - fixed))
    for row in rows:
        row[1] = _one_line(row[1], widths[1])
    right = {2, 3, 4, 5, 6}  # numbers right-aligned

    def fmt(cells: list[str] | tuple[str, ...]) -> str:
        return "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                         for i, c in enumerate(cells)).rstrip()

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(row) for row in rows]
    return "\n".join(lines)
