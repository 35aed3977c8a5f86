"""RULER-style synthetic tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?", arXiv:2404.06654), generated locally and deterministically from a seed.

* ``niah_multikey``: several "One of the special magic numbers for KEY is: VALUE." needles with distinct keys in
  a haystack; the question asks for the value of one key (the others are distractors).
* ``niah_multivalue``: one key with several values; all must be recalled.
* ``niah_multiquery``: several keys, all asked in one question; recall of their values.
* ``vt`` (variable tracking): chains "VAR A = 12345." "VAR B = VAR A." ... in filler, plus distractor chains from
  other numbers; answer: every variable whose value is the queried number.
* ``cwe`` (common words extraction): a numbered list of words where ten words appear many times and the others
  rarely; answer: the ten most common words.
* ``fwe`` (frequent words extraction): random "coded" words with Zipf-distributed counts; answer: the three most
  frequent (after the dots "....", which the question says to ignore).

Scores are the recall of the expected items: each must appear in the output as a whole word, case-insensitive.
Prompts follow RULER's templates, with the question asking for a bare answer so that small instruct models answer
directly. Lengths count the context (the text before the question) in tokens of the given tokenizer.
"""

from __future__ import annotations

import math
import string
from abc import ABC, abstractmethod
from typing import ClassVar

from longctx.errors import LongctxError
from longctx.eval.haystack import count_tokens, cut_haystack, haystack_offset
from longctx.eval.tasks._words import WORDS
from longctx.eval.tasks.base import Question, Sample
from longctx.eval.tasks.common import (
    build_haystack_context,
    draw_distinct,
    fit_count,
    random_number,
    recall,
    sample_id,
    sample_rng,
)
from longctx.eval.tasks.needle import PASSKEY_FILLER
from longctx.model.tokenizer import Tokenizer


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class _RecallTask:
    name: ClassVar[str]
    max_new_tokens: ClassVar[int]

    def score(self, output: str, question: Question) -> float:
        """Recall of ``question.answers`` in ``output`` (whole words, case-insensitive)."""
        return recall(output, question.answers)


# --- needle-in-a-haystack variants -------------------------------------------------------------------------------

NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.\n\n")
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."


def _draw_key(rng) -> str:  # noqa: ANN001
    return f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"


class _NiahTask(_RecallTask, ABC):
    num_keys: int
    num_values: int
    num_queries: int

    @abstractmethod
    def _question(self, keys: list[str]) -> str:
        """The question asking for ``keys`` (each NIAH variant phrases its own)."""

    def samples(self, tokenizer: Tokenizer, length: int, num_samples: int, seed: int, haystack: str) -> list[Sample]:
        out: list[Sample] = []
        for i in range(num_samples):
            rng = sample_rng(self.name, length, i, seed)
            start = haystack_offset(haystack, f"{self.name}|{length}|{i}|{seed}")
            window = cut_haystack(tokenizer, haystack, length, start=start).text
            keys = draw_distinct(rng, _draw_key, self.num_keys, forbidden_text=window)
            values = draw_distinct(rng, random_number(7), self.num_keys * self.num_values, forbidden_text=window)
            by_key = {k: values[j * self.num_values:(j + 1) * self.num_values] for j, k in enumerate(keys)}
            needles = [NIAH_NEEDLE.format(key=k, value=v) for k in keys for v in by_key[k]]
            rng.shuffle(needles)
            inserts = [(rng.random(), s) for s in needles]
            queried = keys[: self.num_queries]  # keys are drawn at random, so the first ones are a random choice
            answers = tuple(v for k in queried for v in by_key[k])
            built = build_haystack_context(tokenizer, length, haystack, start, inserts, prefix=NIAH_INTRO)
            q = Question(self._question(queried), answers, {
                "keys": tuple(queried), "depths": tuple(sorted(round(d, 3) for d, _ in inserts))})
            out.append(Sample(self.name, sample_id(self.name, length, i, seed), built.context, (q,), length,
                              {"index": i, "seed": seed, "tokens": built.tokens, "needles": tuple(needles)}))
        return out


