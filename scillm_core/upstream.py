"""Helpers every provider needs when talking to an upstream: SSE/NDJSON parsing, retry hints, error mapping.

Wire *formats* stay in provider plugins; these are the protocol-neutral parts (HTTP statuses, SSE framing,
transport failures), so every provider fails the same way for the same cause.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import re
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import httpx
from attrs import frozen

from scillm_core import errors
from scillm_core.http import ReplyTooLarge
from scillm_core.jsonio import loads
from scillm_core.redact import redact

__all__ = ["PendingBytes", "SSEEvent", "error_for_status", "excerpt", "iter_ndjson", "iter_sse", "retry_after_seconds",
           "translate_transport"]


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
    buffer = b""
    data: list[str] = []
    event: str | None = None
    event_id: str | None = None
    seen: list[bytes] = []
    done = False
    while not done:
        chunk = await anext(chunks, None)
        if chunk is None:
            done, buffer = True, buffer + b"\n\n"  # flush a final line and event that lack their terminators
        else:
            buffer += chunk
        lines = buffer.splitlines(keepends=True)
        # A line not yet ended by '\n' may be partial, or a '\r' whose '\n' is in the next chunk: keep it.
        buffer = lines.pop() if lines and not lines[-1].endswith(b"\n") else b""
        for piece in lines:
            if raw:
                seen.append(piece)
            line = piece.rstrip(b"\r\n").decode("utf-8", "replace")
            if not line:
                if data:
                    yield SSEEvent("\n".join(data), event, event_id, b"".join(seen) if raw else b"")
                    seen = []
                data, event = [], None
            elif line[0] != ":":
                name, _, value = line.partition(":")
                value = value[1:] if value[:1] == " " else value
                if name == "data":
                    data.append(value)
                elif name == "event":
                    event = value
                elif name == "id":
                    event_id = value


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


async def iter_ndjson(chunks: AsyncIterator[bytes]) -> AsyncIterator[Any]:
    """Parse newline-delimited JSON (Ollama); blank lines are skipped."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield loads(line)
    if buffer.strip():
        yield loads(buffer)


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
        return errors.UpstreamBadRequest(text, status=status if status in (400, 413, 422) else 400,
                                         code=code or "upstream_bad_request", **common)
    if status == 529 or any(m in hint for m in _OVERLOAD_MARKERS):
        return errors.UpstreamUnavailable(text, code="overloaded", **common)
    return errors.UpstreamUnavailable(text, **common)


@contextlib.contextmanager
def translate_transport(provider: str, model: str) -> Iterator[None]:
    """Turn httpx transport failures into :class:`UpstreamConnectError` / :class:`UpstreamTimeout`, and a reply
    past its size cap (``scillm_core.http``) into :class:`UpstreamReplyTooLarge`."""
    try:
        yield
    except ReplyTooLarge as exc:
        raise errors.UpstreamReplyTooLarge(
            f"{exc.what} exceeded {exc.limit / (1 << 20):g} MiB; scillm stopped reading it (raise [server] "
            f"max_upstream_reply_mb / max_upstream_stream_mb / max_upstream_line_mb if this answer is expected)",
            provider=provider, model=model) from None
    except httpx.TimeoutException as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and not isinstance(cause, TimeoutError):
            # the aiohttp transport reports a refused connection as ConnectTimeout; the cause tells the truth
            raise errors.UpstreamConnectError(f"connection failed ({type(cause).__name__})", provider=provider,
                                              model=model) from None
        raise errors.UpstreamTimeout(f"no answer in time ({type(exc).__name__})", provider=provider,
                                     model=model) from None
    except (httpx.TransportError, OSError) as exc:
        raise errors.UpstreamConnectError(f"connection failed ({type(exc).__name__}: {exc})", provider=provider,
                                          model=model) from None
