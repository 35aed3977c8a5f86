"""Haystack loading, sentence splitting and token-exact cutting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from longctx.errors import LongctxError
from longctx.eval import haystack as H
from longctx.eval.haystack import (
    count_tokens,
    cut_haystack,
    default_corpus,
    load_haystack,
    place_inserts,
    split_sentences,
    synthetic_filler,
)
from longctx.model.tokenizer import Tokenizer

# --- loading -----------------------------------------------------------------------------------------------------


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(LongctxError, match=re.escape(str(missing))):
        load_haystack(missing)
    with pytest.raises(LongctxError, match=re.escape(str(missing))):
        load_haystack(str(missing))


def test_empty_file_is_named(tmp_path: Path) -> None:
    f = tmp_path / "empty.txt"
    f.write_text("  \n\n ")
    with pytest.raises(LongctxError, match=re.escape(str(f)) + ".*empty"):
        load_haystack(f)


def test_non_utf8_file_is_named(tmp_path: Path) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\u00e9 au lait. ".encode("latin-1") * 10)
    with pytest.raises(LongctxError, match=re.escape(str(f)) + ".*UTF-8"):
        load_haystack(f)
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.txt").write_text("Fine text here.")
    (folder / "b.txt").write_bytes(b"\xff\xfe bad bytes.")
    with pytest.raises(LongctxError, match=re.escape(str(folder / "b.txt"))):
        load_haystack(folder)


def test_folder_without_text_files_is_named(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("Not a txt file.")
    with pytest.raises(LongctxError, match=re.escape(str(tmp_path)) + ".*no \\*.txt"):
        load_haystack(tmp_path)
    (tmp_path / "blank.txt").write_text("\n")
    with pytest.raises(LongctxError, match=re.escape(str(tmp_path)) + ".*empty"):
        load_haystack(tmp_path)


def test_folder_concatenates_sorted_txt_files(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("Second file. It has two sentences.\n")
    (tmp_path / "a.txt").write_text("First file.")
    (tmp_path / "c.md").write_text("Ignored.")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_text("Not read: subfolders are ignored.")
    text = load_haystack(tmp_path)
    assert text.index("First file.") < text.index("Second file.")
    assert "Ignored" not in text and "subfolders" not in text
    assert split_sentences(text) == ["First file.", "Second file.", "It has two sentences."]


def test_file_haystack_round_trips(tmp_path: Path) -> None:
    f = tmp_path / "h.txt"
    f.write_text("Caf\u00e9 society. Another sentence!\n", encoding="utf-8")
    assert load_haystack(f) == "Caf\u00e9 society. Another sentence!\n"


def test_none_gives_synthetic_filler() -> None:
    text = load_haystack(None)
    assert text == synthetic_filler()
    assert "The grass is green." in text and "Persuasion" not in text and "Anne" not in text
    assert not re.search(r"\d", text)
    pool = split_sentences(text)
    assert len(pool) >= 5000 and len(set(pool)) > 300


def test_default_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found = default_corpus()
    assert found is None or found.is_dir()
    (tmp_path / "shared" / "data" / "corpora").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert default_corpus() in ((tmp_path / "shared" / "data" / "corpora").resolve(), found)


# --- sentences and cuts ------------------------------------------------------------------------------------------


def test_split_sentences_keeps_abbreviations_and_quotes() -> None:
    text = 'Mr. Knightley came in.  "Is it so?" said she. J. Smith left! Then\nnothing happened... The end'
    assert split_sentences(text) == ["Mr. Knightley came in.", '"Is it so?"', "said she.", "J. Smith left!",
                                     "Then nothing happened...", "The end"]
    long = " ".join(["word"] * 200) + "."
    assert [len(s.split()) for s in split_sentences(long)] == [80, 80, 40]


@pytest.mark.parametrize("n", [100, 777, 3000])
def test_cut_is_token_exact_and_seeded(byte_tokenizer: Tokenizer, synthetic: str, n: int) -> None:
    a = cut_haystack(byte_tokenizer, synthetic, n, seed=1)
    longest_word = max(len(w) for w in synthetic.split())
    assert n - longest_word - 1 < a.tokens <= n  # the last sentence is cut at a word boundary
    assert count_tokens(byte_tokenizer, " " + a.text) == a.tokens
    assert a == cut_haystack(byte_tokenizer, synthetic, n, seed=1)
    assert a.start != cut_haystack(byte_tokenizer, synthetic, n, seed=2).start
    b = cut_haystack(byte_tokenizer, synthetic, n, seed=1, truncate=False)
    assert b.tokens <= n and not b.truncated and b.sentences == a.sentences[: len(b.sentences)]


def test_cut_wraps_around(byte_tokenizer: Tokenizer) -> None:
    text = "One fish. Two fish. Red fish."
    cut = cut_haystack(byte_tokenizer, text, 100, start=2)
    assert cut.sentences[:4] == ("Red fish.", "One fish.", "Two fish.", "Red fish.")
    assert cut.tokens == 100


class _CountingTokenizer:
    """Wraps a tokenizer and counts the characters it is asked to encode."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.chars = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.chars += len(text)
        return self.inner.encode(text, add_special_tokens=add_special_tokens)


def test_cut_tokenizes_only_its_window(byte_tokenizer: Tokenizer) -> None:
    big = synthetic_filler(50_000, seed=7)  # ~1.5M tokens of the byte-level tokenizer
    counting = _CountingTokenizer(byte_tokenizer)
    cut = cut_haystack(counting, big, 2000, seed=3)  # type: ignore[arg-type]
    assert 1985 < cut.tokens <= 2000
    first = counting.chars
    assert first < 20 * 2000, "the cut tokenized far more than its window"
    again = cut_haystack(counting, big, 2000, seed=3)  # type: ignore[arg-type]
    assert again == cut and counting.chars - first < 1000  # counts are cached; only the truncation re-encodes
    H._SENTENCES.pop(big, None)


def test_place_inserts_at_depths(byte_tokenizer: Tokenizer) -> None:
    cut = cut_haystack(byte_tokenizer, "Aaaa. Bbbb. Cccc. Dddd.", 24, start=0)  # 4 sentences of 6 tokens
    assert cut.token_counts == (6, 6, 6, 6)
    placed = place_inserts(cut, [(0.0, "X."), (0.5, "Y."), (1.0, "Z."), (0.49, "W."), (0.8, "V.")])
    assert placed.text == "X. Aaaa. Bbbb. W. Y. Cccc. V. Dddd. Z."  # same boundary: by depth
    assert placed.offsets == (0, 12, 24, 12, 18)
    assert placed.positions == (0, 2, 4, 2, 3)
    with pytest.raises(ValueError, match="depth"):
        place_inserts(cut, [(1.5, "X.")])
