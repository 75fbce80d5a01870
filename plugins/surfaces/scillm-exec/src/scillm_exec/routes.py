"""HTTP routes: POST /v1/scillm/exec, GET .../{run_id}, GET .../{run_id}/events (SSE), POST .../{run_id}/cancel,
POST /v1/scillm/exec/graph."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from scillm_core import errors, identity_of
from scillm_core.events import trace_headers
from scillm_core.streaming import EventStreamResponse
from scillm_core.web import caller_of, json_response, ops_response, read_json, runtime_of
from scillm_exec.config import exec_config
from scillm_exec.events import resume_after, sse_tail
from scillm_exec.manager import ExecManager, spec_from_body
from scillm_exec.shared import sse_follow

__all__ = ["routes"]

BODY_LIMIT = 4 * 1024 * 1024


_MANAGERS: dict[int, ExecManager] = {}


def manager_for(runtime: Any) -> ExecManager:
    """The app's run manager (one per runtime)."""
    manager = _MANAGERS.get(id(runtime))
    if manager is None or manager.runtime is not runtime:
        manager = _MANAGERS[id(runtime)] = ExecManager(runtime)
    return manager


def manager_of(request: Request) -> ExecManager:
    return manager_for(runtime_of(request))


def base_url_of(request: Request) -> str:
    """Where the children of this process (agent CLIs, ``opencode serve``) reach scillm: the configured
    ``[exec] base_url``, else this worker's own loopback address under ``--workers`` (their run keys live in this
    process), else the address the request came in on."""
    runtime = runtime_of(request)
    configured = exec_config(runtime).base_url
    if configured:
        return configured.rstrip("/")
    if runtime.own_url:
        return runtime.own_url
    server = request.scope.get("server")
    if server and server[1]:
        host = server[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{server[1]}"
    return str(request.base_url).rstrip("/")


def _wait_flag(body: dict[str, Any], default: bool) -> bool:
    wait = body.pop("wait", default)
    if not isinstance(wait, bool):
        raise errors.InvalidRequest("wait must be true or false @ $.wait", param="$.wait")
    return wait


async def create(request: Request) -> Response:
    caller = caller_of(request, required=True)
    runtime = runtime_of(request)
    body = await read_json(request, limit_bytes=BODY_LIMIT)
    if not isinstance(body, dict):
        raise errors.InvalidRequest("expected a JSON object @ $", param="$")
    wait = _wait_flag(body, False)
    spec = await spec_from_body(body, runtime)
    manager = manager_of(request)
    run = await manager.start(spec, caller=caller, base_url=base_url_of(request),
                              trace=trace_headers(request.headers), identity=identity_of(request))
    if wait:
        return json_response(await manager.wait(run))
    return json_response(await manager.load(run.run_id) | {"status": run.status}, 202)


async def show(request: Request) -> Response:
    return ops_response(await manager_of(request).load_for(request.path_params["run_id"], identity_of(request)))


async def cancel(request: Request) -> Response:
    caller_of(request, required=True)
    manager = manager_of(request)
    run_id = request.path_params["run_id"]
    await manager.load_for(run_id, identity_of(request))  # 404 for unknown, or another key's
    return json_response(await manager.cancel(run_id))


async def events(request: Request) -> Response:
    manager = manager_of(request)
    run_id = request.path_params["run_id"]
    doc = await manager.load_for(run_id, identity_of(request))
    heartbeat = exec_config(runtime_of(request)).heartbeat_s or runtime_of(request).config.server.heartbeat_s
    after = resume_after(request)  # the last event seq the client has (after=, or an EventSource's Last-Event-ID)
    local = manager.tail(run_id, doc)
    if local is None:  # another process drives it (or drove it elsewhere): its events as copied into the store
        tail = sse_follow(manager.shared, run_id, after, heartbeat, lambda: manager.settled(run_id))
    else:
        log, end = local
        tail = sse_tail(log, after, heartbeat, end)
    return EventStreamResponse(tail, headers={"cache-control": "no-cache"})


async def graph(request: Request) -> Response:
    caller = caller_of(request, required=True)
    body = await read_json(request, limit_bytes=BODY_LIMIT)
    manager = manager_of(request)
    nodes, limit = await manager.parse_graph(body)
    return json_response(await manager.run_graph(nodes, limit, caller=caller, base_url=base_url_of(request),
                                                 trace=trace_headers(request.headers), identity=identity_of(request)))


def routes() -> list[tuple[str, Any, list[str]]]:
    return [("/v1/scillm/exec", create, ["POST"]),
            ("/v1/scillm/exec/graph", graph, ["POST"]),
            ("/v1/scillm/exec/{run_id}", show, ["GET"]),
            ("/v1/scillm/exec/{run_id}/events", events, ["GET"]),
            ("/v1/scillm/exec/{run_id}/cancel", cancel, ["POST"])]

