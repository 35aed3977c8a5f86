"""``longctx serve`` as a process: graceful shutdown on SIGTERM / SIGINT (in-flight requests finish, or are
aborted after --shutdown-timeout; exit status 0), one-line errors for a missing server extra, a port in use
and a bad default spec, and every other command working without FastAPI."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
BLOCK_SERVER_EXTRA = "import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None; "


class Served:
    """``longctx serve`` in a subprocess on a free port; ``url`` once it prints its "serving on" line."""

    def __init__(self, model: Path, *args: str) -> None:
        cmd = [sys.executable, "-m", "longctx.cli", "serve", "--model", str(model), "--port", "0", "--no-access-log",
               "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=ENV)
        self.lines: list[str] = []
        self.url = ""
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                if m := re.search(r"serving on (http://\S+)", line):
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(60) or not self.url:
            self.proc.kill()
            raise AssertionError("server did not start:\n" + "".join(self.lines))

    def stream_in_thread(self, body: dict) -> tuple[threading.Thread, list[str], threading.Event]:
        """POST a streaming completion; its SSE data lines arrive in the list; the event is set at the first."""
        lines: list[str] = []
        first = threading.Event()

        def run() -> None:
            try:
                with httpx.stream("POST", self.url + "/v1/completions", json={**body, "stream": True},
                                  timeout=60) as r:
                    for line in r.iter_lines():
                        if line:
                            lines.append(line)
                            first.set()
            except httpx.HTTPError as e:  # the server cut the stream
                lines.append(f"error: {type(e).__name__}")
            first.set()

        t = threading.Thread(target=run)
        t.start()
        assert first.wait(30)
        return t, lines, first


@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> Path:  # noqa: ANN001
    return tiny_checkpoint("llama")[0]


def test_sigterm_lets_the_in_flight_request_finish_and_exits_0(model: Path) -> None:
    srv = Served(model)
    t, lines, _ = srv.stream_in_thread({"prompt": "hello", "max_tokens": 200, "ignore_eos": True})
    srv.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert srv.proc.wait(60) == 0, "".join(srv.lines)
    assert lines[-1] == "data: [DONE]", lines[-3:]
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health", timeout=2)


def test_sigint_aborts_what_outlives_the_shutdown_timeout_and_exits_0(model: Path) -> None:
    srv = Served(model, "--shutdown-timeout", "0.5")
    endless = {"prompt": "hello", "max_tokens": 1_000_000, "ignore_eos": True, "kv": "streamingllm:32 rerotate"}
    t, lines, _ = srv.stream_in_thread(endless)
    start = time.monotonic()
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(30) == 0, "".join(srv.lines)
    t.join(30)
    assert time.monotonic() - start < 15
    assert lines[-1] != "data: [DONE]"  # cut, not finished


def _cli(*code_or_args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True, env=env or ENV, timeout=120)


def test_serve_without_the_server_extra_says_how_to_install_it() -> None:
    r = _cli("-c", BLOCK_SERVER_EXTRA + "from longctx.cli import main; sys.exit(main(['serve']))")
    assert r.returncode == 2 and r.stderr.strip() == (
        "longctx: error: `longctx serve` needs FastAPI and uvicorn: pip install 'longctx[server]'")


def test_other_commands_and_import_work_without_fastapi() -> None:
    r = _cli("-c", BLOCK_SERVER_EXTRA + "import longctx, longctx.server; from longctx.cli import main; "
             "sys.exit(main(['methods']))")
    assert r.returncode == 0 and "retain:" in r.stdout, r.stderr


def test_port_in_use_and_bad_spec_are_one_line_errors(model: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _cli("-m", "longctx.cli", "serve", "--model", str(model), "--port", str(port))
    assert r.returncode == 2 and r.stderr.startswith(f"longctx: error: cannot listen on 127.0.0.1:{port}"), r.stderr
    r = _cli("-m", "longctx.cli", "serve", "--model", str(model), "--kv", "snapkv:nope")
    assert r.returncode == 2 and "budget 'nope' must be a token count" in r.stderr and "Traceback" not in r.stderr
