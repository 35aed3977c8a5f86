"""Running the app under uvicorn, with a graceful shutdown that exits 0.

On SIGINT or SIGTERM uvicorn stops accepting connections, lets in-flight responses finish for up to
``shutdown_timeout`` seconds and cancels the rest (their engine requests are aborted); the app's lifespan
then stops the engine. Stock uvicorn re-raises the signal once it is done, so the process would die of it
(exit status 130 / 143): :class:`_Server` keeps the graceful path and returns instead. A second SIGINT
still forces an immediate exit.

The socket is bound before uvicorn starts, so a port in use is a one-line error, and ``port=0`` picks a
free port (printed in the "serving on" line).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

import uvicorn

from longctx.errors import LongctxError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, announce: str) -> None:
        super().__init__(config)
        self._announce = announce

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            print(self._announce, file=sys.stderr, flush=True)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when ``host`` is one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LongctxError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(app: Any, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
               log_level: str = "info", access_log: bool = True, sock: socket.socket | None = None) -> int:
    """Serve ``app`` on ``host:port`` (or the already bound ``sock``) until SIGINT / SIGTERM; returns 0 after
    a graceful shutdown."""
    sock = sock if sock is not None else bind(host, port)
    host, bound = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout, timeout_keep_alive=5)
    server = _Server(config, f"longctx: serving on http://{shown}:{bound} (Ctrl+C to stop)")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise LongctxError("the server did not start (see the log above)")
    return 0
