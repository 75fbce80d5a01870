"""scillm's error tree rendered in the Anthropic envelope, and an ASGI layer that converts the OpenAI-envelope
errors other layers (auth, routing, Starlette) answer on the Messages routes.

Anthropic clients read ``{"type": "error", "error": {"type", "message"}, "request_id"}``; the SDKs pick their
exception class from the HTTP status (529 -> ``OverloadedError``) and retry on ``x-should-retry`` / 408, 409, 429,
>= 500.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scillm_core import errors
from scillm_core.jsonio import loads

__all__ = ["MESSAGES_PATHS", "AnthropicErrorMiddleware", "anthropic_error_parts", "anthropic_type_for",
           "error_event"]

MESSAGES_PATHS = ("/v1/messages", "/v1/messages/count_tokens")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 409: "invalid_request_error",
          413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error", 504: "timeout_error",
          529: "overloaded_error"}


def anthropic_type_for(status: int) -> str:
    if status in _TYPES:
        return _TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def anthropic_error_parts(exc: BaseException, request_id: str = "") -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) in the Anthropic shape for any exception (unknown ones: an opaque 500)."""
    if not isinstance(exc, errors.ScillmError):
        return 500, _body("api_error", "internal error", request_id), {}
    status = exc.status
    headers = errors.client_headers(exc)
    if isinstance(exc, errors.UpstreamError) and (exc.code == "overloaded" or exc.upstream_status == 529):
        status = 529  # what Anthropic clients know as "overloaded" (retried, OverloadedError)
    body = _body(anthropic_type_for(status), exc.message, request_id)
    if exc.details:
        body["error"]["details"] = exc.details  # where the SDKs read ``error_code`` (their typed exceptions)
    return status, body, headers


def error_event(exc: BaseException, request_id: str = "") -> bytes:
    """The mid-stream ``event: error`` that the SDKs raise on (never a silent clean end)."""
    _, body, _ = anthropic_error_parts(exc, request_id)
    return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"


def _body(kind: str, message: str, request_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    if request_id:
        body["request_id"] = request_id
    return body


class AnthropicErrorMiddleware:
    """On the Messages routes only: rewrite OpenAI-envelope error bodies from inner layers (auth 401/403, 404/405)
    into the Anthropic envelope, and add Anthropic's ``request-id`` header. Sits outside the auth layer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") not in MESSAGES_PATHS:
            await self.app(scope, receive, send)
            return
        request_id = str(scope.get("scillm.request_id", ""))
        start: Message | None = None
        chunks: list[bytes] = []

        async def convert(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if request_id:
                    headers.append((b"request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
                if message["status"] < 400:
                    await send(message)
                    return
                start = message  # hold an error response until its body is complete
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = _rewrite(b"".join(chunks), start["status"], request_id)
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, convert)


def _rewrite(raw: bytes, status: int, request_id: str) -> bytes:
    try:
        data = loads(raw)
    except orjson.JSONDecodeError:
        return orjson.dumps(_body(anthropic_type_for(status), raw.decode("utf-8", "replace")[:500] or
                                  f"HTTP {status}", request_id))
    if isinstance(data, dict) and data.get("type") == "error":
        return raw  # already Anthropic-shaped
    error = data.get("error") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return orjson.dumps(_body(anthropic_type_for(status), str(message or f"HTTP {status}"), request_id))
