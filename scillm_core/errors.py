"""The scillm exception tree and its one mapping to HTTP.

Every error a client can see is one of these, rendered by :func:`to_response_parts` as the OpenAI envelope
``{"error": {"message", "type", "code", "param"}}``. Nothing else in the code base builds error bodies.

    ScillmError                      500 server_error
    ├── RequestError                 400 invalid_request_error
    │   ├── InvalidRequest           400 (param = JSON path such as ``$.messages[1].role``)
    │   ├── PayloadTooLarge          413
    │   ├── RequestTimeout           408 request_timeout (the body did not arrive in time; the connection is closed)
    │   ├── ModelNotFound            404 model_not_found (message lists close matches)
    │   ├── ProviderNotConfigured    400 provider_not_configured (names the missing variable)
    │   ├── CallerSkillRequired      400 caller_skill_required
    │   ├── NotFound                 404 not_found
    │   └── Conflict                 409 conflict
    ├── AuthenticationError          401 invalid_api_key
    ├── PermissionDenied             403 permission_denied
    ├── LimitExceeded                429, scillm's own limits (never reached the provider; retry_after_s kept)
    │   ├── BudgetExceeded           429 budget_exceeded (a key's, team's, batch's or run's dollars)
    │   └── RateLimited              429 rate_limited (requests or tokens per minute, concurrent requests)
    ├── DeadlineExceeded             504 timeout_error
    ├── StateUnavailable             503 state_unavailable (the shared state store cannot be reached)
    └── UpstreamError                502 upstream_error (always names provider and model)
        ├── UpstreamBadRequest       status of the upstream (400/404/413/422), its code kept
        │   └── ContextLengthExceeded 400 context_length_exceeded (falls back to the group's next model)
        ├── UpstreamAuthError        401 upstream_auth_failed
        ├── UpstreamRateLimited      429 rate_limit_exceeded (retry_after_s kept)
        ├── UpstreamQuotaExceeded    429 insufficient_quota
        ├── UpstreamUnavailable      503 upstream_unavailable (5xx, overloaded)
        ├── UpstreamConnectError     502 connection_error
        ├── UpstreamTimeout          504 upstream_timeout
        ├── UpstreamProtocolError    502 upstream_bad_response
        │   └── UpstreamReplyTooLarge 502 upstream_reply_too_large (past a [server] max_upstream_* cap)
        └── ThinkingBudgetExhausted  502 thinking_budget_exhausted

``retryable`` says whether a retry or a fallback may help; middleware reads it instead of guessing from statuses.
Every message (and ``details``) is redacted when the error is made (:func:`scillm_core.redact.redact`): error text
often quotes an upstream, so this is the one place that keeps keys out of responses, SSE error events, the
breaker's ``last_error``, the call log and the server log.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from scillm_core.redact import redact

__all__ = [
    "AuthenticationError",
    "BudgetExceeded",
    "CallerSkillRequired",
    "Conflict",
    "ContextLengthExceeded",
    "DeadlineExceeded",
    "InvalidRequest",
    "LimitExceeded",
    "ModelNotFound",
    "NotFound",
    "Origins",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProviderNotConfigured",
    "RateLimited",
    "RequestError",
    "RequestTimeout",
    "ScillmError",
    "StateUnavailable",
    "ThinkingBudgetExhausted",
    "UnsupportedParameter",
    "UpstreamAuthError",
    "UpstreamBadRequest",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamQuotaExceeded",
    "UpstreamRateLimited",
    "UpstreamReplyTooLarge",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "client_headers",
    "quote",
    "shorten",
    "to_response_parts",
]


class ScillmError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, headers: Mapping[str, str] | None = None,
                 details: Mapping[str, Any] | None = None) -> None:
        message = redact(message)  # the one redaction point for error text (much of it quotes upstreams)
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = dict(headers or {})
        self.details = _redacted(dict(details or {}))
        if code is not None:
            self.code = code  # type: ignore[misc]
        if status is not None:
            self.status = status  # type: ignore[misc]

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.type, "code": self.code, "param": self.param}
        if self.details:
            error["details"] = self.details
        return {"error": error}


class RequestError(ScillmError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidRequest(RequestError):
    pass


class UnsupportedParameter(RequestError):
    """A request parameter asks for something in the answer that the deployment called cannot deliver
    (``scillm_core.models.params``): refused before anything is sent, naming ``$.<param>``, provider and model."""

    code = "unsupported_parameter"


class PayloadTooLarge(RequestError):
    status = 413
    code = "payload_too_large"


class RequestTimeout(RequestError):
    """The request's body had not arrived by its deadline (``[server] body_read_timeout_s``). The connection is
    closed with the answer: what the client still sends would otherwise be read as the rest of that body."""

    status = 408
    code = "request_timeout"

    def __init__(self, message: str, **kw: Any) -> None:
        kw.setdefault("headers", {"connection": "close"})
        super().__init__(message, **kw)


class ModelNotFound(RequestError):
    status = 404
    code = "model_not_found"


class ProviderNotConfigured(RequestError):
    code = "provider_not_configured"


class CallerSkillRequired(RequestError):
    code = "caller_skill_required"


class NotFound(RequestError):
    status = 404
    code = "not_found"


class Conflict(RequestError):
    status = 409
    code = "conflict"


class AuthenticationError(ScillmError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(ScillmError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class LimitExceeded(ScillmError):
    """A limit of scillm's own refused the call before it reached any provider. ``retry_after_s`` (also the
    ``retry-after`` header) says when trying again can succeed; ``None`` when it cannot (a ceiling was spent)."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s
        if retry_after_s is not None and "retry-after" not in self.headers:
            self.headers["retry-after"] = str(max(1, math.ceil(retry_after_s)))


