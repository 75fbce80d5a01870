"""Cost of the hostile-input guards on the request path, against what they replaced (medians of interleaved runs):

- ``jsonio.loads`` (nesting bounded at 128) vs ``orjson.loads``, on a stream chunk, a chat body and a body with
  many brackets;
- ``schemas.check_schema`` (metaschema + every ``$ref`` resolved locally + loop check) vs the metaschema check
  alone that it replaced, on a typical structured-output schema: the first time (it now runs on the schema pool,
  off the event loop), and again (a remembered schema);
- the body deadline (``body_deadline.BodyDeadline``, on every request's ``receive``) vs the bare ``receive``: a body
  that is there when the app asks for it (nearly every request), and one that arrives in two parts (the timer is
  armed once), on uvloop as served;
- closing lingering (``protocol.HttpProtocol.on_response_complete``: whether a response completed before its request
  was read whole) vs uvicorn's own ``on_response_complete``, on a kept-alive connection's every response;
- a wrong-shaped upstream event skipped (``upstream.Malformed.read`` around each event's translation) vs the bare
  translation, over the recorded Anthropic stream (``fixtures/messages_stream_text_sonnet45.sse``);
- checked token counts (``models.chat.Usage``, each count through ``token_count``) vs the same class unchecked;
- a call that waits for a provider's concurrency slot: queued and let through by the fair queue
  (``scillm_resilience.limiter.FairQueue``, round robin over keys and flows) vs the first-in-first-out deque it
  replaced, with 64 calls of 4 keys (one a batch) waiting. A call that finds a free slot never queues (unchanged).

    .venv/bin/python bench/guards.py
"""

from __future__ import annotations

import asyncio
import statistics
import timeit
from collections.abc import Callable
from typing import Any

import orjson

from scillm_core import jsonio, schemas


def median_us(fn: Callable[[], Any], number: int, runs: int = 7) -> float:
    return statistics.median(min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6 for _ in range(runs))


def pair(name: str, old: Callable[[], Any], new: Callable[[], Any], number: int) -> None:
    ratios, olds, news = [], [], []
    for _ in range(7):  # interleaved, so a change in the machine's load hits both sides
        a, b = median_us(old, number, 1), median_us(new, number, 1)
        olds.append(a)
        news.append(b)
        ratios.append(b / a)
    print(f"| {name} | {statistics.median(olds):.1f} | {statistics.median(news):.1f} | "
          f"{statistics.median(ratios):.2f}x |")


