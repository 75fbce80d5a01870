"""Cost of the parameter check on the request path (``scillm_core.models.params.check_asks``, run by core's
dispatch before every attempt of a translated request), medians of interleaved runs:

- the check alone, on a plain chat request, on one with unmodelled hint keys (``user``, ``prompt_cache_key``,
  penalties), and on one asking for logprobs from a provider that has them;
- a whole in-process chat call (``run_chat``: hooks, routing, dispatch, a provider that answers at once without
  I/O), with the check and with it stubbed out: the upper bound of its share, since a real request adds the HTTP
  server, parsing, the upstream call and the middleware on top.

    .venv/bin/python bench/params.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import timeit
import types
from collections.abc import Callable
from typing import Any

from scillm_core import ChatRequest, ChatResponse, Choice, Message, Provider, hookimpl
from scillm_core.builtin import core
from scillm_core.context import CallContext
from scillm_core.models.params import AS_SENT, check_asks
from scillm_core.pipeline import run_chat
from scillm_core.testing import make_app

HI = (Message(role="user", content="hi"),)
ANSWER = ChatResponse(id="c1", model="m", choices=(Choice(message=Message(role="assistant", content="hello"),
                                                          finish_reason="stop"),))


class Instant(Provider):
    name = "instant"
    prefixes = ("instant/",)

    async def complete(self, request: Any, route: Any, ctx: Any) -> ChatResponse:
        return ANSWER


plugin = types.ModuleType("bench_instant")
plugin.scillm_register_providers = hookimpl(  # type: ignore[attr-defined]
    lambda providers, runtime: providers.add(Instant()))


def median_us(fn: Callable[[], Any], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6


def pair(name: str, off: Callable[[], float], on: Callable[[], float]) -> None:
    offs, ons, ratios = [], [], []
    for _ in range(7):  # interleaved, so a change in the machine's load hits both sides
        a, b = off(), on()
        offs.append(a)
        ons.append(b)
        ratios.append(b / a)
    print(f"| {name} | {statistics.median(offs):.2f} | {statistics.median(ons):.2f} | "
          f"{statistics.median(ratios):.3f}x |", flush=True)


def main() -> None:
    caps = frozenset({"streaming", "tools", "images", "pdf", "json_schema", "reasoning"})  # Anthropic's kind
    plain = ChatRequest(model="m", messages=HI, temperature=0.2)
    hints = ChatRequest(model="m", messages=HI, extra={"user": "u", "prompt_cache_key": "k",
                                                      "frequency_penalty": 0.1})
    asking = ChatRequest(model="m", messages=HI, extra={"logprobs": True, "top_logprobs": 3})
    print("| the check alone | µs per call |\n|---|---:|")
    for name, request, capabilities in (("plain request", plain, caps), ("3 unmodelled hint keys", hints, caps),
                                        ("logprobs asked, delivered", asking, caps | AS_SENT)):
        runs = [median_us(lambda r=request, c=capabilities: check_asks(r, c, "p", "m"), 200_000)
                for _ in range(7)]
        print(f"| {name} | {statistics.median(runs):.3f} |", flush=True)

    app = make_app(only=("chat",), plugins=[("bench_instant", plugin)], entry_points=True)
    runtime = app.runtime
    request = ChatRequest(model="instant/m", messages=HI, temperature=0.2)

    def calls(n: int) -> float:
        async def go() -> float:
            started = time.perf_counter()
            for _ in range(n):
                await run_chat(request, CallContext(runtime=runtime))
            return (time.perf_counter() - started) / n * 1e6
        return asyncio.run(go())

    real = core.check_asks

    def without() -> float:
        core.check_asks = lambda *args: None  # type: ignore[assignment]
        try:
            return calls(20_000)
        finally:
            core.check_asks = real

    calls(2_000)  # warm up
    print("\n| in-process chat call (run_chat) | µs without the check | µs with it | with / without |\n"
          "|---|---:|---:|---:|")
    pair("plain request, provider answering at once", without, lambda: calls(20_000))
    print(f"\n(Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
