"""The HTTP/1.1 server protocol: uvicorn's httptools protocol, with each response head sent together with the start
of its body.

uvicorn writes a response's head when the app sends ``http.response.start`` and its body on ``http.response.body``:
two sends, so the client (or the load balancer in front) is woken twice for a whole small answer, and when it shares
a core with scillm each wake-up can preempt the process serving it. Here the head waits for the first body write of
the same pass of the event loop and goes out with it in one send; a head whose body is not ready in that pass (a
stream waiting for its first chunk) goes out alone at the next pass. After that, the response writes straight to the
socket: nothing is added per stream chunk.
"""

from __future__ import annotations

import asyncio
from typing import Any

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


class HttpProtocol(HttpToolsProtocol):
    def on_headers_complete(self) -> None:
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not previous:  # a new request (not an upgrade); its task runs from the next pass on
            self.cycle.transport = HeadWithBody(self.cycle, self.transport, self.loop)  # type: ignore[assignment]


LISTENER: dict[str, Any] = {"http": HttpProtocol, "server_header": False}  # how every scillm listener serves HTTP
