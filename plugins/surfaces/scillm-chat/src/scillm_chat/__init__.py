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

__all__ = ["EXTENSION_FIELDS", "take_extensions"]

#: scillm's own request fields: taken out of the body before it is modelled, never sent upstream.
EXTENSION_FIELDS = frozenset({"scillm_metadata", "timeout", "json_schema", "schema_retries", "source",
                              "grounding_threshold", "grounding_retries", "cache"})
STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    surfaces.route("/v1/chat/completions", chat_completions, ["POST"], plugin="chat")
    surfaces.route("/v1/models", list_models, ["GET"], plugin="chat")


def take_extensions(body: dict[str, Any], fields: frozenset[str] = EXTENSION_FIELDS) -> dict[str, Any]:
    """Take scillm's own ``fields`` out of a wire body (they never go upstream), checking the shared ones."""
    extensions = {key: body.pop(key) for key in fields.intersection(body)}
    timeout = extensions.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0):
        raise errors.InvalidRequest("timeout must be a positive number of seconds @ $.timeout", param="$.timeout")
    metadata = extensions.get("scillm_metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise errors.InvalidRequest("scillm_metadata must be an object @ $.scillm_metadata",
                                    param="$.scillm_metadata")
    return extensions


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a wire body into a :class:`ChatRequest` (400 naming the JSON path on bad input)."""
    if not isinstance(body, dict):
        raise errors.InvalidRequest("request body must be a JSON object", param="$")
    body["scillm"] = take_extensions(body)
    request = structure(body, ChatRequest)
    if not request.messages:
        raise errors.InvalidRequest("messages must not be empty @ $.messages", param="$.messages")
    return request


def context_for(request: Request, chat: ChatRequest) -> CallContext:
    timeout = chat.scillm.get("timeout")
    return CallContext(runtime=runtime_of(request), request_id=request_id_of(request), caller=caller_of(request),
                       headers=request.headers, deadline=time.monotonic() + timeout if timeout else None)


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
    runtime = runtime_of(request)
    data: dict[str, dict[str, Any]] = {}
    for provider in runtime.providers.values():
        if provider.missing_config() is not None:
            continue
        for name in (*provider.known_models(), *provider.aliases):
            data.setdefault(name, {"id": name, "object": "model", "created": 0, "owned_by": provider.name})
    for name, target in runtime.config.aliases.items():
        data.setdefault(name, {"id": name, "object": "model", "created": 0, "owned_by": f"alias:{target}"})
    for name in runtime.config.groups:
        data.setdefault(name, {"id": name, "object": "model", "created": 0, "owned_by": "group"})
    return json_response({"object": "list", "data": sorted(data.values(), key=lambda m: m["id"])})
