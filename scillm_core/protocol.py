"""The HTTP/1.1 server protocol: uvicorn's httptools protocol, with each response head sent together with the start
of its body.

uvicorn writes a response's head when the app sends ``http.response.start`` and its body on ``http.response.body``:
two sends, so the client (or the load balancer in front) is woken twice for a whole small answer, and when it shares
a core with scillm each wake-up can preempt the process serving it. Here the head waits for the first body write of
the same pass of the event loop and goes out with it in one send; a head whose body is not ready in that pass (a
stream waiting for its first chunk) goes out alone at the next pass. After that, the response writes straight to the
socket: nothing is added per stream chunk.

uvicorn bounds the wait between requests (``timeout_keep_alive``) but not the time a request's head takes: a client
that connects and sends nothing, or trickles a header byte now and then, held its connection forever (slowloris).
Here a head must be complete within ``timeout_keep_alive`` of the connection or of its first byte; past that the
client gets a 408 and the connection is closed. The timer is armed only when a head is still incomplete after a
read (a head nearly always arrives in one). Nor did anything bound a head's size (httptools keeps a header's value
until it ends: a 50 MB header was read into memory and answered): past ``MAX_HEAD_BYTES`` the client gets a 431 and
the connection is closed. The body has its own deadline (:mod:`scillm_core.body_deadline`).

A connection closed while its client is still sending (a refused head or body: 431, 408) is closed the way nginx's
``lingering_close`` does it: closing a socket with unread bytes makes the kernel send a reset, and a client still
writing its request then gets an error instead of the answer already sent to it. Here the answer is written, the
write side shut down (the client reads the answer and an end), and what still comes is read and dropped
(:class:`Lingering`) until the client closes, for at most ``LINGER_S`` seconds and ``LINGER_BYTES`` bytes, and at
most ``LINGER_IDLE_S`` without a byte: then the connection is closed whatever the client does. A request answered
before its body was read whole (a 413, a 401) keeps its connection, as uvicorn does: the rest of the body is read and
dropped, within the same bound (it was read for as long as it came, a chunked one forever); past the bound the
connection is closed.

Bytes that are not HTTP (a malformed request line, a bad header, broken chunked framing) were answered by uvicorn
with a 400 and an immediate close: a client still sending got a reset and perhaps never the 400. Here the 400 says
what the parser found and the connection is closed lingering too. Every refusal of a pipelined request's head (the
431, the 408, the 400) behind a response still being written follows that response, then the same lingering close.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["LISTENER", "HeadWithBody", "HttpProtocol"]


class HeadWithBody:
    """The transport of one response until its head is sent: the first write (the head) is held until the next write
    or the next pass of the event loop, whichever comes first; then the response gets its socket's transport back."""

    __slots__ = ("closer", "cycle", "head", "loop", "transport")

    def __init__(self, cycle: Any, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop,
                 close: Callable[[], None] | None = None) -> None:
        self.cycle = cycle  # uvicorn's RequestResponseCycle: it writes through ``cycle.transport``
        self.transport = transport
        self.loop = loop
        self.head: bytes | None = None
        self.closer = close or transport.close  # how the connection ends after a response that closes it

    def write(self, data: bytes) -> None:
        if self.cycle is None:  # done: only a caller that kept this object gets here
            self.transport.write(data)
        elif self.head is None:
            self.head = data
            self.loop.call_soon(self.flush)
        else:
            self.transport.writelines((self._done(), data))  # one send

    def _done(self) -> bytes:
        """Give the response its transport back (and drop the reference to it); the head held until now. A
        response that closes the connection keeps writing through this object, for its close to be ``closer``."""
        head, self.head = self.head or b"", None
        if self.cycle is not None:
            if self.cycle.keep_alive:
                self.cycle.transport = self.transport
            self.cycle = None
        return head

    def flush(self) -> None:
        head = self._done()
        if head and not self.transport.is_closing():  # a client that left is not written to
            self.transport.write(head)

    def close(self) -> None:
        self.flush()
        self.closer()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        if name in HeadWithBody.__slots__:  # not set yet (a copy, a half-built object): no recursion
            raise AttributeError(name)
        return getattr(self.transport, name)


MAX_HEAD_BYTES = 1 << 20  # a request line and headers (counted by reads: a read may hold the previous body's end)
LINGER_S = 30.0  # after answering a request still being sent, read and drop the rest this long at most (nginx's
LINGER_BYTES = 64 << 20  # lingering_time) and this much: a body a little past max_body_mb still gets its 413
LINGER_IDLE_S = 5.0  # and a refused client that goes quiet without closing, this long (nginx's lingering_timeout)


def _refusal(status: bytes, code: str, message: str) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code, "param": None}})
    return (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
            % (status, len(body), body))


HEAD_TIMEOUT_RESPONSE = _refusal(b"408 Request Timeout", "request_timeout",
                                 "the request head did not arrive in time; send the request line and headers at once")
HEAD_TOO_LARGE_RESPONSE = _refusal(b"431 Request Header Fields Too Large", "request_header_fields_too_large",
                                   f"the request line and headers exceed {MAX_HEAD_BYTES} bytes")


def _not_http(reason: str) -> bytes:
    return _refusal(b"400 Bad Request", "invalid_request", f"the request is not valid HTTP: {reason}")


