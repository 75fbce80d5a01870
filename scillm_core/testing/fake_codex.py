"""A fake of the ChatGPT/Codex backend (``chatgpt.com/backend-api/codex``) and its OAuth token endpoint.

It speaks the OpenAI Responses streaming dialect exactly as recorded in ``shared/fixtures/responses_codex``
(``event:`` + ``data:`` lines, ``sequence_number`` on every event, full item lifecycle, reasoning summary events,
function-call argument deltas, terminal ``response.completed`` with no ``[DONE]``) and enforces what the real
backend enforces: ``store: false``, ``stream: true``, non-empty ``instructions`` or a developer message in ``input``
(else a ``{"detail": ...}`` 400),
a Bearer access token it issued and that has not expired (else 401), and the ``chatgpt-account-id`` header that
matches the token's claim; both it and :class:`FakeOpenAIResponses` refuse a reasoning item whose
``encrypted_content`` they did not issue (400 ``invalid_encrypted_content``).

The token endpoint (``token_url``) implements refresh with rotation: each refresh token works once; a second use
answers 401 ``refresh_token_reused`` like auth.openai.com. :meth:`FakeCodex.login` mints a login (JWT access token
with the ``https://api.openai.com/auth`` claim) and :meth:`FakeCodex.auth_json` renders it as ``~/.codex/auth.json``.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from scillm_core.testing.fakes import FakeUpstream
from scillm_core.testing.replies import Reply

__all__ = ["CODEX_CLIENT_ID", "FakeCodex", "FakeOpenAIResponses", "has_instructions", "jwt_claims", "mint_jwt"]

CODEX_CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"
AUTH_CLAIM = "https://api.openai.com/auth"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint_jwt(claims: dict[str, Any]) -> str:
    """An unsigned-but-JWT-shaped token (header.payload.signature), as the ChatGPT login issues."""
    header = _b64(orjson.dumps({"alg": "RS256", "typ": "JWT", "kid": "fake"}))
    return f"{header}.{_b64(orjson.dumps(claims))}.{_b64(secrets.token_bytes(24))}"


def jwt_claims(token: str) -> dict[str, Any]:
    try:
        payload = token.split(".")[1]
        return orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))  # type: ignore[no-any-return]
    except (IndexError, ValueError, orjson.JSONDecodeError):
        return {}


def has_instructions(body: dict[str, Any]) -> bool:
    """Non-empty ``instructions``, or a developer/system message in ``input`` (Codex 0.169 sends its prompt so,
    with no ``instructions`` field, to this backend too)."""
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions.strip():
        return True
    items = body.get("input")
    return isinstance(items, list) and any(isinstance(item, dict) and item.get("role") in ("developer", "system")
                                           for item in items)


def _event(payload: dict[str, Any]) -> bytes:
    kind: str = payload["type"]
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class FakeCodex(FakeUpstream):
    """The Codex backend at ``base_url`` (``{url}/backend-api/codex``) and OAuth at ``token_url``."""

    base_path = "/backend-api/codex"
    wrong_shape_answer = None  # Codex always streams: a whole answer is its stream's
    wrong_shape_event = (b'event: response.output_item.done\ndata: {"type": "response.output_item.done", '
                         b'"output_index": 7, "item": {"type": "message", "id": "msg_other", "content": 5}}\n\n')

    def __init__(self, *, refresh_delay_s: float = 0.0) -> None:
        super().__init__()
        self.refresh_delay_s = refresh_delay_s
        self.access_tokens: dict[str, str] = {}       # access token -> account id
        self.refresh_tokens: dict[str, str] = {}      # live refresh token -> account id
        self.used_refresh_tokens: set[str] = set()
        self.refresh_requests: list[dict[str, Any]] = []
        self.refresh_failures: list[tuple[int, Any]] = []  # scripted token-endpoint failures, used first
        self._seq = itertools.count(1)

    # -- URLs -----------------------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self.url + self.base_path

    @property
    def token_url(self) -> str:
        return self.url + "/oauth/token"

    def routes(self) -> list[Route]:
        return [Route(f"{self.base_path}/responses", self.responses, methods=["POST"]),
                Route("/oauth/token", self.token, methods=["POST"])]

    # -- logins ---------------------------------------------------------------------------------------------------

    def login(self, *, account_id: str = "acct-4f1d2c3b-1111-2222-3333-444455556666",
              expires_in: float = 3600.0) -> dict[str, str]:
        """Mint a login the fake accepts: ``{access_token, refresh_token, id_token, account_id}``."""
        n = next(self._seq)
        now = int(time.time())
        auth = {"chatgpt_account_id": account_id, "chatgpt_plan_type": "plus"}
        access = mint_jwt({"exp": int(now + expires_in), "iat": now, "sub": f"user-{n}", AUTH_CLAIM: auth,
                           "client_id": CODEX_CLIENT_ID})
        id_token = mint_jwt({"exp": now + 3600, "iat": now, "email": "dev@example.com", AUTH_CLAIM: auth})
        refresh = f"rt_fake{n}_{secrets.token_hex(16)}"
        self.access_tokens[access] = account_id
        self.refresh_tokens[refresh] = account_id
        return {"access_token": access, "refresh_token": refresh, "id_token": id_token, "account_id": account_id}

    @staticmethod
    def auth_json(login: dict[str, str], *, last_refresh: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
        """``~/.codex/auth.json`` as ``codex login`` writes it."""
        return {"auth_mode": "chatgpt", "OPENAI_API_KEY": None,
                "tokens": {"id_token": login["id_token"], "access_token": login["access_token"],
                           "refresh_token": login["refresh_token"], "account_id": login["account_id"]},
                "last_refresh": last_refresh}

    @staticmethod
    def usage_limit(*, resets_in_s: int = 3600, plan_type: str = "plus", status: int = 429) -> Reply:
        """The backend's answer when the ChatGPT plan's Codex usage is used up."""
        return Reply.fail(status, body={"error": {"type": "usage_limit_reached",
                                                  "message": "The usage limit has been reached",
                                                  "plan_type": plan_type, "resets_at": int(time.time()) + resets_in_s,
                                                  "resets_in_seconds": resets_in_s}})

    @staticmethod
    def detail(status: int, message: str) -> Reply:
        return Reply.fail(status, body={"detail": message})

    # -- OAuth ----------------------------------------------------------------------------------------------------

    async def token(self, request: Request) -> Response:
        raw = await request.body()
        if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            body: dict[str, Any] = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
        else:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return self._json({"error": {"code": "invalid_request", "message": "body is not JSON"}}, 400)
        self.refresh_requests.append(body)
        if self.refresh_delay_s:
            await asyncio.sleep(self.refresh_delay_s)
        if self.refresh_failures:
            status, payload = self.refresh_failures.pop(0)
            return self._json(payload, status)
        if body.get("grant_type") != "refresh_token" or body.get("client_id") != CODEX_CLIENT_ID:
            return self._json({"error": {"code": "invalid_request",
                                         "message": "grant_type refresh_token and the Codex client_id required"}}, 400)
        old = body.get("refresh_token")
        if old in self.used_refresh_tokens:
            return self._json({"error": {"code": "refresh_token_reused", "message": "Your refresh token has "
                                         "already been used to generate a new access token. Please try "
                                         "signing in again."}}, 401)
        account = self.refresh_tokens.pop(old, None) if isinstance(old, str) else None
        if account is None or not isinstance(old, str):
            return self._json({"error": {"code": "refresh_token_invalidated",
                                         "message": "Your refresh token has been invalidated."}}, 401)
        self.used_refresh_tokens.add(old)
        fresh = self.login(account_id=account)
        return self._json({"id_token": fresh["id_token"], "access_token": fresh["access_token"],
                           "refresh_token": fresh["refresh_token"]})

    @property
    def refresh_count(self) -> int:
        return len(self.refresh_requests)

    # -- the Responses endpoint -------------------------------------------------------------------------------------

    @staticmethod
    def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return Response(orjson.dumps(payload), status_code=status, headers=headers, media_type="application/json")

    def _check_auth(self, recorded: Any) -> Response | None:
        authorization = recorded.headers.get("authorization", "")
        token = authorization[7:] if authorization.lower().startswith("bearer ") else ""
        account = self.access_tokens.get(token)
        if account is None or jwt_claims(token).get("exp", 0) <= time.time():
            return self._json({"error": {"message": "Provided authentication token is expired or invalid. "
                                                    "Please try signing in again.",
                                         "type": "invalid_request_error", "code": "token_expired"}}, 401)
        if recorded.headers.get("chatgpt-account-id") != account:
            return self._json({"detail": "chatgpt-account-id header missing or not matching the token"}, 403)
        return None

    def _check_body(self, body: dict[str, Any]) -> Response | None:
        """What the backend refuses that the public Responses API takes."""
        if body.get("store") is not False:
            return self._json({"detail": "Store must be set to false"}, 400)
        if body.get("stream") is not True:
            return self._json({"detail": "Stream must be set to true"}, 400)
        if not has_instructions(body):
            return self._json({"detail": "Instructions are required"}, 400)
        for key in ("max_output_tokens", "max_completion_tokens", "temperature", "top_p"):
            if key in body:
                return self._json({"detail": f"Unsupported parameter: {key}"}, 400)
        return None

    def _check_reasoning(self, body: dict[str, Any]) -> Response | None:
        """A reasoning item sent back must carry reasoning this service encrypted (its ``encrypted_content`` is
        opaque: anything it did not issue fails to decrypt, as the real API answers)."""
        items = body.get("input")
        for i, item in enumerate(items if isinstance(items, list) else ()):
            content = item.get("encrypted_content") if isinstance(item, dict) and item.get("type") == "reasoning" \
                else None
            if content is not None and not (isinstance(content, str) and content.startswith("gAAAA")):
                return self._json({"error": {"message": f"The encrypted content for item {item.get('id')} could not "
                                                        "be verified.", "type": "invalid_request_error",
                                             "param": f"input[{i}].encrypted_content",
                                             "code": "invalid_encrypted_content"}}, 400)
        return None

    async def responses(self, request: Request) -> Response:
        recorded = await self.record(request)
        body = recorded.body if isinstance(recorded.body, dict) else None
        if body is None:
            return self._json({"detail": "Invalid JSON body"}, 400)
        denied = self._check_auth(recorded) or self._check_body(body) or self._check_reasoning(body)
        if denied is not None:
            return denied
        reply = self.next_reply(recorded)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.pause(reply)
        finally:
            self.in_flight -= 1
        headers = {"x-request-id": f"req_fake{self.next_id()}", "x-codex-primary-used-percent": "12.0",
                   "x-codex-primary-window-minutes": "300", "x-codex-primary-reset-at": str(int(time.time()) + 3600),
                   **reply.headers}
        if reply.status >= 400:
            error = reply.error
            payload = error if not isinstance(error, dict) or "message" not in error else {
                "error": {"message": error["message"], "type": error.get("type"), "param": None,
                          "code": error.get("code")}}
            return self._json(payload, reply.status, headers)
        model = reply.model or body.get("model") or "gpt-5-codex"
        if body.get("stream") is not True:  # the public API's non-streaming answer: the final Response object
            final = list(self.events(reply, body, model))[-1]["response"]
            return self._json(final, headers=headers)
        return StreamingResponse(self._stream(reply, body, model), headers=headers,
                                 media_type="text/event-stream; charset=utf-8")

    async def _stream(self, reply: Reply, body: dict[str, Any], model: str) -> AsyncIterator[bytes]:
        events = (_event(payload) for payload in self.events(reply, body, model))
        async for event in self.faulty(reply, events,
                                       failure=lambda n: _event(self.failure_event(reply, body, model, n)),
                                       garbage=b'event: response.output_text.delta\ndata: {"type": "resp\n\n'):
            yield event

    @staticmethod
    def failure_event(reply: Reply, body: dict[str, Any], model: str, seq: int) -> dict[str, Any]:
        """``reply.error_event``: a whole event (with ``type``) sent as is, or ``{code, message}`` for
        ``response.failed``."""
        error = reply.error_event or {"code": "server_error", "message": "The model failed to generate a response."}
        if "type" in error:
            return {**error, "sequence_number": seq}
        return {"type": "response.failed", "sequence_number": seq,
                "response": {"id": "resp_fakefailed", "object": "response", "created_at": int(time.time()),
                             "status": "failed", "error": error, "incomplete_details": None, "model": model,
                             "output": [], "usage": None}}

    def events(self, reply: Reply, body: dict[str, Any], model: str) -> Iterator[dict[str, Any]]:
        seq = itertools.count()
        n = self.next_id()
        response_id = f"resp_fake{n:04d}"
        created = int(time.time())
        base = {"id": response_id, "object": "response", "created_at": created, "status": "in_progress",
                "background": False, "completed_at": None, "error": None, "incomplete_details": None,
                "instructions": body.get("instructions"), "max_output_tokens": None, "model": model, "output": [],
                "parallel_tool_calls": body.get("parallel_tool_calls", True), "previous_response_id": None,
                "prompt_cache_key": body.get("prompt_cache_key"), "reasoning": body.get("reasoning"),
                "store": False, "temperature": 1.0, "text": {"format": {"type": "text"}, "verbosity": "medium"},
                "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools", []), "top_p": 1.0,
                "truncation": "disabled", "usage": None, "user": None, "metadata": {}}

        def ev(kind: str, **fields: Any) -> dict[str, Any]:
            return {"type": kind, **fields, "sequence_number": next(seq)}

        yield ev("response.created", response=dict(base))
        yield ev("response.in_progress", response=dict(base))
        output: list[dict[str, Any]] = []
        size = max(1, reply.chunk_size)
        if reply.reasoning:
            item_id = f"rs_fake{n:04d}"
            index = len(output)
            item: dict[str, Any] = {"id": item_id, "type": "reasoning", "summary": [],
                                    "encrypted_content": "gAAAAfake"}
            yield ev("response.output_item.added", item=item, output_index=index)
            yield ev("response.reasoning_summary_part.added", item_id=item_id, output_index=index, summary_index=0,
                     part={"type": "summary_text", "text": ""})
            for i in range(0, len(reply.reasoning), size):
                yield ev("response.reasoning_summary_text.delta", item_id=item_id, output_index=index,
                         summary_index=0, delta=reply.reasoning[i:i + size], obfuscation="xx")
            yield ev("response.reasoning_summary_text.done", item_id=item_id, output_index=index, summary_index=0,
                     text=reply.reasoning)
            part = {"type": "summary_text", "text": reply.reasoning}
            yield ev("response.reasoning_summary_part.done", item_id=item_id, output_index=index, summary_index=0,
                     part=part)
            item = {**item, "summary": [part]}
            yield ev("response.output_item.done", item=item, output_index=index)
            output.append(item)
        if reply.text or not reply.tool_calls:
            item_id = f"msg_fake{n:04d}"
            index = len(output)
            yield ev("response.output_item.added", output_index=index, item={
                "id": item_id, "type": "message", "status": "in_progress", "content": [], "role": "assistant"})
            empty: dict[str, Any] = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
            yield ev("response.content_part.added", item_id=item_id, output_index=index, content_index=0, part=empty)
            for piece in reply.text_pieces():
                yield ev("response.output_text.delta", item_id=item_id, output_index=index, content_index=0,
                         delta=piece, logprobs=[], obfuscation="xx")
            yield ev("response.output_text.done", item_id=item_id, output_index=index, content_index=0,
                     text=reply.text, logprobs=[])
            part = {**empty, "text": reply.text}
            yield ev("response.content_part.done", item_id=item_id, output_index=index, content_index=0, part=part)
            item = {"id": item_id, "type": "message", "status": "completed", "content": [part], "role": "assistant"}
            yield ev("response.output_item.done", item=item, output_index=index)
            output.append(item)
        for k, call in enumerate(reply.tool_calls):
            item_id = f"fc_fake{n:04d}_{k}"
            index = len(output)
            call_id = call.id or f"call_fake{k}"
            arguments = orjson.dumps(call.arguments).decode()
            item = {"id": item_id, "type": "function_call", "status": "in_progress", "arguments": "",
                    "call_id": call_id, "name": call.name}
            if not reply.whole_tool_call:  # whole_tool_call: only output_item.done, as Codex's own mock server
                yield ev("response.output_item.added", item=item, output_index=index)
                for i in range(0, len(arguments), 6):
                    yield ev("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                             delta=arguments[i:i + 6], obfuscation="xx")
                yield ev("response.function_call_arguments.done", item_id=item_id, output_index=index,
                         arguments=arguments)
            item = {**item, "status": "completed", "arguments": arguments}
            yield ev("response.output_item.done", item=item, output_index=index)
            output.append(item)
        usage = {"input_tokens": reply.prompt_tokens, "input_tokens_details": {"cached_tokens": reply.cached_tokens},
                 "output_tokens": reply.completion_tokens,
                 "output_tokens_details": {"reasoning_tokens": len(reply.reasoning or "") // 4},
                 "total_tokens": reply.prompt_tokens + reply.completion_tokens}
        final = {**base, "output": output, "usage": usage, "completed_at": int(time.time())}
        if reply.sparse_final:
            yield ev("response.completed", response={"id": response_id, "usage": usage})
            return
        if reply.finish_reason == "length":
            yield ev("response.incomplete", response={**final, "status": "incomplete",
                                                      "incomplete_details": {"reason": "max_output_tokens"}})
            return
        yield ev("response.completed", response={**final, "status": "completed"})


class FakeOpenAIResponses(FakeCodex):
    """The OpenAI Responses API at ``{url}/v1/responses`` (``base_url`` is ``{url}/v1``): the same events as the
    Codex backend, any ``Bearer`` key, streaming or not, and none of the backend's extra rules."""

    base_path = "/v1"

    def _check_auth(self, recorded: Any) -> Response | None:
        if not recorded.headers.get("authorization", "").startswith("Bearer "):
            return self._json({"error": {"message": "You didn't provide an API key.", "type": "invalid_request_error",
                                         "param": None, "code": None}}, 401)
        return None

    def _check_body(self, body: dict[str, Any]) -> Response | None:
        return None
