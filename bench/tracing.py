"""CPU per request of tracing, in process: ``run_chat`` through the pipeline as shipped (every bundled middleware,
the dashboard's observer) on an in-process provider, in two apps side by side, one with ``[tracing]`` on
(sample ratio 1.0) and one without, measured in alternating runs, ``--concurrency`` requests at a time (64, as in
the harness's rows: how many calls' objects are alive at once matters to the garbage collector). Every span is
encoded as it would be for a collector; only the HTTP post is left out (``send`` is a no-op), so that nothing else
shares the process. ``process_time`` counts every thread.

    .venv/bin/python bench/tracing.py [--n 4000] [--runs 9] [--concurrency 64]

Prints the medians (and the minimums, steadier on a busy machine) of the CPU µs per request (whole answer and a
40-chunk stream) for each app, their ratio and difference, and a JSON line at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from failover import Plugin, one_call  # the same in-process provider as bench/failover.py
from starlette.applications import Starlette

from scillm_core import ChatRequest, structure
from scillm_core.testing import make_app


def _app(tracing: bool) -> Starlette:
    config: dict[str, Any] = {"plugins": {"disable": ["cache"]}}
    if tracing:
        config["tracing"] = {"enabled": True, "endpoint": "http://127.0.0.1:9", "sample_ratio": 1.0}
    app = make_app(config=config, plugins=[("bench", Plugin())], data_dir=tempfile.mkdtemp(prefix="scillm-bench-"))
    while not isinstance(app, Starlette):  # under the ASGI middleware
        app = app.app
    return app


async def measure(n: int, runs: int, concurrency: int) -> dict[str, float]:
    whole = structure({"model": "bench/a", "messages": [{"role": "user", "content": "hi"}]}, ChatRequest)
    streamed = structure({"model": "bench/a", "messages": [{"role": "user", "content": "hi"}], "stream": True},
                         ChatRequest)
    off, on = _app(False), _app(True)
    async with off.router.lifespan_context(off), on.router.lifespan_context(on):
        exporter = on.state.runtime.plugin_state["tracing"].processor
        exporter.send = lambda data: True  # encoded when each call ends as always, not posted

        def calls(runtime: Any) -> dict[str, Callable[[], Awaitable[None]]]:
            one_whole, one_stream = one_call(runtime, whole), one_call(runtime, streamed)

            def many(one: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
                async def run() -> None:  # n requests, concurrency at a time
                    async def worker(k: int) -> None:
                        for _ in range(k):
                            await one()

                    await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))

                return run

            return {"whole": many(one_whole), "stream": many(one_stream)}

        variants = {"off": calls(off.state.runtime), "on": calls(on.state.runtime)}
        out: dict[str, list[float]] = {f"{shape} {name}": [] for shape in ("whole", "stream") for name in variants}
        for shapes in variants.values():  # warm-up
            for call in shapes.values():
                await call()
        for round_ in range(runs):  # alternating, each round in the other order
            order = list(variants.items()) if round_ % 2 == 0 else list(reversed(variants.items()))
            for shape in ("whole", "stream"):
                for name, shapes in order:
                    exporter.force_flush()  # what the thread owes from before is not this run's
                    started = time.process_time()
                    await shapes[shape]()
                    if name == "on":
                        exporter.force_flush()
                    done = n // concurrency * concurrency
                    out[f"{shape} {name}"].append((time.process_time() - started) / done * 1e6)
        return {**{key: statistics.median(values) for key, values in out.items()},
                **{f"{key} min": min(values) for key, values in out.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    result = asyncio.run(measure(args.n, args.runs, args.concurrency))
    for shape in ("whole", "stream"):
        for of in ("median", "min"):
            off, on = (result[f"{shape} {name}" + ("" if of == "median" else " min")] for name in ("off", "on"))
            print(f"{shape:6} {of:6}: off {off:6.1f} µs, on {on:6.1f} µs CPU/request: {on / off:.3f}x "
                  f"(+{on - off:.1f} µs)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
