"""Haystack text for the evaluation tasks: loading it, splitting it into sentences, cutting token-exact windows.

:func:`load_haystack` reads a text file, or every ``*.txt`` file of a folder (sorted by name, concatenated), or
returns a built-in synthetic filler (generated sentences like RULER's "The grass is green. The sky is blue.")
when given ``None``.

:func:`default_corpus` finds a folder of benchmark corpora (``*.txt``): the folder passed to it, else the
environment variable ``LONGCTX_CORPORA`` (an error when set to something that is not a folder), else the
development checkout's ``../shared/data/corpora`` (relative to the working directory, then to the repository
root) when it exists, else ``None``: callers then use the built-in text (the synthetic filler here; the
benchmarks use the packaged ``longctx/data/haystack_persuasion.txt``).

:func:`cut_haystack` takes about ``n`` tokens of whole sentences from a haystack, starting at a chosen (or
seed-dependent) sentence and wrapping around at the end. Haystacks can hold millions of tokens, so the text is
split into sentences once (cached per text) and only the sentences of the window are tokenized; their token
counts are cached per (tokenizer, text), so later cuts from the same region tokenize nothing.
"""

from __future__ import annotations

import bisect
import functools
import os
import random
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longctx.errors import LongctxError
from longctx.model.tokenizer import Tokenizer

CORPORA_ENV = "LONGCTX_CORPORA"  # environment variable naming the corpus folder
DEFAULT_CORPORA = Path("../shared/data/corpora")  # optional fallback: a development checkout's shared corpora
_REPO_ROOT = Path(__file__).resolve().parents[2]

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) followed by whitespace, except
# after common abbreviations and single initials ("Mr. Knightley", "J. Smith").
_SENTENCE_END = re.compile(
    r"(?<=[.!?])(?<!\bMr\.)(?<!\bMrs\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\b[A-Z]\.)\s+"
    r"|(?<=[.!?][\"'\u201d\u2019)\]])\s+"
)
MAX_SENTENCE_WORDS = 80  # longer "sentences" are cut into pieces of this many words
_CACHE_ENTRIES = 8


def default_corpus(folder: str | Path | None = None) -> Path | None:
    """The benchmark corpus folder: ``folder`` if given, else ``$LONGCTX_CORPORA``, else ``../shared/data/corpora``
    (relative to the working directory, else to the repository root) when it exists, else ``None``.

    Raises :class:`LongctxError` when ``folder`` or ``$LONGCTX_CORPORA`` is given but is not a folder.
    """
    for given, what in ((folder, "corpus folder"), (os.environ.get(CORPORA_ENV) or None, CORPORA_ENV)):
        if given is not None:
            path = Path(given).expanduser()
            if not path.is_dir():
                name = f"{what}={given}" if what == CORPORA_ENV else str(path)
                raise LongctxError(f"{name}: no such corpus folder (a folder of *.txt files)")
            return path.resolve()
    for base in _search_bases():
        if (found := (base / DEFAULT_CORPORA).resolve()).is_dir():
            return found
    return None


def _search_bases() -> list[Path]:
    """The working directory (when it still exists) and the repository root."""
    try:
        return [Path.cwd(), _REPO_ROOT]
    except OSError:
        return [_REPO_ROOT]


