"""CPU per request of the failover machinery on the request path: ``run_chat`` with every bundled middleware on
(cache off) for a group of two in-process models, a whole answer and a 40-chunk stream. Run it with each tree's
interpreter and compare (what it measures is core's dispatch with its timeout watch, resilience with its stream
wrapper for continuation, and the rest of the pipeline as shipped; no network, no HTTP):

    /other/tree/.venv/bin/python bench/failover.py     # e.g. main
    .venv/bin/python bench/failover.py                 # this tree

Prints the median over ``--runs`` of the CPU µs per request, each run ``--n`` requests; a JSON line at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette

from scillm_core import ChatChunk, ChatRequest, ChatResponse, Provider, run_chat, structure
from scillm_core.context import CallContext
from scillm_core.hookspecs import hookimpl
from scillm_core.testing import make_app

CHUNKS = 40


class BenchProvider(Provider):
    name = "bench"
    family = "bench"
    prefixes = ("bench/",)

    def __init__(self) -> None:
        self.answer = structure({"id": "chatcmpl-b", "object": "chat.completion", "created": 1, "model": "a",
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": "hello there"}}],
                                 "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
                                ChatResponse)
        chunk = {"id": "chatcmpl-b", "object": "chat.completion.chunk", "created": 1, "model": "a"}
        self.chunks = [structure({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                                 ChatChunk)]
        self.chunks += [structure({**chunk, "choices": [{"index": 0, "delta": {"content": "tok "}}]}, ChatChunk)
                        for _ in range(CHUNKS - 2)]
        self.chunks.append(structure({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                                     ChatChunk))

    async def complete(self, request: Any, route: Any, ctx: Any) -> ChatResponse:
        return self.answer

    async def stream(self, request: Any, route: Any, ctx: Any) -> AsyncIterator[ChatChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[ChatChunk]:
        for chunk in self.chunks:
            yield chunk


class Plugin:
    @hookimpl
    def scillm_register_providers(self, providers: Any, runtime: Any) -> None:
        providers.add(BenchProvider())


def one_call(runtime: Any, request: ChatRequest) -> Callable[[], Awaitable[None]]:
    """``await one()`` is one ``run_chat`` of ``request`` on ``runtime`` (a stream read to its end)."""
    async def one() -> None:
        result = await run_chat(request, CallContext(runtime=runtime))
        if request.stream:
            async for _ in result:  # type: ignore[union-attr]
                pass

    return one


async def measure(n: int, runs: int) -> dict[str, float]:
    app = make_app(config={"groups": {"g": {"models": ["bench/a", "bench/b"]}}, "plugins": {"disable": ["cache"]}},
                   plugins=[("bench", Plugin())], data_dir=tempfile.mkdtemp(prefix="scillm-bench-"))
    whole = structure({"model": "g", "messages": [{"role": "user", "content": "hi"}]}, ChatRequest)
    streamed = structure({"model": "g", "messages": [{"role": "user", "content": "hi"}], "stream": True},
                         ChatRequest)
    out: dict[str, list[float]] = {"whole": [], "stream": []}
    inner = app
    while not isinstance(inner, Starlette):  # under the ASGI middleware
        inner = inner.app
    async with inner.router.lifespan_context(inner):
        runtime = inner.state.runtime
        one_whole, one_stream = one_call(runtime, whole), one_call(runtime, streamed)

        for _ in range(200):  # warm-up
            await one_whole()
            await one_stream()
        for _ in range(runs):  # interleaved
            for name, call in (("whole", one_whole), ("stream", one_stream)):
                started = time.process_time()
                for _ in range(n):
                    await call()
                out[name].append((time.process_time() - started) / n * 1e6)
    return {name: statistics.median(values) for name, values in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    result = asyncio.run(measure(args.n, args.runs))
    print(f"whole answer: {result['whole']:.1f} µs CPU/request; stream of {CHUNKS} chunks: "
          f"{result['stream']:.1f} µs CPU/request")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
