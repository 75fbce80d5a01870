"""A background writer for an append-only log: records are queued on the request path and written in batches.

The call log and the spend ledger use it. ``add`` never waits and never raises: a full backlog drops the record
(counted in ``counts["dropped"]``). The writer waits ``delay_s`` after the first record of a batch so that under
load one store write (one thread hop, one transaction) carries many records, and trims the log as it goes: to its
newest ``max_rows`` records and to none older than ``max_age_s`` (``StateStore.trim``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scillm_core.state import StateStore

__all__ = ["LogWriter"]

log = logging.getLogger("scillm.state")


class LogWriter:
    def __init__(self, store: Callable[[], StateStore], namespace: str, *, backlog: int = 1000,
                 max_rows: int | None = None, max_age_s: float | None = None, delay_s: float = 0.05,
                 prepare: Callable[[list[dict[str, Any]]], Sequence[dict[str, Any]]] | None = None,
                 describe_error: Callable[[BaseException], str] = str) -> None:
        self.store = store  # called at write time: the runtime's store opens on first use
        self.namespace = namespace
        self.backlog = max(1, backlog)
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self.clock = time.time  # what max_age_s is measured against (tests move it)
        self.delay_s = delay_s
        self.prepare = prepare  # e.g. redaction, once per batch
        self.describe_error = describe_error
        self.queue: asyncio.Queue[dict[str, Any]] | None = None
        self.task: asyncio.Task[None] | None = None
        self.counts = {"logged": 0, "dropped": 0, "write_errors": 0, "pruned": 0}
        self.unpruned = 0  # records written since the log was last trimmed
        self.stopped = False  # after stop() (calls cancelled late at shutdown): no new writer task

    @property
    def prune_every(self) -> int:
        """Records written between trims: a trim to ``max_rows`` reads through up to that many rows (SQLite), so a
        long log is trimmed every 1% of its length (a 5M-row log: every 50k records, ~100 rows read per record
        written, not 5,000)."""
        return max(1, min(1000, self.max_rows // 10), self.max_rows // 100) if self.max_rows else 1000

    @property
    def pending(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    def add(self, record: dict[str, Any]) -> bool:
        """Queue ``record``; ``False`` when the backlog is full (the record is dropped and counted)."""
        if self.stopped:
            return False
        try:
            if self.queue is None:
                self.queue = asyncio.Queue(maxsize=self.backlog)
            if self.task is None or self.task.done():
                self.task = asyncio.ensure_future(self._write())
            self.queue.put_nowait(record)
            return True
        except asyncio.QueueFull:
            self.counts["dropped"] += 1
            return False

    async def _write(self) -> None:
        assert self.queue is not None
        while True:
            records = [await self.queue.get()]
            await asyncio.sleep(self.delay_s)
            while len(records) < 512 and not self.queue.empty():
                records.append(self.queue.get_nowait())
            try:
                store = self.store()
                await store.append_many(self.namespace, self.prepare(records) if self.prepare else records)
                self.counts["logged"] += len(records)
                self.unpruned += len(records)
                if (self.max_rows is not None or self.max_age_s) and self.unpruned >= self.prune_every:
                    self.unpruned = 0
                    before = self.clock() - self.max_age_s if self.max_age_s else None
                    self.counts["pruned"] += await store.trim(self.namespace, self.max_rows, before=before)
            except Exception as exc:
                self.counts["write_errors"] += len(records)
                log.warning("%s log write failed: %s", self.namespace, self.describe_error(exc))
            finally:
                for _ in records:
                    self.queue.task_done()

    async def flush(self, timeout_s: float = 2.0) -> None:
        """Wait (up to ``timeout_s``) until everything queued so far is written."""
        if self.queue is not None and self.task is not None and not self.task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.queue.join(), timeout_s)

    async def stop(self) -> None:
        await self.flush()
        self.stopped = True
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
            self.task = None
