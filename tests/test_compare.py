"""``longctx compare`` (one document + question under several KV specs, one batched call) and the chat, JSON and
stdin options of ``longctx generate``, run in-process on the tiny llama checkpoint."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from longctx.cli import main
from longctx.compare import RESULT_KEYS, build_messages, format_table
from tests.test_errors import cli_error

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# The tiny tokenizer is byte-level (one token per byte) and the tiny llama's context is 256 tokens: ~180 bytes of
# document plus the chat template and question stay under it, and are far more than streamingllm:32 keeps.
DOCUMENT = " ".join(f"w{i % 10}" for i in range(60)) + "\n"
QUESTION = "Which word?"
SPECS = "full; streamingllm:32"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> Path:  # noqa: ANN001
    return tiny_checkpoint("llama")[0]


@pytest.fixture
def doc(tmp_path: Path) -> Path:
    f = tmp_path / "doc.txt"
    f.write_text(DOCUMENT)
    return f


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in out + err
    return out


def compare(tiny: Path, *argv: str | Path) -> list[str | Path]:
    return ["compare", "--model", tiny, "--quiet", "--max-tokens", "4", *argv]


def compare_json(capsys: pytest.CaptureFixture[str], tiny: Path, *argv: str | Path) -> dict:
    return json.loads(run(capsys, *compare(tiny, "--json", *argv)))


def gen_json(capsys: pytest.CaptureFixture[str], tiny: Path, *argv: str | Path) -> list[dict]:
    out = run(capsys, "generate", "--model", tiny, "--quiet", "--max-tokens", "4", "--json", *argv)
    return [json.loads(line) for line in out.splitlines()]


def write_json(path: Path, value: object) -> Path:
    path.write_text(json.dumps(value))
    return path


# ---- compare -------------------------------------------------------------------------------------------------------
def test_compare_table_has_a_row_per_spec(capsys: pytest.CaptureFixture[str], tiny: Path, doc: Path) -> None:
    out = run(capsys, *compare(tiny, "--document", doc, "--question", QUESTION, "--kv", SPECS))
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["spec", "answer"]
    for header in ("KV held (MiB)", "% of full", "prompt tok", "TTFT", "total"):
        assert header in lines[0]
    assert len(lines) == 4  # header, rule, two rows
    assert lines[2].startswith("full ")
    assert lines[3].startswith("streamingllm:32 ")


def test_compare_json(capsys: pytest.CaptureFixture[str], tiny: Path, doc: Path) -> None:
    data = compare_json(capsys, tiny, "--document", doc, "--question", QUESTION, "--kv", SPECS)
    assert data["model"] == str(tiny)
    results = data["results"]
    assert [r["kv"] for r in results] == ["full", "streamingllm:32"]
    full, streaming = results
    for r in results:
        assert set(RESULT_KEYS) <= set(r)
        assert isinstance(r["text"], str)
        assert r["prompt_tokens"] > len(DOCUMENT)  # the document, the question and the chat template
        assert 1 <= r["generated_tokens"] <= 4
        assert r["finish_reason"] in ("length", "stop")
        assert r["ttft_s"] >= 0 and r["tpot_s"] >= 0
    assert full["prompt_tokens"] == streaming["prompt_tokens"]  # the same prompt for every spec
    assert full["kv_bytes_full"] > 0
    assert full["kv_bytes_held"] > streaming["kv_bytes_held"] > 0
    assert streaming["kv_bytes_held"] < full["kv_bytes_full"] / 2


def test_compare_default_specs_parse(capsys: pytest.CaptureFixture[str], tiny: Path, doc: Path) -> None:
    data = compare_json(capsys, tiny, "--document", doc, "--question", QUESTION)
    assert [r["kv"] for r in data["results"]] == ["full", "snapkv:512", "streamingllm:512"]


def test_compare_document_from_stdin(capsys: pytest.CaptureFixture[str], tiny: Path, doc: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from_file = compare_json(capsys, tiny, "--document", doc, "--question", QUESTION, "--kv", SPECS)
    monkeypatch.setattr(sys, "stdin", io.StringIO(DOCUMENT))
    from_stdin = compare_json(capsys, tiny, "--document", "-", "--question", QUESTION, "--kv", SPECS)
    assert [r["prompt_tokens"] for r in from_stdin["results"]] == [r["prompt_tokens"] for r in from_file["results"]]
    assert [r["text"] for r in from_stdin["results"]] == [r["text"] for r in from_file["results"]]  # greedy


def test_compare_messages_file(capsys: pytest.CaptureFixture[str], tiny: Path, doc: Path, tmp_path: Path) -> None:
    plain = compare_json(capsys, tiny, "--document", doc, "--question", QUESTION, "--kv", SPECS,
                         "--system", "Be brief.")
    msgs = write_json(tmp_path / "m.json", [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": QUESTION}])
    data = compare_json(capsys, tiny, "--document", doc, "--messages-file", msgs, "--kv", SPECS)
    assert len(data["results"]) == 2
    # the document prepended to the first user message renders the same prompt as --document + --question
    assert [r["prompt_tokens"] for r in data["results"]] == [r["prompt_tokens"] for r in plain["results"]]
    assert [r["text"] for r in data["results"]] == [r["text"] for r in plain["results"]]
    no_doc = compare_json(capsys, tiny, "--messages-file", msgs, "--kv", "full")
    # byte tokens: without the document the prompt is shorter by the document and the blank line after it
    assert no_doc["results"][0]["prompt_tokens"] == plain["results"][0]["prompt_tokens"] - len(DOCUMENT.strip()) - 2


def test_build_messages() -> None:
    assert build_messages("doc", "q?", system="s") == [{"role": "system", "content": "s"},
                                                       {"role": "user", "content": "doc\n\nq?"}]
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]
    out = build_messages("doc", messages=msgs)
    assert out[1]["content"] == "doc\n\nq1" and out[3]["content"] == "q2"
    assert msgs[1]["content"] == "q1"  # the input is not modified


def test_format_table_truncates_answer_to_one_line() -> None:
    r = {"kv": "full", "text": "line one\nline two " + "x" * 500, "kv_bytes_held": 1 << 20,
         "kv_bytes_full": 2 << 20, "prompt_tokens": 10, "ttft_s": 0.5, "total_s": 1.0}
    lines = format_table([r], width=80).splitlines()
    assert len(lines) == 3
    assert all(len(line) <= 80 for line in lines)
    assert "line one line two" in lines[2] and "..." in lines[2]
    assert "1.00" in lines[2] and "50.0%" in lines[2] and "500 ms" in lines[2]


def test_compare_errors(capsys: pytest.CaptureFixture[str], tiny: Path, doc: Path, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.txt"
    cli_error(capsys, compare(tiny, "--document", missing, "--question", "q"), f"--document {missing}", "no such file")
    cli_error(capsys, compare(tiny, "--document", tmp_path, "--question", "q"), f"--document {tmp_path}", "not a file")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cli_error(capsys, compare(tiny, "--document", empty, "--question", "q"), f"--document {empty}", "is empty")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    cli_error(capsys, compare(tiny, "--document", "-", "--question", "q"), "--document -", "standard input is empty")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "user",')
    cli_error(capsys, compare(tiny, "--document", doc, "--messages-file", bad), f"--messages-file {bad}",
              "invalid JSON")
    obj = write_json(tmp_path / "obj.json", {"role": "user", "content": "q"})
    cli_error(capsys, compare(tiny, "--document", doc, "--messages-file", obj), "expected a list", "got dict")
    cli_error(capsys, compare(tiny, "--document", doc, "--messages-file", write_json(tmp_path / "e.json", [])),
              "got an empty list")
    strs = write_json(tmp_path / "strs.json", ["hello"])
    cli_error(capsys, compare(tiny, "--document", doc, "--messages-file", strs), "message 0 must be an object",
              "got str")
    norole = write_json(tmp_path / "norole.json", [{"content": "q"}])
    cli_error(capsys, compare(tiny, "--document", doc, "--messages-file", norole), "message 0 needs a 'role'")
    nouser = write_json(tmp_path / "nouser.json", [{"role": "system", "content": "s"}])
    cli_error(capsys, compare(tiny, "--document", doc, "--messages-file", nouser), "no user message")
    cli_error(capsys, compare(tiny, "--document", doc, "--question", "q", "--kv", "full; bogus:12"),
              "--kv: 'bogus:12'", "unknown retain method 'bogus'")
    cli_error(capsys, compare(tiny, "--document", doc, "--question", "q", "--kv", " ; "), "--kv: no KV spec given")
    cli_error(capsys, compare(tiny, "--document", doc), "give a question with --question")
    cli_error(capsys, compare(tiny, "--question", "q"), "give a document with --document")
    cli_error(capsys, compare(tiny, "--document", doc, "--question", "q", "--messages-file", strs), "not both")
    cli_error(capsys, compare(tiny, "--document", doc, "--question", "q", "--max-tokens", "0"), "--max-tokens")


def test_compare_prompt_too_long(capsys: pytest.CaptureFixture[str], tiny: Path, tmp_path: Path) -> None:
    long = tmp_path / "long.txt"
    long.write_text("x" * 300)
    cli_error(capsys, compare(tiny, "--document", long, "--question", "q", "--kv", SPECS), "context is 256")


# ---- generate: --json, --system, --messages-file, --prompt-file - ----------------------------------------------------
def test_generate_json(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    (out,) = gen_json(capsys, tiny, "--prompt", "hello world")
    assert set(out) >= {"text", "token_ids", "prompt_token_ids", "finish_reason", "kv", "stats"}
    assert out["prompt_token_ids"] and 1 <= len(out["token_ids"]) <= 4
    assert out["finish_reason"] in ("length", "stop")
    assert out["stats"]["prompt_tokens"] == len(out["prompt_token_ids"])
    assert out["stats"]["kv_bytes_full"] > 0
    text = run(capsys, "generate", "--model", tiny, "--quiet", "--max-tokens", "4", "--prompt", "hello world")
    assert text == out["text"] + "\n"  # greedy: the same text as without --json
    batch = gen_json(capsys, tiny, "--prompt", "hello", "--prompt", "world")
    assert len(batch) == 2  # one JSON line per prompt


def test_generate_system_and_messages_file(capsys: pytest.CaptureFixture[str], tiny: Path, tmp_path: Path) -> None:
    (chat,) = gen_json(capsys, tiny, "--chat", "--prompt", "hello")
    (system,) = gen_json(capsys, tiny, "--system", "Be brief.", "--prompt", "hello")
    assert len(system["prompt_token_ids"]) > len(chat["prompt_token_ids"]) + len("Be brief.")
    assert system["prompt_token_ids"][-len(chat["prompt_token_ids"]):] == chat["prompt_token_ids"]
    msgs = write_json(tmp_path / "m.json", [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "hello"}])
    (from_file,) = gen_json(capsys, tiny, "--messages-file", msgs)
    assert from_file["prompt_token_ids"] == system["prompt_token_ids"]
    assert from_file["text"] == system["text"]
    user_only = write_json(tmp_path / "u.json", [{"role": "user", "content": "hello"}])
    (with_system,) = gen_json(capsys, tiny, "--messages-file", user_only, "--system", "Be brief.")
    assert with_system["prompt_token_ids"] == system["prompt_token_ids"]


def test_generate_prompt_file_stdin(capsys: pytest.CaptureFixture[str], tiny: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (direct,) = gen_json(capsys, tiny, "--prompt", "hello world")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world"))
    (piped,) = gen_json(capsys, tiny, "--prompt-file", "-")
    assert piped["prompt_token_ids"] == direct["prompt_token_ids"]
    assert piped["text"] == direct["text"]


def test_generate_errors(capsys: pytest.CaptureFixture[str], tiny: Path, tmp_path: Path) -> None:
    gen = ["generate", "--model", tiny, "--quiet"]
    msgs = write_json(tmp_path / "m.json", [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}])
    cli_error(capsys, [*gen, "--messages-file", msgs, "--prompt", "hi"], "--messages-file", "not with them")
    cli_error(capsys, [*gen, "--messages-file", msgs, "--system", "x"], "--system", "already starts with a system")
    cli_error(capsys, [*gen, "--prompt-file", "-", "--prompt-file", "-"], "standard input can be read only once")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    cli_error(capsys, [*gen, "--messages-file", bad], f"--messages-file {bad}", "invalid JSON")
    cli_error(capsys, gen, "--prompt TEXT", "--prompt-file FILE", "--messages-file FILE")
