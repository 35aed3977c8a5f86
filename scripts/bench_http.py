"""The ``longctx bench serve`` workload replayed over HTTP against ``longctx serve``, next to the in-process run.

    python scripts/bench_http.py [--shape 8b] [--device auto] [--kv full,snapkv:1024] [--num-requests 128] \\
        [--prompt-len 1024:4096] [--output-len 128] [--arrival all|poisson] [--rate 4] [--kv-memory 8] \\
        [--max-num-seqs 256] [--warmup N] [--out DIR]

Per KV spec: (1) the in-process replay of ``longctx bench serve`` (``run_spec``: engine clock, no HTTP);
(2) a fresh server process over the same model and KV memory (``build_app`` + uvicorn on loopback), warmed
up the same way, then the same workload sent by an asyncio client as streaming ``/v1/completions`` requests
(token-id prompts, greedy, ``ignore_eos``, ``return_token_ids`` so every chunk carries its tokens). TTFT
counts from the request's arrival time to its first token chunk, TPOT is the mean gap between its later
tokens, tok/s is every output token over first arrival to last finish, as in ``bench serve``. The server
gets SIGTERM at the end and must exit 0 with no KV block in use. Prints a table; ``--out`` writes
``serve_http.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longctx.bench.serve import (  # noqa: E402
    WARM_REQUESTS,
    ServeSettings,
    Workload,
    _load,
    make_workload,
    percentiles,
    run_spec,
    split_specs,
)
from longctx.engine.llm import LLM  # noqa: E402
from longctx.kv.spec import KVSpec  # noqa: E402


def _llm(loaded: Any, s: ServeSettings, spec: str) -> LLM:
    """The engine ``bench serve`` builds for a spec (same KV memory and limits)."""
    quantized = KVSpec.parse(spec).quant.name != "none"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[s.dtype]
    return LLM(loaded, device=s.device, dtype=dtype, max_kv_bytes=int(s.kv_memory_gb * (1 << 30)),
               max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens,
               preallocate_kv=s.device.startswith("cuda") and not quantized, max_waiting=1 << 20)


# ---- the server process ------------------------------------------------------------------------------------
class NullTokenizer:
    """Stands in for the missing tokenizer of a random-weight shape: the engine's streaming path decodes every
    step and fails without one (``LLMEngine.output`` reads ``detok.text`` of a missing detokenizer)."""

    stop_ids: tuple[int, ...] = ()
    generation_config: dict[str, Any] = {}  # noqa: RUF012
    chat_template = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


def serve_child(s: ServeSettings, spec: str) -> int:
    from longctx.server.app import build_app
    from longctx.server.serve import run_server

    loaded, _ = _load(s)
    if loaded.tokenizer is None:
        loaded = dataclasses.replace(loaded, tokenizer=NullTokenizer())
    profile = os.environ.get("LONGCTX_BENCH_PROFILE")
    profs = _profile_engine_thread() if profile else None
    app = build_app(_llm(loaded, s, spec), served_model_name="bench", default_kv=spec, max_body_bytes=1 << 30,
                    max_choices=1 << 20)
    if s_switch := os.environ.get("LONGCTX_BENCH_SWITCH_INTERVAL"):
        sys.setswitchinterval(float(s_switch))  # after the engine set its own: an A/B of the GIL hand-over
    if profs is None:
        return run_server(app, port=0, log_level="warning", access_log=False)
    profs["loop"].enable()
    try:
        return run_server(app, port=0, log_level="warning", access_log=False)
    finally:
        profs["loop"].disable()
        _write_profiles(profs, Path(profile), spec)  # type: ignore[arg-type]


def _profile_engine_thread() -> dict[str, Any]:
    """Before Python 3.12 cProfile is per thread: the engine thread's step loop gets its own profiler, the event
    loop (this thread) another. Returns both, the loop's not yet enabled. From 3.12 cProfile sits on
    ``sys.monitoring``, whose events are process-wide and which admits one profiler: one profile ("all") then
    holds both threads."""
    import cProfile

    from longctx.engine.async_engine import AsyncLLMEngine

    if sys.version_info >= (3, 12):
        return {"loop": cProfile.Profile()}  # sees the engine thread too (written as SPEC-loop.prof)
    profs = {"loop": cProfile.Profile(), "engine": cProfile.Profile()}
    step_loop = AsyncLLMEngine._loop

    def profiled(self: AsyncLLMEngine) -> None:
        profs["engine"].enable()
        try:
            step_loop(self)
        finally:
            profs["engine"].disable()

    AsyncLLMEngine._loop = profiled  # type: ignore[method-assign]
    return profs


def _write_profiles(profs: dict[str, Any], out: Path, spec: str) -> None:
    """``SPEC-loop.prof`` / ``SPEC-engine.prof`` and the top functions by own and cumulative time as text."""
    import pstats

    out.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^\w.-]+", "_", spec)
    for what, prof in profs.items():
        prof.dump_stats(out / f"{name}-{what}.prof")
        with open(out / f"{name}-{what}.txt", "w") as f:
            for sort in ("tottime", "cumulative"):
                pstats.Stats(prof, stream=f).sort_stats(sort).print_stats(40)


class Server:
    def __init__(self, argv: list[str], spec: str) -> None:
        cmd = [sys.executable, __file__, *argv, "--child-spec", spec]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ,
                                                                                   "PYTHONUNBUFFERED": "1"})
        self.url, self.log = "", []
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                if m := re.search(r"serving on (http://\S+)", line):
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(600) or not self.url:
            self.proc.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.log[-30:]))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


# ---- the HTTP client ---------------------------------------------------------------------------------------
async def _request(http: Any, url: str, prompt: list[int], spec: str, max_tokens: int, due: float) -> dict:
    await asyncio.sleep(max(0.0, due - time.perf_counter()))
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True, "kv": spec}
    stamps: list[tuple[float, int]] = []  # (time, tokens in the chunk)
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                n = sum(len(c.get("token_ids") or ()) for c in chunk["choices"])
                if n:
                    stamps.append((time.perf_counter(), n))
    tokens = sum(n for _, n in stamps)
    first, last = stamps[0][0], stamps[-1][0]
    return {"ttft": first - due, "tpot": (last - first) / max(tokens - 1, 1), "tokens": tokens, "end": last,
            "latency": last - due}


async def _replay(url: str, wl: Workload, spec: str, output_len: int) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=None, limits=limits) as http:
        t0 = time.perf_counter()
        done = await asyncio.gather(*(_request(http, url, p, spec, output_len, t0 + a)
                                      for p, a in zip(wl.prompts, wl.arrivals, strict=True)))
    duration = max(d["end"] for d in done) - t0
    generated = sum(d["tokens"] for d in done)
    return {"requests": len(done), "generated_tokens": generated, "duration_s": duration,
            "requests_per_s": len(done) / duration, "output_tokens_per_s": generated / duration,
            "ttft_s": percentiles([d["ttft"] for d in done]), "tpot_s": percentiles([d["tpot"] for d in done]),
            "latency_s": percentiles([d["latency"] for d in done])}


def run_http(argv: list[str], s: ServeSettings, spec: str, wl: Workload) -> dict[str, Any]:
    server = Server(argv, spec)
    try:
        warm = Workload(wl.prompts[:WARM_REQUESTS], [0.0] * min(WARM_REQUESTS, len(wl.prompts)))
        asyncio.run(_replay(server.url, warm, spec, min(2, s.output_len)))
        for _ in range(s.warmup or 0):
            asyncio.run(_replay(server.url, wl, spec, s.output_len))
        cpu = _cpu_seconds(server.proc.pid)
        entry = asyncio.run(_replay(server.url, wl, spec, s.output_len))
        if cpu is not None and (after := _cpu_seconds(server.proc.pid)) is not None:
            entry["server_cpu_s"] = after - cpu  # both threads of the server process, over the measured replay
            entry["server_cpu_us_per_token"] = 1e6 * (after - cpu) / max(entry["generated_tokens"], 1)
        import httpx

        metrics = httpx.get(server.url + "/metrics").text
        entry["blocks_used_after"] = float(re.search(r"^longctx_kv_blocks_used\{[^}]*\} (\S+)$", metrics,
                                                     re.M).group(1))
    finally:
        entry_rc = server.stop()
    entry["server_exit_code"] = entry_rc
    return entry


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- main ----------------------------------------------------------------------------------------------------
def _ms(p: dict[str, float | None]) -> str:
    return "/".join("-" if p[k] is None else f"{p[k] * 1000:.0f}" for k in ("p50", "p90", "p99"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv", action="append", help="KV specs (default full,snapkv:1024)")
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--prompt-len", default="1024:4096")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--arrival", default="all")
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-memory", type=float, default=8.0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--out")
    ap.add_argument("--switch-interval", type=float, help="the server process's sys.setswitchinterval in seconds "
                    "(default: what the engine sets, 0.5 ms)")
    ap.add_argument("--profile", help="cProfile the server process into this folder (event loop and engine thread "
                    "apart: SPEC-loop.prof / SPEC-engine.prof, top functions in .txt)")
    ap.add_argument("--child-spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    lo, _, hi = args.prompt_len.partition(":")
    s = ServeSettings(shape=args.shape, device=args.device, dtype=args.dtype,
                      specs=split_specs(args.kv or ["full,snapkv:1024"]), num_requests=args.num_requests,
                      prompt_len=(int(lo), int(hi or lo)), output_len=args.output_len, arrival=args.arrival,
                      rate=args.rate, seed=args.seed, kv_memory_gb=args.kv_memory, max_num_seqs=args.max_num_seqs,
                      baseline="none", warmup=args.warmup, progress=False).resolved()
    if args.child_spec is not None:
        return serve_child(s, args.child_spec)
    if args.switch_interval is not None:
        os.environ["LONGCTX_BENCH_SWITCH_INTERVAL"] = str(args.switch_interval)
    if args.profile:
        os.environ["LONGCTX_BENCH_PROFILE"] = str(Path(args.profile).resolve())
    argv = [a for a in sys.argv[1:]]
    loaded, _ = _load(s)
    wl = make_workload(s.num_requests, s.prompt_len, loaded.config.vocab_size, s.arrival, s.rate, s.seed)
    rows = []
    for spec in s.specs:
        llm = _llm(loaded, s, spec)
        inproc = run_spec(llm, spec, wl, s)
        del llm
        gc.collect()
        if s.device.startswith("cuda"):
            torch.cuda.empty_cache()
        http = run_http(argv, s, spec, wl)
        rows.append({"spec": spec, "in_process": inproc, "http": http,
                     "http_over_in_process_tok_s": http["output_tokens_per_s"] / inproc["output_tokens_per_s"]})
        print(f"{spec}: in-process {inproc['output_tokens_per_s']:.1f} tok/s, HTTP {http['output_tokens_per_s']:.1f} "
              f"tok/s ({rows[-1]['http_over_in_process_tok_s']:.3f}x), server exit {http['server_exit_code']}, "
              f"blocks left {http['blocks_used_after']:.0f}"
              + (f", server CPU {http['server_cpu_us_per_token']:.0f} us/token" if "server_cpu_s" in http else ""),
              flush=True)
    name = f"<random {s.shape}> on {torch.cuda.get_device_name() if s.device.startswith('cuda') else 'CPU'}"
    print(f"\n{name} ({s.dtype}): {s.num_requests} requests, prompts {s.prompt_len[0]}-{s.prompt_len[1]} tokens, "
          f"{s.output_len} output tokens, arrival {s.arrival}, KV memory {s.kv_memory_gb:g} GiB")
    print(f"{'spec':<16} {'path':<11} {'tok/s':>9} {'x in-proc':>9} {'TTFT ms p50/90/99':>19} "
          f"{'TPOT ms p50/90/99':>18}")
    for r in rows:
        for path in ("in_process", "http"):
            e = r[path]
            ratio = r["http_over_in_process_tok_s"] if path == "http" else 1.0
            print(f"{r['spec']:<16} {path.replace('_', '-'):<11} {e['output_tokens_per_s']:>9.1f} {ratio:>9.3f} "
                  f"{_ms(e['ttft_s']):>19} {_ms(e['tpot_s']):>18}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "serve_http.json").write_text(json.dumps({"settings": vars(args), "device": name, "results": rows},
                                                        indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
