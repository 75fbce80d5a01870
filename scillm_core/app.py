"""The app factory: config -> plugin manager -> registries -> Starlette app, and errors rendered in one place."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scillm_core import errors
from scillm_core.body_deadline import BodyDeadline
from scillm_core.config import Config, ConfigError, check_provider_tables, load_config
from scillm_core.context import Runtime
from scillm_core.hooks import Hooks
from scillm_core.http import make_http_client
from scillm_core.paths import IndexedRouter
from scillm_core.plugins import build_plugin_manager
from scillm_core.redact import env_secrets, remember
from scillm_core.registry import MiddlewareRegistry, ProviderRegistry, SurfaceRegistry
from scillm_core.web import error_response

__all__ = ["create_app"]

log = logging.getLogger("scillm")


def create_app(config: Config | None = None, *, plugins: Sequence[tuple[str, object]] | None = None,
               entry_points: bool = True, env: Mapping[str, str] | None = None,
               config_path: str | Path | None = None, only: Sequence[str] | None = None,
               own_listener: bool = False) -> ASGIApp:
    """Build a fresh app: its own plugin manager, registries and runtime (nothing module-global).

    ``plugins`` adds ``(name, plugin)`` pairs after the entry points; ``entry_points=False`` loads only those,
    and ``only`` limits entry points to the names given (the test harness uses both for isolation).
    ``own_listener`` (each ``--workers`` process) also serves the app on a loopback port of this process's own
    (``Runtime.own_url``), so the children it starts reach it and not another worker.
    """
    config = config or load_config(config_path, env=env)
    remember(env_secrets(config.env))  # every error and log line of this process redacts them
    disabled = list(config.env.get("SCILLM_DISABLE_PLUGINS", "").split(","))
    disabled += list((config.tables.get("plugins") or {}).get("disable", []))
    pm, infos = build_plugin_manager(plugins=plugins, entry_points=entry_points, disabled=disabled, only=only)

    schema: dict[str, Any] = {}
    for sections in pm.hook.scillm_config_sections():
        for name, kind in (sections or {}).items():
            if name in schema:
                raise ConfigError(f"config table [{name}] is claimed by two plugins")
            schema[name] = kind
    config = config.with_sections(schema)

    runtime = Runtime(config=config, hooks=Hooks(pm), providers=ProviderRegistry(), plugins=infos)
    pm.hook.scillm_register_providers(providers=runtime.providers, runtime=runtime)
    check_provider_tables(config, runtime.providers, runtime.providers.kinds)
    surfaces = SurfaceRegistry()
    pm.hook.scillm_register_surfaces(surfaces=surfaces, runtime=runtime)
    runtime.public_paths = frozenset(surfaces.public)
    middleware = MiddlewareRegistry()
    pm.hook.scillm_register_middleware(middleware=middleware, runtime=runtime)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        from scillm_core.own_listener import OwnListener
        from scillm_core.state.presence import Presence

        runtime.http = make_http_client(config.env, limits=config.server.reply_limits())
        runtime.presence = Presence(runtime)
        listener = OwnListener(outer) if own_listener else None
        try:
            runtime.presence.start()
            if listener is not None:
                runtime.own_url = await listener.start()
            for start in surfaces.startup:
                await start()
            runtime.ready = True
            yield
        finally:
            runtime.ready = False
            if listener is not None:
                await listener.stop()
            for stop in reversed(surfaces.shutdown):
                with contextlib.suppress(Exception):
                    await stop()
            await runtime.presence.stop()
            await runtime.http.aclose()
            if runtime._store is not None:
                await runtime._store.close()

    app = Starlette(routes=surfaces.routes, lifespan=lifespan, exception_handlers={
        errors.ScillmError: _handle_error, HTTPException: _handle_http, Exception: _handle_error})
    app.router = IndexedRouter(surfaces.routes, lifespan=lifespan)  # fixed paths found without a scan
    app.state.runtime = runtime
    outer = RequestIdMiddleware(middleware.wrap(app), runtime)
    return outer


async def _handle_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, errors.ScillmError):
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        logged = request.scope.get("scillm.errors_logged")
        if logged is not None:
            logged.append(exc)  # Starlette re-raises it after this response: RequestIdMiddleware lets it end there
    return error_response(exc)


async def _handle_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = errors.shorten(request.url.path)
    if exc.status_code == 404:
        return error_response(errors.NotFound(f"unknown endpoint: {request.method} {path}"))
    if exc.status_code == 405:
        return error_response(errors.RequestError(f"method {request.method} not allowed on {path}", status=405,
                                                  code="method_not_allowed"))
    return error_response(errors.RequestError(str(exc.detail), status=exc.status_code))


class RequestIdMiddleware:
    """Outermost layer: every HTTP response carries ``x-request-id`` (the client's, or a new one), an unexpected
    exception is logged once (Starlette re-raises it after rendering the 500, for the server to log a second time),
    and the body must arrive in time (:mod:`scillm_core.body_deadline`)."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime
        self.body_timeout_s = runtime.config.server.body_read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:128]
                break
        request_id = request_id or uuid.uuid4().hex[:16]
        scope["scillm.request_id"] = request_id
        logged: list[BaseException] = []
        scope["scillm.errors_logged"] = logged
        header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        body = BodyDeadline(receive, self.body_timeout_s) if self.body_timeout_s else None
        try:
            await self.app(scope, body or receive, send_with_id)
        except Exception as exc:
            if any(exc is seen for seen in logged):
                return  # answered with a 500 and logged once, by _handle_error; the server would log it again
            raise
        finally:
            if body is not None:
                body.close()
