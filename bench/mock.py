"""Fast mock of the OpenAI chat-completions endpoint (raw asyncio + uvloop + httptools).

Serves fixed bodies in the real wire format:
  * non-streaming: the JSON chat.completion in fixtures/chat_completion_text.json
  * streaming (request body has "stream": true): the SSE events of
    fixtures/chat_stream_text_with_usage.sse, chunked transfer encoding, one
    HTTP chunk per `data:` event, ending with `data: [DONE]`.

Control endpoints (used by the harness, never by proxies):
  POST /__mock/delay?ms=N   every later response waits N ms (0 = answer at once)
  GET  /__mock/stats        {"requests": n, "streams": n, "delay_ms": n}
  GET  /health              200

Usage: python mock.py --port 18080 [--delay-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal

import httptools
import uvloop

HERE = os.path.dirname(os.path.abspath(__file__))
STREAM_RE = re.compile(rb'"stream"\s*:\s*true')


def _load_bodies() -> tuple[bytes, bytes]:
    with open(os.path.join(HERE, "fixtures", "chat_completion_text.json"), "rb") as f:
        completion = json.dumps(json.load(f), separators=(",", ":")).encode()
    with open(os.path.join(HERE, "fixtures", "chat_stream_text_with_usage.sse"), "rb") as f:
        raw = f.read()
    events = [e.strip() for e in raw.split(b"\n\n") if e.strip()]
    chunks = bytearray()
    for ev in events:
        payload = ev + b"\n\n"
        chunks += b"%x\r\n%s\r\n" % (len(payload), payload)
    chunks += b"0\r\n\r\n"
    json_resp = (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"openai-processing-ms: 1\r\n"
        b"x-request-id: req_mock\r\n"
        b"Connection: keep-alive\r\n\r\n" % len(completion)
    ) + completion
    sse_resp = (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/event-stream; charset=utf-8\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"openai-processing-ms: 1\r\n"
        b"x-request-id: req_mock\r\n"
        b"Connection: keep-alive\r\n\r\n"
    ) + bytes(chunks)
    return json_resp, sse_resp


JSON_RESP, SSE_RESP = _load_bodies()


def _simple(status: str, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
        % (status.encode(), ctype, len(body))
    ) + body


class State:
    delay_s = 0.0
    requests = 0
    streams = 0


class MockProtocol(asyncio.Protocol):
    __slots__ = ("transport", "parser", "url", "method", "body", "loop")

    def __init__(self) -> None:
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body = bytearray()
        self.loop = asyncio.get_event_loop()

    # asyncio callbacks
    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(_simple("400 Bad Request", b'{"error":"bad request"}'))
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        url = self.url
        if method == b"POST" and url.split(b"?", 1)[0].endswith(b"/chat/completions"):
            State.requests += 1
            if STREAM_RE.search(self.body):
                State.streams += 1
                resp = SSE_RESP
            else:
                resp = JSON_RESP
            if State.delay_s > 0:
                self.loop.call_later(State.delay_s, self._send, resp)
            else:
                self.transport.write(resp)
            return
        path = url.split(b"?", 1)[0]
        if path == b"/__mock/delay":
            m = re.search(rb"ms=(\d+)", url)
            State.delay_s = int(m.group(1)) / 1000.0 if m else 0.0
            self.transport.write(_simple("200 OK", b'{"delay_ms":%d}' % int(State.delay_s * 1000)))
        elif path == b"/__mock/stats":
            body = json.dumps(
                {"requests": State.requests, "streams": State.streams, "delay_ms": int(State.delay_s * 1000)}
            ).encode()
            self.transport.write(_simple("200 OK", body))
        elif path in (b"/health", b"/"):
            self.transport.write(_simple("200 OK", b'{"status":"ok"}'))
        else:
            self.transport.write(
                _simple("404 Not Found", b'{"error":{"message":"mock: unknown path","type":"invalid_request_error"}}')
            )

    def _send(self, resp: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(resp)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--delay-ms", type=int, default=0)
    args = ap.parse_args()
    State.delay_s = args.delay_ms / 1000.0
    loop = asyncio.get_running_loop()
    server = await loop.create_server(MockProtocol, args.host, args.port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"mock listening on http://{args.host}:{args.port}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    uvloop.run(main())
