"""A fake Anthropic Messages API (``POST /v1/messages``) plus a fake Claude OAuth token endpoint
(``POST /v1/oauth/token``), rendering :class:`Reply` scripts exactly like the recorded streams in
``shared/fixtures/anthropic``: ``event:`` + ``data:`` lines, JSON padded with spaces before the closing brace,
a ``ping`` after the first block starts, ``input_json_delta`` starting with ``""``, thinking blocks ending with an
empty ``thinking_delta`` and a ``signature_delta``, cumulative usage in ``message_delta``, ``event: error``
mid-stream, error bodies ``{"type":"error","error":{"type","message"},"request_id"}`` with ``x-should-retry``.
A :meth:`Reply.cite` answer is text blocks with their ``citations`` (streamed: a cited block starts with
``"citations": []``, then a ``citations_delta`` per citation before its ``text_delta`` events); when it cites web
search results (``web_search_result_location``), a ``server_tool_use`` block (its query streamed as
``input_json_delta``) and a ``web_search_tool_result`` block listing the cited pages come first, as the web search
tool answers.

It checks what the real API checks and a translator can get wrong (``max_tokens`` present, roles only
user/assistant, temperature in [0, 1], tool ids, every ``tool_result`` answering a ``tool_use`` of the previous
turn, with thinking on a final assistant message calling tools the fake called after thinking starting with its
signed thinking blocks; thinking, effort and tool definitions as the model's generation takes them,
:meth:`FakeAnthropic.options_problem`) and answers 400 like Anthropic. ``require`` selects the auth it insists on:
``"api_key"`` (``x-api-key`` + ``anthropic-version``), ``"oauth"`` (Bearer of an issued token + the OAuth beta + the
Claude Code system block), or ``None`` (either form; an API key may also come as a Bearer token, as newer SDKs send
it).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, ClassVar

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from scillm_core.testing.fakes import FakeUpstream
from scillm_core.testing.replies import Reply

__all__ = ["CLAUDE_CODE_SYSTEM", "FakeAnthropic", "anthropic_stop_reason"]

CLAUDE_CODE_SYSTEM = "You are Claude Code, Anthropic's official CLI for Claude."
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}
_NATIVE_STOPS = frozenset({"end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal",
                           "model_context_window_exceeded"})
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                500: "api_error", 504: "timeout_error", 529: "overloaded_error"}
_TOOL_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_BLOCKS = frozenset({"text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking",
                     "search_result"})
#: the keys of a custom tool's definition (anything else: "Extra inputs are not permitted")
_TOOL_KEYS = frozenset({"type", "name", "description", "input_schema", "cache_control", "strict", "input_examples",
                        "defer_loading", "allowed_callers", "eager_input_streaming"})
#: the efforts, by the first generation that takes each: low to high from 4.5 (Opus 4.5's effort), max from 4.6,
#: xhigh from 4.7 (Opus 4.7)
_EFFORTS = {"low": (4, 5), "medium": (4, 5), "high": (4, 5), "max": (4, 6), "xhigh": (4, 7)}
# the generation in a model name, read here on its own (not with the code under test): claude-opus-4-6 is 4.6,
# claude-sonnet-4-20250514 4.0, claude-3-7-sonnet 3.7
_GENERATION = re.compile(r"claude-(?:[a-z]+-)?(\d{1,2})(?:-(\d{1,2}))?(?:-|$)")


def anthropic_stop_reason(finish: str) -> str:
    return finish if finish in _NATIVE_STOPS else _STOP.get(finish, "end_turn")


def _padded(payload: Any, pad: int) -> bytes:
    """JSON with a run of spaces before the final brace, as the real API pads events."""
    raw = orjson.dumps(payload)
    return raw[:-1] + b" " * pad + b"}" if pad else raw


class FakeAnthropic(FakeUpstream):
    """Anthropic at ``{url}`` (the SDK's base URL form: requests go to ``{url}/v1/messages``)."""

    require: ClassVar[str | None] = None
    api_key: str | None = None                     # when set, x-api-key must equal it
    wrong_shape_answer = b'{"id": "msg_01", "type": "message", "role": "assistant", "content": 5}'
    wrong_shape_event = b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "delta": 5}\n\n'
    strict_system: bool = True                     # OAuth mode: first system block must be Claude Code's

    def __init__(self) -> None:
        super().__init__()
        self.access_tokens: set[str] = set()       # Bearer tokens accepted (OAuth mode) once a login was issued
        self.known_tokens_only = False             # set by issue_login/refresh: unknown sk-ant-oat tokens get 401
        self.refresh_tokens: set[str] = set()      # refresh tokens not yet used (rotation)
        self.token_requests: list[Any] = []
        self.thought_calls: set[str] = set()       # ids of tool calls answered with a thinking block
        self.refresh_failure: Reply | None = None  # answer the token endpoint with this error
        self.token_delay_s = 0.0
        self.expires_in = 28800
        self._pad = itertools.cycle((13, 0, 9, 5, 15, 1, 11, 7, 3, 14))

    @property
    def base_url(self) -> str:
        return self.url

    def routes(self) -> list[Route]:
        return [Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/oauth/token", self.token, methods=["POST"])]

    # -- OAuth ----------------------------------------------------------------------------------------------------

    def issue_login(self, *, expired: bool = False, refresh: bool = True, valid_access: bool = True) -> dict[str, Any]:
        """A ``claudeAiOauth`` entry with tokens this fake knows (an expired one needs a refresh first)."""
        access = "sk-ant-oat01-" + secrets.token_urlsafe(60)
        refresh_token = "sk-ant-ort01-" + secrets.token_urlsafe(60)
        self.known_tokens_only = True
        if valid_access and not expired:
            self.access_tokens.add(access)
        entry: dict[str, Any] = {"accessToken": access,
                                 "expiresAt": int((time.time() + (-600 if expired else 8 * 3600)) * 1000),
                                 "scopes": ["user:inference", "user:profile", "user:sessions:claude_code"],
                                 "subscriptionType": "max", "rateLimitTier": "default_claude_max_20x"}
        if refresh:
            self.refresh_tokens.add(refresh_token)
            entry["refreshToken"] = refresh_token
        return entry

    async def token(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        self.token_requests.append(body)
        if self.token_delay_s:
            await asyncio.sleep(self.token_delay_s)
        if self.refresh_failure is not None:
            failure = self.refresh_failure
            payload = failure.error if isinstance(failure.error, dict) and "message" not in failure.error else {
                "error": "invalid_grant", "error_description": (failure.error or {}).get("message", "refused")
                if isinstance(failure.error, dict) else str(failure.error)}
            return self._json(payload, failure.status, failure.headers)
        if not isinstance(body, dict) or request.headers.get("content-type", "").split(";")[0] != "application/json":
            return self._json({"error": "invalid_request", "error_description": "expected a JSON body"}, 400)
        if body.get("grant_type") != "refresh_token" or not body.get("client_id") or "scope" in body:
            return self._json({"error": "invalid_request", "error_description": "bad refresh request"}, 400)
        old = body.get("refresh_token")
        if old not in self.refresh_tokens:
            return self._json({"error": "invalid_grant", "error_description": "Refresh token not found or invalid"},
                              400)
        self.refresh_tokens.discard(old)  # rotation: a refresh token works once
        access = "sk-ant-oat01-" + secrets.token_urlsafe(60)
        new_refresh = "sk-ant-ort01-" + secrets.token_urlsafe(60)
        self.access_tokens.add(access)
        self.refresh_tokens.add(new_refresh)
        self.known_tokens_only = True
        return self._json({"access_token": access, "refresh_token": new_refresh, "expires_in": self.expires_in,
                           "token_type": "Bearer", "scope": "user:inference user:profile"})

    # -- Messages -------------------------------------------------------------------------------------------------

    @staticmethod
    def _json(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
        return Response(orjson.dumps(payload), status_code=status, headers=dict(headers or {}),
                        media_type="application/json")

    def _error(self, status: int, kind: str, message: str, headers: Mapping[str, str] | None = None) -> Response:
        retry = "true" if status in (408, 409, 429) or status >= 500 else "false"
        return self._json({"type": "error", "error": {"type": kind, "message": message},
                           "request_id": f"req_fake{self.next_id():020d}"}, status,
                          {"request-id": f"req_fake{self.next_id()}", "x-should-retry": retry, **(headers or {})})

    async def models(self, request: Request) -> Response:
        return self._json({"data": [{"type": "model", "id": "claude-haiku-4-5-20251001",
                                     "display_name": "Claude Haiku 4.5", "created_at": "2025-10-15T00:00:00Z"}],
                           "has_more": False, "first_id": "claude-haiku-4-5-20251001",
                           "last_id": "claude-haiku-4-5-20251001"})

    def check_auth(self, request: Request, body: Any) -> Response | None:
        headers = request.headers
        if not headers.get("anthropic-version"):
            return self._error(400, "invalid_request_error", "anthropic-version: header is required")
        bearer = headers.get("authorization", "")
        key = headers.get("x-api-key")
        oauth = bearer.startswith("Bearer sk-ant-oat")
        mode = self.require or ("oauth" if oauth and not key else "api_key")
        if mode == "api_key":
            if self.require is None and not key and bearer.startswith("Bearer ") and not oauth:
                key = bearer.removeprefix("Bearer ")  # newer SDKs send API keys as Bearer tokens
            if not key or (self.api_key is not None and key != self.api_key):
                return self._error(401, "authentication_error", "invalid x-api-key")
            return None
        if key:
            return self._error(401, "authentication_error", "x-api-key must not be sent with an OAuth token")
        if "oauth-2025-04-20" not in headers.get("anthropic-beta", ""):
            return self._error(401, "authentication_error", "OAuth authentication is currently not supported.")
        token = bearer.removeprefix("Bearer ")
        if not token.startswith("sk-ant-oat") or (self.known_tokens_only and token not in self.access_tokens):
            return self._error(401, "authentication_error", "OAuth token has expired. Please obtain a new token or "
                                                            "refresh your existing token.")
        system = body.get("system") if isinstance(body, dict) else None
        first = system[0] if isinstance(system, list) and system else None
        if self.strict_system and not (isinstance(first, dict) and first.get("text") == CLAUDE_CODE_SYSTEM):
            return self._error(400, "invalid_request_error", "This credential is only authorized for use with "
                                                             "Claude Code and cannot be used for other API requests.")
        return None

    @staticmethod
    def validate(body: Any) -> str | None:
        """What the real API would reject with 400, as its message; ``None`` when the body is acceptable."""
        if not isinstance(body, dict):
            return "request body must be a JSON object"
        if not isinstance(body.get("model"), str):
            return "model: Field required"
        if isinstance(body.get("max_tokens"), bool) or not isinstance(body.get("max_tokens"), int):
            return "max_tokens: Field required"
        temperature = body.get("temperature")
        if temperature is not None and not 0 <= temperature <= 1:
            return "temperature: Input should be less than or equal to 1"
        if body.get("service_tier") not in (None, "auto", "standard_only"):
            return "service_tier: Input should be 'auto' or 'standard_only'"
        metadata = body.get("metadata")
        if metadata is not None:
            if not isinstance(metadata, dict):
                return "metadata: Input should be a valid dictionary"
            extra = next((key for key in metadata if key != "user_id"), None)
            if extra is not None:  # user_id is Anthropic's only metadata field
                return f"metadata.{extra}: Extra inputs are not permitted"
        problem = FakeAnthropic.options_problem(body)
        if problem:
            return problem
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages: Field required"
        previous_tool_ids: set[str] = set()
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ("user", "assistant"):
                return f"messages.{i}.role: Input should be 'user' or 'assistant'"
            content = message.get("content")
            blocks = content if isinstance(content, list) else []
            if not isinstance(content, list | str):
                return f"messages.{i}.content: Input should be a valid list"
            tool_ids: set[str] = set()
            for j, block in enumerate(blocks):
                kind = block.get("type") if isinstance(block, dict) else None
                if kind not in _BLOCKS:
                    return f"messages.{i}.content.{j}.type: Input tag {kind!r} is not a valid block type"
                if kind == "text" and not block.get("text"):
                    return f"messages.{i}.content.{j}: text content blocks must be non-empty"
                if kind == "tool_use":
                    if role != "assistant" or not _TOOL_ID.match(str(block.get("id"))) \
                            or not isinstance(block.get("input"), dict):
                        return f"messages.{i}.content.{j}: invalid tool_use block"
                    tool_ids.add(block["id"])
                if kind == "tool_result":
                    if role != "user" or block.get("tool_use_id") not in previous_tool_ids:
                        return (f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: "
                                f"{block.get('tool_use_id')}. Each `tool_result` block must have a corresponding "
                                "`tool_use` block in the previous message.")
                if kind in ("image", "document"):
                    source = block.get("source")
                    if not isinstance(source, dict) or source.get("type") not in ("base64", "url", "text"):
                        return f"messages.{i}.content.{j}.source: invalid source"
            previous_tool_ids = tool_ids
        return None

    @staticmethod
    def generation(model: str) -> tuple[int, int]:
        """The model's generation ((0, 0) for a name without one: this fake's own names take what every Claude
        takes)."""
        match = _GENERATION.search(model)
        return (int(match.group(1)), int(match.group(2) or 0)) if match else (0, 0)

    @staticmethod
    def options_problem(body: dict[str, Any]) -> str | None:
        """What the real API refuses in ``thinking``, ``output_config.effort`` and tool definitions: a budget under
        1024 or not under ``max_tokens``, adaptive thinking before the 4.6 generation, a temperature other than 1
        with thinking on, an effort it does not know (or before the generation that has it: 4.5, max 4.6, xhigh
        4.7), ``output_config.format`` or a tool's ``strict`` before 4.5 (structured outputs), a forced tool
        choice with thinking on, a key a custom tool does not have."""
        generation = FakeAnthropic.generation(body["model"])
        thinking = body.get("thinking")
        kind = thinking.get("type") if isinstance(thinking, dict) else None
        if thinking is not None:
            if kind == "enabled":
                budget = thinking.get("budget_tokens")
                if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1024:
                    return "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
                if budget >= body["max_tokens"]:
                    return ("`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our "
                            "documentation at https://docs.claude.com/en/docs/build-with-claude/extended-thinking")
            elif kind == "adaptive":
                if generation < (4, 6):
                    return f"thinking.type: adaptive thinking is not supported on {body['model']}"
            elif kind != "disabled":
                return (f"thinking: Input tag {kind!r} found using 'type' does not match any of the expected tags: "
                        "'adaptive', 'disabled', 'enabled'")
        if kind in ("enabled", "adaptive") and body.get("temperature") not in (None, 1):
            return ("`temperature` may only be set to 1 when thinking is enabled or in adaptive mode. Please consult "
                    "our documentation at https://docs.claude.com/en/docs/build-with-claude/extended-thinking")
        output_config = body.get("output_config")
        effort = output_config.get("effort") if isinstance(output_config, dict) else None
        if effort is not None and (effort not in _EFFORTS or generation < _EFFORTS[effort]):
            if effort not in _EFFORTS:
                return "output_config.effort: Input should be 'low', 'medium', 'high', 'xhigh' or 'max'"
            if generation < (4, 5):
                return f"output_config.effort: effort is not supported on {body['model']}"
            return f"output_config.effort: {effort!r} is not supported on {body['model']}"
        # JSON outputs (structured outputs) are GA from the 4.5 generation on (Opus 4.1 had them only in the beta,
        # with its header and the older output_format field); an earlier model answers 400 invalid_request_error.
        # This models that documented availability (provider-protocols.md §3.2, §9.5; Anthropic's structured
        # outputs page lists the 4.5 and later models); the API's wording for it is not recorded, so this message
        # only names what is refused.
        if isinstance(output_config, dict) and output_config.get("format") is not None and generation < (4, 5):
            return f"output_config.format: structured outputs are not supported on {body['model']}"
        choice = body.get("tool_choice")
        if kind in ("enabled", "adaptive") and isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
            return "Thinking may not be enabled when tool_choice forces tool use."
        for j, tool in enumerate(body.get("tools") or ()):
            if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
                continue  # a server tool: its own keys
            extra = next((key for key in tool if key not in _TOOL_KEYS), None)
            if extra is not None:
                return f"tools.{j}.custom.{extra}: Extra inputs are not permitted"
            if "strict" in tool and (not isinstance(tool["strict"], bool) or generation < (4, 5)):
                return (f"tools.{j}.custom.strict: Input should be a valid boolean" if not isinstance(
                    tool["strict"], bool) else f"tools.{j}.custom.strict: strict tool use is not supported on "
                    f"{body['model']}")
        return None

    def thinking_problem(self, body: Any) -> str | None:
        """With thinking on, the final assistant message, when it calls tools this fake called after thinking,
        must start with the thinking blocks they came with, each with its signature (the real API's 400 for a tool
        loop that dropped them; the real API always thinks first with thinking on, this fake only when scripted to,
        so tool calls it made without thinking are not held to it)."""
        messages = body["messages"]
        for i, message in enumerate(messages):
            for j, block in enumerate(message.get("content") if isinstance(message.get("content"), list) else ()):
                if isinstance(block, dict) and block.get("type") == "thinking" and not block.get("signature"):
                    return f"messages.{i}.content.{j}.signature: Field required"
        thinking = body.get("thinking")
        if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "adaptive"):
            return None
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        blocks = messages[last].get("content") if last is not None else None
        if not isinstance(blocks, list) or not any(isinstance(b, dict) and b.get("type") == "tool_use"
                                                   and b.get("id") in self.thought_calls for b in blocks):
            return None
        first = blocks[0].get("type") if isinstance(blocks[0], dict) else None
        if first in ("thinking", "redacted_thinking"):
            return None
        return (f"messages.{last}.content.0.type: Expected `thinking` or `redacted_thinking`, but found `{first}`. "
                "When `thinking` is enabled, a final `assistant` message must start with a thinking block (preceeding "
                "the lastmost set of `tool_use` and `tool_result` blocks). We recommend you include thinking blocks "
                "from previous turns. To avoid this requirement, disable `thinking`.")

    async def messages(self, request: Request) -> Response:
        recorded = await self.record(request)
        body = recorded.body
        denied = self.check_auth(request, body)
        if denied is not None:
            return denied
        problem = self.validate(body) or self.thinking_problem(body)
        if problem:
            return self._error(400, "invalid_request_error", problem)
        reply = self.next_reply(recorded)
        if reply.reasoning:  # tool calls made after thinking: a tool loop must send the thinking back with them
            self.thought_calls.update(self.tool_id(i, reply) for i in range(len(reply.tool_calls)))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.pause(reply)
        finally:
            self.in_flight -= 1
        headers = {"request-id": f"req_fake{self.next_id():020d}", "anthropic-organization-id": "fake-org",
                   "anthropic-ratelimit-requests-limit": "4000", "anthropic-ratelimit-requests-remaining": "3999",
                   "anthropic-ratelimit-requests-reset": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   **reply.headers}
        if reply.raw is not None and not body.get("stream"):
            return Response(reply.raw, status_code=reply.status, headers=headers, media_type="application/json")
        if reply.status >= 400:
            error = reply.error
            if isinstance(error, dict) and "message" in error and "error" not in error:
                kind = error.get("type") if error.get("type") in _ERROR_TYPES.values() else None
                return self._error(reply.status, kind or _ERROR_TYPES.get(reply.status, "api_error"),
                                   str(error["message"]), headers)
            return Response(error if isinstance(error, bytes | str) else orjson.dumps(error), status_code=reply.status,
                            headers=headers, media_type="application/json")
        model = reply.model or body.get("model") or "claude-fake"
        message_id = "msg_01" + hashlib.sha256(str(self.next_id()).encode()).hexdigest()[:22]
        if body.get("stream"):
            return StreamingResponse(self._events(reply, message_id, model),
                                     media_type="text/event-stream; charset=utf-8",
                                     headers={**headers, "cache-control": "no-cache"})
        return self._json(self.message(reply, message_id, model), headers=headers)

    # -- rendering ------------------------------------------------------------------------------------------------

    @staticmethod
    def signature(reply: Reply) -> str:
        return "Eq" + hashlib.sha256((reply.reasoning or "").encode()).hexdigest() + "AB=="

    @staticmethod
    def tool_id(index: int, reply: Reply) -> str:
        call = reply.tool_calls[index]
        return call.id or "toolu_01" + hashlib.sha256(f"{call.name}{index}".encode()).hexdigest()[:22]

    @staticmethod
    def usage(reply: Reply, *, output: int | None = None) -> dict[str, Any]:
        return {"input_tokens": reply.prompt_tokens, "cache_creation_input_tokens": reply.cache_write_tokens,
                "cache_read_input_tokens": reply.cached_tokens,
                "cache_creation": {"ephemeral_5m_input_tokens": reply.cache_write_tokens,
                                   "ephemeral_1h_input_tokens": 0},
                "output_tokens": reply.completion_tokens if output is None else output, "service_tier": "standard",
                "inference_geo": "not_available"}

    @staticmethod
    def searched(reply: Reply) -> list[dict[str, Any]]:
        """The server tool's two blocks before an answer citing web search results (none when it cites none)."""
        pages = {c["url"]: c for _, cited in reply.cited for c in cited
                 if c.get("type") == "web_search_result_location"}
        if not pages:
            return []
        tool_id = "srvtoolu_01" + hashlib.sha256(reply.text.encode()).hexdigest()[:22]
        return [{"type": "server_tool_use", "id": tool_id, "name": "web_search", "input": {"query": reply.text[:40]}},
                {"type": "web_search_tool_result", "tool_use_id": tool_id, "content": [
                    {"type": "web_search_result", "title": page.get("title"), "url": url,
                     "encrypted_content": "EqgfCioIARgBIiQ3" + hashlib.sha256(url.encode()).hexdigest()[:16],
                     "page_age": "April 30, 2025"} for url, page in pages.items()]}]

    def content(self, reply: Reply) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = []
        if reply.reasoning:
            blocks.append({"type": "thinking", "thinking": reply.reasoning, "signature": self.signature(reply)})
        blocks.extend(self.searched(reply))
        if reply.cited:
            blocks.extend({"type": "text", "text": text, **({"citations": list(cited)} if cited else {})}
                          for text, cited in reply.cited)
        elif reply.text or not reply.tool_calls:
            blocks.append({"type": "text", "text": reply.text})
        for i, call in enumerate(reply.tool_calls):
            blocks.append({"type": "tool_use", "id": self.tool_id(i, reply), "name": call.name,
                           "input": dict(call.arguments), "caller": {"type": "direct"}})
        return blocks

    def message(self, reply: Reply, message_id: str, model: str) -> dict[str, Any]:
        stop = anthropic_stop_reason(reply.finish)
        return {"model": model, "id": message_id, "type": "message", "role": "assistant",
                "content": self.content(reply), "stop_reason": stop, "stop_sequence": None,
                "usage": self.usage(reply)}

    def events(self, reply: Reply, message_id: str, model: str) -> Iterable[tuple[str, dict[str, Any]]]:
        """(event name, payload) pairs of the stream for ``reply``."""
        yield "message_start", {"type": "message_start", "message": {
            "model": model, "id": message_id, "type": "message", "role": "assistant", "content": [],
            "stop_reason": None, "stop_sequence": None, "stop_details": None, "usage": self.usage(reply, output=1)}}
        index = 0
        pinged = False

        def ping() -> Iterable[tuple[str, dict[str, Any]]]:
            nonlocal pinged
            if not pinged:
                pinged = True
                yield "ping", {"type": "ping"}

        size = max(1, reply.chunk_size)
        if reply.reasoning:
            yield "content_block_start", {"type": "content_block_start", "index": index,
                                          "content_block": {"type": "thinking", "thinking": "", "signature": ""}}
            yield from ping()
            for i in range(0, len(reply.reasoning), size):
                yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": {
                    "type": "thinking_delta", "thinking": reply.reasoning[i:i + size]}}
            yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                          "delta": {"type": "thinking_delta", "thinking": ""}}
            yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                          "delta": {"type": "signature_delta", "signature": self.signature(reply)}}
            yield "content_block_stop", {"type": "content_block_stop", "index": index}
            index += 1
        for block in self.searched(reply):
            if block["type"] == "server_tool_use":
                yield "content_block_start", {"type": "content_block_start", "index": index,
                                              "content_block": {**block, "input": {}}}
                yield from ping()
                query = orjson.dumps(block["input"]).decode()
                for i in range(0, len(query), 6):
                    yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                                  "delta": {"type": "input_json_delta", "partial_json": query[i:i + 6]}}
            else:
                yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}
            yield "content_block_stop", {"type": "content_block_stop", "index": index}
            index += 1
        texts = reply.cited or (((reply.text, ()),) if reply.text or not reply.tool_calls else ())
        for text, cited in texts:
            start: dict[str, Any] = {"type": "text", "text": ""}
            if cited:  # a cited block: its citations first, then its text
                start["citations"] = []
            yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": start}
            yield from ping()
            for citation in cited:
                yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                              "delta": {"type": "citations_delta", "citation": dict(citation)}}
            for i in range(0, len(text), size):
                yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                              "delta": {"type": "text_delta", "text": text[i:i + size]}}
            yield "content_block_stop", {"type": "content_block_stop", "index": index}
            index += 1
        for n, call in enumerate(reply.tool_calls):
            yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": {
                "type": "tool_use", "id": self.tool_id(n, reply), "name": call.name, "input": {},
                "caller": {"type": "direct"}}}
            yield from ping()
            arguments = orjson.dumps(dict(call.arguments)).decode()
            pieces = [""] + ([arguments] if reply.whole_tool_call else
                             [arguments[i:i + 6] for i in range(0, len(arguments), 6)])
            for piece in pieces:
                yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                              "delta": {"type": "input_json_delta", "partial_json": piece}}
            yield "content_block_stop", {"type": "content_block_stop", "index": index}
            index += 1
        usage = {"input_tokens": reply.prompt_tokens, "cache_creation_input_tokens": reply.cache_write_tokens,
                 "cache_read_input_tokens": reply.cached_tokens, "output_tokens": reply.completion_tokens}
        yield "message_delta", {"type": "message_delta", "delta": {
            "stop_reason": anthropic_stop_reason(reply.finish), "stop_sequence": None, "stop_details": None},
            "usage": usage}
        yield "message_stop", {"type": "message_stop"}

    def encode(self, name: str, payload: Mapping[str, Any]) -> bytes:
        if name == "ping":
            data = b'{"type": "ping"}'
        elif name == "error":
            data = orjson.dumps(payload).replace(b'":', b'": ').replace(b',"', b', "')
        else:
            data = _padded(payload, next(self._pad))
        return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"

    async def _events(self, reply: Reply, message_id: str, model: str) -> AsyncIterator[bytes]:
        events = (self.encode(name, payload) for name, payload in self.events(reply, message_id, model)
                  if name != "message_stop")
        failure = self.encode("error", reply.error_event or {
            "type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        garbage = b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "delta": {\n\n'
        async for event in self.faulty(reply, events, failure=lambda n: failure, garbage=garbage,
                                       terminal=self.encode("message_stop", {"type": "message_stop"})):
            yield event
