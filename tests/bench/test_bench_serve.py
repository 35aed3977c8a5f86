"""`longctx bench serve` on the tiny CPU checkpoint: the JSON schema, the accounting (no request lost, every one
generating exactly output-len tokens, a clean pool), both arrival modes, the HF baseline, the plot and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from longctx.bench.serve import SCHEMA, ServeSettings, make_workload, run_serve, split_specs
from longctx.cli import build_parser, main
from tests.test_errors import cli_error

pytestmark = pytest.mark.usefixtures("torch_one_thread")

N, OUT_LEN, SPECS = 6, 4, ["full", "snapkv:8"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> Path:  # noqa: ANN001
    return tiny_checkpoint("llama")[0]


def _ordered(p: dict[str, Any]) -> None:
    assert set(p) == {"mean", "p50", "p90", "p99"}
    assert all(isinstance(p[k], float) and p[k] >= 0 for k in p)
    assert p["p50"] <= p["p90"] <= p["p99"]


def check_entry(r: dict[str, Any], arrival: str) -> None:
    assert r["requests"] == r["completed"] == N and r["failed"] == 0 and r["errors"] == []
    assert r["generated_tokens"] == N * OUT_LEN
    for key in ("duration_s", "requests_per_s", "output_tokens_per_s", "kv_bytes_per_request",
                "kv_bytes_per_request_held"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert abs(r["output_tokens_per_s"] - r["generated_tokens"] / r["duration_s"]) < 1e-6
    for key in ("ttft_s", "tpot_s", "latency_s"):
        _ordered(r[key])
    conc = r["concurrency"]
    assert isinstance(conc["max"], int) and isinstance(conc["mean"], float)
    assert conc["max"] >= conc["mean"] > 0
    assert isinstance(r["preemptions"], int) and r["preemptions"] >= 0
    assert isinstance(r["peak_kv_bytes"], int) and r["peak_kv_bytes"] > 0
    if arrival == "poisson":
        assert isinstance(r["goodput_requests_per_s"], float) and 0 < r["goodput_requests_per_s"]
    else:
        assert r["goodput_requests_per_s"] is None


@pytest.mark.parametrize("arrival", ["all", "poisson"])
def test_serve_schema_both_arrivals_with_hf_baseline(tiny: Path, tmp_path: Path, arrival: str) -> None:
    data = run_serve(ServeSettings(model=str(tiny), device="cpu", specs=SPECS, num_requests=N, prompt_len=(8, 24),
                                   output_len=OUT_LEN, arrival=arrival, rate=40.0, baseline="hf", out=str(tmp_path),
                                   progress=False))
    assert json.loads((tmp_path / "serve.json").read_text()) == json.loads(json.dumps(data))
    assert (tmp_path / "serve.png").read_bytes()[:8] == PNG
    assert data["schema"] == SCHEMA == "longctx.bench.serve/1"
    assert set(data) >= {"schema", "settings", "results", "baseline", "environment"}
    st = data["settings"]
    assert st["specs"] == SPECS and st["num_requests"] == N and st["prompt_len"] == [8, 24]
    assert st["output_len"] == OUT_LEN and st["arrival"] == arrival and st["device"] == "cpu"
    env = data["environment"]
    assert isinstance(env["device_name"], str) and env["device_name"] and isinstance(env["torch"], str)

    assert [r["spec"] for r in data["results"]] == SPECS
    for r in data["results"]:
        assert r["engine"] == "longctx"
        check_entry(r, arrival)
        assert r["peak_kv_bytes"] <= r["kv_memory_bytes"]
    full, snap = data["results"]
    assert full["ratio_to_full"] == {"output_tokens_per_s": 1.0, "concurrency_mean": 1.0}
    assert snap["kv_bytes_per_request"] <= full["kv_bytes_per_request"]
    assert snap["kv_bytes_per_request_held"] < full["kv_bytes_per_request_held"]  # snapkv:8 keeps 8 of 8-24
    if arrival == "all":  # every request is admitted before the first step: all six run together
        assert full["concurrency"]["max"] == N

    hf = data["baseline"]
    assert hf["engine"] == "transformers"
    check_entry(hf, arrival)
    assert hf["batch_size"] in [p["batch_size"] for p in hf["batch_size_probes"] if not p["oom"]]
    assert 1 <= hf["concurrency"]["max"] <= hf["batch_size"]
    assert set(hf["ratio_to_full"]) == {"output_tokens_per_s", "concurrency_mean"}


def test_serve_cli(capsys: pytest.CaptureFixture[str], tiny: Path, tmp_path: Path) -> None:
    code = main(["bench", "serve", "--model", str(tiny), "--device", "cpu", "--kv", "full", "--kv", "snapkv:8",
                 "--num-requests", str(N), "--prompt-len", "8:24", "--output-len", str(OUT_LEN), "--baseline", "none",
                 "--arrival", "poisson", "--rate", "50", "--ttft-slo", "10", "--out", str(tmp_path), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in out + err and "it/s" not in err and "req/s]" not in err  # --quiet: no bars
    lines = out.splitlines()
    assert lines[1].split()[:3] == ["spec", "req/s", "tok/s"]
    assert [line.split()[0] for line in lines[3:5]] == SPECS
    assert not any(line.startswith("HF generate") for line in lines)
    data = json.loads((tmp_path / "serve.json").read_text())
    assert data["baseline"] is None and data["settings"]["ttft_slo"] == 10.0
    for r in data["results"]:
        check_entry(r, "poisson")
        assert r["ttft_slo_met"] == N  # a 10 s SLO: every request meets it
        assert r["ratio_to_full"] is not None
    assert (tmp_path / "serve.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize(("argv", "detail"), [
    (["--prompt-len", "0:5"], "--prompt-len: need 1 <= MIN <= MAX"),
    (["--prompt-len", "9:3"], "--prompt-len: need 1 <= MIN <= MAX"),
    (["--prompt-len", "lots"], "--prompt-len: expected N or MIN:MAX"),
    (["--num-requests", "0"], "--num-requests: must be a positive integer"),
    (["--output-len", "-1"], "--output-len: must be a positive integer"),
    (["--arrival", "burst"], "--arrival: invalid choice"),
    (["--arrival", "poisson", "--rate", "0"], "--rate: must be a positive number"),
    (["--rate", "2"], "--rate: applies to Poisson arrivals"),
    (["--ttft-slo", "1"], "--ttft-slo: applies to Poisson arrivals"),
    (["--baseline", "vllm"], "--baseline: invalid choice"),
    (["--kv-memory", "0"], "--kv-memory: must be a positive number of GiB"),
    (["--warmup", "-1"], "--warmup: must be an integer >= 0"),
    (["--kv", "nosuchmethod:8"], "nosuchmethod"),
    (["--kv", ","], "--kv: give at least one KV spec"),
    (["--kv", "full,full"], "--kv: a spec is given twice"),
    (["--shape", "70b"], "--shape: unknown shape '70b'"),
    (["--shape", "tiny", "--model", "x"], "--model PATH or --shape NAME, not both"),
])
def test_serve_bad_flags(capsys: pytest.CaptureFixture[str], argv: list[str], detail: str) -> None:
    cli_error(capsys, ["bench", "serve", "--device", "cpu", *argv], detail)


def test_serve_prompt_beyond_context(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    cli_error(capsys, ["bench", "serve", "--model", tiny, "--device", "cpu", "--prompt-len", "250", "--output-len",
                       "8", "--quiet"], "exceed the model's context of 256")


def test_bench_sweep_still_parses_without_sub_mode() -> None:
    args = build_parser().parse_args(["bench", "--shapes", "tiny", "--device", "cpu", "--kv", "full; snapkv:16"])
    assert args.func.__name__ == "cmd_bench" and args.kv == "full; snapkv:16" and args.bench_command is None
    args = build_parser().parse_args(["bench", "serve", "--kv", "full"])
    assert args.func.__name__ == "cmd_bench_serve" and args.kv == ["full"]


def test_split_specs_keeps_parenthesised_params() -> None:
    assert split_specs(["full, retain=snapkv(window=32,kernel=5) budget=uniform(tokens=64);h2o:16", "int8"]) == [
        "full", "retain=snapkv(window=32,kernel=5) budget=uniform(tokens=64)", "h2o:16", "int8"]


def test_workload_is_seeded_and_shared_by_arrival_modes() -> None:
    a = make_workload(20, (5, 9), 300, "all", seed=3)
    p = make_workload(20, (5, 9), 300, "poisson", rate=10.0, seed=3)
    assert a.prompts == p.prompts == make_workload(20, (5, 9), 300, "all", seed=3).prompts
    assert a.prompts != make_workload(20, (5, 9), 300, "all", seed=4).prompts
    assert all(5 <= len(x) <= 9 for x in a.prompts) and all(0 <= t < 300 for x in a.prompts for t in x)
    assert a.arrivals == [0.0] * 20
    assert p.arrivals[0] == 0.0 and p.arrivals == sorted(p.arrivals) and p.arrivals[-1] > 0
