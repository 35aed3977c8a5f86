"""Hardening against bad input: each case is a one-line :class:`LongctxError` naming the problem, never a
ZeroDivisionError, a traceback or gigabytes of work before the error.

GGUF header values, HF ``config.json`` values, ``eos_token_id`` in ``generation_config.json``, eval lengths
(a sane cap and each model's context) and the corpus folder (``LONGCTX_CORPORA``; nothing may need ``../shared``).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import pytest

from longctx.errors import CheckpointError, LongctxError, PromptTooLongError
from longctx.model.config import ModelConfig
from longctx.model.gguf_loader import read_gguf_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# ---------------------------------------------------------------- 1. GGUF metadata


def write_header_gguf(path: Path, **overrides: int | None) -> Path:
    """A tensor-less llama GGUF (a header is all ``read_gguf_config`` reads); ``overrides`` maps a metadata key
    (without the ``llama.`` prefix, dots as ``__``) to a value, or None to leave the key out."""
    values: dict[str, int | None] = {"block_count": 2, "context_length": 128, "embedding_length": 64,
                                     "feed_forward_length": 96, "attention__head_count": 4,
                                     "attention__head_count_kv": 2, "attention__key_length": 16, "vocab_size": 300}
    values.update(overrides)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    for key, value in values.items():
        if value is not None:
            writer.add_int32(f"llama.{key.replace('__', '.')}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_header_is_valid(tmp_path: Path) -> None:
    cfg = read_gguf_config(write_header_gguf(tmp_path / "ok.gguf"))
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert ModelConfig.from_hf(cfg).head_dim == 16


@pytest.mark.parametrize(("key", "value"), [("attention__head_count", 0), ("attention__head_count", -4),
                                            ("attention__head_count_kv", 0), ("embedding_length", 0),
                                            ("block_count", -1), ("attention__key_length", 0)])
def test_gguf_zero_or_negative_count(tmp_path: Path, key: str, value: int) -> None:
    path = write_header_gguf(tmp_path / "bad.gguf", **{key: value})
    name = "llama." + key.replace("__", ".")
    with pytest.raises(CheckpointError) as err:
        read_gguf_config(path)
    assert str(err.value) == f"{path}: GGUF metadata {name} must be a positive integer, got {value}"


def test_gguf_missing_head_count(tmp_path: Path) -> None:
    path = write_header_gguf(tmp_path / "bad.gguf", attention__head_count=None)
    with pytest.raises(CheckpointError, match=r"lacks required key llama\.attention\.head_count$"):
        read_gguf_config(path)


def test_gguf_hidden_not_divisible_by_heads(tmp_path: Path) -> None:
    path = write_header_gguf(tmp_path / "bad.gguf", attention__head_count=5, attention__head_count_kv=5,
                             attention__key_length=None)
    with pytest.raises(CheckpointError) as err:
        read_gguf_config(path)
    assert str(err.value) == (f"{path}: GGUF llama.embedding_length (64) is not divisible by "
                              "llama.attention.head_count (5) and llama.attention.key_length is not given")


def test_gguf_heads_not_multiple_of_kv_heads(tmp_path: Path) -> None:
    path = write_header_gguf(tmp_path / "bad.gguf", attention__head_count_kv=3)
    with pytest.raises(CheckpointError) as err:
        read_gguf_config(path)
    assert str(err.value) == (f"{path}: GGUF metadata llama.attention.head_count (4) is not a multiple of "
                              "llama.attention.head_count_kv (3)")


def test_gguf_bad_context_length_is_caught_by_the_config(tmp_path: Path) -> None:
    path = write_header_gguf(tmp_path / "bad.gguf", context_length=-1)
    with pytest.raises(CheckpointError) as err:
        ModelConfig.from_hf(read_gguf_config(path), str(path))
    assert str(err.value) == f"{path}: field 'max_position_embeddings' must be a positive integer, got -1"


# ---------------------------------------------------------------- 2. HF config.json values

BASE = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def config_error(**changes: Any) -> str:
    with pytest.raises(CheckpointError) as err:
        ModelConfig.from_hf({**BASE, **changes})
    return str(err.value)


def test_base_config_is_valid() -> None:
    cfg = ModelConfig.from_hf(BASE)
    assert cfg.head_dim == 16 and cfg.rope.theta == 10000.0 and cfg.rms_norm_eps == 1e-6


@pytest.mark.parametrize(("field", "value"), [("num_attention_heads", 0), ("head_dim", 0),
                                              ("max_position_embeddings", -1), ("vocab_size", "abc"),
                                              ("num_key_value_heads", -2), ("hidden_size", math.inf),
                                              ("intermediate_size", math.nan)])
def test_config_integer_fields(field: str, value: Any) -> None:
    assert config_error(**{field: value}) == f"config.json: field {field!r} must be a positive integer, got {value!r}"


@pytest.mark.parametrize(("field", "value"), [("rope_theta", math.nan), ("rope_theta", 0), ("rms_norm_eps", math.nan),
                                              ("rms_norm_eps", -1e-6), ("rms_norm_eps", "tiny"),
                                              ("rope_theta", math.inf), ("final_logit_softcapping", 0)])
def test_config_real_fields(field: str, value: Any) -> None:
    assert config_error(**{field: value}) == \
        f"config.json: invalid config: field {field!r} must be a positive finite number, got {value!r}"


def test_config_rope_parameters_theta_and_factor() -> None:
    message = "config.json: invalid config: field 'rope_theta' must be a positive finite number, got nan"
    assert config_error(rope_parameters={"rope_type": "default", "rope_theta": math.nan}) == message
    assert config_error(rope_scaling={"rope_type": "linear", "factor": -2.0}) == \
        "config.json: invalid config: field 'factor' must be a positive finite number, got -2.0"


def test_config_hidden_not_divisible_by_heads() -> None:
    assert config_error(num_attention_heads=5, num_key_value_heads=5) == \
        "config.json: hidden_size (64) is not divisible by num_attention_heads (5) and no 'head_dim' is given"
    assert config_error(num_attention_heads=128, num_key_value_heads=128) == \
        "config.json: hidden_size (64) is not divisible by num_attention_heads (128) and no 'head_dim' is given"
    assert ModelConfig.from_hf({**BASE, "num_attention_heads": 5, "num_key_value_heads": 5, "head_dim": 16}).head_dim \
        == 16


def test_config_gemma_pattern_and_scalar() -> None:
    gemma = {**BASE, "model_type": "gemma3_text", "sliding_window": 32, "query_pre_attn_scalar": 16}
    with pytest.raises(CheckpointError) as err:
        ModelConfig.from_hf({**gemma, "sliding_window_pattern": 0})
    assert str(err.value) == "config.json: field 'sliding_window_pattern' must be a positive integer, got 0"
    with pytest.raises(CheckpointError) as err:
        ModelConfig.from_hf({**gemma, "sliding_window_pattern": 2, "query_pre_attn_scalar": 0})
    assert str(err.value) == \
        "config.json: invalid config: field 'query_pre_attn_scalar' must be a positive finite number, got 0"


@pytest.mark.parametrize("value", ["abc", [2, "x"], -1, True, 2.0])
def test_config_eos_token_id(value: Any) -> None:
    assert config_error(eos_token_id=value) == \
        f"config.json: field 'eos_token_id' must be a token id or a list of token ids, got {value!r}"


def test_config_eos_and_bos_token_ids_pass() -> None:
    assert ModelConfig.from_hf({**BASE, "eos_token_id": [2, 3]}).eos_token_ids == (2, 3)
    assert ModelConfig.from_hf({**BASE, "eos_token_id": 2, "bos_token_id": 1}).eos_token_ids == (2,)
    assert config_error(bos_token_id="a") == "config.json: field 'bos_token_id' must be a token id, got 'a'"


@pytest.fixture
def tiny_copy(tiny_checkpoint: Callable[[str], tuple[Path, Any]], tmp_path: Path) -> Callable[..., Path]:
    """``tiny_copy(file, **changes)``: a copy of the tiny llama checkpoint with JSON ``file`` updated."""

    def make(file: str, **changes: Any) -> Path:
        folder = tmp_path / "ckpt"
        shutil.copytree(tiny_checkpoint("llama")[0], folder)
        path = folder / file
        data = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**data, **changes}))
        return folder

    return make


def test_checkpoint_folder_bad_config_is_one_cli_line(tiny_copy: Callable[..., Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from longctx.cli import main

    folder = tiny_copy("config.json", num_attention_heads=0)
    capsys.readouterr()  # building the tiny checkpoint writes a progress bar
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"longctx: error: {folder / 'config.json'}: field 'num_attention_heads' must be a " \
                          "positive integer, got 0"


# ---------------------------------------------------------------- 3. generation_config.json eos_token_id


@pytest.mark.parametrize("value", ["abc", [2, "x"]])
def test_generation_config_eos_token_id(tiny_copy: Callable[..., Path], value: Any) -> None:
    from longctx.model.loader import load_model

    folder = tiny_copy("generation_config.json", eos_token_id=value)
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    assert "eos_token_id" in str(err.value) and repr(value) in str(err.value)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- 4. eval lengths


def test_length_cap_fails_fast(tiny_checkpoint: Callable[[str], tuple[Path, Any]], tmp_path: Path) -> None:
    from longctx.eval.runner import MAX_LENGTH, parse_lengths, run_grid

    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the lengths were checked")

    start = time.perf_counter()
    with pytest.raises(LongctxError) as err:
        run_grid([tiny_checkpoint("llama")[0]], "full", "needle", "10m", samples=1, out_dir=tmp_path / "o",
                 progress=False, llm_factory=no_model)
    assert time.perf_counter() - start < 5
    assert str(err.value) == f"bad length '10m': 10485760 tokens is more than the maximum of {MAX_LENGTH} (4m) tokens"
    assert not (tmp_path / "o").exists()
    assert parse_lengths("4m") == [MAX_LENGTH]
    with pytest.raises(LongctxError, match="more than the maximum"):
        parse_lengths([MAX_LENGTH + 1])


def test_length_over_the_context_fails_before_building(tiny_checkpoint: Callable[[str], tuple[Path, Any]],
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from longctx.eval.runner import RESULTS_NAME, read_results, run_grid

    class NoBuildTask:
        name = "nobuild"
        max_new_tokens = 1

        def samples(self, *args: Any) -> list[Any]:
            raise AssertionError("a context was built before the length was checked")

    monkeypatch.delenv("LONGCTX_ALLOW_BEYOND_CONTEXT", raising=False)
    model = tiny_checkpoint("llama")[0]
    with pytest.raises(PromptTooLongError) as err:
        run_grid([model], "full; snapkv:32", [NoBuildTask()], "128,300", samples=1, out_dir=tmp_path,
                 progress=False)
    message = str(err.value)
    assert message.startswith(f"{model}: length 300 exceeds the model's context of 256 tokens (max_model_len) for "
                              "--kv 'retain=full; ")
    assert "positions=self_extend" in message and "\n" not in message
    assert read_results(tmp_path / RESULTS_NAME) == []


def test_length_over_the_context_with_extending_positions(tiny_checkpoint: Callable[[str], tuple[Path, Any]],
                                                          tmp_path: Path) -> None:
    from longctx.engine.llm import LLM
    from longctx.eval.runner import _Grid
    from longctx.kv.spec import KVSpec

    llm = LLM(str(tiny_checkpoint("llama")[0]))
    extending = "positions=self_extend(group=4,window=64)"
    assert llm.extends_context(KVSpec.parse(extending))  # the decision the grid relies on
    grid = object.__new__(_Grid)
    grid.lengths, grid.specs = [300], [str(KVSpec.parse(extending))]
    grid._check_lengths(llm, "m")  # no error: the positions extend the context
    grid.specs.append("retain=full")
    with pytest.raises(PromptTooLongError, match=r"^m: length 300 exceeds the model's context of 256 tokens"):
        grid._check_lengths(llm, "m")


# ---------------------------------------------------------------- 5. corpus folder


def test_no_shared_corpora_needed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from longctx.bench import common
    from longctx.eval import haystack
    from longctx.eval.needle import builtin_haystack

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(haystack.CORPORA_ENV, raising=False)
    monkeypatch.setattr(haystack, "_REPO_ROOT", tmp_path)  # no ../shared next to the checkout either
    assert haystack.default_corpus() is None
    assert common.default_corpus() is None
    text, source = common.load_text(None)
    assert text == builtin_haystack() and "built-in" in source
    assert haystack.load_haystack(None) == haystack.synthetic_filler()


def test_corpus_folder_from_argument_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from longctx.bench import common
    from longctx.eval import haystack

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(haystack, "_REPO_ROOT", tmp_path)
    corpora = tmp_path / "my corpora"
    corpora.mkdir()
    (corpora / common.CORPUS_NAME).write_text("Emma Woodhouse, handsome, clever, and rich.")
    monkeypatch.delenv(haystack.CORPORA_ENV, raising=False)
    assert haystack.default_corpus(corpora) == corpora.resolve()
    assert common.default_corpus(corpora) == corpora.resolve() / common.CORPUS_NAME
    monkeypatch.setenv(haystack.CORPORA_ENV, str(corpora))
    assert haystack.default_corpus() == corpora.resolve()
    assert common.load_text(None) == ("Emma Woodhouse, handsome, clever, and rich.",
                                      str(corpora.resolve() / common.CORPUS_NAME))
    assert haystack.load_haystack(haystack.default_corpus()).startswith("Emma")
    monkeypatch.setenv(haystack.CORPORA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(LongctxError) as err:
        haystack.default_corpus()
    assert str(err.value) == f"LONGCTX_CORPORA={tmp_path / 'nowhere'}: no such corpus folder (a folder of *.txt files)"
    with pytest.raises(LongctxError) as err:
        haystack.default_corpus(tmp_path / "missing")
    assert str(err.value) == f"{tmp_path / 'missing'}: no such corpus folder (a folder of *.txt files)"
    with pytest.raises(LongctxError) as err:
        common.load_text(tmp_path / "missing.txt")
    assert str(err.value) == f"{tmp_path / 'missing.txt'}: no such text file"
