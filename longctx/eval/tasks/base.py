"""The task interface of the evaluation harness.

A task turns (tokenizer, length in tokens, sample index, seed, haystack text)
into :class:`Sample` s — a shared context plus one or more questions, each
with its expected answers — and scores a model's output for a question. All
generation is local and deterministic from the seed.

Several questions may share one context (RULER multi-query, needle depths do
not): the runner prefills a shared context once per KV spec and forks it.

The user message for a question is ``context + question.text`` verbatim
(:meth:`Sample.prompt`): a question's text starts with its own separator
(``"\n\n"``), and ``Sample.length`` counts the context's tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from longctx.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class Question:
    """One question about a context: the text appended after it and the expected answers."""

    text: str
    answers: tuple[str, ...]  # all must appear for full credit (recall) unless the task says otherwise
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"depth": 0.5}


@dataclass(frozen=True)
class Sample:
    """A context and its questions. ``sample_id`` is stable across runs (task, length, index, seed)."""

    task: str
    sample_id: str
    context: str  # the user-message text before the question
    questions: tuple[Question, ...]
    length: int  # requested context length in tokens
    meta: dict[str, Any] = field(default_factory=dict)

    def prompt(self, question: Question) -> str:
        """The user-message text for ``question``: the context, then the question's text (which starts with
        its separator)."""
        return self.context + question.text


class Task(Protocol):
    """A generator + scorer. ``name`` is what ``--tasks`` accepts."""

    name: ClassVar[str]
    max_new_tokens: ClassVar[int]

    def samples(self, tokenizer: Tokenizer, length: int, num_samples: int, seed: int, haystack: str) -> list[Sample]:
        """``num_samples`` samples of about ``length`` context tokens, deterministic in ``seed``."""
        ...

    def score(self, output: str, question: Question) -> float:
        """Score in [0, 1] of ``output`` for ``question`` (exact match / recall of the expected items)."""
        ...
