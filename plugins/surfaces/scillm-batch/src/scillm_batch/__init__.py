"""Batch surface: ``POST /v1/scillm/batch/completions`` (JSON or SSE), ``GET /v1/scillm/batch/{batch_id}``,
the ``scillm batch`` command, and :func:`scillm_batch.client.complete_all` for callers who batch themselves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from attrs import frozen
from starlette.requests import Request
from starlette.responses import Response

from scillm_batch.engine import (
    BATCH_NS,
    ITEM_NS,
    BatchSpec,
    Lane,
    PoolConfig,
    build_items,
    check_id,
    check_schemas,
    lanes_for,
    progress_of,
    run_batch,
)
from scillm_batch.worker import Worker, events_ns
from scillm_core import (
    CommandRegistry,
    Runtime,
    SurfaceRegistry,
    caller_of,
    errors,
    hookimpl,
    identity_of,
    json_response,
    max_cost_of,
    read_json,
    require_visible,
    runtime_of,
)
from scillm_core.events import trace_headers
from scillm_core.models.extensions import check_timeout, take_extensions
from scillm_core.streaming import EventStreamResponse

__all__ = ["BatchConfig", "Lane", "PoolConfig"]

#: Top-level request keys that are the batch's own, not chat parameters shared by the items.
BATCH_KEYS = frozenset({"model_pool", "model", "batch_id", "items", "stream", "timeout", "concurrency",
                        "max_cost_usd"})


@frozen(kw_only=True)
class BatchConfig:
    """``[batch]``: limits for one batch request."""

    max_items: int = 10_000
    default_concurrency: int = 16
    max_body_mb: float = 32.0  # ~3 KB for each of 10,000 items; split larger batches
    worker_capacity: int = 256     # queued items this process holds at once (running or waiting for a lane)


@hookimpl
def scillm_config_sections() -> Mapping[str, Any]:
    return {"batch": BatchConfig, "pools": Mapping[str, PoolConfig]}


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    surfaces.route("/v1/scillm/batch/completions", completions, ["POST"], plugin="batch")
    surfaces.route("/v1/scillm/batch/completions/stream", completions_stream, ["POST"], plugin="batch")
    surfaces.route("/v1/scillm/batch/{batch_id}", status, ["GET"], plugin="batch")
    surfaces.route("/v1/scillm/batch/{batch_id}/events", events, ["GET"], plugin="batch")
    worker = runtime.plugin_state["batch"] = Worker(runtime, _settings(runtime).worker_capacity)
    surfaces.on_startup(worker.start)
    surfaces.on_shutdown(worker.stop)


@hookimpl
def scillm_register_commands(commands: CommandRegistry) -> None:
    from scillm_batch.cli import configure, run

    commands.add("batch", "run a JSONL file of chat items through a scillm server, with resume", configure, run)


@hookimpl
def scillm_health(runtime: Runtime) -> dict[str, Any]:
    pools = _pools(runtime)
    worker = runtime.plugin_state.get("batch")
    return {"batch": {"enabled": True, "fails": "closed",
                      "pools": {name: [lane.label for lane in pool.lanes] for name, pool in pools.items()},
                      "worker": worker.describe() if worker is not None else None}}


def _settings(runtime: Runtime) -> BatchConfig:
    return runtime.config.sections.get("batch") or BatchConfig()  # type: ignore[no-any-return]


def _pools(runtime: Runtime) -> Mapping[str, PoolConfig]:
    return runtime.config.sections.get("pools") or {}  # type: ignore[no-any-return]


async def _spec(request: Request) -> tuple[BatchSpec, bool]:
    """The validated batch and whether the client asked for the SSE form (``"stream": true``)."""
    runtime = runtime_of(request)
    settings = _settings(runtime)
    body = await read_json(request, limit_bytes=int(settings.max_body_mb * 1024 * 1024))
    if not isinstance(body, dict):
        raise errors.InvalidRequest("request body must be a JSON object", param="$")
    concurrency = body.get("concurrency", settings.default_concurrency)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise errors.InvalidRequest("concurrency must be a positive integer @ $.concurrency", param="$.concurrency")
    timeout = check_timeout(body.get("timeout"), "$.timeout")
    max_cost = max_cost_of(body.get("max_cost_usd"), "$.max_cost_usd")
    batch_id = body.get("batch_id")
    if batch_id is not None:
        batch_id = check_id(batch_id, "batch_id", "$.batch_id")
    pool, lanes = lanes_for(body.get("model_pool"), body.get("model"), _pools(runtime), concurrency)
    shared = {k: v for k, v in body.items() if k not in BATCH_KEYS}
    take_extensions(dict(shared), where="$")  # shared scillm fields (scillm_metadata ...) are checked once
    items = build_items(body.get("items"), shared, settings.max_items)
    await check_schemas(items, shared)
    identity = identity_of(request)
    batch_id = batch_id or f"batch-{_short_hash(items, identity.owner)}"
    spec = BatchSpec(batch_id=batch_id, pool=pool, lanes=lanes, items=items, timeout_s=timeout,
                     caller=caller_of(request), trace=trace_headers(request.headers), identity=identity,
                     max_cost_usd=max_cost)
    return spec, body.get("stream") is True


def _short_hash(items: Any, owner: str) -> str:
    """The default batch id: the items' hash, per owner (two keys submitting the same items get two batches)."""
    import hashlib

    return hashlib.sha256(orjson.dumps([owner, [[i.item_id, i.body] for i in items]], option=orjson.OPT_SORT_KEYS)
                          ).hexdigest()[:16]


