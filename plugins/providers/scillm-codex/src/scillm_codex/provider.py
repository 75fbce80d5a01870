"""The ``codex`` provider: GPT models through a ChatGPT subscription (the Codex backend), chat completions in and
out, streaming or not (the backend only streams; non-streaming clients get the collected stream)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson

from scillm_codex.auth import DEFAULT_TOKEN_URL, CodexAuth, Login
from scillm_codex.wire import StreamState, conversation_id, error_from_body, to_codex_body
from scillm_core import (
    CallContext,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Choice,
    FunctionCall,
    Message,
    Provider,
    Route,
    ToolCall,
    Usage,
    errors,
)
from scillm_core.config import Env, ProviderSettings
from scillm_core.jsonio import loads
from scillm_core.upstream import excerpt, iter_sse, translate_transport

__all__ = ["DEFAULT_BASE", "CodexProvider", "auth_path"]

DEFAULT_BASE = "https://chatgpt.com/backend-api/codex"
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

    def __init__(self, env: Env | Mapping[str, str], settings: ProviderSettings) -> None:
        token_url = env.get("SCILLM_CODEX_TOKEN_URL") or env.get("CODEX_REFRESH_TOKEN_URL_OVERRIDE") \
            or DEFAULT_TOKEN_URL
        self.auth = CodexAuth(auth_path(env), token_url, provider=self.name)
        self.base_url = (settings.base_url or env.get("CODEX_API_BASE") or DEFAULT_BASE).rstrip("/")
        self.timeout_s = settings.timeout_s

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
                   "session_id": conversation_id(request)}
        if login.account_id:
            headers["chatgpt-account-id"] = login.account_id
        return headers

    def _timeout(self, route: Route) -> httpx.Timeout | None:
        seconds = route.timeout_s or self.timeout_s
        return httpx.Timeout(seconds, connect=min(seconds, 15.0)) if seconds else None

    async def _open(self, request: ChatRequest, route: Route, ctx: CallContext) -> tuple[httpx.Response, Login]:
        """POST ``/responses`` and return the streaming response (status < 400); on 401 refresh once and retry."""
        client = ctx.runtime.client()
        login = await self.auth.token(client, route.model)
        content = orjson.dumps(to_codex_body(request, route.model))
        for attempt in range(2):
            upstream = client.build_request("POST", f"{self.base_url}/responses",
                                            headers=self._headers(login, request), content=content,
                                            timeout=self._timeout(route) or httpx.USE_CLIENT_DEFAULT)
            with translate_transport(self.name, route.model):
                response = await client.send(upstream, stream=True)
            if response.status_code < 400:
                return response, login
            with translate_transport(self.name, route.model):
                raw = await response.aread()
            await response.aclose()
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

    async def _chunks(self, response: httpx.Response, state: StreamState, route: Route) -> AsyncIterator[ChatChunk]:
        try:
            with translate_transport(self.name, route.model):
                async for event in iter_sse(response.aiter_bytes()):
                    if event.data.strip() == "[DONE]":
                        break
                    try:
                        data = loads(event.data)
                    except orjson.JSONDecodeError:
                        raise errors.UpstreamProtocolError(f"malformed stream event {excerpt(event.data, 120)!r}",
                                                           provider=self.name, model=route.model) from None
                    if not isinstance(data, dict):
                        continue
                    for chunk in state.feed(data):
                        yield chunk
                    if state.finished:
                        break
        finally:
            await response.aclose()
        if not state.finished:
            raise errors.UpstreamProtocolError("stream closed before response.completed", provider=self.name,
                                               model=route.model)

    async def stream(self, request: ChatRequest, route: Route, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        response, login = await self._open(request, route, ctx)
        state = StreamState(provider=self.name, model=route.model, include_usage=request.include_usage,
                            secrets=(login.access_token, login.refresh_token))
        chunks = self._chunks(response, state, route)
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

    async def complete(self, request: ChatRequest, route: Route, ctx: CallContext) -> ChatResponse:
        response, login = await self._open(request, route, ctx)
        state = StreamState(provider=self.name, model=route.model, include_usage=False,
                            secrets=(login.access_token, login.refresh_token))
        async for _ in self._chunks(response, state, route):
            pass
        calls = tuple(ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=c["arguments"] or "{}"))
                      for _, c in sorted(state.tool_calls.items()))
        extra = {"reasoning_content": "".join(state.reasoning)} if state.reasoning else {}
        message = Message(role="assistant", content="".join(state.text) or None, tool_calls=calls or None,
                          extra=extra)
        return ChatResponse(id=state.id, model=state.served_model, created=state.created,
                            choices=(Choice(message=message, finish_reason=state.finish_reason),),
                            usage=state.usage or Usage())


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
