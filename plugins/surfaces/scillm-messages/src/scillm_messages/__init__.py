"""The inbound Anthropic dialect: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

The official ``anthropic`` SDK and Claude Code can use any routed model through scillm: the request is modelled as
a core :class:`ChatRequest` and run through the normal pipeline (routing, middleware, the provider). An Anthropic
upstream (API key or Claude login) gets the client's own body (``model`` rewritten; ``anthropic-version`` and
``anthropic-beta`` forwarded) and its answer or event stream comes back as sent; any other upstream gets a
translation, and its result is translated back to a Messages response or event stream (``x-scillm-dialect`` says
which). Errors on these routes use the Anthropic envelope.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from scillm_core import (
    CallContext,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    MiddlewareRegistry,
    OpeningStream,
    Runtime,
    SurfaceRegistry,
    call_context,
    errors,
    hookimpl,
    json_response,
    open_stream,
    parse_json,
    read_body,
    read_json,
    request_id_of,
    run_chat,
    runtime_of,
    served_headers,
    session_of,
    with_native,
)
from scillm_core.models.native import native_request
from scillm_core.streaming import EventStreamResponse
from scillm_messages.tokens import estimate_input_tokens
from scillm_messages.translate import StreamTranslator, parse_messages_request, ping, to_messages_response
from scillm_messages.wire_errors import AnthropicErrorMiddleware, anthropic_error_parts, error_event

__all__ = ["estimate_input_tokens", "parse_messages_request", "to_messages_response"]

log = logging.getLogger("scillm")
STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
#: Client headers that go upstream with a same-dialect request.
FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta")
KEEP_ALIVE = b": keep-alive\n\n"


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    surfaces.route("/v1/messages", messages, ["POST"], plugin="messages")
    surfaces.route("/v1/messages/count_tokens", count_tokens, ["POST"], plugin="messages")


@hookimpl
def scillm_register_middleware(middleware: MiddlewareRegistry, runtime: Runtime) -> None:
    # outside auth (order 10): its 401/403 on these routes are re-rendered in the Anthropic envelope
    middleware.add(AnthropicErrorMiddleware, order=5, name="anthropic-errors")


def error_response(request: Request, exc: BaseException) -> Response:
    if not isinstance(exc, errors.ScillmError):
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    status, body, headers = anthropic_error_parts(exc, request_id_of(request))
    return json_response(body, status, headers)


async def _parse(request: Request, origins: errors.Origins) -> tuple[ChatRequest, bool]:
    """The modelled request with its native form attached, and whether its first route takes it as sent (then
    what the chat model cannot carry is left out of the model instead of refused: the upstream judges the body);
    ``origins`` records where its parts came from."""
    runtime = runtime_of(request)
    raw = await read_body(request, limit_bytes=int(runtime.config.server.max_body_mb * 1024 * 1024))
    body = parse_json(raw)
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model.strip():
        parse_messages_request(body)  # raises: not an object, or no model
    session = session_of(request.headers, body)
    native = native_request("anthropic-messages", body, raw, request.headers, forward=FORWARDED_HEADERS) \
        if runtime.config.server.passthrough else None
    probe = ChatRequest(model=model, messages=(), scillm={"session": session})
    try:
        route = runtime.hooks.route_model(with_native(probe, native), runtime)
    except errors.ScillmError:
        parse_messages_request(body)  # a bad body is the clearer answer than an unknown model
        raise
    provider = runtime.providers.get(route.provider)
    as_sent = provider is not None and provider.speaks(probe, route)
    # cache markers stay on the model: each attempt gets them or not by its provider (core's without_carried)
    chat = parse_messages_request(body, session=session, lenient=as_sent, origins=origins)
    return with_native(chat, native), as_sent


async def messages(request: Request) -> Response:
    origins = errors.Origins()
    try:
        chat, as_sent = await _parse(request, origins)
    except Exception as exc:
        return error_response(request, exc)
    try:
        ctx = call_context(request)
        if chat.stream:
            return await _stream(chat, ctx, runtime_of(request).config.server.heartbeat_s, as_sent, origins)
        result = await run_chat(chat, ctx)
        assert isinstance(result, ChatResponse)
        errors.ThinkingBudgetExhausted.check(result, ctx, chat.model, "empty content, stop_reason max_tokens",
                                             "raise max_tokens or lower the thinking budget")
        if result.native is not None:  # the upstream's own answer, as it sent it
            return Response(result.native, media_type="application/json", headers=served_headers(ctx))
        # the model that served, as on every surface (an upstream's own answer names it too)
        return json_response(to_messages_response(result, result.model or chat.model), headers=served_headers(ctx))
    except Exception as exc:  # about the chat request it became: named by the client's own paths
        return error_response(request, origins.relocate(exc))


async def count_tokens(request: Request) -> Response:
    """An approximation (see :mod:`scillm_messages.tokens`); the model must route, nothing is sent upstream."""
    try:
        body = await read_json(request, limit_bytes=int(runtime_of(request).config.server.max_body_mb
                                                         * 1024 * 1024))
        if isinstance(body, dict):
            body = {"max_tokens": 1, **body}  # count_tokens takes no max_tokens
        chat = parse_messages_request(body)
        runtime = runtime_of(request)
        runtime.hooks.route_model(chat, runtime)  # unknown model: 404 with close matches, as on /v1/messages
        return json_response({"input_tokens": estimate_input_tokens(chat)},
                             headers={"x-scillm-token-count": "estimate"})
    except Exception as exc:
        return error_response(request, exc)


async def _stream(chat: ChatRequest, ctx: CallContext, heartbeat_s: float, as_sent: bool,
                  origins: errors.Origins) -> Response:
    """Open the upstream stream before answering, so early failures (404, 429, 401) keep their HTTP status; if the
    first chunk takes longer than ``heartbeat_s``, answer 200 and keep the stream alive: with ``message_start`` and
    ``ping`` events when translating, with SSE comments while an upstream's own stream (``as_sent``) is awaited."""

    opening = await open_stream(chat, ctx, heartbeat_s)
    translator = StreamTranslator(chat.model, input_estimate=estimate_input_tokens(chat))
    return EventStreamResponse(_events(opening, translator, heartbeat_s, ctx, as_sent, origins),
                             media_type="text/event-stream; charset=utf-8",
                             headers={**STREAM_HEADERS, **served_headers(ctx)})


