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
- the result is written by compare-and-set against what was there before and, in the same atomic step
  (``StateStore.commit``), reported on the batch's event log, its lease released and its entry acknowledged: a
  process that dies before leaves an entry that another process reclaims (``reclaim``: untouched for
  ``claim_timeout_s``) and runs; after, nothing is left to do.

Store writes are group commits (:class:`GroupCommit`): the leases of the items taken together are one write, and the
results of items that finish while a write is under way go together in the next one, so under load a handful of
transactions serve a wave of items instead of several each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any, NamedTuple

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
    _not_run,
    _storable,
    _unstored,
)
from scillm_core import Identity, Job, Runtime, errors, structure
from scillm_core.errors import StateUnavailable
from scillm_core.identity import owner_identity
from scillm_core.state import Change

__all__ = ["QUEUE", "GroupCommit", "Worker", "events_ns"]

log = logging.getLogger("scillm.batch")
QUEUE = "batch-work"
LEASES = "batch-leases:"
CANCEL_CHECK_S = 1.0  # how soon a run cancelled elsewhere starts nothing more here
IDLE_S = 120.0  # a batch with no work here for this long is forgotten (its lanes' pauses and counts)


def events_ns(batch_id: str) -> str:
    return "batch-events:" + batch_id


class Taken(NamedTuple):
    entry_id: str
    entry: dict[str, Any]
    batch_id: str
    run: int
    item_id: str


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
    job: Job
    work: deque[Pending] = field(factory=deque)
    changed: asyncio.Event = field(factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    checked: float = 0.0  # when the doc was read or the dispatcher last went idle
    refusal: errors.ScillmError | None = None  # why none of its items may run (its key was revoked or expired)


class GroupCommit:
    """``await commit(changes, ack)``: the changes and acknowledgements of every caller that arrives while a write is
    under way go together in the next ``StateStore.commit``; each caller gets whether each of its changes happened.
    When a group fails for a reason other than the store being unreachable (a record the store refuses), each
    caller's part is written on its own, so one bad record never takes the others with it."""

    def __init__(self, runtime: Runtime, queue: str) -> None:
        self.runtime = runtime
        self.queue = queue
        self.waiting: list[tuple[list[Change], list[str], asyncio.Future[list[bool]]]] = []
        self.task: asyncio.Task[None] | None = None
        self.commits = 0

    async def __call__(self, changes: list[Change], ack: list[str] = []) -> list[bool]:  # noqa: B006 (not mutated)
        future: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
        self.waiting.append((changes, ack, future))
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        while self.waiting:
            group, self.waiting = self.waiting, []
            try:
                done = await self._write(group)
            except Exception as exc:
                if len(group) == 1 or isinstance(exc, StateUnavailable | OSError):
                    for _, _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for part in group:  # find the one the store refuses: each on its own
                    try:
                        answer = await self._write([part])
                    except Exception as own:
                        if not part[2].done():
                            part[2].set_exception(own)
                        continue
                    if not part[2].done():
                        part[2].set_result(answer)
                continue
            at = 0
            for changes, _, future in group:
                if not future.done():
                    future.set_result(done[at:at + len(changes)])
                at += len(changes)

    async def _write(self, group: list[tuple[list[Change], list[str], asyncio.Future[list[bool]]]]) -> list[bool]:
        self.commits += 1
        return await self.runtime.store.commit([c for changes, _, _ in group for c in changes],
                                               ack=(self.queue, [i for _, ids, _ in group for i in ids]))

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


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
        self.commit = GroupCommit(runtime, QUEUE)
        self.counts = {"taken": 0, "reclaimed": 0, "stored": 0, "skipped": 0, "store_errors": 0}

    @property
    def store(self) -> Any:
        return self.runtime.store

    async def start(self) -> None:
        self.tasks = [asyncio.ensure_future(self._consume()), asyncio.ensure_future(self._keepalive()),
                      asyncio.ensure_future(self._watch_cancels())]

    async def stop(self) -> None:
        for run in self.runs.values():
            if run.task is not None:
                run.task.cancel()
        for task in self.tasks:
            task.cancel()
        for task in [*self.tasks, *(r.task for r in self.runs.values() if r.task is not None)]:
            with contextlib.suppress(BaseException):
                await task
        await self.commit.close()

    def describe(self) -> dict[str, Any]:
        return {"instance_id": self.me, "capacity": self.capacity, "held": len(self.held),
                "batches": sorted(self.runs), "claim_timeout_s": self.claim_s, "commits": self.commit.commits,
                **self.counts}

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
            if entries:
                await self._accept(entries)

    async def _accept(self, entries: list[tuple[str, dict[str, Any]]]) -> None:
        """Lease the items (one write), check what is stored (one read per batch), and hand them to their batches'
        dispatchers (or acknowledge them: nothing to do)."""
        try:
            taken = [Taken(entry_id, entry, str(entry["batch_id"]), int(entry["run"]), str(entry["item_id"]))
                     for entry_id, entry in entries]
            batches = sorted({t.batch_id for t in taken})
            loaded = await asyncio.gather(*(self._run_for(b, max(t.run for t in taken if t.batch_id == b))
                                            for b in batches))
            runs = dict(zip(batches, loaded, strict=True))
            live = [t for t in taken if (run := runs[t.batch_id]) is not None
                    and run.doc.get("cancelled_run", 0) < t.run]
            kept = {t.entry_id for t in live}
            gone = [t.entry_id for t in taken if t.entry_id not in kept]  # the batch is gone or the run cancelled
            leases = {t.entry_id: {"owner": self.me, "entry": t.entry_id, "run": t.run, "at": time.time()}
                      for t in live}
            won = await self.commit([Change(LEASES + t.batch_id, t.item_id, None, leases[t.entry_id],
                                            ttl_s=self.claim_s) for t in live], gone)
            self._release(gone)
            self.deferred += [(t.entry_id, t.entry) for t, ok in zip(live, won, strict=True) if not ok]
            leased = [t for t, ok in zip(live, won, strict=True) if ok]  # the others: another process runs them
            stored: dict[str, dict[str, Any] | None] = {}
            for batch_id in {t.batch_id for t in leased}:
                mine = [t for t in leased if t.batch_id == batch_id]
                found = await self.store.get_many(ITEM_NS + batch_id, [t.item_id for t in mine])
                stored.update(zip((t.entry_id for t in mine), found, strict=True))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store failed: the entries stay claimed and are taken up again later
            self.counts["store_errors"] += 1
            log.warning("batch worker could not start items: %s", exc)
            self._release([entry_id for entry_id, _ in entries])
            return
        done = {t.entry_id for t in leased if (prior := stored[t.entry_id]) is not None
                and (prior.get("ok") or int(prior.get("run", 0)) >= t.run)}
        if done:  # under the lease, a stored success (or a newer result): nothing to do
            self.counts["skipped"] += len(done)
            await self._finished([Change(LEASES + t.batch_id, t.item_id, leases[t.entry_id], None)
                                  for t in leased if t.entry_id in done], list(done))
        for t in leased:
            run = runs[t.batch_id]
            if t.entry_id in done or run is None:
                continue
            ticket = Ticket(t.entry_id, t.batch_id, t.run, t.item_id, leases[t.entry_id], stored[t.entry_id])
            self.held[t.entry_id] = ticket
            item = BatchItem(index=int(t.entry.get("index", 0)), item_id=t.item_id, body=t.entry.get("body") or {})
            if run.refusal is not None:  # never sent: the key that submitted it may no longer call anything
                await self._finish(run, ticket, _not_run(item, run.refusal))
                continue
            started = time.monotonic() - (time.time() - float(run.doc.get("run_started", time.time())))
            run.work.append(Pending(item, _deadline(item, run.spec, started), ticket=ticket))
            run.changed.set()
            if run.task is None or run.task.done():
                run.task = asyncio.ensure_future(self._drive(run))

    def _release(self, entry_ids: list[str]) -> None:
        """These entries are no longer this worker's to run: room for more."""
        for entry_id in entry_ids:
            self.held.pop(entry_id, None)
        if entry_ids:
            self.room.set()

    async def _finished(self, changes: list[Change], entry_ids: list[str]) -> None:
        """Release leases and acknowledge entries that need no result; a store that fails leaves them to reclaim."""
        try:
            await self.commit(changes, entry_ids)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.counts["store_errors"] += 1
            log.warning("batch worker could not acknowledge items: %s", exc)
        self._release(entry_ids)

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
        refusal = None
        try:  # who the items are charged to and limited as: the key that submitted the batch, as it is now
            identity = await owner_identity(self.runtime, doc.get("owner"))
        except errors.ScillmError as exc:
            identity, refusal = Identity(owner=str(doc.get("owner"))), exc
        spec = BatchSpec(batch_id=batch_id, pool=doc.get("pool", ""), lanes=lanes, items=(),
                         timeout_s=doc.get("timeout_s"), caller=doc.get("caller"), kind=doc.get("kind", "chat"),
                         trace=doc.get("trace") or {}, identity=identity, max_cost_usd=doc.get("max_cost_usd"))
        if run is None:
            run = self.runs[batch_id] = LocalRun(spec=spec, doc=doc, lanes=[LaneState(lane) for lane in lanes],
                                                 job=spec.job())
        else:
            run.spec, run.doc = spec, doc
            if (run.job.owner, run.job.max_cost_usd) != (spec.identity.owner, spec.max_cost_usd):
                run.job = spec.job()
        run.refusal = refusal
        run.checked = time.monotonic()
        return run

    async def _drive(self, run: LocalRun) -> None:
        async def finish(pending: Pending, result: dict[str, Any]) -> None:
            await self._finish(run, pending.ticket, result)

        try:
            await _dispatch(run.work, run.lanes, run.spec, self.runtime, finish, run.changed, run.job)
        finally:
            run.checked = time.monotonic()
        if run.work:  # handed over while the dispatcher wound down (it awaits its last calls after its last look):
            run.task = asyncio.ensure_future(self._drive(run))  # _accept saw it running and started none

    # -- finishing ---------------------------------------------------------------------------------------------

    async def _finish(self, run: LocalRun, ticket: Ticket, result: dict[str, Any]) -> None:
        """Store the result once (compare-and-set against what was there) and, in the same step, report it, release
        the lease and acknowledge the entry. A store that is down is waited for: the result is kept until it can be
        written. A result the store refuses (or that cannot be serialised) is stored as a failure saying why, never
        lost."""
        result = _storable({**result, "run": ticket.run})
        counts = {s.lane.label: {"served": s.served, "rate_limited": s.rate_limited} for s in run.lanes}
        while True:
            event = {**result, "instance": self.me, "lane_counts": counts}
            try:
                stored, _ = await self.commit([
                    Change(ITEM_NS + ticket.batch_id, ticket.item_id, ticket.prior, result,
                           log=events_ns(ticket.batch_id), record=event),
                    Change(LEASES + ticket.batch_id, ticket.item_id, ticket.lease, None)], [ticket.entry_id])
                self.counts["stored"] += stored
                self._release([ticket.entry_id])
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.counts["store_errors"] += 1
                if not isinstance(exc, StateUnavailable | OSError) and result.get("error_code") != "unstorable_result":
                    result = {**_unstored(result, exc), "run": ticket.run}  # this record, not the store, is the problem
                    continue
                log.warning("batch worker cannot store a result yet (retrying): %s", exc)
                await asyncio.sleep(0.5)

    # -- keeping claims alive ------------------------------------------------------------------------------------

    async def _keepalive(self) -> None:
        """Every quarter of the claim timeout: touch held entries and renew their leases (so no other process takes
        them over while they run), forget idle runs, and look again at deferred entries."""
        while True:
            await asyncio.sleep(self.claim_s / 4)
            try:
                await self._tend()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.counts["store_errors"] += 1
                log.warning("batch worker cannot renew its claims: %s", exc)

    async def _watch_cancels(self) -> None:
        """Every ``CANCEL_CHECK_S``: a run cancelled anywhere (its caller left) starts none of the items waiting
        here, and entries of it taken later are let go. One read per batch active here; none when nothing is."""
        while True:
            await asyncio.sleep(CANCEL_CHECK_S)
            for batch_id, run in list(self.runs.items()):
                if not run.work and (run.task is None or run.task.done()):
                    continue
                try:
                    doc = await self.store.get(BATCH_NS, batch_id)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.counts["store_errors"] += 1
                    log.warning("batch worker cannot read batch %s: %s", batch_id, exc)
                    continue
                if doc is not None:
                    run.doc = doc
                    await self.drop_cancelled(batch_id, int(doc.get("cancelled_run", 0)))

    async def drop_cancelled(self, batch_id: str, cancelled: int) -> None:
        """Runs up to ``cancelled`` of this batch start nothing more here: their waiting items are let go (their
        leases released, their entries acknowledged; the caller that left gets no result for them)."""
        run = self.runs.get(batch_id)
        if run is None:
            return
        if int(run.doc.get("cancelled_run", 0)) < cancelled:  # entries of it taken later are let go too
            run.doc = {**run.doc, "cancelled_run": cancelled}
        dropped = [p for p in run.work if p.ticket.run <= cancelled]
        for pending in dropped:
            run.work.remove(pending)
        if dropped:
            await self._finished([Change(LEASES + batch_id, p.ticket.item_id, p.ticket.lease, None)
                                  for p in dropped], [p.ticket.entry_id for p in dropped])

    async def _tend(self) -> None:
        if self.held:
            await self.store.touch(QUEUE, self.me, list(self.held))
        tickets = [t for t in self.held.values() if t is not None]
        if tickets:  # a renewal keeps the lease as it is and extends its TTL (one write for all of them)
            await self.commit([Change(LEASES + t.batch_id, t.item_id, t.lease, t.lease, ttl_s=self.claim_s)
                               for t in tickets])
        for batch_id, run in list(self.runs.items()):
            if (run.task is None or run.task.done()) and not run.work and time.monotonic() - run.checked > IDLE_S:
                del self.runs[batch_id]  # idle for a while: forget its lane states
        deferred, self.deferred = self.deferred, []
        if deferred:
            await self._accept(deferred)
