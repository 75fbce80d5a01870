"""The server protocol sends a response's head with the start of its body (scillm_core/protocol.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import uvicorn

from scillm_core import cli
from scillm_core.protocol import HeadWithBody, HttpProtocol

pytestmark = pytest.mark.anyio

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Recorder:
    """A transport that records each send: ``write`` and ``writelines`` are one send each."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sends.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        self.sends.append(b"".join(chunks))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


async def next_pass() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def held(sent: Recorder) -> tuple[SimpleNamespace, HeadWithBody]:
    """A response (uvicorn's cycle writes through its ``transport``) whose head is held by a ``HeadWithBody``."""
    cycle = SimpleNamespace(keep_alive=True)
    cycle.transport = HeadWithBody(cycle, sent, asyncio.get_running_loop())  # type: ignore[arg-type]
    return cycle, cycle.transport


async def test_a_head_and_its_body_are_one_send_then_the_response_writes_to_its_socket() -> None:
    sent = Recorder()
    cycle, transport = held(sent)
    transport.write(HEAD)
    assert sent.sends == []
    transport.write(b"ok")
    assert sent.sends == [HEAD + b"ok"]
    assert cycle.transport is sent and transport.cycle is None  # no reference cycle left for the collector
    await next_pass()
    assert sent.sends == [HEAD + b"ok"]  # the pass that follows sends nothing more


async def test_a_head_whose_body_is_not_ready_goes_out_at_the_next_pass() -> None:
    sent = Recorder()
    cycle, transport = held(sent)
    transport.write(HEAD)
    await next_pass()
    assert sent.sends == [HEAD] and cycle.transport is sent
    cycle.transport.write(b"ok")
    assert sent.sends == [HEAD, b"ok"]


async def test_closing_sends_a_held_head_first() -> None:
    sent = Recorder()
    _, transport = held(sent)
    transport.write(HEAD)
    transport.close()
    assert sent.sends == [HEAD] and sent.closed
    await next_pass()
    assert sent.sends == [HEAD]


async def test_a_body_that_looks_like_a_head_is_still_sent_in_order() -> None:
    sent = Recorder()
    _, transport = held(sent)
    transport.write(HEAD)
    transport.write(b"HTTP/1.1 is a protocol")
    transport.write(b"HTTP/1.0 too")  # a caller that kept the holder: written straight through
    await next_pass()
    assert b"".join(sent.sends) == HEAD + b"HTTP/1.1 is a protocol" + b"HTTP/1.0 too"


async def test_a_client_that_left_is_not_written_to() -> None:
    sent = Recorder()
    cycle, transport = held(sent)
    transport.write(HEAD)
    sent.closed = True  # the connection was lost meanwhile
    await next_pass()
    assert sent.sends == [] and cycle.transport is sent


# The protocol in a real uvicorn server, with what it sends on the socket recorded underneath.

SENDS: list[bytes] = []


