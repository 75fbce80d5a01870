"""The OpenAI-compatible chat surface: ``POST /v1/chat/completions`` and ``GET /v1/models``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
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
    sse_data,
    sse_error,
    structure,
    unstructure,
)
from scillm_core.builtin.routing import model_catalog
from scillm_core.events import PARENT_SCOPE_KEY
from scillm_core.models.extensions import EXTENSION_FIELDS, take_extensions

__all__ = ["EXTENSION_FIELDS", "take_extensions"]  # defined in core (scillm_core.models.extensions), re-exported

STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    surfaces.route("/v1/chat/completions", chat_completions, ["POST"], plugin="chat")
    surfaces.route("/v1/models", list_models, ["GET"], plugin="chat")


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a wire body into a :class:`ChatRequest` (400 naming the JSON path on bad input)."""
    if not isinstance(body, dict):
        raise errors.InvalidRequest("request body must be a JSON object", param="$")
    body["scillm"] = take_extensions(body)  # scillm's own fields: checked here, never sent upstream
    request = structure(body, ChatRequest)
    if not request.messages:
        raise errors.InvalidRequest("messages must not be empty @ $.messages", param="$.messages")
    return request


def context_for(request: Request, chat: ChatRequest) -> CallContext:
    timeout = chat.scillm.get("timeout")
    return CallContext(runtime=runtime_of(request), request_id=request_id_of(request), caller=caller_of(request),
                       headers=request.headers, deadline=time.monotonic() + timeout if timeout else None,
                       parent=request.scope.get(PARENT_SCOPE_KEY))


def served_headers(ctx: CallContext) -> dict[str, str]:
    """Headers saying who served; middleware adds its own through ``ctx.notes["headers"]`` (a dict)."""
    route = ctx.route
    extra = {str(k): str(v) for k, v in (ctx.notes.get("headers") or {}).items()}
    if route is None:
        return {**extra, "x-scillm-attempts": str(ctx.attempts)}
    return {**extra, "x-scillm-provider": route.provider, "x-scillm-served-model": route.model,
            "x-scillm-attempts": str(ctx.attempts)}


async def chat_completions(request: Request) -> Response:
    runtime = runtime_of(request)
    body = await read_json(request, limit_bytes=int(runtime.config.server.max_body_mb * 1024 * 1024))
    chat = parse_chat_request(body)
    ctx = context_for(request, chat)
    if chat.stream:
        return await _stream(chat, ctx, runtime.config.server.heartbeat_s)
    result = await run_chat(chat, ctx)
    assert isinstance(result, ChatResponse)
    errors.ThinkingBudgetExhausted.check(result, ctx, chat.model, "empty content, finish_reason=length",
                                         "raise max_tokens or lower reasoning_effort")
    payload = unstructure(result)
    metadata = chat.scillm.get("scillm_metadata")
    if metadata is not None:
        payload["scillm_metadata"] = metadata
    return json_response(payload, headers=served_headers(ctx))


async def _stream(chat: ChatRequest, ctx: CallContext, heartbeat_s: float) -> Response:
    """Open the stream before answering so early failures get their real HTTP status; if the first chunk takes
    longer than ``heartbeat_s``, answer 200 and send ``: heartbeat`` comments until it comes."""

    opening = await open_stream(chat, ctx, heartbeat_s)
    return StreamingResponse(_sse(opening, heartbeat_s), media_type="text/event-stream",
                             headers={**STREAM_HEADERS, **served_headers(ctx)})


async def _sse(opening: OpeningStream,
               heartbeat_s: float) -> AsyncIterator[bytes]:
    chunks: AsyncIterator[ChatChunk] | None = None
    try:
        while not opening.done():
            done, _ = await asyncio.wait({opening}, timeout=heartbeat_s)
            if not done:
                yield b": heartbeat\n\n"
        chunks, first = opening.result()
        if first is not None:
            yield sse_data(unstructure(first))
            async for chunk in chunks:
                yield sse_data(unstructure(chunk))
        yield b"data: [DONE]\n\n"
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # after the first byte: an error event, never a silent clean end
        yield sse_error(exc)
    finally:
        if not opening.done():
            opening.cancel()
        if chunks is not None and hasattr(chunks, "aclose"):
            await chunks.aclose()


async def list_models(request: Request) -> Response:
    """The names that can be called now (OpenAI's list shape), and under ``unavailable`` the ones that need a key
    or login first, each saying what to set: the same catalog ``scillm models`` prints."""
    catalog = model_catalog(runtime_of(request))
    data = [{"id": m["id"], "object": "model", "created": 0, "owned_by": m["owned_by"]} for m in catalog if m["usable"]]
    unavailable = [{"id": m["id"], "owned_by": m["owned_by"], "missing": m["missing"]}
                   for m in catalog if not m["usable"]]
    return json_response({"object": "list", "data": data, "unavailable": unavailable})
