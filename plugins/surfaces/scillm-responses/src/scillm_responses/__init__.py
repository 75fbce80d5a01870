"""The OpenAI Responses surface: ``POST /v1/responses`` served by any routed model.

The Responses request becomes a core chat request and runs through the normal pipeline (routing, middleware,
every provider); the result comes back as a Response object or as the Responses event stream (``response.created``
... ``response.completed``, ``sequence_number`` on every event), so the official ``openai`` client's
``responses.create`` and Codex CLI work against scillm. scillm keeps no responses: ``previous_response_id`` is
refused with a 400 that says to send the whole conversation. It keeps only the output items of a translated answer
(unless the request said ``"store": false``), for a day, in the state store, so that the ``item_reference`` inputs
clients send back in their next request (the Vercel AI SDK's OpenAI provider does by default) find them.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from scillm_core import (
    CallContext,
    ChatChunk,
    ChatRequest,
    ChatResponse,
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
    with_native,
)
from scillm_core.jsonio import json_type
from scillm_core.models.native import native_request
from scillm_core.streaming import EventStreamResponse
from scillm_responses.items import KeptItems
from scillm_responses.translate import (
    EXTENSION_FIELDS,
    EventStream,
    parse_request,
    response_object,
    without_sealed_thinking,
)

__all__ = ["EventStream", "parse_request", "response_object"]

MAX_ITEM_ID = 128  # the ids of the items scillm keeps are about 50 characters
STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
Keep = Callable[[Sequence[Mapping[str, Any]]], None]  # keeps an answer's output items for item_reference


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    surfaces.route("/v1/responses", create_response, ["POST"], plugin="responses")
    items = runtime.plugin_state["responses"] = KeptItems(runtime)
    surfaces.on_shutdown(items.stop)


async def create_response(request: Request) -> Response:
    runtime = runtime_of(request)
    limit = int(runtime.config.server.max_body_mb * 1024 * 1024)
    raw = await read_body(request, limit_bytes=limit)
    body = parse_json(raw)
    store = body.get("store") if isinstance(body, dict) else None
    if store is not None and not isinstance(store, bool):  # "false" or 0 would have been kept
        raise errors.InvalidRequest(f"expected boolean, got {json_type(store)} @ $.store", param="$.store")
    owner = identity_of(request).owner
    kept_items: KeptItems = runtime.plugin_state["responses"]
    resolved = await _resolve_references(body, kept_items, owner, len(raw), limit)
    if resolved is not body:  # the items themselves, also for an upstream that would have taken the body as sent
        body, raw = resolved, orjson.dumps(resolved)
    origins = errors.Origins()
    chat, echo = parse_request(body, session=session_of(request.headers, body), origins=origins)
    keep = isinstance(body, dict) and body.get("store") is not False  # OpenAI's default: store unless told not to
    echo = {**echo, "store": keep}
    if runtime.config.server.passthrough:  # (the thinking blocks the chat request carries: for Anthropic only)
        native = native_request("openai-responses", body, raw, request.headers, taken=EXTENSION_FIELDS)
        with_native(chat, without_sealed_thinking(native))
    ctx = call_context(request, timeout_s=chat.scillm.get("timeout"))
    kept = functools.partial(kept_items.keep, owner) if keep else None  # before the answer's last event
    try:
        return await _respond(chat, echo, ctx, runtime.config.server.heartbeat_s, origins, kept)
    except errors.ScillmError as exc:  # about the chat request it became: named by the client's own paths
        raise origins.relocate(exc) from None


async def _resolve_references(body: Any, kept: KeptItems, owner: str, size: int = 0, limit: int | None = None
                              ) -> Any:
    """``body`` with each ``item_reference`` input replaced by the output item it names, as kept for ``owner``
    (``body`` itself when it has none); one that is not kept (never was, expired, another key's) is a 400. The
    body (``size`` bytes as sent) with its items in is held to the body's ``limit`` (413): a reference is a few
    dozen bytes, the item it names may be a long answer, and one item may be named any number of times."""
    items = body.get("input") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return body
    wanted = {i: item.get("id") for i, item in enumerate(items)
              if isinstance(item, dict) and item.get("type") == "item_reference"}
    if not wanted:
        return body
    for i, item_id in wanted.items():
        if not isinstance(item_id, str) or not item_id:
            raise errors.InvalidRequest(f"item_reference needs the id of an output item @ $.input[{i}].id",
                                        param=f"$.input[{i}].id")
    unique = [item_id for item_id in dict.fromkeys(wanted.values()) if len(item_id) <= MAX_ITEM_ID]
    named = dict(zip(unique, await kept.find(owner, unique), strict=True))  # (longer ones: none scillm made)
    for i, item_id in wanted.items():
        if named.get(item_id) is None:
            shown = repr(item_id[:64]) + (f"... ({len(item_id)} characters)" if len(item_id) > 64 else "")
            raise errors.InvalidRequest(
                f"item_reference {shown}: no such item kept; scillm keeps no responses, only the output items "
                "of an answer to a request without \"store\": false, for a day, so send the items themselves "
                f"@ $.input[{i}]", param=f"$.input[{i}]")
    if limit is not None:
        sizes = {item_id: len(orjson.dumps(item)) for item_id, item in named.items()}
        total = size + sum(sizes[item_id] for item_id in wanted.values())
        if total > limit:
            raise errors.PayloadTooLarge(
                f"the input with the items its {len(wanted)} item_reference(s) name is {total} bytes; the limit is "
                f"{limit} @ $.input", param="$.input")
    resolved = {i: named[item_id] for i, item_id in wanted.items()}
    return {**body, "input": [resolved.get(i, item) for i, item in enumerate(items)]}


async def _respond(chat: ChatRequest, echo: Mapping[str, Any], ctx: CallContext, heartbeat_s: float,
                   origins: errors.Origins, kept: Keep | None) -> Response:
    if chat.stream:
        return await _stream(chat, echo, ctx, heartbeat_s, origins, kept)
    result = await run_chat(chat, ctx)
    assert isinstance(result, ChatResponse)
    errors.ThinkingBudgetExhausted.check(result, ctx, chat.model, "empty output, max_output_tokens reached",
                                         "raise max_output_tokens or lower reasoning.effort")
    metadata = chat.scillm.get("scillm_metadata")
    if result.native is not None and metadata is None:  # the upstream's own Response object, as it sent it
        return Response(result.native, media_type="application/json", headers=served_headers(ctx))
    if result.native is not None:
        payload = orjson.loads(result.native)
    else:
        payload = response_object(result, echo)
        if kept is not None:
            kept(payload["output"])
    if metadata is not None:
        payload["scillm_metadata"] = metadata
    return json_response(payload, headers=served_headers(ctx))


async def _stream(chat: ChatRequest, echo: Mapping[str, Any], ctx: CallContext, heartbeat_s: float,
                  origins: errors.Origins, kept: Keep | None) -> Response:
    """Open the stream before answering, so early failures keep their HTTP status; heartbeats while waiting."""

    opening = await open_stream(chat, ctx, heartbeat_s)
    return EventStreamResponse(_events(opening, EventStream(chat.model, echo), heartbeat_s, ctx.notes, origins,
                                       kept),
                             media_type="text/event-stream", headers={**STREAM_HEADERS, **served_headers(ctx)})


async def _events(opening: OpeningStream, events: EventStream, heartbeat_s: float, notes: dict[str, Any],
                  origins: errors.Origins, kept: Keep | None = None) -> AsyncIterator[bytes]:
    """The stream's events; on a same-dialect route the upstream's own (``events`` follows them), then (when
    scillm-resilience continued the answer with another model, ``notes["continuation"]``) the continuation's
    chunks translated, going on in the same response."""
    chunks: AsyncIterator[ChatChunk] | None = None
    started = False
    try:
        while not opening.done():
            done, _ = await asyncio.wait({opening}, timeout=heartbeat_s)
            if not done:
                yield b": heartbeat\n\n"
        chunks, first = opening.result()
        if first is not None and first.native is not None:  # the upstream's own events, as it sent them
            started = True
            events.follow(first)
            yield first.native
            async for chunk in chunks:
                if chunk.native is not None or "continuation" not in notes:
                    events.follow(chunk)  # (a chunk without bytes: another from the same event had them)
                    if chunk.native is not None:
                        yield chunk.native
                    continue
                for event in events.feed(chunk):
                    yield event
            if "continuation" in notes:
                for event in events.complete():
                    yield event
            return
        if first is not None and first.model:
            events.model = first.model  # the model that served, from response.created on
        for event in events.start():
            yield event
        started = True
        if first is not None:
            for event in events.feed(first):
                yield event
            async for chunk in chunks:
                for event in events.feed(chunk):
                    yield event
        last = events.complete()
        if kept is not None:
            kept([item for item in events.output if item is not None])
        for event in last:
            yield event
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # after the first byte: response.failed, never a silent clean end
        if not started:
            for event in events.start():
                yield event
        for event in events.fail(origins.relocate(exc)):
            yield event
    finally:
        if not opening.done():
            opening.cancel()
        if chunks is not None and hasattr(chunks, "aclose"):
            await chunks.aclose()
