"""Upstream timeouts of one attempt: connect, response headers, first token, idle between chunks, a whole answer.

Every provider has defaults (:attr:`scillm_core.Provider.timeouts`); ``[providers.NAME]`` overrides them for a
provider and ``[groups.NAME]`` for every member of a group (the group wins). Routing puts the result on
``Route.timeouts``; core's dispatch enforces the stream limits for every provider alike, and providers pass
:meth:`Timeouts.http` to the shared client (connect, and a read backstop). A timeout is an
:class:`~scillm_core.errors.UpstreamTimeout` naming the limit (``exc.limit``): resilience fails over to the next
model of the group instead of retrying the deployment that stayed silent.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import httpx
from attrs import evolve, frozen

from scillm_core.pipeline import aclose_quietly

if TYPE_CHECKING:
    from scillm_core.pipeline import StreamTap

__all__ = ["LIMITS", "Timeouts", "carries_token", "open_within", "within_limits"]

T = TypeVar("T")

#: limit name -> (Timeouts attribute, config key), in the order an attempt meets them
LIMITS = {"connect": ("connect_s", "connect_timeout_s"), "headers": ("headers_s", "headers_timeout_s"),
          "first_token": ("first_token_s", "first_token_timeout_s"), "idle": ("idle_s", "idle_timeout_s"),
          "total": ("total_s", "timeout_s")}


@frozen(kw_only=True, cache_hash=True)
class Timeouts:
    """Seconds. Streams: ``headers_s`` until the response status and headers, ``first_token_s`` until the first
    token (counted from the request; :func:`carries_token`), ``idle_s`` at most between two chunks. A non-streaming
    answer comes with its headers, so ``total_s`` bounds it whole. ``connect_s`` bounds connecting (TCP and TLS) in
    both."""

    connect_s: float = 10.0
    headers_s: float = 60.0
    first_token_s: float = 300.0
    idle_s: float = 120.0
    total_s: float = 600.0
    #: where each limit that is not the built-in default was set, for error messages: {"first_token": "[groups.g]"}
    origin: tuple[tuple[str, str], ...] = ()

    WRITE_S: ClassVar[float] = 60.0  # sending a request body (a large PDF) to the upstream
    POOL_S: ClassVar[float] = 60.0   # waiting for a connection of the shared client's pool

    def http(self, *, stream: bool) -> httpx.Timeout:
        """The shared client's timeout for one request: connect, and a read limit between bytes that backs up the
        limits core's dispatch enforces (a stream may be silent until its first chunk, a whole answer ``total_s``)."""
        read = max(self.headers_s, self.first_token_s, self.idle_s) if stream else self.total_s
        return _http(self.connect_s, read + _BACKSTOP_S)

    def seconds(self, limit: str) -> float:
        return float(getattr(self, LIMITS[limit][0]))

    def setting(self, limit: str) -> str:
        """Where ``limit`` is configured, for messages: ``first_token_timeout_s of [groups.g]``."""
        where = dict(self.origin).get(limit, "the provider's default")
        return f"{LIMITS[limit][1]} = {self.seconds(limit):g} ({where})"

    def over(self, settings: Any, where: str) -> Timeouts:
        """These timeouts with the ones ``settings`` sets (``[providers.NAME]`` or ``[groups.NAME]``: attributes
        named like the config keys, ``None`` when unset)."""
        return _over(self, settings, where)


_BACKSTOP_S = 5.0  # the client's read limit comes after the dispatch's, which names the setting


@functools.lru_cache(maxsize=64)
def _http(connect: float, read: float) -> httpx.Timeout:
    return httpx.Timeout(connect=connect, read=read, write=Timeouts.WRITE_S, pool=Timeouts.POOL_S)


@functools.lru_cache(maxsize=1024)
def _over(base: Timeouts, settings: Any, where: str) -> Timeouts:
    changes: dict[str, Any] = {}
    origin = dict(base.origin)
    for limit, (attribute, key) in LIMITS.items():
        value = getattr(settings, key, None)
        if value is not None:
            changes[attribute] = float(value)
            origin[limit] = where
    if not changes:
        return base
    return evolve(base, origin=tuple(sorted(origin.items())), **changes)


# -- enforcement (core's dispatch) ------------------------------------------------------------------------------------

