"""What recording a translated request's origins costs (``scillm_core.errors.Origins``: where each chat message,
part, tool call and tool came from in the client's body, so errors name the client's paths): the ``/v1/messages``
and ``/v1/responses`` parse of a 150-turn tool loop with recording on, against recording stubbed out, interleaved
call by call (the median of the pairs' ratios).

    .venv/bin/python bench/origins.py [--pairs 3000]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

from scillm_messages.translate import parse_messages_request
from scillm_responses.translate import parse_request

from scillm_core import errors


class Off(errors.Origins):
    def message(self, *args: Any, **kwargs: Any) -> None:
        pass

    def call(self, *args: Any, **kwargs: Any) -> None:
        pass


def messages_body() -> dict[str, Any]:
    tool = {"name": "f", "description": "d",
            "input_schema": {"type": "object", "properties": {"a": {"type": "string"}}}}
    turns: list[dict[str, Any]] = []
    for i in range(50):
        turns.append({"role": "user", "content": [{"type": "text", "text": f"question {i} " * 20}] if i % 2 else "q"})
        turns.append({"role": "assistant", "content": [{"type": "text", "text": "a" * 200},
                                                       {"type": "tool_use", "id": f"t{i}", "name": "f", "input": {}}]})
        turns.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{i}", "content": "r" * 300},
                                                  {"type": "text", "text": "go on"}]})
    return {"model": "m", "max_tokens": 100, "messages": turns, "tools": [tool] * 20,
            "system": [{"type": "text", "text": "s" * 2000, "cache_control": {"type": "ephemeral"}}]}


def responses_body() -> dict[str, Any]:
    items: list[dict[str, Any]] = []
    for i in range(50):
        items += [{"role": "user", "content": [{"type": "input_text", "text": "q" * 100}]},
                  {"type": "function_call", "call_id": f"c{i}", "name": "f", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": f"c{i}", "output": "r" * 300}]
    return {"model": "m", "instructions": "s" * 2000, "input": items,
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}] * 20}


def compare(on: Callable[[], Any], off: Callable[[], Any], pairs: int) -> tuple[float, float, float]:
    ons, offs, ratios = [], [], []
    for k in range(pairs):
        first, second = (on, off) if k % 2 else (off, on)
        a = time.perf_counter()
        first()
        b = time.perf_counter()
        second()
        c = time.perf_counter()
        x, y = (b - a, c - b) if k % 2 else (c - b, b - a)
        ons.append(x)
        offs.append(y)
        ratios.append(x / y)
    return statistics.median(ons) * 1e6, statistics.median(offs) * 1e6, statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=3000)
    pairs = ap.parse_args().pairs
    anthropic, responses = messages_body(), responses_body()
    gc.disable()
    for name, on, off in [
            ("/v1/messages", lambda: parse_messages_request(anthropic, origins=errors.Origins()),
             lambda: parse_messages_request(anthropic, origins=Off())),
            ("/v1/responses", lambda: parse_request(responses, origins=errors.Origins()),
             lambda: parse_request(responses, origins=Off()))]:
        with_us, off_us, ratio = compare(on, off, pairs)
        print(f"{name}: 150-turn parse {with_us:.0f} µs with origins, {off_us:.0f} µs recording off: "
              f"{ratio:.3f}x (median of {pairs} interleaved pairs)")


if __name__ == "__main__":
    main()
