"""Leases against a real SQLite store shared by two "processes" (two batchers and lease sets on one store): calls
admitted from room held ahead skip the store, and the store's counters still bound what all of them admit."""

from __future__ import annotations

import asyncio
from pathlib import Path

from scillm_budgets.leases import Leases

from scillm_core.state import Count
from scillm_core.state.counters import CountBatcher
from scillm_core.state.sqlite import SQLiteStore

NS = "budgets"


def process(store: SQLiteStore) -> tuple[CountBatcher, Leases]:
    batcher = CountBatcher(lambda: store, NS)
    return batcher, Leases(batcher, linger_s=3600)  # room is given back only when the test says so


async def value(store: SQLiteStore, key: str) -> float:
    return (await store.count(NS, [[Count(key)]]))[0].values[0]


def test_calls_that_fit_in_room_held_ahead_make_no_store_round_trip(tmp_path: Path) -> None:
    async def go() -> None:
        store = SQLiteStore(tmp_path / "s.sqlite3")
        batcher, leases = process(store)
        for _ in range(8):
            assert await leases.admit([Count("usd", 10, limit=1000)], frozenset()) is None
        assert batcher.stats["round_trips"] == 1  # the first call took a tenth of the limit ahead (100)
        assert await value(store, "usd") == 100  # 80 reserved by the calls, 20 held ahead
        leases.release("usd", 4, None)  # a call that spent 6 of its 10
        leases.give_back_all()
        await batcher.flush()
        assert await value(store, "usd") == 76  # 8 calls reserved 80, one gave 4 back
        await store.close()

    asyncio.run(go())


def test_two_processes_never_admit_past_the_limit_and_stop_within_one_call_of_it(tmp_path: Path) -> None:
    async def go() -> None:
        store = SQLiteStore(tmp_path / "s.sqlite3")
        a, b = process(store), process(store)
        admitted = 0

        async def give_back() -> None:  # what the linger does
            for batcher, leases in (a, b):
                leases.give_back_all()
                await batcher.flush()

        for turn in range(200):
            _, leases = (a, b)[turn % 2]
            if await leases.admit([Count("usd", 7, limit=500)], frozenset()) is None:
                admitted += 7
            elif turn % 10 == 9:
                await give_back()  # room one process holds but cannot use goes back to the store
            assert await value(store, "usd") <= 500
        assert 500 - 7 < admitted <= 500  # stopped within one call of the limit
        await give_back()
        assert await value(store, "usd") == admitted
        await store.close()

    asyncio.run(go())


def test_a_released_slot_is_reused_in_process_and_the_cap_holds_across_processes(tmp_path: Path) -> None:
    async def go() -> None:
        store = SQLiteStore(tmp_path / "s.sqlite3")
        (ba, a), (_, b) = process(store), process(store)
        slot = [Count("conc", 1, limit=2)]
        assert await a.admit(slot, frozenset({"conc"})) is None
        assert await b.admit(slot, frozenset({"conc"})) is None
        assert await a.admit(slot, frozenset({"conc"})) is not None  # the cap of 2 holds: never a slot ahead
        a.release("conc", 1, None)
        trips = ba.stats["round_trips"]
        assert await a.admit(slot, frozenset({"conc"})) is None  # reused without the store
        assert ba.stats["round_trips"] == trips
        a.release("conc", 1, None)
        assert await b.admit(slot, frozenset({"conc"})) is not None  # a holds it until it gives it back ...
        a.give_back_all()
        await ba.flush()
        assert await b.admit(slot, frozenset({"conc"})) is None  # ... then the other process gets it
        assert await value(store, "conc") == 2
        await store.close()

    asyncio.run(go())


def test_room_a_busy_process_draws_from_stays_and_idle_room_and_debts_go_back(tmp_path: Path) -> None:
    async def go() -> None:
        store = SQLiteStore(tmp_path / "s.sqlite3")
        batcher, leases = process(store)
        assert await leases.admit([Count("usd", 10, limit=1000)], frozenset()) is None  # 10 + 90 ahead
        assert await leases.admit([Count("conc", 1, limit=2)], frozenset({"conc"})) is None
        leases.release("conc", 1, None)  # its call settled
        for _ in range(3):  # a call in each of three lingers: from the room held, no round trip
            assert leases.take(["usd", "conc"], [10, 1])
            leases.release("conc", 1, None)  # the slot is reused in process
            leases.linger()
        await batcher.flush()
        assert batcher.stats["round_trips"] == 2
        # 40 reserved by the calls, 60 still held by the busy process; the slot its calls keep reusing, too
        assert [await value(store, key) for key in ("usd", "conc")] == [100, 1]
        leases.release("usd", -5, None)  # a call that cost 5 more than it reserved
        leases.spend([("spent", None)], 7)
        leases.spend([("spent", None)], 8)
        trips = batcher.stats["round_trips"]
        leases.linger()  # a linger in which no call drew from them: the room, the slot, the debt and the spend go
        await batcher.flush()
        assert batcher.stats["round_trips"] == trips + 1
        assert [await value(store, key) for key in ("usd", "conc", "spent")] == [45, 0, 15]
        assert not leases.free and not leases.spent
        await store.close()

    asyncio.run(go())