def load_haystack(source: str | Path | None) -> str:
    """The haystack text of ``source``: a UTF-8 text file, a folder (all its ``*.txt`` files, sorted by name,
    concatenated with blank lines between them), or ``None`` for :func:`synthetic_filler`.

    Raises :class:`LongctxError` naming the path when it is missing, empty, or not UTF-8 text.
    """
    if source is None:
        return synthetic_filler()
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise LongctxError(f"{path}: haystack folder has no *.txt files")
        texts = [t for t in (_read_text(p) for p in files) if t.strip()]
        if not texts:
            raise LongctxError(f"{path}: haystack folder holds only empty *.txt files")
        return "\n\n".join(texts)
    if not path.exists():
        raise LongctxError(f"{path}: no such haystack file or folder")
    text = _read_text(path)
    if not text.strip():
        raise LongctxError(f"{path}: haystack file is empty")
    return text


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LongctxError(f"{path}: haystack file is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise LongctxError(f"{path}: cannot read haystack file ({e.strerror or e})") from None


# --- built-in synthetic filler -------------------------------------------------------------------------------

_THINGS = (
    ("grass", "green"), ("sky", "blue"), ("sun", "yellow"), ("snow", "white"), ("night", "dark"), ("sea", "deep"),
    ("river", "wide"), ("mountain", "tall"), ("road", "long"), ("stone", "heavy"), ("feather", "light"),
    ("fire", "warm"), ("ice", "cold"), ("desert", "dry"), ("forest", "quiet"), ("city", "busy"), ("lemon", "sour"),
    ("honey", "sweet"), ("coffee", "bitter"), ("sand", "soft"), ("moon", "round"), ("wind", "strong"),
    ("rain", "gentle"), ("field", "open"), ("lake", "calm"), ("bread", "fresh"), ("wall", "old"), ("door", "red"),
    ("garden", "bright"), ("cloud", "grey"), ("valley", "green"), ("bridge", "narrow"), ("tower", "high"),
    ("path", "steep"), ("morning", "cool"), ("evening", "still"), ("market", "crowded"), ("village", "small"),
)
_CREATURES = ("fox", "bird", "horse", "cat", "dog", "deer", "owl", "rabbit", "goat", "duck", "bee", "wolf")
_ACTIONS = ("runs through", "rests near", "walks along", "sleeps under", "waits by", "looks over", "wanders across",
            "sings above", "hides behind", "plays beside")
_PLACES = ("the forest", "the river", "the old barn", "the hill", "the meadow", "the garden", "the quiet road",
           "the stone wall", "the orchard", "the lake", "the bridge", "the village square")
_TIMES = ("in the morning", "at noon", "in the evening", "at night", "in spring", "in winter", "after the rain",
          "before dawn", "every day", "in summer")
_FIXED = ("Here we go.", "There and back again.", "The day goes on.", "Time passes slowly.", "All is well.",
          "Nothing changes here.", "The world turns.", "Life goes on as before.")


@functools.lru_cache(maxsize=2)
def synthetic_filler(num_sentences: int = 6000, seed: int = 0) -> str:
    """Deterministic filler prose of simple generated sentences ("The grass is green. The fox runs through the
    forest in the morning. Here we go."), free of digits and of the words the tasks hide."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(num_sentences):
        kind = rng.random()
        if kind < 0.4:
            thing, quality = rng.choice(_THINGS)
            out.append(f"The {thing} is {quality}.")
        elif kind < 0.65:
            out.append(f"The {rng.choice(_CREATURES)} {rng.choice(_ACTIONS)} {rng.choice(_PLACES)}.")
        elif kind < 0.85:
            thing, quality = rng.choice(_THINGS)
            out.append(f"The {thing} was {quality} {rng.choice(_TIMES)}.")
        else:
            out.append(rng.choice(_FIXED))
    return " ".join(out)


# --- sentences ---------------------------------------------------------------------------------------------------


def split_sentences(text: str, max_words: int = MAX_SENTENCE_WORDS) -> list[str]:
    """``text`` with whitespace collapsed, split into sentences; a sentence of more than ``max_words`` words is
    cut into pieces of ``max_words`` words."""
    out: list[str] = []
    for s in _SENTENCE_END.split(" ".join(text.split())):
        if not s:
            continue
        words = s.split(" ")
        if len(words) <= max_words:
            out.append(s)
        else:
            out.extend(" ".join(words[i : i + max_words]) for i in range(0, len(words), max_words))
    return out


_SENTENCES: OrderedDict[str, list[str]] = OrderedDict()


def _cached(cache: OrderedDict, key: Hashable, make: Callable[[], Any],
            still_valid: Callable[[Any], bool] = lambda _: True) -> Any:
    """``cache[key]``, made with ``make()`` when missing or no longer valid; least recently used entries
    beyond ``_CACHE_ENTRIES`` are dropped."""
    entry = cache.get(key)
    if entry is None or not still_valid(entry):
        entry = cache[key] = make()
        while len(cache) > _CACHE_ENTRIES:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return entry


def sentence_pool(text: str) -> list[str]:
    """:func:`split_sentences` of ``text``, cached (the same list object for the same text; do not modify it)."""
    return _cached(_SENTENCES, text, lambda: split_sentences(text))


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Number of tokens of ``text`` (no special tokens added)."""
    return len(tokenizer.encode(text, add_special_tokens=False))


def count_tokens_many(tokenizer: Tokenizer, texts: Sequence[str]) -> list[int]:
    """:func:`count_tokens` of each text, batched through the HF tokenizer when there is one."""
    hf: Any = getattr(tokenizer, "tok", None)
    if hf is not None and hasattr(hf, "encode_batch") and type(tokenizer).encode is Tokenizer.encode:
        return [len(e.ids) for e in hf.encode_batch(list(texts), add_special_tokens=False)]
    return [count_tokens(tokenizer, t) for t in texts]


class _Counts:
    """Token counts of ``" " + sentence`` for the sentences of one (tokenizer, text), filled in on demand."""

    def __init__(self, tokenizer: Tokenizer, pool: list[str]) -> None:
        self.tokenizer_ref = weakref.ref(tokenizer)
        self.pool = pool
        self.counts: list[int] = [-1] * len(pool)

    def get(self, tokenizer: Tokenizer, i: int, lookahead: int) -> int:
        if self.counts[i] < 0:
            idx = [j % len(self.pool) for j in range(i, i + lookahead)]
            idx = [j for j in dict.fromkeys(idx) if self.counts[j] < 0]
            for j, n in zip(idx, count_tokens_many(tokenizer, [" " + self.pool[j] for j in idx]), strict=True):
                self.counts[j] = n
        return self.counts[i]


_COUNTS: OrderedDict[tuple[int, str], _Counts] = OrderedDict()


def _counts_for(tokenizer: Tokenizer, text: str) -> _Counts:
    # keyed by id(): a dead tokenizer's id may be reused, so an entry also checks its weak reference
    return _cached(_COUNTS, (id(tokenizer), text), lambda: _Counts(tokenizer, sentence_pool(text)),
                   lambda entry: entry.tokenizer_ref() is tokenizer)


def num_sentences(text: str) -> int:
    return len(sentence_pool(text))


def haystack_offset(text: str, seed: int | str) -> int:
    """A seed-dependent starting sentence index into ``text``."""
    n = num_sentences(text)
    if n == 0:
        raise LongctxError("haystack text has no sentences")
    return random.Random(f"haystack-offset:{seed}").randrange(n)


@dataclass(frozen=True)
class HaystackCut:
    """Consecutive sentences of a haystack (wrapping around at its end) and their token counts.

    ``token_counts[i]`` is the number of tokens of ``" " + sentences[i]``; the last sentence may be cut short at
    a word boundary (``truncated``) so that the total lands on the requested number of tokens.
    """

    sentences: tuple[str, ...]
    token_counts: tuple[int, ...]
    start: int  # index of the first sentence in sentence_pool(text)
    truncated: bool

    @property
    def tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def text(self) -> str:
        return " ".join(self.sentences)


def cut_haystack(
    tokenizer: Tokenizer,
    text: str,
    num_tokens: int,
    seed: int | str | None = None,
    *,
    start: int | None = None,
    truncate: bool = True,
) -> HaystackCut:
    """About ``num_tokens`` tokens of consecutive sentences of ``text``.

    The window starts at sentence ``start`` if given, else at :func:`haystack_offset` of ``seed``, else at the
    first sentence; it wraps around to the start of the text when it reaches the end. Whole sentences are taken
    while they fit; with ``truncate`` the next one is then cut at a word boundary to fill what is left, so the
    total is ``num_tokens`` up to a word; without, the total is at most ``num_tokens`` (but at least one sentence).
    """
    pool = sentence_pool(text)
    if not pool:
        raise LongctxError("haystack text has no sentences")
    if start is None:
        start = haystack_offset(text, seed) if seed is not None else 0
    start %= len(pool)
    counts = _counts_for(tokenizer, text)
    sentences: list[str] = []
    lengths: list[int] = []
    total = 0
    i = start
    truncated = False
    while total < num_tokens:
        j = i % len(pool)
        per_sentence = total / len(lengths) if lengths else 16.0  # tokenize about as many sentences as needed
        n = counts.get(tokenizer, j, max(16, min(8192, int((num_tokens - total) / max(per_sentence, 1.0) * 1.1))))
        if total + n > num_tokens:
            if truncate:
                piece = _truncate(tokenizer, pool[j], num_tokens - total)
                if piece is not None:
                    sentences.append(piece[0])
                    lengths.append(piece[1])
                    total += piece[1]
                    truncated = True
                    break
            if sentences:
                break
        sentences.append(pool[j])
        lengths.append(n)
        total += n
        i += 1
    return HaystackCut(tuple(sentences), tuple(lengths), start, truncated)


def _truncate(tokenizer: Tokenizer, sentence: str, budget: int) -> tuple[str, int] | None:
    """The longest word prefix of ``sentence`` whose ``" " + prefix`` has at most ``budget`` tokens."""
    words = sentence.split(" ")
    best: tuple[str, int] | None = None
    lo, hi = 1, len(words) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        piece = " ".join(words[:mid])
        n = count_tokens(tokenizer, " " + piece)
        if n <= budget:
            best = (piece, n)
            lo = mid + 1
        else:
            hi = mid - 1
    return best


@dataclass(frozen=True)
class Placed:
    """A haystack cut with sentences inserted at token depths."""

    text: str  # the cut's sentences and the inserts, joined by spaces
    offsets: tuple[int, ...]  # per insert (in the order given): haystack tokens before it
    positions: tuple[int, ...]  # per insert: number of haystack sentences before it


def place_inserts(cut: HaystackCut, inserts: Sequence[tuple[float, str]]) -> Placed:
    """Insert each ``(depth, text)`` at the sentence boundary of ``cut`` closest to ``depth`` of its tokens.

    Inserts at the same boundary keep the order they were given in, so a chain inserted with increasing depths
    stays in order.
    """
    prefix = [0]
    for n in cut.token_counts:
        prefix.append(prefix[-1] + n)
    total = prefix[-1]
    positions: list[int] = []
    for depth, _ in inserts:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        target = depth * total
        k = bisect.bisect_left(prefix, target)
        if k > 0 and (k == len(prefix) or target - prefix[k - 1] <= prefix[k] - target):
            k -= 1
        positions.append(k)
    at: dict[int, list[str]] = {}
    for k, (_, s) in sorted(zip(positions, inserts, strict=True), key=lambda p: (p[0], p[1][0])):
        at.setdefault(k, []).append(s)
    pieces: list[str] = []
    for k in range(len(cut.sentences) + 1):
        pieces.extend(at.get(k, ()))
        if k < len(cut.sentences):
            pieces.append(cut.sentences[k])
    return Placed(" ".join(pieces), tuple(prefix[k] for k in positions), tuple(positions))
