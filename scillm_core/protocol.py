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
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["LISTENER", "HeadWithBody", "HttpProtocol"]


class HeadWithBody:
    """The transport of one response until its head is sent: the first write (the head) is held until the next write
    or the next pass of the event loop, whichever comes first; then the response gets its socket's transport back."""

    __slots__ = ("cycle", "head", "loop", "transport")

    def __init__(self, cycle: Any, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.cycle = cycle  # uvicorn's RequestResponseCycle: it writes through ``cycle.transport``
        self.transport = transport
        self.loop = loop
        self.head: bytes | None = None

    def write(self, data: bytes) -> None:
        if self.cycle is None:  # done: only a caller that kept this object gets here
            self.transport.write(data)
        elif self.head is None:
            self.head = data
            self.loop.call_soon(self.flush)
        else:
            self.transport.writelines((self._done(), data))  # one send

    def _done(self) -> bytes:
        """Give the response its transport back (and drop the reference to it); the head held until now."""
        head, self.head = self.head or b"", None
        if self.cycle is not None:
            self.cycle.transport, self.cycle = self.transport, None
        return head

    def flush(self) -> None:
        head = self._done()
        if head and not self.transport.is_closing():  # a client that left is not written to
            self.transport.write(head)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        if name in HeadWithBody.__slots__:  # not set yet (a copy, a half-built object): no recursion
            raise AttributeError(name)
        return getattr(self.transport, name)


MAX_HEAD_BYTES = 1 << 20  # a request line and headers (counted by reads: a read may hold the previous body's end)


def _refusal(status: bytes, code: str, message: str) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code, "param": None}})
    return (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
            % (status, len(body), body))


HEAD_TIMEOUT_RESPONSE = _refusal(b"408 Request Timeout", "request_timeout",
                                 "the request head did not arrive in time; send the request line and headers at once")
HEAD_TOO_LARGE_RESPONSE = _refusal(b"431 Request Header Fields Too Large", "request_header_fields_too_large",
                                   f"the request line and headers exceed {MAX_HEAD_BYTES} bytes")


class HttpProtocol(HttpToolsProtocol):
    head_pending = True  # a request's head has begun (or the connection is new) and is not complete
    head_bytes = 0
    head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_timer = self.loop.call_later(self.timeout_keep_alive, self.head_timeout)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.head_pending:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self.refuse(HEAD_TOO_LARGE_RESPONSE, wait_for_response=False)
            elif self.head_timer is None:
                self.head_timer = self.loop.call_later(self.timeout_keep_alive, self.head_timeout)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_pending = True
        self.head_bytes = 0

    def head_timeout(self) -> None:
        self.head_timer = None
        if self.head_pending:
            self.refuse(HEAD_TIMEOUT_RESPONSE, wait_for_response=True)

    def refuse(self, response: bytes, *, wait_for_response: bool) -> None:
        """Answer a head that cannot be served and close the connection; behind a response still being written
        (pipelining), end the connection after that response, or at once unless ``wait_for_response``."""
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(response)
            self.transport.close()
        elif wait_for_response:
            self.cycle.keep_alive = False
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self.head_pending = False
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not previous:  # a new request (not an upgrade); its task runs from the next pass on
            self.cycle.transport = HeadWithBody(self.cycle, self.transport, self.loop)  # type: ignore[assignment]


LISTENER: dict[str, Any] = {"http": HttpProtocol, "server_header": False}  # how every scillm listener serves HTTP
