"""The spend ledger sums calls per second and group in memory and writes one record per group (a real SQLite store):
a busy gateway's day fits in a spend query, sums stay exact, and records written one per call before are still
counted."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from scillm_budgets.ledger import Ledger, Sum
from scillm_budgets.pricing import Tokens

from scillm_core.state.sqlite import SQLiteStore
from scillm_core.state.writer import LogWriter

ALICE = ("key_a", "alice", "ml", "nightly", "gpt-4o", "openai", "gpt-4o-2024-08-06", "b1", None)
BOB = ("key_b", "bob", None, None, "gpt-4o", "openai", "gpt-4o", None, None)


def test_calls_are_summed_per_second_and_group_exactly(tmp_path: Path) -> None:
    async def go() -> None:
        store = SQLiteStore(tmp_path / "s.sqlite3")
        ledger = Ledger(LogWriter(lambda: store, "spend", backlog=100, delay_s=0.0), clock=lambda: 1_000_001.5)
        for i in range(3000):  # 3,000 calls of $0.000000123 in two seconds, two keys; one in ten unpriced
            unpriced = (i // 2) % 10 == 0
            ledger.add(1_000_000 + (i % 2), ALICE if i < 2000 else BOB, None if unpriced else 123, 150,
                       None if unpriced else Tokens(input=10, output=5, cache_read=2))
        assert len(ledger.sums) == 4
        await ledger.written()  # as before a spend query: the current interval's sums too
        records = await store.tail("spend", 100)
        assert len(records) == 4  # (second, group): 2 x 2
        first = next(r for r in records if r["ts"] == 1_000_000 and r["owner"] == "key_a")
        assert first == {"ts": 1_000_000, "owner": "key_a", "key_name": "alice", "team": "ml", "caller": "nightly",
                         "model": "gpt-4o", "provider": "openai", "served_model": "gpt-4o-2024-08-06",
                         "batch": "b1", "run": None, "calls": 1000, "unpriced_calls": 100, "cost_nano": 900 * 123,
                         "cost_usd": 0.0001107, "charged_nano": 1000 * 150,
                         "tokens": {"input": 9000, "output": 4500, "cache_read": 1800, "cache_write": 0}}
        total = Sum()
        for record in records:
            total.add(record)
        assert total.as_dict() == {"cost_usd": 2700 * 123 / 1e9, "calls": 3000, "unpriced_calls": 300,
                                   "tokens": {"input": 27000, "output": 13500, "cache_read": 5400, "cache_write": 0}}
        await ledger.stop()
        await store.close()

    asyncio.run(go())


def test_an_intervals_sums_are_written_when_it_ends_and_the_rest_at_stop(tmp_path: Path) -> None:
    async def go() -> None:
        store = SQLiteStore(tmp_path / "s.sqlite3")
        writer = LogWriter(lambda: store, "spend", backlog=100, delay_s=0.0)
        now = [10.2]
        ledger = Ledger(writer, interval_s=5, clock=lambda: now[0])
        ledger.add(10.2, BOB, 7, 7, Tokens(1, 1))
        ledger.add(14.9, BOB, 7, 7, Tokens(1, 1))
        assert ledger.timer is not None  # set for the end of the interval [10, 15)
        now[0] = 15.1
        ledger.add(15.1, BOB, 7, 7, Tokens(1, 1))
        ledger.ended()  # the timer's call: [10, 15) is over, [15, 20) is not
        await writer.flush()
        assert [(r["ts"], r["calls"]) for r in await store.tail("spend", 10)] == [(10, 2)]
        assert ledger.timer is not None  # and waits for the end of [15, 20)
        await ledger.stop()  # at shutdown: what is summed is written
        assert [(r["ts"], r["calls"]) for r in await store.tail("spend", 10)] == [(10, 2), (15, 1)]
        ledger.add(16.0, BOB, 7, 7, Tokens(1, 1))  # a call settled after shutdown is not summed for nobody to write
        assert not ledger.sums
        await store.close()

    asyncio.run(go())


def test_the_timer_writes_an_ended_interval(tmp_path: Path) -> None:
    async def go() -> None:
        store = SQLiteStore(tmp_path / "s.sqlite3")
        writer = LogWriter(lambda: store, "spend", backlog=100, delay_s=0.0)
        ledger = Ledger(writer)  # one second, the real clock
        ledger.add(time.time(), BOB, 7, 7, None)
        while ledger.sums:
            await asyncio.sleep(0.05)
        await writer.flush()
        assert [r["calls"] for r in await store.tail("spend", 10)] == [1]
        await ledger.stop()
        await store.close()

    asyncio.run(go())


def test_more_groups_than_the_backlog_are_written_as_they_come_and_memory_stays_bounded(tmp_path: Path) -> None:
    """A caller name per call makes as many groups as calls: the sums go to the writer whenever the backlog's worth
    is summed; what the writer cannot queue while the store is busy is dropped and counted, as any log record."""
    async def go() -> None:
        store = SQLiteStore(tmp_path / "s.sqlite3")
        writer = LogWriter(lambda: store, "spend", backlog=50, delay_s=0.0)
        ledger = Ledger(writer, interval_s=3600)
        most = 0
        for i in range(120):  # a caller name per call: as many groups as calls (each call a pass of the loop)
            ledger.add(1.0, (*BOB[:3], f"caller-{i}", *BOB[4:]), 1, 1, None)
            most = max(most, len(ledger.sums))
            await asyncio.sleep(0)
        assert most == 50  # memory stays bounded by the writer's backlog
        await ledger.stop()
        records = await store.tail("spend", 500)
        assert len(records) == writer.counts["logged"] >= 50
        assert writer.counts["logged"] + writer.counts["dropped"] == 120
        await store.close()

    asyncio.run(go())


def test_records_of_one_call_each_from_before_are_counted() -> None:
    total = Sum()
    total.add({"ts": 1.0, "owner": "a", "cost_usd": 0.25, "tokens": {"input": 3, "output": 1}})
    total.add({"ts": 2.0, "owner": "a", "cost_usd": None, "tokens": None})
    total.add({"ts": 3.0, "owner": "a", "calls": 4, "unpriced_calls": 1, "cost_nano": 500_000_000, "cost_usd": 0.5,
               "tokens": {"input": 9, "output": 2, "cache_read": 0, "cache_write": 0}})
    assert total.as_dict() == {"cost_usd": 0.75, "calls": 6, "unpriced_calls": 2,
                               "tokens": {"input": 12, "output": 3, "cache_read": 0, "cache_write": 0}}
