"""Defaults at the end of every pipeline chain (``trylast``), and the config tables core owns."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from scillm_core import errors
from scillm_core.builtin.routing import resolve
from scillm_core.config import GroupConfig, PluginsConfig, ProviderSettings, ServerConfig
from scillm_core.hookspecs import hookimpl
from scillm_core.models import EmbeddingsRequest

if TYPE_CHECKING:
    from scillm_core.context import CallContext, Runtime
    from scillm_core.models import ChatRequest
    from scillm_core.pipeline import CallResult, ChatThunk, ProviderRequest, RequestThunk, ResponseThunk
    from scillm_core.registry import Route


@hookimpl
def scillm_config_sections() -> Mapping[str, Any]:
    return {"server": ServerConfig, "aliases": Mapping[str, str], "groups": Mapping[str, GroupConfig],
            "providers": Mapping[str, ProviderSettings], "plugins": PluginsConfig}


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
    """Dispatch to the registered provider (``embed`` for an embeddings request); the request ``timeout`` bounds a
    non-streaming call."""
    provider = ctx.runtime.providers[route.provider]

    async def dispatch() -> CallResult:
        missing = provider.missing_config()
        if missing:
            raise errors.ProviderNotConfigured(
                f"model {route.requested!r} is served by provider {provider.name!r}, which is not configured: "
                f"{missing}", param="model")
        ctx.attempts += 1
        ctx.route = route
        if request.stream:
            return await provider.stream(request, route, ctx)  # type: ignore[arg-type]  # only chat streams
        call = provider.embed if isinstance(request, EmbeddingsRequest) else provider.complete
        remaining = ctx.remaining()
        if remaining is None:
            return await call(request, route, ctx)  # type: ignore[arg-type]  # the method matches the request
        try:
            async with asyncio.timeout(max(remaining, 0.0)):
                return await call(request, route, ctx)  # type: ignore[arg-type]
        except TimeoutError:
            raise errors.DeadlineExceeded(
                f"request timeout reached while waiting for {route.provider} ({route.model})") from None

    return dispatch
