"""A run's event log: seq-numbered JSON records appended to ``events.jsonl`` (secrets scrubbed) that live
followers are woken for (no polling), and the SSE tail every agent surface serves from it (resumable with
``after=<seq>``, heartbeats while quiet, an ``end`` event once the log is closed and drained)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
from starlette.requests import Request

from scillm_core import errors
from scillm_core.web import query_int

__all__ = ["EventLog", "read_new", "resume_after", "sse_tail"]

_READ = 1 << 16


class EventLog:
    """Append-only events of one run. Reopening an existing file continues its numbering (a restarted server
    appends after what was stored); :meth:`close` marks the end, after which followers finish."""

    def __init__(self, path: Path, *, redact: Sequence[str] = (), closed: bool = False) -> None:
        self.path = path
        self.secrets = [s.encode() for s in redact if s]
        self.seq = _last_seq(path)
        self.closed = closed
        self._changed = asyncio.Event()

    def append(self, type: str, **fields: Any) -> dict[str, Any]:
        """Store one event ``{seq, ts, type, **fields}`` and wake followers; returns it (unscrubbed)."""
        if self.closed:
            raise RuntimeError(f"event log {self.path} is closed")
        self.seq += 1
        event = {"seq": self.seq, "ts": round(time.time(), 3), "type": type, **fields}
        line = orjson.dumps(event, default=str)
        for secret in self.secrets:
            line = line.replace(secret, b"[redacted]")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as fh:
            fh.write(line + b"\n")
        self._wake()
        return event

    def close(self) -> None:
        self.closed = True
        self._wake()

    @property
    def changed(self) -> asyncio.Event:
        """Set at the next append (or close, or :meth:`notify`): what a reader waits for after reading."""
        return self._changed

    def notify(self) -> None:
        """Wake followers: someone else (a runner writing the file itself) appended to it."""
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, after: int = 0, *, heartbeat_s: float | None = None
                     ) -> AsyncIterator[dict[str, Any] | None]:
        """Stored events with ``seq > after``, then live ones as they are appended, until the log is closed and
        read to its end. Yields ``None`` after ``heartbeat_s`` without an event (for keep-alives)."""
        offset, buf = 0, bytearray()
        while True:
            changed = self._changed  # taken before reading, so an append during the read is not missed
            closed = self.closed
            offset, events = await asyncio.to_thread(read_new, self.path, offset, buf)  # off the event loop
            for event in events:
                if event.get("seq", 0) > after:
                    yield event
            if closed:
                return
            try:
                await asyncio.wait_for(changed.wait(), heartbeat_s)
            except TimeoutError:
                yield None


def resume_after(request: Request) -> int:
    """The event seq an SSE client has already seen: ``?after=``, else the ``Last-Event-ID`` header an EventSource
    sends when it reconnects (the ``id:`` of the last frame it got), else 0. Anything but a plain integer is a 400
    naming where it came from."""
    header = request.headers.get("last-event-id")
    if "after" in request.query_params or header is None:
        return query_int(request, "after", default=0)
    if not (header.isascii() and header.isdigit()) or len(header) > 16:
        raise errors.InvalidRequest("Last-Event-ID must be an event seq @ Last-Event-ID", param="Last-Event-ID")
    return int(header)


def read_new(path: Path, offset: int, buf: bytearray) -> tuple[int, list[dict[str, Any]]]:
    """The events written to ``path`` after ``offset`` (a partial last line stays in ``buf``); the new offset."""
    events: list[dict[str, Any]] = []
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            while chunk := fh.read(_READ):
                offset += len(chunk)
                buf += chunk
    except FileNotFoundError:
        return offset, events
    start = 0
    while (i := buf.find(b"\n", start)) >= 0:
        line = bytes(buf[start:i])
        start = i + 1
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict):
            events.append(event)
    del buf[:start]
    return offset, events


def _last_seq(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - _READ))
            tail = fh.read().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(tail):
        try:
            seq = orjson.loads(line).get("seq")
        except (orjson.JSONDecodeError, AttributeError):
            continue
        if isinstance(seq, int):
            return seq
    return 0


async def sse_tail(log: EventLog, after: int, heartbeat_s: float,
                   end: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
                   keep: Callable[[Mapping[str, Any]], bool] | None = None) -> AsyncIterator[bytes]:
    """The log as SSE: ``id: <seq>`` + ``data: <event>`` frames, ``: heartbeat`` comments while quiet, and an
    ``event: end`` frame after the last event of a closed log (its data: ``end``, or what ``end()`` returns then).
    With ``keep``, only the events it accepts (a log several keys' work shares)."""
    async for event in log.follow(after, heartbeat_s=heartbeat_s):
        if event is None:
            yield b": heartbeat\n\n"
            continue
        if keep is not None and not keep(event):
            continue
        yield b"id: %d\ndata: %s\n\n" % (event.get("seq", 0), orjson.dumps(event))  # scrubbed when stored
    final = end() if callable(end) else end
    yield b"event: end\ndata: " + orjson.dumps(dict(final or {"type": "end", "seq": log.seq})) + b"\n\n"
