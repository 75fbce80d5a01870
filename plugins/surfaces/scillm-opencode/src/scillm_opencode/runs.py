"""OpenCode serve runs (``POST /v1/scillm/opencode/runs``): one bounded OpenCode session with an agent profile and
skills, in an isolated git worktree of the caller's ``cwd``, returning evidence (assistant text, diff, changed
paths, events). The terminal status is decided once: whichever of completion, timeout, abort or a dead server
comes first wins, and nothing that arrives later changes it."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrs import define, field
from scillm_exec import EventLog, Worktree, check_cwd, create_worktree, remove_worktree, worktree_diff

from scillm_core import errors
from scillm_opencode.client import ServeError
from scillm_opencode.config import opencode_config, skill_roots
from scillm_opencode.profiles import bad, check_agent_shape, resolve_agent, resolve_model, seconds, text
from scillm_opencode.records import RUN_ID, Records
from scillm_opencode.session import Bus, Ended, SessionDriver, assistant_text
from scillm_opencode.skills import check_skill_names, materialise, skill_rules

if TYPE_CHECKING:
    from scillm_core import Runtime
    from scillm_opencode.serve import ServeManager, Server

__all__ = ["Run", "ServeRuns", "Sessions"]

FIELDS = {"prompt", "agent", "model", "cwd", "skills", "timeout_s", "wait", "run_id", "scillm_metadata", "title",
          "system"}
ABORT_GRACE_S = 10.0


class Sessions:
    """What serve runs and transport nodes share: the server, the concurrency slots, keys and skills."""

    def __init__(self, runtime: Runtime, serve: ServeManager) -> None:
        self.runtime = runtime
        self.serve = serve
        self.cfg = opencode_config(runtime)
        self.slots = asyncio.Semaphore(max(1, self.cfg.max_concurrency))

    def bind(self, session_id: str, run_id: str, caller: str | None) -> None:
        """The session's model calls (through the managed server's key) are this run's."""
        if self.serve.key is not None:
            self.serve.keys.bind_session(self.serve.key, session_id, run_id, caller)

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
                listed = await server.client.call("GET", "/skill")
                available = [str(s.get("name")) for s in listed or [] if isinstance(s, dict)]
        return await asyncio.to_thread(materialise, names, skill_roots(self.runtime), self.serve.skills_dir,
                                       available)

    @contextlib.asynccontextmanager
    async def slot(self, stop: asyncio.Event) -> AsyncIterator[bool]:
        """A session slot, or ``False`` at once when ``stop`` is set while waiting for one."""
        acquire = asyncio.ensure_future(self.slots.acquire())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not acquire.done():
                acquire.cancel()
        got = acquire.done() and not acquire.cancelled()
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


