"""Needle-in-a-haystack prompts: one fact hidden at a chosen depth of a haystack of a chosen length.

The haystack is cut at sentence boundaries from a text the caller gives (the
package ships an excerpt of Jane Austen's *Persuasion*, public domain, as the
built-in default); lengths are measured in tokens of the model's tokenizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from longctx.model.tokenizer import Tokenizer

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


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
    return [s for s in _SENTENCE.split(" ".join(text.split())) if s]


def build_needle_prompt(
    tokenizer: Tokenizer,
    num_tokens: int,
    depth: float,
    needle: str = "The secret code word is 'saffron'.",
    question: str = "What is the secret code word mentioned in the text above? Answer with one word.",
    answer: str = "saffron",
    haystack: str | None = None,
) -> NeedlePrompt:
    """A haystack of about ``num_tokens`` tokens with ``needle`` after ``depth`` of it, then ``question``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    pool = sentences(haystack or builtin_haystack())
    if not pool:
        raise ValueError("haystack text has no sentences")
    chosen: list[str] = []
    lengths: list[int] = []
    total = 0
    i = 0
    while total < num_tokens:
        s = pool[i % len(pool)]
        n = len(tokenizer.encode(" " + s, add_special_tokens=False))
        if total + n > num_tokens and chosen:
            break
        chosen.append(s)
        lengths.append(n)
        total += n
        i += 1
    cut = 0
    acc = 0
    while cut < len(chosen) and acc + lengths[cut] <= depth * total:
        acc += lengths[cut]
        cut += 1
    body = " ".join(chosen[:cut] + [needle] + chosen[cut:])
    return NeedlePrompt(text=f"{body}\n\n{question}", answer=answer, depth=depth, needle_token_offset=acc,
                        haystack_tokens=total)


def is_correct(output: str, answer: str) -> bool:
    return answer.lower() in output.lower()
