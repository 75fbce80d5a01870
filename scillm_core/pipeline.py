"""Thunk types and the pipelines that call the hooks in order.

Chat: preprocess_files -> postprocess_json(default: route_model + call_provider). Embeddings: postprocess_json
(default: route_model + call_provider); files have no place in them. Each pipeline hook returns a zero-argument
async callable; wrappers return a new one that awaits the inner (possibly several times). When observers listen
(``runtime.events``), the same steps run between ``request.*`` events, each recorded as a ``Stage`` on
``ctx.stages`` while an observer wants them (``scillm_core.events``).

The request-level hook (``postprocess_json``) and the transport hooks (``route_model``, ``call_provider``) take any
:data:`ProviderRequest`; middleware that reads chat content checks ``isinstance(request, ChatRequest)``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from scillm_core import errors
from scillm_core.events import Stage
from scillm_core.models import ChatChunk, ChatRequest, ChatResponse, EmbeddingsRequest, EmbeddingsResponse

if TYPE_CHECKING:
    from scillm_core.context import CallContext

__all__ = ["CallResult", "ChatResult", "ChatThunk", "OpeningStream", "ProviderRequest", "RequestThunk",
           "ResponseThunk", "StreamEnded", "StreamTap", "Thunk", "aclose_quietly", "carries_on", "check_model",
           "end_with_stream", "open_stream", "run_chat", "run_embeddings", "tap_stream", "then"]

T = TypeVar("T")
U = TypeVar("U")
Thunk: TypeAlias = Callable[[], Awaitable[T]]
#: What the transport hooks carry: a chat request or an embeddings request (both have model, stream, scillm).
ProviderRequest: TypeAlias = ChatRequest | EmbeddingsRequest
ChatResult: TypeAlias = ChatResponse | AsyncIterator[ChatChunk]
CallResult: TypeAlias = ChatResult | EmbeddingsResponse
ChatThunk: TypeAlias = Callable[[], Awaitable[CallResult]]
RequestThunk: TypeAlias = Callable[[], Awaitable[ChatRequest]]
ResponseThunk: TypeAlias = Callable[[], Awaitable[CallResult]]
#: The longest model name a call may carry (real ones are under 200 characters): a longer one is a 400 before any
#: hook, so it is never echoed in an error nor kept in a call record, a trace or the dashboard.
MAX_MODEL_CHARS = 512


def then(call: Thunk[T], fn: Callable[[T], Awaitable[U]]) -> Thunk[U]:
    """A thunk that awaits ``call()`` and passes its result through ``fn`` (for simple post-processing wrappers)."""

    async def thunk() -> U:
        return await fn(await call())

    return thunk


async def run_chat(request: ChatRequest, ctx: CallContext) -> ChatResult:
    hooks = ctx.runtime.hooks
    try:
        check_model(request.model)
        if ctx.runtime.events.listening:
            return await _observed_chat(request, ctx)
        request = await hooks.preprocess_files(request, ctx)()
        return await hooks.postprocess_json(request, ctx)()  # type: ignore[return-value]  # a chat request's result
    except errors.ScillmError as exc:
        _say_attempts(exc, ctx)
        raise


async def run_embeddings(request: EmbeddingsRequest, ctx: CallContext) -> EmbeddingsResponse:
    """Route and call the provider through the request-level and transport hooks (cache, limits, retries,
    fallbacks, metrics and the call log see it like a chat call); the vectors come back in the encoding the request
    asked for (``float`` unless ``base64``), whatever the upstream sent. Observed like ``run_chat``."""
    events = ctx.runtime.events
    try:
        check_model(request.model)
        if not events.listening:
            return await _embed(request, ctx)
    except errors.ScillmError as exc:
        _say_attempts(exc, ctx)
        raise
    started = time.perf_counter()
    stages = ctx.stages = [] if events.wants("stage") else None
    events.emit("request.start", ctx, request=request)
    try:
        if stages is not None:
            with Stage(stages, "postprocess_json"):
                response = await _embed(request, ctx)
        else:
            response = await _embed(request, ctx)
    except BaseException as exc:
        events.emit("request.end", ctx, request=request, response=None, error=exc, usage=None,
                    duration_s=time.perf_counter() - started, first_chunk_s=None)
        if isinstance(exc, errors.ScillmError):
            _say_attempts(exc, ctx)
        raise
    events.emit("request.end", ctx, request=request, response=response, error=None, usage=response.usage,
                duration_s=time.perf_counter() - started, first_chunk_s=None)
    return response


async def _embed(request: EmbeddingsRequest, ctx: CallContext) -> EmbeddingsResponse:
    result = await ctx.runtime.hooks.postprocess_json(request, ctx)()
    if not isinstance(result, EmbeddingsResponse):
        raise TypeError(f"an embeddings request produced {type(result).__name__}")  # a plugin broke the contract
    try:
        return result.encoded(request.encoding_format or "float")
    except ValueError as exc:
        route = ctx.route
        raise errors.UpstreamProtocolError(str(exc), provider=route.provider if route else "?",
                                           model=route.model if route else request.model) from None


def check_model(model: str, where: str = "$.model") -> None:
    """A 400 naming ``where`` for a model name past :data:`MAX_MODEL_CHARS` (also for surfaces that keep a name
    before any call, such as a batch's)."""
    if len(model) > MAX_MODEL_CHARS:
        raise errors.InvalidRequest(f"model is {len(model)} characters long; a model name has at most "
                                    f"{MAX_MODEL_CHARS} @ {where}", param=where)


def _say_attempts(exc: errors.ScillmError, ctx: CallContext) -> None:
    """Error responses carry ``x-scillm-attempts`` like successes do. After more than one upstream attempt (scillm
    retried, or failed over) they say ``x-should-retry: false`` too: scillm is the one retry layer. The openai and
    anthropic SDKs retry a 5xx twice by default, and each of their retries would run scillm's whole sequence again;
    after a single attempt (retries off, a failure scillm does not retry) they stay free to retry."""
    exc.headers.setdefault("x-scillm-attempts", str(ctx.attempts))
    if ctx.attempts > 1:
        exc.headers["x-should-retry"] = "false"


async def _observed_chat(request: ChatRequest, ctx: CallContext) -> ChatResult:
    """``run_chat`` between ``request.start`` and ``request.end`` (for a stream: when it ends), each hook stage
    recorded on ``ctx.stages`` while an observer wants them."""
    hooks, events = ctx.runtime.hooks, ctx.runtime.events
    started = time.perf_counter()
    stages = ctx.stages = [] if events.wants("stage") else None
    events.emit("request.start", ctx, request=request)
    prepared = request
    try:
        if stages is not None:
            with Stage(stages, "preprocess_files"):
                prepared = await hooks.preprocess_files(request, ctx)()
            with Stage(stages, "postprocess_json"):
                result = await hooks.postprocess_json(prepared, ctx)()
        else:
            prepared = await hooks.preprocess_files(request, ctx)()
            result = await hooks.postprocess_json(prepared, ctx)()
    except BaseException as exc:
        events.emit("request.end", ctx, request=prepared, response=None, error=exc, usage=None,
                    duration_s=time.perf_counter() - started, first_chunk_s=None)
        raise
    if isinstance(result, ChatResponse):
        events.emit("request.end", ctx, request=prepared, response=result, error=None, usage=result.usage,
                    duration_s=time.perf_counter() - started, first_chunk_s=None)
        return result

    def ended(error: BaseException | None, usage: Any, first_at: float | None) -> None:
        now = time.perf_counter()
        events.emit("request.end", ctx, request=prepared, response=None, error=error, usage=usage,
                    duration_s=now - started, first_chunk_s=None if first_at is None else first_at - started)

    return end_with_stream(result, ctx, ended)  # type: ignore[arg-type]  # a chat request's stream



#: ``ended(error, usage, first_at)``: a stream ended (``first_at`` is the ``perf_counter`` of its first chunk)
StreamEnded: TypeAlias = Callable[[BaseException | None, Any, float | None], None]


class StreamTap:
    """Observes one stream: ``ended`` and whatever else joins ``ctx.stream_ended`` (see :func:`end_with_stream`)
    are called once, by :meth:`end`, when it ends, fails or is closed (``GeneratorExit`` / ``CancelledError`` as
    the error), with the last usage seen and when the first chunk came. The layer that runs the stream calls
    :meth:`seen` for each chunk: :func:`tap_stream`'s own, or core's dispatch's time limits
    (``scillm_core.timeouts.within_limits``), so an attempt is watched and observed in one layer."""

    __slots__ = ("callbacks", "ctx", "first", "usage")

    def __init__(self, ctx: CallContext, ended: StreamEnded) -> None:
        self.ctx = ctx
        self.callbacks = [ended]
        self.first: float | None = None
        self.usage: Any = None

    def open(self) -> None:
        """The stream is handed on: from now on :func:`end_with_stream` joins this tap."""
        self.ctx.stream_ended = self.callbacks

    def seen(self, chunk: Any) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        if chunk.usage is not None:
            self.usage = chunk.usage

    def end(self, error: BaseException | None) -> None:
        ctx, callbacks = self.ctx, self.callbacks
        if ctx.stream_ended is callbacks:
            ctx.stream_ended = None
        for ended in callbacks:
            ended(error, self.usage, self.first)


def tap_stream(chunks: AsyncIterator[ChatChunk], ctx: CallContext, ended: StreamEnded) -> AsyncIterator[ChatChunk]:
    """``chunks`` in a layer of their own that observes them (a :class:`StreamTap`)."""
    tap = StreamTap(ctx, ended)
    tap.open()
    return _tapped(chunks, tap)


def end_with_stream(chunks: AsyncIterator[ChatChunk], ctx: CallContext, ended: StreamEnded) -> AsyncIterator[ChatChunk]:
    """Call ``ended`` when ``chunks`` ends, without another layer per chunk when it can: the stream a call returns
    is, unless a middleware made a stream of its own, its last upstream attempt's, which core's dispatch already
    taps (``ctx.stream_ended``, still open); ``ended`` then joins that tap's callbacks. Otherwise (a cached
    answer replayed as a stream, say) ``chunks`` gets a tap of its own."""
    callbacks = ctx.stream_ended
    if callbacks is not None:
        callbacks.append(ended)
        return chunks
    return tap_stream(chunks, ctx, ended)


def carries_on(ctx: CallContext) -> None:
    """Said by a middleware that returns a stream which may go on after its attempt's stream ended (a continuation
    by another model): the request's end then gets a tap around that whole stream instead of joining the
    attempt's (which would report the request ended, failed, when its first attempt broke)."""
    ctx.stream_ended = None


async def _tapped(chunks: AsyncIterator[ChatChunk], tap: StreamTap) -> AsyncIterator[ChatChunk]:
    error: BaseException | None = None
    try:
        async for chunk in chunks:
            tap.seen(chunk)
            yield chunk
    except BaseException as exc:
        error = exc
        raise
    finally:
        try:
            tap.end(error)
        finally:
            await aclose_quietly(chunks)


async def aclose_quietly(chunks: AsyncIterator[Any] | None) -> None:
    """Close a stream the caller is done with (if it can be closed); an error while closing is not the caller's."""
    close = getattr(chunks, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:
            pass


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
        try:
            return chunks, await anext(chunks, None)
        except errors.ScillmError as exc:  # answered with its HTTP status too: said like run_chat's own
            _say_attempts(exc, ctx)
            raise

    opening = asyncio.ensure_future(first_chunk())
    try:
        await asyncio.wait({opening}, timeout=wait_s)
    except asyncio.CancelledError:
        opening.cancel()
        raise
    if opening.done() and opening.exception() is not None:
        raise opening.exception()  # type: ignore[misc]  # nothing sent yet: the error keeps its own status
    return opening
