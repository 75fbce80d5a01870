"""Run lifecycle: validate a spec, start it through ``run_session``, enforce the outer bounds, write artifacts
(``status.json``, ``result.json``), cancel, and run graphs of runs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import orjson

from scillm_core import MASTER, Identity, Job, Runtime, errors, max_cost_of, require_visible, schemas
from scillm_core.jsonio import loads
from scillm_core.pipeline import check_model
from scillm_core.redact import redact
from scillm_core.sessions import SessionContext, SessionResult, SessionSpec
from scillm_exec.auth import run_keys
from scillm_exec.config import allowed_roots, exec_config
from scillm_exec.events import EventLog
from scillm_exec.process import end_leftover_group
from scillm_exec.shared import SharedRuns
from scillm_exec.slots import FairSlots

__all__ = ["ExecManager", "ID", "RUN_ID", "check_cwd", "check_fields", "find_cycle", "parse_final_json",
           "spec_from_body"]

RUN_ID = re.compile(r"^run_[0-9a-f]{32}$")
ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")  # a client-chosen id: graph nodes, handoffs, leases
PARSE_STEP = 64  # graph nodes checked per event-loop step (each resolves its cwd on the file system)
TERMINAL = ("completed", "failed", "timeout", "cancelled", "skipped")
SPEC_KEYS = {"profile", "prompt", "cwd", "sandbox", "model", "timeout_s", "idle_timeout_s", "output_schema",
             "metadata", "max_cost_usd"}
STORE_NS = "exec.runs"


def _bad(message: str, param: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(f"{message} @ {param}", param=param)


async def spec_from_body(body: Any, runtime: Runtime, *, where: str = "$",
                         extra_keys: set[str] = frozenset()) -> SessionSpec:
    """Validate a request body (or graph node) into a :class:`SessionSpec`; 400 naming the JSON path."""
    cfg = exec_config(runtime)
    if not isinstance(body, dict):
        raise _bad(f"expected an object, got {type(body).__name__}", where)
    check_fields(body, SPEC_KEYS | extra_keys, where)
    profile = body.get("profile")
    profiles = runtime.hooks.session_profiles(runtime)
    if not isinstance(profile, str) or not profile:
        raise _bad("profile is required (one of: " + ", ".join(profiles) + ")", f"{where}.profile")
    if profile not in profiles:
        raise _bad(f"unknown profile {profile!r} (known: {', '.join(profiles) or 'none installed'})",
                   f"{where}.profile")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _bad("prompt must be a non-empty string", f"{where}.prompt")
    sandbox = body.get("sandbox", "read-only")
    if sandbox not in ("read-only", "workspace-write"):
        raise _bad(f"sandbox must be 'read-only' or 'workspace-write', got {sandbox!r}", f"{where}.sandbox")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise _bad("model must be a non-empty string", f"{where}.model")
    if model is not None:
        check_model(model, f"{where}.model")  # the run keeps it (status, records, the CLI's argv)
        if model.startswith("-") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in model):
            raise _bad("model must not start with '-' or contain control characters (it goes on the CLI's command "
                       "line and into its config)", f"{where}.model")

    def seconds(key: str, default: float | None) -> float | None:
        value = body.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise _bad(f"{key} must be a positive number of seconds", f"{where}.{key}")
        if value > cfg.max_timeout_s:
            raise _bad(f"{key} is {value}; the limit is {cfg.max_timeout_s:g}", f"{where}.{key}")
        return float(value)

    timeout_s = seconds("timeout_s", cfg.default_timeout_s)
    idle = seconds("idle_timeout_s", None)
    schema = body.get("output_schema")
    if schema is not None:  # metaschema, references resolvable inside it, nothing fetched: else a 400 naming where
        await schemas.check_schema_async(schema, f"{where}.output_schema")
    max_cost = max_cost_of(body.get("max_cost_usd"), f"{where}.max_cost_usd")
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise _bad("metadata must be an object", f"{where}.metadata")
    cwd = body.get("cwd")
    if cwd is not None:
        cwd = str(check_cwd(cwd, runtime, f"{where}.cwd"))
    return SessionSpec(profile=profile, prompt=prompt, cwd=cwd, sandbox=sandbox, model=model,
                       timeout_s=timeout_s or cfg.default_timeout_s, idle_timeout_s=idle, output_schema=schema,
                       metadata=metadata, max_cost_usd=max_cost)


def check_fields(body: dict[str, Any], known: set[str] | frozenset[str], where: str = "$") -> None:
    """A 400 naming the first field of ``body`` outside ``known`` (a 1 MB field name is not echoed whole)."""
    unknown = sorted(set(body) - known)
    if unknown:
        name = unknown[0]
        raise _bad(f"unknown field {errors.quote(name)} (known: {', '.join(sorted(known))})", f"{where}.{name[:64]}")


def check_cwd(cwd: Any, runtime: Runtime, param: str) -> Path:
    """``cwd`` as an existing directory inside ``exec.allowed_roots`` (symlinks resolved); a 400 naming ``param``
    for anything else, including a NUL, a name too long for the file system and a symlink loop."""
    if not isinstance(cwd, str) or not cwd or "\0" in cwd:
        raise _bad(f"{param.rsplit('.', 1)[-1]} must be an absolute path string (without NUL characters)", param)
    path = Path(cwd)
    if not path.is_absolute():
        raise _bad(f"cwd must be an absolute path, got {errors.quote(cwd, 200)}", param)
    try:
        resolved = path.resolve()
        roots = allowed_roots(runtime)
        if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
            raise _bad(f"cwd {errors.quote(cwd, 200)} is outside the allowed roots (exec.allowed_roots: "
                       f"{', '.join(map(str, roots))})", param)
        is_dir = resolved.is_dir()
    except (OSError, RuntimeError) as exc:  # ENAMETOOLONG, ELOOP, a symlink loop (RuntimeError before 3.13)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "symlink loop"
        raise _bad(f"cwd {errors.quote(cwd, 200)} cannot be resolved: {reason}", param) from None
    if not is_dir:
        raise _bad(f"cwd {errors.quote(cwd, 200)} is not a directory", param)
    return resolved


def parse_final_json(text: str) -> Any:
    """The final answer as JSON: the whole text, a fenced block, or the outermost ``{…}``/``[…]``."""
    candidates = [text.strip()]
    fence = re.search(r"```(?:json)?\s*\n(.*?)```", text, re.S)
    if fence:
        candidates.append(fence.group(1).strip())
    for open_, close in (("{", "}"), ("[", "]")):
        i, j = text.find(open_), text.rfind(close)
        if 0 <= i < j:
            candidates.append(text[i:j + 1])
    for candidate in candidates:
        try:
            return loads(candidate)
        except (ValueError, TypeError):
            continue
    raise ValueError("the final answer is not JSON")


def _end_of(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The end frame of a finished run's event stream, from its record."""
    return {"type": "run.end", "run_id": doc.get("run_id"), "status": doc.get("status"),
            "exit_code": doc.get("exit_code")}


