"""HTTP routes of the OpenCode surfaces (serve runs, the debugger flow, the transport, monitor links)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from scillm_exec import VIEW_KEY_PREFIX, base_url_of, resume_after, sse_follow, sse_tail
from starlette.requests import Request
from starlette.responses import Response

from scillm_core import Identity, Runtime, errors, identity_of
from scillm_core.events import trace_headers
from scillm_core.streaming import EventStreamResponse
from scillm_core.web import caller_of, json_response, ops_response, query_int, read_json, runtime_of
from scillm_opencode.book import RunBook, Sessions
from scillm_opencode.config import enabled, opencode_config
from scillm_opencode.monitor import view_routes
from scillm_opencode.records import RUN_ID
from scillm_opencode.runs import ServeRuns
from scillm_opencode.serve import ServeManager
from scillm_opencode.transport import EVENT_TYPES, MODES, Transport

__all__ = ["OpenCode", "opencode_of", "routes"]

BODY_LIMIT = 4 * 1024 * 1024
RUNS = "/v1/scillm/opencode/runs"
TRANSPORT = "/v1/scillm/opencode/transport"


class OpenCode:
    """The app's OpenCode state: the server, the session slots, serve runs and transport runs."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.serve = ServeManager(runtime)
        self.sessions = Sessions(runtime, self.serve)
        self.runs = ServeRuns(runtime, self.sessions)
        self.transport = Transport(runtime, self.sessions)

    async def startup(self) -> None:
        await self.runs.records.recover()
        await self.transport.records.recover()

    async def shutdown(self) -> None:
        await self.runs.shutdown()
        await self.transport.shutdown()
        await self.serve.stop()

    def monitor_link(self, request: Request, base: str, run_id: str, caller: str | None, identity: Identity, *,
                     transport: bool) -> dict[str, Any]:
        ttl = opencode_config(self.runtime).monitor_ttl_s
        key = self.serve.keys.mint(run_id, caller, prefix=VIEW_KEY_PREFIX, allow=view_routes(base, transport=transport),
                                   ttl_s=ttl, identity=identity, refusal="a monitor key may read its own run only")
        origin = str(request.base_url).rstrip("/")
        return {"monitor_url": f"{origin}{base}/monitor#token={key}", "monitor_expires_in_s": ttl}


def opencode_of(runtime: Runtime) -> OpenCode:
    state = runtime.plugin_state.get("opencode")
    if state is None:
        state = runtime.plugin_state["opencode"] = OpenCode(runtime)
    return state


def _surface(request: Request) -> OpenCode:
    runtime = runtime_of(request)
    if not enabled(runtime):
        raise errors.NotFound("OpenCode serve is disabled: set SCILLM_OPENCODE_SERVE_ENABLED=1 (or "
                              "[opencode] enabled = true) on the server", code="opencode_serve_disabled")
    return opencode_of(runtime)


def _run_id(request: Request) -> str:
    run_id = request.path_params["run_id"]
    if not RUN_ID.match(run_id):
        raise errors.NotFound(f"no run {errors.quote(run_id)}")
    return str(run_id)


def _heartbeat(runtime: Runtime) -> float:
    return opencode_config(runtime).heartbeat_s or runtime.config.server.heartbeat_s


def _limit(request: Request) -> int:
    return query_int(request, "limit", default=100, minimum=1, maximum=1000)


async def _reason(request: Request) -> str:
    if request.headers.get("content-length", "0") == "0" and "transfer-encoding" not in request.headers:
        return "aborted by the caller"  # no body (read bounded otherwise: a 10 GB body is a 413, never read)
    doc = await read_json(request, limit_bytes=64 << 10)
    if not isinstance(doc, dict) or set(doc) - {"reason"} or not isinstance(doc.get("reason", ""), str):
        raise errors.InvalidRequest("the abort body is optional: {\"reason\": \"...\"} @ $", param="$")
    return str(doc.get("reason") or "aborted by the caller")[:500]


# -- what both kinds of run have ------------------------------------------------------------------------------

def run_routes(base: str, *, transport: bool) -> list[tuple[str, Any, list[str]]]:
    """Index, show, live diff, event stream, abort and monitor links of serve runs (``transport=False``) or transport
    runs, under ``base``."""
    book: Callable[[OpenCode], RunBook[Any]] = (lambda oc: oc.transport) if transport else (lambda oc: oc.runs)

    async def index(request: Request) -> Response:
        identity = identity_of(request)  # a key lists its own runs
        runs, degraded = await book(_surface(request)).records.index(
            _limit(request), owner=None if identity.master else identity.owner)
        return ops_response({"runs": runs} | ({"degraded": degraded} if degraded is not None else {}))

    async def show(request: Request) -> Response:
        return ops_response(await book(_surface(request)).load_for(_run_id(request), identity_of(request)))

    async def diff(request: Request) -> Response:
        oc, run_id = _surface(request), _run_id(request)
        await book(oc).load_for(run_id, identity_of(request))
        return json_response(await book(oc).live_diff(run_id))

    async def events(request: Request) -> Response:
        oc = _surface(request)
        run_id, after = _run_id(request), resume_after(request)
        doc = await book(oc).load_for(run_id, identity_of(request))  # 404 (and an orphan is finalised) before streaming
        heartbeat = _heartbeat(oc.runtime)
        local = book(oc).tail(run_id, doc)
        if local is None:  # another process drives it (or drove it elsewhere): its events as copied into the store
            stream = sse_follow(book(oc).shared, run_id, after, heartbeat, lambda: book(oc).settled(run_id))
        else:
            log, end = local
            stream = sse_tail(log, after, heartbeat, end)
        return EventStreamResponse(stream, headers={"cache-control": "no-cache"})

    async def abort(request: Request) -> Response:
        oc = _surface(request)
        caller_of(request, required=True)
        run_id = _run_id(request)
        reason = await _reason(request)
        await book(oc).load_for(run_id, identity_of(request))
        return json_response(await book(oc).abort(run_id, reason))

    async def monitor(request: Request) -> Response:
        oc = _surface(request)
        caller = caller_of(request, required=True)
        run_id, identity = _run_id(request), identity_of(request)
        await book(oc).load_for(run_id, identity)
        return json_response({"run_id": run_id} | oc.monitor_link(request, f"{base}/{run_id}", run_id, caller,
                                                                   identity, transport=transport))

    return [(base, index, ["GET"]), (base + "/{run_id}", show, ["GET"]), (base + "/{run_id}/diff", diff, ["GET"]),
            (base + ("/{run_id}/events/stream" if transport else "/{run_id}/events"), events, ["GET"]),
            (base + "/{run_id}/abort", abort, ["POST"]), (base + "/{run_id}/monitor", monitor, ["POST"])]


