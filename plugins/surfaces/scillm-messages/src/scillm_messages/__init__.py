"""The inbound Anthropic dialect: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

The official ``anthropic`` SDK and Claude Code can use any routed model through scillm: the request is translated
to a core :class:`ChatRequest`, run through the normal pipeline (routing, middleware, the provider), and the
result translated back to a Messages response or event stream. Errors on these routes use the Anthropic envelope.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from scillm_core import (
    CallContext,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    MiddlewareRegistry,
    OpeningStream,
    Runtime,
    SurfaceRegistry,
    caller_of,
    errors,
    hookimpl,
    json_response,
    open_stream,
    read_json,
    request_id_of,
    run_chat,
    runtime_of,
)
from scillm_core.events import PARENT_SCOPE_KEY
from scillm_messages.tokens import estimate_input_tokens
from scillm_messages.translate import StreamTranslator, fit_thinking, parse_messages_request, ping, to_messages_response
from scillm_messages.wire_errors import AnthropicErrorMiddleware, anthropic_error_parts, error_event

__all__ = ["estimate_input_tokens", "parse_messages_request", "to_messages_response"]

log = logging.getLogger("scillm")
STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    surfaces.route("/v1/messages", messages, ["POST"], plugin="messages")
    surfaces.route("/v1/messages/count_tokens", count_tokens, ["POST"], plugin="messages")


@hookimpl
def scillm_register_middleware(middleware: MiddlewareRegistry, runtime: Runtime) -> None:
    # outside auth (order 10): its 401/403 on these routes are re-rendered in the Anthropic envelope
    middleware.add(AnthropicErrorMiddleware, order=5, name="anthropic-errors")


def context_for(request: Request) -> CallContext:
    return CallContext(runtime=runtime_of(request), request_id=request_id_of(request), caller=caller_of(request),
                       headers=request.headers,
                       parent=request.scope.get(PARENT_SCOPE_KEY))


def served_headers(ctx: CallContext) -> dict[str, str]:
    route = ctx.route
    if route is None:
        return {"x-scillm-attempts": str(ctx.attempts)}
    return {"x-scillm-provider": route.provider, "x-scillm-served-model": route.model,
            "x-scillm-attempts": str(ctx.attempts)}


def error_response(request: Request, exc: BaseException) -> Response:
    if not isinstance(exc, errors.ScillmError):
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    status, body, headers = anthropic_error_parts(exc, request_id_of(request))
    return json_response(body, status, headers)


async def _parse(request: Request) -> ChatRequest:
    runtime = runtime_of(request)
    body = await read_json(request, limit_bytes=int(runtime.config.server.max_body_mb * 1024 * 1024))
    chat = parse_messages_request(body)
    route = runtime.hooks.route_model(chat, runtime)  # raises for an unknown model, as the pipeline would
    provider = runtime.providers.get(route.provider)
    return fit_thinking(chat, anthropic=provider is not None and provider.family == "anthropic")


async def messages(request: Request) -> Response:
    try:
        chat = await _parse(request)
        ctx = context_for(request)
        if chat.stream:
            return await _stream(chat, ctx, runtime_of(request).config.server.heartbeat_s)
        result = await run_chat(chat, ctx)
        assert isinstance(result, ChatResponse)
        errors.ThinkingBudgetExhausted.check(result, ctx, chat.model, "empty content, stop_reason max_tokens",
                                             "raise max_tokens or lower the thinking budget")
        return json_response(to_messages_response(result, chat.model), headers=served_headers(ctx))
    except Exception as exc:
        return error_response(request, exc)


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


async def _stream(chat: ChatRequest, ctx: CallContext, heartbeat_s: float) -> Response:
    """Open the upstream stream before answering, so early failures (404, 429, 401) keep their HTTP status; if the
    first chunk takes longer than ``heartbeat_s``, answer 200 with ``message_start`` and send ``ping`` events."""

    opening = await open_stream(chat, ctx, heartbeat_s)
    translator = StreamTranslator(chat.model, input_estimate=estimate_input_tokens(chat))
    return StreamingResponse(_events(opening, translator, heartbeat_s, ctx.request_id),
                             media_type="text/event-stream; charset=utf-8",
                             headers={**STREAM_HEADERS, **served_headers(ctx)})


async def _events(opening: OpeningStream,
                  translator: StreamTranslator, heartbeat_s: float, request_id: str) -> AsyncIterator[bytes]:
    chunks: AsyncIterator[ChatChunk] | None = None
    try:
        yield translator.start()
        while not opening.done():
            done, _ = await asyncio.wait({opening}, timeout=heartbeat_s)
            if not done:
                yield ping()
        chunks, first = opening.result()
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
        yield error_event(exc, request_id)
    finally:
        if not opening.done():
            opening.cancel()
        if chunks is not None and hasattr(chunks, "aclose"):
            await chunks.aclose()
