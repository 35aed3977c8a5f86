"""The calibration contexts' fused path (SDPA outputs mixed by the gates) against the eager reference (mixed
probabilities), and the calibration's precision choice (``auto`` / ``bf16`` / ``fp32``)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from longctx.engine.llm import LLM
from longctx.errors import LongctxError
from longctx.heads import duo
from longctx.heads.contexts import FullContext, GatedContext
from longctx.heads.duo import calibrate, cpu_has_native_bf16, ran_as, resolve_precision, score_duo
from longctx.heads.store import parse_scores
from tests.heads.test_heads import TINY_DUO

CPU = torch.device("cpu")


def _run(model, ids: torch.Tensor, make_ctx, reference: bool,  # noqa: ANN001
         monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        if reference:
            m.setenv("LONGCTX_ATTENTION", "reference")
        else:
            m.delenv("LONGCTX_ATTENTION", raising=False)
        return model(ids, make_ctx())


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])  # plain, sliding everywhere, mixed layers
@pytest.mark.parametrize("gate_kind", ["zeros", "ones", "mixed"])
def test_gated_context_fused_equals_the_reference_with_its_gradient(tiny_checkpoint, torch_one_thread, arch: str,
                                                                    gate_kind: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    llm = LLM(tiny_checkpoint(arch)[0])
    cfg, model = llm.config, llm.model
    assert llm.config.attn_logit_softcapping is None or not llm.config.attn_logit_softcapping
    n = 60  # longer than every sliding window (24) and than sinks + window (2 + 8)
    ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(1))
    base = {"zeros": torch.zeros, "ones": torch.ones}.get(gate_kind)
    init = base(cfg.num_layers, cfg.num_kv_heads) if base else \
        torch.rand(cfg.num_layers, cfg.num_kv_heads, generator=torch.Generator().manual_seed(2))
    probe = torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(4))  # the final norm would
    outs, grads = [], []                                     # make a mean square of the output flat in the gates
    for reference in (False, True):
        gates = init.clone().requires_grad_(True)
        with torch.enable_grad():
            hidden = _run(model, ids, lambda g=gates: GatedContext(cfg, n, CPU, g, 2, 8), reference, monkeypatch)
            (hidden * probe).sum().backward()
        outs.append(hidden.detach())
        grads.append(gates.grad.clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    scale = float(grads[1].abs().max())
    assert scale > 1e-3  # the gates really receive gradient
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_full_context_fused_equals_the_reference_and_gates_of_one(tiny_checkpoint, torch_one_thread, arch: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    llm = LLM(tiny_checkpoint(arch)[0])
    cfg, model = llm.config, llm.model
    n = 50
    ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fused = _run(model, ids, lambda: FullContext(cfg, n, CPU), False, monkeypatch)
        ref = _run(model, ids, lambda: FullContext(cfg, n, CPU), True, monkeypatch)
        ones = _run(model, ids, lambda: GatedContext(cfg, n, CPU, torch.ones(cfg.num_layers, cfg.num_kv_heads), 2, 8),
                    False, monkeypatch)
        zeros = _run(model, ids, lambda: GatedContext(cfg, n, CPU, torch.zeros(cfg.num_layers, cfg.num_kv_heads),
                                                      2, 8), False, monkeypatch)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ones, fused, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(zeros, fused, rtol=1e-3, atol=1e-4)  # streaming attention really differs at n=50


def test_precision_resolution() -> None:
    assert resolve_precision("bf16", CPU, torch.float32) == "bf16"
    assert resolve_precision("fp32", CPU, torch.float32) == "fp32"
    assert resolve_precision("auto", CPU, torch.bfloat16) == "fp32"  # already 16-bit: run as loaded
    assert ran_as("fp32", torch.bfloat16) == "bf16" and ran_as("fp32", torch.float16) == "fp16"  # as loaded
    assert ran_as("bf16", torch.float32) == "bf16" and ran_as("fp32", torch.float32) == "fp32"
    with pytest.raises(LongctxError, match=r"precision: unknown value 'fp8'; choose from auto, bf16, fp32"):
        resolve_precision("fp8", CPU, torch.float32)


def test_auto_precision_follows_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpu_has_native_bf16("processor : 0\nflags : fpu sse2 avx2 amx_bf16 amx_tile\n")
    assert cpu_has_native_bf16("flags\t\t: fpu avx512f avx512_bf16\n")
    assert not cpu_has_native_bf16("flags : fpu sse2 avx2 avx512f\n")
    assert not cpu_has_native_bf16("")
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(duo, "cpu_has_native_bf16", lambda cpuinfo=None, n=native: n)
        assert resolve_precision("auto", CPU, torch.float32) == want


def test_calibration_runs_in_bf16_and_records_what_ran(tiny_checkpoint, torch_one_thread) -> None:
    llm = LLM(tiny_checkpoint("llama")[0])
    settings = replace(TINY_DUO, precision="bf16")
    a, b = calibrate(llm.model, llm.tokenizer, settings), calibrate(llm.model, llm.tokenizer, settings)
    assert a.precision == "bf16" and torch.equal(a.gates, b.gates) and a.losses == b.losses
    assert all(torch.isfinite(torch.tensor(a.losses))) and a.losses[-1] < a.losses[0]
    fp32 = calibrate(llm.model, llm.tokenizer, replace(TINY_DUO, precision="fp32"))
    assert fp32.precision == "fp32" and a.gates.dtype == fp32.gates.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in llm.model.parameters())  # autocast never casts the weights
    scores = score_duo(llm.model, llm.tokenizer, replace(TINY_DUO, precision="auto"), "0" * 64, "tiny")
    assert scores.settings["precision"] in ("bf16", "fp32")
    assert parse_scores(scores.to_json(), "s.json").settings == scores.settings


def test_score_cli_passes_the_calibration_knobs() -> None:
    import argparse  # noqa: PLC0415

    from longctx.heads.cli import _settings, add_parser  # noqa: PLC0415

    top = argparse.ArgumentParser()
    add_parser(top.add_subparsers())
    args = top.parse_args(["heads", "score", "--method", "duo", "--min-length", "4096", "--length", "8000",
                           "--reg", "0.01", "--precision", "fp32", "--steps", "7"])
    s = _settings(args)
    assert (s.min_length, s.max_length, s.reg, s.precision, s.steps) == (4096, 8000, 0.01, "fp32", 7)
    with pytest.raises(SystemExit):
        top.parse_args(["heads", "score", "--method", "duo", "--precision", "fp8"])
