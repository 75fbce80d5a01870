"""Ollama through its native ``/api/chat`` API (NDJSON streaming, images, tools, ``format``, ``/api/tags``)."""

from __future__ import annotations

from scillm_core import ProviderRegistry, Runtime, SurfaceRegistry, hookimpl
from scillm_ollama.provider import OllamaProvider, base_from_env, build_body

__all__ = ["OllamaProvider", "base_from_env", "build_body"]


@hookimpl
def scillm_register_providers(providers: ProviderRegistry, runtime: Runtime) -> None:
    providers.add(OllamaProvider(runtime.env, runtime.config.provider_settings("ollama")))


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    """No routes: only hand the provider the shared client at startup and schedule the first ``/api/tags``
    fetch in the background (startup does not wait for it)."""

    async def start() -> None:
        provider = runtime.providers.get("ollama")
        if isinstance(provider, OllamaProvider):
            provider.client = runtime.client()
            provider.refresh_soon()

    async def stop() -> None:
        provider = runtime.providers.get("ollama")
        if isinstance(provider, OllamaProvider):
            task, provider.client = provider._refreshing, None
            if task is not None and not task.done():
                task.cancel()

    surfaces.on_startup(start)
    surfaces.on_shutdown(stop)