async def open_within(opening: Awaitable[T], timeouts: Timeouts, fail: Callable[[str], BaseException]) -> T:
    """Await a stream's opening (the provider's ``stream()``: until the response headers) within ``headers_s``
    (or ``first_token_s`` when that is shorter); ``fail(limit)`` makes the error."""
    headers_s, first_s = timeouts.headers_s, timeouts.first_token_s
    try:
        async with asyncio.timeout(min(headers_s, first_s)):
            return await opening
    except TimeoutError:
        raise fail("headers" if headers_s <= first_s else "first_token") from None


async def within_limits(chunks: AsyncIterator[T], started: float, timeouts: Timeouts,
                        fail: Callable[[str], BaseException], tap: StreamTap | None = None) -> AsyncIterator[T]:
    """``chunks`` passed through while the first token (:func:`carries_token`) comes by ``started + first_token_s``
    (``loop.time()``) and each later chunk within ``idle_s`` of being asked for (a consumer that is slow to ask is not
    an idle upstream). ``tap`` (when observers listen) sees each chunk and the end, in this same layer.

    One timer per stream checks both, rearmed only when it fires: a chunk costs a clock read, not a timer.
    When a limit passes while the consumer waits, the wait is cancelled and ``fail(limit)`` raised instead."""
    loop = asyncio.get_running_loop()
    watch = _Watch(loop, started + timeouts.first_token_s, timeouts.idle_s)
    nxt, now, current_task = chunks.__anext__, loop.time, asyncio.current_task
    error: BaseException | None = None
    try:
        while True:
            if watch.expired is not None:
                raise fail(watch.expired)
            task = watch.task = current_task(loop)
            watch.since = now()
            try:
                chunk = await nxt()
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if watch.expired is not None and task is not None and task.uncancel() == 0:
                    raise fail(watch.expired) from None
                raise
            finally:
                watch.task = None
            if watch.first and carries_token(chunk):
                watch.got_first()
            if tap is not None:
                tap.seen(chunk)
            yield chunk
    except BaseException as exc:
        error = exc
        raise
    finally:
        watch.handle.cancel()
        try:
            await aclose_quietly(chunks)
        finally:
            if tap is not None:
                tap.end(error)


def carries_token(chunk: Any) -> bool:
    """Whether a stream chunk carries some of the answer (text, reasoning, a tool call, a finish, usage): the first
    token. A chunk that only starts the message (OpenAI's role chunk, Anthropic's ``message_start``, which comes
    before the model wrote anything) does not, and keeps the first-token limit running."""
    choices = getattr(chunk, "choices", None)
    if choices is None or getattr(chunk, "usage", None) is not None:  # (not a chat chunk: any counts)
        return True
    for choice in choices:
        delta = choice.delta
        if delta.content or delta.tool_calls or delta.extra or choice.finish_reason is not None:
            return True
    return False


class _Watch:
    """The timer of :func:`within_limits`: fires at the next possible expiry, looks, and rearms or cancels."""

    __slots__ = ("deadline", "expired", "first", "handle", "idle_s", "loop", "since", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: float, idle_s: float) -> None:
        self.loop = loop
        self.deadline = deadline      # of the first chunk
        self.idle_s = idle_s
        self.first = True             # no chunk yet
        self.task: asyncio.Task[Any] | None = None  # the task waiting for a chunk, if one is
        self.since = 0.0              # when it started waiting
        self.expired: str | None = None
        self.handle = loop.call_at(deadline, self.check)

    def got_first(self) -> None:
        """From now on the idle limit applies: look again when it could first pass."""
        self.first = False
        self.handle.cancel()
        self.handle = self.loop.call_at(self.loop.time() + self.idle_s, self.check)

    def check(self) -> None:
        now = self.loop.time() + _SLACK  # the loop may run a timer up to its clock resolution early
        waiting = self.task is not None
        if self.first:
            if now >= self.deadline:
                self.expired = "first_token"
            due = self.deadline
        else:
            due = self.since + self.idle_s if waiting else now + self.idle_s
            if waiting and now >= due:
                self.expired = "idle"
        if self.expired is None:
            self.handle = self.loop.call_at(due, self.check)
        elif self.task is not None:
            self.task.cancel()


_SLACK = 1e-3
