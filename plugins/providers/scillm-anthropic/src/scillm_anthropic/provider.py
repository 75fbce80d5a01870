"""The Anthropic Messages provider (API key). :class:`ClaudeOAuthProvider` in :mod:`.oauth` reuses it with a
Claude login instead of a key.

A request that came in on ``/v1/messages`` goes upstream as the client sent it (``model`` rewritten, its
``anthropic-version`` and ``anthropic-beta`` forwarded) and its answer or stream goes back as Anthropic sent it;
chat and Responses requests are translated (:mod:`.translate`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx
import orjson

from scillm_anthropic.translate import (
    StreamTranslator,
    answer_tool,
    error_from_status,
    from_messages_response,
    to_messages_body,
)
from scillm_core import CallContext, ChatChunk, ChatRequest, ChatResponse, Provider, Route, errors, with_native
from scillm_core.config import ProviderSettings
from scillm_core.jsonio import loads
from scillm_core.models import THINKING_BLOCKS
from scillm_core.upstream import (
    SHAPE_ERRORS,
    Malformed,
    PendingBytes,
    excerpt,
    iter_sse,
    send_upstream,
    translate_transport,
)

__all__ = ["ANTHROPIC_VERSION", "DEFAULT_BASE", "AnthropicProvider", "MODELS", "claude_name", "merge_betas",
           "normalise_base"]

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_BASE = "https://api.anthropic.com"
#: the event a stream that ended without it gets on a same-dialect route, so the client sees a whole stream
MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
MODELS = ("claude-opus-4-5", "claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1", "claude-sonnet-4-0")


def claude_name(model: str) -> bool:
    return model.startswith("claude-")


def merge_betas(*values: str | None) -> str:
    """``anthropic-beta`` values joined, each beta once, in first-seen order."""
    seen: dict[str, None] = {}
    for value in values:
        for beta in (value or "").split(","):
            if beta.strip():
                seen.setdefault(beta.strip(), None)
    return ",".join(seen)


def normalise_base(base: str) -> str:
    """``https://api.anthropic.com`` (the SDK form); a trailing ``/v1`` is tolerated and dropped."""
    base = base.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