async def completions(request: Request) -> Response:
    spec, stream = await _spec(request)
    if stream:
        return _stream(spec, runtime_of(request))

    async def ignore(event: str, data: Mapping[str, Any]) -> None:
        return None

    return json_response(await run_batch(spec, runtime_of(request), ignore))


async def completions_stream(request: Request) -> Response:
    spec, _ = await _spec(request)
    return _stream(spec, runtime_of(request))


def _stream(spec: BatchSpec, runtime: Runtime) -> Response:
    async def events() -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def emit(event: str, data: Mapping[str, Any]) -> None:
            await queue.put(f"event: {event}\ndata: ".encode() + orjson.dumps(data) + b"\n\n")

        async def produce() -> None:
            try:
                await run_batch(spec, runtime, emit)
            except errors.ScillmError as exc:
                await queue.put(b"event: error\ndata: " + orjson.dumps(exc.body()) + b"\n\n")
            finally:
                await queue.put(None)

        task = asyncio.ensure_future(produce())
        try:
            while (chunk := await queue.get()) is not None:
                yield chunk
        finally:
            task.cancel()  # the client left: stop the batch; stored results make a resubmission resume

    return EventStreamResponse(events(), headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


async def status(request: Request) -> Response:
    runtime = runtime_of(request)
    batch_id = request.path_params["batch_id"]
    batch = await runtime.store.get(BATCH_NS, batch_id)
    require_visible(identity_of(request), batch.get("owner") if batch else None, f"batch {errors.quote(batch_id)}")
    if batch is None:
        raise errors.NotFound(f"no batch {errors.quote(batch_id)}")
    results = await runtime.store.scan(ITEM_NS + batch_id, limit=1_000_000)
    return json_response(progress_of(batch, results))



async def events(request: Request) -> Response:
    """SSE of a batch's stored results as they land, from any process on the state store: ``item_completed`` /
    ``item_failed`` (each with ``cursor``; resume with ``?after=<cursor>``), then ``batch_done`` once every item has a
    result, with ``: heartbeat`` comments while waiting."""
    runtime = runtime_of(request)
    batch_id = request.path_params["batch_id"]
    batch = await runtime.store.get(BATCH_NS, batch_id)
    require_visible(identity_of(request), batch.get("owner") if batch else None, f"batch {errors.quote(batch_id)}")
    if batch is None:
        raise errors.NotFound(f"no batch {errors.quote(batch_id)}")
    after = request.query_params.get("after", "")
    try:  # read before the stream starts: a cursor the store never gave out is a 400, not a stream cut after its head
        first = await runtime.store.follow(events_ns(batch_id), after, limit=1000)
    except ValueError:
        raise errors.InvalidRequest(f"after must be a cursor from this batch's events, got {after[:40]!r} "
                                    "@ query.after", param="query.after") from None

    async def stream() -> AsyncIterator[bytes]:
        cursor, found = after, first
        while True:
            for cursor, result in found:
                data = {k: v for k, v in result.items() if k != "lane_counts"}  # "instance": which one ran it
                kind = "item_completed" if data.get("ok") else "item_failed"
                yield f"event: {kind}\ndata: ".encode() + orjson.dumps({**data, "cursor": cursor}) + b"\n\n"
            if not found:
                progress = progress_of(batch, await runtime.store.scan(ITEM_NS + batch_id, limit=1_000_000))
                if progress["done"]:  # caught up with the log and every item has a result
                    summary = {k: v for k, v in progress.items() if k != "results"}
                    yield b"event: batch_done\ndata: " + orjson.dumps(summary) + b"\n\n"
                    return
                yield b": heartbeat\n\n"
            found = await runtime.store.follow(events_ns(batch_id), cursor, limit=1000, block_s=5.0)

    return EventStreamResponse(stream(), headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