class NiahMultiKey(_NiahTask):
    """``num_keys`` key-value needles (one asked, the rest distractors); one value to recall."""

    name: ClassVar[str] = "niah_multikey"
    max_new_tokens: ClassVar[int] = 32

    def __init__(self, num_keys: int = 4) -> None:
        self.num_keys, self.num_values, self.num_queries = num_keys, 1, 1

    def _question(self, keys: list[str]) -> str:
        return (f"\n\nWhat is the special magic number for {keys[0]} mentioned in the provided text? "
                "Answer with the number only.")


class NiahMultiValue(_NiahTask):
    """One key with ``num_values`` values scattered in the haystack; all values to recall."""

    name: ClassVar[str] = "niah_multivalue"
    max_new_tokens: ClassVar[int] = 64

    def __init__(self, num_values: int = 4) -> None:
        self.num_keys, self.num_values, self.num_queries = 1, num_values, 1

    def _question(self, keys: list[str]) -> str:
        return (f"\n\nWhat are all the special magic numbers for {keys[0]} mentioned in the provided text? "
                "Answer with the numbers only, separated by commas.")


class NiahMultiQuery(_NiahTask):
    """``num_keys`` keys with one value each, all asked in one question; recall of the values."""

    name: ClassVar[str] = "niah_multiquery"
    max_new_tokens: ClassVar[int] = 64

    def __init__(self, num_keys: int = 4) -> None:
        self.num_keys, self.num_values, self.num_queries = num_keys, 1, num_keys

    def _question(self, keys: list[str]) -> str:
        return (f"\n\nWhat are the special magic numbers for {_join(keys)} mentioned in the provided text? "
                "Answer with one number for each of them, separated by commas.")


# --- variable tracking -----------------------------------------------------------------------------------------

VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


def _draw_var(rng) -> str:  # noqa: ANN001
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


class VariableTracking(_RecallTask):
    """``num_chains`` chains of ``num_hops`` assignments each, from distinct 5-digit numbers, in the repeated
    pass-key noise (``filler="noise"``, as RULER does) or in the given haystack (``filler="haystack"``); the first
    chain is asked for, the others are distractors. Answer: the chain's ``num_hops + 1`` variable names."""

    name: ClassVar[str] = "vt"
    max_new_tokens: ClassVar[int] = 48

    def __init__(self, num_chains: int = 2, num_hops: int = 4, filler: str = "noise") -> None:
        if filler not in ("noise", "haystack"):
            raise ValueError(f"filler must be 'noise' or 'haystack', got {filler!r}")
        self.num_chains, self.num_hops, self.filler = num_chains, num_hops, filler

    def samples(self, tokenizer: Tokenizer, length: int, num_samples: int, seed: int, haystack: str) -> list[Sample]:
        text = PASSKEY_FILLER if self.filler == "noise" else haystack
        out: list[Sample] = []
        for i in range(num_samples):
            rng = sample_rng(self.name, length, i, seed)
            start = 0 if self.filler == "noise" else haystack_offset(text, f"{self.name}|{length}|{i}|{seed}")
            window = cut_haystack(tokenizer, text, length, start=start).text
            names = draw_distinct(rng, _draw_var, self.num_chains * (self.num_hops + 1), forbidden_text=window)
            values = draw_distinct(rng, random_number(5), self.num_chains, forbidden_text=window)
            chains = [names[c * (self.num_hops + 1):(c + 1) * (self.num_hops + 1)] for c in range(self.num_chains)]
            inserts: list[tuple[float, str]] = []
            for chain, value in zip(chains, values, strict=True):
                depths = sorted(rng.random() for _ in chain)
                statements = [f"VAR {chain[0]} = {value}."]
                statements += [f"VAR {chain[h]} = VAR {chain[h - 1]}." for h in range(1, len(chain))]
                inserts += zip(depths, statements, strict=True)
            question = (f"\n\nQuestion: Find all variables that are assigned the value {values[0]} in the text "
                        "above, directly or through other variables. Answer with the variable names only, "
                        "separated by commas.")
            built = build_haystack_context(tokenizer, length, text, start, inserts, prefix=VT_INTRO)
            q = Question(question, tuple(chains[0]), {"value": values[0]})
            out.append(Sample(self.name, sample_id(self.name, length, i, seed), built.context, (q,), length,
                              {"index": i, "seed": seed, "tokens": built.tokens,
                               "chains": tuple(tuple(c) for c in chains), "values": tuple(values)}))
        return out


