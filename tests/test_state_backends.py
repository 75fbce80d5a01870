"""The state-store contract, run against both backends: SQLite (two connections to one file stand for two processes
on one machine) and a real redis-server (two clients stand for two instances)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from scillm_core.config import Config, ConfigError, Env, StateConfig
from scillm_core.errors import StateUnavailable
from scillm_core.state import Change, Count, Counted, Inserted, StateStore, open_store
from scillm_core.state.redis import RedisStore
from scillm_core.state.sqlite import SQLiteStore
from scillm_core.testing.services import RedisServer, free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite", "redis"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[[], StateStore]]:
    """A factory of stores on one backend; each store is a separate connection (another process)."""
    made: list[StateStore] = []
    if request.param == "sqlite":
        def make() -> StateStore:
            made.append(SQLiteStore(tmp_path / "state.sqlite3"))
            return made[-1]
    else:
        server = request.getfixturevalue("redis_server")
        prefix = f"contract:{uuid.uuid4().hex[:8]}:"

        def make() -> StateStore:
            made.append(RedisStore(server.url, prefix=prefix))
            return made[-1]
    yield make
    for store in made:
        await store.close()


async def test_documents_scan_in_key_order_by_prefix_and_expire(stores: Callable[[], StateStore]) -> None:
    store = stores()
    await store.put_many("batch-items:b'1", [("k2", {"n": 2}), ("k1", {"n": 1}), ("x", {"n": 0})])
    await store.put("batch-items:b'1", "k3", {"n": 3}, ttl_s=0.05)
    await store.put("batch-items:b", "k1", {"other": True})  # a namespace that is a prefix of another
    assert [k for k, _ in await store.scan("batch-items:b'1", "k")] == ["k1", "k2", "k3"]
    assert await store.get("batch-items:b'1", "k2") == {"n": 2}
    await asyncio.sleep(0.1)
    assert await store.get("batch-items:b'1", "k3") is None
    assert await store.scan("batch-items:b'1", "k", limit=10) == [("k1", {"n": 1}), ("k2", {"n": 2})]
    assert await store.scan("batch-items:b") == [("k1", {"other": True})]
    assert await store.delete("batch-items:b'1", "x") and not await store.delete("batch-items:b'1", "x")
    hostile = "1' OR '1'='1\x00;DROP"
    await store.put("ns", hostile, {"v": hostile})
    assert await store.get("ns", hostile) == {"v": hostile}


async def test_compare_and_set_has_one_winner_across_processes(stores: Callable[[], StateStore]) -> None:
    one, two = stores(), stores()
    wins = await asyncio.gather(*(s.compare_and_set("leases", "w", None, {"owner": f"o{i}"}, ttl_s=5)
                                  for i, s in enumerate([one, two] * 10)))
    assert sum(wins) == 1
    holder = await two.get("leases", "w")
    assert holder is not None
    assert not await one.compare_and_set("leases", "w", {"owner": "someone else"}, None)
    assert await one.compare_and_set("leases", "w", holder, {**holder, "renewed": 1}, ttl_s=5)
    assert await two.compare_and_set("leases", "w", {**holder, "renewed": 1}, None)
    assert await one.get("leases", "w") is None
    await one.put("leases", "short", {"x": 1}, ttl_s=0.05)
    await asyncio.sleep(0.1)
    assert await two.compare_and_set("leases", "short", None, {"x": 2})  # expired reads as absent


async def test_an_insert_into_a_capped_prefix_never_passes_the_cap_across_processes(
        stores: Callable[[], StateStore]) -> None:
    """Check and write are one step: 40 inserts racing from two processes store exactly the cap; a key already
    there answers its document; expired documents and other prefixes (``k1/`` is not ``k10/``) do not count."""
    one, two = stores(), stores()
    outcomes = await asyncio.gather(*(s.insert("handoffs", f"w/k1/h{i:02d}", {"i": i}, prefix="w/k1/", cap=5)
                                      for i, s in enumerate([one, two] * 20)))
    assert sum(o.created for o in outcomes) == 5
    assert all(o == Inserted(False, None) for o in outcomes if not o.created)
    assert len(await two.scan("handoffs", "w/k1/")) == 5
    kept = next(i for i, o in enumerate(outcomes) if o.created)
    assert await one.insert("handoffs", f"w/k1/h{kept:02d}", {"i": -1}, prefix="w/k1/", cap=99) == \
        Inserted(False, {"i": kept})
    assert (await two.insert("handoffs", "w/k10/h", {"other": 1}, prefix="w/k10/", cap=1)).created
    assert (await one.insert("handoffs", "w/k2/a", {"n": 1}, prefix="w/k2/", cap=1, ttl_s=0.05)).created
    assert not (await one.insert("handoffs", "w/k2/b", {"n": 2}, prefix="w/k2/", cap=1)).created
    await asyncio.sleep(0.1)
    assert (await two.insert("handoffs", "w/k2/b", {"n": 2}, prefix="w/k2/", cap=1)).created  # the expired one left
    assert await one.scan("handoffs", "w/k2/") == [("w/k2/b", {"n": 2})]
    with pytest.raises(ValueError):
        await one.insert("handoffs", "elsewhere", {}, prefix="w/k3/", cap=1)


async def test_logs_tail_trim_and_follow_across_processes(stores: Callable[[], StateStore]) -> None:
    writer, reader = stores(), stores()
    await writer.append_many("events", [{"i": i} for i in range(5)])
    assert await reader.tail("events", 3) == [{"i": 2}, {"i": 3}, {"i": 4}]
    first = await reader.follow("events", "", limit=2)
    assert [r for _, r in first] == [{"i": 0}, {"i": 1}]
    rest = await reader.follow("events", first[-1][0], limit=100)
    assert [r for _, r in rest] == [{"i": 2}, {"i": 3}, {"i": 4}]
    assert await reader.follow("events", rest[-1][0]) == []

    async def later() -> None:
        await asyncio.sleep(0.2)
        await writer.append("events", {"i": 5})

    task = asyncio.ensure_future(later())
    woken = await reader.follow("events", rest[-1][0], block_s=4.0)  # waits for the other process's write
    await task
    assert [r for _, r in woken] == [{"i": 5}]
    for hostile in ("abc", "-1", "1e3", "²", "../x", "9" * 25, "1-2-3"):  # what a client may send to resume
        with pytest.raises(ValueError, match="not a log cursor"):
            await reader.follow("events", hostile)
    assert await writer.trim("events", 2) == 4
    assert await reader.tail("events") == [{"i": 4}, {"i": 5}]


async def test_logs_are_trimmed_by_age_and_a_finished_log_expires_whole(stores: Callable[[], StateStore]) -> None:
    """Retention: ``trim(before=)`` drops what was appended before an instant (Redis ``XTRIM MINID``), with ``keep``
    too; ``expire_log`` makes a finished run's log go whole (Redis ``PEXPIRE``), other logs untouched; ``None``
    keeps a log that is written to again."""
    writer, reader = stores(), stores()
    await writer.append_many("calls", [{"i": 0}, {"i": 1}])
    await asyncio.sleep(0.02)
    cut = time.time()
    await asyncio.sleep(0.02)
    await writer.append_many("calls", [{"i": 2}, {"i": 3}, {"i": 4}])
    assert await writer.trim("calls", before=cut) == 2
    assert await reader.tail("calls") == [{"i": 2}, {"i": 3}, {"i": 4}]
    assert await writer.trim("calls", 5, before=cut) == 0 and await writer.trim("calls", 1, before=cut) == 2
    assert await reader.tail("calls") == [{"i": 4}]

    for run in ("run-events:exec:r1", "run-events:exec:r2", "batch-events:b1"):
        await writer.append_many(run, [{"seq": 1}, {"end": True}])
    await writer.expire_log("run-events:exec:r1", 0.05)
    await writer.expire_log("batch-events:b1", 0.05)
    await writer.expire_log("batch-events:b1", None)  # the batch runs again: its log stays
    assert [r for _, r in await reader.follow("run-events:exec:r1")] == [{"seq": 1}, {"end": True}]
    await asyncio.sleep(0.15)
    assert await reader.follow("run-events:exec:r1") == [] and await reader.tail("run-events:exec:r1") == []
    assert len(await reader.follow("run-events:exec:r2")) == 2 and len(await reader.tail("batch-events:b1")) == 2


async def test_sqlite_sweeps_expired_logs_in_steps_in_the_background(tmp_path: Path) -> None:
    """The embedded store deletes expired logs itself: a write that finds the last sweep SWEEP_S old (on the
    store's clock, moved here) starts one in the background, which deletes SWEEP_ROWS rows per step on the store's
    thread; a log whose expiry was lifted meanwhile, and logs that never expire, are left alone."""
    from scillm_core.state import sqlite

    now = [1_000_000.0]
    store = SQLiteStore(tmp_path / "state.sqlite3", clock=lambda: now[0])
    other = SQLiteStore(tmp_path / "state.sqlite3", clock=lambda: now[0])  # another process on the same file

    def rows(namespace: str) -> int:
        return int(store._db.execute("SELECT count(*) FROM logs WHERE ns = ?", (namespace,)).fetchone()[0])

    try:
        await store.append_many("run-events:exec:old", [{"seq": i} for i in range(12)])
        await store.append_many("run-events:exec:kept", [{"seq": 1}])
        await store.append_many("calls", [{"i": 1}])
        await store.expire_log("run-events:exec:old", 7 * 86400.0)
        await other.expire_log("run-events:exec:kept", 7 * 86400.0)
        await other.expire_log("run-events:exec:kept", None)
        now[0] += 7 * 86400.0 - 1
        assert len(await other.tail("run-events:exec:old")) == 12  # a second before its expiry
        now[0] += 1
        assert await other.tail("run-events:exec:old") == []  # expired: not readable, deleted by the next sweep
        assert rows("run-events:exec:old") == 12
        sqlite.SWEEP_ROWS, before = 5, sqlite.SWEEP_ROWS
        try:
            await store.append("calls", {"i": 2})  # a write, a week after the last sweep: one starts
            assert store.sweeper is not None
            assert await store.sweeper == 12
        finally:
            sqlite.SWEEP_ROWS = before
        assert rows("run-events:exec:old") == 0 and rows("run-events:exec:kept") == 1 and rows("calls") == 2
        assert store._db.execute("SELECT count(*) FROM log_expiry").fetchone()[0] == 0
        sweeper = store.sweeper
        await store.append("calls", {"i": 3})
        assert store.sweeper is sweeper  # the next one only SWEEP_S later
    finally:
        await store.close()
        await other.close()


async def test_sqlite_expires_documents_on_its_clock_and_its_sweep_deletes_them(tmp_path: Path) -> None:
    """A document with a TTL (a handoff kept for its lifetime) expires on the store's clock (injected here) and
    no longer counts against an insert's cap; its row, which nothing reads any more, is deleted by the same sweep
    as expired logs, which a write of an expiring document starts too. Documents without a TTL stay."""
    from scillm_core.state import sqlite

    now = [1_000_000.0]
    store = SQLiteStore(tmp_path / "state.sqlite3", clock=lambda: now[0])

    def rows() -> list[str]:
        return [k for (k,) in store._db.execute("SELECT key FROM docs WHERE ns = 'h' ORDER BY key")]

    try:
        for i in range(7):
            assert (await store.insert("h", f"w/k/{i}", {"i": i}, prefix="w/k/", cap=7, ttl_s=7 * 86400.0)).created
        await store.put("h", "w/kept", {"kept": True})
        assert not (await store.insert("h", "w/k/new", {}, prefix="w/k/", cap=7, ttl_s=60.0)).created
        now[0] += 7 * 86400.0 - 1
        assert len(await store.scan("h", "w/k/")) == 7 and await store.get("h", "w/k/0") == {"i": 0}
        now[0] += 1
        assert await store.get("h", "w/k/0") is None and await store.scan("h", "w/") == [("w/kept", {"kept": True})]
        assert (await store.insert("h", "w/k/new", {}, prefix="w/k/", cap=1, ttl_s=60.0)).created
        assert len(rows()) == 9  # unreadable, not yet deleted
        sqlite.SWEEP_ROWS, before = 3, sqlite.SWEEP_ROWS
        try:
            assert store.sweeper is not None  # the insert, a week after the last sweep, started one
            assert await store.sweeper == 7
        finally:
            sqlite.SWEEP_ROWS = before
        assert rows() == ["w/k/new", "w/kept"]
    finally:
        await store.close()


async def test_redis_sweeps_the_index_members_of_expired_documents_once_across_processes(redis_server: Any) -> None:
    """A document with a TTL (a kept Responses item, a cached answer) expires in Redis, but its namespace's index
    member stayed until a scan met it: a namespace nobody scans grew by a member per document for good. A write with
    a TTL starts a sweep when the last is ``SWEEP_S`` old; it drops the members of documents that are gone, in steps,
    and keeps the others; another process's sweep within ``SWEEP_S`` leaves the namespace alone."""
    from scillm_core.state import redis as redis_state

    prefix = f"sweep:{uuid.uuid4().hex[:8]}:"
    store, other = RedisStore(redis_server.url, prefix=prefix), RedisStore(redis_server.url, prefix=prefix)
    index = f"{prefix}i:15:responses.items"
    before = redis_state.SWEEP_ROWS
    redis_state.SWEEP_ROWS = 3
    try:
        await store.put_many("responses.items", [(f"k/{i}", {"i": i}) for i in range(7)], ttl_s=0.05)
        await store.put_many("responses.items", [("k/stays", {"n": 1}), ("k/lasts", {"n": 2})])
        await store.put("responses.items", "k/later", {"n": 3}, ttl_s=60.0)
        await asyncio.sleep(0.1)
        assert await store.redis.zcard(index) == 10  # the expired seven are still members
        store.next_sweep = 0.0  # as if SWEEP_S had passed since the last
        await store.compare_and_set("responses.items", "k/cas", None, {"n": 4}, ttl_s=60.0)
        assert store.sweeper is not None
        assert await store.sweeper == 7
        assert sorted(m.decode() for m in await store.redis.zrange(index, 0, -1)) == [
            "k/cas", "k/lasts", "k/later", "k/stays"]
        await other.put("responses.items", "k/gone", {"n": 5}, ttl_s=0.05)
        await asyncio.sleep(0.1)
        other.next_sweep = 0.0
        await other.put("responses.items", "k/more", {"n": 6}, ttl_s=60.0)
        assert other.sweeper is not None and await other.sweeper == 0  # swept by the first within SWEEP_S
    finally:
        redis_state.SWEEP_ROWS = before
        await store.close()
        await other.close()


async def test_a_redis_namespace_emptied_is_swept_no_more(redis_server: Any) -> None:
    """Each batch leases its items in a namespace of its own, with a TTL, and deletes the leases as the items end: a
    process that ran many batches must not sweep every one of their namespaces every ``SWEEP_S`` for good. A sweep
    that leaves a namespace empty forgets it, until it is written with a TTL again."""
    import redis.asyncio

    prefix = f"sweeps:{uuid.uuid4().hex[:8]}:"
    store = RedisStore(redis_server.url, prefix=prefix)
    client = redis.asyncio.Redis.from_url(redis_server.url)

    async def commands_of_a_sweep() -> int:
        markers = [key async for key in client.scan_iter(prefix + "sw:*")]
        if markers:
            await client.delete(*markers)  # as if SWEEP_S had passed
        stats = await client.info("commandstats")
        before = sum(int(v["calls"]) for v in stats.values())
        await store.sweep()
        stats = await client.info("commandstats")
        return sum(int(v["calls"]) for v in stats.values()) - before - 1

    try:
        for n in range(40):  # forty batches' leases, taken and given back
            await store.put(f"batch-leases:b{n}", "item", {"owner": "me"}, ttl_s=60.0)
            await store.delete(f"batch-leases:b{n}", "item")
        await store.put("responses.items", "kept", {"n": 1}, ttl_s=60.0)
        first = await commands_of_a_sweep()
        assert await commands_of_a_sweep() < first / 10  # the kept item's namespace alone, not forty more
        await store.put("batch-leases:b0", "item", {"owner": "me"}, ttl_s=0.05)  # written again: swept again
        await asyncio.sleep(0.1)
        await store.sweep()
        assert await client.zcard(f"{prefix}i:15:batch-leases:b0") == 0
    finally:
        await client.aclose()
        await store.close()


async def test_sqlite_counters_slots_and_queue_claims_lapse_on_its_clock(tmp_path: Path) -> None:
    """A rate window (a counter with a TTL), a slot lease and a queue claim lapse on the store's clock, as documents
    do: moved here, with no sleep. (Redis keeps its server's clock for all of them.)"""
    now = [1_000_000.0]
    store = SQLiteStore(tmp_path / "state.sqlite3", clock=lambda: now[0])
    try:
        assert (await store.count("b", [[Count("rpm", 1, limit=1, ttl_s=60.0)]]))[0].applied
        now[0] += 59.0
        assert (await store.count("b", [[Count("rpm")]]))[0].values == (1,)  # read on the caller's thread
        assert not (await store.count("b", [[Count("rpm", 1, limit=1)]]))[0].applied
        now[0] += 1.0
        assert (await store.count("b", [[Count("rpm")]]))[0].values == (0,) and store.peek("b", "rpm") == 0.0
        assert (await store.count("b", [[Count("rpm", 1, limit=1)]]))[0].applied  # a new window

        assert await store.hold_slots("openai", "a", 0, 2, 2, ttl_s=30.0) == 2
        assert await store.hold_slots("openai", "b", 0, 1, 2, ttl_s=30.0) == 0
        now[0] += 30.0  # "a" never renewed: its lease lapsed
        assert await store.slots_held("openai") == 0
        assert await store.hold_slots("openai", "b", 0, 2, 2, ttl_s=30.0) == 2

        [held] = await store.enqueue("work", [{"n": 1}])
        assert [i for i, _ in await store.take("work", "A", 1)] == [held]
        assert await store.reclaim("work", "B", idle_s=30.0, count=1) == []
        now[0] += 20.0
        assert await store.touch("work", "A", [held]) == 1
        now[0] += 20.0  # 40 s since the claim, 20 since the touch
        assert await store.reclaim("work", "B", idle_s=30.0, count=1) == []
        now[0] += 10.0
        assert [i for i, _ in await store.reclaim("work", "B", idle_s=30.0, count=1)] == [held]
    finally:
        await store.close()


async def test_queue_every_entry_to_one_consumer_until_acknowledged(stores: Callable[[], StateStore]) -> None:
    a, b = stores(), stores()
    ids = await a.enqueue("work", [{"n": n} for n in range(50)])
    assert len(set(ids)) == 50
    taken_a, taken_b = await asyncio.gather(a.take("work", "A", 30), b.take("work", "B", 30))
    got = [e["n"] for _, e in taken_a] + [e["n"] for _, e in taken_b]
    assert sorted(got) == list(range(50))  # every entry once, to one consumer
    assert await a.queue_depth("work") == {"waiting": 0, "claimed": 50}
    await a.ack("work", [i for i, _ in taken_a])
    await b.ack("work", [i for i, _ in taken_b])
    assert await b.queue_depth("work") == {"waiting": 0, "claimed": 0}
    assert await a.take("work", "A", 10) == []

    async def later() -> None:
        await asyncio.sleep(0.2)
        await a.enqueue("work", [{"n": "late"}])

    task = asyncio.ensure_future(later())
    late = await b.take("work", "B", 10, block_s=4.0)
    await task
    assert [e for _, e in late] == [{"n": "late"}]


async def test_queue_flows_take_turns_so_a_big_flow_enqueued_first_does_not_hold_up_a_small_one(
        stores: Callable[[], StateStore]) -> None:
    """A batch of 40 entries, then one of 3: the small one's entries come within the first takes, alternating with
    the big one's, not after all 40; acknowledged, flows drain, and a later enqueue of a drained flow still works.
    Every entry reaches exactly one consumer, through takes of one process and of another."""
    a, b = stores(), stores()
    big = await a.enqueue("turns", [{"f": "big", "n": n} for n in range(40)], flow="batch-big")
    small = await a.enqueue("turns", [{"f": "small", "n": n} for n in range(3)], flow="batch-small")
    assert len(set(big + small)) == 43
    first = await a.take("turns", "A", 4)
    assert sorted(e["f"] for _, e in first) == ["big", "big", "small", "small"]
    assert [e["n"] for _, e in first if e["f"] == "small"] == [0, 1]  # each flow in its own order
    ones = [e["f"] for _ in range(3) for _, e in await b.take("turns", "B", 1)]
    assert ones.count("small") == 1 and ones.count("big") == 2  # one at a time: the flows still alternate
    rest = await a.take("turns", "A", 100)
    taken = [*first, *rest]
    assert len(rest) == 36 and len({i for i, _ in taken}) == 40
    assert await a.queue_depth("turns") == {"waiting": 0, "claimed": 43}
    await a.ack("turns", [i for i, _ in taken])
    await b.ack("turns", list({*big, *small} - {i for i, _ in taken}))
    assert await a.queue_depth("turns") == {"waiting": 0, "claimed": 0}
    assert await a.take("turns", "A", 10) == []
    again = await b.enqueue("turns", [{"f": "small", "n": 3}], flow="batch-small")
    assert [(i, e) for i, e in await a.take("turns", "A", 10)] == [(again[0], {"f": "small", "n": 3})]


async def test_flow_groups_take_turns_so_a_key_with_many_batches_gets_one_turn_per_round(
        stores: Callable[[], StateStore]) -> None:
    """Key a's five batches of 10 entries, then key b's one of 3 (flows ``<key>/<batch>``): b's entries come every
    round, half of a take, not one flow in six; a's batches take turns, one entry each, from take to take."""
    a = stores()
    for n in range(5):
        await a.enqueue("groups", [{"f": f"a{n}", "n": i} for i in range(10)], flow=f"key_a/batch{n}")
    await a.enqueue("groups", [{"f": "b", "n": i} for i in range(3)], flow="key_b/batch")
    first = [(e["f"], e["n"]) for _, e in await a.take("groups", "A", 4)]
    assert sorted(first) == [("a0", 0), ("a1", 0), ("b", 0), ("b", 1)]
    second = [(e["f"], e["n"]) for _, e in await a.take("groups", "A", 2)]
    assert sorted(second) == [("a2", 0), ("b", 2)]  # the next of a's batches
    third = [(e["f"], e["n"]) for _, e in await a.take("groups", "A", 4)]
    assert sorted(third) == [("a0", 1), ("a1", 1), ("a3", 0), ("a4", 0)]  # b has nothing left to take: a alone
    rest = await a.take("groups", "A", 100)
    assert len(rest) == 43 and len({(e["f"], e["n"]) for _, e in rest} | {*first, *second, *third}) == 53


async def _work_of(store: StateStore, action: Callable[[], Any]) -> int:
    """What the backend did for ``action``: SQLite's virtual machine steps (in hundreds), Redis's commands (those its
    scripts ran included)."""
    if isinstance(store, SQLiteStore):
        steps = [0]

        def step() -> int:
            steps[0] += 1
            return 0

        store._db.set_progress_handler(step, 100)
        try:
            await action()
        finally:
            store._db.set_progress_handler(None, 0)
        return steps[0]
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(store.url)  # type: ignore[attr-defined]

    async def commands() -> int:
        stats = await client.info("commandstats")
        return sum(int(v["calls"]) for name, v in stats.items() if name != "cmdstat_info")

    try:
        before = await commands()
        await action()
        return await commands() - before - 1  # the first INFO's own reply is counted after it ran
    finally:
        await client.aclose()


async def test_a_take_and_a_reclaim_cost_what_they_give_not_one_look_per_flow_waiting(
        stores: Callable[[], StateStore]) -> None:
    """A key with 300 one-entry batches waiting (and another key with one) must not make every take of every process
    cost 300 looks: a take of 2 (one entry of each key) and the reclaim after it do about the work they do with 3
    flows waiting."""
    a = stores()

    async def fill(queue: str, batches: int) -> None:
        await a.enqueue(queue, [{"key": "b"}], flow="key_b/only")
        for n in range(batches):
            await a.enqueue(queue, [{"key": "a", "n": n}], flow=f"key_a/batch{n:03}")

    work = {}
    for queue, batches in (("few", 2), ("many", 300)):
        await fill(queue, batches)
        got: list[tuple[str, dict[str, Any]]] = []

        async def take(queue: str = queue, got: list[tuple[str, dict[str, Any]]] = got) -> None:
            got.extend(await a.take(queue, "A", 2))

        work[queue] = await _work_of(a, take)
        assert sorted(e["key"] for _, e in got) == ["a", "b"]  # the keys took turns
        work[queue + " reclaim"] = await _work_of(a, lambda queue=queue: a.reclaim(queue, "B", 60.0, 10))
    assert work["many"] <= 2 * work["few"] + 5, work
    assert work["many reclaim"] <= 2 * work["few reclaim"] + 5, work


async def test_a_redis_queue_from_before_flow_rings_is_taken_from(redis_server: RedisServer) -> None:
    """Entries enqueued by the version before flow rings (a stream per flow and the set of flows, no rings) are
    taken after the upgrade, once each, alongside new ones."""
    import redis.asyncio

    store = RedisStore(redis_server.url, prefix=f"upgrade:{uuid.uuid4().hex[:8]}:")
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        for flow in ("old-batch", "key_x/old"):
            key = store._stream("work", flow)
            await client.xgroup_create(key, "work", id="0", mkstream=True)
            for n in range(2):
                await client.xadd(key, {"v": f'{{"flow": "{flow}", "n": {n}}}'})
            await client.sadd(store.prefix + "qf:4:work", flow)
        await store.enqueue("work", [{"flow": "key_y/new", "n": 0}], flow="key_y/new")
        taken = await store.take("work", "A", 10)
        assert sorted((e["flow"], e["n"]) for _, e in taken) == [
            ("key_x/old", 0), ("key_x/old", 1), ("key_y/new", 0), ("old-batch", 0), ("old-batch", 1)]
        await store.ack("work", [i for i, _ in taken])
        assert await store.take("work", "A", 10) == []
        assert await store.queue_depth("work") == {"waiting": 0, "claimed": 0}
    finally:
        await client.aclose()
        await store.close()


async def test_with_more_keys_waiting_than_a_take_gives_the_next_take_goes_on_to_the_next_keys(
        stores: Callable[[], StateStore]) -> None:
    """Six keys with a batch each, takes of two: three takes reach all six keys once, instead of the first keys again
    (a key that arrives last waits for the keys before it, not for turns that slide one key per take)."""
    a = stores()
    for k in range(6):
        await a.enqueue("keys", [{"k": k, "n": n} for n in range(5)], flow=f"key_{k}/batch")
    served = [e["k"] for _ in range(3) for _, e in await a.take("keys", "A", 2)]
    assert sorted(served) == [0, 1, 2, 3, 4, 5]


async def test_entries_of_no_flow_take_turns_with_the_flows_not_after_them(stores: Callable[[], StateStore]) -> None:
    """Entries enqueued without a flow (another plugin's queue, a queue from before flows) are a flow like the others:
    under a steady batch their turn comes every round."""
    a = stores()
    await a.enqueue("mixed", [{"f": "batch", "n": n} for n in range(10)], flow="key_a/batch")
    await a.enqueue("mixed", [{"f": "none", "n": n} for n in range(10)])
    first = await a.take("mixed", "A", 4)
    assert sorted(e["f"] for _, e in first) == ["batch", "batch", "none", "none"]
    rest = await a.take("mixed", "A", 100)
    assert len(rest) == 16
    await a.ack("mixed", [i for i, _ in first + rest])
    assert await a.queue_depth("mixed") == {"waiting": 0, "claimed": 0}


async def test_a_redis_queue_mark_lapses_so_flows_an_older_instance_enqueues_join_the_rings(
        redis_server: RedisServer) -> None:
    """During a rolling upgrade an instance of the version before enqueues a batch as a stream and a member of the
    set of flows, without rings: the queue's mark lapses (ten minutes), after which the next take puts the flow in
    the rings and takes its entries."""
    import redis.asyncio

    store = RedisStore(redis_server.url, prefix=f"rolling:{uuid.uuid4().hex[:8]}:")
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        await store.enqueue("work", [{"flow": "new"}], flow="key_n/new")
        assert [e for _, e in await store.take("work", "A", 10)] == [{"flow": "new"}]
        mark = store.prefix + "qv:4:work"
        assert 0 < await client.pttl(mark) <= 600_000
        key = store._stream("work", "old-batch")  # what the version before writes
        await client.xgroup_create(key, "work", id="0", mkstream=True)
        await client.xadd(key, {"v": '{"flow": "old"}'})
        await client.sadd(store.prefix + "qf:4:work", "old-batch")
        await client.delete(mark)  # as it lapses
        assert [e for _, e in await store.take("work", "A", 10)] == [{"flow": "old"}]
    finally:
        await client.aclose()
        await store.close()


async def test_a_blocked_take_wakes_for_an_entry_of_a_new_flow(stores: Callable[[], StateStore]) -> None:
    a, b = stores(), stores()

    async def later() -> None:
        await asyncio.sleep(0.2)
        await a.enqueue("bell", [{"n": 1}], flow="new-batch")

    task = asyncio.ensure_future(later())
    got = await b.take("bell", "B", 10, block_s=4.0)
    await task
    assert [e for _, e in got] == [{"n": 1}]


async def test_a_flow_entry_held_by_a_dead_consumer_is_reclaimed_and_acknowledged_with_the_results_commit(
        stores: Callable[[], StateStore]) -> None:
    a, b = stores(), stores()
    await a.enqueue("flows", [{"n": 0}], flow="x")
    await a.enqueue("flows", [{"n": 1}], flow="y")
    assert len(await a.take("flows", "A", 2)) == 2
    await asyncio.sleep(0.35)
    reclaimed = await b.reclaim("flows", "B", idle_s=0.3, count=10)
    assert sorted(e["n"] for _, e in reclaimed) == [0, 1]
    done = await b.commit([Change("results", "x0", None, {"ok": True})], ack=("flows", [i for i, _ in reclaimed]))
    assert done == [True]
    assert await a.queue_depth("flows") == {"waiting": 0, "claimed": 0}


async def test_polling_an_empty_sqlite_queue_takes_no_write_lock(tmp_path: Path) -> None:
    """An idle process polls its work queue about four times a second; it must not queue up behind (or hold up)
    the other processes' writes: the poll finds nothing while another process holds the write lock."""
    import sqlite3

    store = SQLiteStore(tmp_path / "state.sqlite3")
    try:
        await store.enqueue("work", [{"n": 1}])
        assert len(await store.take("work", "A", 10)) == 1
        writer = sqlite3.connect(tmp_path / "state.sqlite3", isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
        try:
            assert await store.take("work", "A", 10) == []  # before: waited out busy_timeout, then "locked"
        finally:
            writer.execute("ROLLBACK")
            writer.close()
        await store.enqueue("work", [{"n": 2}])
        assert [e for _, e in await store.take("work", "A", 10)] == [{"n": 2}]
    finally:
        await store.close()


async def test_work_of_a_dead_consumer_is_reclaimed_and_a_live_one_keeps_its_own(
        stores: Callable[[], StateStore]) -> None:
    a, b = stores(), stores()
    await a.enqueue("jobs", [{"n": n} for n in range(4)])
    held = await a.take("jobs", "A", 4)
    assert await b.reclaim("jobs", "B", idle_s=0.3, count=10) == []  # too fresh
    await asyncio.sleep(0.4)
    assert await a.touch("jobs", "A", [held[0][0], held[1][0]]) == 2  # A is alive for two of them
    reclaimed = await b.reclaim("jobs", "B", idle_s=0.3, count=10)
    assert sorted(e["n"] for _, e in reclaimed) == [2, 3]
    assert await a.touch("jobs", "A", [held[2][0]]) == 0  # B holds it now: A's touch does not take it back
    await b.ack("jobs", [i for i, _ in reclaimed])
    await a.ack("jobs", [held[0][0], held[1][0]])
    assert await a.queue_depth("jobs") == {"waiting": 0, "claimed": 0}


async def test_health_names_the_backend(stores: Callable[[], StateStore]) -> None:
    health = await stores().health()
    assert health["reachable"] is True and health["backend"] in ("sqlite", "redis")


async def test_redis_down_is_a_quick_503_never_a_hang(tmp_path: Path) -> None:
    store = RedisStore(f"redis://:hunter2secret@127.0.0.1:{free_port()}/0", timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(StateUnavailable) as caught:
        await store.get("ns", "k")
    assert time.monotonic() - started < 5
    assert caught.value.status == 503 and "hunter2secret" not in caught.value.message
    assert "127.0.0.1" in caught.value.message
    health = await store.health()
    assert health["reachable"] is False and "hunter2secret" not in str(health)
    await store.close()


async def test_a_redis_restart_loses_no_committed_connection(tmp_path: Path) -> None:
    """After redis-server restarts, the store reconnects by itself (and remakes a queue's consumer group)."""
    with RedisServer(tmp_path / "r") as server:
        store = RedisStore(server.url)
        await store.put("ns", "k", {"v": 1})
        await store.enqueue("q", [{"n": 1}])
        [(held, _)] = await store.take("q", "A", 10)
        server.kill()
        with pytest.raises(StateUnavailable):
            await store.get("ns", "k")
        server.start()
        await store.put("ns", "k", {"v": 2})
        assert await store.get("ns", "k") == {"v": 2}
        assert await store.touch("q", "A", [held]) == 0  # its group went with the data: A holds nothing there
        assert await store.reclaim("q", "B", 0.0, 10) == [] and await store.take("q", "A", 10) == []
        await store.enqueue("q", [{"n": 2}])  # the group is made again
        assert [e for _, e in await store.take("q", "A", 10)] == [{"n": 2}]
        await store.close()


async def test_slot_and_counter_calls_come_back_after_a_redis_restart(tmp_path: Path) -> None:
    """The slot calls' own connection is replaced and their script loaded again into the fresh server; the counters
    (on the pool) come back too."""
    with RedisServer(tmp_path / "r") as server:
        store = RedisStore(server.url)
        assert await store.hold_slots("p", "a", 0, 1, 4, ttl_s=5) == 1
        assert (await store.count("n", [[Count("k", 1.0, limit=2)]]))[0].applied
        server.kill()
        with pytest.raises(StateUnavailable):
            await store.hold_slots("p", "a", 1, 1, 4, ttl_s=5)
        with pytest.raises(StateUnavailable):
            await store.count("n", [[Count("k", 1.0, limit=2)]])
        server.start()  # no data kept, no script cached
        assert await store.hold_slots("p", "a", 0, 3, 4, ttl_s=5) == 3
        assert await store.count("n", [[Count("k", 1.0, limit=2)]]) == [Counted(True, (1.0,))]
        await store.close()


async def test_a_slot_call_abandoned_halfway_never_hands_its_reply_to_the_next(redis_server: RedisServer) -> None:
    """A caller that leaves while its reply is on the way (cancelled, timed out) must not leave that reply for the
    next call on the same connection to read as its own."""
    import redis.asyncio as aioredis

    store = RedisStore(redis_server.url, prefix=f"abandon:{uuid.uuid4().hex[:8]}:")
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await store.hold_slots("p", "warm", 0, 0, 4, ttl_s=5) == 0  # its connection is open
        await admin.execute_command("CLIENT", "PAUSE", 300, "ALL")  # the server holds every reply back for 0.3 s
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(store.hold_slots("p", "a", 0, 3, 4, ttl_s=5), 0.05)
        # whether or not a's call ran once the pause ended, b's answer is b's own: the one slot it asked for
        assert await store.hold_slots("p", "b", 0, 1, 4, ttl_s=5) == 1
        assert await store.slots_held("p") in (1, 4)
    finally:
        await admin.aclose()
        await store.close()


def test_state_table_chooses_the_backend(tmp_path: Path) -> None:
    from scillm_core.builtin.core import scillm_config_sections

    def config(table: dict[str, Any], env: dict[str, str] | None = None) -> Config:
        return Config(tables={"state": table}, env=Env(env or {}), data_dir=tmp_path).with_sections(
            scillm_config_sections())

    assert isinstance(open_store(Config(data_dir=tmp_path)), SQLiteStore)
    store = open_store(config({"backend": "redis"}, {"REDIS_URL": "redis://127.0.0.1:1/0"}))
    assert isinstance(store, RedisStore) and store.url == "redis://127.0.0.1:1/0"
    with pytest.raises(ConfigError, match="redis_url"):
        open_store(config({"backend": "redis"}))
    with pytest.raises(ConfigError, match=r"backend must be .sqlite. or .redis., not .mongo. at state"):
        config({"backend": "mongo"})
    assert StateConfig().backend == "sqlite"


async def test_slots_hold_a_limit_across_processes_and_lapse_when_not_renewed(
        stores: Callable[[], StateStore]) -> None:
    a, b = stores(), stores()
    held = {"h0": 0, "h1": 0, "h2": 0}

    async def take(store: StateStore, holder: str, want: int, ttl_s: float = 0.5) -> int:
        taken = await store.hold_slots("openai", holder, held[holder], want, 4, ttl_s)
        held[holder] += taken
        return taken

    racing = await asyncio.gather(*(s.hold_slots("openai", f"r{i}", 0, 1, 4, 0.5) for i, s in enumerate([a, b] * 10)))
    assert sum(racing) == 4  # twenty holders at once, two connections: four slots
    await asyncio.gather(*(s.hold_slots("openai", f"r{i}", 0, 0, 4, 0.5) for i, s in enumerate([a, b] * 10)))
    assert await a.slots_held("openai") == 0
    assert await take(a, "h0", 3) == 3 and await take(b, "h1", 3) == 1  # a holder's own calls come one at a time
    assert await b.slots_held("openai") == 4
    held["h0"] -= 1  # one given back: the holder's next call says so
    assert await take(b, "h2", 3) == 0 and await take(a, "h0", 0) == 0
    assert await take(b, "h2", 3) == 1 and await take(a, "h0", 1) == 0
    await asyncio.sleep(0.3)
    assert await take(a, "h2", 0, ttl_s=5) == 0  # h2 renews its one slot; h0 and h1 fall silent
    await asyncio.sleep(0.4)  # their processes are as good as dead: their slots lapsed
    assert await b.slots_held("openai") == 1
    assert await take(b, "h2", 5, ttl_s=5) == 3


async def test_a_holders_count_is_what_it_says_and_zero_leaves(stores: Callable[[], StateStore]) -> None:
    store = stores()
    assert await store.hold_slots("p", "a", 0, 3, 2, ttl_s=5) == 2
    # a reply that never arrived: "a" took 2 but counts 0; its next call sets the store's count right
    assert await store.hold_slots("p", "a", 0, 0, 2, ttl_s=5) == 0
    assert await store.slots_held("p") == 0
    assert await store.hold_slots("p", "b", 0, 2, 2, ttl_s=5) == 2
    assert await store.hold_slots("p", "a", 0, 1, 2, ttl_s=5) == 0
    # a holder back from a stall keeps the slots it still has in flight counted, above the limit if need be
    assert await store.hold_slots("p", "a", 1, 0, 2, ttl_s=5) == 0
    assert await store.slots_held("p") == 3
    assert await store.hold_slots("p", "b", 1, 1, 2, ttl_s=5) == 0
    assert await store.hold_slots("p", "a", 0, 0, 2, ttl_s=5) == 0
    assert await store.hold_slots("p", "b", 1, 1, 2, ttl_s=5) == 1
    assert await store.slots_held("p") == 2


async def test_a_commit_applies_each_change_on_its_own_announces_it_and_acknowledges_in_one_step(
        stores: Callable[[], StateStore]) -> None:
    from scillm_core.state import Change

    one, two = stores(), stores()
    await one.put("results", "held", {"by": "someone else"})
    ids = await one.enqueue("work", [{"n": n} for n in range(3)])
    taken = await two.take("work", "B", 3)
    done = await two.commit([
        Change("results", "a", None, {"v": 1}, log="announced", record={"item": "a"}),
        Change("results", "held", None, {"v": 2}, log="announced", record={"item": "held"}),  # not absent: refused
        Change("leases", "a", None, {"owner": "B"}, ttl_s=0.05),
    ], ack=("work", [i for i, _ in taken[:2]]))
    assert done == [True, False, True]
    assert await one.get_many("results", ["a", "held", "missing"]) == [{"v": 1}, {"by": "someone else"}, None]
    assert [r for _, r in await one.follow("announced")] == [{"item": "a"}]  # only what happened is announced
    assert await one.queue_depth("work") == {"waiting": 0, "claimed": 1}
    assert [i for i, _ in await one.reclaim("work", "A", 0, 10)] == [ids[2]]
    await asyncio.sleep(0.1)
    assert await two.commit([Change("leases", "a", None, {"owner": "A"}),  # the short lease expired: absent
                             Change("results", "a", {"v": 1}, None)]) == [True, True]
    assert await one.get_many("results", ["a"]) == [None] and await one.scan("results") == [
        ("held", {"by": "someone else"})]
    assert await one.commit([], ack=("work", [ids[2]])) == []
    assert await one.queue_depth("work") == {"waiting": 0, "claimed": 0}

    follower = await one.follow("announced")
    later = asyncio.ensure_future(one.follow("announced", follower[-1][0], block_s=4.0))
    await asyncio.sleep(0.1)
    await two.commit([Change("results", "b", None, {"v": 3}, log="announced", record={"item": "b"})])
    assert [r for _, r in await later] == [{"item": "b"}]  # a follower is woken by a commit's record


# -- counters (budgets, rate windows, concurrency caps) and log filters ---------------------------------------------

async def test_counter_groups_are_all_or_nothing_and_say_what_stood_in_the_way(
        stores: Callable[[], StateStore]) -> None:
    store = stores()
    first = await store.count("b", [[Count("usd", 6, limit=10), Count("rpm", 1, limit=2)]])
    refused = await store.count("b", [[Count("usd", 5, limit=10), Count("rpm", 1, limit=2)]])  # usd: 11 > 10
    read = await store.count("b", [[Count("usd"), Count("rpm")]])
    release = await store.count("b", [[Count("usd", -6), Count("rpm", -1, limit=2)]])  # no limit on the way down
    fractions = await store.count("b", [[Count("nano", 0.1 + 0.2), Count("nano", 1e15)]])  # one key twice
    assert [*first, *refused, *read, *release] == [
        Counted(True, (6, 1)), Counted(False, (6, 1)), Counted(True, (6, 1)), Counted(True, (0, 0))]
    assert fractions == [Counted(True, (0.1 + 0.2 + 1e15, 0.1 + 0.2 + 1e15))]  # both: the value after the group


async def test_many_groups_in_one_call_each_see_the_ones_before(stores: Callable[[], StateStore]) -> None:
    outcomes = await stores().count("b", [[Count("x", 1, limit=2)] for _ in range(5)])
    assert [o.applied for o in outcomes] == [True, True, False, False, False]
    assert [o.values for o in outcomes] == [(1,), (2,), (2,), (2,), (2,)]


async def test_counters_expire_and_a_change_without_ttl_keeps_the_expiry(stores: Callable[[], StateStore]) -> None:
    store = stores()
    await store.count("b", [[Count("w", 3, ttl_s=0.3), Count("keep", 1)]])
    await store.count("b", [[Count("w", 1)]])  # no ttl: the window still ends 0.3 s after its last ttl
    before = (await store.count("b", [[Count("w"), Count("keep")]]))[0].values
    await asyncio.sleep(0.5)
    after = (await store.count("b", [[Count("w"), Count("keep")]]))[0].values
    assert [*before, *after] == [4, 1, 0, 1]


async def test_concurrent_admissions_never_pass_a_limit_across_processes(stores: Callable[[], StateStore]) -> None:
    """Two connections stand for two processes (or instances): 200 reservations of 1 against a limit of 37."""
    pair = [stores(), stores()]
    outcomes = await asyncio.gather(*(pair[i % 2].count("b", [[Count("slot", 1, limit=37)]]) for i in range(200)))
    assert sum(o[0].applied for o in outcomes) == 37
    assert (await pair[1].count("b", [[Count("slot")]]))[0].values == (37,)


async def test_a_peek_sees_every_change_committed_before_it_or_says_to_count(
        stores: Callable[[], StateStore]) -> None:
    """SQLite reads a counter on the caller's thread, as fresh as count()'s read (another process's change
    committed just before is seen; absent or expired is 0); Redis has no such read and says so (None)."""
    reader, writer = stores(), stores()
    if isinstance(reader, RedisStore):
        await writer.count("v", [[Count("k", 1)]])
        assert reader.peek("v", "k") is None
        return
    assert reader.peek("v", "k") == 0.0
    for expected in (1, 2, 3):
        await writer.count("v", [[Count("k", 1), Count("other", 5)]])
        assert reader.peek("v", "k") == expected
    await writer.count("v", [[Count("gone", 4, ttl_s=0.05)]])
    assert reader.peek("v", "gone") == 4
    await asyncio.sleep(0.1)
    assert reader.peek("v", "gone") == 0.0
    assert reader.peek("w", "k") == 0.0 and reader.peek("v", "k'; DROP TABLE counters; --") == 0.0


async def test_counter_keys_and_namespaces_are_data(stores: Callable[[], StateStore]) -> None:
    store = stores()
    hostile = "k'); DROP TABLE counters; --\x00*?[]"
    await store.count("ns:a", [[Count(hostile, 2)]])
    assert (await store.count("ns:a", [[Count(hostile)], [Count("other")]])) == [Counted(True, (2,)),
                                                                                 Counted(True, (0,))]
    assert (await store.count("ns", [[Count(":a:" + hostile)]]))[0].values == (0,)  # no collision


async def test_tail_filters_by_time_and_fields_without_building_queries_from_values(
        stores: Callable[[], StateStore]) -> None:
    store = stores()
    await store.append_many("spend", [{"owner": "a", "n": 1}, {"owner": "b", "n": 2}])
    await store.append("spend", {"owner": "a", "n": 3, "run": None})
    await asyncio.sleep(0.01)
    middle = time.time()
    await asyncio.sleep(0.01)
    await store.append("spend", {"owner": "a'; DROP TABLE logs;--", "n": 4})
    await store.append_many("spend", [{"owner": "c", "n": n} for n in range(5, 1200)])
    a = await store.tail("spend", 10, match={"owner": "a"})
    late = await store.tail("spend", 2, since=middle)
    b = await store.tail("spend", 10, until=middle, match={"owner": "b"})
    hostile = await store.tail("spend", 10, match={"owner": "a'; DROP TABLE logs;--"})
    no_run = await store.tail("spend", 10, match={"run": None, "owner": "a"})
    assert [r["n"] for r in a] == [1, 3] and [r["n"] for r in late] == [1198, 1199] and [r["n"] for r in b] == [2]
    assert [r["n"] for r in hostile] == [4] and [r["n"] for r in no_run] == [1, 3]
    assert [r["n"] for r in await store.tail("spend", 3, until=middle)] == [1, 2, 3]


@pytest.mark.parametrize("field", ["owner') OR 1=1 --", "a.b", "", "1x", "x" * 65])
async def test_tail_refuses_field_names_that_are_not_identifiers(stores: Callable[[], StateStore], field: str) -> None:
    with pytest.raises(ValueError, match="plain identifiers"):
        await stores().tail("spend", 10, match={field: "x"})


async def test_a_take_finds_the_entry_behind_many_flows_it_has_given_everything(
        stores: Callable[[], StateStore]) -> None:
    """300 one-entry flows (one key's batches, and batches of their own) all given out by one take stay in their
    turns until a take finds them empty; an entry enqueued after them is taken by the next take of one, not left
    waiting while that take comes back empty (and a blocking one waits for a doorbell that already rang)."""
    a, b = stores(), stores()
    for n in range(150):
        await a.enqueue("behind", [{"n": n}], flow=f"key_a/batch{n:03}")
        await a.enqueue("behind", [{"n": 150 + n}], flow=f"solo{n:03}")
    assert len(await a.take("behind", "A", 300)) == 300
    new = await a.enqueue("behind", [{"n": "new"}], flow="key_z/new")
    assert [i for i, _ in await b.take("behind", "B", 1)] == new


async def test_reclaim_reaches_a_dead_consumers_entries_behind_many_a_live_one_keeps_touching(
        stores: Callable[[], StateStore]) -> None:
    """A live consumer holds (and touches) a flow's first 50 entries, a dead one its next 10: reclaims of one entry
    at a time (a busy process has little room) reach the dead one's entries, not only look at the live one's."""
    a, b, c = stores(), stores(), stores()
    await a.enqueue("held", [{"n": n} for n in range(60)], flow="key/batch")
    live = await a.take("held", "A", 50)
    dead = await b.take("held", "B", 10)
    assert len(live) == 50 and len(dead) == 10
    await asyncio.sleep(0.4)
    assert await a.touch("held", "A", [i for i, _ in live]) == 50
    reclaimed = []
    for _ in range(10):
        reclaimed += await c.reclaim("held", "C", idle_s=0.3, count=1)
    assert sorted(i for i, _ in reclaimed) == sorted(i for i, _ in dead)


async def test_entries_held_under_the_version_before_flow_rings_are_reclaimed(redis_server: RedisServer) -> None:
    """A queue from before flow rings with entries a consumer of that version took and never acknowledged (it died
    with the upgrade): a reclaim of the new version hands them on, before and after a take adopted the queue."""
    import redis.asyncio

    for take_first in (False, True):
        store = RedisStore(redis_server.url, prefix=f"upheld:{uuid.uuid4().hex[:8]}:")
        client = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            key = store._stream("work", "key_x/old")
            await client.xgroup_create(key, "work", id="0", mkstream=True)
            for n in range(2):
                await client.xadd(key, {"v": f'{{"n": {n}}}'})
            await client.sadd(store.prefix + "qf:4:work", "key_x/old")
            await client.xreadgroup("work", "old-consumer", {key: ">"}, count=10)
            if take_first:
                assert await store.take("work", "A", 10) == []
            reclaimed = await store.reclaim("work", "B", idle_s=0.0, count=10)
            assert sorted(e["n"] for _, e in reclaimed) == [0, 1], take_first
            await store.ack("work", [i for i, _ in reclaimed])
            assert await store.queue_depth("work") == {"waiting": 0, "claimed": 0}
        finally:
            await client.aclose()
            await store.close()


async def test_a_drained_redis_queue_keeps_no_key_per_flow_and_comes_back_after_losing_its_data(
        redis_server: RedisServer) -> None:
    """Flows of two keys taken by two consumers (one flow given out while the other consumer still held its
    entries), acknowledged by ack and by a results commit: after a take and a reclaim find nothing, only the queue's
    doorbell and mark are left, no stream, ring or set per flow. Then Redis loses its data while entries are held:
    their acknowledgement is a no-op, and the flows' next entries are taken."""
    import redis.asyncio

    prefix = f"drain:{uuid.uuid4().hex[:8]}:"
    a, b = RedisStore(redis_server.url, prefix=prefix), RedisStore(redis_server.url, prefix=prefix)
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        for flow in ("key_a/one", "key_a/two", "key_b/one", "solo"):
            await a.enqueue("work", [{"flow": flow, "n": n} for n in range(3)], flow=flow)
        first = await a.take("work", "A", 10)
        rest = await b.take("work", "B", 10)
        assert len(first) == 10 and len(rest) == 2
        assert await a.take("work", "A", 10) == []
        await a.ack("work", [i for i, _ in first[:5]])
        await b.commit([Change("results", "r", None, {"ok": True})], ack=("work", [i for i, _ in first[5:] + rest]))
        assert await b.take("work", "B", 10) == [] and await b.reclaim("work", "B", 0.0, 10) == []
        left = sorted(k.decode() for k in await client.keys(prefix + "q*"))
        assert left == [prefix + "qb:4:work", prefix + "qv:4:work"], left

        await a.enqueue("work", [{"n": 0}], flow="key_a/one")
        held = await a.take("work", "A", 10)
        await client.flushdb()
        await a.ack("work", [i for i, _ in held])
        assert await a.reclaim("work", "B", 0.0, 10) == []
        again = await b.enqueue("work", [{"n": 1}], flow="key_a/one")
        assert [i for i, _ in await a.take("work", "A", 10)] == again
    finally:
        await client.aclose()
        await a.close()
        await b.close()