def _artifacts(run_dir: Path) -> dict[str, str]:
    """Where a run's files are (its answer's ``artifacts``)."""
    return {"run_dir": str(run_dir), **{key: str(run_dir / name) for key, name in (
        ("events_jsonl", "events.jsonl"), ("stdout", "stdout.log"), ("stderr", "stderr.log"),
        ("status", "status.json"), ("result", "result.json"))}}


def _write_json(path: Path, doc: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    tmp.replace(path)


@attrs.define
class Run:
    run_id: str
    spec: SessionSpec
    caller: str | None
    run_dir: Path
    status: str = "queued"
    task: asyncio.Task[dict[str, Any]] | None = None
    result: dict[str, Any] | None = None
    done: asyncio.Event = attrs.field(factory=asyncio.Event)
    created_at: float = attrs.field(factory=time.time)
    started_at: float | None = None
    key: str | None = None
    parent: str | None = None  # the enclosing unit of work (a graph), for events
    trace: Mapping[str, str] = attrs.field(factory=dict)  # the client's trace context, for events
    events: EventLog | None = None  # events.jsonl (the runner writes it): wakes the copy into the state store

    @property
    def unit(self) -> str:
        return f"run:{self.run_id}"
    identity: Identity = MASTER  # who started the run: its calls are charged to and limited as that key
    job: Job | None = None
    concluding: asyncio.Task[dict[str, Any]] | None = None  # writing the result (shielded from a late cancel)
    counted: bool = True  # in ExecManager.live on its own (a graph's node is counted with its graph)


class ExecManager:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.keys = run_keys(runtime)
        self.runs: dict[str, Run] = {}
        self.shared = SharedRuns(runtime, "exec")
        self._slots: FairSlots | None = None
        self.concluding: set[asyncio.Task[dict[str, Any]]] = set()  # runs whose result is being written
        self.live: dict[str, int] = {}  # owner -> its runs queued or running (a graph: its max_concurrency)

    @property
    def runs_dir(self) -> Path:
        return self.runtime.config.data_dir / "runs"

    def slots(self) -> FairSlots:
        if self._slots is None:
            self._slots = FairSlots(exec_config(self.runtime).max_concurrency)
        return self._slots

    def admit(self, identity: Identity, runs: int) -> None:
        """Count ``runs`` more runs of ``identity``'s (checked and counted with no await between: a burst cannot
        slip past), or a 429 when that is past ``[exec] max_runs_per_key``."""
        cap = exec_config(self.runtime).max_runs_per_key
        live = self.live.get(identity.owner, 0)
        if cap is not None and live + runs > cap:
            raise errors.RateLimited(f"this key has {live} exec runs queued or running and may have {cap} "
                                     f"(exec.max_runs_per_key); {runs} more do not fit: wait for some to end",
                                     retry_after_s=1)
        self.live[identity.owner] = live + runs

    def leave(self, identity: Identity, runs: int) -> None:
        left = self.live.get(identity.owner, 0) - runs
        if left > 0:
            self.live[identity.owner] = left
        else:
            self.live.pop(identity.owner, None)

    # -- one run ---------------------------------------------------------------------------------------------------

    async def start(self, spec: SessionSpec, *, caller: str | None, base_url: str | None,
                    parent: str | None = None, trace: Mapping[str, str] | None = None,
                    identity: Identity = MASTER, admitted: bool = False) -> Run:
        """Start a run owned by ``identity`` (its model calls are charged to that key, as the run's job); its record
        is in the state store when this returns (so any instance can read it), its events are copied there as they
        come and a cancel request from any instance reaches it. A 429 when the key has ``max_runs_per_key`` runs
        already (unless ``admitted``: a graph's node, counted with its graph)."""
        if not admitted:
            self.admit(identity, 1)
        run_id = "run_" + uuid.uuid4().hex
        run_dir = self.runs_dir / run_id
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except BaseException:
            if not admitted:
                self.leave(identity, 1)
            raise
        events = EventLog(run_dir / "events.jsonl")
        run = Run(run_id=run_id, spec=spec, caller=caller, run_dir=run_dir, parent=parent, trace=dict(trace or {}),
                  events=events, identity=identity, counted=not admitted)
        run.job = Job(kind="run", id=run_id, owner=identity.owner, max_cost_usd=spec.max_cost_usd,
                      on_exceeded=lambda reason: run.task.cancel() if run.task is not None else None)
        self.runs[run_id] = run
        self._write_status(run)
        await self.record(run)
        run.task = asyncio.ensure_future(self._execute(run, base_url))
        run.task.add_done_callback(lambda _: self._unconcluded(run))

        def cancel(reason: str) -> None:
            if run.task is not None:
                run.task.cancel()

        self.shared.drive(run_id, events, lambda: self._end(run), cancel, lambda: (STORE_NS, self._record_doc(run)))
        return run

    @staticmethod
    def _end(run: Run) -> dict[str, Any]:
        result = run.result or {}
        return _end_of({"run_id": run.run_id, "status": result.get("status", run.status),
                        "exit_code": result.get("exit_code")})

    def tail(self, run_id: str, doc: Mapping[str, Any]) -> tuple[EventLog, Callable[[], dict[str, Any]]] | None:
        """The run's event log and the end frame of its stream when this process drives it, or (a finished run,
        ``doc`` its record) this machine has its file; ``None`` when only the state store has its events (another
        process drives it)."""
        run = self.runs.get(run_id)
        if run is not None and run.events is not None:
            return run.events, lambda: self._end(run)
        path = self.runs_dir / run_id / "events.jsonl"
        if doc.get("status") not in TERMINAL or not path.is_file():
            return None
        return EventLog(path, closed=True), lambda: _end_of(doc)

    async def settled(self, run_id: str) -> dict[str, Any] | None:
        """The end frame of a run that is over by its record (finalised first when its driver died), else
        ``None``: how a stream following the run through the state store ends when no end record will come."""
        doc = await self.load(run_id)
        return _end_of(doc) if doc.get("status") in TERMINAL else None

    def _status_doc(self, run: Run) -> dict[str, Any]:
        job = run.job
        return {"run_id": run.run_id, "status": run.status, "profile": run.spec.profile, "caller": run.caller,
                "owner": run.identity.owner, "cwd": run.spec.cwd, "sandbox": run.spec.sandbox, "model": run.spec.model,
                "timeout_s": run.spec.timeout_s, "idle_timeout_s": run.spec.idle_timeout_s,
                "max_cost_usd": run.spec.max_cost_usd, "cost_usd": job.cost_usd if job else None,
                "unpriced_calls": job.unpriced_calls if job else 0,
                "created_at": run.created_at, "started_at": run.started_at, "updated_at": time.time(),
                **self.shared.stamp()}

    def _write_status(self, run: Run) -> None:
        self.shared.keep(run.run_dir, self._status_doc(run))

    async def _execute(self, run: Run, base_url: str | None) -> dict[str, Any]:
        spec = run.spec
        started = time.monotonic()
        events = self.runtime.events
        events.emit("run.start", None, unit=run.unit, parent=run.parent, name=f"exec {spec.profile}",
                    trace=run.trace, attrs={"run_id": run.run_id, "profile": spec.profile, "caller": run.caller,
                                            "sandbox": spec.sandbox, "model": spec.model, "surface": "exec",
                                            "events_url": f"/v1/scillm/exec/{run.run_id}/events"},
                    owner=run.identity.owner)
        try:
            async with self.slots().slot(run.identity.owner):
                run.status, run.started_at = "running", time.time()
                self._write_status(run)
                await self.record(run)
                run.key = self.keys.mint(run.run_id, run.caller, identity=run.identity, job=run.job)
                ctx = SessionContext(runtime=self.runtime, run_id=run.run_id, run_dir=run.run_dir,
                                     caller=run.caller, base_url=base_url, api_key=run.key, identity=run.identity,
                                     job=run.job)
                ctx.emit = self._emitter(run)
                thunk = self.runtime.hooks.run_session(spec, ctx)
                if thunk is None:
                    outcome = SessionResult(run_id=run.run_id, status="failed",
                                            error=f"no runner claimed profile {spec.profile!r}")
                else:
                    # outer bound for runners without their own (a CLI runner enforces timeout_s itself)
                    bound = spec.timeout_s + exec_config(self.runtime).kill_grace_s + 15
                    try:
                        outcome = await asyncio.wait_for(thunk(), bound)
                    except TimeoutError:
                        outcome = SessionResult(run_id=run.run_id, status="timeout",
                                                error=f"run exceeded timeout_s={spec.timeout_s:g}")
        except asyncio.CancelledError:
            stopped = run.job.exceeded if run.job is not None else None
            outcome = (SessionResult(run_id=run.run_id, status="failed", error=f"stopped: {stopped}") if stopped
                       else SessionResult(run_id=run.run_id, status="cancelled", error="cancelled"))
        except errors.ScillmError as exc:
            outcome = SessionResult(run_id=run.run_id, status="failed", error=str(exc))
        except Exception as exc:  # a runner bug must not lose the run's record
            outcome = SessionResult(run_id=run.run_id, status="failed", error=redact(f"{type(exc).__name__}: {exc}"))
        finally:
            self.keys.revoke(run.key)
        # a cancel that arrives now (the CLI has ended) must not stop the run's result being written: shielded
        run.concluding = self._concluding(run, outcome, time.monotonic() - started)
        return await asyncio.shield(run.concluding)

    def _unconcluded(self, run: Run) -> None:
        """A run whose task ended without concluding (cancelled before it ever ran): conclude it cancelled, so its
        waiters, its record and its key's count of runs are not left behind."""
        if run.concluding is None:
            outcome = SessionResult(run_id=run.run_id, status="cancelled", error="cancelled")
            run.concluding = self._concluding(run, outcome, 0.0)

    def _concluding(self, run: Run, outcome: SessionResult, duration_s: float) -> asyncio.Task[dict[str, Any]]:
        task = asyncio.ensure_future(self._conclude(run, outcome, duration_s))
        self.concluding.add(task)  # shutdown waits for it (the run itself has left self.runs by then)
        task.add_done_callback(self.concluding.discard)
        return task

    async def _conclude(self, run: Run, outcome: SessionResult, duration_s: float) -> dict[str, Any]:
        """Write the result, say ``run.end``, store the final record and end the event log (followers finish)."""
        try:
            result = await self._finalise(run, outcome, duration_s)
            self.runtime.events.emit("run.end", None, unit=run.unit, status=result["status"], error=result["error"],
                                     attrs={"exit_code": result["exit_code"], "duration_s": result["duration_s"]})
            await self.record(run)
        finally:
            if run.counted:
                self.leave(run.identity, 1)
            self.shared.release(run.run_id)
            if run.events is not None:
                run.events.close()  # the copy into the store ends with the run's end record
        return result

    def _emitter(self, run: Run) -> Any:
        """``ctx.emit`` for a run: a runner wrote an event to events.jsonl (copy it on) and, when someone listens,
        the ``run.event`` observability event."""
        events, log = self.runtime.events, run.events
        listen = events.wants("run.event")

        def emit(event: Mapping[str, Any]) -> None:
            if log is not None:
                log.notify()
            if listen:
                events.emit("run.event", None, unit=run.unit, event=event)

        return emit

    async def _finalise(self, run: Run, outcome: SessionResult, duration_s: float) -> dict[str, Any]:
        status, error, parsed = outcome.status, outcome.error, outcome.result
        text = outcome.final_text or ""
        if status == "completed" and run.spec.output_schema is not None:
            try:
                parsed = parse_final_json(text) if parsed is None else parsed
                validator = await schemas.check_schema_async(run.spec.output_schema, "$.output_schema")
                problems = await schemas.errors_async(validator, parsed, 1)
            except ValueError as exc:
                status, error, parsed = "failed", f"output_schema: {exc}", None
            else:
                if problems:
                    status, parsed = "failed", None
                    error = f"output_schema: final answer does not match at {problems[0]}"
        elif parsed is None and text:
            with contextlib.suppress(ValueError):
                parsed = loads(text)
        for name in ("events.jsonl", "stdout.log", "stderr.log"):
            (run.run_dir / name).touch()
        job = run.job
        result = {"run_id": run.run_id, "status": status, "exit_code": outcome.exit_code, "final_text": text,
                  "result": parsed, "error": error, "profile": run.spec.profile, "caller": run.caller,
                  "owner": run.identity.owner, "cost_usd": job.cost_usd if job else None,
                  "unpriced_calls": job.unpriced_calls if job else 0, "max_cost_usd": run.spec.max_cost_usd,
                  "duration_s": round(duration_s, 3), "artifacts": _artifacts(run.run_dir)}
        run.status, run.result = status, result
        _write_json(run.run_dir / "result.json", result)
        self._write_status(run)
        self.runs.pop(run.run_id, None)  # from now on it is read from its run dir: not kept in memory
        run.done.set()
        return result

    async def record(self, run: Run) -> None:
        """The run's record in the state store (its status; the result without the final text at the end). A store
        that is down never stops a run: the run dir has it all, and the final record goes again with the end of
        the run's events (:meth:`SharedRuns.drive`)."""
        with contextlib.suppress(Exception):
            await self.runtime.store.put(STORE_NS, run.run_id, self._record_doc(run))

    def _record_doc(self, run: Run) -> dict[str, Any]:
        return self._status_doc(run) | (
            {"result": {k: v for k, v in (run.result or {}).items() if k != "final_text"}} if run.result else {})

    async def wait(self, run: Run) -> dict[str, Any]:
        await asyncio.shield(run.done.wait())
        assert run.result is not None
        return run.result

    async def cancel(self, run_id: str) -> dict[str, Any]:
        """Cancel a run (this process's, or through the state store whichever process drives it) and answer its
        final document; a run that does not end within the kill grace (and some) is answered as it stands."""
        run = self.runs.get(run_id)
        if run is not None:
            if run.task is not None and not run.task.done():
                run.task.cancel()
            return await self.wait(run)
        doc = await self.load(run_id)
        if doc.get("status") in TERMINAL:
            return doc
        await self.shared.request_cancel(run_id, "cancelled")
        await self.shared.ended(run_id, lambda: self.settled(run_id), exec_config(self.runtime).kill_grace_s + 15)
        return await self.load(run_id)

    async def load_for(self, run_id: str, identity: Identity) -> dict[str, Any]:
        """:meth:`load` for a caller: 404 as well when the run belongs to another key."""
        doc = await self.load(run_id)
        require_visible(identity, doc.get("owner"), f"run {errors.quote(run_id)}")
        return doc

    async def load(self, run_id: str) -> dict[str, Any]:
        """A run's current document: live state, else result.json, else status.json (this machine's run dir),
        else the state store's record (a run another instance drives); 404 when unknown. A run whose driving
        process is gone (scillm was killed or restarted, or its instance died) is settled first (:meth:`_settle`);
        while the store is down, status.json is answered as it stands, marked (:meth:`SharedRuns.local`)."""
        if not RUN_ID.match(run_id):
            raise errors.NotFound(f"no run {errors.quote(run_id)}")
        run = self.runs.get(run_id)
        if run is not None:
            return run.result or self._status_doc(run) | {"artifacts": _artifacts(run.run_dir)}
        doc = await self.shared.local(self.runs_dir / run_id, self._settle)
        if doc is not None:
            return doc
        doc = await self.runtime.store.get(STORE_NS, run_id)
        if doc is None:
            raise errors.NotFound(f"no run {errors.quote(run_id)}")
        return await self._settle(doc)

    async def _settle(self, doc: dict[str, Any]) -> dict[str, Any]:
        """A record (status.json or the store's) as it stands, or, when the process driving it is gone, settled
        ``failed`` (interrupted): the store's record by compare-and-set (one reader settles it, the others read what
        it wrote); the one that does also, where the run dir is here, ends the CLI's process group if it outlived
        its scillm, writes result.json and status.json, and ends the event log (an event, then the end record in
        the store: every follower gets its end frame)."""
        if doc.get("status") in TERMINAL or not await self.shared.driver_gone(doc):
            return {**doc.get("result", {}), **{k: v for k, v in doc.items() if k != "result"}} \
                if doc.get("result") else doc
        run_id = doc["run_id"]
        stored = await self.runtime.store.get(STORE_NS, run_id)
        if stored is not None and stored.get("status") in TERMINAL:
            return await self._settle(stored)  # settled already (or it ended after all)
        error = f"interrupted: scillm stopped while the run was in flight (its process, {doc.get('instance')}, is gone)"
        result = {"run_id": run_id, "status": "failed", "exit_code": None, "final_text": "", "result": None,
                  "error": error, **{k: doc.get(k) for k in ("profile", "caller", "owner", "cost_usd",
                                                              "unpriced_calls", "max_cost_usd")}}
        final = {**(stored or doc), "status": "failed", "updated_at": time.time(),
                 "result": {k: v for k, v in result.items() if k != "final_text"}}
        if not await self.runtime.store.compare_and_set(STORE_NS, run_id, stored, final):
            return await self._settle(await self.runtime.store.get(STORE_NS, run_id) or final)
        run_dir = self.runs_dir / run_id
        log = None
        if (run_dir / "status.json").is_file():
            cfg = exec_config(self.runtime)
            left = await end_leftover_group(run_dir / "process.json", cfg.kill_grace_s)
            result |= {"artifacts": _artifacts(run_dir), "leftover_process_group": left}
            await asyncio.to_thread(_write_json, run_dir / "result.json", result)
            await asyncio.to_thread(self.shared.keep, run_dir, {**doc, "status": "failed",
                                                                "updated_at": final["updated_at"]})
            log = EventLog(run_dir / "events.jsonl")
        await self.shared.end_interrupted(run_id, log, {"type": "run.interrupted", "source": "scillm",
                                                        "error": error}, _end_of(final))
        return result if log is not None else await self._settle(final)

    async def recover(self) -> None:
        """At start-up, and once the state store answers when it did not then (:meth:`SharedRuns.recover`): settle
        the runs in this machine's run dir left running by a scillm that stopped (killed, crashed, restarted)."""
        await self.shared.recover(self._sweep)

    async def _sweep(self) -> bool:
        """Settle the unfinished runs of the run dir whose driver is gone; whether the store let every one through
        (a run read while it is down comes back as it stands, marked ``degraded``)."""
        through = True
        for run_id in await asyncio.to_thread(self._unfinished):
            with contextlib.suppress(Exception):  # one unreadable run never stops the others
                through = "degraded" not in await self.load(run_id) and through
        return through

    def _unfinished(self) -> list[str]:
        """Runs in the run dir without a result.json (the file system, off the event loop)."""
        try:
            entries = list(os.scandir(self.runs_dir))
        except FileNotFoundError:
            return []
        return [e.name for e in entries if RUN_ID.match(e.name) and not os.path.exists(
            os.path.join(e.path, "result.json")) and os.path.exists(os.path.join(e.path, "status.json"))]

    async def shutdown(self) -> None:
        live = [r.task for r in self.runs.values() if r.task is not None and not r.task.done()]
        for task in live:
            task.cancel()
        for task in live:
            with contextlib.suppress(BaseException):
                await task
        for task in list(self.concluding):  # results still being written (shielded from the cancel above)
            with contextlib.suppress(BaseException):
                await task
        await self.shared.stop()

    # -- graphs ----------------------------------------------------------------------------------------------------

    async def parse_graph(self, body: Any) -> tuple[list[tuple[str, SessionSpec, list[str]]], int]:
        if not isinstance(body, dict):
            raise _bad("expected an object with nodes", "$")
        check_fields(body, {"nodes", "max_concurrency", "wait"})
        if body.get("wait", True) is not True:  # a graph's answer is always its result
            raise _bad("a graph always answers with its result: wait may only be true", "$.wait")
        nodes = body.get("nodes")
        if not isinstance(nodes, list) or not nodes:
            raise _bad("nodes must be a non-empty array", "$.nodes")
        limit = body.get("max_concurrency", len(nodes))
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise _bad("max_concurrency must be a positive integer", "$.max_concurrency")
        parsed: list[tuple[str, SessionSpec, list[str]]] = []
        ids: set[str] = set()
        for i, node in enumerate(nodes):
            if i % PARSE_STEP == PARSE_STEP - 1:
                await asyncio.sleep(0)  # a 10,000-node graph is seconds of checks: other callers go on between steps
            where = f"$.nodes[{i}]"
            if not isinstance(node, dict):
                raise _bad("expected a node object", where)
            node_id = node.get("id")
            if not isinstance(node_id, str) or not ID.match(node_id):
                raise _bad("id must be 1-128 letters, digits or ._:@- (starting with a letter or digit)", f"{where}.id")
            if node_id in ids:
                raise _bad(f"duplicate node id {node_id!r}", f"{where}.id")
            ids.add(node_id)
            deps = node.get("depends_on", [])
            if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
                raise _bad("depends_on must be an array of node ids", f"{where}.depends_on")
            spec = await spec_from_body({k: v for k, v in node.items() if k not in ("id", "depends_on")}, self.runtime,
                                  where=where)
            parsed.append((node_id, spec, list(deps)))
        for i, (node_id, _, deps) in enumerate(parsed):
            for j, dep in enumerate(deps):
                if dep not in ids:
                    raise _bad(f"node {node_id!r} depends on unknown node {dep!r}", f"$.nodes[{i}].depends_on[{j}]")
        graph = {node_id: deps for node_id, _, deps in parsed}
        cycle = find_cycle(graph)
        if cycle:
            raise _bad("dependency cycle: " + " -> ".join(cycle), "$.nodes")
        return parsed, limit

    async def run_graph(self, nodes: list[tuple[str, SessionSpec, list[str]]], limit: int, *,
                        caller: str | None, base_url: str | None,
                        trace: Mapping[str, str] | None = None, identity: Identity = MASTER) -> dict[str, Any]:
        graph_id = "graph_" + uuid.uuid4().hex
        cap = exec_config(self.runtime).max_runs_per_key
        limit = min(limit, len(nodes))  # nodes live at once: counted for the key as that many runs,
        if cap is not None:             # as many as the key has left (a 429 when it has none)
            limit = min(limit, max(1, cap - self.live.get(identity.owner, 0)))
        self.admit(identity, limit)
        unit, events = f"graph:{graph_id}", self.runtime.events
        events.emit("graph.start", None, unit=unit, parent=None, name="exec graph", trace=dict(trace or {}),
                    attrs={"graph_id": graph_id, "nodes": len(nodes), "caller": caller, "max_concurrency": limit},
                    owner=identity.owner)
        try:
            doc = await self._run_graph(graph_id, unit, nodes, limit, caller=caller, base_url=base_url,
                                        identity=identity)
        except BaseException:
            events.emit("graph.end", None, unit=unit, status="cancelled", error="cancelled", attrs={})
            raise
        finally:
            self.leave(identity, limit)
        events.emit("graph.end", None, unit=unit, status=doc["status"], error=None,
                    attrs={"skipped": sum(1 for n in doc["nodes"] if n["status"] == "skipped")})
        return doc

    async def _run_graph(self, graph_id: str, unit: str, nodes: list[tuple[str, SessionSpec, list[str]]],
                         limit: int, *, caller: str | None, base_url: str | None,
                         identity: Identity) -> dict[str, Any]:
        slots = asyncio.Semaphore(limit)
        results: dict[str, dict[str, Any]] = {}
        finished: dict[str, asyncio.Event] = {node_id: asyncio.Event() for node_id, _, _ in nodes}

        async def one(node_id: str, spec: SessionSpec, deps: list[str]) -> None:
            try:
                for dep in deps:
                    await finished[dep].wait()
                failed = [d for d in deps if results[d]["status"] != "completed"]
                if failed:
                    results[node_id] = {"id": node_id, "status": "skipped", "run_id": None,
                                        "error": f"dependency {failed[0]!r} ended {results[failed[0]]['status']}"}
                    return
                async with slots:  # the graph's max_concurrency: a node's run exists only once it may go
                    run = await self.start(spec, caller=caller, base_url=base_url, parent=unit, identity=identity,
                                           admitted=True)
                    results[node_id] = {"id": node_id, **(await self.wait(run))}
            finally:
                finished[node_id].set()

        tasks = [asyncio.ensure_future(one(*node)) for node in nodes]
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        ordered = [results[node_id] for node_id, _, _ in nodes]
        status = "completed" if all(r["status"] == "completed" for r in ordered) else "failed"
        doc = {"graph_id": graph_id, "status": status, "max_concurrency": limit, "owner": identity.owner,
               "nodes": ordered}
        graph_dir = self.runs_dir / graph_id
        graph_dir.mkdir(parents=True, exist_ok=True)
        _write_json(graph_dir / "result.json", doc)
        return doc


def find_cycle(graph: Mapping[str, list[str]]) -> list[str] | None:
    """A dependency cycle as ``[a, b, ..., a]``, else ``None``. Iterative: a long chain cannot exhaust the stack."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in graph:
        if start in state:
            continue
        state[start] = 1
        path = [start]
        pending = [iter(graph[start])]
        while pending:
            dep = next(pending[-1], None)
            if dep is None:
                state[path.pop()] = 2
                pending.pop()
            elif state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            elif dep not in state:
                state[dep] = 1
                path.append(dep)
                pending.append(iter(graph[dep]))
    return None
