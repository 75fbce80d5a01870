"""Run an ASGI app on a real loopback socket in a background thread (for SDK clients and fake upstreams)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from scillm_core.protocol import LISTENER

__all__ = ["ServerThread", "free_port"]


def free_port() -> int:
    """A loopback port that was free a moment ago (for servers started as processes)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerThread:
    """``with ServerThread(app) as server: server.url`` — uvicorn on 127.0.0.1 with a free port, lifespan on,
    serving HTTP the way ``scillm serve`` does (``scillm_core.protocol``)."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app  # for scillm apps, ``server.app.runtime`` is the live runtime
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                     loop="asyncio", timeout_graceful_shutdown=1, access_log=False, **LISTENER)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = port

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server failed to start (see the log above)")
            time.sleep(0.005)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
