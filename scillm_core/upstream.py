"""Helpers every provider needs when talking to an upstream: SSE/NDJSON parsing, retry hints, error mapping.

Wire *formats* stay in provider plugins; these are the protocol-neutral parts (HTTP statuses, SSE framing,
transport failures), so every provider fails the same way for the same cause.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import httpx
from attrs import frozen

from scillm_core import errors
from scillm_core.http import CredentialsInURL, ReplyTooLarge
from scillm_core.jsonio import loads
from scillm_core.redact import redact

if TYPE_CHECKING:
    from scillm_core.context import CallContext
    from scillm_core.registry import Route

__all__ = ["SHAPE_ERRORS", "Malformed", "PendingBytes", "SSEEvent", "SSEParser", "error_for_status", "excerpt",
           "iter_ndjson", "iter_sse", "iter_sse_batches", "retry_after_seconds", "send_upstream", "translate_transport"]

log = logging.getLogger("scillm.upstream")
T = TypeVar("T")


@frozen
class SSEEvent:
    data: str
    event: str | None = None
    id: str | None = None
    raw: bytes = b""  # the event's bytes as they came (comments before it included), with ``iter_sse(raw=True)``

    def json(self) -> Any:
        return loads(self.data)


async def iter_sse(chunks: AsyncIterator[bytes], *, raw: bool = False) -> AsyncIterator[SSEEvent]:
    """Parse an SSE byte stream per the HTML spec: ``\\n``, ``\\r\\n`` or ``\\r`` line ends, repeated ``data:``
    lines joined with ``\\n``, comment lines (``: keep-alive``) ignored, one leading space stripped. With ``raw``
    each event also carries its bytes as sent (for same-dialect pass-through)."""
    async for events in iter_sse_batches(chunks, raw=raw):
        for event in events:
            yield event


async def iter_sse_batches(chunks: AsyncIterator[bytes], *, raw: bool = False) -> AsyncIterator[list[SSEEvent]]:
    """:func:`iter_sse`, the events of each read together: a stream's hot loop takes one step per read, not one
    per event (an upstream read often holds dozens)."""
    parser = SSEParser(raw=raw)
    async for chunk in chunks:
        events = parser.feed(chunk)
        if events:
            yield events
    events = parser.end()
    if events:
        yield events


class SSEParser:
    """The incremental parser behind :func:`iter_sse`: :meth:`feed` bytes as they come, :meth:`end` at the end
    (a final line and event that lack their terminators are flushed)."""

    __slots__ = ("buffer", "data", "event", "id", "raw", "seen")

    def __init__(self, *, raw: bool = False) -> None:
        self.raw = raw
        self.buffer = b""
        self.data: list[str] = []
        self.event: str | None = None
        self.id: str | None = None
        self.seen: list[bytes] = []

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buffer = self.buffer + chunk if self.buffer else chunk
        lines = buffer.splitlines(keepends=True)
        # A line not yet ended by '\n' may be partial, or a '\r' whose '\n' is in the next chunk: keep it.
        self.buffer = lines.pop() if lines and not lines[-1].endswith(b"\n") else b""
        return self._lines(lines)

    def end(self) -> list[SSEEvent]:
        buffer, self.buffer = self.buffer + b"\n\n", b""
        return self._lines(buffer.splitlines(keepends=True))

    def _lines(self, lines: list[bytes]) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        raw, data, seen = self.raw, self.data, self.seen
        for piece in lines:
            if raw:
                seen.append(piece)
            line = piece.rstrip(b"\r\n")
            if not line:
                if data:
                    events.append(SSEEvent("\n".join(data), self.event, self.id, b"".join(seen) if raw else b""))
                    seen.clear()
                    data.clear()
                self.event = None
            elif line[0] != 0x3A:  # not a ':' comment; field names are ASCII, so the value is decoded alone
                name, _, value = line.partition(b":")
                text = (value[1:] if value[:1] == b" " else value).decode("utf-8", "replace")
                if name == b"data":
                    data.append(text)
                elif name == b"event":
                    self.event = text
                elif name == b"id":
                    self.id = text
        return events


class PendingBytes:
    """Same-dialect streams: puts each upstream event's bytes on the first chunk translated from it, or, when it
    makes none (``ping``, ``content_block_stop``), on the next chunk that comes; :meth:`rest` holds what is left at
    the end. So every byte the upstream sent rides, in order, on the chunks the middleware sees."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []

    def carry(self, raw: bytes, chunks: list[Any]) -> list[Any]:
        self.pending.append(raw)
        if chunks:
            from scillm_core.models.native import with_native

            with_native(chunks[0], b"".join(self.pending))
            self.pending.clear()
        return chunks

    def rest(self) -> bytes:
        rest, self.pending = b"".join(self.pending), []
        return rest


