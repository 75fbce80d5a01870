"""A worker's own loopback address.

Under ``scillm serve --workers N`` every process accepts connections on the one shared port, so the kernel may hand
a connection to any of them. A child that a process started (an agent CLI, ``opencode serve``) calls back with a
run key only that process knows, so it must reach that process: each worker also listens on a loopback port of its
own, serving the same app, and agent surfaces give their children that address (``Runtime.own_url``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

from scillm_core.protocol import LISTENER

__all__ = ["OwnListener"]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the process's own server handles signals and stops this one
        yield


class OwnListener:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.server: _Server | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> str:
        """Listen on an ephemeral loopback port; the URL to reach this process."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False, **LISTENER,
                                timeout_keep_alive=30, timeout_graceful_shutdown=5)
        self.server = _Server(config)
        self.task = asyncio.ensure_future(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self.task.done():  # it could not start: say why
                self.task.result()
                raise RuntimeError("the worker's own listener stopped while starting")
            await asyncio.sleep(0.01)
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.server is not None and self.task is not None:
            self.server.should_exit = True
            with contextlib.suppress(Exception):
                await self.task