class AnthropicProvider(Provider):
    name = "anthropic"
    family = "anthropic"
    prefixes = ("anthropic/",)
    rule_order = 20
    #: server_tools, mcp_servers: the Messages API runs them; citations: it cites the documents it was given (asked
    #: for on ``/v1/messages``, see ``scillm_core.models.params``); web_search: its web search tool; thinking_blocks:
    #: Claude's signed thinking blocks go back to it (``scillm_core.models.THINKING_BLOCKS``; no other provider's
    #: attempt gets them)
    capabilities = frozenset({"streaming", "tools", "images", "pdf", "json_schema", "reasoning", "cache_control",
                              "prefill", "server_tools", "mcp_servers", "citations", "web_search", THINKING_BLOCKS})
    dialects = frozenset({"anthropic-messages"})
    #: whether a translated ``/v1/messages`` request keeps the client's own Anthropic fields (``thinking``,
    #: ``top_k``, ``mcp_servers``, ...; see :func:`to_messages_body`)
    native_fields = True
    key_env = "ANTHROPIC_API_KEY"
    base_env = "ANTHROPIC_API_BASE"

    def __init__(self, env: Mapping[str, str], settings: ProviderSettings | None = None) -> None:
        settings = settings or ProviderSettings()
        self._key = env.get(self.key_env) or None
        self.base_url = normalise_base(settings.base_url or env.get(self.base_env) or DEFAULT_BASE)

    # -- routing ------------------------------------------------------------------------------------------------

    def claims(self, model: str) -> bool:
        return claude_name(model)

    def missing_config(self) -> str | None:
        return None if self._key else f"set {self.key_env}"

    def known_models(self) -> Sequence[str]:
        return MODELS

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "base_url": self.base_url, "key_env": [self.key_env],
                "base_env": self.base_env}

    # -- wire (overridden by the Claude login) ------------------------------------------------------------------

    @property
    def messages_url(self) -> str:
        return f"{self.base_url}/v1/messages"

    def secrets(self) -> tuple[str | None, ...]:
        return (self._key,)

    def probe(self) -> tuple[str, Mapping[str, str]] | None:
        return f"{self.base_url}/v1/models", {"x-api-key": self._key or "", "anthropic-version": ANTHROPIC_VERSION}

    async def headers(self, route: Route, ctx: CallContext) -> dict[str, str]:
        return {"x-api-key": self._key or "", "anthropic-version": ANTHROPIC_VERSION,
                "content-type": "application/json"}

    def body(self, request: ChatRequest, route: Route) -> dict[str, Any]:
        return to_messages_body(request, route.model, native_fields=self.native_fields)

    def native_body(self, request: ChatRequest, route: Route) -> bytes:
        """The client's own Messages body for ``route``."""
        assert request.native is not None
        return request.native.upstream_body(route.model)

    async def native_headers(self, request: ChatRequest, route: Route, ctx: CallContext) -> dict[str, str]:
        """This provider's headers with the client's ``anthropic-version`` and ``anthropic-beta`` (betas merged)."""
        assert request.native is not None
        headers = await self.headers(route, ctx)
        forwarded = request.native.headers
        if forwarded.get("anthropic-version"):
            headers["anthropic-version"] = forwarded["anthropic-version"]
        betas = merge_betas(headers.get("anthropic-beta"), forwarded.get("anthropic-beta"))
        if betas:
            headers["anthropic-beta"] = betas
        return headers

    def _error(self, status: int, raw: bytes, headers: Mapping[str, str], route: Route) -> errors.UpstreamError:
        return error_from_status(status, raw, headers, provider=self.name, model=route.model,
                                 secrets=self.secrets())

    async def _send(self, request: ChatRequest, route: Route, ctx: CallContext, *, stream: bool,
                    native: bool = False) -> httpx.Response:
        if native:
            body = self.native_body(request, route)
            headers = await self.native_headers(request, route, ctx)
        else:
            body = orjson.dumps(self.body(request, route))  # bad input fails here, before any upstream call
            headers = await self.headers(route, ctx)
        client = ctx.runtime.client()
        upstream = client.build_request("POST", self.messages_url, headers=headers, content=body,
                                        timeout=self.http_timeout(route, stream=stream))
        response = await send_upstream(client, upstream, provider=self.name, model=route.model, stream=stream)
        if response.status_code >= 400:
            raise self._error(response.status_code, response.content, response.headers, route)
        return response

    # -- calls --------------------------------------------------------------------------------------------------

    async def complete(self, request: ChatRequest, route: Route, ctx: CallContext) -> ChatResponse:
        response = await self._send(request, route, ctx, stream=False)
        return self._answer(response.content, route, answer_tool(request, route.model))

    async def complete_native(self, request: ChatRequest, route: Route, ctx: CallContext) -> ChatResponse:
        response = await self._send(request, route, ctx, stream=False, native=True)
        return with_native(self._answer(response.content, route), response.content)

    def _answer(self, raw: bytes, route: Route, answering: str | None = None) -> ChatResponse:
        try:
            return from_messages_response(loads(raw), model=route.model, answer_tool=answering)
        except SHAPE_ERRORS as exc:
            raise errors.UpstreamProtocolError(f"unexpected response body ({excerpt(str(exc), 200)})",
                                               provider=self.name, model=route.model) from None

    async def stream(self, request: ChatRequest, route: Route, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        response = await self._send(request, route, ctx, stream=True)
        return self._chunks(response, request, route, ctx)

    async def stream_native(self, request: ChatRequest, route: Route, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        response = await self._send(request, route, ctx, stream=True, native=True)
        return self._chunks(response, request, route, ctx, native=True)

    async def _chunks(self, response: httpx.Response, request: ChatRequest, route: Route, ctx: CallContext, *,
                      native: bool = False) -> AsyncIterator[ChatChunk]:
        """Chat chunks of the Messages stream; ``native``: with the events' own bytes on them, in order (events
        that make no chunk go with the next one), and always the usage chunk, for the middleware. An event that
        cannot be parsed is skipped, its bytes too (``Malformed``); a stream that ends without ``message_stop``
        after the ``message_delta`` with its stop reason finished all the same (natively: with that event added)."""
        translator = StreamTranslator(provider=self.name, model=route.model,
                                      include_usage=native or request.include_usage, secrets=self.secrets(),
                                      answer_tool=None if native else answer_tool(request, route.model))
        carried = PendingBytes()
        malformed = Malformed(ctx, route)
        try:
            with translate_transport(self.name, route.model):
                async for event in iter_sse(response.aiter_bytes(), raw=native):
                    try:
                        data = loads(event.data)  # real streams pad the JSON with spaces: parse it whole
                    except orjson.JSONDecodeError:
                        malformed.skip("malformed JSON", event.data)
                        continue
                    chunks = malformed.read(event.data, translator.feed, event.event, data)
                    if chunks is None:
                        continue  # skipped, its bytes too
                    for chunk in carried.carry(event.raw, chunks) if native else chunks:
                        yield chunk
                    if translator.stopped:
                        break
        finally:
            await response.aclose()
        if not translator.stopped:
            if translator.finish is None:
                raise errors.UpstreamProtocolError("stream ended before message_stop", provider=self.name,
                                                   model=route.model)
            chunks = translator.feed("message_stop", {"type": "message_stop"})  # what message_stop would give
            for chunk in carried.carry(MESSAGE_STOP, chunks) if native else chunks:
                yield chunk
        if carried.pending:
            yield with_native(ChatChunk(id=translator.id, model=translator.model, choices=()), carried.rest())