# --- common words extraction -----------------------------------------------------------------------------------

CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n\n")


class CommonWordsExtraction(_RecallTask):
    """A numbered list of words: ``num_common`` words appear ``freq_common`` times each, the others
    ``freq_uncommon`` times or fewer (RULER: 30 and 3 from 4K tokens, 6 and 1 below; shorter lists use fewer
    repeats, and very long lists repeat the uncommon words more when the word list runs out). Answer: the common
    words."""

    name: ClassVar[str] = "cwe"
    max_new_tokens: ClassVar[int] = 128

    def __init__(self, num_common: int = 10) -> None:
        self.num_common = num_common

    def _plan(self, n: int, length: int) -> tuple[int, int, int]:
        """(repeats of each common word, uncommon words, uncommon items) for a list of ``n`` items."""
        fc, fu = (30, 3) if length >= 4096 else (6, 1)
        if n < self.num_common * (fc + fu):  # short list: half of it common words, the rest once each
            fc, fu = max(2, n // (2 * self.num_common)), 1
        while True:
            rest = n - self.num_common * fc
            if rest < 1:
                raise LongctxError(f"a context of {length} tokens is too short for cwe")
            k = math.ceil(rest / fu)
            if k <= len(WORDS) - self.num_common:
                return fc, k, rest
            fu += 1
            fc = max(fc, 6 * fu)

    def samples(self, tokenizer: Tokenizer, length: int, num_samples: int, seed: int, haystack: str) -> list[Sample]:
        out: list[Sample] = []
        for i in range(num_samples):
            rng = sample_rng(self.name, length, i, seed)
            perm = rng.sample(WORDS, len(WORDS))
            common = perm[: self.num_common]

            def build(n: int, perm: list[str] = perm, common: list[str] = common, i: int = i) -> str:
                fc, k, rest = self._plan(n, length)
                items = [w for w in common for _ in range(fc)]
                uncommon = perm[self.num_common : self.num_common + k]
                items += [w for j, w in enumerate(uncommon) for _ in range(rest // k + (j < rest % k))]
                sample_rng(self.name, length, i, seed, f"shuffle{n}").shuffle(items)
                return CWE_INTRO + "\n".join(f"{j + 1}. {w}" for j, w in enumerate(items))

            min_items = self.num_common * 3
            context, n, tokens = fit_count(tokenizer, length, build, guess=length // 5, min_count=min_items)
            fc, k, _ = self._plan(n, length)
            question = (f"\n\nQuestion: What are the {self.num_common} most common words in the list above? "
                        f"Answer with the {self.num_common} words only, separated by commas.")
            q = Question(question, tuple(common), {"freq_common": fc})
            out.append(Sample(self.name, sample_id(self.name, length, i, seed), context, (q,), length,
                              {"index": i, "seed": seed, "tokens": tokens, "items": n, "uncommon_words": k}))
        return out


# --- frequent words extraction ---------------------------------------------------------------------------------

FWE_INTRO = ("Read the following coded text and track the frequency of each coded word. "
             "Find the {n} most frequently appeared coded words.\n\n")
FWE_NOISE = "...."
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}


def _zeta(alpha: float, terms: int = 10000) -> float:
    head = sum(k**-alpha for k in range(1, terms))
    return head + terms ** (1 - alpha) / (alpha - 1) + terms**-alpha / 2  # Euler-Maclaurin tail


class FrequentWordsExtraction(_RecallTask):
    """Random 6-letter coded words (a ``vocab_size`` vocabulary) whose counts follow Zipf's law with exponent
    ``alpha``; the most frequent "word" is the noise "....". Answer: the three most frequent coded words."""

    name: ClassVar[str] = "fwe"
    max_new_tokens: ClassVar[int] = 48

    def __init__(self, alpha: float = 2.0, vocab_size: int = 2000, word_len: int = 6, num_answers: int = 3) -> None:
        if alpha <= 1.0:
            raise ValueError(f"alpha must be > 1, got {alpha}")
        self.alpha, self.vocab_size, self.word_len, self.num_answers = alpha, vocab_size, word_len, num_answers

    def _counts(self, n: int) -> list[int]:
        """Counts of the vocabulary's words in a text of exactly ``n`` words: rank k (from 1) gets
        ``floor(n * k**-alpha / zeta(alpha))`` and the noise word (rank 1) the rest."""
        z = _zeta(self.alpha)
        counts = [int(n * k**-self.alpha / z) for k in range(1, self.vocab_size + 1)]
        counts[0] += n - sum(counts)
        return counts

    def _min_words(self) -> int:
        """Fewest words for which the ``num_answers + 1`` top counts are strictly ordered (ties would make the
        answer ambiguous) and the last answer appears at least twice."""
        z = _zeta(self.alpha)
        w = [k**-self.alpha / z for k in range(1, self.num_answers + 3)]
        gaps = [1 / (w[k] - w[k + 1]) for k in range(len(w) - 1)]
        return math.ceil(max(*gaps, 2 / w[self.num_answers]))

    def samples(self, tokenizer: Tokenizer, length: int, num_samples: int, seed: int, haystack: str) -> list[Sample]:
        count = _NUMBER_WORDS.get(self.num_answers, str(self.num_answers))
        intro = FWE_INTRO.format(n=count)
        noise_tokens = max(1, count_tokens(tokenizer, " " + FWE_NOISE))
        out: list[Sample] = []
        for i in range(num_samples):
            rng = sample_rng(self.name, length, i, seed)
            vocab = [FWE_NOISE] + draw_distinct(
                rng, lambda r: "".join(r.choice(string.ascii_lowercase) for _ in range(self.word_len)),
                self.vocab_size - 1)

            def build(n: int, extra: int = 0, vocab: list[str] = vocab, i: int = i) -> str:
                counts = self._counts(n)
                counts[0] += extra
                words = [w for w, c in zip(vocab, counts, strict=True) for _ in range(c)]
                sample_rng(self.name, length, i, seed, f"shuffle{n}").shuffle(words)
                return intro + " ".join(words)

            context, n, tokens = fit_count(tokenizer, length, build, guess=length // 4, min_count=self._min_words())
            counts = self._counts(n)
            # Fine-tune with the noise word alone (the most frequent by far, usually one token each).
            if tokens != length and (extra := (length - tokens) // noise_tokens) != 0 and counts[0] + extra > counts[1]:
                fine = build(n, extra)
                fine_tokens = count_tokens(tokenizer, fine)
                if abs(fine_tokens - length) < abs(tokens - length):
                    context, tokens = fine, fine_tokens
                    counts[0] += extra
            answers = tuple(vocab[1 : 1 + self.num_answers])
            question = ("\n\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the "
                        f"{count} most frequently appeared words in the above coded text? Answer with the {count} "
                        "words only, separated by commas.")
            q = Question(question, answers, {"counts": tuple(counts[1 : 2 + self.num_answers])})
            out.append(Sample(self.name, sample_id(self.name, length, i, seed), context, (q,), length,
                              {"index": i, "seed": seed, "tokens": tokens, "words": sum(counts)}))
        return out


RULER_TASKS: tuple[type, ...] = (NiahMultiKey, NiahMultiValue, NiahMultiQuery, VariableTracking,
                                 CommonWordsExtraction, FrequentWordsExtraction)
