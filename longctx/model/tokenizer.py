"""Tokenizer facade: encode/decode, special tokens, stop ids and the chat template.

Wraps a HF ``tokenizers.Tokenizer`` (from ``tokenizer.json`` or built from GGUF
metadata) together with what ``tokenizer_config.json`` and
``generation_config.json`` add: the jinja2 chat template, BOS/EOS strings and
the ids that end generation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
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
        self.chat_template: str | None = cfg.get("chat_template")
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        eos: list[int] = []
        gen_eos = gen.get("eos_token_id")
        for source in (gen_eos if isinstance(gen_eos, list) else [gen_eos], list(model_eos_ids)):
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
        if isinstance(cfg.get("chat_template"), list):  # named templates: take "default"
            named = {t["name"]: t["template"] for t in cfg["chat_template"]}
            cfg["chat_template"] = named.get("default")
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

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role", "content"}]) with the checkpoint's jinja2 chat template."""
        if not self.chat_template:
            raise LongctxError("this model has no chat template; run without --chat")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise LongctxError(f"chat template error: {message}")

        env.globals["raise_exception"] = raise_exception
        try:
            template = env.from_string(self.chat_template)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as e:
            raise LongctxError(f"chat template error: {e}") from None

    def encode_chat(self, user_text: str, system: str | None = None) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user_text}
        ]
        text = self.apply_chat_template(messages)
        # The template already wrote any BOS it wants.
        return self.encode(text, add_special_tokens=False)


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
