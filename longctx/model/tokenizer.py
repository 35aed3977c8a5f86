"""Tokenizer facade: encode/decode, special tokens, stop ids and the chat template.

Wraps a HF ``tokenizers.Tokenizer`` (from ``tokenizer.json`` or built from GGUF
metadata) together with what ``tokenizer_config.json`` and
``generation_config.json`` add: the jinja2 chat template, BOS/EOS strings and
the ids that end generation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import jinja2.utils
from tokenizers import Tokenizer as HFTokenizer

from longctx.errors import CheckpointError, LongctxError


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised
        return value.get("content")
    return value


class Tokenizer:
    """Text <-> token ids for one model, plus chat formatting and stop ids."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        tokenizer_config: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        model_eos_ids: tuple[int, ...] = (),
    ) -> None:
        self.tok = tokenizer
        cfg = tokenizer_config or {}
        gen = generation_config or {}
        self.generation_config: dict[str, Any] = dict(gen)  # sampling defaults (LLM.get_default_sampling_params)
        self.chat_template: str | None = cfg.get("chat_template")
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        eos: list[int] = []
        gen_eos = gen.get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        if not all(i is None or (isinstance(i, int) and not isinstance(i, bool) and i >= 0) for i in gen_eos):
            raise CheckpointError(f"generation_config.json: eos_token_id must be a token id or a list of token ids, "
                                  f"got {gen.get('eos_token_id')!r}")
        for source in (gen_eos, list(model_eos_ids)):
            eos.extend(int(i) for i in source if i is not None)
        if self.eos_token is not None and (eos_id := self.tok.token_to_id(self.eos_token)) is not None:
            eos.append(eos_id)
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))
        self.bos_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None

    @classmethod
    def from_folder(cls, folder: Path, model_eos_ids: tuple[int, ...] = ()) -> Tokenizer:
        path = folder / "tokenizer.json"
        if not path.exists():
            raise CheckpointError(f"{folder}: no tokenizer.json (needed to turn text into tokens)")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise CheckpointError(f"{path}: cannot be read as a tokenizer: {e}") from None
        cfg = _read_json(folder / "tokenizer_config.json")
        template_file = folder / "chat_template.jinja"
        if not cfg.get("chat_template") and template_file.exists():
            cfg["chat_template"] = template_file.read_text()
        cfg["chat_template"] = _pick_template(cfg.get("chat_template"), folder / "tokenizer_config.json")
        return cls(tok, cfg, _read_json(folder / "generation_config.json"), model_eos_ids)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render ``messages`` with the checkpoint's jinja2 chat template, as transformers does.

        The template runs in jinja2's immutable sandbox with HF's extras (``{% break %}``/``{% continue %}``,
        the non-escaping ``tojson`` filter, ``raise_exception`` and ``strftime_now``). ``tools`` and any
        ``template_kwargs`` (e.g. ``enable_thinking=False``) are passed to the template. Rendering is limited
        to ``MAX_TEMPLATE_OUTPUT_CHARS`` characters and ``MAX_TEMPLATE_SECONDS`` seconds; every failure is a
        one-line :class:`LongctxError`.
        """
        if not self.chat_template:
            raise LongctxError("this model has no chat template; run without --chat")
        _check_messages(messages)
        context: dict[str, Any] = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            **template_kwargs,
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
        }
        return _render_template(self.chat_template, context)

    def encode_messages(
        self, messages: list[dict[str, Any]], tools: list[dict] | None = None, **template_kwargs: Any
    ) -> list[int]:
        """Render ``messages`` with the chat template (generation prompt added) and encode the text."""
        text = self.apply_chat_template(messages, add_generation_prompt=True, tools=tools, **template_kwargs)
        # The template already wrote any BOS it wants.
        return self.encode(text, add_special_tokens=False)

    def encode_chat(self, user_text: str, system: str | None = None) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user_text}
        ]
        return self.encode_messages(messages)


MAX_TEMPLATE_OUTPUT_CHARS = 4_000_000
"""Most characters a chat template may render."""
MAX_TEMPLATE_SECONDS = 5.0
"""Longest a chat template may take to compile and render."""


def _template_error(message: str) -> LongctxError:
    return LongctxError(f"chat template error: {message}")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise _template_error(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _template_error(f"messages[{i}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str):
            raise _template_error(f"messages[{i}]['role'] must be a str, got {type(role).__name__}")
        content = message.get("content")  # may be absent (e.g. an assistant turn with only tool calls)
        if content is not None and not isinstance(content, (str, list)):
            raise _template_error(
                f"messages[{i}]['content'] must be a str, a list of parts or None, got {type(content).__name__}"
            )


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' tojson: unlike jinja2's, it neither sorts keys nor HTML-escapes.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _raise_exception(message: str) -> None:
    raise _template_error(str(message))


class _DeadlineRange:
    """``range`` for templates: lazy, and each iteration checks the render deadline."""

    def __init__(self, deadline: float, *args: int) -> None:
        self._range = range(*args)
        if len(self._range) > jinja2.sandbox.MAX_RANGE:
            raise OverflowError(f"range too big, maximum size for range is {jinja2.sandbox.MAX_RANGE}")
        self._deadline = deadline

    def __iter__(self) -> Iterator[int]:
        for i in self._range:
            _check_deadline(self._deadline)
            yield i

    def __reversed__(self) -> Iterator[int]:
        for i in reversed(self._range):
            _check_deadline(self._deadline)
            yield i

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, index: Any) -> Any:
        return self._range[index]

    def __contains__(self, value: Any) -> bool:
        return value in self._range

    def __repr__(self) -> str:
        return repr(self._range)


class _TemplateDict:
    """``dict`` for templates, as transformers gives it: callable, without attribute access to the type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's ``namespace`` refusing underscore-prefixed attributes, as transformers does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}"
            )


def _check_deadline(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise _template_error(f"rendering took longer than {MAX_TEMPLATE_SECONDS} s")


def _render_template(source: str, context: dict[str, Any]) -> str:
    deadline = time.monotonic() + MAX_TEMPLATE_SECONDS
    limit = MAX_TEMPLATE_OUTPUT_CHARS
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = lambda *args: _DeadlineRange(deadline, *args)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    chunks: list[str] = []
    size = 0
    try:
        template = env.from_string(source)
        stream = template.generate(**context)
        try:
            for chunk in stream:
                size += len(chunk)
                if size > limit:
                    raise _template_error(f"output exceeds {limit} characters")
                _check_deadline(deadline)
                chunks.append(chunk)
        finally:
            stream.close()
    except LongctxError:
        raise
    except Exception as e:  # anything the template does wrong (not KeyboardInterrupt): one line for the user
        lines = str(e).strip().splitlines()
        detail = lines[0] if lines else ""
        if len(detail) > 200:
            detail = detail[:197] + "..."
        raise _template_error(f"{type(e).__name__}: {detail}" if detail else type(e).__name__) from None
    return "".join(chunks)


def _pick_template(value: Any, where: Path) -> str | None:
    """The chat template from ``tokenizer_config.json``: a string, or a list of {"name", "template"} of
    which "default" is used (as Hugging Face does)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named: dict[str, str] = {}
        for i, item in enumerate(value):
            if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                    and isinstance(item.get("template"), str)):
                raise CheckpointError(f"{where}: chat_template[{i}] must be an object with string 'name' and "
                                      f"'template', got {str(item)[:80]!r}")
            named[item["name"]] = item["template"]
        return named.get("default")
    raise CheckpointError(f"{where}: chat_template must be a string or a list of named templates, "
                          f"got {type(value).__name__}")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