@define
class Run:
    run_id: str
    caller: str | None
    owner: str
    request: dict[str, Any]
    run_dir: Path
    log: EventLog
    server: Server
    worktree: Worktree
    agent: str
    model: dict[str, str] | None
    created_at: float = field(factory=time.time)
    status: str = "running"
    error: str | None = None
    session_id: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    decided: bool = False
    stop: asyncio.Event = field(factory=asyncio.Event)
    done: asyncio.Event = field(factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    skills_materialized: list[str] = field(factory=list)
    skills_missing: dict[str, str] = field(factory=dict)
    diff_lock: asyncio.Lock = field(factory=asyncio.Lock)  # a live diff never races the worktree's removal

    def decide(self, status: str, error: str | None = None) -> bool:
        """Set the terminal status once; later calls (a late completion after an abort) change nothing."""
        if self.decided:
            return False
        self.decided, self.status, self.error = True, status, error
        return True


class ServeRuns:
    def __init__(self, runtime: Runtime, sessions: Sessions) -> None:
        self.runtime = runtime
        self.sessions = sessions
        self.serve = sessions.serve
        self.cfg = sessions.cfg
        self.records = Records(runtime, "opencode.runs", "runs", self.serve.secrets)
        self.runs: dict[str, Run] = {}

    # -- request -> run -------------------------------------------------------------------------------------------

    def parse(self, body: Any, *, agent_default: str = "build", skills_default: tuple[str, ...] = ()
              ) -> dict[str, Any]:
        """Validate a request body (no server needed); 400 naming the field."""
        if not isinstance(body, dict):
            raise bad("expected a JSON object", "$")
        unknown = sorted(set(body) - FIELDS)
        if unknown:
            raise bad(f"unknown field {unknown[0]!r} (known: {', '.join(sorted(FIELDS))})", f"$.{unknown[0]}")
        agent = check_agent_shape(body.get("agent", agent_default), "$.agent")
        cwd = body.get("cwd")
        if not isinstance(cwd, str) or not cwd:
            raise bad("cwd is required: the absolute path of the directory to work on (a git checkout)", "$.cwd")
        wait = body.get("wait", True)
        if not isinstance(wait, bool):
            raise bad("wait must be true or false", "$.wait")
        run_id = body.get("run_id")
        if run_id is not None and (not isinstance(run_id, str) or not RUN_ID.match(run_id)):
            raise bad(f"run_id must match {RUN_ID.pattern}", "$.run_id")
        metadata = body.get("scillm_metadata", {})
        if not isinstance(metadata, dict):
            raise bad("scillm_metadata must be an object", "$.scillm_metadata")
        skills = check_skill_names(body.get("skills"), "$.skills")
        skills = list(dict.fromkeys([*skills_default, *skills]))
        return {"prompt": text(body.get("prompt"), "$.prompt", required=True), "agent": agent,
                "model": body.get("model"), "cwd": str(check_cwd(cwd, self.runtime, "$.cwd")), "skills": skills,
                "timeout_s": seconds(body.get("timeout_s"), "$.timeout_s", default=self.cfg.default_timeout_s,
                                     limit=self.cfg.max_timeout_s),
                "wait": wait, "run_id": run_id, "scillm_metadata": metadata,
                "title": text(body.get("title"), "$.title", limit=200),
                "system": text(body.get("system"), "$.system", limit=64 << 10)}

    async def start(self, request: dict[str, Any], *, caller: str | None, owner: str, base_url: str) -> Run:
        run_id = request["run_id"] or "oc-" + uuid.uuid4().hex[:16]
        if run_id in self.runs or await self.records.exists(run_id):
            raise errors.Conflict(f"run {run_id!r} already exists", param="$.run_id")
        server = await self.serve.ensure(base_url)
        agent = await resolve_agent(server, request["agent"], self.runtime, "$.agent")
        if request["model"] is None and not server.managed:
            model = None
        else:
            model = await resolve_model(server, request["model"] or self.serve.default_model(), "$.model")
        run_dir = self.records.run_dir(run_id)
        run_dir.mkdir(parents=True, exist_ok=False)
        try:
            worktree = await create_worktree(Path(request["cwd"]), run_dir / "worktree")
        except errors.ScillmError as exc:
            await asyncio.to_thread(_rmtree, run_dir)
            raise bad(exc.message if hasattr(exc, "message") else str(exc), "$.cwd") from None
        run = Run(run_id=run_id, caller=caller, owner=owner, request=request, run_dir=run_dir,
                  log=EventLog(run_dir / "events.jsonl", redact=self.serve.secrets()), server=server,
                  worktree=worktree, agent=agent, model=model)
        self.runs[run_id] = run
        await self.records.save(self.doc(run))
        run.task = asyncio.ensure_future(self._execute(run))
        return run

    # -- the run ------------------------------------------------------------------------------------------------

    def emit(self, run: Run, name: str, fields: dict[str, Any]) -> None:
        if not run.log.closed and not run.decided:
            run.log.append(name, node=None, **fields)

    async def _execute(self, run: Run) -> None:
        request = run.request
        bus: Bus | None = None
        driver: SessionDriver | None = None
        text_out, diff, paths = "", "", []
        try:
            async with self.sessions.slot(run.stop) as got:
                if not got:
                    return
                run.started_at = time.time()
                deadline = time.monotonic() + request["timeout_s"]
                self.emit(run, "run_started", {"agent": run.agent, "model": run.model, "skills": request["skills"],
                                               "worktree": str(run.worktree.workdir)})
                run.skills_materialized, run.skills_missing = await self.sessions.skills(run.server,
                                                                                         request["skills"])
                if request["skills"]:
                    self.emit(run, "skills", {"materialized": run.skills_materialized,
                                              "missing": run.skills_missing})
                directory = str(run.worktree.workdir)
                bus = Bus(run.server, directory)
                await bus.open()
                driver = SessionDriver(bus, lambda name, fields: self.emit(run, name, fields),
                                       on_child=lambda child: self.sessions.bind_child(child, run.session_id or ""))
                session_body: dict[str, Any] = {"title": request["title"] or f"scillm {run.agent} {run.run_id}",
                                                "agent": run.agent,
                                                "permission": skill_rules(run.skills_materialized)}
                run.session_id = await driver.create(session_body)
                self.sessions.bind(run.session_id, run.run_id, run.caller)
                self.emit(run, "session_created", {"session_id": run.session_id})
                await self.records.save(self.doc(run))
                if run.stop.is_set():  # aborted while the session was being set up: never prompt it
                    return
                prompt: dict[str, Any] = {"parts": [{"type": "text", "text": request["prompt"]}],
                                          "agent": run.agent}
                if run.model:
                    prompt["model"] = run.model
                if request["system"]:
                    prompt["system"] = request["system"]
                await driver.prompt(prompt)
                ended = await self._follow(run, driver, deadline)
                if ended == Ended.IDLE:
                    run.decide("completed")
                elif ended == Ended.ERROR:
                    run.decide("error", driver.error)
                elif ended == Ended.LOST:
                    run.decide("error", await bus.why_lost())
                elif ended == Ended.TIMEOUT:
                    run.decide("timeout", f"no result within timeout_s={request['timeout_s']:g}; the session "
                                          "was aborted")
                if ended in (Ended.TIMEOUT, Ended.STOPPED) and not await driver.abort(ABORT_GRACE_S):
                    run.error = f"{run.error}; the OpenCode session did not confirm the abort"
                if not run.server.died.is_set():
                    with contextlib.suppress(ServeError):
                        text_out, _ = assistant_text(await driver.messages())
        except asyncio.CancelledError:
            run.decide("error", "scillm shut down while the run was in flight")
            if driver is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(driver.abort(2.0)), 3.0)
        except errors.ScillmError as exc:
            run.decide("error", exc.message)
        except Exception as exc:  # a bug here must still end the run and keep its record
            run.decide("error", f"{type(exc).__name__}: {exc}")
        finally:
            if driver is not None:
                await driver.close()
            self.sessions.unbind(run.session_id)
            run.decide("error", "the run ended without a result")
            async with run.diff_lock:
                with contextlib.suppress(Exception):
                    diff, paths = await worktree_diff(run.worktree)
                if driver is not None and driver.session_id and not run.server.died.is_set():
                    with contextlib.suppress(ServeError):
                        await run.server.client.delete_session(str(run.worktree.workdir), driver.session_id)
                await self.sessions.release(bus, str(run.worktree.workdir) if bus is not None else None)
                if not self.cfg.keep_worktrees:
                    with contextlib.suppress(Exception):
                        await remove_worktree(run.worktree)
            await self._finish(run, text_out, diff, paths)

    async def _follow(self, run: Run, driver: SessionDriver, deadline: float) -> str:
        while True:
            ended = await driver.wait(timeout_s=max(0.0, deadline - time.monotonic()), stop=run.stop)
            if ended != Ended.IDLE:
                return ended
            try:  # idle, unless a message arrived after the last model call (the session takes another turn)
                _, pending = assistant_text(await driver.messages())
            except ServeError:
                return Ended.LOST
            if not pending:
                return ended
            driver.idle.clear()

    async def _finish(self, run: Run, assistant: str, diff: str, paths: list[str]) -> None:
        run.finished_at = time.time()
        await asyncio.to_thread((run.run_dir / "diff.patch").write_text, diff)
        run.result = self.doc(run, final=True) | {"assistant_text": assistant, "diff": diff, "changed_paths": paths}
        run.log.append("run_completed", node=None, status=run.status, error=run.error, changed_paths=paths)
        run.log.close()
        stored = await self.records.save(run.result)
        await self.records.write_result(stored)
        run.done.set()

    def doc(self, run: Run, *, final: bool = False) -> dict[str, Any]:
        """The run's document; its status is terminal only once the result (diff, text) is complete."""
        request = run.request
        done = final or run.result is not None
        return {"run_id": run.run_id, "status": run.status if done else "running",
                "error": run.error if done else None, "session_id": run.session_id,
                "agent": run.agent, "model": run.model, "cwd": request["cwd"], "caller": run.caller,
                "owner": run.owner, "timeout_s": request["timeout_s"], "skills_requested": request["skills"],
                "skills_materialized": run.skills_materialized, "skills_missing": sorted(run.skills_missing),
                "skills_missing_reasons": run.skills_missing, "scillm_metadata": request["scillm_metadata"],
                "created_at": run.created_at, "started_at": run.started_at, "finished_at": run.finished_at,
                "worktree": str(run.worktree.path) if self.cfg.keep_worktrees or not run.decided else None,
                "base_commit": run.worktree.base,
                "artifacts": {"run_dir": str(run.run_dir), "events_jsonl": str(run.run_dir / "events.jsonl"),
                              "diff_patch": str(run.run_dir / "diff.patch"),
                              "result_json": str(run.run_dir / "result.json")},
                **self.records.stamp()}

    # -- reading and stopping -----------------------------------------------------------------------------------

    async def load(self, run_id: str) -> dict[str, Any]:
        run = self.runs.get(run_id)
        if run is not None:
            return run.result or self.doc(run)
        return await self.records.load(run_id)

    async def wait(self, run: Run) -> dict[str, Any]:
        await asyncio.shield(run.done.wait())
        assert run.result is not None
        return run.result

    async def abort(self, run_id: str, reason: str) -> dict[str, Any]:
        run = self.runs.get(run_id)
        if run is None or run.done.is_set():
            return await self.load(run_id)  # finished (or unknown: 404): abort changes nothing
        if run.decide("aborted", reason):
            run.stop.set()
        return await self.wait(run)

    def log(self, run_id: str) -> EventLog | None:
        run = self.runs.get(run_id)
        if run is not None:
            return run.log
        path = self.records.run_dir(run_id) / "events.jsonl"
        return EventLog(path, closed=True) if path.is_file() and RUN_ID.match(run_id) else None

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

    def live(self) -> int:
        return sum(1 for r in self.runs.values() if not r.done.is_set())

    async def shutdown(self) -> None:
        live = [r.task for r in self.runs.values() if r.task is not None and not r.task.done()]
        for task in live:
            task.cancel()
        for task in live:
            with contextlib.suppress(BaseException):
                await task
        self.records.close()


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