class Recording:
    """The socket's transport, with each send recorded in ``SENDS``."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def write(self, data: bytes) -> None:
        SENDS.append(bytes(data))
        self.transport.write(data)

    def writelines(self, chunks: Any) -> None:
        chunks = list(chunks)
        SENDS.append(b"".join(chunks))
        self.transport.writelines(chunks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class RecordedProtocol(HttpProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(Recording(transport))  # type: ignore[arg-type]


ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(app: ASGIApp, timeout_keep_alive: float = 5, protocol: type[HttpProtocol] = RecordedProtocol
                  ) -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, http=protocol,
                            timeout_keep_alive=timeout_keep_alive)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    SENDS.clear()
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head, await reader.readexactly(length)


async def answer(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


async def test_each_answer_is_one_send_on_a_kept_alive_connection() -> None:
    async with serving(answer) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):
            writer.write(b"POST /v1/x HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\n{}")
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 OK") and body == b'{"ok":true}'
        writer.close()
    assert len(SENDS) == 3 and all(s.startswith(b"HTTP/1.1 200 OK") and s.endswith(b'{"ok":true}') for s in SENDS)


async def test_a_stream_sends_its_head_before_its_first_chunk_is_ready() -> None:
    head_seen = asyncio.Event()

    async def stream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await head_seen.wait()  # the first chunk waits for the client to have the head
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async with serving(stream) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /s HTTP/1.1\r\nhost: a\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        head_seen.set()
        assert b"transfer-encoding: chunked" in head
        assert await reader.readuntil(b"0\r\n\r\n") == b"9\r\ndata: 1\n\n\r\n0\r\n\r\n"
        writer.close()


async def test_pipelined_requests_are_answered_in_order_one_send_each() -> None:
    async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = (await receive())["body"]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async with serving(echo) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"".join(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\n\r\n" + bytes([c]) for c in b"abc"))
        assert [(await read_response(reader))[1] for _ in range(3)] == [b"a", b"b", b"c"]
        writer.close()
    assert len(SENDS) == 3


async def test_a_client_expecting_100_continue_gets_it_then_the_answer() -> None:
    async with serving(answer) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"{}")
        head, body = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200 OK") and body == b'{"ok":true}'
        writer.close()


async def test_a_head_request_gets_a_head_alone() -> None:
    async with serving(answer) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"HEAD / HTTP/1.1\r\nhost: a\r\n\r\nHEAD / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        received = await asyncio.wait_for(reader.read(), 30)  # both heads, no body, then the end of the connection
        assert received.count(b"HTTP/1.1 200 OK") == 2 and b'{"ok"' not in received
        writer.close()


async def test_an_app_that_fails_after_its_head_closes_the_connection() -> None:
    async def fails(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        raise RuntimeError("boom")

    async with serving(fails) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /f HTTP/1.1\r\nhost: a\r\n\r\n")
        received = await asyncio.wait_for(reader.read(), 30)  # the head, then the end of the connection
        assert received.startswith(b"HTTP/1.1 200 OK") and received.endswith(b"\r\n\r\n")
        writer.close()


def test_scillm_serves_with_this_protocol(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: seen.update(options))
    monkeypatch.setattr(cli, "tune_gc", lambda: None)
    monkeypatch.setenv("SCILLM_DATA_DIR", str(tmp_path))
    assert cli.main(["serve", "--port", "4999"]) == 0
    assert seen["http"] is HttpProtocol and seen["server_header"] is False


# A request's head must arrive within timeout_keep_alive (made small here; nothing asserts how long anything took).

async def test_a_connection_that_sends_nothing_gets_a_408_and_is_closed() -> None:
    async with serving(answer, timeout_keep_alive=0.2) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        received = await asyncio.wait_for(reader.read(), 30)  # the 408, then the end of the connection
        writer.close()
    assert received.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in received


async def test_a_head_trickled_byte_by_byte_is_cut_off_while_whole_requests_are_answered() -> None:
    async with serving(answer, timeout_keep_alive=0.2) as port:
        slow_reader, slow = await asyncio.open_connection("127.0.0.1", port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        slow.write(b"POST /v1/x HTTP/1.1\r\n")
        received = b""
        for byte in b"x-header-that-never-ends: " * 100:
            writer.write(b"POST /v1/x HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\n{}")
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 OK") and body == b'{"ok":true}'
            slow.write(bytes([byte]))
            try:
                received = await asyncio.wait_for(slow_reader.read(), 0.02)
                break
            except TimeoutError:
                continue
        slow.close()
        writer.close()
    assert received.startswith(b"HTTP/1.1 408")


async def test_a_kept_alive_connection_whose_next_head_stalls_is_closed() -> None:
    async with serving(answer, timeout_keep_alive=0.2) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/x HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\n{}")
        assert (await read_response(reader))[0].startswith(b"HTTP/1.1 200 OK")
        writer.write(b"POST /v1/x HTTP/1.1\r\nhost: a\r\n")  # the next head begins, and stops
        received = await asyncio.wait_for(reader.read(), 30)
        writer.close()
    assert received.startswith(b"HTTP/1.1 408")


async def test_a_head_past_max_head_bytes_is_a_431_and_the_connection_is_closed() -> None:
    from scillm_core.protocol import MAX_HEAD_BYTES

    async with serving(answer) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * (MAX_HEAD_BYTES + 65536))  # never ends
        received = await asyncio.wait_for(reader.read(), 30)  # the 431, then the end of the connection
        writer.close()
    assert received.startswith(b"HTTP/1.1 431") and b"request_header_fields_too_large" in received


async def test_a_head_that_keeps_coming_is_cut_off_near_max_head_bytes() -> None:
    from scillm_core.protocol import LINGER_BYTES, MAX_HEAD_BYTES

    bound = MAX_HEAD_BYTES + LINGER_BYTES  # the head, then what is dropped after the 431
    async with serving(answer) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: a\r\nx-big: ")
        sent = 0
        with contextlib.suppress(ConnectionError):  # the server closes (a reset: it leaves the rest unread)
            while sent <= 4 * bound:
                writer.write(b"a" * 65536)
                sent += 65536
                await writer.drain()
        writer.close()
    assert sent < bound + (16 << 20)  # it stopped reading (socket buffers aside), where a 50 MB header was read whole


async def test_a_large_but_bounded_head_is_served() -> None:
    async with serving(answer) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):  # kept alive: the count starts again with each request
            writer.write(b"POST / HTTP/1.1\r\nhost: a\r\ncookie: " + b"c" * 200_000
                         + b"\r\ncontent-length: 2\r\n\r\n{}")
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 OK") and body == b'{"ok":true}'
        writer.close()


# A connection closed while its client is still sending: the answer, the write side shut down, what still comes
# read and dropped (nginx's lingering_close), within LINGER_S and LINGER_BYTES (made small here where it matters).

class TinyLinger(RecordedProtocol):
    linger_bytes = 256 * 1024


class ShortLinger(RecordedProtocol):
    linger_s = 0.05


class QuietLinger(RecordedProtocol):
    linger_s = 3600.0  # only the quiet period can end it
    linger_idle_s = 0.05


async def answer_413_unread(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An answer given before the body is read (as for a declared content-length past the limit)."""
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"15")]})
    await send({"type": "http.response.body", "body": b'{"error":"big"}'})


