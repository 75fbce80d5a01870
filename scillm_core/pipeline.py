"""Thunk types and the chat pipeline that calls the hooks in order.

preprocess_files -> postprocess_json(default: route_model + call_provider). Each pipeline hook returns a
zero-argument async callable; wrappers return a new one that awaits the inner (possibly several times).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeAlias, TypeVar

from scillm_core.models import ChatChunk, ChatRequest, ChatResponse

if TYPE_CHECKING:
    from scillm_core.context import CallContext

__all__ = ["ChatResult", "ChatThunk", "RequestThunk", "ResponseThunk", "Thunk", "run_chat", "then"]

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