# -- serve runs ------------------------------------------------------------------------------------------------

async def _create(request: Request, *, debugger: bool) -> Response:
    oc = _surface(request)
    caller = caller_of(request, required=True)
    body = await read_json(request, limit_bytes=BODY_LIMIT)
    cfg = opencode_config(oc.runtime)
    if debugger:
        parsed = oc.runs.parse(body, agent_default=cfg.debugger_agent, skills_default=cfg.debugger_skills)
        server = await oc.serve.ensure(base_url_of(request))
        if parsed["agent"] == cfg.debugger_agent and cfg.debugger_agent not in await server.profiles():
            from scillm_opencode.serve import DEBUGGER_PROMPT  # an external server without the profile

            parsed["agent"] = "build"
            parsed["system"] = DEBUGGER_PROMPT + ("\n\n" + parsed["system"] if parsed["system"] else "")
    else:
        parsed = oc.runs.parse(body)
    identity = identity_of(request)
    run = await oc.runs.start(parsed, caller=caller, identity=identity, base_url=base_url_of(request),
                              trace=trace_headers(request.headers))
    link = oc.monitor_link(request, f"{RUNS}/{run.run_id}", run.run_id, caller, identity, transport=False)
    if parsed["wait"]:
        return json_response(await oc.runs.wait(run) | link)
    return json_response(oc.runs.doc(run) | {"receipt": True, "wait": False} | link)


async def create_run(request: Request) -> Response:
    return await _create(request, debugger=False)


async def debugger_run(request: Request) -> Response:
    return await _create(request, debugger=True)


def _server(oc: OpenCode, identity: Identity) -> dict[str, Any]:
    """The server's state; its address, process and restarts only for the master key."""
    serve = oc.serve.describe()
    return serve if identity.master else {k: serve[k] for k in ("mode", "state", "version")}


async def serve_status(request: Request) -> Response:
    """The server, and the live runs: all of them for the master key, a virtual key's own for it."""
    oc, identity = _surface(request), identity_of(request)
    return ops_response({"serve": _server(oc, identity), "live_runs": oc.runs.live(identity),
                          "live_transport_runs": oc.transport.live(identity)})


# -- transport -------------------------------------------------------------------------------------------------

async def capabilities(request: Request) -> Response:
    oc = _surface(request)
    server = oc.serve.server
    agents = await server.profiles() if server is not None and not server.died.is_set() else None
    return json_response({
        "transport_api": True, "opencode": _server(oc, identity_of(request)), "agents": agents,
        "node_modes": list(MODES),
        "event_types": list(EVENT_TYPES), "event_stream": "sse", "resumable": "after=<seq> or Last-Event-ID",
        "heartbeat_s": _heartbeat(oc.runtime), "steer": True, "permission_reply": ["once", "always", "reject"],
        "abort": True, "max_concurrency": opencode_config(oc.runtime).max_concurrency})


async def create_transport(request: Request) -> Response:
    oc = _surface(request)
    caller = caller_of(request, required=True)
    body = await read_json(request, limit_bytes=BODY_LIMIT)
    parsed = oc.transport.parse(body)
    identity = identity_of(request)
    run = await oc.transport.start(parsed, caller=caller, identity=identity, base_url=base_url_of(request),
                                   trace=trace_headers(request.headers))
    base = f"{TRANSPORT}/runs/{run.run_id}"
    link = oc.monitor_link(request, base, run.run_id, caller, identity, transport=True)
    return json_response(oc.transport.doc(run) | {"events_stream": f"{base}/events/stream"} | link, 202)


def _mutating(handler: Callable[[Transport, str, Any], Awaitable[dict[str, Any]]]
              ) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        oc = _surface(request)
        caller_of(request, required=True)
        body = await read_json(request, limit_bytes=256 << 10)
        run_id = _run_id(request)
        await oc.transport.load_for(run_id, identity_of(request))
        return json_response(await handler(oc.transport, run_id, body))

    return endpoint


def routes() -> list[tuple[str, Any, list[str]]]:
    return [
        (RUNS, create_run, ["POST"]),
        *run_routes(RUNS, transport=False),
        ("/v1/scillm/opencode/serve", serve_status, ["GET"]),
        ("/v1/scillm/opencode/serve/debugger/run", debugger_run, ["POST"]),
        (TRANSPORT + "/capabilities", capabilities, ["GET"]),
        (TRANSPORT + "/runs", create_transport, ["POST"]),
        *run_routes(TRANSPORT + "/runs", transport=True),
        (TRANSPORT + "/runs/{run_id}/steer", _mutating(Transport.steer), ["POST"]),
        (TRANSPORT + "/runs/{run_id}/permission", _mutating(Transport.permission), ["POST"]),
    ]
