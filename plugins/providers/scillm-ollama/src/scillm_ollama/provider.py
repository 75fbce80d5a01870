"""The Ollama provider: native ``POST /api/chat`` (NDJSON stream or ``stream: false``) and ``GET /api/tags``.

Base URL: ``OLLAMA_API_BASE``, else ``OLLAMA_HOST`` (``host``, ``host:port`` or a URL, as the ``ollama`` CLI takes
it; ``0.0.0.0`` means this machine), else ``http://127.0.0.1:11434``. A trailing ``/v1`` or ``/api`` (OpenAI-compat
or API bases from other tools) is dropped. No key is needed; ``OLLAMA_API_KEY``, when set, is sent as a Bearer token
(Ollama Cloud).

``known_models()`` (``GET /v1/models``, typo suggestions) never does I/O itself: it returns the cached ``/api/tags``
names and, when the cache is older than :attr:`OllamaProvider.tags_ttl_s`, starts one background refresh on the
running event loop (2 s timeout). The app's startup schedules the first refresh without waiting for it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from scillm_core import (
    CallContext,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Choice,
    ChunkChoice,
    Delta,
    Embedding,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingsUsage,
    FilePart,
    FunctionCall,
    FunctionCallDelta,
    ImagePart,
    Message,
    OtherPart,
    Provider,
    Route,
    TextPart,
    Timeouts,
    ToolCall,
    ToolCallDelta,
    Usage,
    errors,
)
from scillm_core.config import Env, ProviderSettings
from scillm_core.jsonio import loads
from scillm_core.models.chat import token_count
from scillm_core.upstream import (
    SHAPE_ERRORS,
    Malformed,
    error_for_status,
    excerpt,
    iter_ndjson,
    send_upstream,
    translate_transport,
)

__all__ = ["DEFAULT_BASE", "OllamaProvider", "base_from_env", "build_body", "parse_error_body"]

DEFAULT_BASE = "http://127.0.0.1:11434"
MAX_IMAGE_BYTES = 20 * 1024 * 1024
_THINK = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "max",
          "max": "max"}


def base_from_env(env: Mapping[str, str], configured: str | None = None) -> str:
    value = configured or env.get("OLLAMA_API_BASE") or env.get("OLLAMA_HOST") or DEFAULT_BASE
    value = value.strip().rstrip("/")
    explicit = "://" in value
    if not explicit:
        value = "http://" + value
    parts = urlsplit(value)
    host = parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    # as the ollama CLI reads OLLAMA_HOST: a bare host gets port 11434, an explicit scheme its default port
    port = parts.port or (None if explicit else 11434)
    path = parts.path.rstrip("/")
    for suffix in ("/v1", "/api"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}{path}"


def parse_error_body(raw: bytes) -> str:
    """The message of an Ollama ``{"error": "..."}`` body (or an OpenAI-style object, or the raw text)."""
    try:
        data = loads(raw)
    except orjson.JSONDecodeError:
        return excerpt(raw.decode("utf-8", "replace").strip()) or "empty error body"
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, str):
        return error
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return excerpt(str(data))


# -- request ---------------------------------------------------------------------------------------------------------

def _data_url(url: str, where: str) -> str:
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64") or not data:
        raise errors.InvalidRequest(f"expected a base64 data URL (data:image/...;base64,...) @ {where}", param=where)
    mime = head[5:-7]
    if mime and not mime.startswith("image/"):
        raise errors.InvalidRequest(f"ollama takes images only, not {mime!r} @ {where}", param=where)
    return data


async def _user_content(message: Message, index: int, fetch: Any) -> tuple[str, list[str]]:
    content = message.content
    if content is None or isinstance(content, str):
        return content or "", []
    texts: list[str] = []
    images: list[str] = []
    for j, part in enumerate(content):
        where = f"$.messages[{index}].content[{j}]"
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, ImagePart):
            url = part.image_url.url
            if url.startswith("data:"):
                images.append(_data_url(url, where + ".image_url.url"))
            elif url.startswith(("http://", "https://")):
                images.append(await fetch(url, where + ".image_url.url"))
            else:
                raise errors.InvalidRequest(f"image_url must be a data URL or an http(s) URL @ {where}.image_url.url",
                                            param=where + ".image_url.url")
        else:
            kind = part.type if isinstance(part, OtherPart | FilePart) else type(part).__name__
            raise errors.InvalidRequest(f"ollama takes text and images, not {kind!r} parts @ {where} (PDFs are "
                                        "turned into text only when the files plugin is enabled)", param=where)
    return "\n".join(texts), images


def _arguments(raw: str, where: str) -> dict[str, Any]:
    try:
        value = loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        raise errors.InvalidRequest(f"tool call arguments are not valid JSON @ {where}", param=where) from None
    if not isinstance(value, dict):
        raise errors.InvalidRequest(f"tool call arguments must be a JSON object @ {where}", param=where)
    return value


async def build_body(request: ChatRequest, model: str, fetch: Any) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for i, message in enumerate(request.messages):
        if message.role in ("system", "developer"):
            messages.append({"role": "system", "content": message.text})
        elif message.role == "assistant":
            out: dict[str, Any] = {"role": "assistant", "content": message.text}
            thinking = message.extra.get("reasoning_content")
            if isinstance(thinking, str) and thinking:
                out["thinking"] = thinking
            if message.tool_calls:
                calls = []
                for k, call in enumerate(message.tool_calls):
                    names[call.id] = call.function.name
                    calls.append({"id": call.id, "function": {"index": k, "name": call.function.name, "arguments":
                                  _arguments(call.function.arguments,
                                             f"$.messages[{i}].tool_calls[{k}].function.arguments")}})
                out["tool_calls"] = calls
            messages.append(out)
        elif message.role in ("tool", "function"):
            name = names.get(message.tool_call_id or "") or message.name
            out = {"role": "tool", "content": message.text}
            if name:
                out["tool_name"] = name
            if message.tool_call_id:
                out["tool_call_id"] = message.tool_call_id
            messages.append(out)
        else:
            text, images = await _user_content(message, i, fetch)
            out = {"role": "user", "content": text}
            if images:
                out["images"] = images
            messages.append(out)
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": bool(request.stream)}
    if request.tools:
        body["tools"] = [{"type": "function", "function": {
            k: v for k, v in (("name", t.function.name), ("description", t.function.description),
                              ("parameters", dict(t.function.parameters) if t.function.parameters else None))
            if v is not None}} for t in request.tools]
    fmt = request.response_format or {}
    if fmt.get("type") == "json_object":
        body["format"] = "json"
    elif fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            raise errors.InvalidRequest("response_format json_schema needs json_schema.schema (an object) @ "
                                        "$.response_format.json_schema.schema",
                                        param="$.response_format.json_schema.schema")
        body["format"] = dict(spec["schema"])
    options: dict[str, Any] = {}
    if request.max_output_tokens is not None:
        options["num_predict"] = request.max_output_tokens
    for key, value in (("temperature", request.temperature), ("top_p", request.top_p), ("seed", request.seed)):
        if value is not None:
            options[key] = value
    if request.stop_sequences:
        options["stop"] = list(request.stop_sequences)
    for key in ("presence_penalty", "frequency_penalty", "top_k", "num_ctx"):
        value = request.extra.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            options[key] = value
    if options:
        body["options"] = options
    if request.reasoning_effort is not None:
        if request.reasoning_effort not in _THINK:
            raise errors.InvalidRequest(f"reasoning_effort must be one of {', '.join(_THINK)}, not "
                                        f"{request.reasoning_effort!r} @ $.reasoning_effort",
                                        param="$.reasoning_effort")
        body["think"] = _THINK[request.reasoning_effort]
    if isinstance(request.extra.get("keep_alive"), str | int):
        body["keep_alive"] = request.extra["keep_alive"]
    body.update(_logprobs_asked(request.extra))
    return body


def _logprobs_asked(extra: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI's ``logprobs`` / ``top_logprobs`` as Ollama's (top-level fields of the same names, ``top_logprobs``
    0 to 20); ``top_logprobs`` > 0 turns ``logprobs`` on, as it asks for them (``scillm_core.models.params``)."""
    logprobs, top = extra.get("logprobs"), extra.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise errors.InvalidRequest("logprobs must be a boolean @ $.logprobs", param="$.logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
        raise errors.InvalidRequest("top_logprobs must be an integer from 0 to 20 @ $.top_logprobs",
                                    param="$.top_logprobs")
    if not logprobs and not top:
        return {}
    return {"logprobs": True, "top_logprobs": top} if top else {"logprobs": True}


# -- response --------------------------------------------------------------------------------------------------------

def _call_id(call: Mapping[str, Any]) -> str:
    return str(call.get("id") or "call_" + secrets.token_hex(4))


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {type(value).__name__}")
    return value


def _finish(data: Mapping[str, Any], saw_call: bool) -> str:
    reason = data.get("done_reason") or "stop"
    if reason == "length":
        return "length"
    return "tool_calls" if saw_call else "stop"


def _usage(data: Mapping[str, Any]) -> Usage:
    prompt = token_count(data.get("prompt_eval_count"))
    completion = token_count(data.get("eval_count"))
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _token(entry: Mapping[str, Any]) -> dict[str, Any]:
    bytes_ = entry.get("bytes")
    return {"token": str(entry.get("token") or ""), "logprob": float(entry.get("logprob") or 0.0),
            "bytes": list(bytes_) if isinstance(bytes_, list) else None}


def logprobs_of(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Ollama's top-level ``logprobs`` (token, logprob, bytes, top_logprobs; empty fields left out) as OpenAI's
    ``logprobs.content`` entries (every field present, ``bytes`` null when Ollama sent none)."""
    entries = data.get("logprobs")
    if not isinstance(entries, list):
        return []
    return [{**_token(entry), "top_logprobs": [_token(top) for top in entry.get("top_logprobs") or ()
                                               if isinstance(top, Mapping)]}
            for entry in entries if isinstance(entry, Mapping)]


def parse_response(data: Any, model: str, logprobs: bool = False) -> ChatResponse:
    if not isinstance(data, Mapping) or not isinstance(data.get("message"), Mapping):
        raise TypeError("no message in the response")
    message = data["message"]
    calls = tuple(ToolCall(id=_call_id(call), function=FunctionCall(
        name=str((call.get("function") or {}).get("name", "")),
        arguments=orjson.dumps((call.get("function") or {}).get("arguments") or {}).decode()))
        for call in message.get("tool_calls") or ())
    extra = {"reasoning_content": _text(message["thinking"])} if message.get("thinking") else {}
    content = _text(message.get("content") or "")
    out = Message(role="assistant", content=content if content or not calls else None, tool_calls=calls or None,
                  extra=extra)
    return ChatResponse(id="chatcmpl-" + secrets.token_hex(12), model=str(data.get("model") or model),
                        created=int(time.time()),
                        choices=(Choice(message=out, finish_reason=_finish(data, bool(calls)),
                                        logprobs={"content": logprobs_of(data), "refusal": None} if logprobs
                                        else None),),
                        usage=_usage(data))


class OllamaProvider(Provider):
    name = "ollama"
    family = "ollama"
    prefixes = ("ollama/",)
    rule_order = 80
    capabilities = frozenset({"streaming", "tools", "images", "json_mode", "json_schema", "reasoning", "embeddings",
                              "logprobs"})
    #: Ollama loads the model before it answers a stream with headers: that can take minutes on a cold start
    timeouts = Timeouts(headers_s=300.0)
    tags_ttl_s = 60.0
    tags_timeout_s = 2.0

    def __init__(self, env: Env | Mapping[str, str], settings: ProviderSettings) -> None:
        self.base_url = base_from_env(env, settings.base_url)
        self._key = env.get("OLLAMA_API_KEY") or None
        self._tags: tuple[str, ...] = ()
        self._tags_at = float("-inf")
        self._refreshing: asyncio.Task[None] | None = None
        self.client: httpx.AsyncClient | None = None  # the app's shared client, set at startup

    def claims(self, model: str) -> bool:
        return ":" in model

    def missing_config(self) -> str | None:
        return None

    probe_required = False  # a local server: not running it is not a fault

    def probe(self) -> tuple[str, Mapping[str, str]] | None:
        return self.base_url + "/api/tags", self._headers()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "base_url": self.base_url, "key_env": [], "models": list(self._tags),
                "base_env": "OLLAMA_API_BASE"}

    # -- /api/tags ----------------------------------------------------------------------------------------------

    def known_models(self) -> Sequence[str]:
        if time.monotonic() - self._tags_at > self.tags_ttl_s:
            self.refresh_soon()
        return tuple(name if ":" in name else "ollama/" + name for name in self._tags)

    def refresh_soon(self) -> None:
        """Start a background ``/api/tags`` refresh if none runs and an event loop and the client are there."""
        if self.client is None or (self._refreshing is not None and not self._refreshing.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._refreshing = loop.create_task(self.refresh())

    async def refresh(self) -> None:
        """Fetch ``/api/tags``; on any failure keep the old list and try again after the TTL."""
        self._tags_at = time.monotonic()
        if self.client is None:
            return
        with contextlib.suppress(httpx.HTTPError, OSError, ValueError, TypeError, AttributeError):
            response = await self.client.get(self.base_url + "/api/tags", headers=self._headers(),
                                             timeout=httpx.Timeout(self.tags_timeout_s))
            if response.status_code == 200:
                models = loads(response.content).get("models") or []
                self._tags = tuple(str(m.get("name") or m.get("model")) for m in models
                                   if isinstance(m, dict) and (m.get("name") or m.get("model")))
        self._tags_at = time.monotonic()

    # -- wire ---------------------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self._key:
            headers["authorization"] = f"Bearer {self._key}"
        return headers

    def _error(self, status: int, raw: bytes, headers: Mapping[str, str], route: Route) -> errors.UpstreamError:
        message = parse_error_body(raw)
        if status == 404 and "not found" in message:
            message += f" (pull it first: ollama pull {route.model})"
        return error_for_status(status, message, provider=self.name, model=route.model, headers=headers,
                                secrets=(self._key,))

    async def _body(self, request: ChatRequest, route: Route, ctx: CallContext) -> bytes:
        async def fetch(url: str, where: str) -> str:
            return await fetch_image(ctx.runtime.client(), url, where)

        return orjson.dumps(await build_body(request, route.model, fetch))

    async def complete(self, request: ChatRequest, route: Route, ctx: CallContext) -> ChatResponse:
        body = await self._body(request, route, ctx)
        with translate_transport(self.name, route.model):
            response = await ctx.runtime.client().post(self.base_url + "/api/chat", headers=self._headers(),
                                                       content=body, timeout=self.http_timeout(route, stream=False))
        if response.status_code >= 400:
            raise self._error(response.status_code, response.content, response.headers, route)
        try:
            data = loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise errors.UpstreamProtocolError(f"unexpected response body ({exc})", provider=self.name,
                                               model=route.model) from None
        if isinstance(data, dict) and "error" in data:
            raise self._error(500, response.content, {}, route)
        try:
            return parse_response(data, route.model, logprobs=bool(_logprobs_asked(request.extra)))
        except SHAPE_ERRORS as exc:
            raise errors.UpstreamProtocolError(f"unexpected response body ({excerpt(str(exc), 200)})",
                                               provider=self.name, model=route.model) from None

    async def embed(self, request: EmbeddingsRequest, route: Route, ctx: CallContext) -> EmbeddingsResponse:
        """Native ``POST /api/embed``: ``input`` as sent (text only), ``dimensions``, and the extra body fields
        ``truncate``, ``keep_alive`` and ``options`` passed on; usage is ``prompt_eval_count``."""
        texts = request.texts(self.name)
        body: dict[str, Any] = {"model": route.model, "input": request.input}
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions
        for field in ("truncate", "keep_alive", "options"):
            if field in request.extra:
                body[field] = request.extra[field]
        with translate_transport(self.name, route.model):
            response = await ctx.runtime.client().post(self.base_url + "/api/embed", headers=self._headers(),
                                                       content=orjson.dumps(body),
                                                       timeout=self.http_timeout(route, stream=False))
        if response.status_code >= 400:
            raise self._error(response.status_code, response.content, response.headers, route)
        try:
            data = orjson.loads(response.content)
            vectors = data["embeddings"]
            tokens = token_count(data.get("prompt_eval_count"))
        except SHAPE_ERRORS as exc:
            raise errors.UpstreamProtocolError(f"unexpected embeddings body ({str(exc)[:200]})", provider=self.name,
                                               model=route.model) from None
        if not isinstance(vectors, list) or len(vectors) != len(texts) or not all(isinstance(v, list) for v in vectors):
            raise errors.UpstreamProtocolError(f"{len(vectors) if isinstance(vectors, list) else 0} embeddings for "
                                               f"{len(texts)} inputs", provider=self.name, model=route.model)
        return EmbeddingsResponse(data=tuple(Embedding(embedding=v, index=i) for i, v in enumerate(vectors)),
                                  model=str(data.get("model") or route.model),
                                  usage=EmbeddingsUsage(prompt_tokens=tokens, total_tokens=tokens))

    async def stream(self, request: ChatRequest, route: Route, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        body = await self._body(request, route, ctx)
        client = ctx.runtime.client()
        upstream = client.build_request("POST", self.base_url + "/api/chat", headers=self._headers(), content=body,
                                        timeout=self.http_timeout(route, stream=True))
        response = await send_upstream(client, upstream, provider=self.name, model=route.model)
        if response.status_code >= 400:
            raise self._error(response.status_code, response.content, response.headers, route)
        return self._chunks(response, request, route, ctx)

    async def _chunks(self, response: httpx.Response, request: ChatRequest, route: Route,
                      ctx: CallContext) -> AsyncIterator[ChatChunk]:
        """Chat chunks of the NDJSON stream; a line that cannot be parsed or translated is skipped (``Malformed``)."""
        malformed = Malformed(ctx, route)
        chunk_id = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())
        model = route.model
        first = True
        calls = 0
        done = False

        def chunk(delta: Delta, finish: str | None = None, logprobs: Any = None) -> ChatChunk:
            return ChatChunk(id=chunk_id, model=model, created=created,
                             choices=(ChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs),))

        def translate(data: dict[str, Any]) -> list[ChatChunk]:
            nonlocal model, first, calls, done
            out = []
            model = str(data.get("model") or model)
            if first:
                first = False
                out.append(chunk(Delta(role="assistant", content="")))
            message = data.get("message") or {}
            if message.get("thinking"):
                out.append(chunk(Delta(extra={"reasoning_content": _text(message["thinking"])})))
            if message.get("content"):  # a line's logprobs are its tokens' (those of thinking-only lines are the
                # reasoning's, which OpenAI's logprobs do not cover)
                out.append(chunk(Delta(content=_text(message["content"])),
                                 logprobs={"content": logprobs_of(data)} if "logprobs" in data else None))
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                out.append(chunk(Delta(tool_calls=(ToolCallDelta(
                    index=calls, id=_call_id(call), type="function", function=FunctionCallDelta(
                        name=str(function.get("name", "")),
                        arguments=orjson.dumps(function.get("arguments") or {}).decode())),))))
                calls += 1
            if data.get("done"):
                done = True
                out.append(chunk(Delta(), _finish(data, bool(calls))))
                if request.include_usage:
                    out.append(ChatChunk(id=chunk_id, model=model, created=created, choices=(), usage=_usage(data)))
            return out

        try:
            with translate_transport(self.name, route.model):
                async for data in iter_ndjson(response.aiter_bytes(), malformed):
                    if not isinstance(data, dict):
                        malformed.skip("not a JSON object", orjson.dumps(data))
                        continue
                    if "error" in data:
                        raise self._error(500, orjson.dumps(data), {}, route)
                    for piece in malformed.read(orjson.dumps(data), translate, data) or ():
                        yield piece
                    if done:
                        break
        finally:
            await response.aclose()
        if not done:
            raise errors.UpstreamProtocolError("stream ended before the done line", provider=self.name,
                                               model=route.model)


async def fetch_image(client: httpx.AsyncClient, url: str, where: str) -> str:
    """Download an http(s) image as raw base64 (Ollama takes no URLs): at most 20 MB, an ``image/*`` type."""
    try:
        async with client.stream("GET", url, timeout=httpx.Timeout(15.0), follow_redirects=True) as response:
            if response.status_code >= 400:
                raise errors.InvalidRequest(f"could not fetch the image: HTTP {response.status_code} @ {where}",
                                            param=where)
            mime = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if not mime.startswith("image/"):
                raise errors.InvalidRequest(f"the URL did not return an image (content-type {mime or 'missing'!r}) "
                                            f"@ {where}", param=where)
            data = bytearray()
            async for piece in response.aiter_bytes():
                data += piece
                if len(data) > MAX_IMAGE_BYTES:
                    raise errors.PayloadTooLarge(f"image larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB @ {where}",
                                                 param=where)
    except httpx.HTTPError as exc:
        raise errors.InvalidRequest(f"could not fetch the image ({type(exc).__name__}) @ {where}",
                                    param=where) from None
    return base64.b64encode(bytes(data)).decode()