class BudgetExceeded(LimitExceeded):
    type = "budget_exceeded"
    code = "budget_exceeded"


class RateLimited(LimitExceeded):
    code = "rate_limited"


class DeadlineExceeded(ScillmError):
    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


class StateUnavailable(ScillmError):
    """The state store (Redis) did not answer in time; what needs it fails closed with this 503."""

    status = 503
    type = "server_error"
    code = "state_unavailable"
    retryable = True

    def __init__(self, message: str, **kw: Any) -> None:
        kw.setdefault("headers", {"retry-after": "1"})
        super().__init__(message, **kw)


class UpstreamError(ScillmError):
    """A provider failed. ``provider`` and ``model`` are always in the message; secrets never are."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"
    retryable = True

    def __init__(self, message: str, *, provider: str, model: str, upstream_status: int | None = None,
                 retry_after_s: float | None = None, **kw: Any) -> None:
        prefix = f"{provider} ({model})"
        super().__init__(message if message.startswith(prefix) else f"{prefix}: {message}", **kw)
        self.provider = provider
        self.model = model
        self.upstream_status = upstream_status
        if retry_after_s is not None and not 0.0 <= retry_after_s < math.inf:
            retry_after_s = None  # NaN, infinite or negative: no usable hint (never a crash)
        self.retry_after_s = retry_after_s
        if retry_after_s is not None and "retry-after" not in self.headers:
            self.headers["retry-after"] = str(max(1, round(retry_after_s)))


class UpstreamBadRequest(UpstreamError):
    status = 400
    type = "invalid_request_error"
    code = "upstream_bad_request"
    retryable = False


class ContextLengthExceeded(UpstreamBadRequest):
    """The prompt does not fit this model's context window (each provider's wire form of it): never retried on the
    same model, but a group's next model, perhaps with a larger window, is tried."""

    code = "context_length_exceeded"


class UpstreamAuthError(UpstreamError):
    status = 401
    type = "authentication_error"
    code = "upstream_auth_failed"
    retryable = False


class UpstreamRateLimited(UpstreamError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamQuotaExceeded(UpstreamError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"
    retryable = False


class UpstreamUnavailable(UpstreamError):
    status = 503
    type = "server_error"
    code = "upstream_unavailable"


class UpstreamConnectError(UpstreamError):
    status = 502
    type = "connection_error"
    code = "connection_error"


class UpstreamTimeout(UpstreamError):
    """The upstream stayed silent past a limit (``scillm_core.timeouts``): ``limit`` names it (``connect``,
    ``headers``, ``first_token``, ``idle``, ``total``; ``read`` for the client's own read limit). Not retried on the
    same deployment: resilience fails over instead."""

    status = 504
    type = "timeout_error"
    code = "upstream_timeout"
    limit: str | None = None
    reported = False  # logged and emitted (core's dispatch does it once)


class UpstreamProtocolError(UpstreamError):
    code = "upstream_bad_response"


class UpstreamReplyTooLarge(UpstreamProtocolError):
    code = "upstream_reply_too_large"
    retryable = False  # the same question brings the same oversized answer; a fallback may answer smaller


class ThinkingBudgetExhausted(UpstreamError):
    code = "thinking_budget_exhausted"
    retryable = False

    @classmethod
    def check(cls, response: Any, ctx: Any, model: str, detail: str, fix: str) -> None:
        """Raise when ``response`` (a ``ChatResponse``) is an empty answer cut off by the output limit, which would
        otherwise reach the client as a blank success. ``detail`` and ``fix`` speak the surface's dialect."""
        choice = response.choices[0] if response.choices else None
        if choice is None or choice.finish_reason != "length" or choice.message.text or choice.message.tool_calls:
            return
        route = ctx.route
        raise cls(f"the model used its whole output budget before answering ({detail}); {fix}",
                  provider=route.provider if route else "?", model=route.model if route else model)


QUOTE_LIMIT = 64


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """An id or name a client sent, quoted for an error message: ``repr`` of at most ``limit`` characters of it, then
    ``…``. A path or form field can carry an id of thousands of characters; an error never echoes one whole."""
    text = value if isinstance(value, str) else str(value)
    return repr(text[:limit]) + ("…" if len(text) > limit else "")


def shorten(text: str, limit: int = 2 * QUOTE_LIMIT) -> str:
    """``text`` a client sent (a path), cut to ``limit`` characters and ``…`` for an error message."""
    return text if len(text) <= limit else text[:limit] + "…"


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v) for v in value]
    return value


