"""The Gemini provider: native ``generateContent`` / ``streamGenerateContent?alt=sse`` with ``x-goog-api-key``.

Base URL: ``GEMINI_API_BASE`` (or ``[providers.gemini] base_url``), default
``https://generativelanguage.googleapis.com``. A base without a version segment gets ``/v1beta`` appended; a base that
already ends in a version (``/v1beta``, ``/v1``, ``/v1alpha``) is used as is; the OpenAI-compatibility base older
setups used (``.../v1beta/openai``) loses its ``/openai``. Calls then go to ``{base}/models/{model}:generateContent``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx
import orjson

from scillm_core import (
    CallContext,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Embedding,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingsUsage,
    Provider,
    Route,
    errors,
)
from scillm_core.config import Env, ProviderSettings
from scillm_core.jsonio import loads
from scillm_core.redact import redact
from scillm_core.upstream import (
    SHAPE_ERRORS,
    Malformed,
    error_for_status,
    excerpt,
    iter_sse,
    retry_after_seconds,
    send_upstream,
    translate_transport,
)
from scillm_gemini.translate import StreamState, build_body, parse_response

__all__ = ["DEFAULT_BASE", "GeminiProvider", "api_root", "error_from_body", "parse_error_body"]

DEFAULT_BASE = "https://generativelanguage.googleapis.com"
MAX_IMAGE_BYTES = 20 * 1024 * 1024
EMBED_BATCH = 100  # batchEmbedContents takes at most 100 requests
_VERSION = re.compile(r"/v\d+(?:alpha|beta)?\d*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


def api_root(base: str) -> str:
    """``{scheme}://{host}[/path]/{version}`` from a configured base (see the module docstring)."""
    root = base.rstrip("/")
    if root.endswith("/openai"):
        root = root[: -len("/openai")]
    return root if _VERSION.search(root) else root + "/v1beta"


def parse_error_body(raw: bytes) -> tuple[str, str | None, list[Mapping[str, Any]]]:
    """(message, status such as ``RESOURCE_EXHAUSTED``, details) from a Google error body, bare or array-wrapped."""
    try:
        data = loads(raw)
    except orjson.JSONDecodeError:
        return excerpt(raw.decode("utf-8", "replace").strip()), None, []
    if isinstance(data, list) and data:
        data = data[0]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, str):
        return error, None, []
    if not isinstance(error, dict):
        return excerpt(str(data)), None, []
    details: list[Mapping[str, Any]] = [d for d in error.get("details") or [] if isinstance(d, dict)]
    status = error.get("status")
    return str(error.get("message") or status or "error"), None if status is None else str(status), details


def _detail(details: list[Mapping[str, Any]], kind: str) -> Mapping[str, Any] | None:
    return next((d for d in details if str(d.get("@type", "")).endswith(kind)), None)


def error_from_body(status: int, raw: bytes, *, provider: str, model: str, headers: Mapping[str, str] | None = None,
                    secrets: tuple[str | None, ...] = ()) -> errors.UpstreamError:
    """Map a Gemini error (HTTP status + body) to the error tree.

    400 ``API_KEY_INVALID`` is an auth failure; a 429 takes its retry delay from ``RetryInfo.retryDelay`` (Gemini
    sends no Retry-After header) and is a quota error, not a rate limit, when a ``QuotaFailure`` names a per-day quota.
    """
    message, code, details = parse_error_body(raw)
    text = redact(message, secrets)
    headers = dict(headers or {})
    info = _detail(details, "google.rpc.ErrorInfo") or {}
    if info.get("reason") in ("API_KEY_INVALID", "API_KEY_EXPIRED") or status == 401:
        return errors.UpstreamAuthError(f"{text} (check GEMINI_API_KEY)", provider=provider, model=model,
                                        upstream_status=status)
    if status == 429:
        retry = _detail(details, "google.rpc.RetryInfo") or {}
        match = _DURATION.match(str(retry.get("retryDelay") or ""))
        delay = float(match.group(1)) if match else retry_after_seconds(headers)
        quota = _detail(details, "google.rpc.QuotaFailure") or {}
        per_day = any("PerDay" in str(v.get("quotaId", "")) for v in quota.get("violations") or [])
        common: dict[str, Any] = {"provider": provider, "model": model, "upstream_status": status}
        if per_day:
            return errors.UpstreamQuotaExceeded(text, code="insufficient_quota", retry_after_s=delay, **common)
        return errors.UpstreamRateLimited(text, retry_after_s=delay, **common)
    return error_for_status(status, text, provider=provider, model=model,
                            code=code if status in (400, 413, 422) else None, headers=headers, secrets=secrets)


