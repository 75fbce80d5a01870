"""EventStreamResponse: pieces ready together go out together, nothing is held back while the stream waits, and a
client that leaves (or a cancel in the middle of a write) closes the stream."""

from __future__ import annotations

import asyncio
from typing import Any

from scillm_core.streaming import EventStreamResponse

SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}


class Client:
    """The ASGI side: records what was sent; ``receive`` answers ``http.disconnect`` once ``leave`` is set."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.leave = asyncio.Event()
        self.write_started = asyncio.Event()
        self.stall_writes = False

    async def send(self, message: dict[str, Any]) -> None:
        if self.stall_writes and message["type"] == "http.response.body":
            self.write_started.set()
            await asyncio.Event().wait()  # a client that does not read: the write waits for room
        self.sent.append(message)

    async def receive(self) -> dict[str, Any]:
        await self.leave.wait()
        return {"type": "http.disconnect"}

    @property
    def bodies(self) -> list[tuple[bytes, bool]]:
        return [(m["body"], m["more_body"]) for m in self.sent if m["type"] == "http.response.body"]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_pieces_ready_together_go_out_as_one_body_message_with_the_end():
    async def main() -> list[tuple[bytes, bool]]:
        async def events():
            for i in range(30):
                yield b"data: %d\n\n" % i

        client = Client()
        await EventStreamResponse(events())(SCOPE, client.receive, client.send)
        assert client.sent[0]["type"] == "http.response.start" and client.sent[0]["status"] == 200
        assert (b"content-type", b"text/event-stream; charset=utf-8") in client.sent[0]["headers"]
        return client.bodies

    assert run(main()) == [(b"".join(b"data: %d\n\n" % i for i in range(30)), False)]


def test_what_is_ready_is_sent_before_the_stream_waits():
    async def main() -> None:
        client = Client()
        more = asyncio.Event()
        sent_before_waiting: list[list[tuple[bytes, bool]]] = []

        async def events():
            yield b"a"
            yield b"b"
            await asyncio.sleep(0)  # a wait: "a" and "b" must be out by now
            sent_before_waiting.append(list(client.bodies))
            await more.wait()
            yield b"c"

        response = asyncio.ensure_future(EventStreamResponse(events())(SCOPE, client.receive, client.send))
        while not sent_before_waiting:
            await asyncio.sleep(0)
        assert sent_before_waiting == [[(b"ab", True)]]
        more.set()
        await response
        assert client.bodies == [(b"ab", True), (b"c", False)]

    run(main())


def test_a_client_that_leaves_closes_the_stream():
    async def main() -> None:
        client = Client()
        closed = asyncio.Event()

        async def events():
            try:
                yield b"first"
                await asyncio.Event().wait()  # an upstream that goes quiet
                yield b"never"
            finally:
                closed.set()

        response = EventStreamResponse(events())
        response.watch_after_s = 0.0
        task = asyncio.ensure_future(response(SCOPE, client.receive, client.send))
        while not client.bodies:
            await asyncio.sleep(0)
        client.leave.set()
        await asyncio.wait_for(task, 5)  # returns normally: nobody is left to answer
        assert closed.is_set() and client.bodies == [(b"first", True)]

    run(main())


def test_a_cancel_while_writing_unwinds_the_waiting_stream():
    async def main() -> None:
        client = Client()
        unwound: list[str] = []

        async def events():
            try:
                yield b"first"
                await asyncio.sleep(0)  # waits: "first" is written now, and that write stalls
                yield b"second"
            except asyncio.CancelledError:
                unwound.append("cancelled where it waited")
                await asyncio.sleep(0)  # cleaning up may wait too
                raise
            finally:
                unwound.append("finally")

        client.stall_writes = True
        task = asyncio.ensure_future(EventStreamResponse(events())(SCOPE, client.receive, client.send))
        await client.write_started.wait()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("the cancel was swallowed")
        assert unwound == ["cancelled where it waited", "finally"]

    run(main())
