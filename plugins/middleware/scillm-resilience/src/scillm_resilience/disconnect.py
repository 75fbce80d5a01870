"""ASGI middleware: when the client goes away before its response is complete, cancel the request's task.

uvicorn does not cancel an app when its client disconnects (a non-streaming handler keeps awaiting the upstream
until it answers). After the body has been read, this layer owns ``receive``: a watcher task waits for
``http.disconnect`` and cancels the handler, so the upstream call is cancelled, its connection closed and its
concurrency slot released. Later ``receive`` calls by the app (Starlette's disconnect listener) are answered from
the watcher's state, so the two never compete for messages.

The watcher starts ``watch_after_s`` after the request (a timer is far cheaper than a task, and most answers from a
fast upstream are done by then); a disconnect in the meantime is still seen, as soon as the watcher starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CancelOnDisconnect"]


class CancelOnDisconnect:
    def __init__(self, app: ASGIApp, paths: Iterable[str], watch_after_s: float = 0.25) -> None:
        self.app = app
        self.paths = frozenset(paths)
        self.watch_after_s = watch_after_s
        self.cancelled = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        task = asyncio.current_task()
        assert task is not None
        body_read = asyncio.Event()
        disconnected = asyncio.Event()
        finished = False
        cancelled_here = False

        async def app_receive() -> Message:
            if body_read.is_set():
                await disconnected.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected.set()
                body_read.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        async def app_send(message: Message) -> None:
            nonlocal finished
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        async def watch() -> None:
            nonlocal cancelled_here
            await body_read.wait()
            while not disconnected.is_set():
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected.set()
            if not finished:
                cancelled_here = True
                self.cancelled += 1
                task.cancel()

        watchers: list[asyncio.Task[None]] = []

        def start_watching() -> None:
            if not finished:
                watchers.append(asyncio.ensure_future(watch()))

        timer = asyncio.get_running_loop().call_later(self.watch_after_s, start_watching)
        try:
            await self.app(scope, app_receive, app_send)
        except asyncio.CancelledError:
            if cancelled_here and task.uncancel() == 0:
                return  # the client left; there is nobody to answer
            raise
        finally:
            timer.cancel()
            for watcher in watchers:
                watcher.cancel()