class GeminiProvider(Provider):
    name = "gemini"
    family = "gemini"
    prefixes = ("gemini/",)
    aliases = {"text-gemini": "gemini-2.5-flash"}
    rule_order = 40
    capabilities = frozenset({"streaming", "tools", "images", "pdf", "audio", "json_mode", "json_schema",
                              "reasoning", "embeddings", "choices",  # choices: n is candidateCount
                              "web_search"})  # web_search: its Google Search tool
    models = ("gemini-2.5-flash", "gemini-2.5-pro", "gemini-2.5-flash-lite", "gemini-3-flash-preview",
              "gemini-3-pro-preview", "gemini-embedding-001")

    def __init__(self, env: Env | Mapping[str, str], settings: ProviderSettings) -> None:
        self._key = env.get("GEMINI_API_KEY") or env.get("GOOGLE_API_KEY") or None
        self.base_url = (settings.base_url or env.get("GEMINI_API_BASE") or DEFAULT_BASE).rstrip("/")
        self.root = api_root(self.base_url)

    def claims(self, model: str) -> bool:
        return model.startswith("gemini-")

    def missing_config(self) -> str | None:
        return None if self._key else "set GEMINI_API_KEY"

    def known_models(self) -> Sequence[str]:
        return self.models

    def probe(self) -> tuple[str, Mapping[str, str]] | None:
        return f"{self.root}/models", {"x-goog-api-key": self._key or ""}

    def upstream_model(self, model: str) -> str:
        return super().upstream_model(model).removeprefix("models/")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "base_url": self.base_url, "key_env": ["GEMINI_API_KEY"],
                "base_env": "GEMINI_API_BASE"}

    # -- wire ---------------------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"x-goog-api-key": self._key or "", "content-type": "application/json"}

    def _url(self, route: Route, method: str) -> str:
        return f"{self.root}/models/{route.model}:{method}"

    async def _body(self, request: ChatRequest, route: Route, ctx: CallContext) -> bytes:
        async def fetch(url: str, where: str) -> tuple[str, str]:
            return await fetch_image(ctx.runtime.client(), url, where)

        return orjson.dumps(await build_body(request, route.model, fetch))

    def _error(self, status: int, raw: bytes, headers: Mapping[str, str], route: Route) -> errors.UpstreamError:
        return error_from_body(status, raw, provider=self.name, model=route.model, headers=headers,
                               secrets=(self._key,))

    async def complete(self, request: ChatRequest, route: Route, ctx: CallContext) -> ChatResponse:
        body = await self._body(request, route, ctx)
        with translate_transport(self.name, route.model):
            response = await ctx.runtime.client().post(self._url(route, "generateContent"), headers=self._headers(),
                                                       content=body, timeout=self.http_timeout(route, stream=False))
        if response.status_code >= 400:
            raise self._error(response.status_code, response.content, response.headers, route)
        try:
            return parse_response(loads(response.content), route.model)
        except SHAPE_ERRORS as exc:
            raise errors.UpstreamProtocolError(f"unexpected response body ({excerpt(str(exc), 200)})",
                                               provider=self.name, model=route.model) from None

    async def embed(self, request: EmbeddingsRequest, route: Route, ctx: CallContext) -> EmbeddingsResponse:
        """``batchEmbedContents`` (what google-genai's ``embed_content`` calls), 100 inputs per upstream call:
        ``dimensions`` becomes ``outputDimensionality``, ``task_type`` and ``title`` (extra body fields) become
        ``taskType`` and ``title``; usage is ``usageMetadata.promptTokenCount`` summed."""
        texts = request.texts(self.name)
        options: dict[str, Any] = {}
        if request.dimensions is not None:
            options["outputDimensionality"] = request.dimensions
        for field, wire in (("task_type", "taskType"), ("title", "title")):
            if request.extra.get(field) is not None:
                options[wire] = request.extra[field]
        vectors: list[Any] = []
        tokens = 0
        for start in range(0, len(texts), EMBED_BATCH):
            chunk = texts[start:start + EMBED_BATCH]
            body = {"requests": [{"model": f"models/{route.model}", "content": {"parts": [{"text": text}]},
                                  **options} for text in chunk]}
            with translate_transport(self.name, route.model):
                response = await ctx.runtime.client().post(self._url(route, "batchEmbedContents"),
                                                           headers=self._headers(), content=orjson.dumps(body),
                                                           timeout=self.http_timeout(route, stream=False))
            if response.status_code >= 400:
                raise self._error(response.status_code, response.content, response.headers, route)
            try:
                data = orjson.loads(response.content)
                values = [item["values"] for item in data["embeddings"]]
                tokens += int((data.get("usageMetadata") or {}).get("promptTokenCount") or 0)
            except SHAPE_ERRORS as exc:
                raise errors.UpstreamProtocolError(f"unexpected embeddings body ({str(exc)[:200]})",
                                                   provider=self.name, model=route.model) from None
            if len(values) != len(chunk) or not all(isinstance(v, list) for v in values):
                raise errors.UpstreamProtocolError(f"{len(values)} embeddings for {len(chunk)} inputs",
                                                   provider=self.name, model=route.model)
            vectors.extend(values)
        return EmbeddingsResponse(data=tuple(Embedding(embedding=v, index=i) for i, v in enumerate(vectors)),
                                  model=route.model, usage=EmbeddingsUsage(prompt_tokens=tokens, total_tokens=tokens))

    async def stream(self, request: ChatRequest, route: Route, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        body = await self._body(request, route, ctx)
        client = ctx.runtime.client()
        upstream = client.build_request("POST", self._url(route, "streamGenerateContent") + "?alt=sse",
                                        headers=self._headers(), content=body,
                                        timeout=self.http_timeout(route, stream=True))
        response = await send_upstream(client, upstream, provider=self.name, model=route.model)
        if response.status_code >= 400:
            raise self._error(response.status_code, response.content, response.headers, route)
        return self._chunks(response, request, route, ctx)

    async def _chunks(self, response: httpx.Response, request: ChatRequest, route: Route,
                      ctx: CallContext) -> AsyncIterator[ChatChunk]:
        """Chat chunks of the stream; an event that cannot be parsed is skipped (``Malformed``)."""
        state = StreamState(route.model, request.include_usage)
        malformed = Malformed(ctx, route)
        try:
            with translate_transport(self.name, route.model):
                async for event in iter_sse(response.aiter_bytes()):
                    try:
                        data = loads(event.data)
                    except orjson.JSONDecodeError:
                        malformed.skip("malformed JSON", event.data)
                        continue
                    if isinstance(data, list) and data:
                        data = data[0]
                    if not isinstance(data, dict):
                        malformed.skip("not a JSON object", event.data)
                        continue
                    if "error" in data:
                        error = data["error"] if isinstance(data["error"], dict) else {}
                        code = error.get("code")
                        raise self._error(code if isinstance(code, int) and code >= 400 else 500,
                                          event.data.encode(), {}, route)
                    for chunk in malformed.read(event.data, state.feed, data) or ():
                        yield chunk
        finally:
            await response.aclose()
        if not state.complete:
            raise errors.UpstreamProtocolError("stream ended before a finishReason", provider=self.name,
                                               model=route.model)
        usage = state.usage_chunk()
        if usage is not None:
            yield usage


async def fetch_image(client: httpx.AsyncClient, url: str, where: str) -> tuple[str, str]:
    """Download an http(s) image for inlining: at most 20 MB, an ``image/*`` (or PDF) type; 400 naming ``where``."""
    try:
        async with client.stream("GET", url, timeout=httpx.Timeout(15.0), follow_redirects=True) as response:
            if response.status_code >= 400:
                raise errors.InvalidRequest(f"could not fetch the image: HTTP {response.status_code} @ {where}",
                                            param=where)
            mime = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if not (mime.startswith("image/") or mime == "application/pdf"):
                raise errors.InvalidRequest(f"the URL did not return an image (content-type {mime or 'missing'!r}) "
                                            f"@ {where}", param=where)
            data = bytearray()
            async for piece in response.aiter_bytes():
                data += piece
                if len(data) > MAX_IMAGE_BYTES:
                    raise errors.PayloadTooLarge(f"image larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB; send it "
                                                 f"as a data URL or smaller @ {where}", param=where)
    except httpx.HTTPError as exc:
        raise errors.InvalidRequest(f"could not fetch the image ({type(exc).__name__}) @ {where}",
                                    param=where) from None
    return mime, base64.b64encode(bytes(data)).decode()
