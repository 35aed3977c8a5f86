"""Needle-in-a-haystack prompts: one fact hidden at a chosen depth of a haystack of a chosen length.

The haystack is cut at sentence boundaries from a text the caller gives (the
package ships an excerpt of Jane Austen's *Persuasion*, public domain, as the
built-in default); lengths are measured in tokens of the model's tokenizer.
Built on :mod:`longctx.eval.haystack`; the evaluation harness's ``needle`` task
(:mod:`longctx.eval.tasks.needle`) is the seeded, multi-depth version.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from longctx.eval.haystack import cut_haystack, place_inserts, split_sentences
from longctx.eval.tasks.common import contains_item
from longctx.model.tokenizer import Tokenizer


def builtin_haystack() -> str:
    """The shipped default haystack text (~10K tokens of public-domain prose)."""
    return resources.files("longctx.data").joinpath("haystack_persuasion.txt").read_text()


@dataclass(frozen=True)
class NeedlePrompt:
    text: str  # the user message: haystack with the needle inside, then the question
    answer: str
    depth: float  # requested depth in [0, 1]
    needle_token_offset: int  # tokens of haystack before the needle
    haystack_tokens: int


def sentences(text: str) -> list[str]:
    return split_sentences(text)


def build_needle_prompt(
    tokenizer: Tokenizer,
    num_tokens: int,
    depth: float,
    needle: str = "The secret code word is 'saffron'.",
    question: str = "What is the secret code word mentioned in the text above? Answer with one word.",
    answer: str = "saffron",
    haystack: str | None = None,
) -> NeedlePrompt:
    """A haystack of about ``num_tokens`` tokens (whole sentences from the start of ``haystack``, at most
    ``num_tokens`` unless one sentence is longer) with ``needle`` after ``depth`` of it, then ``question``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    text = haystack or builtin_haystack()
    if not split_sentences(text):
        raise ValueError("haystack text has no sentences")
    cut = cut_haystack(tokenizer, text, num_tokens, start=0, truncate=False)
    placed = place_inserts(cut, [(depth, needle)])
    return NeedlePrompt(text=f"{placed.text}\n\n{question}", answer=answer, depth=depth,
                        needle_token_offset=placed.offsets[0], haystack_tokens=cut.tokens)


def is_correct(output: str, answer: str) -> bool:
    """Whether ``answer`` appears in ``output`` as a whole word, case-insensitive."""
    return contains_item(output, answer)
