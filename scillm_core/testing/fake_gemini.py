"""A fake Gemini API (``generativelanguage.googleapis.com``) rendering :class:`Reply` objects in the wire format
recorded in ``shared/fixtures/gemini``.

- ``POST /v1beta/models/{model}:generateContent`` -> one ``GenerateContentResponse``;
- ``POST /v1beta/models/{model}:streamGenerateContent?alt=sse`` -> ``data: {json}\\r\\n\\r\\n`` events (CRLF, no
  ``event:`` lines, no ``[DONE]``), each holding only new parts, ``usageMetadata`` cumulative on every event (the
  first lacks ``candidatesTokenCount``), ``finishReason`` only on the last; thought parts first; each function call
  whole in one event, without an id, the first carrying a ``thoughtSignature``;
- a :meth:`Reply.cite` answer to a request with the ``googleSearch`` tool is grounded: the last event's candidate
  carries ``groundingMetadata`` in the documented shape (no grounded answer is recorded in ``shared/fixtures``):
  ``webSearchQueries``, ``searchEntryPoint.renderedContent``, ``groundingChunks[].web.{uri,title}`` (one per page a
  citation's ``url`` names) and ``groundingSupports[]`` of each cited block: ``segment.{partIndex, startIndex,
  endIndex, text}`` in UTF-8 bytes of the answer's text part, fields at 0 left out as proto3 JSON does, and
  ``groundingChunkIndices``;
- the same path without ``alt=sse`` -> a pretty-printed JSON array streamed element by element, errors array-wrapped;
- auth by ``x-goog-api-key`` or ``?key=``; errors as ``{"error": {"code", "message", "status", "details"}}``: a
  401 reply renders as Gemini's real invalid-key answer (400 ``INVALID_ARGUMENT`` + ``ErrorInfo API_KEY_INVALID``), a
  429 as ``RESOURCE_EXHAUSTED`` whose ``retry-after`` becomes ``RetryInfo.retryDelay`` (Gemini sends no header);
- thought signatures are checked like the real API: an echoed signature it never issued is "Corrupted"; for
  ``gemini-3*`` models (or ``strict_signatures = True``) the first replayed ``functionCall`` of a model turn must
  carry one (or the documented ``skip_thought_signature_validator``);
- ``POST .../models/{model}:batchEmbedContents`` (what ``google-genai``'s ``embed_content`` calls): ``{"requests":
  [{"model": "models/{model}", "content": {"parts": [{"text"}]}, "taskType"?, "title"?, "outputDimensionality"?}]}``
  (at most 100, each naming the URL's model) -> ``{"embeddings": [{"values": [...]}]}`` plus top-level
  ``usageMetadata`` (``promptTokenCount`` and ``promptTokenDetails``, no total) as the current API sends;
  ``:embedContent`` takes one ``content`` and answers ``{"embedding": {"values": [...]}}``. Vectors are
  :func:`~scillm_core.testing.replies.fake_vector` of the text.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import AsyncIterator, Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from scillm_core.testing.fakes import FakeUpstream
from scillm_core.testing.replies import Reply, fake_vector

__all__ = ["FakeGemini"]

#: the fields of a ``Tool`` (proto JSON takes either spelling)
_TOOLS = frozenset({"functionDeclarations", "function_declarations", "googleSearch", "google_search",
                    "googleSearchRetrieval", "google_search_retrieval", "codeExecution", "code_execution",
                    "urlContext", "url_context"})

_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
           409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_FINISH = {"stop": "STOP", "tool_calls": "STOP", "length": "MAX_TOKENS", "content_filter": "SAFETY"}
SKIP = ("skip_thought_signature_validator", "context_engineering_is_the_way_to_go")
TASK_TYPES = ("TASK_TYPE_UNSPECIFIED", "RETRIEVAL_QUERY", "RETRIEVAL_DOCUMENT", "SEMANTIC_SIMILARITY",
              "CLASSIFICATION", "CLUSTERING", "QUESTION_ANSWERING", "FACT_VERIFICATION", "CODE_RETRIEVAL_QUERY")
MAX_EMBED_REQUESTS = 100


def _dumps(payload: Any, *, indent: int | None = None) -> str:
    # Google's JSON: ", " never, ": " after keys, non-ASCII kept (as recorded)
    return json.dumps(payload, ensure_ascii=False, separators=(",", ": "), indent=indent)


def google_error(status: int, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": status, "message": message, "status": _STATUS.get(status, "UNKNOWN")}
    if details:
        error["details"] = details
    return {"error": error}


class FakeGemini(FakeUpstream):
    """Gemini API at ``{url}`` (the SDK's ``base_url``); versioned roots ``{url}/v1beta``, ``{url}/v1``."""

    versions = ("v1beta", "v1", "v1alpha")  # the API versions served (google-genai 3.x defaults to v1)
    strict_signatures: bool | None = None   # None: only for gemini-3* models
    api_key: str | None = None              # when set, any other key gets 400 API_KEY_INVALID
    wrong_shape_answer = b'{"candidates": [{"content": {"parts": 5}, "finishReason": "STOP"}]}'
    wrong_shape_event = b'data: {"candidates": [{"content": {"parts": 5}}]}\r\n\r\n'
    embedding_dimensions = 8                # vector length when no outputDimensionality is asked for

    def __init__(self) -> None:
        super().__init__()
        self.issued_signatures: set[str] = set()

    @property
    def base_url(self) -> str:
        return self.url

    def routes(self) -> list[Route]:
        return [Route("/{version}/models/{rest:path}", self.models_call, methods=["POST"]),
                Route("/{version}/models", self.list_models, methods=["GET"])]

    async def list_models(self, request: Request) -> Response:
        if request.path_params["version"] not in self.versions:
            return self._json(google_error(404, "Not Found"), 404)
        return Response(_dumps({"models": [{
            "name": "models/gemini-2.5-flash", "version": "001", "displayName": "Gemini 2.5 Flash",
            "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
            "supportedGenerationMethods": ["generateContent", "countTokens", "streamGenerateContent"]}]}),
            media_type="application/json")

    # -- request handling ---------------------------------------------------------------------------------------

    def _json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return Response(_dumps(payload, indent=2), status_code=status, headers=headers,
                        media_type="application/json; charset=UTF-8")

    def _key_problem(self, request: Request) -> tuple[int, dict[str, Any]] | None:
        key = request.headers.get("x-goog-api-key") or request.query_params.get("key")
        if not key:
            return 403, google_error(403, "Method doesn't allow unregistered callers (callers without established "
                                          "identity). Please use API Key or other form of API consumer identity "
                                          "to call this API.")
        if self.api_key is not None and key != self.api_key:
            return 400, self._invalid_key()
        return None

    def _check(self, request: Request, model: str, body: Any) -> tuple[int, dict[str, Any]] | None:
        problem = self._key_problem(request)
        if problem is not None:
            return problem
        if not isinstance(body, dict) or not isinstance(body.get("contents"), list) or not body["contents"]:
            return 400, google_error(400, "* GenerateContentRequest.contents: contents is not specified")
        for t, tool in enumerate(body.get("tools") or ()):
            unknown = next((name for name in tool if name not in _TOOLS), None) if isinstance(tool, dict) else "?"
            if unknown is not None:
                return 400, google_error(400, f"Invalid JSON payload received. Unknown name \"{unknown}\" at "
                                              f"'tools[{t}]': Cannot find field.")
        strict = self.strict_signatures if self.strict_signatures is not None else model.startswith("gemini-3")
        for c, content in enumerate(body["contents"]):
            if content.get("role") not in ("user", "model"):
                return 400, google_error(400, f"Please use a valid role: user, model. (contents[{c}])")
            first_call = True
            for part in content.get("parts") or []:
                signature = part.get("thoughtSignature")
                if signature and signature not in SKIP and signature not in self.issued_signatures:
                    return 400, google_error(400, "Corrupted thought signature.")
                if "functionCall" in part:
                    if strict and first_call and not signature:
                        return 400, google_error(
                            400, f"Function call is missing a thought_signature in functionCall parts. This is "
                                 f"required for tools to work correctly, and missing thought_signature may lead to "
                                 f"degraded model performance. Additional data, function call `default_api:"
                                 f"{part['functionCall'].get('name')}` , position {c + 1}. Please refer to "
                                 f"https://ai.google.dev/gemini-api/docs/thought-signatures for more details.")
                    first_call = False
        return None

    @staticmethod
    def _invalid_key() -> dict[str, Any]:
        return google_error(400, "API key not valid. Please pass a valid API key.", [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
             "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}},
            {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
             "message": "API key not valid. Please pass a valid API key."}])

    def error_body(self, reply: Reply) -> tuple[int, Any]:
        """(status, body) for an error reply, as Gemini would send it."""
        error = reply.error
        if not (isinstance(error, dict) and "message" in error):
            return reply.status, error if error is not None else google_error(reply.status, "upstream failure")
        message = str(error["message"])
        if reply.status == 401:
            body = self._invalid_key()
            body["error"]["message"] = message
            return 400, body
        if reply.status == 429:
            headers = {k.lower(): v for k, v in reply.headers.items()}
            delay = headers.get("retry-after", "47")
            return 429, google_error(429, message, [
                {"@type": "type.googleapis.com/google.rpc.Help", "links": [
                    {"description": "Learn more about Gemini API quotas",
                     "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                    {"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                     "quotaId": (error.get("code") == "per_day" and "GenerateRequestsPerDayPerProjectPerModel-FreeTier")
                     or "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                     "quotaDimensions": {"location": "global", "model": "gemini-2.5-flash"}, "quotaValue": "10"}]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{delay}s"}])
        return reply.status, google_error(reply.status, message)

    async def models_call(self, request: Request) -> Response:
        recorded = await self.record(request)
        if request.path_params["version"] not in self.versions:
            return self._json(google_error(404, "Not Found"), 404)
        model, _, method = request.path_params["rest"].rpartition(":")
        if method in ("batchEmbedContents", "embedContent"):
            return await self.embed(request, recorded.body, model, method)
        if method not in ("generateContent", "streamGenerateContent"):
            return self._json(google_error(404, f"unknown method {method!r}"), 404)
        sse = request.query_params.get("alt") == "sse"
        stream = method == "streamGenerateContent"
        wrap = stream and not sse
        problem = self._check(request, model, recorded.body)
        if problem is not None:
            status, payload = problem
            return self._json([payload] if wrap else payload, status)
        reply = await self.answer()
        model = reply.model or model
        if reply.raw is not None and not stream:
            return Response(reply.raw, status_code=reply.status, media_type="application/json; charset=UTF-8")
        if reply.status >= 400:
            status, payload = self.error_body(reply)
            headers = {k: v for k, v in reply.headers.items() if k.lower() != "retry-after"}
            return self._json([payload] if wrap else payload, status, headers)
        response_id = base64.urlsafe_b64encode(secrets.token_bytes(15)).decode()
        searched = any(isinstance(tool, dict) and ("googleSearch" in tool or "google_search" in tool)
                       for tool in recorded.body.get("tools") or ())
        events = list(self.events(reply, model, response_id, searched=searched))
        if not stream:
            return self._json(self.merge(events))
        if sse:
            return StreamingResponse(self._sse(reply, events), media_type="text/event-stream",
                                     headers={"content-disposition": "attachment", **reply.headers})
        return StreamingResponse(self._array(reply, events), media_type="application/json; charset=UTF-8",
                                 headers=dict(reply.headers))

    # -- embeddings -----------------------------------------------------------------------------------------------

    def _embed_problem(self, model: str, item: Any, where: str) -> str | None:
        if not isinstance(item, dict):
            return f"* {where}: value must be an object"
        if where.startswith("BatchEmbedContentsRequest") and item.get("model") != f"models/{model}":
            return (f"* {where}.model: model in the request ({item.get('model')}) does not match the model in the "
                    f"URL (models/{model})")
        parts = (item.get("content") or {}).get("parts") if isinstance(item.get("content"), dict) else None
        if not parts or not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in parts):
            return f"* {where}.content: contents is not specified"
        task = item.get("taskType")
        if task is not None and task not in TASK_TYPES:
            return f"Invalid value at '{where}.task_type' ({task!r})"
        size = item.get("outputDimensionality")
        if size is not None and (type(size) is not int or size < 1):
            return f"* {where}.output_dimensionality: must be a positive integer"
        return None

    async def embed(self, request: Request, body: Any, model: str, method: str) -> Response:
        problem = self._key_problem(request)
        if problem is not None:
            return self._json(problem[1], problem[0])
        batch = method == "batchEmbedContents"
        if batch:
            items = body.get("requests") if isinstance(body, dict) else None
            if not isinstance(items, list) or not items:
                return self._json(google_error(400, "* BatchEmbedContentsRequest.requests: requests is not "
                                                    "specified"), 400)
            if len(items) > MAX_EMBED_REQUESTS:
                return self._json(google_error(400, f"* BatchEmbedContentsRequest.requests: at most "
                                                    f"{MAX_EMBED_REQUESTS} requests can be in one batch"), 400)
            wheres = [f"BatchEmbedContentsRequest.requests[{i}]" for i in range(len(items))]
        else:
            items, wheres = [body], ["EmbedContentRequest"]
        for item, where in zip(items, wheres, strict=True):
            message = self._embed_problem(model, item, where)
            if message is not None:
                return self._json(google_error(400, message), 400)
        reply = await self.answer()
        if reply.status >= 400:
            status, payload = self.error_body(reply)
            return self._json(payload, status, {k: v for k, v in reply.headers.items() if k.lower() != "retry-after"})
        vectors = []
        tokens = 0
        for item in items:
            text = "".join(part["text"] for part in item["content"]["parts"])
            tokens += max(1, len(text.split()))
            vectors.append({"values": fake_vector(text, item.get("outputDimensionality") or self.embedding_dimensions)})
        if not batch:
            return self._json({"embedding": vectors[0]})
        return self._json({"embeddings": vectors, "usageMetadata": {
            "promptTokenCount": tokens, "promptTokenDetails": [{"modality": "TEXT", "tokenCount": tokens}]}})

    # -- rendering ----------------------------------------------------------------------------------------------

    def signature(self) -> str:
        value = base64.b64encode(b"\x0a\x24" + secrets.token_bytes(64)).decode()
        self.issued_signatures.add(value)
        return value

    @staticmethod
    def grounding(reply: Reply) -> dict[str, Any] | None:
        """Google Search's ``groundingMetadata`` for an answer citing web pages (``None`` when it cites none)."""
        pages: dict[str, int] = {}
        chunks: list[dict[str, Any]] = []
        supports: list[dict[str, Any]] = []
        at = 0  # bytes of the answer's text so far
        for text, cited in reply.cited:
            size = len(text.encode())
            indices = []
            for citation in cited:
                url = citation.get("url")
                if not isinstance(url, str):
                    continue
                if url not in pages:
                    pages[url] = len(chunks)
                    chunks.append({"web": {"uri": url, "title": citation.get("title") or ""}})
                indices.append(pages[url])
            if indices:
                segment: dict[str, Any] = {"partIndex": 1 if reply.reasoning else 0, "startIndex": at,
                                           "endIndex": at + size, "text": text}
                supports.append({"segment": {k: v for k, v in segment.items() if v != 0},  # proto3 JSON
                                 "groundingChunkIndices": indices})
            at += size
        if not chunks:
            return None
        query = reply.text[:40].strip()
        entry = f'<style>.container {{ display: flex; }}</style><div class="container"><a>{query}</a></div>'
        return {"searchEntryPoint": {"renderedContent": entry}, "groundingChunks": chunks,
                "groundingSupports": supports, "webSearchQueries": [query]}

    def events(self, reply: Reply, model: str, response_id: str, *, searched: bool = False) -> Iterable[dict[str, Any]]:
        """The stream's events; a non-streaming answer is their merge."""
        thoughts = max(3, len(reply.reasoning or "") // 4) if reply.reasoning else 0
        pieces: list[dict[str, Any]] = []
        if reply.reasoning:
            pieces.append({"text": reply.reasoning, "thought": True})
        pieces.extend({"text": piece} for piece in reply.text_pieces())
        for n, call in enumerate(reply.tool_calls):
            part: dict[str, Any] = {"functionCall": {"name": call.name, "args": dict(call.arguments)}}
            if n == 0:
                part["thoughtSignature"] = self.signature()
            pieces.append(part)
        if not pieces:
            pieces.append({"text": ""})
        answer = sum(1 for p in pieces if not p.get("thought"))
        done = 0
        for i, part in enumerate(pieces):
            last = i == len(pieces) - 1
            done += 0 if part.get("thought") else 1
            usage: dict[str, Any] = {"promptTokenCount": reply.prompt_tokens}
            candidates_tokens = round(reply.completion_tokens * done / answer) if answer else 0
            if candidates_tokens:
                usage["candidatesTokenCount"] = candidates_tokens
            usage["totalTokenCount"] = reply.prompt_tokens + candidates_tokens + thoughts
            usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": reply.prompt_tokens}]
            if thoughts:
                usage["thoughtsTokenCount"] = thoughts
            candidate: dict[str, Any] = {"content": {"parts": [part], "role": "model"}}
            if last:
                candidate["finishReason"] = _FINISH.get(reply.finish, "STOP")
            candidate["index"] = 0
            if last and reply.tool_calls:
                candidate["finishMessage"] = "Model generated function call(s)."
            grounding = self.grounding(reply) if last and searched else None
            if grounding is not None:
                candidate["groundingMetadata"] = grounding
            yield {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model,
                   "responseId": response_id}

    @staticmethod
    def merge(events: list[dict[str, Any]]) -> dict[str, Any]:
        parts: list[dict[str, Any]] = []
        for event in events:
            for part in event["candidates"][0]["content"]["parts"]:
                if "text" in part and parts and "text" in parts[-1] and \
                        bool(part.get("thought")) == bool(parts[-1].get("thought")):
                    parts[-1] = {**parts[-1], "text": parts[-1]["text"] + part["text"]}
                else:
                    parts.append(part)
        last = events[-1]
        candidate = {**last["candidates"][0], "content": {"parts": parts, "role": "model"}}
        return {**last, "candidates": [candidate]}

    async def _sse(self, reply: Reply, events: list[dict[str, Any]]) -> AsyncIterator[bytes]:
        failure = reply.error_event or google_error(500, "An internal error has occurred. Please retry or report in "
                                                         "https://developers.generativeai.google/guide/troubleshooting")
        encoded = (f"data: {_dumps(event)}\r\n\r\n".encode() for event in events)
        async for event in self.faulty(reply, encoded, failure=lambda n: f"data: {_dumps(failure)}\r\n\r\n".encode(),
                                       garbage=b'data: {"candidates": [{"content": \r\n\r\n'):
            yield event

    async def _array(self, reply: Reply, events: list[dict[str, Any]]) -> AsyncIterator[bytes]:
        for n, event in enumerate(events):
            if reply.cut_after is not None and n >= reply.cut_after:
                raise ConnectionAbortedError("fake upstream cut the stream")
            yield (("[" if n == 0 else "\n,\r\n") + _dumps(event, indent=2)).encode()
        yield b"\n]"
