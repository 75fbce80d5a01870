"""Fast mock of the OpenAI chat-completions and Anthropic Messages endpoints (raw asyncio + uvloop + httptools).

Serves fixed bodies in the real wire format:
  POST .../chat/completions (OpenAI):
  * non-streaming: the JSON chat.completion in fixtures/chat_completion_text.json
  * streaming (request body has "stream": true): the SSE events of
    fixtures/chat_stream_text_with_usage.sse, chunked transfer encoding, one
    HTTP chunk per `data:` event, ending with `data: [DONE]`.
  POST .../v1/messages (Anthropic):
  * non-streaming: the Message in fixtures/messages_text.json (same text as the OpenAI body)
  * streaming: `event: ...\ndata: ...` events, one HTTP chunk each. Default (`--anthropic-stream matched`):
    the envelope of the recorded claude-sonnet-4-5 stream fixtures/messages_stream_text_sonnet45.sse
    (message_start, content_block_start, ping, ..., content_block_stop, message_delta, message_stop, with
    its padded JSON) but with one text_delta per content delta of the OpenAI stream (30), so both
    upstreams deliver the same text in the same number of pieces. `--anthropic-stream recorded`: the
    recorded file as is (4 text deltas).

Control endpoints (used by the harness, never by proxies):
  POST /__mock/delay?ms=N   every later response waits N ms (0 = answer at once)
  GET  /__mock/stats        {"requests": n, "streams": n, "messages": n, "delay_ms": n, "pending_max": n}
                            (pending_max: most delayed answers waiting at once = upstream calls in flight;
                            `?reset=1` restarts it after answering)
  GET  /health              200
  POST /v1/traces           200, an empty OTLP ExportTraceServiceResponse (a local trace collector for the
                            scillm-tracing row; counts exports and bytes, decodes nothing)

Usage: python mock.py --port 18080 [--delay-ms 0] [--anthropic-stream matched|recorded]
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


def _chunked(events: list[bytes]) -> bytes:
    chunks = bytearray()
    for ev in events:
        payload = ev + b"\n\n"
        chunks += b"%x\r\n%s\r\n" % (len(payload), payload)
    chunks += b"0\r\n\r\n"
    return bytes(chunks)


def _openai_events() -> list[bytes]:
    with open(os.path.join(HERE, "fixtures", "chat_stream_text_with_usage.sse"), "rb") as f:
        raw = f.read()
    return [e.strip() for e in raw.split(b"\n\n") if e.strip()]


def _load_bodies() -> tuple[bytes, bytes]:
    with open(os.path.join(HERE, "fixtures", "chat_completion_text.json"), "rb") as f:
        completion = json.dumps(json.load(f), separators=(",", ":")).encode()
    chunks = _chunked(_openai_events())
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
    ) + chunks
    return json_resp, sse_resp


def _load_anthropic(stream_kind: str) -> tuple[bytes, bytes, int]:
    """(JSON response, SSE response, number of SSE events) for POST /v1/messages."""
    with open(os.path.join(HERE, "fixtures", "messages_text.json"), "rb") as f:
        message = json.dumps(json.load(f), separators=(",", ":")).encode()
    with open(os.path.join(HERE, "fixtures", "messages_stream_text_sonnet45.sse"), "rb") as f:
        events = [e.strip() for e in f.read().split(b"\n\n") if e.strip()]
    if stream_kind == "matched":
        texts = []
        for ev in _openai_events():
            if not ev.startswith(b"data: {"):
                continue
            choices = json.loads(ev[6:]).get("choices") or []
            content = choices[0].get("delta", {}).get("content") if choices else None
            if content:
                texts.append(content)
        deltas = [b"event: content_block_delta\ndata: "
                  + json.dumps({"type": "content_block_delta", "index": 0,
                                "delta": {"type": "text_delta", "text": t}}, separators=(",", ":")).encode()
                  for t in texts]
        first = next(i for i, e in enumerate(events) if e.startswith(b"event: content_block_delta"))
        rest = [e for e in events[first:] if not e.startswith(b"event: content_block_delta")]
        events = events[:first] + deltas + rest
    hdr = (b"request-id: req_mock\r\n"
           b"anthropic-organization-id: 00000000-0000-0000-0000-000000000000\r\n"
           b"Connection: keep-alive\r\n")
    json_resp = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                 % len(message)) + hdr + b"\r\n" + message
    sse_resp = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
                b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n") + hdr + b"\r\n" + _chunked(events)
    return json_resp, sse_resp, len(events)


JSON_RESP, SSE_RESP = _load_bodies()
ANTH_JSON_RESP, ANTH_SSE_RESP = b"", b""  # set in main() from --anthropic-stream


def _simple(status: str, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
        % (status.encode(), ctype, len(body))
    ) + body


class State:
    delay_s = 0.0
    requests = 0
    streams = 0
    messages = 0  # of `requests`, how many were POST /v1/messages
    pending = 0  # delayed answers not yet sent
    pending_max = 0  # most delayed answers pending at once since the last GET /__mock/stats?reset=1
    otlp_exports = 0  # POST /v1/traces received
    otlp_bytes = 0


class MockProtocol(asyncio.Protocol):
    __slots__ = ("body", "loop", "method", "parser", "transport", "url")

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
        path = url.split(b"?", 1)[0]
        is_chat = path.endswith(b"/chat/completions")
        if method == b"POST" and (is_chat or path.endswith(b"/v1/messages")):
            State.requests += 1
            if not is_chat:
                State.messages += 1
            if STREAM_RE.search(self.body):
                State.streams += 1
                resp = SSE_RESP if is_chat else ANTH_SSE_RESP
            else:
                resp = JSON_RESP if is_chat else ANTH_JSON_RESP
            if State.delay_s > 0:
                State.pending += 1
                if State.pending > State.pending_max:
                    State.pending_max = State.pending
                self.loop.call_later(State.delay_s, self._send, resp)
            else:
                self.transport.write(resp)
            return
        if method == b"POST" and path == b"/v1/traces":
            State.otlp_exports += 1
            State.otlp_bytes += len(self.body)
            self.transport.write(_simple("200 OK", b"", b"application/x-protobuf"))
            return
        if path == b"/__mock/delay":
            m = re.search(rb"ms=(\d+)", url)
            State.delay_s = int(m.group(1)) / 1000.0 if m else 0.0
            self.transport.write(_simple("200 OK", b'{"delay_ms":%d}' % int(State.delay_s * 1000)))
        elif path == b"/__mock/stats":
            body = json.dumps(
                {"requests": State.requests, "streams": State.streams, "messages": State.messages,
                 "delay_ms": int(State.delay_s * 1000), "pending_max": State.pending_max,
                 "otlp_exports": State.otlp_exports, "otlp_bytes": State.otlp_bytes}
            ).encode()
            if b"reset=1" in url:
                State.pending_max = State.pending
            self.transport.write(_simple("200 OK", body))
        elif path in (b"/health", b"/"):
            self.transport.write(_simple("200 OK", b'{"status":"ok"}'))
        else:
            self.transport.write(
                _simple("404 Not Found", b'{"error":{"message":"mock: unknown path","type":"invalid_request_error"}}')
            )

    def _send(self, resp: bytes) -> None:
        State.pending -= 1
        if not self.transport.is_closing():
            self.transport.write(resp)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--delay-ms", type=int, default=0)
    ap.add_argument("--anthropic-stream", choices=("matched", "recorded"), default="matched")
    args = ap.parse_args()
    State.delay_s = args.delay_ms / 1000.0
    global ANTH_JSON_RESP, ANTH_SSE_RESP
    ANTH_JSON_RESP, ANTH_SSE_RESP, n_events = _load_anthropic(args.anthropic_stream)
    print(f"anthropic stream: {args.anthropic_stream}, {n_events} events", flush=True)
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