async def iter_ndjson(chunks: AsyncIterator[bytes], malformed: Malformed | None = None) -> AsyncIterator[Any]:
    """Parse newline-delimited JSON (Ollama); blank lines are skipped, and so are lines that are not JSON when
    ``malformed`` takes them (else they raise)."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                parsed = _ndjson_line(line, malformed)
                if parsed is not _SKIPPED:
                    yield parsed
    if buffer.strip():
        parsed = _ndjson_line(buffer, malformed)
        if parsed is not _SKIPPED:
            yield parsed


_SKIPPED = object()


def _ndjson_line(line: bytes, malformed: Malformed | None) -> Any:
    if malformed is None:
        return loads(line)
    try:
        return loads(line)
    except ValueError:  # orjson.JSONDecodeError, jsonio.JSONTooDeep
        malformed.skip("malformed JSON", line)
        return _SKIPPED


#: What reading an upstream answer of the wrong shape raises: a string where an object belongs (AttributeError,
#: TypeError), a missing key, an index past the end, ``"x"`` or ``1e308`` for a count (ValueError, OverflowError;
#: orjson's JSONDecodeError is a ValueError). A provider turns them into an
#: :class:`~scillm_core.errors.UpstreamProtocolError` for a whole answer, and skips a stream event that raised one
#: (:meth:`Malformed.read`): an upstream's nonsense is never scillm's 500.
SHAPE_ERRORS = (AttributeError, IndexError, KeyError, OverflowError, TypeError, ValueError)


class Malformed:
    """Stream events of one upstream stream that could not be parsed, or not translated (:meth:`read`): each is
    skipped (logged, counted in ``ctx.notes["chunks_skipped"]``, which the metrics read, and reported as a
    ``chunk.skipped`` event) and the stream carries on. Past ``limit`` of them the stream is not recovering and
    :meth:`skip` raises :class:`~scillm_core.errors.UpstreamProtocolError`."""

    limit = 16

    def __init__(self, ctx: CallContext, route: Route) -> None:
        self.ctx = ctx
        self.route = route
        self.count = 0

    def skip(self, what: str, data: str | bytes) -> None:
        """Skip one event: ``what`` says why (``malformed JSON``), ``data`` is the event (quoted redacted)."""
        route = self.route
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        self.count += 1
        if self.count > self.limit:
            raise errors.UpstreamProtocolError(
                f"{self.count} unparseable stream events, the last {excerpt(text, 120)!r} ({what}): the stream is "
                f"not recovering", provider=route.provider, model=route.model)
        notes = self.ctx.notes
        notes["chunks_skipped"] = notes.get("chunks_skipped", 0) + 1
        log.warning("skipped a stream event request_id=%s provider=%s model=%s reason=%s event=%r",
                    self.ctx.request_id, route.provider, route.model, what, excerpt(text, 120))
        self.ctx.emit("chunk.skipped", route=route, reason=what)

    def read(self, data: str | bytes, translate: Callable[..., list[T]], *args: Any) -> list[T] | None:
        """``translate(*args)``: the chunks of one parsed event (``data``, its text). An event of the wrong shape,
        whose translation raised one of :data:`SHAPE_ERRORS`, is skipped like one that is not JSON: None, and a
        native stream drops its bytes too (an event that rightly makes no chunk gives ``[]``, its bytes kept)."""
        try:
            return translate(*args)
        except SHAPE_ERRORS as exc:
            self.skip(f"unexpected event ({type(exc).__name__}: {excerpt(str(exc), 80)})", data)
            return None


_DELTA = re.compile(r"\s*(\d{1,12})(\.\d{1,9})?\s*")
MAX_HINT_S = 86400.0  # a retry hint beyond a day is nonsense, not a plan


def retry_after_seconds(headers: Mapping[str, str], *, cap_s: float = 300.0) -> float | None:
    """``retry-after-ms`` (milliseconds), else ``retry-after`` (seconds or an HTTP date), capped at ``cap_s``.
    ``None`` when absent or unusable: not a plain non-negative number (``5s``, ``nan``, ``inf``, ``-1``,
    ``garbage``), or more than a day; an unusable hint never fails a call, it only means normal backoff."""
    hint = _hint(headers.get("retry-after-ms"), 1000.0)
    if hint is None:
        hint = _hint(headers.get("retry-after"), 1.0)
    return None if hint is None else min(hint, cap_s)


def _hint(value: str | None, unit: float) -> float | None:
    if not value:
        return None
    if _DELTA.fullmatch(value):
        seconds = float(value) / unit
    elif unit == 1.0:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=datetime.UTC)
        seconds = max(parsed.timestamp() - time.time(), 0.0)
    else:
        return None
    return seconds if 0.0 <= seconds <= MAX_HINT_S else None


def excerpt(text: str, limit: int = 500) -> str:
    """At most ``limit`` characters of upstream text for an error message, redacted *before* it is cut (a cut
    through a secret would leave a prefix that no longer matches it)."""
    return redact(text)[:limit]


_QUOTA_MARKERS = ("insufficient_quota", "quota", "usage_limit", "billing", "balance", "arrears")
_OVERLOAD_MARKERS = ("overloaded", "engine_overloaded")
#: how each provider says the prompt does not fit: OpenAI and Codex (code), OpenAI-compatible servers (vLLM,
#: DeepSeek, OpenRouter: "maximum context length"), Anthropic ("prompt is too long", "exceed context limit"),
#: Gemini ("exceeds the maximum number of tokens"), Moonshot ("exceeded model token limit"), GLM ("Prompt exceeds
#: max length"), llama.cpp (exceed_context_size_error), Ollama ("exceeds the context length")
_CONTEXT_MARKERS = ("context_length_exceeded", "maximum context length", "context length", "context window",
                    "prompt is too long", "exceed context limit", "exceeds the maximum number of tokens",
                    "exceeded model token limit", "prompt exceeds max length", "exceed_context_size",
                    "exceeds the available context size", "longer than the maximum model length")


def error_for_status(status: int, message: str, *, provider: str, model: str, code: str | None = None,
                     kind: str | None = None, headers: Mapping[str, str] | None = None,
                     secrets: tuple[str | None, ...] = ()) -> errors.UpstreamError:
    """Map an upstream HTTP failure to the error tree. ``kind``/``code`` are the upstream's own type and code."""
    headers = headers or {}
    text = redact(message or f"HTTP {status}", secrets)
    hint = " ".join(x for x in (kind, code, text) if x).lower()
    retry_after = retry_after_seconds(headers)
    common: dict[str, Any] = {"provider": provider, "model": model, "upstream_status": status,
                              "retry_after_s": retry_after}
    if status == 429 or (status == 402 and provider):
        if status == 402 or any(m in hint for m in _QUOTA_MARKERS):
            return errors.UpstreamQuotaExceeded(text, code="insufficient_quota", **common)
        return errors.UpstreamRateLimited(text, **common)
    if status in (401, 403):
        return errors.UpstreamAuthError(text, **common)
    if status == 404:
        return errors.UpstreamBadRequest(text, status=404, code=code or "model_not_found", **common)
    if status in (408, 409):
        return errors.UpstreamUnavailable(text, status=503, **common)
    if 400 <= status < 500:
        status = status if status in (400, 413, 422) else 400
        if any(m in hint for m in _CONTEXT_MARKERS):
            return errors.ContextLengthExceeded(text, status=status, **common)
        return errors.UpstreamBadRequest(text, status=status, code=code or "upstream_bad_request", **common)
    if status == 529 or any(m in hint for m in _OVERLOAD_MARKERS):
        return errors.UpstreamUnavailable(text, code="overloaded", **common)
    return errors.UpstreamUnavailable(text, **common)


