"""Helpers shared by the task generators: per-sample random streams, scoring, and fitting a context to a length."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from longctx.errors import LongctxError
from longctx.eval.haystack import count_tokens, cut_haystack, place_inserts
from longctx.model.tokenizer import Tokenizer


def sample_rng(task: str, length: int, index: int, seed: int, stream: str = "") -> random.Random:
    """A random stream that depends only on (task, length, sample index, seed, stream name)."""
    return random.Random(f"{task}|{length}|{index}|{seed}|{stream}")


def sample_id(task: str, length: int, index: int, seed: int, extra: str = "") -> str:
    return f"{task}-{length}-{index}{extra}-s{seed}"


def tolerance(length: int) -> int:
    """How far (in tokens) a generated context may land from the requested length before it is refitted."""
    return max(2, length // 1000)


# --- scoring -----------------------------------------------------------------------------------------------------


def _item_pattern(item: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(item.strip()) + r"(?!\w)", re.IGNORECASE)


def contains_item(output: str, item: str) -> bool:
    """Whether ``item`` appears in ``output`` as a whole word (case-insensitive): "Saffron." contains
    "saffron", "saffrons" and "1234567" do not contain "saffron" and "123456"."""
    return bool(item.strip()) and _item_pattern(item).search(output) is not None


def recall(output: str, items: Sequence[str]) -> float:
    """Fraction of ``items`` that :func:`contains_item` finds in ``output`` (1.0 for no items)."""
    if not items:
        return 1.0
    return sum(contains_item(output, it) for it in items) / len(items)


def all_absent(text: str, items: Iterable[str]) -> bool:
    return not any(contains_item(text, it) for it in items)


def draw_distinct(rng: random.Random, draw: Callable[[random.Random], str], n: int, forbidden_text: str = "",
                  taken: Iterable[str] = ()) -> list[str]:
    """``n`` distinct values of ``draw(rng)``, none in ``taken`` and, while that is possible in 50 tries per value,
    none appearing in ``forbidden_text``."""
    seen = {t.lower() for t in taken}
    out: list[str] = []
    tries = 0
    while len(out) < n:
        v = draw(rng)
        tries += 1
        if v.lower() in seen:
            if tries > 10000:
                raise LongctxError(f"cannot draw {n} distinct values")
            continue
        if tries <= 50 * n and forbidden_text and contains_item(forbidden_text, v):
            continue
        seen.add(v.lower())
        out.append(v)
    return out


def random_number(digits: int) -> Callable[[random.Random], str]:
    return lambda rng: str(rng.randrange(10 ** (digits - 1), 10**digits))


# --- fitting a context to a length ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    """A context with inserted sentences, fitted to a length."""

    context: str
    tokens: int  # tokens of context
    haystack_tokens: int  # tokens of the haystack sentences (without the inserts)
    offsets: tuple[int, ...]  # per insert: haystack tokens before it
    positions: tuple[int, ...]  # per insert: haystack sentences before it


def build_haystack_context(
    tokenizer: Tokenizer,
    length: int,
    haystack: str,
    start: int,
    inserts: Sequence[tuple[float, str]],
    prefix: str = "",
    suffix: str = "",
) -> Built:
    """``prefix`` + haystack sentences from sentence ``start`` with ``inserts`` ((depth, sentence)) at their depths
    + ``suffix``, with as many haystack tokens as make the whole ``length`` tokens (within :func:`tolerance`)."""
    fixed = count_tokens(tokenizer, prefix + suffix) + sum(count_tokens(tokenizer, " " + s) for _, s in inserts)
    budget = length - fixed
    tol = tolerance(length)
    best: Built | None = None
    for _ in range(6):
        if budget < 1:
            raise LongctxError(f"a context of {length} tokens is too short for this task "
                               f"(its fixed text alone takes {fixed} tokens)")
        cut = cut_haystack(tokenizer, haystack, budget, start=start)
        placed = place_inserts(cut, inserts)
        context = prefix + placed.text + suffix
        n = count_tokens(tokenizer, context)
        built = Built(context, n, cut.tokens, placed.offsets, placed.positions)
        if best is None or abs(n - length) < abs(best.tokens - length):
            best = built
        if abs(n - length) <= tol:
            break
        budget += length - n
    assert best is not None
    return best


def fit_count(tokenizer: Tokenizer, length: int, build: Callable[[int], str], guess: int,
              min_count: int = 1) -> tuple[str, int, int]:
    """``(text, count, tokens)``: the ``build(count)`` whose token count is closest to ``length`` (searched with
    proportional steps inside a shrinking bracket; ``build`` must grow with ``count``)."""
    tol = tolerance(length)
    base = count_tokens(tokenizer, build(min_count))
    lo, hi = min_count, None  # build(lo) is known to be <= length; build(hi) > length
    if base > length:
        raise LongctxError(f"a context of {length} tokens is too short for this task (the smallest takes {base})")
    best = (build(min_count), min_count, base)
    n = max(guess, min_count + 1)
    for _ in range(24):
        text = build(n)
        t = count_tokens(tokenizer, text)
        if abs(t - length) < abs(best[2] - length):
            best = (text, n, t)
        if abs(t - length) <= tol:
            break
        if t < length:
            lo = max(lo, n)
        else:
            hi = n if hi is None else min(hi, n)
        per_item = max((t - base) / max(n - min_count, 1), 1e-3)
        step = round((length - t) / per_item)
        nxt = n + (step if step != 0 else (1 if t < length else -1))
        upper = hi if hi is not None else nxt + 1
        if not lo < nxt < upper:
            nxt = (lo + upper) // 2 if hi is not None else max(nxt, lo + 1)
        if nxt <= lo or (hi is not None and nxt >= hi):
            break
        n = nxt
    return best
