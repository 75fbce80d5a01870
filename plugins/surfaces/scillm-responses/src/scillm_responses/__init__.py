"""The OpenAI Responses surface: ``POST /v1/responses`` served by any routed model.

The Responses request becomes a core chat request and runs through the normal pipeline (routing, middleware,
every provider); the result comes back as a Response object or as the Responses event stream (``response.created``
... ``response.completed``, ``sequence_number`` on every event), so the official ``openai`` client's
``responses.create`` and Codex CLI work against scillm. scillm keeps no response state: ``previous_response_id``
is refused with a 400 that says to send the whole conversation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from scillm_core import (
    CallContext,
    ChatChunk,
    ChatRequest,
    ChatResponse,
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
from scillm_responses.translate import EventStream, parse_request, response_object

__all__ = ["EventStream", "parse_request", "response_object"]

STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    surfaces.route("/v1/responses", create_response, ["POST"], plugin="responses")


def context_for(request: Request, chat: ChatRequest) -> CallContext:
    timeout = chat.scillm.get("timeout")
    return CallContext(runtime=runtime_of(request), request_id=request_id_of(request), caller=caller_of(request),
                       headers=request.headers, deadline=time.monotonic() + timeout if timeout else None,
                       parent=request.scope.get(PARENT_SCOPE_KEY))


def served_headers(ctx: CallContext) -> dict[str, str]:
    route = ctx.route
    if route is None:
        return {"x-scillm-attempts": str(ctx.attempts)}
    return {"x-scillm-provider": route.provider, "x-scillm-served-model": route.model,
            "x-scillm-attempts": str(ctx.attempts)}


async def create_response(request: Request) -> Response:
    runtime = runtime_of(request)
    body = await read_json(request, limit_bytes=int(runtime.config.server.max_body_mb * 1024 * 1024))
    chat, echo = parse_request(body)
    ctx = context_for(request, chat)
    if chat.stream:
        return await _stream(chat, echo, ctx, runtime.config.server.heartbeat_s)
    result = await run_chat(chat, ctx)
    assert isinstance(result, ChatResponse)
    errors.ThinkingBudgetExhausted.check(result, ctx, chat.model, "empty output, max_output_tokens reached",
                                         "raise max_output_tokens or lower reasoning.effort")
    payload = response_object(result, echo)
    metadata = chat.scillm.get("scillm_metadata")
    if metadata is not None:
        payload["scillm_metadata"] = metadata
    return json_response(payload, headers=served_headers(ctx))


async def _stream(chat: ChatRequest, echo: Mapping[str, Any], ctx: CallContext, heartbeat_s: float) -> Response:
    """Open the stream before answering, so early failures keep their HTTP status; heartbeats while waiting."""

    opening = await open_stream(chat, ctx, heartbeat_s)
    return StreamingResponse(_events(opening, EventStream(chat.model, echo), heartbeat_s),
                             media_type="text/event-stream", headers={**STREAM_HEADERS, **served_headers(ctx)})


async def _events(opening: OpeningStream, events: EventStream,
                  heartbeat_s: float) -> AsyncIterator[bytes]:
    chunks: AsyncIterator[ChatChunk] | None = None
    started = False
    try:
        while not opening.done():
            done, _ = await asyncio.wait({opening}, timeout=heartbeat_s)
            if not done:
                yield b": heartbeat\n\n"
        chunks, first = opening.result()
        for event in events.start():
            yield event
        started = True
        if first is not None:
            for event in events.feed(first):
                yield event
            async for chunk in chunks:
                for event in events.feed(chunk):
                    yield event
        for event in events.complete():
            yield event
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # after the first byte: response.failed, never a silent clean end
        if not started:
            for event in events.start():
                yield event
        for event in events.fail(exc):
            yield event
    finally:
        if not opening.done():
            opening.cancel()
        if chunks is not None and hasattr(chunks, "aclose"):
            await chunks.aclose()
