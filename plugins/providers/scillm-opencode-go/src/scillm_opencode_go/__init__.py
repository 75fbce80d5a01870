"""OpenCode Go (``opencode-go/<model>``): one prefix, two upstream dialects chosen per model.

GLM, Kimi, DeepSeek and MiMo models use ``{base}/chat/completions``; MiniMax and Qwen models use the
Anthropic-style ``{base}/messages``. Which models speak ``/messages`` is configurable (``[opencode_go]
messages_models``, fnmatch patterns). Every call carries a stable ``x-opencode-session`` per conversation, which the
service requires. ``GET /v1/scillm/opencode-go/models`` lists the models with their endpoint type.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx
from attrs import frozen
from scillm_anthropic import ANTHROPIC_VERSION, AnthropicProvider
from scillm_openai_compat import CompatSpec, OpenAICompatProvider, conversation_id
from starlette.requests import Request
from starlette.responses import Response

from scillm_core import (
    CallContext,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Provider,
    ProviderRegistry,
    Route,
    Runtime,
    SurfaceRegistry,
    hookimpl,
    json_response,
    runtime_of,
)
from scillm_core.config import ProviderSettings
from scillm_core.models import REASONING_CONTENT
from scillm_core.upstream import translate_transport

__all__ = ["OpenCodeGoConfig", "OpenCodeGoProvider"]

NAME = "opencode-go"
DEFAULT_BASE = "https://opencode.ai/zen/go/v1"
KEY_ENV = "OPENCODE_GO_API_KEY"
STATIC_MODELS = {"glm-5.1": "chat", "glm-5": "chat", "kimi-k2.6": "chat", "kimi-k2.5": "chat",
                 "deepseek-v4-pro": "chat", "deepseek-v4-flash": "chat", "mimo-v2-pro": "chat",
                 "minimax-m2.7": "messages", "minimax-m2.5": "messages", "qwen3.6-plus": "messages"}


@frozen(kw_only=True)
class OpenCodeGoConfig:
    """``[opencode_go]``: which models speak the Anthropic-style ``/messages`` endpoint."""

    messages_models: tuple[str, ...] = ("minimax-*", "qwen*")


CHAT_SPEC = CompatSpec(name=NAME, family="opencode-go", key_env=(KEY_ENV,), base_env="OPENCODE_GO_API_BASE",
                       default_base=DEFAULT_BASE, prefixes=("opencode-go/",), session_header="x-opencode-session",
                       capabilities=frozenset({"streaming", "tools", REASONING_CONTENT}))  # Kimi, GLM, DeepSeek


class _Messages(AnthropicProvider):
    """The ``/messages`` half: Anthropic wire format at ``{base}/messages`` with Go's auth headers."""

    name = NAME
    prefixes = ()
    key_env = KEY_ENV
    capabilities = frozenset({"streaming", "tools"})  # Anthropic's wire, none of its server-side features
    native_fields = False  # a /v1/messages client's Anthropic fields are Anthropic's, not MiniMax's or Qwen's
    base_env = "OPENCODE_GO_API_BASE"

    def __init__(self, env: Mapping[str, str], settings: ProviderSettings, base_url: str) -> None:
        super().__init__(env, settings)
        self.base_url = base_url

    def claims(self, model: str) -> bool:
        return False

    @property
    def messages_url(self) -> str:
        return f"{self.base_url}/messages"

    async def headers(self, route: Route, ctx: CallContext) -> dict[str, str]:
        request = ctx.notes.get("opencode_go_request")
        session = conversation_id(request) if request is not None else "scillm"
        return {"authorization": f"Bearer {self._key}", "x-api-key": self._key or "",
                "anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json",
                "x-opencode-session": session}


