"""The embedded SQLite state store: documents with TTL and compare-and-set, and the append-only logs."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from scillm_core.state.sqlite import SQLiteStore


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    return SQLiteStore(tmp_path / "state" / "scillm.sqlite3")


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_documents_put_get_scan_delete_and_expire(store: SQLiteStore) -> None:
    async def go() -> None:
        await store.put("batch", "b1/0", {"ok": True})
        await store.put("batch", "b1/1", {"ok": False})
        await store.put("batch", "b2/0", {"ok": True})
        await store.put("batch", "gone", {"x": 1}, ttl_s=0.01)
        assert await store.get("batch", "b1/0") == {"ok": True}
        assert [key for key, _ in await store.scan("batch", "b1/")] == ["b1/0", "b1/1"]
        await asyncio.sleep(0.05)
        assert await store.get("batch", "gone") is None
        assert await store.delete("batch", "b1/0") and not await store.delete("batch", "b1/0")
        await store.close()

    run(go())


def test_compare_and_set_has_a_single_winner(store: SQLiteStore) -> None:
    async def go() -> list[bool]:
        wins = await asyncio.gather(*(store.compare_and_set("leases", "w", None, {"owner": f"o{i}"})
                                      for i in range(10)))
        await store.close()
        return list(wins)

    assert sum(run(go())) == 1


def test_append_many_keeps_order_and_commits_once(store: SQLiteStore) -> None:
    store._db.execute("PRAGMA wal_autocheckpoint=0")  # keep every WAL frame written, to count them

    async def go() -> list[dict[str, int]]:
        await store.append_many("calls", [{"i": i} for i in range(300)])
        return await store.tail("calls", 1000)

    assert run(go()) == [{"i": i} for i in range(300)]
    _, wal_frames, _ = store._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert wal_frames < 50  # one commit; a commit per row writes 300+ frames
    assert not store._db.in_transaction


def test_a_failed_batch_leaves_the_store_usable(store: SQLiteStore) -> None:
    async def go() -> None:
        await store.append_many("calls", [{"i": 1}])
        # another connection holding the write lock makes the batch fail
        store._db.execute("PRAGMA busy_timeout=50")
        other = sqlite3.connect(store.path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(sqlite3.OperationalError):
            await store.append_many("calls", [{"i": 2}, {"i": 3}])
        other.execute("ROLLBACK")
        other.close()
        assert not store._db.in_transaction
        await store.append_many("calls", [{"i": 4}])
        assert await store.tail("calls") == [{"i": 1}, {"i": 4}]

    run(go())


def test_trim_keeps_the_newest_records_of_one_log(store: SQLiteStore) -> None:
    async def go() -> tuple[int, int, list[dict[str, int]], list[dict[str, int]]]:
        await store.append_many("calls", [{"i": i} for i in range(10)])
        await store.append_many("events", [{"e": 1}])
        dropped = await store.trim("calls", 3)
        again = await store.trim("calls", 3)
        return dropped, again, await store.tail("calls", 100), await store.tail("events", 100)

    assert run(go()) == (7, 0, [{"i": 7}, {"i": 8}, {"i": 9}], [{"e": 1}])


def test_put_many_stores_all_documents_in_one_transaction(store: SQLiteStore) -> None:
    store._db.execute("PRAGMA wal_autocheckpoint=0")

    async def go() -> list[tuple[str, dict[str, int]]]:
        await store.put("items", "b/000", {"v": -1})
        await store.put_many("items", [(f"b/{i:03}", {"v": i}) for i in range(200)])
        return await store.scan("items", "b/")

    documents = run(go())
    assert documents == [(f"b/{i:03}", {"v": i}) for i in range(200)]  # the first document was replaced
    _, wal_frames, _ = store._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert wal_frames < 60  # two commits; a commit per document writes 200+ frames


def test_storage_has_its_own_thread_a_full_default_pool_cannot_starve_it(store: SQLiteStore) -> None:
    import threading

    async def go() -> dict[str, object] | None:
        release = threading.Event()
        # every thread of the default pool (what asyncio.to_thread uses) blocked, and more work queued behind them
        blockers = [asyncio.ensure_future(asyncio.to_thread(release.wait)) for _ in range(64)]
        await asyncio.sleep(0.05)
        try:
            await asyncio.wait_for(store.put("calls", "k", {"v": 1}), 10)
            return await asyncio.wait_for(store.get("calls", "k"), 10)
        finally:
            release.set()
            await asyncio.gather(*blockers)
            await store.close()

    assert run(go()) == {"v": 1}


# -- counters ---------------------------------------------------------------------------------------------------









def test_count_batcher_shares_round_trips_and_applies_deferred_changes_first(store: SQLiteStore) -> None:
    from scillm_core.state import Count
    from scillm_core.state.counters import CountBatcher

    async def go() -> tuple[list[bool], int, float]:
        batcher = CountBatcher(lambda: store, "b", linger_s=10)
        outcomes = await asyncio.gather(*(batcher.count([Count("slot", 1, limit=3)]) for _ in range(10)))
        batcher.later([Count("slot", -3)])  # releases nobody awaits ...
        after = await batcher.count([Count("slot", 1, limit=3)])  # ... are applied before a later admission
        return [o.applied for o in outcomes] + [after.applied], batcher.stats["round_trips"], after.values[0]

    applied, round_trips, value = run(go())
    assert applied == [True] * 3 + [False] * 7 + [True] and value == 1
    assert round_trips <= 3  # ten admissions did not take ten round trips


# -- log filters ------------------------------------------------------------------------------------------------




def test_deferred_counter_changes_survive_a_failed_round_trip(store: SQLiteStore) -> None:
    from scillm_core.state import Count
    from scillm_core.state.counters import CountBatcher

    failures = [sqlite3.OperationalError("database is locked")]
    original = store.count

    async def flaky(namespace: str, groups: object) -> object:
        if failures:
            raise failures.pop()
        return await original(namespace, groups)  # type: ignore[arg-type]

    store.count = flaky  # type: ignore[method-assign]

    async def go() -> tuple[float, int]:
        batcher = CountBatcher(lambda: store, "b", linger_s=0.01)
        batcher.later([Count("held", -5)])
        with pytest.raises(sqlite3.OperationalError):  # the awaited group in the failed round trip fails
            await batcher.count([Count("slot", 1, limit=3)])
        await asyncio.sleep(0.05)
        await batcher.flush()
        return (await original("b", [[Count("held")]]))[0].values[0], batcher.stats["errors"]

    assert run(go()) == (-5, 1)  # the deferred release was applied on the next round trip


def test_deferred_counter_changes_alone_are_written_after_the_linger(store: SQLiteStore) -> None:
    """A settlement nobody awaits reaches the store by itself (another process or instance reads it there), not only
    with this process's next admission."""
    from scillm_core.state import Count
    from scillm_core.state.counters import CountBatcher

    async def go() -> tuple[float, float]:
        batcher = CountBatcher(lambda: store, "b", linger_s=0.05)
        batcher.later([Count("spent", 7)])
        queued = (await store.count("b", [[Count("spent")]]))[0].values[0]  # read past the batcher
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not batcher.queue and not batcher.busy:
                break
        return queued, (await store.count("b", [[Count("spent")]]))[0].values[0]

    assert run(go()) == (0, 7)


