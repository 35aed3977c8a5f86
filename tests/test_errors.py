"""User errors: each gives one clear ``longctx: error: ...`` line naming the problem, exit status 2, no traceback.

Broken checkpoints are copies of a tiny llama checkpoint with one thing edited.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from longctx.cli import main
from longctx.errors import CheckpointError, LongctxError, PromptTooLongError, UnsupportedArchitectureError
from longctx.model.loader import load_model, read_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TENSOR = "model.layers.1.self_attn.k_proj.weight"  # [num_kv_heads * head_dim, hidden] = [32, 64]
TOO_LONG = "x" * 300  # 300 byte tokens; the tiny llama's context is 256


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> Path:  # noqa: ANN001
    return tiny_checkpoint("llama")[0]


@pytest.fixture
def broken(tiny: Path, tmp_path: Path) -> Callable[[Callable[[Path], object]], Path]:
    """``broken(edit)``: a copy of the tiny checkpoint with ``edit(folder)`` applied."""

    count = iter(range(100))

    def make(edit: Callable[[Path], object]) -> Path:
        folder = tmp_path / f"ckpt{next(count)}"
        shutil.copytree(tiny, folder)
        edit(folder)
        return folder

    return make


def edit_config(**changes: object) -> Callable[[Path], None]:
    """An edit that sets (or, for value ``...``, deletes) fields of config.json."""

    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is ...:
                del cfg[key]
            else:
                cfg[key] = value
        (folder / "config.json").write_text(json.dumps(cfg))

    return edit


def edit_weights(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        state = load_file(folder / "model.safetensors")
        change(state)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})

    return edit


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str | Path], *details: str) -> str:
    """Run the CLI in-process, expecting a user error; return its message."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors exit from inside parse_args
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    assert out == ""
    assert err.startswith("longctx: error: "), err
    assert err.count("\n") == 1, f"want one line, got: {err!r}"
    for detail in details:
        assert detail in err, f"{detail!r} not in {err!r}"
    return err


def gen(model: str | Path, *argv: str | Path) -> list[str | Path]:
    return ["generate", "--model", model, "--quiet", "--max-tokens", "2", *argv]


# ---- the model path and its files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["info", "generate"])
def test_missing_model_path(capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str) -> None:
    missing = tmp_path / "no-such-model"
    argv = ["info", missing] if command == "info" else gen(missing, "--prompt", "hi")
    cli_error(capsys, argv, str(missing), "no such file or folder")


def test_folder_without_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cli_error(capsys, ["info", tmp_path], str(tmp_path), "no config.json")
    cli_error(capsys, gen(tmp_path, "--prompt", "hi"), str(tmp_path), "no config.json")


def test_config_invalid_json(capsys: pytest.CaptureFixture[str], broken) -> None:  # noqa: ANN001
    folder = broken(lambda f: (f / "config.json").write_text('{"model_type": "llama",'))
    cli_error(capsys, ["info", folder], str(folder / "config.json"), "invalid JSON")


def test_config_not_an_object(capsys: pytest.CaptureFixture[str], broken) -> None:  # noqa: ANN001
    folder = broken(lambda f: (f / "config.json").write_text("[1, 2]"))
    cli_error(capsys, ["info", folder], str(folder / "config.json"), "expected a JSON object, got list")


def test_config_not_utf8(capsys: pytest.CaptureFixture[str], broken) -> None:  # noqa: ANN001
    folder = broken(lambda f: (f / "config.json").write_bytes(b"\xff\xfe{}"))
    cli_error(capsys, ["info", folder], str(folder / "config.json"), "invalid JSON")


def test_unsupported_model_type(capsys: pytest.CaptureFixture[str], broken) -> None:  # noqa: ANN001
    folder = broken(edit_config(model_type="gpt2"))
    cli_error(capsys, ["info", folder], "config.json", "'gpt2'", "not supported",
              "llama, mistral, qwen2, qwen3, gemma3")
    with pytest.raises(UnsupportedArchitectureError):
        read_config(folder)


def test_missing_model_type(capsys: pytest.CaptureFixture[str], broken) -> None:  # noqa: ANN001
    folder = broken(edit_config(model_type=...))
    cli_error(capsys, ["info", folder], "'model_type' is missing", "supported: llama")


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"])
def test_config_missing_required_field(capsys: pytest.CaptureFixture[str], broken, field: str) -> None:  # noqa: ANN001
    folder = broken(edit_config(**{field: ...}))
    cli_error(capsys, ["info", folder], str(folder / "config.json"), f"required field {field!r} is missing")


@pytest.mark.parametrize(("field", "value"), [("hidden_size", "64"), ("num_attention_heads", 0),
                                              ("max_position_embeddings", 2.5), ("head_dim", True)])
