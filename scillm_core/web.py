"""Helpers every surface uses: bounded JSON bodies, JSON/SSE encoding, errors rendered from the error tree."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from scillm_core import errors, jsonio
from scillm_core.identity import identity_of, job_of
from scillm_core.redact import redact_json

if TYPE_CHECKING:
    from scillm_core.context import CallContext, Runtime

__all__ = ["SESSION_HEADERS", "JSONResponse", "call_context", "caller_of", "error_response", "json_response",
           "list_page", "ops_response", "parse_json", "query_int", "read_body", "read_json", "request_id_of",
           "runtime_of", "send_error", "served_headers", "session_of", "sse_data", "sse_error"]

#: Headers that name an agent session, in order of precedence: scillm's own, then what Claude Code, Codex and
#: OpenCode send. Without one, the body's ``prompt_cache_key`` names it.
SESSION_HEADERS = ("x-scillm-session", "x-claude-code-session-id", "session-id", "session_id",
                   "x-session-affinity", "x-session-id")


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def json_response(content: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(content, status_code=status, headers=dict(headers) if headers else None)


def ops_response(content: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON answer of an ops or listing endpoint (health, the dashboard's data, run listings): it shows names a
    client or the configuration chose (a model ``llama3:sk-live-...``, a caller, a group member), so every string
    and key in it is redacted (:func:`scillm_core.redact.redact_json`)."""
    return Response(redact_json(content), status_code=status, headers=dict(headers) if headers else None,
                    media_type="application/json")


def error_response(exc: BaseException) -> JSONResponse:
    status, body, headers = errors.to_response_parts(exc)
    return json_response(body, status, headers)


