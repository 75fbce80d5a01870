"""What serve runs and transport runs share: the server, session slots, keys and skills (:class:`Sessions`), the
live state every run has (:class:`LiveRun`: one worktree, one event log, a terminal status decided once), and the
book that keeps them (:class:`RunBook`: create, read, follow, diff, abort, shut down).

Every run is a unit of work on ``runtime.events`` from :meth:`RunBook.begin` to :meth:`RunBook.finish` (a serve
run a ``run``, a transport run a ``graph`` whose nodes are ``run`` units in it), with its SSE tail as
``attrs.events_url``; a session's model calls are made for its run's (or node's) unit, so the dashboard lists the
runs with their event streams and traces nest the calls under them."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from attrs import define, field
from scillm_exec import EventLog, SharedRuns, Worktree, create_worktree, worktree_diff

from scillm_core import MASTER, Identity, Job, errors, require_visible
from scillm_core.events import Unit
from scillm_opencode.client import ServeError
from scillm_opencode.config import opencode_config, skill_roots
from scillm_opencode.profiles import bad
from scillm_opencode.records import RUN_ID, TERMINAL, Records, blocking
from scillm_opencode.session import Bus, Ended, SessionDriver, assistant_text, first_of
from scillm_opencode.skills import materialise

if TYPE_CHECKING:
    from scillm_core import Runtime
    from scillm_opencode.serve import ServeManager, Server

__all__ = ["ABORT_GRACE_S", "LiveRun", "RunBook", "Sessions"]

ABORT_GRACE_S = 10.0   # how long an aborted session gets to report itself idle


class Sessions:
    """The server, the concurrency slots (serve runs and transport nodes together), keys and skills."""

    def __init__(self, runtime: Runtime, serve: ServeManager) -> None:
        self.runtime = runtime
        self.serve = serve
        self.cfg = opencode_config(runtime)
        self.slots = asyncio.Semaphore(max(1, self.cfg.max_concurrency))

    def bind(self, session_id: str, run: LiveRun, unit: Unit | None = None) -> None:
        """The session's model calls (through the managed server's key) are this run's: its caller, and the key
        that started it (charged to, limited as and logged under that key, with the run as their job), made for
        ``unit`` (a transport node) or the run's own."""
        if self.serve.key is not None:
            unit = unit or run.unit
            self.serve.keys.bind_session(self.serve.key, session_id, run.run_id, run.caller, identity=run.identity,
                                         job=run.job, unit=unit.unit if unit is not None else None)

    def bind_child(self, child: str, parent: str) -> None:
        if self.serve.key is not None:
            self.serve.keys.bind_child(self.serve.key, child, parent)

    def unbind(self, session_id: str | None) -> None:
        if session_id and self.serve.key is not None:
            self.serve.keys.unbind_session(self.serve.key, session_id)

    async def skills(self, server: Server, names: list[str]) -> tuple[list[str], dict[str, str]]:
        available: list[str] = []
        if self.serve.skills_dir is None and names:
            with contextlib.suppress(ServeError):
                listed = await server.client.call("GET", "/skill", expect=list)
                available = [s["name"] for s in listed if isinstance(s, dict) and isinstance(s.get("name"), str)]
        return await blocking(materialise, names, skill_roots(self.runtime), self.serve.skills_dir, available)

    @contextlib.asynccontextmanager
    async def slot(self, stop: asyncio.Event) -> AsyncIterator[bool]:
        """A session slot, or ``False`` at once when ``stop`` is set while waiting for one."""
        acquire = asyncio.ensure_future(self.slots.acquire())
        await first_of([acquire, asyncio.ensure_future(stop.wait())], None)
        got = not acquire.cancelled()
        if got and stop.is_set():
            self.slots.release()
            got = False
        try:
            yield got
        finally:
            if got:
                self.slots.release()

    async def release(self, bus: Bus | None, directory: str | None) -> None:
        """Let the server drop the directory's instance (its watcher and caches) once no session needs it."""
        if bus is not None:
            await bus.close()
        if directory and not self.serve.stopping:
            with contextlib.suppress(ServeError):
                server = self.serve.server
                if server is not None and not server.died.is_set():
                    await server.client.dispose(directory)


