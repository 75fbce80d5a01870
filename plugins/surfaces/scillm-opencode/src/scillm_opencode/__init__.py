"""scillm-opencode: OpenCode serve runs (``POST /v1/scillm/opencode/runs``, the debugger flow) and the OpenCode
transport (``/v1/scillm/opencode/transport/*``) on an ``opencode serve`` that scillm manages (or an existing one),
with a live monitor page per run. Off unless ``SCILLM_OPENCODE_SERVE_ENABLED=1`` or ``[opencode] enabled``."""

from __future__ import annotations

from typing import Any

from scillm_exec import add_run_key_middleware

from scillm_core import MiddlewareRegistry, Runtime, SurfaceRegistry, hookimpl
from scillm_opencode.config import OpenCodeConfig, enabled
from scillm_opencode.doctor import serve_check
from scillm_opencode.monitor import MonitorPage
from scillm_opencode.routes import OpenCode, opencode_of, routes

__all__ = ["OpenCode", "OpenCodeConfig", "opencode_of"]


@hookimpl
def scillm_config_sections() -> dict[str, type]:
    return {"opencode": OpenCodeConfig}


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    for path, endpoint, methods in routes():
        surfaces.route(path, endpoint, methods, plugin="opencode")
    if enabled(runtime):
        state = opencode_of(runtime)
        surfaces.on_startup(state.startup)
        surfaces.on_shutdown(state.shutdown)


@hookimpl
def scillm_register_middleware(middleware: MiddlewareRegistry, runtime: Runtime) -> None:
    if enabled(runtime):
        add_run_key_middleware(middleware, runtime)
        middleware.add(MonitorPage, order=4, name="opencode-monitor-page")


@hookimpl
def scillm_health(runtime: Runtime) -> dict[str, Any]:
    if not enabled(runtime):
        return {"opencode": {"enabled": False}}
    state = opencode_of(runtime)
    return {"opencode": {"enabled": True, "serve": state.serve.describe(), "live_runs": state.runs.live(),
                         "live_transport_runs": state.transport.live()}}


@hookimpl
def scillm_doctor(runtime: Runtime) -> list[dict[str, Any]]:
    return serve_check(runtime)