async def _events(opening: OpeningStream, translator: StreamTranslator, heartbeat_s: float, ctx: CallContext,
                  as_sent: bool, origins: errors.Origins) -> AsyncIterator[bytes]:
    """The stream's events; on a same-dialect route the upstream's own (the translator follows them), then (when
    scillm-resilience continued the answer with another model, ``ctx.notes["continuation"]``) the continuation's
    chunks translated, going on in the same message."""
    request_id = ctx.request_id
    chunks: AsyncIterator[ChatChunk] | None = None
    started = False
    try:
        if not as_sent and not opening.done():  # a slow first token: the message starts, naming the route tried
            if ctx.route is not None:
                translator.model = ctx.route.model
            yield translator.start()
            started = True
        while not opening.done():
            done, _ = await asyncio.wait({opening}, timeout=heartbeat_s)
            if not done:
                yield ping() if started else KEEP_ALIVE
        chunks, first = opening.result()
        if not started and first is not None and first.model:
            translator.model = first.model  # the model that served (as non-streaming answers and chat say)
        if first is not None and first.native is not None:  # the upstream's own events, as it sent them
            translator.follow(first)
            yield first.native
            async for chunk in chunks:
                if chunk.native is not None or "continuation" not in ctx.notes:
                    translator.follow(chunk)  # (a chunk without bytes: another from the same event had them)
                    if chunk.native is not None:
                        yield chunk.native
                    continue
                events = b"".join(translator.chunk(chunk))
                if events:
                    yield events
            if "continuation" in ctx.notes:
                yield b"".join(translator.finish())
            return
        if not started:
            yield translator.start()
        if first is not None:
            yield b"".join(translator.chunk(first))
            async for chunk in chunks:
                events = b"".join(translator.chunk(chunk))
                if events:
                    yield events
        yield b"".join(translator.finish())
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # after the first byte: an error event, never a silent clean end
        yield error_event(origins.relocate(exc), request_id)
    finally:
        if not opening.done():
            opening.cancel()
        if chunks is not None and hasattr(chunks, "aclose"):
            await chunks.aclose()
