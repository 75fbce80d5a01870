"""This process's share of every batch: the batch worker.

Every process on the state store runs one. It takes entries (one per item) from the shared work queue, runs them
through the lane dispatcher of their batch (:func:`scillm_batch.engine._dispatch`, one per batch and process), stores
each result and acknowledges the entry. With Redis the queue is a stream with a consumer group, so items spread over
every instance; with SQLite over the processes of one machine.

Exactly one stored result per item, across kills:

- an item runs only under its lease (a compare-and-set document with a TTL of ``[state] claim_timeout_s``, renewed
  while it runs), so two processes never run one item at once, even when it was queued twice (a resubmission while
  it ran);
- under the lease, a stored success (or a result of this run or a later one) means there is nothing to do: the
  entry is acknowledged without a call, so nothing stored is ever sent upstream again;
- the result is written by compare-and-set against what was there before, then reported on the batch's event log,
  then the entry is acknowledged; a process that dies anywhere in between leaves an entry that another process
  reclaims (``reclaim``: untouched for ``claim_timeout_s``) and finishes from where the store says it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

from attrs import define, field

from scillm_batch.engine import (
    BATCH_NS,
    ITEM_NS,
    BatchItem,
    BatchSpec,
    Lane,
    LaneState,
    Pending,
    _deadline,
    _dispatch,
    _storable,
    _unstored,
)
from scillm_core import Runtime, structure
from scillm_core.errors import StateUnavailable

__all__ = ["QUEUE", "Worker", "events_ns"]

log = logging.getLogger("scillm.batch")
QUEUE = "batch-work"
LEASES = "batch-leases:"
IDLE_S = 120.0  # a batch with no work here for this long is forgotten (its lanes' pauses and counts)


def events_ns(batch_id: str) -> str:
    return "batch-events:" + batch_id


@define
class Ticket:
    entry_id: str
    batch_id: str
    run: int
    item_id: str
    lease: dict[str, Any]
    prior: dict[str, Any] | None  # the stored result this run replaces (a failure of an earlier run), if any


@define
class LocalRun:
    """One batch's items in this process: its spec, lane states and the dispatcher that runs them."""

    spec: BatchSpec
    doc: dict[str, Any]
    lanes: list[LaneState]
    work: deque[Pending] = field(factory=deque)
    changed: asyncio.Event = field(factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    checked: float = 0.0  # when the doc was read or the dispatcher last went idle


class Worker:
    def __init__(self, runtime: Runtime, capacity: int) -> None:
        self.runtime = runtime
        self.capacity = max(1, capacity)
        self.me = runtime.instance_id
        self.claim_s = runtime.config.state.claim_timeout_s
        self.runs: dict[str, LocalRun] = {}
        self.loading: dict[str, asyncio.Future[LocalRun | None]] = {}
        self.held: dict[str, Ticket | None] = {}  # entry id -> its item once leased (None: waiting for the lease)
        self.deferred: list[tuple[str, dict[str, Any]]] = []  # entries whose lease another process holds
        self.room = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.counts = {"taken": 0, "reclaimed": 0, "stored": 0, "skipped": 0, "store_errors": 0}

    @property
    def store(self) -> Any:
        return self.runtime.store

    async def start(self) -> None:
        self.tasks = [asyncio.ensure_future(self._consume()), asyncio.ensure_future(self._keepalive())]

    async def stop(self) -> None:
        for run in self.runs.values():
            if run.task is not None:
                run.task.cancel()
        for task in self.tasks:
            task.cancel()
        for task in [*self.tasks, *(r.task for r in self.runs.values() if r.task is not None)]:
            with contextlib.suppress(BaseException):
                await task

    def describe(self) -> dict[str, Any]:
        return {"instance_id": self.me, "capacity": self.capacity, "held": len(self.held),
                "batches": sorted(self.runs), "claim_timeout_s": self.claim_s, **self.counts}

    # -- taking work -----------------------------------------------------------------------------------------------

    async def _consume(self) -> None:
        last_reclaim = 0.0
        while True:
            room = self.capacity - len(self.held)
            if room <= 0:
                self.room.clear()
                await self.room.wait()
                continue
            try:
                entries: list[tuple[str, dict[str, Any]]] = []
                if time.monotonic() - last_reclaim >= self.claim_s / 4:
                    last_reclaim = time.monotonic()
                    entries = await self.store.reclaim(QUEUE, self.me, self.claim_s, room)
                    self.counts["reclaimed"] += len(entries)
                if len(entries) < room:
                    entries += await self.store.take(QUEUE, self.me, room - len(entries),
                                                     block_s=0.0 if entries else min(1.0, self.claim_s / 4))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.counts["store_errors"] += 1
                log.warning("batch worker cannot read the work queue: %s", exc)
                await asyncio.sleep(1.0)
                continue
            self.counts["taken"] += len(entries)
            for entry_id, _ in entries:
                self.held[entry_id] = None
            await asyncio.gather(*(self._accept(entry_id, entry) for entry_id, entry in entries))

    async def _accept(self, entry_id: str, entry: dict[str, Any]) -> None:
        """Lease the item, check what is stored, and hand it to its batch's dispatcher (or acknowledge it)."""
        try:
            batch_id, run_no, item_id = str(entry["batch_id"]), int(entry["run"]), str(entry["item_id"])
            run = await self._run_for(batch_id, run_no)
            if run is None or run.doc.get("cancelled_run", 0) >= run_no:
                await self._done(entry_id)  # the batch is gone or this run was cancelled: nothing to start
                return
            lease = {"owner": self.me, "entry": entry_id, "run": run_no, "at": time.time()}
            if not await self.store.compare_and_set(LEASES + batch_id, item_id, None, lease, ttl_s=self.claim_s):
                self.deferred.append((entry_id, entry))  # another process runs it; look again later
                return
            stored = await self.store.get(ITEM_NS + batch_id, item_id)
            if stored is not None and (stored.get("ok") or int(stored.get("run", 0)) >= run_no):
                self.counts["skipped"] += 1
                await self.store.compare_and_set(LEASES + batch_id, item_id, lease, None)
                await self._done(entry_id)
                return
            ticket = Ticket(entry_id, batch_id, run_no, item_id, lease, stored)
            self.held[entry_id] = ticket
            item = BatchItem(index=int(entry.get("index", 0)), item_id=item_id, body=entry.get("body") or {})
            started = time.monotonic() - (time.time() - float(run.doc.get("run_started", time.time())))
            run.work.append(Pending(item, _deadline(item, run.spec, started), ticket=ticket))
            run.changed.set()
            if run.task is None or run.task.done():
                run.task = asyncio.ensure_future(self._drive(run))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store failed: the entry stays claimed and is taken up again later
            self.counts["store_errors"] += 1
            log.warning("batch worker could not start an item: %s", exc)
            self.held.pop(entry_id, None)
            self.room.set()

    async def _run_for(self, batch_id: str, run_no: int) -> LocalRun | None:
        """The batch's local run, its doc read once however many of its entries arrive together."""
        run = self.runs.get(batch_id)
        if run is not None and int(run.doc.get("run", 0)) >= run_no:
            return run
        loading = self.loading.get(batch_id)
        if loading is None:
            loading = self.loading[batch_id] = asyncio.ensure_future(self._load(batch_id))
            loading.add_done_callback(lambda _: self.loading.pop(batch_id, None))
        return await asyncio.shield(loading)

    async def _load(self, batch_id: str) -> LocalRun | None:
        run = self.runs.get(batch_id)
        doc = await self.store.get(BATCH_NS, batch_id)
        if doc is None:
            return None
        lanes = tuple(structure(lane, Lane, what="stored lane") for lane in doc.get("lane_specs") or ())
        spec = BatchSpec(batch_id=batch_id, pool=doc.get("pool", ""), lanes=lanes, items=(),
                         timeout_s=doc.get("timeout_s"), caller=doc.get("caller"), kind=doc.get("kind", "chat"),
                         trace=doc.get("trace") or {})
        if run is None:
            run = self.runs[batch_id] = LocalRun(spec=spec, doc=doc, lanes=[LaneState(lane) for lane in lanes])
        else:
            run.spec, run.doc = spec, doc
        run.checked = time.monotonic()
        return run

    async def _drive(self, run: LocalRun) -> None:
        async def finish(pending: Pending, result: dict[str, Any]) -> None:
            await self._finish(run, pending.ticket, result)

        try:
            await _dispatch(run.work, run.lanes, run.spec, self.runtime, finish, run.changed)
        finally:
            run.checked = time.monotonic()

    # -- finishing ---------------------------------------------------------------------------------------------

    async def _finish(self, run: LocalRun, ticket: Ticket, result: dict[str, Any]) -> None:
        """Store the result once (compare-and-set against what was there), report it, release and acknowledge.
        A store that is down is waited for: the result is kept until it can be written. A result the store refuses
        (or that cannot be serialised) is stored as a failure saying why, never lost."""
        result = _storable({**result, "run": ticket.run})
        event = {**result, "instance": self.me, "lane_counts": {
            s.lane.label: {"served": s.served, "rate_limited": s.rate_limited} for s in run.lanes}}
        while True:
            try:
                if await self.store.compare_and_set(ITEM_NS + ticket.batch_id, ticket.item_id, ticket.prior, result):
                    self.counts["stored"] += 1
                    await self.store.append(events_ns(ticket.batch_id), event)
                await self.store.compare_and_set(LEASES + ticket.batch_id, ticket.item_id, ticket.lease, None)
                await self._done(ticket.entry_id)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.counts["store_errors"] += 1
                if not isinstance(exc, StateUnavailable | OSError) and result.get("error_code") != "unstorable_result":
                    result = {**_unstored(result, exc), "run": ticket.run}  # this record, not the store, is the problem
                    event = {**result, "instance": self.me, "lane_counts": event["lane_counts"]}
                    continue
                log.warning("batch worker cannot store a result yet (retrying): %s", exc)
                await asyncio.sleep(0.5)

    async def _done(self, entry_id: str) -> None:
        await self.store.ack(QUEUE, [entry_id])
        self.held.pop(entry_id, None)
        self.room.set()

    # -- keeping claims alive ------------------------------------------------------------------------------------

    async def _keepalive(self) -> None:
        """Every quarter of the claim timeout: touch held entries and renew their leases (so no other process takes
        them over while they run), drop cancelled runs' waiting items, and look again at deferred entries."""
        while True:
            await asyncio.sleep(self.claim_s / 4)
            try:
                await self._tend()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.counts["store_errors"] += 1
                log.warning("batch worker cannot renew its claims: %s", exc)

    async def _tend(self) -> None:
        if self.held:
            await self.store.touch(QUEUE, self.me, list(self.held))
        for ticket in [t for t in self.held.values() if t is not None]:
            renewed = {**ticket.lease, "at": time.time()}
            if await self.store.compare_and_set(LEASES + ticket.batch_id, ticket.item_id, ticket.lease, renewed,
                                                ttl_s=self.claim_s):
                ticket.lease = renewed
        for batch_id, run in list(self.runs.items()):
            if (run.task is None or run.task.done()) and not run.work and time.monotonic() - run.checked > IDLE_S:
                del self.runs[batch_id]  # idle for a while: forget its lane states
                continue
            doc = await self.store.get(BATCH_NS, batch_id)
            if doc is not None:
                run.doc = doc
            cancelled = int(run.doc.get("cancelled_run", 0))
            for pending in [p for p in run.work if p.ticket.run <= cancelled]:
                run.work.remove(pending)
                await self.store.compare_and_set(LEASES + batch_id, pending.ticket.item_id, pending.ticket.lease,
                                                 None)
                await self._done(pending.ticket.entry_id)
        deferred, self.deferred = self.deferred, []
        await asyncio.gather(*(self._accept(entry_id, entry) for entry_id, entry in deferred))