def test_a_log_writer_keeps_no_record_older_than_its_max_age(tmp_path: Path) -> None:
    """Retention of the call log: as records are written, those appended longer than ``max_age_s`` ago (on the
    writer's clock, moved here a day on) are deleted, with the newest ``max_rows`` bound as before."""
    import time

    from scillm_core.state.writer import LogWriter

    async def main() -> None:
        store = SQLiteStore(tmp_path / "state.sqlite3")
        writer = LogWriter(lambda: store, "calls", max_rows=10, max_age_s=86400.0, delay_s=0.0)
        try:
            for i in range(3):
                writer.add({"i": i})
            await writer.flush()
            start = time.time()
            await asyncio.sleep(0.05)
            writer.add({"i": 3})
            await writer.flush()
            assert len(await store.tail("calls")) == 4  # nothing is a day old yet
            writer.clock = lambda: start + 86400.0  # a day after the first three were written
            writer.add({"i": 4})
            await writer.flush()
            assert await store.tail("calls") == [{"i": 3}, {"i": 4}] and writer.counts["pruned"] == 3
        finally:
            await writer.stop()
            await store.close()

    asyncio.run(main())


def test_a_long_log_is_trimmed_every_hundredth_of_its_length() -> None:
    """A trim to ``max_rows`` reads through up to that many rows (SQLite's OFFSET), so a 5M-row ledger trimmed every
    1,000 records would read 5,000 rows per record written: it is trimmed every 50,000; short logs as before."""
    from scillm_core.state.writer import LogWriter

    trims: list[int | None] = []

    class Store:
        async def append_many(self, namespace: str, records: Any) -> None:
            pass

        async def trim(self, namespace: str, keep: int | None = None, *, before: float | None = None) -> int:
            trims.append(keep)
            return 0

    async def main(max_rows: int, records: int) -> int:
        trims.clear()
        writer = LogWriter(lambda: Store(), "spend", backlog=records, max_rows=max_rows, delay_s=0.0)  # type: ignore[arg-type, return-value]
        for i in range(records):
            writer.add({"i": i})
        await writer.flush()
        await writer.stop()
        return len(trims)

    assert run(main(5_000_000, 60_000)) == 1  # was 58: once per 1,000 (batches of up to 512)
    assert run(main(100_000, 3_000)) == 2  # every 1,000 as before
