"""The OpenAI-compatible chat surface: ``POST /v1/chat/completions`` and ``GET /v1/models``.

The body is modelled for the middleware and kept as sent beside it: an OpenAI-compatible upstream gets the
client's own bytes (``model`` rewritten, scillm's extension fields taken out) and its answer or stream comes back
as it sent it; other upstreams get a translation (``x-scillm-dialect`` says which).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import attrs
import orjson
from starlette.requests import Request
from starlette.responses import Response

from scillm_core import (
    CallContext,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    NativeRequest,
    OpeningStream,
    Runtime,
    SurfaceRegistry,
    call_context,
    errors,
    hookimpl,
    identity_of,
    json_response,
    open_stream,
    parse_json,
    read_body,
    run_chat,
    runtime_of,
    served_headers,
    session_of,
    sse_data,
    sse_error,
    structure,
    unstructure,
    with_native,
)
from scillm_core.builtin.routing import model_catalog
from scillm_core.models import THINKING_BLOCKS
from scillm_core.models.extensions import EXTENSION_FIELDS, take_extensions
from scillm_core.models.native import native_request
from scillm_core.streaming import EventStreamResponse

__all__ = ["EXTENSION_FIELDS", "take_extensions"]  # defined in core (scillm_core.models.extensions), re-exported

STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    surfaces.route("/v1/chat/completions", chat_completions, ["POST"], plugin="chat")
    surfaces.route("/v1/models", list_models, ["GET"], plugin="chat")
    surfaces.route("/v1/models/{model:path}", retrieve_model, ["GET"], plugin="chat")


def parse_chat_request(body: Any, raw: bytes | None = None, headers: Mapping[str, str] | None = None) -> ChatRequest:
    """Validate a wire body into a :class:`ChatRequest` (400 naming the JSON path on bad input). With the body's
    ``raw`` bytes the request carries its native form (same-dialect pass-through); ``headers`` name the session."""
    if not isinstance(body, dict):
        raise errors.InvalidRequest("request body must be a JSON object", param="$")
    modelled = dict(body)
    extensions = take_extensions(modelled)  # scillm's own fields: checked here, never sent upstream
    session = session_of(headers or {}, body)
    if session:
        extensions["session"] = session
    extensions["dialect"] = "openai-chat"
    modelled["scillm"] = extensions
    request = structure(modelled, ChatRequest)
    if not request.messages:
        raise errors.InvalidRequest("messages must not be empty @ $.messages", param="$.messages")
    if raw is not None:
        native = native_request("openai-chat", body, raw, headers or {}, taken=EXTENSION_FIELDS)
        with_native(request, _without_thinking_blocks(native))
    return request


def _without_thinking_blocks(native: NativeRequest) -> NativeRequest:
    """The client's body without the ``thinking_blocks`` its assistant messages carry: Claude's signed thinking
    (as scillm answered it), which only Anthropic takes back, and Anthropic never takes a chat body as sent; an
    OpenAI-compatible upstream rejects the unknown key. The chat request keeps them, for Anthropic attempts."""
    messages = native.body.get("messages")
    if not isinstance(messages, list) or not any(isinstance(m, dict) and THINKING_BLOCKS in m for m in messages):
        return native
    plain = [{k: v for k, v in m.items() if k != THINKING_BLOCKS} if isinstance(m, dict) else m for m in messages]
    return attrs.evolve(native, body={**native.body, "messages": plain}, raw=None)


async def chat_completions(request: Request) -> Response:
    runtime = runtime_of(request)
    raw = await read_body(request, limit_bytes=int(runtime.config.server.max_body_mb * 1024 * 1024))
    chat = parse_chat_request(parse_json(raw), raw if runtime.config.server.passthrough else None, request.headers)
    ctx = call_context(request, timeout_s=chat.scillm.get("timeout"))
    if chat.stream:
        return await _stream(chat, ctx, runtime.config.server.heartbeat_s)
    result = await run_chat(chat, ctx)
    assert isinstance(result, ChatResponse)
    errors.ThinkingBudgetExhausted.check(result, ctx, chat.model, "empty content, finish_reason=length",
                                         "raise max_tokens or lower reasoning_effort")
    metadata = chat.scillm.get("scillm_metadata")
    if result.native is not None and metadata is None:  # the upstream's own answer, as it sent it
        return Response(result.native, media_type="application/json", headers=served_headers(ctx))
    payload = orjson.loads(result.native) if result.native is not None else unstructure(result)
    if metadata is not None:
        payload["scillm_metadata"] = metadata
    return json_response(payload, headers=served_headers(ctx))


async def _stream(chat: ChatRequest, ctx: CallContext, heartbeat_s: float) -> Response:
    """Open the stream before answering so early failures get their real HTTP status; if the first chunk takes
    longer than ``heartbeat_s``, answer 200 and send ``: heartbeat`` comments until it comes."""

    opening = await open_stream(chat, ctx, heartbeat_s)
    return EventStreamResponse(_sse(opening, heartbeat_s, ctx.notes), media_type="text/event-stream",
                             headers={**STREAM_HEADERS, **served_headers(ctx)})


async def _sse(opening: OpeningStream, heartbeat_s: float, notes: dict[str, Any]) -> AsyncIterator[bytes]:
    """The stream's events; on a same-dialect route the upstream's own, then (when scillm-resilience continued the
    answer with another model, ``notes["continuation"]``) the continuation's chunks as ours."""
    chunks: AsyncIterator[ChatChunk] | None = None
    try:
        while not opening.done():
            done, _ = await asyncio.wait({opening}, timeout=heartbeat_s)
            if not done:
                yield b": heartbeat\n\n"
        chunks, first = opening.result()
        if first is not None and first.native is not None:  # same dialect: the upstream's own events
            yield first.native
            async for chunk in chunks:
                if chunk.native is not None:
                    yield chunk.native
                elif "continuation" in notes:
                    yield sse_data(unstructure(chunk))
        elif first is not None:
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
    or login first, each saying what to set: the same catalog ``scillm models`` prints. A key restricted to some
    models sees only those."""
    catalog = _visible_catalog(request)
    data = [_model_object(m) for m in catalog if m["usable"]]
    unavailable = [{"id": m["id"], "owned_by": m["owned_by"], "missing": m["missing"]}
                   for m in catalog if not m["usable"]]
    return json_response({"object": "list", "data": data, "unavailable": unavailable,
                          # Anthropic's page fields, so ``anthropic.Anthropic().models.list()`` reads it too
                          "has_more": False, "first_id": data[0]["id"] if data else None,
                          "last_id": data[-1]["id"] if data else None})


async def retrieve_model(request: Request) -> Response:
    """One model in OpenAI's shape (``client.models.retrieve``); 404 ``model_not_found`` for a name that is not
    callable now, saying what it needs when it is known but unconfigured."""
    name = request.path_params["model"]
    for entry in _visible_catalog(request):
        if entry["id"] == name:
            if not entry["usable"]:
                raise errors.ModelNotFound(f"model {errors.quote(name)} is not usable yet: {entry['missing']}",
                                           param="model")
            return json_response(_model_object(entry))
    raise errors.ModelNotFound(f"model {errors.quote(name)} is not in the catalog (GET /v1/models lists it)",
                               param="model")


def _visible_catalog(request: Request) -> list[dict[str, Any]]:
    identity = identity_of(request)
    return [m for m in model_catalog(runtime_of(request)) if identity.may_call(m["id"], *m["reaches"])]


def _model_object(entry: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI's model object plus Anthropic's fields (``type``, ``display_name``, ``created_at``)."""
    return {"id": entry["id"], "object": "model", "created": 0, "owned_by": entry["owned_by"],
            "type": "model", "display_name": entry["id"], "created_at": "1970-01-01T00:00:00Z"}
