"""Incremental detokenization: the text a step adds to a request's output, without decoding it all again.

Each step decodes only a short window of the newest tokens (from the last
point where the text was complete). A window that ends inside a multi-byte
character (the decoder yields U+FFFD) waits for the next token, so streamed
pieces concatenate to the whole output's text.
"""

from __future__ import annotations

from typing import Protocol


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: _Decoder | None) -> None:
        self.tokenizer = tokenizer
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # tokens whose text is already in ``text``
        self.text = ""

    def push(self, ids: list[int]) -> str:
        """The text ``ids`` (every output token so far) add since the last call; also appended to ``text``."""
        if self.tokenizer is None or len(ids) <= self.read_offset:
            return ""
        before = self.tokenizer.decode(ids[self.prefix_offset : self.read_offset])
        after = self.tokenizer.decode(ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing printable yet (a special token, or half a character)
        delta = after[len(before) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        self.text += delta
        return delta
