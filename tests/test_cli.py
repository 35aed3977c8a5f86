"""The ``longctx`` command, run in-process: info, methods and generate on a tiny checkpoint (and ``info`` on the
real SmolLM2 GGUF)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from longctx.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")

INFO_KEYS = ("architecture", "layers", "attention heads", "context length", "KV bytes per token")
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
LONG_PROMPT = "hello world " * 10  # 120 byte tokens


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> Path:  # noqa: ANN001
    return tiny_checkpoint("llama")[0]


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def generate(capsys: pytest.CaptureFixture[str], tiny: Path, *argv: str | Path) -> tuple[str, str]:
    code, out, err = cli(capsys, "generate", "--model", tiny, "--quiet", *argv)
    assert code == 0, err
    assert "generating" not in err  # --quiet: no progress bar
    return out, err


def held_at_end(stats: str) -> list[int]:
    """Bytes held at the end of generation, one per request, from ``--stats`` lines."""
    found = re.findall(r"at end ([\d.]+) (B|KiB|MiB|GiB),", stats)
    return [int(float(n) * UNITS[u]) for n, u in found]


# ---- info ----------------------------------------------------------------------------------------------------------
def test_info_tiny_text(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    code, out, err = cli(capsys, "info", tiny)
    assert code == 0 and err == ""
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.splitlines())
    assert rows["architecture"] == "llama"
    assert rows["layers"] == "3"
    assert rows["attention heads"].startswith("4 query / 2 kv, head dim 16")
    assert rows["context length"] == "256"
    assert rows["KV bytes per token"].startswith(f"{2 * 3 * 2 * 16 * 2} ")  # K+V x layers x kv heads x dim x 2 B


def test_info_tiny_json(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    code, out, _ = cli(capsys, "info", tiny, "--json")
    assert code == 0
    info = json.loads(out)
    for key in INFO_KEYS:
        assert key in info
    assert info["layers"] == "3" and info["context length"] == "256"
    assert info["KV bytes per token"].startswith("384 ")


@pytest.mark.real_model
def test_info_smollm2(capsys: pytest.CaptureFixture[str], smollm2_path: Path) -> None:
    code, out, _ = cli(capsys, "info", smollm2_path, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["architecture"] == "llama"
    assert info["layers"] == "30"
    assert info["attention heads"].startswith("9 query / 3 kv, head dim 64")
    assert info["context length"] == "8192"
    assert info["KV bytes per token"].startswith("23040 ")  # 2 (K+V) x 30 layers x 3 kv heads x 64 dim x 2 bytes


# ---- methods -------------------------------------------------------------------------------------------------------
def test_methods_lists_every_method_with_params(capsys: pytest.CaptureFixture[str]) -> None:
    from longctx.kv.registry import AXES, methods, params_of

    code, out, _ = cli(capsys, "methods")
    assert code == 0
    sections = {}
    for block in out.split("\n\n"):
        head = block.split(":", 1)[0]
        if head in AXES:
            sections[head] = block
    assert set(sections) == set(AXES)
    for axis in AXES:
        assert methods(axis), axis
        lines = sections[axis].splitlines()
        for name, cls in methods(axis).items():
            start = next((i for i, ln in enumerate(lines) if ln.split()[:1] == [name] and ln.startswith("  ")), None)
            assert start is not None, f"{axis} method {name} not listed"
            params = params_of(cls)
            listed = lines[start + 1: start + 1 + len(params)]
            for p, line in zip(params, listed, strict=True):
                assert line.strip().startswith(f"{p.name}={p.default!r}"), (axis, name, p.name, line)
    assert "Spec syntax" in out


# ---- generate ------------------------------------------------------------------------------------------------------
def test_generate_prints_text_and_stats(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    out, err = generate(capsys, tiny, "--prompt", "hi", "--max-tokens", "5", "--stats")
    assert out.strip()  # the generated text (random weights: any bytes)
    assert "[kv] spec: retain=full" in err
    assert re.search(r"\[kv\] prompt 2 tok, generated [1-5] tok", err)
    assert re.search(r"\[kv\] held after prefill [\d.]+ \w+, at end [\d.]+ \w+, peak .*full cache would hold", err)
    assert re.search(r"\[time\] first token \d+ ms, [\d.]+ ms per output token", err)
    assert "[kv]" not in out and "[time]" not in out  # stats go to stderr, text to stdout


def test_generate_snapkv_holds_fewer_bytes_than_full(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    _, full = generate(capsys, tiny, "--prompt", LONG_PROMPT, "--max-tokens", "3", "--stats")
    _, snap = generate(capsys, tiny, "--prompt", LONG_PROMPT, "--max-tokens", "3", "--stats", "--kv", "snapkv:16")
    assert "retain=snapkv" in snap and "budget=uniform(tokens=16" in snap
    assert "[kv] budget per layer (tokens): [16, 16, 16]" in snap
    (full_bytes,), (snap_bytes,) = held_at_end(full), held_at_end(snap)
    assert 0 < snap_bytes < full_bytes / 2


def test_generate_prompt_file(capsys: pytest.CaptureFixture[str], tiny: Path, tmp_path: Path) -> None:
    f = tmp_path / "prompt.txt"
    f.write_text(LONG_PROMPT)
    from_file, err = generate(capsys, tiny, "--prompt-file", f, "--max-tokens", "4", "--stats")
    assert "[kv] prompt 120 tok" in err
    inline, _ = generate(capsys, tiny, "--prompt", LONG_PROMPT, "--max-tokens", "4")
    assert from_file == inline  # greedy: the same prompt gives the same text


def test_generate_chat(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    out, err = generate(capsys, tiny, "--prompt", "hi", "--chat", "--max-tokens", "3", "--stats")
    # "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n": 3 special tokens + 18 bytes
    assert "[kv] prompt 21 tok" in err
    assert out.endswith("\n")


def test_generate_batch_of_two_prompts(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    out, err = generate(capsys, tiny, "--prompt", "hi", "--prompt", LONG_PROMPT, "--max-tokens", "3", "--stats",
                        "--seed", "1")
    assert out.startswith("--- prompt 0\n") and "\n--- prompt 1\n" in out
    assert err.count("[kv] spec:") == 2
    assert "[kv] prompt 2 tok" in err and "[kv] prompt 120 tok" in err
    batched = out.split("--- prompt 1\n")[1]
    alone, _ = generate(capsys, tiny, "--prompt", LONG_PROMPT, "--max-tokens", "3")
    assert batched == alone  # batching changes nothing for greedy decoding