class OpenCodeGoProvider(Provider):
    name = NAME
    family = "opencode-go"
    prefixes = ("opencode-go/",)
    capabilities = frozenset({"streaming", "tools"})

    def __init__(self, env: Mapping[str, str], settings: ProviderSettings, config: OpenCodeGoConfig) -> None:
        self.chat = OpenAICompatProvider(CHAT_SPEC, env, settings)
        self.base_url = self.chat.base_url
        self.messages = _Messages(env, settings, self.base_url)
        self.patterns = config.messages_models
        self._key = env.get(KEY_ENV) or None
        self._listing: dict[str, Any] | None = None

    def endpoint_type(self, model: str) -> str:
        return "messages" if any(fnmatch.fnmatch(model, p) for p in self.patterns) else "chat"

    def _backend(self, route: Route) -> Provider:
        return self.messages if self.endpoint_type(route.model) == "messages" else self.chat

    def capabilities_for(self, route: Route) -> frozenset[str]:
        return self._backend(route).capabilities

    def missing_config(self) -> str | None:
        return self.chat.missing_config()

    def probe(self) -> tuple[str, Mapping[str, str]] | None:
        return self.chat.probe()

    def known_models(self) -> Sequence[str]:
        return [f"opencode-go/{m}" for m in STATIC_MODELS]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "base_url": self.base_url, "key_env": [KEY_ENV],
                "base_env": "OPENCODE_GO_API_BASE", "messages_models": list(self.patterns)}

    async def complete(self, request: ChatRequest, route: Route, ctx: CallContext) -> ChatResponse:
        ctx.notes["opencode_go_request"] = request
        return await self._backend(route).complete(request, route, ctx)

    async def stream(self, request: ChatRequest, route: Route, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        ctx.notes["opencode_go_request"] = request
        return await self._backend(route).stream(request, route, ctx)

    # chat completions in, a chat model: the client's body as sent (the /messages models are translated)

    def speaks(self, request: ChatRequest, route: Route) -> bool:
        return self.endpoint_type(route.model) == "chat" and self.chat.speaks(request, route)

    async def complete_native(self, request: ChatRequest, route: Route, ctx: CallContext) -> ChatResponse:
        return await self.chat.complete_native(request, route, ctx)

    async def stream_native(self, request: ChatRequest, route: Route, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        return await self.chat.stream_native(request, route, ctx)

    async def models(self, runtime: Runtime, *, refresh: bool) -> dict[str, Any]:
        """The upstream's model list (cached; ``refresh`` refetches), else the static one, with endpoint types."""
        if self._listing is not None and not refresh:
            return self._listing
        ids: list[str] = list(STATIC_MODELS)
        source, problems = "static", []
        if self._key:
            try:
                with translate_transport(NAME, "models"):
                    response = await runtime.client().get(f"{self.base_url}/models", timeout=httpx.Timeout(10.0),
                                                          headers={"authorization": f"Bearer {self._key}"})
                if response.status_code == 200:
                    ids = sorted({str(m["id"]) for m in response.json().get("data", []) if m.get("id")}) or ids
                    source = "upstream"
                else:
                    problems.append(f"GET /models answered HTTP {response.status_code}")
            except Exception as exc:  # the listing is advisory: fall back to the static list, say why
                problems.append(getattr(exc, "message", None) or type(exc).__name__)
        paths = {"messages": "messages", "chat": "chat/completions"}
        models = [{"id": m, "model": f"opencode-go/{m}", "endpoint_type": self.endpoint_type(m),
                   "upstream": f"{self.base_url}/{paths[self.endpoint_type(m)]}"} for m in ids]
        self._listing = {"provider": NAME, "source": source, "key_configured": self._key is not None,
                         "fetched_at": int(time.time()), "model_count": len(models), "models": models,
                         "errors": problems}
        return self._listing


def _config(runtime: Runtime) -> OpenCodeGoConfig:
    return runtime.config.sections.get("opencode_go") or OpenCodeGoConfig()  # type: ignore[no-any-return]


@hookimpl
def scillm_config_sections() -> Mapping[str, Any]:
    return {"opencode_go": OpenCodeGoConfig}


@hookimpl
def scillm_register_providers(providers: ProviderRegistry, runtime: Runtime) -> None:
    providers.add(OpenCodeGoProvider(runtime.env, runtime.config.provider_settings(NAME), _config(runtime)))


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    surfaces.route("/v1/scillm/opencode-go/models", list_models, ["GET"], plugin="opencode-go")


async def list_models(request: Request) -> Response:
    runtime = runtime_of(request)
    provider = runtime.providers[NAME]
    assert isinstance(provider, OpenCodeGoProvider)
    refresh = request.query_params.get("refresh", "").lower() in ("1", "true", "yes")
    return json_response(await provider.models(runtime, refresh=refresh))