E = TypeVar("E", bound=BaseException)
_CHAT_PATH = re.compile(r"\$\.(messages|tools)\[(\d+)\](?:\.(content|tool_calls)\[(\d+)\])?")
_PATH_IN_TEXT = re.compile(r"\$(?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])+")


class Origins:
    """Where a translated request came from in the client's own body, for errors about it.

    A surface that translates its dialect (Responses, Anthropic Messages) to a chat request records, as it goes, the
    JSON path each chat message, part, tool call and tool had in the client's body, and the chat fields that have
    another name there. An error raised about the chat request after that (by a middleware reading a file, a
    provider translating the request, the chat model's own checks) names chat's paths, ``$.messages[3].content[1]``,
    which is somewhere else in the body the client sent; :meth:`relocate` names the client's instead. The nearest
    recorded ancestor is used, without the chat-shaped rest below it (an image part is ``image_url.url`` in chat and
    ``source.data`` in Anthropic's blocks). A renamed field keeps what follows it (``$.stop[1]`` is
    ``$.stop_sequences[1]``); where the inside differs too, the surface records the deeper paths
    (``response_format.json_schema.schema``). Paths the surface named itself (``asks``) are the client's already.
    """

    __slots__ = ("asks", "fields", "messages", "tools")

    def __init__(self) -> None:
        #: per chat message: its path, then its content parts' (a list, or the prefix of parts that kept their
        #: places: ``$.input[3].content``) and its tool calls' (None: not recorded)
        self.messages: list[tuple[str, list[str] | str | None, list[str] | None]] = []
        self.tools: list[str] = []  # per chat tool
        self.fields: dict[str, str] = {}  # a chat field's path (max_tokens) -> the client's ($.max_output_tokens)
        self.asks: Mapping[str, str] = {}

    def message(self, path: str, content: list[str] | str | None = None, calls: list[str] | None = None) -> None:
        self.messages.append((path, content, calls))

    def call(self, path: str) -> None:
        """A tool call added to the last message (a Responses function_call item joins the assistant turn)."""
        where, content, calls = self.messages[-1]
        self.messages[-1] = (where, content, [*(calls or ()), path])

    def native(self, path: str) -> str:
        """``path`` (a chat request's) as the client's body has it."""
        found = _CHAT_PATH.match(path)
        if found is not None:
            kind, index, inner, position = found.groups()
            if kind == "tools":
                i = int(index)
                return self.tools[i] if i < len(self.tools) else path
            if int(index) >= len(self.messages):
                return path
            where, content, calls = self.messages[int(index)]
            paths = content if inner == "content" else calls
            if position is not None and isinstance(paths, str):
                return f"{paths}[{position}]"
            if position is not None and paths is not None and int(position) < len(paths):
                return paths[int(position)]
            return where
        rest = key = path[2:] if path.startswith("$.") else ""
        while key:  # the longest recorded field path it starts with; the rest has the same shape there
            if key in self.fields:
                return self.fields[key] + rest[len(key):]
            key = key[:max(key.rfind("."), key.rfind("["), 0)]
        return path

    def relocate(self, exc: E) -> E:
        """``exc`` naming the client's paths (its ``param`` and each path in its message); the same object when
        there is nothing to change."""
        if not isinstance(exc, ScillmError) or not exc.param or exc.param in self.asks:
            return exc
        param = self.native(exc.param)
        message = _PATH_IN_TEXT.sub(lambda m: self.native(m.group(0)), exc.message)
        if param == exc.param and message == exc.message:
            return exc
        moved = copy.copy(exc)
        moved.param, moved.message, moved.args = param, message, (message,)
        return moved


SDK_RETRY_WAIT_S = 60.0  # the longest retry-after the openai and anthropic SDKs wait out before retrying


def client_headers(exc: ScillmError) -> dict[str, str]:
    """The headers a client gets with ``exc``: its own, plus ``x-should-retry: false`` where the SDKs' own retries
    cannot help: an upstream failure that retrying cannot fix (a spent quota, an unrepairable or empty answer), and
    a limit of scillm's that will not let the call through within ``SDK_RETRY_WAIT_S`` (a spent budget, a call
    larger than the budget). The openai and anthropic SDKs retry 429 and 5xx by themselves (twice by default)
    unless told so: each retry would be another paid upstream call, or the caller waiting to be refused again."""
    headers = dict(exc.headers)
    if (isinstance(exc, UpstreamError) and not exc.retryable) or (
            isinstance(exc, LimitExceeded) and (exc.retry_after_s is None or exc.retry_after_s > SDK_RETRY_WAIT_S)):
        headers.setdefault("x-should-retry", "false")
    return headers


def to_response_parts(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, body, headers) for any exception; unknown exceptions become an opaque 500."""
    if isinstance(exc, ScillmError):
        return exc.status, exc.body(), client_headers(exc)
    body = {"error": {"message": "internal error", "type": "server_error", "code": "internal_error", "param": None}}
    return 500, body, {}
