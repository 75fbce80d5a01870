"""Every SSE stream scillm answers with: the model surfaces' streamed answers (chat completions, Messages,
Responses) and the tails of runs, agents' workers and batches, written as they come.

:class:`EventStreamResponse` sends the pieces of an async iterator of bytes, and sends the ones that are ready
together: while the iterator yields without waiting (every event of one upstream read), its pieces are gathered,
and they go out as one body message just before it has to wait (:class:`FlushBeforeWaiting`), or with the end of
the response. An event is never held back while the iterator waits, so a token reaches the client as soon as
it would have one piece at a time, but an upstream read that held thirty events costs one pass through the ASGI
send layers and one socket write instead of thirty. (Node's HTTP stack does the same: it writes what a tick made.)

When the client leaves, the stream is cancelled (so the upstream call is cancelled and its connection closed): a
watcher waits for ``http.disconnect``, started ``watch_after_s`` after the response started (a timer is far cheaper
than a task, and most answers from a fast upstream are over by then; a disconnect meanwhile is seen as soon as the
watcher starts). Starlette's ``StreamingResponse`` did this with a task group of two tasks per response.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

__all__ = ["EventStreamResponse", "FlushBeforeWaiting"]


class EventStreamResponse(Response):
    media_type = "text/event-stream"
    watch_after_s = 0.25

    def __init__(self, content: AsyncIterator[bytes], *, headers: Mapping[str, str] | None = None,
                 media_type: str | None = None, status_code: int = 200) -> None:
        self.body_iterator = content
        self.status_code = status_code
        if media_type is not None:
            self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        watch = _Disconnect(receive, self.watch_after_s)
        try:
            await _send_pieces(self.body_iterator, send)
        except asyncio.CancelledError:
            if watch.left and watch.task.uncancel() == 0:
                return  # the client left: there is nobody to answer
            raise
        finally:
            watch.close()
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


async def _send_pieces(pieces: AsyncIterator[bytes], send: Send) -> None:
    ready: list[bytes] = []

    async def flush() -> None:
        body = b"".join(ready)
        ready.clear()
        await send({"type": "http.response.body", "body": body, "more_body": True})

    step = pieces.__anext__
    while True:
        try:
            piece = await (FlushBeforeWaiting(step(), flush) if ready else step())
        except StopAsyncIteration:
            break
        if piece:
            ready.append(piece)
    await send({"type": "http.response.body", "body": b"".join(ready), "more_body": False})


class FlushBeforeWaiting:
    """Awaits ``step``; if it has to wait (it yields to the event loop), awaits ``flush()`` first, then waits.

    Driven by hand like a task drives a coroutine: the first ``send(None)`` runs ``step`` until it finishes or
    waits for a future, which is handed on to the task only after the flush. If the flush fails (the task is
    cancelled in it), ``step`` gets the same exception where it waits, as it would have had the task been cancelled
    while it waited, and the flush's exception is raised once ``step`` has unwound."""

    __slots__ = ("flush", "step")

    def __init__(self, step: Awaitable[Any], flush: Callable[[], Awaitable[None]]) -> None:
        self.step = step
        self.flush = flush

    def __await__(self) -> Generator[Any, Any, Any]:
        inner = self.step.__await__()
        try:
            signal = inner.send(None)
        except StopIteration as done:
            return done.value  # ready without waiting
        failure: BaseException | None = None
        try:
            yield from self.flush().__await__()
        except BaseException as exc:
            failure = exc
        resume: tuple[Callable[[Any], Any], Any] | None = None if failure is None else (inner.throw, failure)
        while True:
            if resume is not None:
                method, argument = resume
                try:
                    signal = method(argument)
                except StopIteration as done:
                    if failure is None:
                        return done.value
                    raise failure from None
                except BaseException as exc:
                    if failure is None or exc is failure:
                        raise
                    raise failure from exc
            try:
                value = yield signal
            except BaseException as exc:
                resume = (inner.throw, exc)
            else:
                resume = (inner.send, value)


class _Disconnect:
    """Cancels the current task when the client disconnects (looked for from ``after_s`` on)."""

    __slots__ = ("after_s", "left", "receive", "task", "timer", "watcher")

    def __init__(self, receive: Receive, after_s: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.receive = receive
        self.left = False
        self.watcher: asyncio.Task[None] | None = None
        self.timer = asyncio.get_running_loop().call_later(after_s, self.start)

    def start(self) -> None:
        self.watcher = asyncio.ensure_future(self.watch())

    async def watch(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.left = True
        self.task.cancel()

    def close(self) -> None:
        self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()