async def send_error(send: Send, exc: BaseException) -> None:
    """Send an error response from pure-ASGI middleware."""
    status, body, headers = errors.to_response_parts(exc)
    raw = [(b"content-type", b"application/json")] + [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": orjson.dumps(body)})


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


def request_id_of(request: Request) -> str:
    return str(request.scope.get("scillm.request_id", ""))


def caller_of(request: Request, *, required: bool = False) -> str | None:
    caller = request.headers.get("x-caller-skill") or None
    if required and not caller:
        raise errors.CallerSkillRequired("header X-Caller-Skill is required on this route (name the calling "
                                         "project or skill)", param="X-Caller-Skill")
    return caller


def call_context(request: Request, *, timeout_s: float | None = None) -> CallContext:
    """The context of one model call a surface makes for ``request``: runtime, request id, caller, headers, the
    caller's identity and job (from authentication), and a deadline ``timeout_s`` from now."""
    from scillm_core.context import CallContext
    from scillm_core.events import PARENT_SCOPE_KEY

    return CallContext(runtime=runtime_of(request), request_id=request_id_of(request), caller=caller_of(request),
                       headers=request.headers, identity=identity_of(request), job=job_of(request),
                       deadline=time.monotonic() + timeout_s if timeout_s else None,
                       parent=request.scope.get(PARENT_SCOPE_KEY))


async def read_json(request: Request, *, limit_bytes: int) -> Any:
    """The request body as JSON; 413 past ``limit_bytes``, 400 naming the position of malformed JSON or the path
    where it nests deeper than ``jsonio.MAX_DEPTH``."""
    return parse_json(await read_body(request, limit_bytes=limit_bytes))


async def read_body(request: Request, *, limit_bytes: int) -> bytearray:
    """The request body's bytes (a bytearray: read into one growing buffer); 413 past ``limit_bytes``, 400 when
    empty, 415 when compressed (nothing is decompressed: no compression bomb, no mistaking it for bad JSON)."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise errors.RequestError(f"Content-Encoding {encoding[:40]!r} is not supported: send the body uncompressed "
                                  "@ Content-Encoding", param="Content-Encoding", status=415,
                                  code="unsupported_content_encoding")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit_bytes:
        raise errors.PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit_bytes}")
    raw = bytearray()  # one growing buffer: a list of chunks joined at the end would hold the body twice
    async for chunk in request.stream():
        if len(raw) + len(chunk) > limit_bytes:
            raise errors.PayloadTooLarge(f"request body exceeds the limit of {limit_bytes} bytes")
        raw += chunk
    if not raw:
        raise errors.InvalidRequest("request body is empty; expected a JSON object")
    return raw


def parse_json(raw: bytes | bytearray) -> Any:
    try:
        return jsonio.loads(raw)
    except jsonio.JSONTooDeep as exc:
        raise errors.InvalidRequest(f"request body is nested deeper than {exc.limit} levels @ {exc.path}",
                                    param=exc.path) from None
    except orjson.JSONDecodeError as exc:
        try:  # orjson's words for bytes that are not UTF-8 ("surrogates not allowed") and its position mislead
            bytes(raw).decode()
        except UnicodeDecodeError as bad:
            raise errors.InvalidRequest(f"request body is not valid UTF-8: byte {bad.start} is "
                                        f"{raw[bad.start]:#04x}; JSON is UTF-8 text") from None
        raise errors.InvalidRequest(f"request body is not valid JSON: {exc}") from None


def query_int(request: Request, name: str, *, default: int, minimum: int = 0, maximum: int = 2**53) -> int:
    """An integer query parameter (ASCII digits only: ``²`` and 5,000-digit numbers are 400s naming it as
    ``query.<name>``, as body fields are named ``$.path``)."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(maximum)) or not minimum <= int(raw) <= maximum:
        raise errors.InvalidRequest(f"{name} must be an integer from {minimum} to {maximum}, got {raw[:20]!r} "
                                    f"@ query.{name}", param=f"query.{name}")
    return int(raw)


def list_page(request: Request, items: Iterable[Mapping[str, Any]], *, default_limit: int, max_limit: int,
              default_order: str = "desc") -> dict[str, Any]:
    """One page of a list in OpenAI's cursor shape (``/v1/files``, ``/v1/batches``): ``items`` (each with ``id`` and
    ``created_at``, already only those the caller may see) sorted by ``query.order`` (``asc`` or ``desc``), those
    after the one named by ``query.after``, at most ``query.limit`` of them; ``has_more``, ``first_id`` and
    ``last_id`` let the SDKs' auto-pagination walk the rest. Bad values are 400s naming ``query.<name>``; an
    ``after`` that is not in the list (deleted, or another key's) is one too, never a silently empty page."""
    limit = query_int(request, "limit", default=default_limit, minimum=1, maximum=max_limit)
    order = request.query_params.get("order", default_order)
    if order not in ("asc", "desc"):
        raise errors.InvalidRequest(f"order must be 'asc' or 'desc', not {errors.quote(order)} @ query.order",
                                    param="query.order")
    ordered = sorted(items, key=lambda d: (d.get("created_at") or 0, d["id"]), reverse=order == "desc")
    start = 0
    after = request.query_params.get("after")
    if after is not None:
        start = next((i + 1 for i, item in enumerate(ordered) if item["id"] == after), -1)
        if start < 0:
            raise errors.InvalidRequest(f"after {errors.quote(after)} is not in this list @ query.after",
                                        param="query.after")
    page = ordered[start:start + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > start + limit}


_SESSION_RANK = {name.encode(): rank for rank, name in enumerate(SESSION_HEADERS)}


def session_of(headers: Mapping[str, str], body: Any) -> str | None:
    """The agent session a request belongs to (:data:`SESSION_HEADERS`, else ``prompt_cache_key``), if any."""
    raw = getattr(headers, "raw", None)  # Starlette's headers: one pass over the list, not one scan per name
    if raw is not None:
        found: tuple[int, bytes] | None = min(((_SESSION_RANK[k], v) for k, v in raw if k in _SESSION_RANK and v),
                                              default=None)
        if found is not None:
            return found[1].decode("latin-1")[:256]
    else:
        for name in SESSION_HEADERS:
            value = headers.get(name)
            if value:
                return value[:256]
    key = body.get("prompt_cache_key") if isinstance(body, dict) else None
    return key[:256] if isinstance(key, str) and key else None


def served_headers(ctx: CallContext) -> dict[str, str]:
    """Headers saying who served and how; middleware adds its own through ``ctx.notes["headers"]`` (a dict)."""
    route = ctx.route
    extra = {str(k): str(v) for k, v in (ctx.notes.get("headers") or {}).items()}
    if route is None:
        return {**extra, "x-scillm-attempts": str(ctx.attempts)}
    return {**extra, "x-scillm-provider": route.provider, "x-scillm-served-model": route.model,
            "x-scillm-attempts": str(ctx.attempts)}


def sse_data(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def sse_error(exc: BaseException) -> bytes:
    """An error event in the OpenAI stream shape (``data: {"error": {...}}``), which the SDKs raise on."""
    _, body, _ = errors.to_response_parts(exc)
    return sse_data(body)
