"""The ops dashboard at ``/ui``: plain HTML, CSS and one script served by scillm itself (no build step, no CDN).

The page holds no data and loads without a key; it shows a login form and keeps the key in the script's memory
only, sending it in the ``Authorization`` header of every data call. The data calls are read-only JSON endpoints
under ``/v1/scillm/ui/`` that authenticate like the rest of the API and never show a secret; the page renders
every value as text (``textContent``), and its Content-Security-Policy allows no inline script at all.

What the endpoints return is built from events (``scillm_core.events``; see ``state.py``) and from the
``scillm_health`` hook (circuits, concurrency, AIMD limits), never from another plugin's internals.
Config: ``[ui]`` (``state.UiConfig``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from scillm_core import (
    Runtime,
    SurfaceRegistry,
    __version__,
    errors,
    hookimpl,
    identity_of,
    ops_response,
    runtime_of,
)
from scillm_core.redact import env_secrets
from scillm_core.web import query_int
from scillm_ui.state import DIMENSIONS, KINDS, UiConfig, UiState, provider_rows

__all__ = ["UiConfig", "UiState"]

PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "x-frame-options": "DENY",
    "cache-control": "no-cache",
}
DATA_HEADERS = {"cache-control": "no-store"}
ASSETS = {"/ui": ("index.html", "text/html; charset=utf-8"), "/ui/app.js": ("app.js", "text/javascript"),
          "/ui/app.css": ("app.css", "text/css")}


def _config(runtime: Runtime) -> UiConfig:
    return runtime.config.sections.get("ui") or UiConfig()  # type: ignore[no-any-return]


def state_of(runtime: Runtime) -> UiState:
    return runtime.plugin_state["ui"]  # type: ignore[no-any-return]


@hookimpl
def scillm_config_sections() -> Mapping[str, type]:
    return {"ui": UiConfig}


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    config = _config(runtime)
    if not config.enabled:
        return
    state = runtime.plugin_state["ui"] = UiState(config, env_secrets(runtime.env))
    runtime.events.subscribe(state, KINDS)
    files = resources.files("scillm_ui") / "static"
    for path, (name, media_type) in ASSETS.items():
        surfaces.route(path, _asset((files / name).read_bytes(), media_type), ["GET"], plugin="ui", public=True)
    for path, endpoint in (("/v1/scillm/ui/summary", summary), ("/v1/scillm/ui/calls", calls),
                           ("/v1/scillm/ui/calls/{call_id}", call), ("/v1/scillm/ui/batches", batches),
                           ("/v1/scillm/ui/runs", runs), ("/v1/scillm/ui/series", series)):
        surfaces.route(path, endpoint, ["GET"], plugin="ui")


@hookimpl
def scillm_health(runtime: Runtime) -> Mapping[str, Any]:
    state = runtime.plugin_state.get("ui")
    if state is None:
        return {"ui": {"enabled": False}}
    return {"ui": {"enabled": True, "path": "/ui", "calls_kept": len(state.calls), "max_calls": state.config.max_calls}}


def _asset(body: bytes, media_type: str) -> Any:
    async def serve(request: Request) -> Response:
        return Response(body, media_type=media_type, headers=PAGE_HEADERS)

    return serve


def _data(payload: Any) -> Response:
    return ops_response(payload, headers=DATA_HEADERS)  # names and texts in it redacted


def _param(request: Request, name: str, limit: int = 200) -> str:
    value = request.query_params.get(name, "")
    if len(value) > limit:
        raise errors.InvalidRequest(f"{name} is longer than {limit} characters @ query.{name}", param=f"query.{name}")
    return value


async def summary(request: Request) -> Response:
    """The overview; a virtual key's counts are of its own calls, batches and runs (provider health is shared)."""
    runtime = runtime_of(request)
    state = state_of(runtime)
    viewer = identity_of(request)
    health = runtime.hooks.health(runtime)
    now = time.time()
    calls = [c for c in state.calls.values() if viewer.can_see(c["owner"])]
    tracing = health.get("tracing") or {}
    transitions = list(state.transitions)[:30]
    if not viewer.master:  # an upstream's error text may quote another key's request
        transitions = [{**t, "error": None} for t in transitions]
    return _data({
        "version": __version__, "uptime_s": round(now - runtime.started_at, 1), "refresh_s": state.config.refresh_s,
        "providers": provider_rows(runtime, health, calls, since=now - 300),
        "transitions": transitions, "live_calls": sum(1 for c in calls if c["status"] == "live"),
        "calls_kept": len(calls),
        "batches_running": sum(1 for b in state.units_of("batch", viewer) if b["status"] == "running"),
        "runs_running": sum(1 for r in state.units_of("run", viewer) if r["status"] == "running"),
        "tracing": {"enabled": bool(tracing.get("enabled")), "endpoint": tracing.get("endpoint")},
        "dimensions": list(DIMENSIONS)})


async def calls(request: Request) -> Response:
    state = state_of(runtime_of(request))
    limit = query_int(request, "limit", default=200, minimum=1, maximum=1000)
    filters = {name: _param(request, name) for name in (*DIMENSIONS, "status")}
    viewer = identity_of(request)
    rows = state.find_calls(filters, limit, viewer)
    kept = len(state.calls) if viewer.master else sum(1 for c in state.calls.values() if viewer.can_see(c["owner"]))
    return _data({"object": "list", "data": rows, "count": len(rows), "kept": kept})


async def call(request: Request) -> Response:
    state = state_of(runtime_of(request))
    call_id = request.path_params["call_id"]
    record = state.calls.get(call_id)
    if record is None or not identity_of(request).can_see(record["owner"]):  # another key's: as if not kept
        raise errors.NotFound(f"no call {errors.quote(call_id)} among those kept (the dashboard keeps the newest [ui] "
                              "max_calls; older ones are in GET /v1/scillm/calls)")
    return _data(state.detail(record))


async def batches(request: Request) -> Response:
    return _data({"object": "list", "data": state_of(runtime_of(request)).units_of("batch", identity_of(request))})


async def runs(request: Request) -> Response:
    return _data({"object": "list", "data": state_of(runtime_of(request)).units_of("run", identity_of(request))})


async def series(request: Request) -> Response:
    by = request.query_params.get("by", "model")
    if by not in DIMENSIONS:
        raise errors.InvalidRequest(f"by must be one of {', '.join(DIMENSIONS)}, got {by[:40]!r} @ query.by",
                                    param="query.by")
    viewer = identity_of(request)
    return _data(state_of(runtime_of(request)).series(by, owner=None if viewer.master else viewer.owner))
