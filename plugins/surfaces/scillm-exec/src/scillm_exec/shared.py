"""Runs shared across processes and instances through the state store, for every agent surface (exec runs, OpenCode
runs): a run is driven by the process that started it, and any other process pointed at the same store can read its
record, tail its events and cancel it.

- **events**: the driving process copies the run's event log (``events.jsonl``, secrets already scrubbed) into the
  store's log ``run-events:<kind>:<run_id>`` as it grows (an event over :data:`STORE_EVENT_LIMIT` as a stub naming
  its size), then one end record; :meth:`SharedRuns.follow` tails that
  log from anywhere (resumable by event ``seq``);
- **cancel**: :meth:`SharedRuns.request_cancel` leaves a document under ``run-cancels:<kind>``; the driving process
  looks for requests naming its live runs every :data:`CANCEL_POLL_S` and cancels them as if asked directly;
- **a driver that died**: a record names its process (:meth:`SharedRuns.stamp`: ``instance``, and ``driver``: its pid
  space, pid and when that process started); a run still ``running`` whose process is gone is over, and
  :meth:`SharedRuns.driver_gone` says so: in this pid namespace at once (that pid is no longer that process: scillm was
  killed or restarted), elsewhere once its instance is no longer live (``scillm_core.state.presence``). Whoever finds
  it settles it ``interrupted`` and ends its events (:meth:`SharedRuns.end_interrupted`), so every follower gets an
  end.

- **the run dir's copy**: the driving process keeps the run's record in its run dir too (:meth:`SharedRuns.keep`:
  ``status.json``, then ``result.json`` once it ended); a read on this machine answers from there
  (:meth:`SharedRuns.local`).

- **recovery**: at start-up each kind settles the runs a process that is gone left ``running``
  (:meth:`SharedRuns.recover`); a store that is down then is not the end of it: the sweep goes again once the store
  answers (after the presence beat that reaches it), not when someone first reads such a run.

A store that is down delays copies and cancel requests (retried), never a run; a run this machine's run dir holds
is read from there meanwhile, marked ``degraded`` (:meth:`SharedRuns.unsettled`), and settled once the store answers;
a listing answers the records this machine's run dirs hold, marked the same (:meth:`SharedRuns.records`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from scillm_core import errors
from scillm_core.state.presence import INSTANCES
from scillm_exec.events import EventLog, read_new
from scillm_exec.process import PID_SPACE, process_start

if TYPE_CHECKING:
    from scillm_core import Runtime

__all__ = ["CANCEL_POLL_S", "SharedRuns", "sse_follow"]

log = logging.getLogger("scillm.exec")
CANCEL_POLL_S = 0.25   # how often a process with live runs looks for cancel requests naming them
MIRROR_POLL_S = 1.0    # the event log is re-read at least this often (runners that write without notifying)
CANCEL_TTL_S = 3600.0  # a cancel request nobody took (its run had ended) goes away after this long
STORE_EVENT_LIMIT = 1 << 20  # an event bigger than this is copied as a stub (the run dir keeps it whole)
SETTLED_CHECK_S = 1.0  # waiting for a run's end: after this long without a record, whether its driver died
KEPT = ("seq", "ts", "type", "source", "node")


class SharedRuns:
    """The shared side of one kind of run (``"exec"``, ``"opencode.runs"``, ...) in this process."""

    def __init__(self, runtime: Runtime, kind: str) -> None:
        self.runtime = runtime
        self.kind = kind
        self.driving: dict[str, Callable[[str], None]] = {}  # run id -> cancel(reason), runs this process drives
        self.mirrors: set[asyncio.Task[None]] = set()
        self.watcher: asyncio.Task[None] | None = None
        self.sweep: Callable[[], Awaitable[bool]] | None = None  # a recovery the store stopped, for when it answers
        self.sweeping: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def events_ns(self, run_id: str) -> str:
        return f"run-events:{self.kind}:{run_id}"

    @property
    def cancels_ns(self) -> str:
        return f"run-cancels:{self.kind}"

    # -- the driving process ---------------------------------------------------------------------------------------

    def drive(self, run_id: str, events: EventLog, end: Callable[[], Mapping[str, Any]],
              cancel: Callable[[str], None],
              record: Callable[[], tuple[str, Mapping[str, Any]] | None] | None = None) -> None:
        """This process drives ``run_id``: copy ``events`` into the store as it grows (until the log is closed, then
        ``{"end": true, **end()}``), and call ``cancel(reason)`` for a cancel request from any instance. ``record()``
        (its namespace and document, or ``None``) is the run's final record, stored again just before the end
        record: the driver stored it as the run ended, but a store that was down then would keep it unfinished."""
        task = asyncio.ensure_future(self._mirror(run_id, events, end, record))
        self.mirrors.add(task)
        task.add_done_callback(self.mirrors.discard)
        self.driving[run_id] = cancel
        if self.watcher is None or self.watcher.done():
            self.watcher = asyncio.ensure_future(self._watch())

    def release(self, run_id: str) -> None:
        """The run is over: no more cancel requests for it (its copy ends when its log is closed)."""
        self.driving.pop(run_id, None)

    async def _mirror(self, run_id: str, events: EventLog, end: Callable[[], Mapping[str, Any]],
                      record: Callable[[], tuple[str, Mapping[str, Any]] | None] | None) -> None:
        """A store that fails is retried with what is pending: nothing is dropped while this process lives."""
        ns, offset, buf = self.events_ns(run_id), 0, bytearray()
        pending: list[dict[str, Any]] = []
        ended = False
        while not ended:
            changed, closed = events.changed, events.closed  # taken before reading: an append during it is not missed
            offset, new = await asyncio.to_thread(read_new, events.path, offset, buf)
            pending += [_storable(event) for event in new]
            if closed:
                pending.append({"end": True, **end()})
            if pending:
                try:
                    final = record() if closed and record is not None else None
                    if final is not None:
                        await self.runtime.store.put(final[0], run_id, final[1])
                    await self.runtime.store.append_many(ns, pending)
                    pending, ended = [], closed
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("run %s: events not copied to the state store yet: %s", run_id, type(exc).__name__)
                    if closed:
                        pending.pop()  # the end record goes again, last, next time
                    await asyncio.sleep(1.0)
                    continue
            if not closed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), MIRROR_POLL_S)
        ttl_s = self.runtime.config.state.finished_logs_ttl_s
        if ttl_s is not None:  # retention: the finished run's log goes [state] finished_logs_days after its end
            try:
                await self.runtime.store.expire_log(ns, ttl_s)
            except Exception as exc:
                log.warning("run %s: its event log's retention not set: %s", run_id, type(exc).__name__)

    async def _watch(self) -> None:
        while self.driving:
            await asyncio.sleep(CANCEL_POLL_S)
            ids = list(self.driving)
            try:
                found = await self.runtime.store.get_many(self.cancels_ns, ids)
            except asyncio.CancelledError:
                raise
            except Exception:  # the store is down: a cancel request waits for it
                continue
            for run_id, request in zip(ids, found, strict=True):
                cancel = self.driving.pop(run_id, None) if request is not None else None
                if cancel is not None:
                    cancel(str(request.get("reason") or "cancelled") if request else "cancelled")

    async def stop(self) -> None:
        """At shutdown, after the runs ended: their last events and end records while the store answers; then
        every task of this object (a copy still retrying a store that is down, the cancel watcher, a recovery) is
        cancelled and awaited."""
        self.driving.clear()
        self.sweep = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self.mirrors:
            await asyncio.wait(set(self.mirrors), timeout=self.runtime.config.state.timeout_s + 1)
        tasks = [*self.mirrors, *(t for t in (self.watcher, self.sweeping) if t is not None)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- recovery --------------------------------------------------------------------------------------------------

    async def recover(self, sweep: Callable[[], Awaitable[bool]]) -> None:
        """At start-up: ``sweep()`` settles the runs of this kind whose driver is gone, answering whether the state
        store let it through (``False``: it did not answer, some may be left). Then it goes again after each
        presence beat that reaches the store (:meth:`scillm_core.state.presence.Presence.when_reachable`), until one
        gets through: the runs a dead process left ``running`` are settled once the store answers, not when someone
        first reads one."""
        if await self._swept(sweep):
            return
        self.sweep = sweep
        presence = self.runtime.presence
        if self._unsubscribe is None and presence is not None:
            self._unsubscribe = presence.when_reachable(self._reachable)

    def _reachable(self) -> None:
        if self.sweep is not None and (self.sweeping is None or self.sweeping.done()):
            self.sweeping = asyncio.ensure_future(self._again(self.sweep))

    async def _again(self, sweep: Callable[[], Awaitable[bool]]) -> None:
        if await self._swept(sweep) and self.sweep is sweep:
            self.sweep = None
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None

    async def _swept(self, sweep: Callable[[], Awaitable[bool]]) -> bool:
        try:
            return await sweep()
        except errors.StateUnavailable:
            return False
        except Exception as exc:  # a bug: logged, not retried at every beat
            log.warning("%s runs: recovery failed: %s", self.kind, type(exc).__name__)
            return True

    # -- any process -----------------------------------------------------------------------------------------------

    async def request_cancel(self, run_id: str, reason: str) -> None:
        """Ask whichever process drives ``run_id`` to cancel it (503 when the store is down)."""
        await self.runtime.store.put(self.cancels_ns, run_id, {"reason": reason, "at": time.time(),
                                                                "by": self.runtime.instance_id}, ttl_s=CANCEL_TTL_S)

    def stamp(self) -> dict[str, Any]:
        """What a run record says about the process driving it (for :meth:`driver_gone`)."""
        pid = os.getpid()
        return {"instance": self.runtime.instance_id,
                "driver": {"pid_space": PID_SPACE, "pid": pid, "started": process_start(pid)}}

    async def driver_gone(self, doc: Mapping[str, Any]) -> bool:
        """Whether the process that drove a run record (:meth:`stamp`) is gone (it died or was restarted while
        driving). In this pid namespace (``PID_SPACE``: this boot, these pids), whether that pid is still that
        process; otherwise (another host or container, or another app in this process), whether its instance is no
        longer live, and only when this process's own presence is there: after the store lost its data or was down
        longer than the presence TTL, nobody's presence says anything until this one's next beat."""
        instance = doc.get("instance")
        if instance == self.runtime.instance_id:
            return False
        driver = doc.get("driver")
        if isinstance(driver, Mapping) and driver.get("pid_space") == PID_SPACE and isinstance(driver.get("pid"), int) \
                and driver["pid"] != os.getpid():
            return process_start(driver["pid"]) != driver.get("started")
        if not isinstance(instance, str):
            return False
        theirs, mine = await self.runtime.store.get_many(INSTANCES, [instance, self.runtime.instance_id])
        return theirs is None and mine is not None

    @staticmethod
    def keep(run_dir: Path, doc: Mapping[str, Any]) -> None:
        """The run dir's copy of a run's record (``status.json``, replaced whole: a reader never sees half of it),
        written with the store's: what a read on this machine answers (:meth:`local`), with the store down too."""
        tmp = run_dir / f"status.{uuid.uuid4().hex[:8]}.tmp"
        tmp.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2, default=str))
        tmp.replace(run_dir / "status.json")

    async def local(self, run_dir: Path, settle: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
                    read: Callable[[Path], Awaitable[bytes]] | None = None) -> dict[str, Any] | None:
        """A run's document from this machine's run dir: ``result.json`` (it ended) as it is, else ``status.json``
        through ``settle`` (which settles a run whose driver is gone, in the store first), or, while the store is
        down, as it stands (:meth:`unsettled`); ``None`` when the run dir has neither (another machine drives it).
        ``read(path)``: a file's bytes, off the event loop (default: a thread of the loop's default pool)."""
        for name in ("result.json", "status.json"):
            path = run_dir / name
            try:
                doc: dict[str, Any] = orjson.loads(await (read or _read_bytes)(path))
            except FileNotFoundError:
                continue
            if name == "result.json":
                return doc
            try:
                return await settle(doc)
            except errors.StateUnavailable as exc:
                return self.unsettled(doc, exc)
        return None

    async def records(self, namespace: str, root: Path, names: re.Pattern[str],
                      offload: Callable[[Callable[[], list[dict[str, Any]]]], Awaitable[list[dict[str, Any]]]]
                      | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """Every record of this kind, for a listing: the store's (namespace ``namespace``) and ``None``; or, while
        the store is down, the copies this machine's run dirs hold (the ``status.json`` of each directory under
        ``root`` whose name ``names`` matches, as it stands, read through ``offload``: default a thread of the loop's
        default pool) and why, for the listing's ``degraded`` (as :meth:`unsettled` marks one run's)."""
        try:
            return [doc for _, doc in await self.runtime.store.scan(namespace, "", limit=100_000)], None
        except errors.StateUnavailable as exc:
            read = functools.partial(_kept, root, names)
            docs = await (offload(read) if offload is not None else asyncio.to_thread(read))
            return docs, (f"{exc.message}; these are the runs this machine's run dirs hold, as they stand (runs "
                          "another machine drives are missing, and one whose driver is gone is not settled until "
                          "the store answers)")

    @staticmethod
    def unsettled(doc: Mapping[str, Any], exc: errors.StateUnavailable) -> dict[str, Any]:
        """A run's record as its run dir has it, read while the state store is down (a run whose driver is gone
        cannot be settled then: that is a compare-and-set on the store's record), marked ``degraded`` with why, as
        ``GET /v1/scillm/health`` marks the store; the first read after the store answers again settles it."""
        return {**doc, "degraded": f"{exc.message}; this is the run dir's copy, not settled until the store "
                                   "answers"}

    async def end_interrupted(self, run_id: str, log: EventLog | None, event: Mapping[str, Any],
                              end: Mapping[str, Any]) -> None:
        """End the events of a run whose driver died: ``event`` appended to its log (when this machine has it) and,
        in the store, that event and the end record, so a follower anywhere (resuming after any seq) ends."""
        stored = dict(event)
        if log is not None:
            stored = log.append(str(event["type"]), **{k: v for k, v in event.items() if k != "type"})
            log.close()
        with contextlib.suppress(Exception):  # the store's followers then end through their settled() check
            await self.runtime.store.append_many(self.events_ns(run_id), [stored, {"end": True, **end}])

    async def ended(self, run_id: str, settled: Callable[[], Any], limit_s: float) -> None:
        """Wait (at most ``limit_s``) until the run's end record is in the store, or ``settled()`` says the run is
        over (its driver died): how a cancel sent through the store waits for its run to end, without polling."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit_s):
                async for record in self.follow(run_id, sys.maxsize, SETTLED_CHECK_S, settled):
                    if record is not None and record.get("end"):
                        return

    async def follow(self, run_id: str, after: int, heartbeat_s: float,
                     settled: Callable[[], Any]) -> AsyncIterator[dict[str, Any] | None]:
        """The run's events with ``seq > after`` from the store, then live ones as they are copied, ending with its
        end record (``{"end": true, ...}``). Yields ``None`` after ``heartbeat_s`` without one; then awaits
        ``settled()`` (the end of a run whose record is over, or ``None``). A record is over moments before its
        driver's copy brings the last events and the end record (the record is saved first): those are waited for
        one more ``heartbeat_s``, and only without them does the stream end with ``settled()``'s end (the driver
        can no longer write its own: it died)."""
        ns, cursor, over = self.events_ns(run_id), "", None
        while True:
            records = await self.runtime.store.follow(ns, cursor, limit=500, block_s=heartbeat_s)
            for entry_id, record in records:
                cursor = entry_id
                if record.get("end"):
                    yield record
                    return
                if int(record.get("seq") or 0) > after:
                    yield record
            if records:
                continue
            if over is not None:  # a heartbeat more and no end record: drained what the driver copied before it died
                yield {"end": True, **over}
                return
            yield None
            over = await settled()


async def _read_bytes(path: Path) -> bytes:
    return await asyncio.to_thread(path.read_bytes)


def _kept(root: Path, names: re.Pattern[str]) -> list[dict[str, Any]]:
    """The ``status.json`` of each run dir under ``root`` named like a run (one unreadable is left out)."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    docs = []
    for entry in entries:
        if not names.match(entry.name):
            continue
        try:
            doc = orjson.loads(Path(entry.path, "status.json").read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if isinstance(doc, dict):
            docs.append(doc)
    return docs


def _storable(event: dict[str, Any]) -> dict[str, Any]:
    """The event as copied into the store: whole, or a stub naming its size when it is over the limit."""
    size = len(orjson.dumps(event))
    if size <= STORE_EVENT_LIMIT:
        return event
    return {**{k: event[k] for k in KEPT if k in event}, "bytes": size, "stored": "run dir only (too big to copy)"}


async def sse_follow(shared: SharedRuns, run_id: str, after: int, heartbeat_s: float,
                     settled: Callable[[], Any]) -> AsyncIterator[bytes]:
    """:meth:`SharedRuns.follow` as the frames of :func:`scillm_exec.events.sse_tail`: ``id: <seq>`` + ``data:``
    per event, ``: heartbeat`` while quiet, and ``event: end`` with the run's end record."""
    async for event in shared.follow(run_id, after, heartbeat_s, settled):
        if event is None:
            yield b": heartbeat\n\n"
        elif event.get("end"):
            yield b"event: end\ndata: " + orjson.dumps({k: v for k, v in event.items() if k != "end"}) + b"\n\n"
        else:
            yield b"id: %d\ndata: %s\n\n" % (event.get("seq", 0), orjson.dumps(event))
