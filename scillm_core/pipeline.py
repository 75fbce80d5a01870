"""Thunk types and the chat pipeline that calls the hooks in order.

preprocess_files -> postprocess_json(default: route_model + call_provider). Each pipeline hook returns a
zero-argument async callable; wrappers return a new one that awaits the inner (possibly several times).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeAlias, TypeVar

from scillm_core.models import ChatChunk, ChatRequest, ChatResponse

if TYPE_CHECKING:
    from scillm_core.context import CallContext

__all__ = ["ChatResult", "ChatThunk", "OpeningStream", "RequestThunk", "ResponseThunk", "Thunk", "open_stream",
           "run_chat", "then"]

T = TypeVar("T")
U = TypeVar("U")
Thunk: TypeAlias = Callable[[], Awaitable[T]]
ChatResult: TypeAlias = ChatResponse | AsyncIterator[ChatChunk]
ChatThunk: TypeAlias = Callable[[], Awaitable[ChatResult]]
RequestThunk: TypeAlias = Callable[[], Awaitable[ChatRequest]]
ResponseThunk: TypeAlias = Callable[[], Awaitable[ChatResult]]


def then(call: Thunk[T], fn: Callable[[T], Awaitable[U]]) -> Thunk[U]:
    """A thunk that awaits ``call()`` and passes its result through ``fn`` (for simple post-processing wrappers)."""

    async def thunk() -> U:
        return await fn(await call())

    return thunk


async def run_chat(request: ChatRequest, ctx: CallContext) -> ChatResult:
    hooks = ctx.runtime.hooks
    request = await hooks.preprocess_files(request, ctx)()
    return await hooks.postprocess_json(request, ctx)()


OpeningStream: TypeAlias = "asyncio.Future[tuple[AsyncIterator[ChatChunk], ChatChunk | None]]"


async def open_stream(request: ChatRequest, ctx: CallContext, wait_s: float) -> OpeningStream:
    """Start a streaming chat and wait up to ``wait_s`` for its first chunk, before any byte is answered.

    A failure within ``wait_s`` (404, 429, 401 ...) raises here, so the surface answers it with its real HTTP
    status. Otherwise the returned future (still running if the first chunk is slow) gives ``(chunks, first)``;
    the surface sends its own keep-alives until it is done, and cancels it if the client leaves.
    """

    async def first_chunk() -> tuple[AsyncIterator[ChatChunk], ChatChunk | None]:
        chunks = await run_chat(request, ctx)
        assert not isinstance(chunks, ChatResponse)
        return chunks, await anext(chunks, None)

    opening = asyncio.ensure_future(first_chunk())
    try:
        await asyncio.wait({opening}, timeout=wait_s)
    except asyncio.CancelledError:
        opening.cancel()
        raise
    if opening.done() and opening.exception() is not None:
        raise opening.exception()  # type: ignore[misc]  # nothing sent yet: the error keeps its own status
    return opening
