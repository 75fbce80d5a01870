"""Helpers every surface uses: bounded JSON bodies, JSON/SSE encoding, errors rendered from the error tree."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from scillm_core import errors, jsonio

if TYPE_CHECKING:
    from scillm_core.context import Runtime

__all__ = ["JSONResponse", "caller_of", "error_response", "identity_of", "json_response", "query_int", "read_json",
           "request_id_of", "runtime_of", "send_error", "sse_data", "sse_error"]


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def json_response(content: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(content, status_code=status, headers=dict(headers) if headers else None)


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


def identity_of(request: Request) -> str:
    """Who authenticated this request: what the auth plugin put in ``scope["scillm.identity"]`` (a virtual key's
    id), else ``"master"`` (the master or loopback dev key). Runs record it as their owner."""
    return str(request.scope.get("scillm.identity") or "master")


def caller_of(request: Request, *, required: bool = False) -> str | None:
    caller = request.headers.get("x-caller-skill") or None
    if required and not caller:
        raise errors.CallerSkillRequired("header X-Caller-Skill is required on this route (name the calling "
                                         "project or skill)", param="X-Caller-Skill")
    return caller


async def read_json(request: Request, *, limit_bytes: int) -> Any:
    """The request body as JSON; 413 past ``limit_bytes``, 400 naming the position of malformed JSON or the path
    where it nests deeper than ``jsonio.MAX_DEPTH``."""
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
    try:
        return jsonio.loads(raw)
    except jsonio.JSONTooDeep as exc:
        raise errors.InvalidRequest(f"request body is nested deeper than {exc.limit} levels @ {exc.path}",
                                    param=exc.path) from None
    except orjson.JSONDecodeError as exc:
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


def sse_data(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def sse_error(exc: BaseException) -> bytes:
    """An error event in the OpenAI stream shape (``data: {"error": {...}}``), which the SDKs raise on."""
    _, body, _ = errors.to_response_parts(exc)
    return sse_data(body)
