"""The task generators and scorers: depths, lengths, determinism, structure, scoring, registry."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from longctx.errors import LongctxError
from longctx.eval.haystack import count_tokens, default_corpus, load_haystack, split_sentences
from longctx.eval.needle import build_needle_prompt, builtin_haystack, is_correct
from longctx.eval.tasks import GROUPS, TASKS, Question, Sample, get_task, get_tasks
from longctx.eval.tasks.needle import DEFAULT_DEPTHS, PASSKEY_FILLER, PASSKEY_INTRO, NeedleTask, PasskeyTask
from longctx.eval.tasks.ruler import (
    CWE_INTRO,
    FWE_INTRO,
    FWE_NOISE,
    CommonWordsExtraction,
    FrequentWordsExtraction,
    NiahMultiKey,
    NiahMultiQuery,
    NiahMultiValue,
    VariableTracking,
)
from longctx.model.tokenizer import Tokenizer

RULER = ("niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")


@pytest.fixture(scope="session")
def haystacks(synthetic: str) -> list[str]:
    """The synthetic filler, and the benchmark corpora when present."""
    folder = default_corpus()
    return [synthetic] + ([load_haystack(folder)] if folder is not None else [])


def _task(name: str):  # noqa: ANN202
    return NeedleTask(depths=(0.0, 0.5, 1.0)) if name == "needle" else get_task(name)


def _check_depth(tok: Tokenizer, context: str, needle: str, depth: float, prefix: str = "") -> int:
    """Assert that ``needle`` sits within one sentence of ``depth`` of the filler around it; return the filler
    tokens before it."""
    assert context.startswith(prefix) and context.count(needle) == 1
    body = context[len(prefix):]
    pos = body.index(needle)
    before, after = body[:pos].rstrip(" "), body[pos + len(needle):].lstrip(" ")
    filler = " ".join(x for x in (before, after) if x)
    got = count_tokens(tok, before) if before else 0
    ideal = depth * count_tokens(tok, filler)
    prev = split_sentences(before)[-1] if before else ""
    nxt = split_sentences(after)[0] if after else ""
    one_sentence = max(count_tokens(tok, " " + prev), count_tokens(tok, " " + nxt)) + 2
    assert abs(got - ideal) <= one_sentence, (depth, got, ideal, one_sentence)
    return got


# --- needle depth ------------------------------------------------------------------------------------------------


def test_default_depths() -> None:
    assert DEFAULT_DEPTHS == (0.0, 0.11, 0.22, 0.33, 0.44, 0.56, 0.67, 0.78, 0.89, 1.0)
    assert NeedleTask().depths == DEFAULT_DEPTHS


@pytest.mark.parametrize("tokenizer", ["smol_tokenizer", "byte_tokenizer"])
def test_needle_sits_at_requested_depth(request: pytest.FixtureRequest, tokenizer: str, haystacks: list[str]) -> None:
    tok = request.getfixturevalue(tokenizer)
    for hay in haystacks:
        samples = NeedleTask().samples(tok, 2048, 2, 3, hay)
        assert len(samples) == 2 * len(DEFAULT_DEPTHS)
        assert len({s.sample_id for s in samples}) == len(samples)
        for i in range(2):
            mine = [s for s in samples if s.meta["index"] == i]
            assert [s.meta["depth"] for s in mine] == list(DEFAULT_DEPTHS)
            assert len({s.questions[0].answers for s in mine}) == 1  # same fact at every depth
            offsets = []
            for s in mine:
                q = s.questions[0]
                assert q.meta["depth"] == s.meta["depth"]
                got = _check_depth(tok, s.context, q.meta["needle"], q.meta["depth"])
                assert abs(q.meta["needle_token_offset"] - got) <= 2
                offsets.append(got)
            assert offsets == sorted(offsets) and offsets[0] == 0


def test_needle_number_kind(smol_tokenizer: Tokenizer, synthetic: str) -> None:
    (s,) = NeedleTask(depths=(0.3,), kind="number").samples(smol_tokenizer, 1024, 1, 0, synthetic)
    (answer,) = s.questions[0].answers
    assert re.fullmatch(r"\d{7}", answer) and f"The special magic number is: {answer}." in s.context
    with pytest.raises(ValueError, match="kind"):
        NeedleTask(kind="emoji")
    with pytest.raises(ValueError, match="depths"):
        NeedleTask(depths=(0.5, 1.5))


def test_passkey_prompt(smol_tokenizer: Tokenizer) -> None:
    samples = PasskeyTask().samples(smol_tokenizer, 2048, 4, 0, "ignored haystack")
    depths = set()
    for s in samples:
        q = s.questions[0]
        (key,) = q.answers
        assert re.fullmatch(r"\d{5}", key)
        assert q.meta["needle"] == f"The pass key is {key}. Remember it. {key} is the pass key."
        assert q.text.strip() == "What is the pass key?"
        assert s.context.startswith(PASSKEY_INTRO + PASSKEY_FILLER)
        _check_depth(smol_tokenizer, s.context, q.meta["needle"], q.meta["depth"], prefix=PASSKEY_INTRO)
        filler = s.context[len(PASSKEY_INTRO):].replace(q.meta["needle"], "")
        units = split_sentences(PASSKEY_FILLER)
        assert all(any(u.startswith(f) for u in units) for f in split_sentences(filler))  # the last may be cut
        depths.add(q.meta["depth"])
    assert len(depths) == 4


# --- lengths -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
def test_length_within_2_percent(name: str, smol_tokenizer: Tokenizer, byte_tokenizer: Tokenizer,
                                 haystacks: list[str]) -> None:
    task = _task(name)
    cases = [(smol_tokenizer, h) for h in haystacks] + [(byte_tokenizer, haystacks[0])]
    for tok, hay in cases:
        for length in (512, 2048, 4096):
            if name == "fwe" and length == 512 and tok is byte_tokenizer:
                # 74 words of 6 letters (the fewest with an unambiguous top three) take 535 bytes
                with pytest.raises(LongctxError, match="too short"):
                    task.samples(tok, length, 2, 0, hay)
                continue
            samples = task.samples(tok, length, 2, 0, hay)
            for s in samples:
                n = count_tokens(tok, s.context)
                assert abs(n - length) <= 0.02 * length, (name, length, n)
                assert s.length == length and s.meta["tokens"] == n and s.task == name


# --- determinism -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TASKS))
def test_same_seed_same_prompts_other_seed_other_prompts(name: str, smol_tokenizer: Tokenizer,
                                                         haystacks: list[str]) -> None:
    hay = haystacks[-1]
    a = _task(name).samples(smol_tokenizer, 1024, 2, 5, hay)
    b = _task(name).samples(smol_tokenizer, 1024, 2, 5, hay)
    c = _task(name).samples(smol_tokenizer, 1024, 2, 6, hay)
    assert a == b
    assert [s.sample_id for s in a] == [s.sample_id for s in b]
    assert len({s.sample_id for s in a + c}) == len(a) + len(c)
    for x, y in zip(a, c, strict=True):
        assert x.context != y.context
        assert x.questions[0].answers != y.questions[0].answers
    assert a[0].questions[0].answers != a[-1].questions[0].answers  # samples of one seed differ too


# --- structure of the RULER tasks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [NiahMultiKey, NiahMultiValue, NiahMultiQuery])
def test_niah_needles(cls: type, smol_tokenizer: Tokenizer, haystacks: list[str]) -> None:
    for hay in haystacks:
        for s in cls().samples(smol_tokenizer, 2048, 3, 1, hay):
            q = s.questions[0]
            found = re.findall(r"One of the special magic numbers for (\S+) is: (\d{7})\.", s.context)
            assert sorted(found) == sorted(
                (k, v) for k, v in (n[len("One of the special magic numbers for "):-1].split(" is: ")
                                    for n in s.meta["needles"]))
            keys = {k for k, _ in found}
            values = [v for _, v in found]
            assert len(set(values)) == len(values)
            asked = {k: [v for kk, v in found if kk == k] for k in q.meta["keys"]}
            assert sorted(q.answers) == sorted(v for vs in asked.values() for v in vs)
            assert all(k in q.text for k in q.meta["keys"])
            if cls is NiahMultiKey:
                assert len(keys) == 4 and len(q.answers) == 1
            elif cls is NiahMultiValue:
                assert len(keys) == 1 and len(q.answers) == 4
            else:
                assert len(keys) == 4 and len(q.answers) == 4


def test_vt_chains(smol_tokenizer: Tokenizer, synthetic: str) -> None:
    for task in (VariableTracking(), VariableTracking(num_chains=3, num_hops=2, filler="haystack")):
        for s in task.samples(smol_tokenizer, 2048, 3, 2, synthetic):
            q = s.questions[0]
            chains, values = s.meta["chains"], s.meta["values"]
            assert len(chains) == task.num_chains and len(set(values)) == len(values)
            assert q.answers == chains[0] and q.meta["value"] == values[0] and values[0] in q.text
            for chain, value in zip(chains, values, strict=True):
                statements = [f"VAR {chain[0]} = {value}."] + [
                    f"VAR {chain[h]} = VAR {chain[h - 1]}." for h in range(1, len(chain))]
                positions = [s.context.index(st) for st in statements]
                assert positions == sorted(positions)  # each chain reads in order
            assert len(re.findall(r"VAR [A-Z]{5} = ", s.context)) == task.num_chains * (task.num_hops + 1)
    with pytest.raises(ValueError, match="filler"):
        VariableTracking(filler="essay")


@pytest.mark.parametrize("length", [512, 2048, 8192])
def test_cwe_common_words_are_most_common(length: int, smol_tokenizer: Tokenizer) -> None:
    for s in CommonWordsExtraction().samples(smol_tokenizer, length, 2, 0, ""):
        q = s.questions[0]
        assert s.context.startswith(CWE_INTRO)
        lines = s.context[len(CWE_INTRO):].split("\n")
        assert [int(line.split(". ")[0]) for line in lines] == list(range(1, len(lines) + 1))
        counts = Counter(line.split(". ", 1)[1] for line in lines)
        assert len(q.answers) == 10 and set(q.answers) == {w for w, _ in counts.most_common(10)}
        least_common = min(counts[w] for w in q.answers)
        most_other = max(c for w, c in counts.items() if w not in q.answers)
        assert least_common > most_other


@pytest.mark.parametrize("length", [512, 2048, 8192])
def test_fwe_answers_are_most_frequent(length: int, smol_tokenizer: Tokenizer) -> None:
    for s in FrequentWordsExtraction().samples(smol_tokenizer, length, 2, 0, ""):
        q = s.questions[0]
        assert s.context.startswith(FWE_INTRO.format(n="three")) and "'....'" in q.text
        counts = Counter(s.context[len(FWE_INTRO.format(n="three")):].split(" "))
        ranked = [w for w, _ in counts.most_common()]
        assert ranked[0] == FWE_NOISE
        assert list(q.answers) == ranked[1:4]
        assert counts[ranked[3]] > counts[ranked[4]]  # no tie at the cut
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in q.answers)


# --- scoring -------------------------------------------------------------------------------------------------------


def _q(*answers: str) -> Question:
    return Question("?", answers)


def test_score_needle_and_passkey() -> None:
    for task in (NeedleTask(), NeedleTask(kind="number"), PasskeyTask()):
        word = _q("saffron")
        assert task.score("The secret code word is 'saffron'.", word) == 1.0
        assert task.score("SAFFRON", word) == 1.0
        assert task.score("Saffron!", word) == 1.0
        assert task.score("saffrons", word) == 0.0
        assert task.score("turquoise", word) == 0.0
        assert task.score("", word) == 0.0
        number = _q("58213")
        assert task.score("The pass key is 58213.", number) == 1.0
        assert task.score("58213", number) == 1.0
        assert task.score("582130", number) == 0.0
        assert task.score("5821", number) == 0.0
        assert task.score("58 213", number) == 0.0


def test_score_niah() -> None:
    one = _q("8375840")
    assert NiahMultiKey().score("8375840", one) == 1.0
    assert NiahMultiKey().score("The special magic number for x-y is: 8375840.", one) == 1.0
    assert NiahMultiKey().score("8375841", one) == 0.0
    four = _q("3069856", "8405807", "7510447", "7233463")
    for task in (NiahMultiValue(), NiahMultiQuery()):
        assert task.score("7233463, 7510447, 8405807 and 3069856", four) == 1.0  # any order
        assert task.score("3069856, 8405807", four) == 0.5
        assert task.score("3069856 3069856 3069856 3069856", four) == 0.25  # repeats count once
        assert task.score("30698560, 84058071", four) == 0.0
        assert task.score("I don't know.", four) == 0.0


def test_score_vt() -> None:
    q = _q("QTZRX", "DVCSK", "TEILO", "EKRLG", "ZHPEU")
    vt = VariableTracking()
    assert vt.score("QTZRX, DVCSK, TEILO, EKRLG, ZHPEU", q) == 1.0
    assert vt.score("qtzrx, dvcsk, teilo, ekrlg and zhpeu", q) == 1.0  # case-insensitive
    assert vt.score("VAR QTZRX and VAR DVCSK", q) == pytest.approx(0.4)
    assert vt.score("QTZRXA DVCSKTEILO", q) == 0.0


def test_score_cwe_and_fwe() -> None:
    words = ("teach", "bathing", "weary", "subject", "louder", "pleasing", "language", "disagreeable", "courting",
             "secondary")
    q = _q(*words)
    cwe = CommonWordsExtraction()
    assert cwe.score("Answer: " + ", ".join(words), q) == 1.0
    assert cwe.score(", ".join(w.upper() for w in words[:7]), q) == pytest.approx(0.7)
    assert cwe.score("teaching, bathings, wearying", q) == 0.0
    coded = _q("kavyai", "ugfcae", "bolafc")
    fwe = FrequentWordsExtraction()
    assert fwe.score("kavyai, ugfcae, bolafc", coded) == 1.0
    assert fwe.score("Kavyai, UGFCAE, ....", coded) == pytest.approx(2 / 3)
    assert fwe.score("...., imntwq, aknveb", coded) == 0.0


@pytest.mark.parametrize("name", list(TASKS))
def test_score_generated_samples(name: str, smol_tokenizer: Tokenizer, synthetic: str) -> None:
    task = _task(name)
    s = task.samples(smol_tokenizer, 1024, 1, 0, synthetic)[0]
    q = s.questions[0]
    assert task.score(" ".join(q.answers), q) == 1.0
    assert task.score(", ".join(a.upper() for a in q.answers), q) == 1.0
    assert task.score("", q) == 0.0
    assert 0.0 < task.score(q.answers[0], q) <= 1.0
    assert s.prompt(q) == s.context + q.text and q.text.startswith("\n\n")
    assert type(task).max_new_tokens > 0


# --- registry ------------------------------------------------------------------------------------------------------


def test_registry() -> None:
    assert set(TASKS) == {"needle", "passkey", *RULER}
    assert GROUPS["ruler"] == RULER
    for name, cls in TASKS.items():
        task = get_task(name)
        assert isinstance(task, cls) and task.name == name
    assert [t.name for t in get_tasks("ruler")] == list(RULER)
    assert [t.name for t in get_tasks("needle, ruler,cwe")] == ["needle", *RULER]
    assert [t.name for t in get_tasks(["passkey", "needle"])] == ["passkey", "needle"]
    with pytest.raises(LongctxError, match="unknown task 'niah'.*needle.*passkey.*ruler"):
        get_task("niah")
    with pytest.raises(LongctxError, match="group"):
        get_task("ruler")
    with pytest.raises(LongctxError, match="unknown task"):
        get_tasks("needle,bogus")
    with pytest.raises(LongctxError, match="no task"):
        get_tasks(" , ")


def test_too_short_lengths_are_refused(smol_tokenizer: Tokenizer, synthetic: str) -> None:
    for name in TASKS:
        with pytest.raises(LongctxError, match="too short"):
            _task(name).samples(smol_tokenizer, 8, 1, 0, synthetic)


# --- the legacy needle prompt builder --------------------------------------------------------------------------


def test_build_needle_prompt(byte_tokenizer: Tokenizer, smol_tokenizer: Tokenizer) -> None:
    for tok in (byte_tokenizer, smol_tokenizer):
        for depth in (0.0, 0.5, 0.95, 1.0):
            p = build_needle_prompt(tok, 2000, depth)
            assert p.answer == "saffron" and p.depth == depth
            assert p.text.endswith("\n\nWhat is the secret code word mentioned in the text above? "
                                   "Answer with one word.")
            assert 1500 <= p.haystack_tokens <= 2000
            body = p.text.rsplit("\n\n", 1)[0]
            got = _check_depth(tok, body, "The secret code word is 'saffron'.", depth)
            assert abs(p.needle_token_offset - got) <= 2
            assert body.replace("The secret code word is 'saffron'. ", "").startswith(
                split_sentences(builtin_haystack())[0])
    custom = build_needle_prompt(byte_tokenizer, 300, 0.5, needle="The key is 42.", question="Key?", answer="42",
                                 haystack="Short text. Another one.")
    assert "The key is 42." in custom.text and custom.text.endswith("\n\nKey?")
    with pytest.raises(ValueError, match="depth"):
        build_needle_prompt(byte_tokenizer, 100, 1.5)


def test_is_correct() -> None:
    assert is_correct("The code word is Saffron.", "saffron")
    assert not is_correct("saffrons", "saffron")
    assert not is_correct("no idea", "saffron")


def test_sample_is_hashable_shape() -> None:
    s = Sample("t", "t-1", "ctx", (Question("\n\nq", ("a",)),), 10)
    assert s.prompt(s.questions[0]) == "ctx\n\nq"