@define(kw_only=True)
class LiveRun:
    run_id: str
    caller: str | None
    identity: Identity = MASTER  # the key that started it: its sessions' calls are that key's, others get 404
    job: Job | None = None
    run_dir: Path
    log: EventLog
    server: Server
    worktree: Worktree
    created_at: float = field(factory=time.time)
    status: str = "running"
    error: str | None = None
    decided: bool = False
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    stop: asyncio.Event = field(factory=asyncio.Event)
    done: asyncio.Event = field(factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    skills_materialized: list[str] = field(factory=list)
    skills_missing: dict[str, str] = field(factory=dict)
    diff_lock: asyncio.Lock = field(factory=asyncio.Lock)  # a live diff never races the worktree's removal
    trace: dict[str, str] = field(factory=dict)  # the trace context of the request that started it
    unit: Unit | None = None                     # the run as a unit of work (events, traces), while it runs
    stored: dict[str, Any] | None = None         # its final record as stored (scrubbed), once it ended

    @property
    def owner(self) -> str:
        return self.identity.owner

    def decide(self, status: str, error: str | None = None) -> bool:
        """Set the terminal status once; later calls (a late completion after an abort) change nothing."""
        if self.decided:
            return False
        self.decided, self.status, self.error = True, status, error
        return True

    def abort(self, reason: str, status: str = "aborted") -> None:
        if self.decide(status, reason):
            self.stop.set()

    def job_for(self, max_cost_usd: float | None) -> Job:
        """The run as the job its sessions' calls are made for (spend by run); a call refused for its
        ``max_cost_usd`` (or the key's budget) stops the run as ``failed``, saying why."""
        self.job = Job(kind="run", id=self.run_id, owner=self.identity.owner, max_cost_usd=max_cost_usd,
                       on_exceeded=lambda reason: self.abort(f"stopped: {reason}", "failed"))
        return self.job

    def end(self) -> dict[str, Any]:
        """The end frame of its event stream."""
        return {"type": "end", "run_id": self.run_id, "status": self.status, "seq": self.log.seq}


R = TypeVar("R", bound=LiveRun)


class RunBook(Generic[R]):
    """The runs of one kind: live ones in memory, all of them in :class:`Records`; events and aborts reach any
    instance through :class:`scillm_exec.SharedRuns`. A finished run is dropped from memory once its result.json is
    written (before its waiters wake), as exec's are: every route reads it back from its run dir, so it reads the
    same after a restart."""

    unit_kind = "run"            # what a run of this book is on runtime.events
    unit_name = "opencode run"
    events_path = "/v1/scillm/opencode/runs/{run_id}/events"   # its SSE tail

    def __init__(self, runtime: Runtime, sessions: Sessions, namespace: str, dirname: str) -> None:
        self.runtime = runtime
        self.sessions = sessions
        self.serve = sessions.serve
        self.cfg = sessions.cfg
        self.shared = SharedRuns(runtime, namespace)
        self.records = Records(runtime, namespace, dirname, self.serve.secrets, self.shared)
        self.runs: dict[str, R] = {}
        self.cleanups: set[asyncio.Task[Any]] = set()  # what a cancelled run left going (its session's abort)

    def cleanup(self, work: Any) -> asyncio.Task[Any]:
        """Run ``work`` to its end even when its run is not waiting for it any more; shutdown awaits it."""
        task = asyncio.ensure_future(work)
        self.cleanups.add(task)
        task.add_done_callback(self.cleanups.discard)
        return task

    def doc(self, run: R, *, final: bool = False) -> dict[str, Any]:
        raise NotImplementedError

    async def claim(self, run_id: str, source: str, where: str) -> tuple[Path, Worktree]:
        """A new run directory holding a worktree of ``source``; 409 for a taken id, 400 for an unusable source."""
        if run_id in self.runs or await self.records.exists(run_id):
            raise errors.Conflict(f"run {errors.quote(run_id)} already exists", param="$.run_id")
        run_dir = self.records.run_dir(run_id)
        try:
            run_dir.mkdir(parents=True, exist_ok=False)  # the claim itself: of two requests with one id, one gets it
        except FileExistsError:
            raise errors.Conflict(f"run {run_id!r} already exists", param="$.run_id") from None
        try:
            return run_dir, await create_worktree(Path(source), self.serve.worktrees / run_id)
        except errors.ScillmError as exc:
            await blocking(shutil.rmtree, run_dir, True)
            raise bad(exc.message, where) from None

    async def begin(self, run: R, execute: Any) -> R:
        self.runs[run.run_id] = run
        await self.records.save(self.doc(run))
        run.unit = Unit(self.runtime.events, self.unit_kind, f"{self.unit_kind}:opencode/{run.run_id}",
                        name=self.unit_name, trace=run.trace, owner=run.owner, attrs={
                            "run_id": run.run_id, "caller": run.caller, "surface": "opencode",
                            "events_url": self.events_path.format(run_id=run.run_id), **self.unit_attrs(run)})
        run.task = asyncio.ensure_future(execute(run))
        self.shared.drive(run.run_id, run.log, run.end, run.abort,
                          lambda: (self.records.namespace, run.stored) if run.stored is not None else None)
        return run

    def unit_attrs(self, run: R) -> dict[str, Any]:
        return {}

    async def follow(self, driver: SessionDriver, stop: asyncio.Event, deadline: float) -> str:
        """Until the session ended (see :class:`Ended`); an idle session that still has a user message to answer (a
        steer that came after its last model call) is waited for again."""
        while True:
            ended = await driver.wait(timeout_s=max(0.0, deadline - time.monotonic()), stop=stop)
            if ended != Ended.IDLE:
                return ended
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):  # a stall: the timeout holds
                    _, pending = assistant_text(await driver.messages())
            except TimeoutError:
                return Ended.TIMEOUT
            except ServeError as exc:
                if driver.bus.lost.is_set() or driver.bus.server.died.is_set():
                    return Ended.LOST
                driver.fail(exc.message)  # the server answered, but not with its messages: say what it answered
                return Ended.ERROR
            if not pending:
                return ended
            driver.idle.clear()

    async def finish(self, run: R, extra: dict[str, Any], **event: Any) -> None:
        """The result: ``diff.patch``, the terminal event (always the last), result.json and the store."""
        run.finished_at = time.time()
        await blocking((run.run_dir / "diff.patch").write_text, extra.get("diff", ""))
        run.result = self.doc(run, final=True) | extra
        run.log.append("run_completed", node=None, status=run.status, error=run.error,
                       changed_paths=extra.get("changed_paths", []), **event)
        run.stored = self.records.stored(run.result)[1]  # stored again with the end of its events (Redis was down)
        stored = await self.records.save(run.result)  # before the log ends: whoever its end wakes reads it final
        await self.records.write_result(stored)
        run.log.close()
        self.shared.release(run.run_id)
        if run.unit is not None:
            run.unit.end(run.status, run.error, changed_paths=len(extra.get("changed_paths", [])))
        self.runs.pop(run.run_id, None)  # from now on read back from its run dir (or the store): not kept in memory
        run.done.set()

    async def load(self, run_id: str) -> dict[str, Any]:
        run = self.runs.get(run_id)
        if run is not None:
            return run.result or self.doc(run)
        return await self.records.load(run_id)

    async def load_for(self, run_id: str, identity: Identity) -> dict[str, Any]:
        """:meth:`load` for a caller: the same 404 when the run belongs to another key."""
        doc = await self.load(run_id)
        require_visible(identity, doc.get("owner"), f"run {errors.quote(run_id)}")
        return doc

    async def wait(self, run: R) -> dict[str, Any]:
        await asyncio.shield(run.done.wait())
        assert run.result is not None
        return run.result

    async def abort(self, run_id: str, reason: str) -> dict[str, Any]:
        """Abort a run: this process's at once; another instance's through the state store (it looks for abort
        requests every quarter second), answering its final record once its end is in the store (the record is
        saved before), or its driver died."""
        run = self.runs.get(run_id)
        if run is not None:
            if not run.done.is_set():
                run.abort(reason)
                return await self.wait(run)
            return await self.load(run_id)
        doc = await self.load(run_id)  # unknown: 404
        if doc.get("status") in TERMINAL:
            return doc  # finished: abort changes nothing
        await self.shared.request_cancel(run_id, reason)
        await self.shared.ended(run_id, lambda: self.settled(run_id), ABORT_GRACE_S + 20)
        return await self.load(run_id)

    def tail(self, run_id: str, doc: dict[str, Any]) -> tuple[EventLog, Callable[[], dict[str, Any]]] | None:
        """The run's event log and the end frame of its stream when this process drives it, or (a finished run,
        ``doc`` its record) this machine has its file; ``None`` when only the state store has its events."""
        run = self.runs.get(run_id)
        if run is not None:
            return run.log, run.end
        path = self.records.run_dir(run_id) / "events.jsonl"
        if doc.get("status") not in TERMINAL or not RUN_ID.match(run_id) or not path.is_file():
            return None  # another process drives it (or drove it elsewhere)
        log = EventLog(path, closed=True)
        return log, lambda: {"type": "end", "run_id": run_id, "status": doc.get("status"), "seq": log.seq}

    async def settled(self, run_id: str) -> dict[str, Any] | None:
        """The end frame of a run that is over by its record (for a stream that follows it through the store)."""
        doc = await self.load(run_id)
        if doc.get("status") not in TERMINAL:
            return None
        return {"type": "end", "run_id": run_id, "status": doc.get("status"), "seq": None}

    async def live_diff(self, run_id: str) -> dict[str, Any]:
        run = self.runs.get(run_id)
        if run is not None and not run.done.is_set():
            async with run.diff_lock:
                if not run.decided:  # still working, so its worktree is there
                    patch, paths = await worktree_diff(run.worktree)
                    return {"run_id": run_id, "status": "running", "diff": patch, "changed_paths": paths,
                            "live": True}
            await asyncio.shield(run.done.wait())  # finishing: the final diff is moments away
        doc = await self.load(run_id)
        return {"run_id": run_id, "status": doc.get("status"), "diff": doc.get("diff", ""),
                "changed_paths": doc.get("changed_paths", []), "live": False}

    def live(self, viewer: Identity = MASTER) -> int:
        """Runs still going in this process that ``viewer`` may see."""
        return sum(1 for r in self.runs.values() if not r.done.is_set() and viewer.can_see(r.owner))

    async def shutdown(self) -> None:
        live = [r.task for r in self.runs.values() if r.task is not None and not r.task.done()]
        for task in live:
            task.cancel()
        await asyncio.gather(*live, return_exceptions=True)
        await asyncio.gather(*self.cleanups, return_exceptions=True)
        await self.shared.stop()
