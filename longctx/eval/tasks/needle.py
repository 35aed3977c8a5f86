"""Single-needle tasks: ``needle`` (one fact at each of several depths of a haystack) and ``passkey`` (the classic
pass-key retrieval prompt of Mohtashami & Jaggi, 2023, "Landmark Attention", arXiv:2305.16300)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from longctx.eval.haystack import cut_haystack, haystack_offset
from longctx.eval.tasks._words import CODE_WORDS
from longctx.eval.tasks.base import Question, Sample
from longctx.eval.tasks.common import (
    build_haystack_context,
    contains_item,
    draw_distinct,
    random_number,
    sample_id,
    sample_rng,
)
from longctx.model.tokenizer import Tokenizer

DEFAULT_DEPTHS: tuple[float, ...] = tuple(round(i / 9, 2) for i in range(10))  # 0.0, 0.11, ..., 0.89, 1.0

_NEEDLES = {
    "word": ("The secret code word is '{answer}'.",
             "What is the secret code word mentioned in the text above? Answer with one word."),
    "number": ("The special magic number is: {answer}.",
               "What is the special magic number mentioned in the text above? Answer with the number only."),
}


class NeedleTask:
    """One fact — a secret code word (``kind="word"``) or a 7-digit magic number (``kind="number"``) drawn from
    the seed — hidden at each depth of ``depths`` in a haystack cut from a seed-dependent offset.

    Sample ``i`` at every depth uses the same haystack window and the same fact, so depths compare like with
    like. ``samples`` returns ``len(depths) * num_samples`` samples; each question's ``meta`` holds the
    ``depth``, the haystack tokens before the needle (``needle_token_offset``) and ``haystack_tokens``.
    """

    name: ClassVar[str] = "needle"
    max_new_tokens: ClassVar[int] = 24

    def __init__(self, depths: Sequence[float] = DEFAULT_DEPTHS, kind: str = "word") -> None:
        if kind not in _NEEDLES:
            raise ValueError(f"kind must be one of {', '.join(_NEEDLES)}, got {kind!r}")
        if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
            raise ValueError(f"depths must be a non-empty list of values in [0, 1], got {list(depths)}")
        self.depths = tuple(float(d) for d in depths)
        self.kind = kind

    def samples(self, tokenizer: Tokenizer, length: int, num_samples: int, seed: int, haystack: str) -> list[Sample]:
        needle_tpl, question = _NEEDLES[self.kind]
        out: list[Sample] = []
        for i in range(num_samples):
            rng = sample_rng(self.name, length, i, seed)
            start = haystack_offset(haystack, f"{self.name}|{length}|{i}|{seed}")
            draw = (lambda r: r.choice(CODE_WORDS)) if self.kind == "word" else random_number(7)
            window = cut_haystack(tokenizer, haystack, length, start=start).text
            (answer,) = draw_distinct(rng, draw, 1, forbidden_text=window)
            needle = needle_tpl.format(answer=answer)
            for depth in self.depths:
                built = build_haystack_context(tokenizer, length, haystack, start, [(depth, needle)])
                q = Question(f"\n\n{question}", (answer,), {
                    "depth": depth, "needle": needle, "needle_token_offset": built.offsets[0],
                    "haystack_tokens": built.haystack_tokens})
                out.append(Sample(self.name, sample_id(self.name, length, i, seed, f"-d{depth:.2f}"), built.context,
                                  (q,), length, {"index": i, "seed": seed, "depth": depth, "tokens": built.tokens}))
        return out

    def score(self, output: str, question: Question) -> float:
        return float(all(contains_item(output, a) for a in question.answers))


PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n\n")


class PasskeyTask:
    """The pass-key prompt: the filler ``PASSKEY_FILLER`` repeated, with "The pass key is NNNNN. Remember it.
    NNNNN is the pass key." at a random depth (both drawn from the seed); the question is "What is the pass key?"."""

    name: ClassVar[str] = "passkey"
    max_new_tokens: ClassVar[int] = 16

    def samples(self, tokenizer: Tokenizer, length: int, num_samples: int, seed: int, haystack: str) -> list[Sample]:
        out: list[Sample] = []
        for i in range(num_samples):
            rng = sample_rng(self.name, length, i, seed)
            key = random_number(5)(rng)
            depth = round(rng.random(), 3)
            needle = f"The pass key is {key}. Remember it. {key} is the pass key."
            built = build_haystack_context(tokenizer, length, PASSKEY_FILLER, 0, [(depth, needle)],
                                           prefix=PASSKEY_INTRO)
            q = Question("\n\nWhat is the pass key?", (key,), {
                "depth": depth, "needle": needle, "needle_token_offset": built.offsets[0],
                "haystack_tokens": built.haystack_tokens})
            out.append(Sample(self.name, sample_id(self.name, length, i, seed), built.context, (q,), length,
                              {"index": i, "seed": seed, "depth": depth, "tokens": built.tokens}))
        return out

    def score(self, output: str, question: Question) -> float:
        return float(all(contains_item(output, a) for a in question.answers))
