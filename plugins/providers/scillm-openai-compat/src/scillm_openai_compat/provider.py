"""One provider class for every upstream that speaks OpenAI chat completions; a :class:`CompatSpec` per vendor
holds what differs (env names, base URL, routes, small wire quirks).

A chat-completions client's own body goes upstream as sent (``model`` rewritten) unless a vendor fix has to change
it, and the answer or stream comes back as the upstream sent it. A vendor with the Responses API
(``CompatSpec.responses_env``: OpenAI) also takes a ``/v1/responses`` client's body as sent, at
``{base}/responses``, when it talks to its own default base or the variable says so (``OPENAI_API_RESPONSES=1``;
``0`` turns it off): an OpenAI-compatible server behind ``OPENAI_API_BASE`` may have no ``/responses``, and gets
those requests translated to chat completions. Its events are read with the Codex plugin's Responses reader."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import attrs
import httpx
import orjson
from attrs import frozen
from scillm_codex.wire import StreamState, response_from_object, responses_chunks

from scillm_core import (
    CallContext,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    Provider,
    Route,
    errors,
    structure,
    unstructure,
    with_native,
)
from scillm_core.config import Env, ProviderSettings
from scillm_core.jsonio import loads
from scillm_core.models.params import AS_SENT
from scillm_core.upstream import (
    SHAPE_ERRORS,
    Malformed,
    error_for_status,
    excerpt,
    iter_sse_batches,
    send_upstream,
    translate_transport,
)

__all__ = ["CompatSpec", "OpenAICompatProvider", "conversation_id", "parse_error_body"]


@frozen(kw_only=True)
class CompatSpec:
    name: str
    family: str
    key_env: tuple[str, ...]
    base_env: str
    default_base: str
    prefixes: tuple[str, ...] = ()
    aliases: Mapping[str, str] = {}
    rule: Callable[[str], bool] | None = None
    rule_order: int = 100
    models: tuple[str, ...] = ()
    string_content: bool = False          # DeepSeek rejects content-part arrays
    max_temperature: float | None = None  # Moonshot accepts [0, 1]
    completion_tokens_models: Callable[[str], bool] | None = None  # models that reject max_tokens
    session_header: str | None = None     # OpenCode Go needs a stable per-conversation id
    declared: bool = False                # a server of the user's own ([providers.NAME] kind = ...)
    responses_env: str | None = None      # has the Responses API at {base}/responses: the variable that says so
    capabilities: frozenset[str] = frozenset({"streaming", "tools", "images", "json_mode"})


class OpenAICompatProvider(Provider):
    def __init__(self, spec: CompatSpec, env: Env | Mapping[str, str], settings: ProviderSettings) -> None:
        self.spec = spec
        self.name = spec.name
        self.family = spec.family
        self.prefixes = spec.prefixes
        self.aliases = spec.aliases
        self.rule_order = spec.rule_order
        self.capabilities = spec.capabilities | AS_SENT  # chat parameters go as sent: the upstream judges
        self._key = next((env[k] for k in spec.key_env if env.get(k)), None)
        self.base_url = (settings.base_url or env.get(spec.base_env) or spec.default_base).rstrip("/")
        flag = env.get(spec.responses_env) if spec.responses_env else None
        responses = spec.responses_env is not None and (
            flag == "1" if flag in ("0", "1") else self.base_url == spec.default_base.rstrip("/"))
        self.dialects = frozenset({"openai-chat", "openai-responses"} if responses else {"openai-chat"})
        self._url = httpx.URL(f"{self.base_url}/chat/completions")  # parsed once, not per request
        self._embeddings_url = httpx.URL(f"{self.base_url}/embeddings")
        self._responses_url = httpx.URL(f"{self.base_url}/responses")

    # -- routing ------------------------------------------------------------------------------------------------

    def claims(self, model: str) -> bool:
        return self.spec.rule is not None and self.spec.rule(model)

    def missing_config(self) -> str | None:
        if self._key or not self.spec.key_env:  # a declared server without key_env needs none
            return None
        first, *others = self.spec.key_env
        return f"set {first}" + (f" (or {', '.join(others)})" if others else "")

    def known_models(self) -> Sequence[str]:
        return self.spec.models

    def probe(self) -> tuple[str, Mapping[str, str]] | None:
        return f"{self.base_url}/models", {"authorization": f"Bearer {self._key}"}

    def describe(self) -> dict[str, Any]:
        described = {**super().describe(), "base_url": self.base_url, "key_env": list(self.spec.key_env),
                     "base_env": self.spec.base_env or None}
        if self.spec.declared:
            described.update(declared=True, models=list(self.spec.models))
        return described

    # -- wire ---------------------------------------------------------------------------------------------------

    def body(self, request: ChatRequest, route: Route) -> dict[str, Any]:
        body: dict[str, Any] = unstructure(request)
        body["model"] = route.model
        spec = self.spec
        if spec.string_content:
            body["messages"] = [_flatten(m, i, self.name) for i, m in enumerate(body["messages"])]
        if spec.max_temperature is not None and (request.temperature or 0) > spec.max_temperature:
            body["temperature"] = spec.max_temperature
        if spec.completion_tokens_models and spec.completion_tokens_models(route.model) and "max_tokens" in body:
            body.setdefault("max_completion_tokens", body.pop("max_tokens"))
        if not request.stream:
            body.pop("stream_options", None)
        return body

    def speaks(self, request: ChatRequest, route: Route) -> bool:
        """The client's chat body goes as sent unless this vendor needs one of its fixes applied to it."""
        if not super().speaks(request, route):
            return False
        assert request.native is not None
        if request.native.dialect == "openai-responses":
            return True
        spec = self.spec
        if spec.string_content and any(isinstance(m.content, tuple) for m in request.messages):
            return False
        if spec.max_temperature is not None and (request.temperature or 0) > spec.max_temperature:
            return False
        return not (spec.completion_tokens_models and spec.completion_tokens_models(route.model)
                    and request.max_tokens is not None)

    def headers(self, request: ChatRequest | None = None) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self._key:
            headers["authorization"] = f"Bearer {self._key}"
        if self.spec.session_header and request is not None:
            headers[self.spec.session_header] = conversation_id(request)
        return headers

    def _error(self, response: httpx.Response, raw: bytes, route: Route) -> errors.UpstreamError:
        message, code, kind = parse_error_body(raw)
        return error_for_status(response.status_code, message, provider=self.name, model=route.model, code=code,
                                kind=kind, headers=response.headers, secrets=(self._key,))

    async def complete(self, request: ChatRequest, route: Route, ctx: CallContext) -> ChatResponse:
        raw = await self._post(orjson.dumps(self.body(request, route)), request, route, ctx)
        return self._answer(raw, route)

    async def complete_native(self, request: ChatRequest, route: Route, ctx: CallContext) -> ChatResponse:
        assert request.native is not None
        if request.native.dialect == "openai-responses":
            raw = await self._post(request.native.upstream_body(route.model), request, route, ctx,
                                   url=self._responses_url)
            try:
                answer = response_from_object(loads(raw), provider=self.name, model=route.model)
            except SHAPE_ERRORS as exc:
                raise errors.UpstreamProtocolError(f"unexpected response body ({_short(exc)})", provider=self.name,
                                                   model=route.model) from None
            return with_native(answer, raw)
        raw = await self._post(request.native.upstream_body(route.model), request, route, ctx)
        return with_native(self._answer(raw, route), raw)

    async def _post(self, content: bytes, request: ChatRequest, route: Route, ctx: CallContext, *,
                    url: httpx.URL | None = None) -> bytes:
        with translate_transport(self.name, route.model):
            response = await ctx.runtime.client().post(url or self._url, headers=self.headers(request),
                                                       content=content, timeout=self.http_timeout(route, stream=False))
        if response.status_code >= 400:
            raise self._error(response, response.content, route)
        return response.content

    def _answer(self, raw: bytes, route: Route) -> ChatResponse:
        try:
            data = loads(raw.strip() or b"null")  # DeepSeek pads queued answers with blanks
            return structure(data, ChatResponse, what="upstream response")
        except (orjson.JSONDecodeError, errors.InvalidRequest) as exc:
            raise errors.UpstreamProtocolError(f"unexpected response body ({_short(exc)})", provider=self.name,
                                               model=route.model) from None

    async def embed(self, request: EmbeddingsRequest, route: Route, ctx: CallContext) -> EmbeddingsResponse:
        """``POST {base}/embeddings`` with the client's body (model rewritten); vectors come back as sent."""
        if "embeddings" not in self.capabilities:
            return await super().embed(request, route, ctx)
        body = unstructure(request)
        body["model"] = route.model
        with translate_transport(self.name, route.model):
            response = await ctx.runtime.client().post(self._embeddings_url, headers=self.headers(),
                                                       content=orjson.dumps(body),
                                                       timeout=self.http_timeout(route, stream=False))
        if response.status_code >= 400:
            raise self._error(response, response.content, route)
        try:
            result = structure(orjson.loads(response.content), EmbeddingsResponse, what="upstream response")
        except (orjson.JSONDecodeError, errors.InvalidRequest) as exc:
            raise errors.UpstreamProtocolError(f"unexpected embeddings body ({_short(exc)})", provider=self.name,
                                               model=route.model) from None
        if len(result.data) != len(request.inputs):
            raise errors.UpstreamProtocolError(f"{len(result.data)} embeddings for {len(request.inputs)} inputs",
                                               provider=self.name, model=route.model)
        return attrs.evolve(result, data=tuple(sorted(result.data, key=lambda item: item.index)))

    async def stream(self, request: ChatRequest, route: Route, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        response = await self._open(orjson.dumps(self.body(request, route)), request, route, ctx)
        return self._chunks(response, request, route, ctx)

    async def stream_native(self, request: ChatRequest, route: Route, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        assert request.native is not None
        if request.native.dialect == "openai-responses":
            response = await self._open(request.native.upstream_body(route.model), request, route, ctx,
                                        url=self._responses_url)
            state = StreamState(provider=self.name, model=route.model, include_usage=True, secrets=(self._key,))
            return responses_chunks(response, state, Malformed(ctx, route), native=True)
        response = await self._open(request.native.upstream_body(route.model), request, route, ctx)
        return self._chunks(response, request, route, ctx, native=True)

    async def _open(self, content: bytes, request: ChatRequest, route: Route, ctx: CallContext, *,
                    url: httpx.URL | None = None) -> httpx.Response:
        client = ctx.runtime.client()
        upstream = client.build_request("POST", url or self._url, headers=self.headers(request), content=content,
                                        timeout=self.http_timeout(route, stream=True))
        response = await send_upstream(client, upstream, provider=self.name, model=route.model)
        if response.status_code >= 400:
            raise self._error(response, response.content, route)
        return response

    async def _chunks(self, response: httpx.Response, request: ChatRequest, route: Route, ctx: CallContext, *,
                      native: bool = False) -> AsyncIterator[ChatChunk]:
        """Chunks of the upstream stream; ``native``: each as the upstream sent it, its bytes on ``native``. An
        event that cannot be parsed is skipped, its bytes too (``Malformed``); a stream that ends without
        ``[DONE]`` after its finish chunk finished all the same (some servers never send it)."""
        done = False
        ended: set[int] = set()  # choices that sent their finish_reason
        malformed = Malformed(ctx, route)
        try:
            with translate_transport(self.name, route.model):
                async for events in iter_sse_batches(response.aiter_bytes(), raw=native):
                    for event in events:
                        if event.data == "[DONE]":
                            done = True
                            break
                        try:
                            data = loads(event.data)
                        except orjson.JSONDecodeError:
                            malformed.skip("malformed JSON", event.data)
                            continue
                        if isinstance(data, dict) and "error" in data:
                            message, code, kind = parse_error_body(event.data.encode())
                            digits = str(code or "")  # an HTTP status ("429"), else a word, "²" or 5,000 digits
                            status = int(digits) if len(digits) == 3 and digits.isascii() and digits.isdigit() else 500
                            raise error_for_status(status,
                                                   message, provider=self.name, model=route.model, code=code,
                                                   kind=kind, secrets=(self._key,))
                        try:
                            chunk = structure(data, ChatChunk, what="upstream stream chunk")
                        except errors.InvalidRequest as exc:
                            malformed.skip(_short(exc), event.data)
                            continue
                        for choice in chunk.choices:
                            if choice.finish_reason is not None:
                                ended.add(choice.index)
                        if native:
                            yield with_native(chunk, event.raw)
                            continue
                        for piece in _split_usage(chunk, request.include_usage):
                            yield piece
                    if done:
                        break
        finally:
            await response.aclose()
        if not done and len(ended) < (request.n or 1):
            raise errors.UpstreamProtocolError("stream ended before [DONE]", provider=self.name, model=route.model)


def _split_usage(chunk: ChatChunk, include_usage: bool) -> tuple[ChatChunk, ...]:
    """Usage inside a finish chunk (GLM, Groq) becomes the separate ``choices: []`` chunk OpenAI clients expect,
    and is dropped when the client did not ask for it."""
    if chunk.usage is None or not chunk.choices:
        return (chunk,) if include_usage or chunk.usage is None else ()
    without = attrs.evolve(chunk, usage=None)
    if not include_usage:
        return (without,)
    return without, attrs.evolve(chunk, choices=())


def parse_error_body(raw: bytes) -> tuple[str, str | None, str | None]:
    """(message, code, type) from OpenAI ``{"error": {...}}``, ``{"error": "..."}``, FastAPI ``{"detail": ...}``
    (Chutes) or Z.ai business-code bodies; falls back to the raw text."""
    try:
        data = loads(raw)
    except orjson.JSONDecodeError:
        return excerpt(raw.decode("utf-8", "replace")).strip(), None, None
    if isinstance(data, list) and data:
        data = data[0]
    if not isinstance(data, dict):
        return excerpt(str(data)), None, None
    error = data.get("error", data)
    if isinstance(error, str):
        return error, None, None
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or data.get("detail") or orjson.dumps(error).decode()
        code = error.get("code")
        return excerpt(str(message), 2000), None if code is None else str(code), error.get("type")
    return excerpt(str(data)), None, None


def _flatten(message: dict[str, Any], index: int, provider: str) -> dict[str, Any]:
    """Text-only upstreams take string content; a non-text part is refused rather than silently dropped."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    for j, part in enumerate(content):
        if part.get("type") != "text":
            where = f"$.messages[{index}].content[{j}]"
            raise errors.InvalidRequest(f"provider {provider} takes text only, not {part.get('type')!r} parts "
                                        f"@ {where}; use a vision-capable model", param=where)
    return {**message, "content": "".join(p["text"] for p in content)}


def conversation_id(request: ChatRequest) -> str:
    """A stable id per conversation: ``scillm_metadata.session_id``, else a hash of model and first user turn."""
    metadata = request.scillm.get("scillm_metadata") or {}
    if isinstance(metadata, dict) and metadata.get("session_id"):
        return str(metadata["session_id"])
    first = next((m.text for m in request.messages if m.role == "user"), "")
    return "scillm-" + hashlib.sha256(f"{request.model}\0{first}".encode()).hexdigest()[:24]


def _short(exc: BaseException) -> str:
    return excerpt(str(getattr(exc, "message", exc)), 300)