async def send_upstream(client: httpx.AsyncClient, upstream: httpx.Request, *, provider: str, model: str,
                        stream: bool = True) -> httpx.Response:
    """Send ``upstream`` with transport failures translated (:func:`translate_transport`). A failed answer (status
    400 or more) is read whole and closed even when streamed, so the caller makes its error from
    ``response.content``; a good streamed one is left open for the caller to read."""
    with translate_transport(provider, model):
        response = await client.send(upstream, stream=stream)
        if stream and response.status_code >= 400:
            try:
                await response.aread()
            finally:
                await response.aclose()
    return response


@contextlib.contextmanager
def translate_transport(provider: str, model: str) -> Iterator[None]:
    """Turn httpx transport failures into :class:`UpstreamConnectError` / :class:`UpstreamTimeout`, a reply past
    its size cap (``scillm_core.http``) into :class:`UpstreamReplyTooLarge` and one whose content-encoding cannot be
    decoded into :class:`UpstreamProtocolError`."""
    try:
        yield
    except CredentialsInURL:
        raise errors.ProviderNotConfigured(
            f"{provider}'s base URL holds a user name and password, which cannot go upstream with its API key (both "
            "are an Authorization header); take them out of the URL (a proxy that wants basic auth cannot be "
            "reached with a key this way)", param="model") from None
    except ReplyTooLarge as exc:
        raise errors.UpstreamReplyTooLarge(
            f"{exc.what} exceeded {exc.limit / (1 << 20):g} MiB; scillm stopped reading it (raise [server] "
            f"max_upstream_reply_mb / max_upstream_stream_mb / max_upstream_line_mb if this answer is expected)",
            provider=provider, model=model) from None
    except httpx.TimeoutException as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError | aiohttp.ClientConnectionError) and not isinstance(cause, TimeoutError):
            # the aiohttp transport reports every failed connection (refused, reset, closed without an answer) as
            # ConnectTimeout; the cause tells the truth
            raise errors.UpstreamConnectError(f"connection failed ({type(cause).__name__})", provider=provider,
                                              model=model) from None
        raise _transport_timeout(exc, provider, model) from None
    except httpx.DecodingError as exc:  # e.g. ``content-encoding: gzip`` on a body that is not gzip
        raise errors.UpstreamProtocolError(f"the reply's content-encoding could not be decoded ({exc})",
                                           provider=provider, model=model) from None
    except (httpx.TransportError, OSError) as exc:
        raise errors.UpstreamConnectError(f"connection failed ({type(exc).__name__}: {exc})", provider=provider,
                                          model=model) from None


def _transport_timeout(exc: httpx.TimeoutException, provider: str, model: str) -> errors.UpstreamTimeout:
    """The shared client's own limits: connecting (``connect_timeout_s``) and reading (a backstop behind the limits
    core's dispatch enforces)."""
    try:
        limits = exc.request.extensions.get("timeout") or {}
    except RuntimeError:  # no request attached
        limits = {}

    def seconds(name: str) -> str:
        value = limits.get(name)
        return f"{value:g}s" if isinstance(value, int | float) else "the limit"

    if isinstance(exc, httpx.ConnectTimeout):
        limit, what = "connect", f"could not connect within {seconds('connect')} (connect_timeout_s)"
    elif isinstance(exc, httpx.PoolTimeout):
        limit, what = "pool", f"no connection of scillm's pool was free within {seconds('pool')}"
    else:
        limit, what = "read", f"the upstream sent nothing for {seconds('read')} ({type(exc).__name__})"
    error = errors.UpstreamTimeout(what, provider=provider, model=model, details={"timeout": limit})
    error.limit = limit
    return error