async def read_to_end(reader: asyncio.StreamReader) -> tuple[bytes, bytes, bytes]:
    """The answer's head and body, then what follows it until the end of the connection (b"": a clean end)."""
    head, body = await read_response(reader)
    return head, body, await reader.read()


async def write_all(writer: asyncio.StreamWriter, size: int, chunk: int = 65536) -> None:
    """Write ``size`` bytes the way an HTTP client writes a request: all of it before reading the answer."""
    for _ in range(0, size, chunk):
        writer.write(b"a" * chunk)
        await writer.drain()


async def test_a_client_still_sending_a_too_large_head_reads_the_whole_431() -> None:
    from scillm_core.protocol import MAX_HEAD_BYTES

    async with serving(answer) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: a\r\nx-big: ")
        await write_all(writer, MAX_HEAD_BYTES + (4 << 20))  # went on well past the refusal: no reset
        head, body, after = await asyncio.wait_for(read_to_end(reader), 30)
        writer.close()
    assert head.startswith(b"HTTP/1.1 431") and b"request_header_fields_too_large" in body and after == b""


async def test_a_client_still_trickling_its_head_reads_the_whole_408() -> None:
    async with serving(answer, timeout_keep_alive=0.2) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/x HTTP/1.1\r\n")
        waiting = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
        while not waiting.done():  # a header byte now and then until the refusal arrives
            writer.write(b"x")
            await writer.drain()
            await asyncio.wait([waiting], timeout=0.01)
        await write_all(writer, 1 << 20)  # and more after it
        head = waiting.result()
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await asyncio.wait_for(reader.readexactly(length), 30)
        after = await asyncio.wait_for(reader.read(), 30)
        writer.close()
    assert head.startswith(b"HTTP/1.1 408") and b"request_timeout" in body and after == b""


async def test_a_body_answered_before_it_was_read_is_dropped_and_the_connection_kept() -> None:
    async with serving(answer_413_unread) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/x HTTP/1.1\r\nhost: a\r\ncontent-length: 4194304\r\n\r\n")
        await write_all(writer, 4 << 20)
        head, body = await asyncio.wait_for(read_response(reader), 30)
        writer.write(b"POST /v1/x HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\n{}")  # the next request
        again = await asyncio.wait_for(read_response(reader), 30)
        writer.close()
    assert head.startswith(b"HTTP/1.1 413") and body == b'{"error":"big"}' and again[0].startswith(b"HTTP/1.1 413")


async def keep_sending(writer: asyncio.StreamWriter, *, chunk: int, pause: float = 0.0, chunked: bool = False
                       ) -> int:
    """Send until the server ends the connection (``chunked``: as chunks of a body); how much was sent."""
    sent = 0
    data = b"%x\r\n%s\r\n" % (chunk, b"a" * chunk) if chunked else b"a" * chunk
    with contextlib.suppress(ConnectionError):
        while True:
            writer.write(data)
            sent += chunk
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
            if writer.is_closing():
                break
    return sent


