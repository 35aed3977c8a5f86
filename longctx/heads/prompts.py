"""Synthetic probe prompts, as token ids: copy prompts (a needle in a haystack, then asked to be repeated) and
multi-passkey prompts (DuoAttention's calibration data).

With a tokenizer the haystack is the shared corpora (``longctx.eval.haystack.default_corpus``; the built-in
synthetic filler when none is found) and needles are random words; without one (random-weight models) every
token is drawn at random from the vocabulary. Everything is drawn from a seeded ``random.Random``.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any

from longctx.eval.tasks._words import WORDS


@dataclass(frozen=True)
class CopyPrompt:
    """``ids`` = haystack with ``needle`` at ``needle_start``, a request to repeat it, then the needle again from
    ``copy_start`` (teacher-forced): the query at ``copy_start + t - 1`` predicts ``needle[t]``."""

    ids: list[int]
    needle: list[int]
    needle_start: int
    copy_start: int


@dataclass(frozen=True)
class PasskeyPrompt:
    """``ids`` = haystack with passkey sentences at random depths, a question, the answer; ``labels``: the
    positions whose hidden states are supervised (those predicting the answer's tokens)."""

    ids: list[int]
    labels: list[int]


@functools.lru_cache(maxsize=4)
def _corpus_ids(tokenizer: Any) -> tuple[int, ...]:
    from longctx.eval.haystack import default_corpus, load_haystack  # noqa: PLC0415

    text = load_haystack(default_corpus())
    return tuple(tokenizer.encode(text[:300_000], add_special_tokens=False))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


class PromptMaker:
    """Builds probe prompts for one model (``tokenizer`` may be None: random token ids below ``vocab_size``)."""

    def __init__(self, tokenizer: Any, vocab_size: int, bos_id: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.bos = [bos_id] if bos_id is not None else []

    def haystack(self, n: int, rng: random.Random) -> list[int]:
        if n <= 0:
            return []
        if self.tokenizer is None:
            return [rng.randrange(self.vocab_size) for _ in range(n)]
        ids = _corpus_ids(self.tokenizer)
        if len(ids) <= n:
            return list((ids * (n // max(len(ids), 1) + 1))[:n])
        start = rng.randrange(len(ids) - n)
        return list(ids[start : start + n])

    def text(self, text: str, rng: random.Random, n_random: int) -> list[int]:
        """``text`` encoded, or ``n_random`` random ids without a tokenizer."""
        if self.tokenizer is None:
            return [rng.randrange(self.vocab_size) for _ in range(n_random)]
        return _encode(self.tokenizer, text)

    def copy_prompt(self, length: int, depth: float, needle_words: int, rng: random.Random) -> CopyPrompt:
        """A copy prompt of about ``length`` tokens with the needle at ``depth`` (0..1) of the haystack."""
        words = " ".join(rng.choice(WORDS) for _ in range(needle_words))
        needle = self.text(f" {words}.", rng, needle_words * 2)
        intro = self.text("Remember the secret sentence that appears in the text below.\n\n", rng, 8)
        marker_open = self.text("\nThe secret sentence is:", rng, 4)
        marker_close = self.text("\n", rng, 1)
        question = self.text("\n\nRepeat the secret sentence exactly. The secret sentence is:", rng, 8)
        fixed = len(self.bos) + len(intro) + len(marker_open) + len(marker_close) + len(question) + 2 * len(needle)
        hay = self.haystack(max(length - fixed, 8), rng)
        cut = round(depth * len(hay))
        before = self.bos + intro + hay[:cut] + marker_open
        needle_start = len(before)
        body = before + needle + marker_close + hay[cut:] + question
        return CopyPrompt(ids=body + needle, needle=needle, needle_start=needle_start, copy_start=len(body))

    def passkey_prompt(self, length: int, num_passkeys: int, digits: int, rng: random.Random) -> PasskeyPrompt:
        """DuoAttention-style multi-passkey sample: passkeys at random depths, all to be recited at the end."""
        keys = ["".join(rng.choice("0123456789") for _ in range(digits)) for _ in range(num_passkeys)]
        sentences = [self.text(f" The pass key {i + 1} is {k}. Remember it. {k} is pass key {i + 1}.", rng,
                               digits + 6) for i, k in enumerate(keys)]
        question = self.text("\n\nWhat are the pass keys? Answer with all of them in order. The pass keys are:",
                             rng, 10)
        answer = self.text(" " + ", ".join(keys) + ".", rng, num_passkeys * digits)
        fixed = len(self.bos) + sum(map(len, sentences)) + len(question) + len(answer)
        hay = self.haystack(max(length - fixed, 8), rng)
        cuts = sorted(rng.randrange(len(hay) + 1) for _ in sentences)
        ids, prev = list(self.bos), 0
        for cut, sent in zip(cuts, sentences, strict=True):
            ids += hay[prev:cut] + sent
            prev = cut
        ids += hay[prev:] + question
        start = len(ids)
        ids += answer
        return PasskeyPrompt(ids=ids, labels=list(range(start - 1, len(ids) - 1)))
