"""The spend ledger (log ``spend``): answered provider calls summed per interval and group, not one record per call.

A call adds its cost to an in-memory sum keyed by the interval it settled in (``interval_s``, one second by default:
the ledger's resolution) and what ``GET /v1/scillm/spend`` groups and filters by (owner, key name, team, caller,
model, provider, served model, batch, run). When an interval ends, each of its sums becomes one record through the
:class:`LogWriter`; so do the sums of the current interval before a spend query reads and at shutdown:

``{"ts": <the interval's start>, "owner", "key_name", "team", "caller", "model", "provider", "served_model",
"batch", "run", "calls", "unpriced_calls", "cost_nano", "cost_usd", "charged_nano", "tokens": {"input", "output",
"cache_read", "cache_write"}}``

Costs are summed in nano-dollars (integers: exact). Per-call detail (request id, each call's cost) is in the call
log. Records written before this (one per call, no ``calls`` field) are read as one call each
(:class:`Sum`), so a store keeps its history across the upgrade.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

from scillm_budgets.pricing import NANO, Tokens
from scillm_core.state.writer import LogWriter

__all__ = ["GROUP_FIELDS", "Ledger", "Sum"]

#: What a record is summed by, after its interval (the spend route groups and filters by these).
GROUP_FIELDS = ("owner", "key_name", "team", "caller", "model", "provider", "served_model", "batch", "run")
CALLS, UNPRICED, COST, CHARGED, INPUT, OUTPUT, CACHE_READ, CACHE_WRITE = range(8)


class Ledger:
    def __init__(self, writer: LogWriter, *, interval_s: int = 1, clock: Callable[[], float] = time.time) -> None:
        self.writer = writer
        self.interval_s = interval_s
        self.clock = clock
        self.sums: dict[tuple[Any, ...], list[int]] = {}  # (interval's start, *GROUP_FIELDS values) -> the sums above
        self.timer: asyncio.TimerHandle | None = None

    def add(self, ts: float, group: tuple[Any, ...], cost_nano: int | None, charged_nano: int,
            tokens: Tokens | None) -> None:
        """One answered call: ``group`` holds the values of :data:`GROUP_FIELDS`; ``cost_nano`` is ``None`` when
        the call has no price."""
        if self.writer.stopped:
            return
        interval = self.interval_s
        key = (int(ts) // interval * interval, *group)
        sums = self.sums.get(key)
        if sums is None:
            if len(self.sums) >= self.writer.backlog:  # many distinct groups at once: write them now
                self.flush()
            sums = self.sums[key] = [0] * 8
            if self.timer is None:
                self._wait()
        sums[CALLS] += 1
        if cost_nano is None:
            sums[UNPRICED] += 1
        else:
            sums[COST] += cost_nano
        sums[CHARGED] += charged_nano
        if tokens is not None:
            sums[INPUT] += tokens.input
            sums[OUTPUT] += tokens.output
            sums[CACHE_READ] += tokens.cache_read
            sums[CACHE_WRITE] += tokens.cache_write

    def _wait(self) -> None:
        """Wake up when the current interval has ended (a moment after: calls settling at its end are in)."""
        now = self.clock()
        self.timer = asyncio.get_running_loop().call_later(self.interval_s - now % self.interval_s + 0.05, self.ended)

    def ended(self) -> None:
        """An interval ended: write the sums of every interval before the current one."""
        self.timer = None
        current = int(self.clock()) // self.interval_s * self.interval_s
        self.flush(before=current)
        if self.sums:
            self._wait()

    def flush(self, before: float | None = None) -> None:
        """Queue one record per group summed so far (of the intervals that start ``before``, if given); the writer
        writes them in one batch."""
        if before is None:
            sums, self.sums = self.sums, {}
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
        else:
            sums = {key: s for key, s in self.sums.items() if key[0] < before}
            for key in sums:
                del self.sums[key]
        for (start, *group), s in sums.items():
            record: dict[str, Any] = {"ts": start, **dict(zip(GROUP_FIELDS, group, strict=True)),
                                      "calls": s[CALLS], "unpriced_calls": s[UNPRICED], "cost_nano": s[COST],
                                      "cost_usd": round(s[COST] / NANO, 9), "charged_nano": s[CHARGED],
                                      "tokens": {"input": s[INPUT], "output": s[OUTPUT], "cache_read": s[CACHE_READ],
                                                 "cache_write": s[CACHE_WRITE]}}
            self.writer.add(record)

    async def written(self, timeout_s: float = 1.0) -> None:
        """Everything summed so far is in the store (waits up to ``timeout_s`` for the writer)."""
        self.flush()
        await self.writer.flush(timeout_s)

    async def stop(self) -> None:
        self.flush()
        await self.writer.stop()


class Sum:
    """Ledger records summed: calls, unpriced calls, cost (nano-dollars) and tokens by kind."""

    def __init__(self) -> None:
        self.nano = 0
        self.calls = 0
        self.unpriced = 0
        self.tokens = {"input": 0, "output": 0, "cache_read": 0, "cache_write": 0}

    def add(self, record: Mapping[str, Any]) -> None:
        calls = record.get("calls")
        if isinstance(calls, int):  # an interval's calls of one group
            self.calls += calls
            self.unpriced += _int(record.get("unpriced_calls"))
            self.nano += _int(record.get("cost_nano"))
        else:  # a record of one call, written before the ledger was summed
            self.calls += 1
            cost = record.get("cost_usd")
            if isinstance(cost, int | float):
                self.nano += round(cost * NANO)
            else:
                self.unpriced += 1
        for name, value in (record.get("tokens") or {}).items():
            if name in self.tokens and isinstance(value, int):
                self.tokens[name] += value

    def as_dict(self) -> dict[str, Any]:
        return {"cost_usd": round(self.nano / NANO, 9), "calls": self.calls, "unpriced_calls": self.unpriced,
                "tokens": dict(self.tokens)}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
