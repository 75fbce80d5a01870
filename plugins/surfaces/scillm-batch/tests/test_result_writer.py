"""Results finishing together share one store write, and each caller returns only once its own is stored."""

from __future__ import annotations

import asyncio
from typing import Any

from scillm_batch.engine import ResultWriter


class SlowStore:
    def __init__(self, fail: bool = False) -> None:
        self.writes: list[list[str]] = []
        self.stored: set[str] = set()
        self.fail = fail

    async def put_many(self, namespace: str, documents: Any) -> None:
        await asyncio.sleep(0.01)
        if self.fail:
            raise OSError("disk full")
        self.writes.append([key for key, _ in documents])
        self.stored.update(key for key, _ in documents)


def test_concurrent_results_share_writes_and_are_stored_before_put_returns() -> None:
    store = SlowStore()

    async def go() -> None:
        writer = ResultWriter(store, "batch-items:b1")

        async def one(i: int) -> None:
            await writer.put(f"item-{i}", {"ok": True})
            assert f"item-{i}" in store.stored

        await asyncio.gather(*(one(i) for i in range(64)))

    asyncio.run(go())
    assert sorted(key for write in store.writes for key in write) == sorted(f"item-{i}" for i in range(64))
    assert len(store.writes) <= 3  # the first result alone, then everything that finished meanwhile


def test_a_failed_write_fails_every_caller_in_it() -> None:
    async def go() -> list[Any]:
        writer = ResultWriter(SlowStore(fail=True), "batch-items:b1")
        return await asyncio.gather(*(writer.put(f"item-{i}", {}) for i in range(5)), return_exceptions=True)

    outcomes = asyncio.run(go())
    assert all(isinstance(o, OSError) for o in outcomes)
