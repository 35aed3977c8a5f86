"""scripts/kvpress_parity.py without kvpress: the kvpress -> longctx spec mapping, argument parsing, and the
one-line error when kvpress cannot be used (the comparison itself needs kvpress and is not run in CI)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from longctx.kv.budget.pyramid import Pyramid
from longctx.kv.spec import KVSpec

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "kvpress_parity.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("kvpress_parity", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kvpress_parity"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


kp = _load()
DEFAULTS = {name: settings for name, (_, settings) in kp.KVPRESS_DEFAULTS.items()}


def _spec(method: str, prompt_len: int = 1031, ratio: float = 0.5, new_tokens: int = 16, **overrides: Any) -> str:
    return kp.longctx_spec(method, {**DEFAULTS[method], **overrides}, prompt_len, ratio, new_tokens, num_layers=30)


def test_n_kept_is_kvpress_truncation_floored_at_one() -> None:
    assert kp.kvpress_n_kept(1031, 0.5) == 515  # int(515.5)
    assert kp.kvpress_n_kept(1000, 0.3) == 700
    assert kp.kvpress_n_kept(3, 0.9) == 1
    assert kp.kvpress_n_kept(10, 1.0) == 0


@pytest.mark.parametrize(("method", "expected"), [
    ("full", "full"),
    ("snapkv", "retain=snapkv(window=64,kernel=5,pooling=avg) budget=uniform(tokens=515,slack=16)"),
    ("streamingllm", "retain=streamingllm(num_sinks=4) budget=uniform(tokens=515,slack=16)"),
    ("tova", "retain=tova(per_head=false) budget=uniform(tokens=515,slack=16)"),
    ("knorm", "retain=keynorm(num_sinks=0,recent=0) budget=uniform(tokens=515,slack=16)"),
    ("adakv", "retain=snapkv(window=64,kernel=5,pooling=avg) budget=adaptive(tokens=515,slack=16,alpha=0.2)"),
])
def test_spec_of_each_method_with_kvpress_defaults(method: str, expected: str) -> None:
    spec = _spec(method)
    assert spec == expected
    KVSpec.parse(spec)  # a valid longctx spec


def test_spec_carries_the_press_settings() -> None:
    parsed = KVSpec.parse(_spec("snapkv", window_size=32, kernel_size=7, ratio=0.75, prompt_len=2000, new_tokens=8))
    assert parsed.retain.get("window") == 32 and parsed.retain.get("kernel") == 7
    assert parsed.retain.get("pooling") == "avg"
    assert parsed.budget.name == "uniform" and parsed.budget.get("tokens") == 500 and parsed.budget.get("slack") == 8
    assert KVSpec.parse(_spec("streamingllm", n_sink=8)).retain.get("num_sinks") == 8
    tova = KVSpec.parse(_spec("tova"))
    assert tova.retain.get("per_head") is False


def test_pyramid_maps_when_longctx_layer_budgets_equal_kvpress() -> None:
    spec = _spec("pyramidkv", prompt_len=1024, beta=4)
    assert spec == "retain=snapkv(window=64,kernel=5,pooling=avg) budget=pyramid(tokens=512,slack=16,beta=4.0)"
    want = kp.kvpress_pyramid_budgets(1024, 0.5, 64, 4, 30)
    assert Pyramid(tokens=512, beta=4.0).layer_budgets(512, 30) == want
    assert want[0] > want[-1] and abs(sum(want) / 30 - 512) < 1


def test_pyramid_fallback_and_no_equivalent() -> None:
    # too steep for the window (min layer budget below it): kvpress falls back to SnapKV with round()
    assert kp.kvpress_pyramid_budgets(1024, 0.75, 64, 20, 30) == [256] * 30
    assert _spec("pyramidkv", prompt_len=1024, ratio=0.75).endswith("budget=uniform(tokens=256,slack=16)")
    with pytest.raises(kp.NoEquivalent, match="clips the bottom layer"):  # 2*512 - 512/20 >= 1024 - 64
        _spec("pyramidkv", prompt_len=1024)
    with pytest.raises(kp.NoEquivalent, match="not a whole number"):
        _spec("pyramidkv", prompt_len=1031, beta=4)


def test_parse_methods() -> None:
    got = kp.parse_methods("full, snapkv(window_size=32,kernel_size=7),pyramidkv(beta=4), tova")
    assert [n for n, _ in got] == ["full", "snapkv", "pyramidkv", "tova"]
    assert got[1][1] == {"window_size": 32, "kernel_size": 7}
    assert got[2][1] == {"window_size": 64, "kernel_size": 5, "beta": 4}
    assert kp.parse_methods("adakv(alpha_safeguard=0.1)")[0][1]["alpha_safeguard"] == 0.1
    for bad, match in (("h2o", "unknown method"), ("snapkv(window=3)", "unknown setting"), ("", "no methods"),
                       ("tova(x=1)", "unknown setting"), ("snapkv(window_size=big)", "expected a number")):
        with pytest.raises(ValueError, match=match):
            kp.parse_methods(bad)


def test_parse_args_defaults_and_values() -> None:
    a = kp.parse_args([])
    assert a.model is None and a.ratio == 0.5 and a.lengths == [1024, 2048] and a.new_tokens == 32
    assert [n for n, _ in a.methods] == ["full", "snapkv", "streamingllm", "tova", "knorm"]
    assert a.device == "cpu" and a.dtype == "fp32" and a.out is None and a.kvpress_path is None
    a = kp.parse_args(["--model", "m.gguf", "--methods", "snapkv(window_size=16),knorm", "--ratio", "0.25",
                       "--lengths", "1k,3000", "--samples", "3", "--new-tokens", "8", "--device", "cuda",
                       "--out", "r.json", "--kvpress-path", "/tmp/x", "--depths", "0.1,0.9"])
    assert a.model == "m.gguf" and a.ratio == 0.25 and a.lengths == [1024, 3000] and a.samples == 3
    assert a.methods == [("snapkv", {"window_size": 16, "kernel_size": 5}), ("knorm", {})]
    assert a.new_tokens == 8 and a.device == "cuda" and a.out == "r.json" and a.kvpress_path == "/tmp/x"
    assert a.depths == [0.1, 0.9]


@pytest.mark.parametrize("argv", [["--ratio", "1.0"], ["--ratio", "-0.1"], ["--methods", "nope"],
                                  ["--samples", "0"], ["--lengths", "0"], ["--dtype", "fp8"]])
def test_parse_args_rejects(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        kp.parse_args(argv)
    assert e.value.code == 2


def test_missing_kvpress_exits_with_the_pip_command(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "kvpress", None)  # `import kvpress` raises ImportError
    assert kp.main(["--lengths", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("kvpress_parity: kvpress is not importable")
    assert "pip install" in err and "kvpress==0.5.5" in err


def test_missing_kvpress_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert kp.main(["--kvpress-path", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such folder" in err and "pip install" in err


def test_kvpress_with_a_transformers_it_does_not_support(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    monkeypatch.setitem(sys.modules, "kvpress", types.ModuleType("kvpress"))
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.5.5")
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: ["transformers<4.0,>=3.0", "torch>=2"])
    with pytest.raises(kp.KvpressUnavailable, match=f"needs transformers.*found {transformers.__version__}"):
        kp.import_kvpress(None)
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: [f"transformers=={transformers.__version__}"])
    assert kp.import_kvpress(None).__parity_version__ == "0.5.5"


def test_agreement_counts_and_table() -> None:
    assert kp.common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert kp.common_prefix([1, 2], [1, 2]) == 2
    row = kp.Row("snapkv", "SnapKVPress(...)", "retain=snapkv", new_tokens=3)
    assert row.add([1, 2, 3], [1, 2, 3]) == 3
    assert row.add([1, 2, 3], [1, 5, 3]) == 1
    assert (row.prompts, row.identical, row.prefix_sum, row.divergences) == (2, 1, 4, [1])
    table = kp.format_table([row])
    assert "| snapkv | SnapKVPress(...) | `retain=snapkv` | 2 | 1/2 | 2.0 / 3 | 1 |" in table
    assert kp.press_label("snapkv", DEFAULTS["snapkv"], 0.5) == \
        "SnapKVPress(compression_ratio=0.5, window_size=64, kernel_size=5)"
    assert kp.press_label("full", {}, 0.5) == "(no press)"
    assert kp.press_label("adakv", DEFAULTS["adakv"], 0.5).startswith("AdaKVPress(SnapKVPress(compression_ratio=0.5")
