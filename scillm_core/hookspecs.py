"""Every scillm hook. The docstring of each spec is its contract; ``docs/hooks.md`` has one heading per hook.

All hook implementations are plain ``def`` (the plugin manager rejects ``async def``). Pipeline hooks return a
**thunk**: a zero-argument async callable that starts the work each time it is called. Middleware wraps a
pipeline hook with ``@hookimpl(wrapper=True)``::

    @hookimpl(wrapper=True)
    def call_provider(request, route, ctx):
        call = yield                      # the thunk from the inner implementations
        async def with_retry():
            for attempt in range(3):
                try:
                    return await call()   # a thunk may be called again: that is a retry
                except UpstreamError:
                    ...
        return with_retry

Implementations of a pipeline hook other than wrappers should return ``None`` unless they take the call over;
core's own ``trylast`` implementation is the default at the end of every chain.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from scillm_core.context import CallContext, Runtime
    from scillm_core.models import ChatRequest
    from scillm_core.pipeline import ChatThunk, ProviderRequest, RequestThunk, ResponseThunk
    from scillm_core.registry import CommandRegistry, MiddlewareRegistry, ProviderRegistry, Route, SurfaceRegistry
    from scillm_core.sessions import SessionContext, SessionSpec, SessionThunk

hookspec = pluggy.HookspecMarker("scillm")
hookimpl = pluggy.HookimplMarker("scillm")


# -- configuration and registration (called once per app, in this order) -----------------------------------------

@hookspec
def scillm_config_sections() -> Mapping[str, type] | None:
    """Claim top-level ``scillm.toml`` tables: return ``{"table_name": AttrsClass}``.

    Core structures each claimed table into its class with the shared converter; a table nobody claims, or a
    wrong key or type inside one, stops startup with a message naming it. Read the result with
    ``runtime.config.section(name)``.
    """


@hookspec
def scillm_register_providers(providers: ProviderRegistry, runtime: Runtime) -> None:
    """Add :class:`~scillm_core.registry.Provider` objects with ``providers.add(provider)``.

    A provider that is not configured (missing key) is still registered: routing then answers with a 4xx that
    names the missing variable instead of pretending the model does not exist.
    """


@hookspec
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    """Add HTTP routes (``surfaces.route(path, endpoint, methods)``) and startup/shutdown work."""


@hookspec
def scillm_register_middleware(middleware: MiddlewareRegistry, runtime: Runtime) -> None:
    """Add ASGI middleware: ``middleware.add(factory, order=N)``; lower ``order`` runs closer to the client."""


@hookspec
def scillm_register_commands(commands: CommandRegistry) -> None:
    """Add ``scillm`` CLI subcommands: ``commands.add(name, help, configure_parser, run)``."""


# -- the pipeline: chat requests go through all four hooks, embeddings requests through the last three -------------

@hookspec(firstresult=True)
def preprocess_files(request: ChatRequest, ctx: CallContext) -> RequestThunk:
    """Return a thunk giving the request with files turned into parts the route can take.

    Core's default returns the request unchanged; a files plugin wraps it (ZIP, PDF, images).
    """


@hookspec(firstresult=True)
def route_model(request: ProviderRequest, runtime: Runtime) -> Route | None:
    """Decide which provider serves ``request.model``: return a :class:`~scillm_core.registry.Route` or ``None``.

    First non-``None`` result wins. Core's ``trylast`` default resolves alias -> configured group -> explicit
    provider prefix -> provider name rules, and raises ``ModelNotFound`` (404, with close matches) when nothing
    claims the name.
    """


@hookspec(firstresult=True)
def call_provider(request: ProviderRequest, route: Route, ctx: CallContext) -> ChatThunk:
    """Return a thunk that performs one upstream call for ``route``.

    The thunk returns a :class:`~scillm_core.models.ChatResponse`, or for ``request.stream`` an async iterator of
    :class:`~scillm_core.models.ChatChunk` (errors before the first chunk raise from the ``await``), or for an
    :class:`~scillm_core.models.EmbeddingsRequest` an :class:`~scillm_core.models.EmbeddingsResponse`. Core's
    ``trylast`` default dispatches to the registered provider. This is the seam for resilience, cache, limits and
    metrics middleware; retry or fail over only before the first chunk was handed on.
    """


@hookspec(firstresult=True)
def postprocess_json(request: ProviderRequest, ctx: CallContext) -> ResponseThunk:
    """Return a thunk giving the final response for ``request`` (any request kind: the request-level hook).

    Core's default routes and calls the provider (``ctx.complete(request)``); wrappers repair or validate JSON,
    and may re-ask by calling ``ctx.complete(changed_request)``. Wrappers that read chat content pass other
    request kinds (``EmbeddingsRequest``) through untouched.
    """


# -- agent sessions ----------------------------------------------------------------------------------------------

@hookspec(firstresult=True)
def run_session(spec: SessionSpec, ctx: SessionContext) -> SessionThunk | None:
    """Claim a session whose ``spec.profile`` this runner handles: return a thunk that runs it, else ``None``."""


@hookspec
def scillm_session_profiles(runtime: Runtime) -> list[str] | None:
    """Names of the session profiles this plugin can run (for validation and ``scillm doctor``)."""


# -- reporting ---------------------------------------------------------------------------------------------------

@hookspec
def scillm_health(runtime: Runtime) -> Mapping[str, Any] | None:
    """Return ``{"name": state}`` for ``GET /v1/scillm/health`` (switches, fail-open/closed, live state)."""


@hookspec
def scillm_doctor(runtime: Runtime) -> list[Mapping[str, Any]] | Callable[[], Awaitable[list[Any]]] | None:
    """Return preflight checks for ``scillm doctor``: ``[{"check", "ok", "detail"}]``, or a thunk returning them
    when the checks need I/O (the state store). Never include secrets."""