class Lingering(asyncio.Protocol):
    """A connection after its last answer, while the client may still be sending: what comes is dropped until the
    client closes, ``max_bytes`` have come, ``seconds`` have passed or nothing came for ``idle_s``; then it is closed.
    (The write side is already shut down.) The connection's end is reported to the HTTP protocol it replaced."""

    def __init__(self, protocol: HttpProtocol, transport: asyncio.Transport, seconds: float, max_bytes: int,
                 idle_s: float) -> None:
        self.protocol = protocol
        self.transport = transport
        self.left = max_bytes
        self.loop = protocol.loop
        self.deadline = self.loop.time() + seconds
        self.idle_s = idle_s
        self.timer = self._close_when_quiet()

    def _close_when_quiet(self) -> asyncio.TimerHandle:
        """The close after ``idle_s`` without a byte, never past the deadline."""
        return self.loop.call_at(min(self.deadline, self.loop.time() + self.idle_s), self.transport.close)

    def data_received(self, data: bytes) -> None:
        self.left -= len(data)
        if self.left < 0:
            self.transport.close()
            return
        self.timer.cancel()  # heard from: the quiet period starts again
        self.timer = self._close_when_quiet()

    def eof_received(self) -> bool:
        return False  # the client is done: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.protocol.connection_lost(exc)  # which lets go of this object: no reference cycle is left


class HttpProtocol(HttpToolsProtocol):
    head_pending = True  # a request's head has begun (or the connection is new) and is not complete
    head_bytes = 0
    head_timer: asyncio.TimerHandle | None = None
    lingering: Lingering | None = None
    draining: asyncio.TimerHandle | None = None  # an answered request's body is still coming (read and dropped)
    drained = 0
    linger_s = LINGER_S
    linger_bytes = LINGER_BYTES
    linger_idle_s = LINGER_IDLE_S
    not_http = False  # the client's bytes stopped parsing as HTTP: nothing more is read as a request
    last_word = b""  # written before the lingering close (a 400 that waited for the response before it)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_timer = self.loop.call_later(self.timeout_keep_alive, self.head_timeout)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.not_http:
            return
        if self.draining is not None:
            self.drained += len(data)
            if self.drained > self.linger_bytes:
                self.transport.close()
        if self.head_pending:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self.refuse(HEAD_TOO_LARGE_RESPONSE)
            elif self.head_timer is None:
                self.head_timer = self.loop.call_later(self.timeout_keep_alive, self.head_timeout)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_pending = True
        self.head_bytes = 0

    def head_timeout(self) -> None:
        self.head_timer = None
        if self.head_pending:
            self.refuse(HEAD_TIMEOUT_RESPONSE)

    def refuse(self, response: bytes) -> None:
        """Answer a head that cannot be served and close the connection lingering; behind a response still being
        written (pipelining), once that response is sent."""
        if self.transport.is_closing() or self.last_word:
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(response)
            self.close_lingering()
        else:
            self.after_response(self.cycle, response)

    def after_response(self, cycle: Any, answer: bytes) -> None:
        """End the connection with ``answer`` once the response ``cycle`` is writing is sent, through the lingering
        close; nothing more is read meanwhile."""
        cycle.keep_alive = False
        self.last_word = answer
        self.flow.pause_reading()
        if cycle.transport is self.transport:  # its head is sent: its close is still to be the lingering one
            cycle.transport = HeadWithBody(None, self.transport, self.loop, self.close_lingering)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes its parser refused (called while handling the parser's error): a 400 naming
        what was wrong, then the lingering close. In the body of a request being served, its app reads an end and
        what it still sends is dropped (a response already begun is cut off, one already sent is not followed by a
        400); after a response still being written (a pipelined request's head), once that response is sent."""
        self.not_http = True
        answer = _not_http(str(sys.exception() or msg))
        cycle = self.cycle
        if cycle is not None and not self.head_pending and cycle.more_body:  # this request's body
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
            if cycle.response_started:
                answer = b""
        elif cycle is not None and not cycle.response_complete:  # the next request's head: after this response
            self.after_response(cycle, answer)
            return
        self.transport.write(answer)
        self.close_lingering()

    def unread(self) -> bool:
        """Whether the client may still be sending the request being answered: a head has begun and is not
        complete, or the body of the newest request has not all been read (or what came was not HTTP)."""
        if self.not_http:
            return True
        if self.head_pending:
            return self.head_bytes > 0
        return self.cycle is not None and self.cycle.more_body

    def close_lingering(self) -> None:
        """Close the connection after its last answer; while the client may still be sending, shut the write side
        down and drop what comes for a bounded time and size first (:class:`Lingering`)."""
        transport = self.transport
        if transport.is_closing() or self.lingering is not None:
            return
        if self.last_word:
            transport.write(self.last_word)
        if not self.unread():
            transport.close()
            return
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        if transport.can_write_eof():
            transport.write_eof()  # after what is buffered: the client reads the answer, then an end
        self.lingering = Lingering(self, transport, self.linger_s, self.linger_bytes, self.linger_idle_s)
        transport.set_protocol(self.lingering)
        self.flow.resume_reading()  # reading may have been paused for a body nobody read

    def on_response_complete(self) -> None:
        if self.lingering is not None:
            self.server_state.total_requests += 1
            return
        cycle = self.cycle
        if cycle.response_complete and cycle.more_body and not self.transport.is_closing():
            # answered before its body was read whole (a 413, a 401): uvicorn drops the rest; within the bound
            self.drained = 0
            self.draining = self.loop.call_later(self.linger_s, self.transport.close)
        super().on_response_complete()

    def on_message_complete(self) -> None:
        if self.draining is not None:  # the dropped body ended in time: the connection waits for the next request
            self.draining.cancel()
            self.draining = None
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        if self.draining is not None:
            self.draining.cancel()
            self.draining = None
        self.lingering = None
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self.head_pending = False
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not previous:  # a new request (not an upgrade); its task runs from the next pass on
            self.cycle.transport = HeadWithBody(  # type: ignore[assignment]
                self.cycle, self.transport, self.loop, self.close_lingering)


LISTENER: dict[str, Any] = {"http": HttpProtocol, "server_header": False}  # how every scillm listener serves HTTP
