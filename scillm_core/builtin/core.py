"""Defaults at the end of every pipeline chain (``trylast``), and the config tables core owns."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from scillm_core import errors
from scillm_core.builtin.routing import provider_timeouts, resolve
from scillm_core.config import GroupConfig, PluginsConfig, ProviderSettings, ServerConfig, StateConfig
from scillm_core.hookspecs import hookimpl
from scillm_core.http import UPSTREAM_HEADERS
from scillm_core.models import ChatResponse, EmbeddingsRequest, EmbeddingsResponse, without_carried
from scillm_core.models.params import check_asks
from scillm_core.pipeline import StreamTap
from scillm_core.timeouts import open_within, within_limits

#: Response header naming the dialect a request went upstream in: ``anthropic-messages`` when its body went as
#: sent, ``anthropic-messages -> gemini`` when it was translated for that provider (also when a middleware changed
#: the request, which drops its native body). Surfaces name their dialect in ``request.scillm["dialect"]``.
DIALECT_HEADER = "x-scillm-dialect"

if TYPE_CHECKING:
    from scillm_core.context import CallContext, Runtime
    from scillm_core.events import Events
    from scillm_core.models import ChatRequest
    from scillm_core.pipeline import CallResult, ChatThunk, ProviderRequest, RequestThunk, ResponseThunk
    from scillm_core.registry import Provider, Route

#: one info line per retry, fallback, continuation, timeout and breaker transition (core logs the timeouts)
failover_log = logging.getLogger("scillm.failover")


@hookimpl
def scillm_config_sections() -> Mapping[str, Any]:
    return {"server": ServerConfig, "aliases": Mapping[str, str], "groups": Mapping[str, GroupConfig],
            "providers": Mapping[str, ProviderSettings], "plugins": PluginsConfig, "state": StateConfig}


@hookimpl(trylast=True)
def preprocess_files(request: ChatRequest, ctx: CallContext) -> RequestThunk:
    async def unchanged() -> ChatRequest:
        return request

    return unchanged


@hookimpl(trylast=True)
def route_model(request: ProviderRequest, runtime: Runtime) -> Route:
    return resolve(request.model, runtime)


@hookimpl(trylast=True)
def postprocess_json(request: ProviderRequest, ctx: CallContext) -> ResponseThunk:
    async def complete() -> CallResult:
        return await ctx.complete(request)

    return complete


@hookimpl(trylast=True)
def call_provider(request: ProviderRequest, route: Route, ctx: CallContext) -> ChatThunk:
    """Dispatch to the registered provider (``embed`` for an embeddings request) within the route's upstream
    timeouts (``scillm_core.timeouts``); the request ``timeout`` bounds a non-streaming call too. Each dispatch is
    one upstream attempt (``attempt.start`` / ``attempt.end`` when observers listen). What a chat request's
    assistant turns carry of earlier reasoning and the prompt-cache markers (``scillm_core.models.CARRIED``:
    Claude's signed thinking blocks, reasoning text, ``cache_control``) go only to a provider with that capability:
    each attempt of a group decides for its own provider, so a fallback from Claude to another upstream never gets
    Claude's blocks, nor OpenAI reasoning text, nor markers, and a fallback to Claude gets the markers."""
    provider = ctx.runtime.providers[route.provider]
    if route.timeouts is None:  # a route some other routing plugin built
        route = attrs.evolve(route, timeouts=provider_timeouts(ctx.runtime, route.provider))

    async def dispatch() -> CallResult:
        missing = provider.missing_config()
        if missing:
            raise errors.ProviderNotConfigured(
                f"model {route.requested!r} is served by provider {provider.name!r}, which is not configured: "
                f"{missing}", param="model")
        sent = request
        if isinstance(request, EmbeddingsRequest):
            native = None
            passthrough = False
        else:
            native = request.native
            passthrough = native is not None and provider.speaks(request, route)
            capabilities = provider.capabilities_for(route)
            if not passthrough:  # a translation: what the client asks for must be deliverable (else a 400 now)
                check_asks(request, capabilities, provider.name, route.model)
            sent = without_carried(request, capabilities, as_sent=passthrough)  # decided for each attempt
        ctx.attempts += 1
        ctx.route = route
        dialect = native.dialect if native is not None else request.scillm.get("dialect")
        if dialect:  # say which way the request went: as sent, or translated for this provider
            ctx.notes.setdefault("headers", {})[DIALECT_HEADER] = (
                dialect if passthrough else f"{dialect} -> {provider.name}")
        events = ctx.runtime.events
        if events.listening:
            return await _observed_attempt(provider, sent, route, ctx, events, passthrough)
        return await _attempt(provider, sent, route, ctx, passthrough)

    return dispatch


async def _attempt(provider: Provider, request: ProviderRequest, route: Route, ctx: CallContext,
                   passthrough: bool = False, tap: StreamTap | None = None) -> CallResult:
    """One upstream call within the route's timeouts: the client's own body when ``passthrough`` (the provider
    speaks its dialect); a stream's chunks go through ``tap`` when one is given (in the same layer)."""
    timeouts = route.timeouts
    assert timeouts is not None

    def timed_out(limit: str) -> errors.UpstreamTimeout:
        return _timeout(ctx, route, limit)

    try:
        if request.stream:
            started = asyncio.get_running_loop().time()
            open_stream = provider.stream_native if passthrough else provider.stream
            opening = open_stream(request, route, ctx)  # type: ignore[arg-type]  # only chat streams
            chunks = await open_within(opening, timeouts, timed_out)
            return within_limits(chunks, started, timeouts, timed_out, tap)  # type: ignore[arg-type]
        call: Any
        if isinstance(request, EmbeddingsRequest):
            call = provider.embed
        else:
            call = provider.complete_native if passthrough else provider.complete
        remaining = ctx.remaining()
        limit = timeouts.total_s if remaining is None else min(timeouts.total_s, max(remaining, 0.0))
        try:
            async with asyncio.timeout(limit):
                return await call(request, route, ctx)  # type: ignore[no-any-return]  # the method matches the request
        except TimeoutError:
            if limit < timeouts.total_s:
                raise errors.DeadlineExceeded(
                    f"request timeout reached while waiting for {route.provider} ({route.model})") from None
            raise timed_out("total") from None
    except errors.UpstreamTimeout as exc:
        if not getattr(exc, "reported", False):
            _report_timeout(ctx, route, exc)
        raise


def _timeout(ctx: CallContext, route: Route, limit: str) -> errors.UpstreamTimeout:
    """The error for ``limit`` (``headers``, ``first_token``, ``idle``, ``total``), logged and reported once."""
    timeouts = route.timeouts
    assert timeouts is not None
    seconds = timeouts.seconds(limit)
    what = {"headers": f"sent no response headers within {seconds:g}s",
            "first_token": f"sent no first token within {seconds:g}s",
            "idle": f"sent nothing for {seconds:g}s after its last chunk",
            "total": f"did not answer within {seconds:g}s"}[limit]
    exc = errors.UpstreamTimeout(f"the upstream {what} ({timeouts.setting(limit)})", provider=route.provider,
                                 model=route.model, details={"timeout": limit, "seconds": seconds})
    exc.limit = limit
    _report_timeout(ctx, route, exc)
    return exc


def _report_timeout(ctx: CallContext, route: Route, exc: errors.UpstreamTimeout) -> None:
    exc.reported = True
    failover_log.info("timeout request_id=%s provider=%s model=%s limit=%s reason=%s", ctx.request_id,
                      route.provider, route.model, exc.limit, exc.message)
    ctx.emit("timeout", route=route, limit=exc.limit, error=exc)


async def _observed_attempt(provider: Provider, request: ProviderRequest, route: Route, ctx: CallContext,
                            events: Events, passthrough: bool = False) -> CallResult:
    """One attempt between ``attempt.start`` and ``attempt.end`` (a stream's when it ends). Headers observers put
    in ``upstream_headers`` go with this upstream request (``scillm_core.http.UPSTREAM_HEADERS``)."""
    attempt = ctx.attempts
    headers: dict[str, str] = {}
    events.emit("attempt.start", ctx, request=request, route=route, attempt=attempt, upstream_headers=headers)
    started = time.perf_counter()

    def ended(error: BaseException | None, usage: Any, first_at: float | None) -> None:
        events.emit("attempt.end", ctx, request=request, route=route, attempt=attempt, response=None, error=error,
                    usage=usage, duration_s=time.perf_counter() - started,
                    first_chunk_s=None if first_at is None else first_at - started)

    tap = StreamTap(ctx, ended) if request.stream else None
    token = None
    if headers:
        token = UPSTREAM_HEADERS.set(headers)
    try:
        result = await _attempt(provider, request, route, ctx, passthrough, tap)
    except BaseException as exc:
        ended(exc, None, None)
        raise
    finally:
        if token is not None:
            UPSTREAM_HEADERS.reset(token)
    if isinstance(result, ChatResponse | EmbeddingsResponse):
        events.emit("attempt.end", ctx, request=request, route=route, attempt=attempt, response=result, error=None,
                    usage=result.usage, duration_s=time.perf_counter() - started, first_chunk_s=None)
        return result
    assert tap is not None  # a stream, tapped where its time limits are watched
    tap.open()
    return result
