"""The ``codex`` provider: GPT models through a ChatGPT subscription (the Codex backend), chat completions in and
out, streaming or not (the backend only streams; non-streaming clients get the collected stream).

A request that came in on ``/v1/responses`` goes to the backend as the client sent it (``model`` rewritten),
except what the backend insists on: ``stream: true``, ``store: false``, instructions (a default when there are
neither ``instructions`` nor a developer message, which is how Codex itself sends them), and no
``max_output_tokens``, ``temperature`` or ``top_p``; its events (or, for a non-streaming client, the final Response
object) come back as the backend sent them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson

from scillm_codex.auth import DEFAULT_TOKEN_URL, CodexAuth, Login
from scillm_codex.wire import (
    DEFAULT_INSTRUCTIONS,
    StreamState,
    chat_response,
    conversation_id,
    error_from_body,
    final_response,
    responses_chunks,
    to_codex_body,
)
from scillm_core import (
    CallContext,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Provider,
    Route,
    errors,
    with_native,
)
from scillm_core.config import Env, ProviderSettings
from scillm_core.upstream import Malformed, send_upstream

__all__ = ["DEFAULT_BASE", "CodexProvider", "auth_path"]

DEFAULT_BASE = "https://chatgpt.com/backend-api/codex"
#: Body fields the backend refuses (a client's own body loses them; the chat translation never sends them).
REJECTED = ("max_output_tokens", "max_completion_tokens", "temperature", "top_p")
MODELS = ("codex/gpt-5-codex", "codex/gpt-5.1-codex", "codex/gpt-5.1-codex-mini", "codex/gpt-5", "codex/gpt-5.1")


def auth_path(env: Env | Mapping[str, str]) -> Path:
    """``SCILLM_CODEX_AUTH``, else ``$CODEX_HOME/auth.json``, else ``~/.codex/auth.json``."""
    explicit = env.get("SCILLM_CODEX_AUTH")
    if explicit:
        return Path(explicit).expanduser()
    codex_home = env.get("CODEX_HOME")
    if codex_home:
        return Path(codex_home).expanduser() / "auth.json"
    home = env.get("HOME") or env.get("USERPROFILE")
    # Only the given environment decides (tests pass their own); without HOME the default stays unexpanded.
    return (Path(home) if home else Path("~")) / ".codex" / "auth.json"


class CodexProvider(Provider):
    name = "codex"
    family = "openai-responses"
    prefixes = ("codex/",)
    rule_order = 25  # before the openai provider (30): a ChatGPT login serves gpt-* / o-series first
    capabilities = frozenset({"streaming", "tools", "images", "pdf", "json_mode", "json_schema", "reasoning"})
    dialects = frozenset({"openai-responses"})

    def __init__(self, env: Env | Mapping[str, str], settings: ProviderSettings) -> None:
        token_url = env.get("SCILLM_CODEX_TOKEN_URL") or env.get("CODEX_REFRESH_TOKEN_URL_OVERRIDE") \
            or DEFAULT_TOKEN_URL
        self.auth = CodexAuth(auth_path(env), token_url, provider=self.name)
        self.base_url = (settings.base_url or env.get("CODEX_API_BASE") or DEFAULT_BASE).rstrip("/")

    # -- routing ------------------------------------------------------------------------------------------------

    def claims(self, model: str) -> bool:
        if model.startswith("codex"):
            return True  # nobody else serves codex-* names: without a login the caller learns to log in
        return model.startswith(("gpt-", "o1", "o3", "o4")) and self.auth.logged_in

    def missing_config(self) -> str | None:
        return self.auth.missing()

    def known_models(self) -> Sequence[str]:
        return MODELS

    def auth_status(self) -> dict[str, Any]:
        return self.auth.status()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "base_url": self.base_url, "auth_file": str(self.auth.path),
                "env": ["SCILLM_CODEX_AUTH", "CODEX_API_BASE", "SCILLM_CODEX_TOKEN_URL"]}

    # -- wire ---------------------------------------------------------------------------------------------------

    def _headers(self, login: Login, request: ChatRequest) -> dict[str, str]:
        headers = {"authorization": f"Bearer {login.access_token}", "content-type": "application/json",
                   "accept": "text/event-stream", "openai-beta": "responses=experimental", "originator": "scillm",
                   "session_id": request.scillm.get("session") or conversation_id(request)}
        if login.account_id:
            headers["chatgpt-account-id"] = login.account_id
        return headers

    def native_body(self, request: ChatRequest, route: Route) -> bytes:
        """The client's Responses body as the backend takes it (see the module docstring)."""
        assert request.native is not None
        body = request.native.body
        changes: dict[str, Any] = {}
        if body.get("stream") is not True:
            changes["stream"] = True
        if body.get("store") is not False:
            changes["store"] = False
        if not _has_instructions(body):
            changes["instructions"] = DEFAULT_INSTRUCTIONS
        if not changes and not any(key in body for key in REJECTED):
            return request.native.upstream_body(route.model)
        kept = {key: value for key, value in body.items() if key not in REJECTED}
        return orjson.dumps({**kept, "model": route.model, **changes})

    async def _open(self, request: ChatRequest, route: Route, ctx: CallContext, *,
                    native: bool = False) -> tuple[httpx.Response, Login]:
        """POST ``/responses`` and return the streaming response (status < 400); on 401 refresh once and retry."""
        client = ctx.runtime.client()
        login = await self.auth.token(client, route.model)
        content = self.native_body(request, route) if native else orjson.dumps(to_codex_body(request, route.model))
        for attempt in range(2):
            upstream = client.build_request("POST", f"{self.base_url}/responses",
                                            headers=self._headers(login, request), content=content,
                                            timeout=self.http_timeout(route, stream=request.stream))
            response = await send_upstream(client, upstream, provider=self.name, model=route.model)
            if response.status_code < 400:
                return response, login
            raw = response.content
            secrets = (login.access_token, login.refresh_token)
            if response.status_code == 401 and attempt == 0:
                login = await self.auth.refresh(client, route.model, stale=login.access_token)
                continue
            error = error_from_body(response.status_code, raw, response.headers, provider=self.name,
                                    model=route.model, secrets=secrets)
            if response.status_code == 401:
                raise errors.UpstreamAuthError(f"{error.message}; the ChatGPT login was refreshed and still "
                                               f"refused: run `codex login` to sign in again",
                                               provider=self.name, model=route.model, upstream_status=401)
            raise error
        raise AssertionError("unreachable")  # pragma: no cover

    async def stream(self, request: ChatRequest, route: Route, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        return await self._stream(request, route, ctx, native=False)

    async def stream_native(self, request: ChatRequest, route: Route, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        return await self._stream(request, route, ctx, native=True)

    async def _stream(self, request: ChatRequest, route: Route, ctx: CallContext, *,
                      native: bool) -> AsyncIterator[ChatChunk]:
        response, login = await self._open(request, route, ctx, native=native)
        state = StreamState(provider=self.name, model=route.model, include_usage=native or request.include_usage,
                            secrets=(login.access_token, login.refresh_token))
        chunks = responses_chunks(response, state, Malformed(ctx, route), native=native)
        # Read up to the first chunk here, so a response.failed that comes before any output raises from the
        # await (with its real status, still retryable) instead of after the client got a 200.
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await chunks.aclose()  # type: ignore[attr-defined]
            raise
        return _prepend(first, chunks)

    async def complete_native(self, request: ChatRequest, route: Route, ctx: CallContext) -> ChatResponse:
        """The backend only streams: a non-streaming client gets the final Response object it sent."""
        result, state = await self._collect(request, route, ctx, native=True)
        return with_native(result, orjson.dumps(final_response(state)))

    async def complete(self, request: ChatRequest, route: Route, ctx: CallContext) -> ChatResponse:
        return (await self._collect(request, route, ctx, native=False))[0]

    async def _collect(self, request: ChatRequest, route: Route, ctx: CallContext, *,
                       native: bool) -> tuple[ChatResponse, StreamState]:
        response, login = await self._open(request, route, ctx, native=native)
        state = StreamState(provider=self.name, model=route.model, include_usage=False,
                            secrets=(login.access_token, login.refresh_token))
        async for _ in responses_chunks(response, state, Malformed(ctx, route)):
            pass
        return chat_response(state), state


def _has_instructions(body: Mapping[str, Any]) -> bool:
    """Instructions, or (as Codex itself sends them) a developer or system message in ``input``."""
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions.strip():
        return True
    items = body.get("input")
    return isinstance(items, list) and any(isinstance(item, dict) and item.get("role") in ("developer", "system")
                                           for item in items)


async def _prepend(first: ChatChunk | None, rest: AsyncIterator[ChatChunk]) -> AsyncIterator[ChatChunk]:
    try:
        if first is not None:
            yield first
        async for chunk in rest:
            yield chunk
    finally:
        aclose = getattr(rest, "aclose", None)
        if aclose is not None:
            await aclose()