async def test_a_client_that_never_stops_sending_is_cut_off_by_the_byte_bound() -> None:
    from scillm_core.protocol import LINGER_BYTES, MAX_HEAD_BYTES

    async with serving(answer, protocol=TinyLinger) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: a\r\nx-big: ")
        sent = await asyncio.wait_for(keep_sending(writer, chunk=65536), 60)
        writer.close()
    assert sent < MAX_HEAD_BYTES + LINGER_BYTES  # ended near MAX_HEAD_BYTES + TinyLinger.linger_bytes


async def test_a_body_that_never_ends_after_its_answer_is_cut_off_by_the_byte_bound() -> None:
    from scillm_core.protocol import LINGER_BYTES

    async with serving(answer_413_unread, protocol=TinyLinger) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n")
        sent = await asyncio.wait_for(keep_sending(writer, chunk=65536, chunked=True), 60)  # was read forever
        writer.close()
    assert sent < LINGER_BYTES  # ended near TinyLinger.linger_bytes (socket buffers aside)


async def test_a_body_trickled_after_its_answer_is_cut_off_by_the_time_bound() -> None:
    async with serving(answer_413_unread, protocol=ShortLinger) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n")
        head, _ = await asyncio.wait_for(read_response(reader), 30)
        sent = await asyncio.wait_for(keep_sending(writer, chunk=1, pause=0.01, chunked=True), 60)  # forever
        writer.close()
    assert head.startswith(b"HTTP/1.1 413") and sent > 0


async def test_a_client_trickling_after_the_refusal_is_cut_off_by_the_time_bound() -> None:
    from scillm_core.protocol import MAX_HEAD_BYTES

    async with serving(answer, protocol=ShortLinger) as port:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: a\r\nx-big: ")
        await write_all(writer, MAX_HEAD_BYTES + 65536)
        sent = await asyncio.wait_for(keep_sending(writer, chunk=1, pause=0.01), 60)  # a byte now and then, forever
        writer.close()
    assert sent > 0


def test_on_uvloop_as_served_a_client_still_sending_reads_its_431_and_its_413() -> None:
    import uvloop

    uvloop.run(test_a_client_still_sending_a_too_large_head_reads_the_whole_431())
    uvloop.run(test_a_body_answered_before_it_was_read_is_dropped_and_the_connection_kept())


async def test_a_refused_client_that_goes_quiet_without_closing_is_let_go() -> None:
    """After its 431 the client neither sends nor closes: the connection ends after the quiet period (nginx's
    lingering_timeout), not after the whole lingering time."""
    from scillm_core.protocol import MAX_HEAD_BYTES

    async with serving(answer, protocol=QuietLinger) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: a\r\nx-big: ")
        await write_all(writer, MAX_HEAD_BYTES + 65536)
        head, _, after = await asyncio.wait_for(read_to_end(reader), 60)  # the end arrives: the write side shut
        await asyncio.wait_for(keep_sending(writer, chunk=1, pause=0.2), 60)  # quiet between bytes: then reset
        writer.close()
    assert head.startswith(b"HTTP/1.1 431") and after == b""


# Bytes that are not HTTP: uvicorn's parser refuses them with a 400, which goes out through the same lingering close.

