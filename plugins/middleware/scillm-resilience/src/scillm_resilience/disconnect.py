"""ASGI middleware: when the client goes away before its response is complete, cancel the request's task.

uvicorn does not cancel an app when its client disconnects (a non-streaming handler keeps awaiting the upstream
until it answers). After the body has been read, this layer owns ``receive``: a watcher task waits for
``http.disconnect`` and cancels the handler, so the upstream call is cancelled, its connection closed and its
concurrency slot released. Later ``receive`` calls by the app (Starlette's disconnect listener) are answered from
the watcher's state, so the two never compete for messages.

The watcher starts ``watch_after_s`` after the request (a timer is far cheaper than a task, and most answers from a
fast upstream are done by then); a disconnect in the meantime is still seen, as soon as the watcher starts. This
runs on every chat request, so the per-request state is one small object and the rest is made only when needed.
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
        guard = _Guard(receive, send, self.watch_after_s)
        try:
            await self.app(scope, guard.receive, guard.send)
        except asyncio.CancelledError:
            if guard.cancelled_here and guard.task.uncancel() == 0:
                self.cancelled += 1
                return  # the client left; there is nobody to answer
            raise
        finally:
            guard.close()


class _Guard:
    """One request's view: has its body been read, has its response finished, has its client gone."""

    __slots__ = ("_disconnected", "_receive", "_send", "body_read", "cancelled_here", "finished", "task", "timer",
                 "watch_after_s", "watcher")

    def __init__(self, receive: Receive, send: Send, watch_after_s: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self._receive = receive
        self._send = send
        self.body_read = False
        self.finished = False
        self.cancelled_here = False
        self.watcher: asyncio.Task[None] | None = None
        self._disconnected: asyncio.Event | None = None
        self.watch_after_s = watch_after_s
        self.timer = asyncio.get_running_loop().call_later(watch_after_s, self.start_watching)

    @property
    def disconnected(self) -> asyncio.Event:
        if self._disconnected is None:
            self._disconnected = asyncio.Event()
        return self._disconnected

    async def receive(self) -> Message:
        if self.body_read:
            await self.disconnected.wait()
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.disconnected.set()
            self.body_read = True
        elif not message.get("more_body", False):
            self.body_read = True
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self._send(message)

    def start_watching(self) -> None:
        if self.finished:
            return
        if not self.body_read:  # the app is still reading its body (and sees a disconnect itself): look again later
            self.timer = asyncio.get_running_loop().call_later(self.watch_after_s, self.start_watching)
            return
        self.watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        disconnected = self.disconnected
        while not disconnected.is_set():
            if (await self._receive())["type"] == "http.disconnect":
                disconnected.set()
        if not self.finished:
            self.cancelled_here = True
            self.task.cancel()

    def close(self) -> None:
        self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()
