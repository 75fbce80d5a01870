"""OpenCode serve runs (``POST /v1/scillm/opencode/runs``): one bounded OpenCode session with an agent profile and
skills, in an isolated git worktree of the caller's ``cwd``, returning evidence (assistant text, diff, changed
paths, events). The terminal status is decided once: whichever of completion, timeout, abort or a dead server
comes first wins, and nothing that arrives later changes it."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import TYPE_CHECKING, Any

from attrs import define
from scillm_exec import EventLog, check_cwd, remove_worktree, worktree_diff

from scillm_core import Identity, errors, max_cost_of
from scillm_opencode.book import ABORT_GRACE_S, LiveRun, RunBook, Sessions
from scillm_opencode.client import RESULT_S, ServeError
from scillm_opencode.profiles import (
    bad,
    check_agent_shape,
    check_object,
    resolve_agent,
    resolve_model,
    run_fields,
    seconds,
    text,
)
from scillm_opencode.session import Bus, Ended, SessionDriver, assistant_text
from scillm_opencode.skills import check_skill_names, skill_rules

if TYPE_CHECKING:
    from scillm_core import Runtime

__all__ = ["Run", "ServeRuns"]

FIELDS = {"prompt", "agent", "model", "cwd", "skills", "timeout_s", "wait", "run_id", "scillm_metadata", "title",
          "system", "max_cost_usd"}


@define(kw_only=True)
class Run(LiveRun):
    request: dict[str, Any]
    agent: str
    model: dict[str, str] | None
    session_id: str | None = None
    started_at: float | None = None


class ServeRuns(RunBook[Run]):
    def __init__(self, runtime: Runtime, sessions: Sessions) -> None:
        super().__init__(runtime, sessions, "opencode.runs", "runs")

    # -- request -> run -------------------------------------------------------------------------------------------

    def parse(self, body: Any, *, agent_default: str = "build", skills_default: tuple[str, ...] = ()
              ) -> dict[str, Any]:
        """Validate a request body (no server needed); 400 naming the field."""
        body = check_object(body, FIELDS)
        agent = check_agent_shape(body.get("agent", agent_default), "$.agent")
        cwd = body.get("cwd")
        if not isinstance(cwd, str) or not cwd:
            raise bad("cwd is required: the absolute path of the directory to work on (a git checkout)", "$.cwd")
        wait = body.get("wait", True)
        if not isinstance(wait, bool):
            raise bad("wait must be true or false", "$.wait")
        run_id, metadata = run_fields(body)
        skills = check_skill_names(body.get("skills"), "$.skills")
        skills = list(dict.fromkeys([*skills_default, *skills]))
        return {"prompt": text(body.get("prompt"), "$.prompt", required=True), "agent": agent,
                "model": body.get("model"), "cwd": str(check_cwd(cwd, self.runtime, "$.cwd")), "skills": skills,
                "timeout_s": seconds(body.get("timeout_s"), "$.timeout_s", default=self.cfg.default_timeout_s,
                                     limit=self.cfg.max_timeout_s),
                "wait": wait, "run_id": run_id, "scillm_metadata": metadata,
                "title": text(body.get("title"), "$.title", limit=200),
                "system": text(body.get("system"), "$.system", limit=64 << 10),
                "max_cost_usd": max_cost_of(body.get("max_cost_usd"), "$.max_cost_usd")}

    def unit_attrs(self, run: Run) -> dict[str, Any]:
        return {"profile": run.agent, "model": "/".join(run.model.values()) if run.model else None}

    async def start(self, request: dict[str, Any], *, caller: str | None, identity: Identity, base_url: str,
                    trace: dict[str, str] | None = None) -> Run:
        run_id = request["run_id"] or "oc-" + uuid.uuid4().hex[:16]
        server = await self.serve.ensure(base_url)
        agent = await resolve_agent(server, request["agent"], self.runtime, "$.agent")
        if request["model"] is None and not server.managed:
            model = None
        else:
            model = await resolve_model(server, request["model"] or self.serve.default_model(), "$.model")
        run_dir, worktree = await self.claim(run_id, request["cwd"], "$.cwd")
        run = Run(run_id=run_id, caller=caller, identity=identity, request=request, run_dir=run_dir, server=server,
                  log=EventLog(run_dir / "events.jsonl", redact=self.serve.secrets()), worktree=worktree,
                  agent=agent, model=model, trace=trace or {})
        run.job_for(request["max_cost_usd"])
        return await self.begin(run, self._execute)

    # -- the run ------------------------------------------------------------------------------------------------

    def emit(self, run: Run, name: str, fields: dict[str, Any]) -> None:
        if not run.log.closed and not run.decided:
            event = run.log.append(name, node=None, **fields)
            if run.unit is not None:
                run.unit.event({"seq": event["seq"], "type": name})

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
                try:
                    async with asyncio.timeout(request["timeout_s"]):  # a stalling server: the run's timeout holds
                        run.skills_materialized, run.skills_missing = await self.sessions.skills(
                            run.server, request["skills"])
                        if request["skills"]:
                            self.emit(run, "skills", {"materialized": run.skills_materialized,
                                                      "missing": run.skills_missing})
                        directory = str(run.worktree.workdir)
                        bus = Bus(run.server, directory)
                        await bus.open()
                        driver = SessionDriver(bus, lambda name, fields: self.emit(run, name, fields),
                                               on_child=lambda child: self.sessions.bind_child(child,
                                                                                               run.session_id or ""))
                        session_body: dict[str, Any] = {
                            "title": request["title"] or f"scillm {run.agent} {run.run_id}", "agent": run.agent,
                            "permission": skill_rules(run.skills_materialized)}
                        run.session_id = await driver.create(session_body)
                        self.sessions.bind(run.session_id, run)
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
                except TimeoutError:
                    ended = Ended.TIMEOUT
                else:
                    assert driver is not None
                    ended = await self.follow(driver, run.stop, deadline)
                if ended == Ended.IDLE:
                    run.decide("completed")
                elif ended == Ended.ERROR and driver is not None:
                    run.decide("error", driver.error)
                elif ended == Ended.LOST and bus is not None:
                    run.decide("error", await bus.why_lost())
                elif ended == Ended.TIMEOUT:
                    run.decide("timeout", f"no result within timeout_s={request['timeout_s']:g}; the session "
                                          "was aborted")
                if ended in (Ended.TIMEOUT, Ended.STOPPED) and driver is not None and \
                        not await driver.abort(ABORT_GRACE_S):
                    run.error = f"{run.error}; the OpenCode session did not confirm the abort"
                if not run.server.died.is_set() and driver is not None and driver.session_id is not None:
                    with contextlib.suppress(ServeError):
                        text_out, _ = assistant_text(await driver.messages(RESULT_S))
        except asyncio.CancelledError:
            run.decide("error", "scillm shut down while the run was in flight")
            if driver is not None:  # bounded here; shutdown awaits the rest of it
                abort = self.cleanup(driver.abort(2.0))
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(abort), 3.0)
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
            await self.finish(run, {"assistant_text": text_out, "diff": diff, "changed_paths": paths})

    def doc(self, run: Run, *, final: bool = False) -> dict[str, Any]:
        """The run's document; its status is terminal only once the result (diff, text) is complete."""
        request = run.request
        done = final or run.result is not None
        return {"run_id": run.run_id, "status": run.status if done else "running",
                "error": run.error if done else None, "session_id": run.session_id,
                "agent": run.agent, "model": run.model, "cwd": request["cwd"], "caller": run.caller,
                "owner": run.owner, "cost_usd": run.job.cost_usd if run.job else None,
                "max_cost_usd": request["max_cost_usd"], "timeout_s": request["timeout_s"],
                "skills_requested": request["skills"],
                "skills_materialized": run.skills_materialized, "skills_missing": sorted(run.skills_missing),
                "skills_missing_reasons": run.skills_missing, "scillm_metadata": request["scillm_metadata"],
                "created_at": run.created_at, "started_at": run.started_at, "finished_at": run.finished_at,
                "worktree": str(run.worktree.path) if self.cfg.keep_worktrees or not run.decided else None,
                "base_commit": run.worktree.base, "repo": str(run.worktree.repo),
                "artifacts": {"run_dir": str(run.run_dir), "events_jsonl": str(run.run_dir / "events.jsonl"),
                              "diff_patch": str(run.run_dir / "diff.patch"),
                              "result_json": str(run.run_dir / "result.json")},
                **self.records.stamp()}
