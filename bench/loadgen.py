"""Cheap closed-loop HTTP/1.1 load generator (raw asyncio protocol + httptools).

`concurrency` keep-alive connections each send one request, wait for the full
response, and send the next, until `duration` seconds have passed or
`max_requests` were started. Per request it records the latency (request
written -> response complete) and the time to first body byte (TTFB; for an
SSE stream that is the first event reaching the client).

A request counts as OK only if the status is 200 and the body looks right
(non-streaming: contains "choices"; streaming: contains "data: [DONE]").
Everything else is an error (by status / kind); no answer within `timeout`
seconds is a timeout.

Usable as a library (`await run_load(...)`) or standalone:
  python loadgen.py --url http://127.0.0.1:4001/v1/chat/completions -c 64 -d 10 [--stream]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from urllib.parse import urlsplit

import httptools

perf = time.perf_counter


class _Conn(asyncio.Protocol):
    def __init__(self, on_lost):
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.fut: asyncio.Future | None = None
        self.t_first = 0.0
        self.body = bytearray()
        self.tail = b""
        self.keep = True
        self.closed = False
        self.stream_mode = False
        self._on_lost = on_lost

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(ConnectionError("connection lost"))

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except Exception as e:  # parser error
            if self.fut is not None and not self.fut.done():
                self.fut.set_exception(e)
            self.transport.close()

    def on_message_begin(self):
        self.body = bytearray()
        self.tail = b""
        self.t_first = 0.0

    def on_body(self, data):
        if not self.t_first:
            self.t_first = perf()
        if self.stream_mode:
            # keep only the tail: enough to see "data: [DONE]"
            self.tail = (self.tail + data)[-64:]
        else:
            self.body += data

    def on_message_complete(self):
        self.keep = self.parser.should_keep_alive()
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(self.parser.get_status_code())

    def request(self, raw: bytes, loop) -> asyncio.Future:
        self.fut = loop.create_future()
        self.transport.write(raw)
        return self.fut


def _pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, round(p / 100.0 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


def build_request(url: str, headers: dict[str, str], body: bytes) -> tuple[str, int, bytes]:
    u = urlsplit(url)
    host, port = u.hostname, u.port or 80
    path = u.path + (("?" + u.query) if u.query else "")
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Accept: */*"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    return host, port, raw


async def run_load(url: str, headers: dict[str, str], body: bytes, *, concurrency: int, duration: float,
                   max_requests: int | None = None, stream: bool = False, timeout: float = 30.0,
                   messages: bool = False) -> dict:
    """``messages``: the body is an Anthropic Messages request, and a right answer ends with ``message_stop``
    (stream) or holds ``"content"``."""
    loop = asyncio.get_running_loop()
    host, port, raw = build_request(url, headers, body)
    lat: list[float] = []
    ttfb: list[float] = []
    errors: Counter = Counter()
    state = {"started": 0, "timeouts": 0}
    if messages:
        expect = b"message_stop" if stream else b'"content"'
    else:
        expect = b"[DONE]" if stream else b'"choices"'
    t_start = perf()
    deadline = t_start + duration

    async def connect():
        _, proto = await loop.create_connection(lambda: _Conn(None), host, port)
        proto.stream_mode = stream
        return proto

    async def worker():
        conn = None
        while perf() < deadline and (max_requests is None or state["started"] < max_requests):
            state["started"] += 1
            try:
                if conn is None or conn.closed or not conn.keep:
                    if conn is not None and not conn.closed:
                        conn.transport.close()
                    conn = await connect()
            except OSError as e:
                errors[f"connect:{type(e).__name__}"] += 1
                conn = None
                await asyncio.sleep(0.05)
                continue
            t0 = perf()
            fut = conn.request(raw, loop)
            th = loop.call_later(timeout, lambda f=fut: (not f.done()) and f.set_exception(TimeoutError()))
            try:
                status = await fut
            except TimeoutError:
                state["timeouts"] += 1
                conn.transport.close()
                conn = None
                continue
            except Exception as e:
                errors[f"conn:{type(e).__name__}"] += 1
                if conn is not None and not conn.closed:
                    conn.transport.close()
                conn = None
                continue
            finally:
                th.cancel()
            t1 = perf()
            if status != 200:
                errors[f"http_{status}"] += 1
                continue
            got = conn.tail if stream else conn.body
            if expect not in got:
                errors["bad_body"] += 1
                continue
            lat.append(t1 - t0)
            if conn.t_first:
                ttfb.append(conn.t_first - t0)
        if conn is not None and not conn.closed:
            conn.transport.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = perf() - t_start
    lat.sort()
    ttfb.sort()
    ms = lambda v: None if v is None else round(v * 1000.0, 3)  # noqa: E731
    return {
        "concurrency": concurrency,
        "stream": stream,
        "elapsed_s": round(elapsed, 3),
        "ok": len(lat),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "timeouts": state["timeouts"],
        "rps": round(len(lat) / elapsed, 2) if elapsed > 0 else 0.0,
        "p50_ms": ms(_pct(lat, 50)),
        "p99_ms": ms(_pct(lat, 99)),
        "ttfb_p50_ms": ms(_pct(ttfb, 50)),
        "ttfb_p99_ms": ms(_pct(ttfb, 99)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("-c", "--concurrency", type=int, default=64)
    ap.add_argument("-d", "--duration", type=float, default=10.0)
    ap.add_argument("-n", "--max-requests", type=int, default=None)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("-H", "--header", action="append", default=[])
    ap.add_argument("--model", default="openai/gpt-4o-mini")
    args = ap.parse_args()
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    body = json.dumps(chat_body(args.model, args.stream)).encode()
    import uvloop

    res = uvloop.run(run_load(args.url, headers, body, concurrency=args.concurrency, duration=args.duration,
                              max_requests=args.max_requests, stream=args.stream))
    print(json.dumps(res, indent=2))


def messages_body(model: str, stream: bool) -> dict:
    """An Anthropic Messages request as Claude Code sends its turns: a system prompt and the last user turn marked
    for the prompt cache."""
    body = {"model": model, "max_tokens": 1024,
            "system": [{"type": "text", "text": "You are a helpful assistant.",
                        "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What's the weather in San Francisco?",
                                                       "cache_control": {"type": "ephemeral"}}]}]}
    if stream:
        body["stream"] = True
    return body


def chat_body(model: str, stream: bool) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "What's the weather in San Francisco?"}]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


if __name__ == "__main__":
    main()
