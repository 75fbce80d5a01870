"""The shared upstream client: httpx's API over the transport that measured fastest (see bench/README.md).

``SCILLM_HTTP_TRANSPORT=aiohttp`` (default) uses the aiohttp transport: its connection pool stays flat with
hundreds of requests in flight, where httpcore 1.0's pool grows quadratically. ``httpx`` selects httpx's own.
Every request carries scillm's own User-Agent; client headers are never forwarded, and no upstream cookie is kept.
The one exception is headers an observer asked for on ``attempt.start`` (trace context): core sets
:data:`UPSTREAM_HEADERS` around that attempt's provider call, and the client adds them to each request it sends.

Every reply is size-capped while it is read (:class:`ReplyLimits`, ``[server] max_upstream_*``), never after
buffering it: a body read whole (a non-streaming answer, any error body) by ``max_reply_bytes``, a 2xx reply read
as a stream by ``max_stream_bytes`` in total and, unless it is binary media, ``max_line_bytes`` per line (an SSE
or NDJSON line, whatever its content-type claims). Past a cap
the read raises :class:`ReplyTooLarge`, which ``scillm_core.upstream.translate_transport`` turns into a 502
naming provider and model. An aiohttp error the aiohttp transport does not map itself (a reply that is not HTTP,
such as a bad status line) leaves this module as httpx's ``RemoteProtocolError``, never as aiohttp's own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar
from typing import Any

import aiohttp
import httpx
from attrs import frozen

from scillm_core.version import __version__

__all__ = ["UPSTREAM_HEADERS", "USER_AGENT", "CredentialsInURL", "ReplyLimits", "ReplyTooLarge", "make_http_client"]

#: Headers for the upstream requests of the current attempt (set by core's dispatch around the provider call).
UPSTREAM_HEADERS: ContextVar[Mapping[str, str] | None] = ContextVar("scillm_upstream_headers", default=None)

USER_AGENT = f"scillm/{__version__}"
LIMITS = httpx.Limits(max_connections=2048, max_keepalive_connections=512, keepalive_expiry=30.0)
TIMEOUT = httpx.Timeout(connect=15.0, read=900.0, write=60.0, pool=60.0)
MIB = 1 << 20
_BINARY = ("image/", "audio/", "video/", "application/pdf", "application/octet-stream")


@frozen(kw_only=True)
class ReplyLimits:
    max_reply_bytes: int = 32 * MIB     # a body read whole: non-streaming answers and every error body
    max_stream_bytes: int = 256 * MIB   # a streamed 2xx reply, in total
    max_line_bytes: int = 8 * MIB       # one line of a streamed reply (an SSE or NDJSON line)


class ReplyTooLarge(httpx.TransportError):
    """An upstream reply went past a :class:`ReplyLimits` cap; ``what`` names the cap."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"{what} exceeded {limit / MIB:g} MiB")
        self.what = what
        self.limit = limit


class CredentialsInURL(httpx.TransportError):
    """A request to a URL with a user and password (``https://user:password@proxy/v1``) that carries an
    ``Authorization`` header too (the provider's key): one request cannot send both."""