def test_config_field_of_wrong_type(capsys: pytest.CaptureFixture[str], broken, field: str, value: object) -> None:  # noqa: ANN001
    folder = broken(edit_config(**{field: value}))
    cli_error(capsys, ["info", folder], f"field {field!r} must be a positive integer, got {value!r}")


def test_config_inconsistent_fields(capsys: pytest.CaptureFixture[str], broken) -> None:  # noqa: ANN001
    folder = broken(edit_config(num_key_value_heads=3))
    cli_error(capsys, ["info", folder], "num_attention_heads (4)", "num_key_value_heads (3)")
    folder = broken(edit_config(layer_types=["full_attention"]))  # 3 layers
    cli_error(capsys, gen(folder, "--prompt", "hi"), "'layer_types'", "3 layers")


def test_config_bad_rope(capsys: pytest.CaptureFixture[str], broken) -> None:  # noqa: ANN001
    folder = broken(edit_config(rope_parameters=5))
    cli_error(capsys, ["info", folder], "'rope_parameters' must be an object")
    folder = broken(edit_config(rope_parameters={"rope_type": "weird"}))
    cli_error(capsys, ["info", folder], "rope type 'weird' is not supported", "yarn")


def test_config_other_bad_value_is_still_one_line(capsys: pytest.CaptureFixture[str], broken) -> None:  # noqa: ANN001
    folder = broken(edit_config(rms_norm_eps="tiny"))
    cli_error(capsys, ["info", folder], str(folder / "config.json"), "invalid config", "'tiny'")


def test_no_safetensors(capsys: pytest.CaptureFixture[str], broken) -> None:  # noqa: ANN001
    folder = broken(lambda f: (f / "model.safetensors").unlink())
    cli_error(capsys, gen(folder, "--prompt", "hi"), str(folder), "no *.safetensors")


def test_corrupt_safetensors(capsys: pytest.CaptureFixture[str], broken) -> None:  # noqa: ANN001
    folder = broken(lambda f: (f / "model.safetensors").write_bytes(bytes(range(256)) * 8))
    cli_error(capsys, gen(folder, "--prompt", "hi"), str(folder / "model.safetensors"), "corrupt")


