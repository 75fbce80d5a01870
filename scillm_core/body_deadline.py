"""The deadline of a request's body (slowloris): a client that sends a head and then trickles its body, or stops
sending it, would otherwise hold its connection, its buffer and its task for as long as it likes.

A request's whole body must have arrived ``[server] body_read_timeout_s`` after the request started (its head was
read); past that, the app's ``receive`` raises :class:`~scillm_core.errors.RequestTimeout` (408, and the connection
is closed), which the error mechanism answers in the route's dialect. It wraps ``receive`` for every request, so it
is one rule for every reader: ``read_body``, multipart forms, any ``request.stream()``. A deadline for the whole
body rather than a bound on the gap between chunks, because a client that sends a byte every few seconds never
leaves a long gap.

Nothing is armed while the body is there when the app asks for it (nearly every request: a small body arrives
with its head): the timer is armed the first time a ``receive`` has to wait.
"""

from __future__ import annotations

import asyncio

from starlette.types import Message, Receive

from scillm_core import errors
from scillm_core.streaming import FlushBeforeWaiting

__all__ = ["BodyDeadline"]


class BodyDeadline:
    """One request's ``receive``, raising ``RequestTimeout`` once ``deadline`` (the loop's clock) has passed with its
    body incomplete. :meth:`close` when the request ends."""

    __slots__ = ("deadline", "done", "expired", "receive", "task", "timeout_s", "timer", "waiting")

    def __init__(self, receive: Receive, timeout_s: float) -> None:
        self.receive = receive
        self.timeout_s = timeout_s
        self.deadline = asyncio.get_running_loop().time() + timeout_s
        self.done = False  # the body is complete (or the client left): pass straight through
        self.expired = False
        self.waiting = False
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[object] | None = None

    async def __call__(self) -> Message:
        if self.done:
            return await self.receive()
        if self.expired:
            raise self.error()
        try:
            message: Message = await FlushBeforeWaiting(self.receive(), self.arm)
        except asyncio.CancelledError:
            if self.expired and self.task is not None and self.task.uncancel() == 0:
                raise self.error() from None
            raise
        finally:
            self.waiting = False
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.close()
        return message

    async def arm(self) -> None:
        """Called only when a ``receive`` has to wait: from now on the deadline can cancel that wait."""
        self.waiting = True
        if self.timer is None:
            self.task = asyncio.current_task()
            self.timer = asyncio.get_running_loop().call_at(self.deadline, self.expire)

    def expire(self) -> None:
        self.expired = True
        if self.waiting and self.task is not None:
            self.task.cancel()  # a reader busy between two receives is refused at its next one instead

    def error(self) -> errors.RequestTimeout:
        return errors.RequestTimeout(f"the request body did not arrive within {self.timeout_s:g} s of the request "
                                     "([server] body_read_timeout_s); send the whole body at once")

    def close(self) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