class _NoCookies(httpx.Cookies):
    """The shared client keeps no cookies: a ``Set-Cookie`` from one upstream reply must not ride along on every
    later request to that host, whoever makes it (and reading each reply's headers into a cookie jar cost ~3% of a
    streamed request's CPU)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class _Client(httpx.AsyncClient):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._cookies = _NoCookies()  # (httpx's ``cookies`` setter would copy it into a plain Cookies)

    async def send(self, request: httpx.Request, *, stream: bool = False, **kw: Any) -> httpx.Response:
        request.extensions["scillm.stream"] = stream  # the transport caps a streamed read differently
        extra = UPSTREAM_HEADERS.get()
        if extra:  # the attempt's trace context (one context variable read otherwise, no event hook)
            headers = request.headers
            for name, value in extra.items():  # one by one: httpx's Headers.update costs 5x more per request
                headers[name] = value
        return await super().send(request, stream=stream, **kw)


class _CappedTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, limits: ReplyLimits) -> None:
        self.inner = inner
        self.limits = limits

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self.inner.handle_async_request(request)
        except aiohttp.ClientError as exc:
            raise _as_httpx(exc) from exc
        except ValueError:  # aiohttp refuses a key header with credentials in the URL before sending
            if request.url.userinfo and "authorization" in request.headers:
                raise CredentialsInURL("a user and password in the URL, and a key") from None
            raise
        limits = self.limits
        streamed = bool(request.extensions.get("scillm.stream")) and response.status_code < 400
        limit, what = ((limits.max_stream_bytes, "the streamed reply") if streamed else
                       (limits.max_reply_bytes, "the reply body"))
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await response.aclose()
            raise ReplyTooLarge(f"{what} (content-length {declared})", limit)
        binary = response.headers.get("content-type", "").startswith(_BINARY)  # e.g. an image being fetched
        response.stream = _CappedStream(response, limit, what,
                                        limits.max_line_bytes if streamed and not binary else None)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class _CappedStream(httpx.AsyncByteStream):
    """``response``'s body, capped. Closed, it takes itself out of the response: httpx's response and the stream
    wrapping this one point at each other, a cycle that only the garbage collector would free, together with the
    transport's whole reply (its headers, its connection's reader) behind it, for every upstream call."""

    def __init__(self, response: httpx.Response, limit: int, what: str, line_limit: int | None) -> None:
        assert isinstance(response.stream, httpx.AsyncByteStream)
        self.inner: httpx.AsyncByteStream = response.stream
        self.response: httpx.Response | None = response
        self.limit = limit
        self.what = what
        self.line_limit = line_limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        total = 0
        line = 0  # bytes since the last line end
        line_limit = self.line_limit
        try:
            async for chunk in self.inner:
                total += len(chunk)
                if total > self.limit:
                    raise ReplyTooLarge(self.what, self.limit)
                if line_limit is not None:
                    end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
                    line = line + len(chunk) if end < 0 else len(chunk) - end - 1
                    if line > line_limit:
                        raise ReplyTooLarge("one line of the streamed reply", line_limit)
                yield chunk
        except aiohttp.ClientError as exc:
            raise _as_httpx(exc) from exc

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            if self.response is not None:  # read or closed: what is left to read of it is nothing
                self.response.stream, self.response = _CLOSED, None
            self.inner = _CLOSED


_CLOSED = httpx.ByteStream(b"")


def _as_httpx(exc: aiohttp.ClientError) -> httpx.RemoteProtocolError:
    """An aiohttp error the aiohttp transport did not map (it maps a refused connection, a cut body; not a reply
    that is not HTTP at all, ``ClientResponseError``), which would escape every ``except httpx...`` above it. Its
    text names the URL (a key may be in it): only the parser's message is kept."""
    message = " ".join(str(exc.message).split()) if isinstance(exc, aiohttp.ClientResponseError) else ""
    return httpx.RemoteProtocolError(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


def make_http_client(env: Mapping[str, str] | None = None, transport: httpx.AsyncBaseTransport | None = None,
                     limits: ReplyLimits | None = None) -> httpx.AsyncClient:
    if transport is None:
        transport = _transport((env or {}).get("SCILLM_HTTP_TRANSPORT", "aiohttp"))
    return _Client(transport=_CappedTransport(transport, limits or ReplyLimits()), timeout=TIMEOUT,
                   headers={"user-agent": USER_AGENT}, follow_redirects=False, trust_env=False)


def _transport(name: str) -> httpx.AsyncBaseTransport:
    if name == "httpx":
        return httpx.AsyncHTTPTransport(limits=LIMITS)
    if name != "aiohttp":
        raise ValueError(f"SCILLM_HTTP_TRANSPORT must be 'aiohttp' or 'httpx', not {name!r}")
    from httpx_aiohttp import AiohttpTransport

    return AiohttpTransport(limits=LIMITS, trust_env=False)