def test_truncated_safetensors(capsys: pytest.CaptureFixture[str], broken) -> None:  # noqa: ANN001
    def truncate(f: Path) -> None:
        data = (f / "model.safetensors").read_bytes()
        (f / "model.safetensors").write_bytes(data[: len(data) // 2])

    folder = broken(truncate)
    cli_error(capsys, gen(folder, "--prompt", "hi"), str(folder / "model.safetensors"), "corrupt")


def test_missing_tensor(capsys: pytest.CaptureFixture[str], broken) -> None:  # noqa: ANN001
    folder = broken(edit_weights(lambda sd: sd.pop(TENSOR)))
    cli_error(capsys, gen(folder, "--prompt", "hi"), str(folder), "missing tensors", TENSOR)


def test_wrong_tensor_shape(capsys: pytest.CaptureFixture[str], broken) -> None:  # noqa: ANN001
    folder = broken(edit_weights(lambda sd: sd.update({TENSOR: torch.zeros(3, 64)})))
    err = cli_error(capsys, gen(folder, "--prompt", "hi"), str(folder), TENSOR, "(3, 64)", "(32, 64)")
    assert "expected (32, 64)" in err
    with pytest.raises(CheckpointError, match=TENSOR):
        load_model(folder)


def test_unexpected_tensor(capsys: pytest.CaptureFixture[str], broken) -> None:  # noqa: ANN001
    folder = broken(edit_weights(lambda sd: sd.update({"model.layers.7.extra.weight": torch.zeros(2)})))
    cli_error(capsys, gen(folder, "--prompt", "hi"), "unexpected tensors", "model.layers.7.extra.weight")


def test_missing_tokenizer(capsys: pytest.CaptureFixture[str], broken) -> None:  # noqa: ANN001
    folder = broken(lambda f: (f / "tokenizer.json").unlink())
    cli_error(capsys, gen(folder, "--prompt", "hi"), str(folder), "no tokenizer.json")


def test_bad_tokenizer_files(capsys: pytest.CaptureFixture[str], broken) -> None:  # noqa: ANN001
    folder = broken(lambda f: (f / "tokenizer.json").write_text("not json"))
    cli_error(capsys, gen(folder, "--prompt", "hi"), str(folder / "tokenizer.json"), "cannot be read as a tokenizer")
    folder = broken(lambda f: (f / "tokenizer_config.json").write_text('["a list"]'))
    cli_error(capsys, gen(folder, "--prompt", "hi"), str(folder / "tokenizer_config.json"), "expected a JSON object")


@pytest.mark.parametrize("command", ["info", "generate"])
def test_not_a_gguf_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a model\n")
    argv = ["info", fake] if command == "info" else gen(fake, "--prompt", "hi")
    cli_error(capsys, argv, str(fake), "not a GGUF file")


# ---- prompts -------------------------------------------------------------------------------------------------------
def test_prompt_longer_than_context(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    cli_error(capsys, gen(tiny, "--prompt", TOO_LONG), "300 tokens", "context is 256",
              "self_extend")


def test_long_prompt_allowed_with_self_extend(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    code = main([str(a) for a in gen(tiny, "--prompt", TOO_LONG, "--stats",
                                     "--kv", "positions=self_extend(group=4,window=64)")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "[kv] prompt 300 tok" in err and "Traceback" not in out + err


def test_prompt_too_long_in_a_batch_fails_before_generating(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    cli_error(capsys, gen(tiny, "--prompt", "hi", "--prompt", TOO_LONG), "300 tokens", "256")


def test_prompt_file_missing(capsys: pytest.CaptureFixture[str], tiny: Path, tmp_path: Path) -> None:
    missing = tmp_path / "prompt.txt"
    cli_error(capsys, gen(tiny, "--prompt-file", missing), f"--prompt-file {missing}", "no such file")
    cli_error(capsys, gen(tiny, "--prompt-file", tmp_path), f"--prompt-file {tmp_path}", "not a file")


def test_prompt_file_not_text(capsys: pytest.CaptureFixture[str], tiny: Path, tmp_path: Path) -> None:
    f = tmp_path / "prompt.bin"
    f.write_bytes(b"\xff\xfe\x00")
    cli_error(capsys, gen(tiny, "--prompt-file", f), f"--prompt-file {f}", "not UTF-8")


def test_empty_prompt(capsys: pytest.CaptureFixture[str], tiny: Path, tmp_path: Path) -> None:
    cli_error(capsys, gen(tiny, "--prompt", ""), "empty prompt")
    (tmp_path / "empty.txt").write_text("")
    cli_error(capsys, gen(tiny, "--prompt-file", tmp_path / "empty.txt"), "empty prompt")


def test_no_prompt(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    cli_error(capsys, gen(tiny), "--prompt TEXT", "--prompt-file FILE")


# ---- options -------------------------------------------------------------------------------------------------------
def test_unknown_option(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    cli_error(capsys, gen(tiny, "--prompt", "hi", "--frobnicate"), "unrecognized arguments: --frobnicate")


def test_missing_command_and_argument(capsys: pytest.CaptureFixture[str]) -> None:
    cli_error(capsys, [], "required: command")
    cli_error(capsys, ["info"], "required: path", "longctx info --help")


def test_unknown_dtype(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    cli_error(capsys, gen(tiny, "--prompt", "hi", "--dtype", "fp8"), "--dtype", "'fp8'", "fp32", "bf16", "fp16")


def test_bad_number(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    cli_error(capsys, gen(tiny, "--prompt", "hi", "--max-tokens", "many"), "--max-tokens", "invalid int value")


@pytest.mark.parametrize(("spec", "detail"), [
    ("snapkv:abc", "'snapkv:abc'"),
    ("retain=snapkv(window=x)", "parameter 'window' must be int, got 'x'"),
    ("retain=nope", "unknown retain method 'nope'"),
    ("wat=full", "unknown axis 'wat'"),
    ("frobnicate", "'frobnicate': not a KV method"),
    ("snapkv", "needs a budget"),
])
def test_malformed_kv_spec_fails_before_loading(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path, spec: str, detail: str) -> None:
    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded despite a malformed --kv spec")

    monkeypatch.setattr("longctx.engine.llm.load_model", no_load)
    start = time.perf_counter()
    # The model path does not exist either: the spec is checked first.
    err = cli_error(capsys, gen(tmp_path / "no-model", "--prompt", "hi", "--kv", spec), detail)
    assert "no-model" not in err
    assert time.perf_counter() - start < 5


def test_cuda_without_gpu(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tiny: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cli_error(capsys, gen(tiny, "--prompt", "hi", "--device", "cuda"), "'cuda'", "no CUDA GPU", "--device cpu")
    cli_error(capsys, gen(tiny, "--prompt", "hi", "--device", "cuda:1"), "'cuda:1'", "no CUDA GPU")


def test_unknown_device(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    cli_error(capsys, gen(tiny, "--prompt", "hi", "--device", "tpu"), "'tpu'", "cpu or cuda")


@pytest.mark.parametrize(("option", "value", "detail"), [
    ("--top-p", "0", "--top-p must be in (0, 1], got 0.0"),
    ("--top-p", "1.5", "--top-p must be in (0, 1]"),
    ("--top-k", "-2", "--top-k must be >= -1"),
    ("--temperature", "-0.5", "--temperature must be >= 0"),
    ("--temperature", "nan", "--temperature must be a finite number"),
    ("--max-tokens", "0", "--max-tokens must be >= 1"),
    ("--stop", "", "--stop: a stop string must not be empty"),
    ("--kv-memory", "0", "argument --kv-memory: must be a positive number of GiB up to 1048576, got '0'"),
    ("--kv-memory", "lots", "argument --kv-memory: expected a number of GiB, got 'lots'"),
    ("--gpu-memory-utilization", "1.5", "argument --gpu-memory-utilization: expected a number in (0, 1], got '1.5'"),
    ("--gpu-memory-utilization", "x", "argument --gpu-memory-utilization: expected a number in (0, 1], got 'x'"),
])
def test_invalid_sampling_option(capsys: pytest.CaptureFixture[str], tiny: Path, option: str, value: str,
                                 detail: str) -> None:
    cli_error(capsys, gen(tiny, "--prompt", "hi", option, value), detail)


def test_kv_pool_too_small(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    cli_error(capsys, gen(tiny, "--prompt", "hi", "--kv-memory", "1e-9"), "below two KV blocks")


def test_chat_template_error(capsys: pytest.CaptureFixture[str], broken) -> None:  # noqa: ANN001
    def template(f: Path) -> None:
        cfg = json.loads((f / "tokenizer_config.json").read_text())
        cfg["chat_template"] = "{{ raise_exception('only system messages') }}"
        (f / "tokenizer_config.json").write_text(json.dumps(cfg))

    folder = broken(template)
    cli_error(capsys, gen(folder, "--prompt", "hi", "--chat"), "chat template error: only system messages")


def test_chat_without_template(capsys: pytest.CaptureFixture[str], broken) -> None:  # noqa: ANN001
    folder = broken(lambda f: (f / "tokenizer_config.json").write_text("{}"))
    cli_error(capsys, gen(folder, "--prompt", "hi", "--chat"), "no chat template", "without --chat")


# ---- the Python API ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tiny: Path):  # noqa: ANN201
    from longctx.engine.llm import LLM

    return LLM(tiny)


def test_api_kv_list_length_mismatch(llm) -> None:  # noqa: ANN001
    from longctx.engine.sampling import SamplingParams

    with pytest.raises(LongctxError, match="kv: got 1 values for 2 prompts"):
        llm.generate(["a", "b"], SamplingParams(max_tokens=1), kv=["full"])
    with pytest.raises(LongctxError, match="params: got 3 values for 2 prompts"):
        llm.generate(["a", "b"], [SamplingParams(max_tokens=1)] * 3)
    # nothing leaked: the pool still serves a full batch afterwards
    outs = llm.generate(["a", "b"], SamplingParams(max_tokens=1), kv=["full", "snapkv:16"])
    assert len(outs) == 2


def test_api_prompt_too_long(llm) -> None:  # noqa: ANN001
    from longctx.engine.sampling import SamplingParams

    with pytest.raises(PromptTooLongError, match=r"300 tokens .* context is 256"):
        llm.generate(TOO_LONG, SamplingParams(max_tokens=1))


def test_api_bad_token_ids_and_empty_prompt(llm) -> None:  # noqa: ANN001
    with pytest.raises(LongctxError, match=r"token ids out of range \[0, 300\): \[999\]"):
        llm.generate([[1, 999]])
    with pytest.raises(LongctxError, match="empty prompt"):
        llm.generate("")


def test_api_errors_are_library_exceptions(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_model(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="unknown dtype 'fp8'; choose one of: fp32, bf16, fp16"):
        load_model(tmp_path, dtype="fp8")


# ---- the real console script ---------------------------------------------------------------------------------------
def test_console_script_prints_one_line_and_no_traceback(broken) -> None:  # noqa: ANN001
    folder = broken(edit_weights(lambda sd: sd.update({TENSOR: torch.zeros(3, 64)})))
    script = Path(sys.executable).with_name("longctx")
    assert script.exists(), script
    proc = subprocess.run([str(script), "generate", "--model", str(folder), "--prompt", "hi", "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("longctx: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert TENSOR in proc.stderr and "expected (32, 64)" in proc.stderr


@pytest.mark.parametrize(("argv", "detail"), [
    (["bench", "--new-tokens", "0"], "--new-tokens: must be a positive integer"),
    (["bench", "--kv-memory", "inf"], "--kv-memory: must be a positive number of GiB"),
    (["bench", "--batches", "0", "--device", "cpu"], "--batches: '0' must be a positive number"),
    (["bench", "--contexts", "nank", "--device", "cpu"], "--contexts"),
    (["eval", "run", "--samples", "0", "--out", "x"], "--samples: must be a positive integer"),
    (["generate", "--prompt", "hi", "--kv-memory", "inf"], "--kv-memory"),
])
def test_cli_counts_and_sizes_range_checked(capsys: pytest.CaptureFixture[str], argv: list[str], detail: str) -> None:
    cli_error(capsys, argv, detail)