async def test_a_malformed_request_followed_by_a_large_body_reads_a_whole_400_saying_what_was_wrong() -> None:
    async with serving(answer) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"G\x01T / HTTP/1.1\r\nhost: a\r\ncontent-length: 8388608\r\n\r\n")
        await write_all(writer, 8 << 20)  # went on well past the refusal: no reset
        head, body, after = await asyncio.wait_for(read_to_end(reader), 30)
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # the server still serves others
        writer.write(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\n{}")
        other = await asyncio.wait_for(read_response(reader), 30)
        writer.close()
    error = orjson.loads(body)["error"]
    assert head.startswith(b"HTTP/1.1 400") and after == b""
    assert error["code"] == "invalid_request" and "Invalid method" in error["message"]
    assert other == (other[0], b'{"ok":true}') and other[0].startswith(b"HTTP/1.1 200")


async def test_a_bad_header_is_a_400_naming_it() -> None:
    async with serving(answer) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nhost: a\r\nbad header: x\r\ncontent-length: 4194304\r\n\r\n")
        await write_all(writer, 4 << 20)
        head, body, after = await asyncio.wait_for(read_to_end(reader), 30)
        writer.close()
    assert head.startswith(b"HTTP/1.1 400") and b"Invalid header" in body and after == b""


async def test_broken_chunked_framing_is_a_400_and_the_app_reading_the_body_reads_an_end() -> None:
    received: list[dict[str, Any]] = []

    async def reads_the_body(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while not received or received[-1].get("more_body"):
            received.append(await receive())
        await answer(scope, receive, send)  # dropped: the client already has its 400

    async with serving(reads_the_body) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n4\r\nabcd\r\n")
        await writer.drain()
        while not received:
            await asyncio.sleep(0.01)
        writer.write(b"zz\r\n")  # not a chunk size
        await write_all(writer, 4 << 20)
        head, body, after = await asyncio.wait_for(read_to_end(reader), 30)
        writer.close()
    assert head.startswith(b"HTTP/1.1 400") and b"chunk size" in body and after == b""
    assert received[0] == {"type": "http.request", "body": b"abcd", "more_body": True}
    assert received[-1] == {"type": "http.disconnect"}


def answer_held_until(release: asyncio.Event) -> Any:
    """An app that sends its answer's head at once and its body (``{"ok":true}``, 11 bytes) once ``release`` is set:
    a response still being written while the client pipelines the next request."""

    async def slow(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"11")]})
        await release.wait()
        await send({"type": "http.response.body", "body": b'{"ok":true}'})

    return slow


async def test_a_malformed_request_pipelined_behind_one_being_answered_gets_its_400_after_that_answer() -> None:
    release = asyncio.Event()

    async with serving(answer_held_until(release)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\n{}G\x01T / HTTP/1.1\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)  # the answer has begun (its head sent)
        release.set()
        rest = await asyncio.wait_for(reader.readexactly(11), 30)
        head, body, after = await asyncio.wait_for(read_to_end(reader), 30)
        writer.close()
    assert first.startswith(b"HTTP/1.1 200") and rest == b'{"ok":true}'
    assert head.startswith(b"HTTP/1.1 400") and b"Invalid method" in body and after == b""


def test_on_uvloop_as_served_a_client_still_sending_after_bytes_that_are_not_http_reads_its_400() -> None:
    import uvloop

    uvloop.run(test_a_malformed_request_followed_by_a_large_body_reads_a_whole_400_saying_what_was_wrong())
    uvloop.run(test_broken_chunked_framing_is_a_400_and_the_app_reading_the_body_reads_an_end())


class NoticedHeadTimeout(RecordedProtocol):
    timed_out: asyncio.Event | None = None

    def head_timeout(self) -> None:
        super().head_timeout()
        if NoticedHeadTimeout.timed_out is not None:
            NoticedHeadTimeout.timed_out.set()


async def test_a_stalled_head_pipelined_behind_one_being_answered_gets_its_408_after_that_answer() -> None:
    """The 408 of a pipelined head that stalled while the response before it was being written follows that
    response, and the connection closes lingering: the client, still sending, reads both and a clean end."""
    release = asyncio.Event()
    NoticedHeadTimeout.timed_out = timed_out = asyncio.Event()

    async with serving(answer_held_until(release), timeout_keep_alive=0.2, protocol=NoticedHeadTimeout) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\n{}POST / HTTP/1.1\r\nhost: a\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)  # the answer has begun (its head sent)
        await asyncio.wait_for(timed_out.wait(), 30)  # the next head did not come in time
        writer.write(b"x-still-coming: " + b"a" * 65536)  # the client goes on sending it
        await writer.drain()
        release.set()
        rest = await asyncio.wait_for(reader.readexactly(11), 30)
        head, body, after = await asyncio.wait_for(read_to_end(reader), 30)
        writer.close()
    assert first.startswith(b"HTTP/1.1 200") and rest == b'{"ok":true}'
    assert head.startswith(b"HTTP/1.1 408") and b"request_timeout" in body and after == b""


def test_on_uvloop_a_stalled_pipelined_head_gets_its_408_after_the_answer_before_it() -> None:
    import uvloop

    uvloop.run(test_a_stalled_head_pipelined_behind_one_being_answered_gets_its_408_after_that_answer())