def main() -> None:
    chunk = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                          "choices": [{"index": 0, "delta": {"content": "abcd"}, "logprobs": None,
                                       "finish_reason": None}]})
    body = orjson.dumps({"model": "deepseek/deepseek-chat", "temperature": 0.2,
                         "messages": [{"role": "user" if i % 2 == 0 else "assistant",
                                       "content": f"question number {i} " * 20} for i in range(20)]})
    part = {"type": "text", "text": "x" * 50}
    brackets = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": [part]} for _ in range(300)]})
    print("| what | before µs | after µs | after / before |\n|---|---:|---:|---:|")
    for name, raw, number in ((f"parse a stream chunk ({len(chunk)} B)", chunk, 20000),
                              (f"parse a chat body ({len(body) // 1024} KB)", body, 5000),
                              (f"parse a body with {brackets.count(b'{') + brackets.count(b'[')} brackets "
                               f"({len(brackets) // 1024} KB)", brackets, 500)):
        pair(name, lambda raw=raw: orjson.loads(raw), lambda raw=raw: jsonio.loads(raw), number)

    from jsonschema.validators import validator_for

    schema = {"type": "object", "required": ["name", "items"], "$defs": {"item": {
        "type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}}},
        "properties": {"name": {"type": "string"}, "items": {"type": "array", "items": {"$ref": "#/$defs/item"}},
                       "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}
    schemas.check_schema(schema, "$")  # imports
    pair("check a 12-keyword schema with a $ref (first time)", lambda: validator_for(schema).check_schema(schema),
         lambda: schemas.check_schema(schema, "$.json_schema"), 100)
    loop = asyncio.new_event_loop()
    pair("check it again (remembered; batches and agents repeat theirs)",
         lambda: validator_for(schema).check_schema(schema),
         lambda: loop.run_until_complete(schemas.check_schema_async(schema, "$.json_schema")), 100)
    loop.close()
    body_deadline()
    lingering()
    upstream_shapes()
    fair_queue()


def fair_queue() -> None:
    import collections

    from scillm_resilience.limiter import FairQueue

    loop = asyncio.new_event_loop()
    waiters = [loop.create_future() for _ in range(64)]
    callers = [("alice", ""), ("bob", ""), ("carol", "batch:nightly"), ("carol", "")]
    fifo: collections.deque[Any] = collections.deque(waiters)
    fair = FairQueue()
    for n, waiter in enumerate(waiters):
        fair.push(*callers[n % 4], waiter)

    def through_fifo() -> None:  # one call leaves the head of the queue, another joins at its tail
        fifo.append(fifo.popleft())

    def through_fair() -> None:
        waiter = fair.pop()
        fair.push(*callers[id(waiter) % 4], waiter)  # type: ignore[arg-type]

    pair("a call waits for a slot and gets it (64 waiting): FIFO deque / fair queue", through_fifo, through_fair,
         100000)
    loop.close()


def upstream_shapes() -> None:
    from pathlib import Path

    import attrs
    from scillm_anthropic.translate import StreamTranslator

    from scillm_core.models.chat import Usage
    from scillm_core.upstream import Malformed, SSEParser

    raw = (Path(__file__).parent / "fixtures" / "messages_stream_text_sonnet45.sse").read_bytes()
    parser = SSEParser()
    events = [(e.event, e.data, orjson.loads(e.data)) for e in [*parser.feed(raw), *parser.end()]]

    class Context:  # what Malformed reads of a call's context
        notes: dict[str, Any] = {}
        request_id = "bench"

        def emit(self, *args: Any, **kwargs: Any) -> None: ...

    route = type("Route", (), {"provider": "anthropic", "model": "claude"})()

    def bare() -> None:
        translator = StreamTranslator(provider="anthropic", model="claude", include_usage=True, secrets=())
        for event, _, data in events:
            translator.feed(event, data)

    def guarded() -> None:
        translator = StreamTranslator(provider="anthropic", model="claude", include_usage=True, secrets=())
        malformed = Malformed(Context(), route)  # type: ignore[arg-type]
        for event, text, data in events:
            malformed.read(text, translator.feed, event, data)

    pair(f"translate a {len(events)}-event Anthropic stream: bare / each event through Malformed.read", bare,
         guarded, 2000)
    Unchecked = attrs.frozen(kw_only=True)(type("Unchecked", (), {"__annotations__": {
        "prompt_tokens": int, "completion_tokens": int, "total_tokens": int}, "prompt_tokens": 0,
        "completion_tokens": 0, "total_tokens": 0}))
    pair("make a usage (per answer): unchecked / checked counts",
         lambda: Unchecked(prompt_tokens=11, completion_tokens=7, total_tokens=18),
         lambda: Usage(prompt_tokens=11, completion_tokens=7, total_tokens=18), 50000)


def body_deadline() -> None:
    import uvloop

    from scillm_core.body_deadline import BodyDeadline

    loop = uvloop.new_event_loop()
    whole = {"type": "http.request", "body": b"{}", "more_body": False}
    head = {"type": "http.request", "body": b"{", "more_body": True}

    def requests(n: int, wrap: bool, parts: int) -> Callable[[], Any]:
        async def one_request() -> None:
            queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            receive = BodyDeadline(queue.get, 60.0) if wrap else queue.get
            if parts == 1:
                queue.put_nowait(whole)
                await receive()
            else:  # the second part arrives while the reader waits for it
                queue.put_nowait(head)
                await receive()
                loop.call_soon(queue.put_nowait, whole)
                await receive()
            if wrap:
                receive.close()  # type: ignore[union-attr]

        async def many() -> None:
            for _ in range(n):
                await one_request()

        return lambda: loop.run_until_complete(many())

    for name, parts in (("read a body that is there (per request)", 1), ("read a body in two parts, waiting once", 2)):
        ratios, olds, news = [], [], []
        for _ in range(7):
            a = median_us(requests(1000, False, parts), 1, 1) / 1000
            b = median_us(requests(1000, True, parts), 1, 1) / 1000
            olds.append(a)
            news.append(b)
            ratios.append(b / a)
        print(f"| {name}: body deadline off / on | {statistics.median(olds):.2f} | {statistics.median(news):.2f} | "
              f"{statistics.median(ratios):.2f}x (+{statistics.median(news) - statistics.median(olds):.2f} µs) |")
    loop.close()


def lingering() -> None:
    from types import SimpleNamespace

    import uvicorn
    import uvloop
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from scillm_core.protocol import HttpProtocol

    class Transport:  # a connection that stays open, as a kept-alive one does
        def get_extra_info(self, name: str) -> Any:
            return None

        def is_closing(self) -> bool:
            return False

        def pause_reading(self) -> None: ...

        def resume_reading(self) -> None: ...

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    config = uvicorn.Config(lambda scope, receive, send: None, http=HttpProtocol, log_config=None)
    config.load()
    protocol = HttpProtocol(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(Transport())  # type: ignore[arg-type]
    protocol.cycle = SimpleNamespace(response_complete=True, more_body=False)  # type: ignore[assignment]
    pair("a response completes (per response): uvicorn's / closing lingering",
         lambda: HttpToolsProtocol.on_response_complete(protocol), protocol.on_response_complete, 20000)
    loop.close()


if __name__ == "__main__":
    main()
