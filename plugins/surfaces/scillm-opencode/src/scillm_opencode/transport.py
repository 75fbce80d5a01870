"""The OpenCode transport (``/v1/scillm/opencode/transport/*``): a DAG of OpenCode sessions in one worktree of a
workspace, with one normalised event stream for the whole run that a client tails (resumable with ``after``) and
steers (a user message into a running node), answers permission requests on, and aborts.

Every event carries ``seq``, ``node`` and ``ts``. A node whose dependency did not complete is skipped; a
``propose-only`` node may not change the workspace (its session cannot edit, and a write it made anyway, e.g.
after an approved ``ask``, fails it). Terminal states, of nodes and of the run, are decided once: events that
arrive after (an aborted session's own idle or error) change nothing and are not streamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import TYPE_CHECKING, Any

from attrs import define, field
from scillm_exec import EventLog, check_cwd, find_cycle, remove_worktree, worktree_diff

from scillm_core import Identity, errors, max_cost_of
from scillm_core.events import Unit
from scillm_opencode.book import ABORT_GRACE_S, LiveRun, RunBook, Sessions
from scillm_opencode.client import RESULT_S, ServeError
from scillm_opencode.profiles import (
    bad,
    check_agent_shape,
    check_object,
    check_rules,
    resolve_agent,
    resolve_model,
    run_fields,
    seconds,
    text,
)
from scillm_opencode.records import RUN_ID, TERMINAL
from scillm_opencode.session import Bus, Ended, SessionDriver, assistant_text
from scillm_opencode.skills import check_skill_names, skill_rules

if TYPE_CHECKING:
    from scillm_core import Runtime

__all__ = ["EVENT_TYPES", "MODES", "Transport"]

MODES = ("propose-only", "workspace-write")
RUN_FIELDS = {"workspace", "nodes", "timeout_s", "run_id", "scillm_metadata", "title", "max_concurrency",
              "max_cost_usd"}
NODE_FIELDS = {"id", "prompt", "agent", "depends_on", "model", "skills", "mode", "permission", "timeout_s",
               "system"}
NODE_ID = RUN_ID
EVENT_TYPES = ("run_started", "node_started", "user_message", "transcript_delta", "reasoning_delta", "tool_call",
               "permission_requested", "permission_replied", "steer", "retry", "node_completed", "node_failed",
               "node_skipped", "run_completed")
WRITE_TOOLS = ("edit", "write", "patch", "multiedit", "apply_patch")


@define
class Node:
    id: str
    prompt: str
    agent: str
    depends_on: list[str]
    mode: str
    skills: list[str]
    rules: list[dict[str, str]]
    timeout_s: float
    model: str | None = None
    system: str | None = None
    resolved_model: dict[str, str] | None = None
    status: str = "pending"
    error: str | None = None
    session_id: str | None = None
    driver: SessionDriver | None = None
    assistant_text: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    finished: asyncio.Event = field(factory=asyncio.Event)
    unit: Unit | None = None  # the node as a unit of work inside its transport run, while its session runs

    def decide(self, status: str, error: str | None = None) -> bool:
        if self.finished.is_set() or self.status not in ("pending", "running"):
            return False
        self.status, self.error = status, error
        return True

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "error": self.error, "agent": self.agent, "mode": self.mode,
                "depends_on": self.depends_on, "session_id": self.session_id, "skills": self.skills,
                "assistant_text": self.assistant_text, "started_at": self.started_at,
                "finished_at": self.finished_at,
                "pending_permissions": sorted(self.driver.pending) if self.driver is not None else []}


@define(kw_only=True)
class TransportRun(LiveRun):
    workspace: str
    nodes: dict[str, Node]
    timeout_s: float
    max_concurrency: int
    metadata: dict[str, Any]
    title: str | None
    bus: Bus | None = None
    writers: int = 0                      # workspace-write nodes running now
    writer_epoch: int = 0                 # bumped when one starts (a propose-only node checks its window)


class Transport(RunBook[TransportRun]):
    unit_kind = "graph"  # its nodes are runs in it
    unit_name = "opencode transport"
    events_path = "/v1/scillm/opencode/transport/runs/{run_id}/events/stream"

    def __init__(self, runtime: Runtime, sessions: Sessions) -> None:
        super().__init__(runtime, sessions, "opencode.transport", "transport")

    def unit_attrs(self, run: TransportRun) -> dict[str, Any]:
        return {"graph_id": run.run_id, "nodes": len(run.nodes), "profile": "transport"}

    # -- request -> run -------------------------------------------------------------------------------------------

    def parse(self, body: Any) -> dict[str, Any]:
        body = check_object(body, RUN_FIELDS)
        workspace = body.get("workspace")
        if not isinstance(workspace, str) or not workspace:
            raise bad("workspace is required: the absolute path of a git checkout", "$.workspace")
        timeout_s = seconds(body.get("timeout_s"), "$.timeout_s", default=self.cfg.default_timeout_s,
                            limit=self.cfg.max_timeout_s)
        raw = body.get("nodes")
        if not isinstance(raw, list) or not raw or len(raw) > 64:
            raise bad("nodes must be a non-empty array (at most 64)", "$.nodes")
        nodes: dict[str, Node] = {}
        for i, item in enumerate(raw):
            where = f"$.nodes[{i}]"
            item = check_object(item, NODE_FIELDS, where)
            node_id = item.get("id")
            if not isinstance(node_id, str) or not NODE_ID.match(node_id):
                raise bad(f"id must match {NODE_ID.pattern}", f"{where}.id")
            if node_id in nodes:
                raise bad(f"duplicate node id {node_id!r}", f"{where}.id")
            deps = item.get("depends_on", [])
            if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
                raise bad("depends_on must be an array of node ids", f"{where}.depends_on")
            mode = item.get("mode", "workspace-write")
            if mode not in MODES:
                raise bad(f"mode must be one of {', '.join(MODES)}, got {mode!r}", f"{where}.mode")
            model = item.get("model")
            if model is not None and (not isinstance(model, str) or not model):
                raise bad("model must be a non-empty string", f"{where}.model")
            nodes[node_id] = Node(
                id=node_id, prompt=text(item.get("prompt"), f"{where}.prompt", required=True) or "",
                agent=check_agent_shape(item.get("agent", "build"), f"{where}.agent"), depends_on=list(deps),
                mode=mode, skills=check_skill_names(item.get("skills"), f"{where}.skills"),
                rules=check_rules(item.get("permission"), f"{where}.permission"), model=model,
                system=text(item.get("system"), f"{where}.system", limit=64 << 10),
                timeout_s=seconds(item.get("timeout_s"), f"{where}.timeout_s", default=timeout_s,
                                  limit=self.cfg.max_timeout_s))
        ids = list(nodes)
        for i, node in enumerate(nodes.values()):
            for j, dep in enumerate(node.depends_on):
                if dep not in nodes:
                    raise bad(f"node {node.id!r} depends on unknown node {dep!r}", f"$.nodes[{i}].depends_on[{j}]")
        cycle = find_cycle({n.id: n.depends_on for n in nodes.values()})
        if cycle:
            raise bad("dependency cycle: " + " -> ".join(cycle), "$.nodes")
        limit = body.get("max_concurrency", len(ids))
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise bad("max_concurrency must be a positive integer", "$.max_concurrency")
        run_id, metadata = run_fields(body)
        return {"workspace": str(check_cwd(workspace, self.runtime, "$.workspace")), "nodes": nodes,
                "timeout_s": timeout_s, "max_concurrency": limit, "run_id": run_id, "scillm_metadata": metadata,
                "title": text(body.get("title"), "$.title", limit=200),
                "max_cost_usd": max_cost_of(body.get("max_cost_usd"), "$.max_cost_usd")}

    async def start(self, request: dict[str, Any], *, caller: str | None, identity: Identity, base_url: str,
                    trace: dict[str, str] | None = None) -> TransportRun:
        run_id = request["run_id"] or "otr-" + uuid.uuid4().hex[:16]
        server = await self.serve.ensure(base_url)
        nodes: dict[str, Node] = request["nodes"]
        for i, node in enumerate(nodes.values()):
            node.agent = await resolve_agent(server, node.agent, self.runtime, f"$.nodes[{i}].agent")
            wanted = node.model or (self.serve.default_model() if server.managed else None)
            node.resolved_model = await resolve_model(server, wanted, f"$.nodes[{i}].model")
        run_dir, worktree = await self.claim(run_id, request["workspace"], "$.workspace")
        run = TransportRun(
            run_id=run_id, caller=caller, identity=identity, workspace=request["workspace"], nodes=nodes,
            run_dir=run_dir, log=EventLog(run_dir / "events.jsonl", redact=self.serve.secrets()), server=server,
            worktree=worktree, timeout_s=request["timeout_s"], max_concurrency=request["max_concurrency"],
            metadata=request["scillm_metadata"], title=request["title"], trace=trace or {})
        run.job_for(request["max_cost_usd"])
        return await self.begin(run, self._execute)

    # -- the run ------------------------------------------------------------------------------------------------

    def emit(self, run: TransportRun, node: Node | None, name: str, fields: dict[str, Any]) -> None:
        """Append a normalised event, unless the run (or, for a node's own events, the node) is already over."""
        if run.log.closed or run.decided:
            return
        if node is not None and name not in ("node_completed", "node_failed") and node.finished.is_set():
            return
        event = run.log.append(name, node=node.id if node is not None else None, **fields)
        unit = node.unit if node is not None and node.unit is not None else run.unit
        if unit is not None:
            unit.event({"seq": event["seq"], "type": name})

    async def _execute(self, run: TransportRun) -> None:
        nodes: list[asyncio.Task[None]] = []
        helpers: list[asyncio.Task[Any]] = []  # what waits for the nodes: with them, all ended before the run ends
        try:
            self.emit(run, None, "run_started", {"nodes": [{"id": n.id, "agent": n.agent, "mode": n.mode,
                                                            "depends_on": n.depends_on} for n in run.nodes.values()],
                                                 "worktree": str(run.worktree.workdir)})
            wanted = list(dict.fromkeys(s for n in run.nodes.values() for s in n.skills))
            started = time.monotonic()
            try:
                async with asyncio.timeout(run.timeout_s):  # a stalling server: the run's timeout holds
                    run.skills_materialized, run.skills_missing = await self.sessions.skills(run.server, wanted)
                    run.bus = Bus(run.server, str(run.worktree.workdir))
                    await run.bus.open()
            except TimeoutError:
                run.decide("timeout", f"the run passed timeout_s={run.timeout_s:g} before the OpenCode server "
                                      "opened its event stream")
                return
            limit = asyncio.Semaphore(run.max_concurrency)
            nodes += [asyncio.ensure_future(self._node(run, node, limit)) for node in run.nodes.values()]
            waiter = asyncio.ensure_future(asyncio.wait(nodes))
            timer = asyncio.ensure_future(asyncio.sleep(run.timeout_s - (time.monotonic() - started)))
            helpers += [waiter, timer]
            done, _ = await asyncio.wait({waiter, timer}, return_when=asyncio.FIRST_COMPLETED)
            if waiter not in done:
                if run.decide("timeout", f"the run passed timeout_s={run.timeout_s:g}; running nodes were aborted"):
                    run.stop.set()
                await waiter
        except asyncio.CancelledError:
            if run.decide("error", "scillm shut down while the run was in flight"):
                run.stop.set()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.gather(*nodes, return_exceptions=True), ABORT_GRACE_S + 5)
        except errors.ScillmError as exc:
            if run.decide("error", exc.message):
                run.stop.set()
        except Exception as exc:
            if run.decide("error", f"{type(exc).__name__}: {exc}"):
                run.stop.set()
        finally:
            await _ended([*nodes, *helpers])
            await self._finish(run)

    async def _node(self, run: TransportRun, node: Node, limit: asyncio.Semaphore) -> None:
        try:
            for dep in node.depends_on:
                await run.nodes[dep].finished.wait()
            failed = [d for d in node.depends_on if run.nodes[d].status != "completed"]
            if run.stop.is_set():
                node.decide("skipped", f"the run ended {run.status} before it started")
                return
            if failed:
                node.decide("skipped", f"dependency {failed[0]!r} ended {run.nodes[failed[0]].status}")
                self.emit(run, node, "node_skipped", {"reason": node.error})
                return
            async with limit, self.sessions.slot(run.stop) as got:
                if not got:
                    node.decide("skipped", f"the run ended {run.status} before it started")
                    return
                await self._session(run, node)
        except asyncio.CancelledError:
            node.decide("aborted", "the run was stopped")
            raise
        except errors.ScillmError as exc:
            if node.decide("failed", exc.message):
                self.emit(run, node, "node_failed", {"error": node.error})
        except Exception as exc:
            if node.decide("failed", f"{type(exc).__name__}: {exc}"):
                self.emit(run, node, "node_failed", {"error": node.error})
        finally:
            node.finished_at = node.finished_at or time.time()
            if node.unit is not None:
                node.unit.end(node.status if node.status not in ("pending", "running") else "failed", node.error)
            node.finished.set()

    async def _session(self, run: TransportRun, node: Node) -> None:
        assert run.bus is not None
        node.status, node.started_at = "running", time.time()
        writer = node.mode == "workspace-write"
        if writer:
            run.writers += 1
            run.writer_epoch += 1
        epoch, before = run.writer_epoch, None
        if not writer:
            async with run.diff_lock:
                before = await worktree_diff(run.worktree)
        node.unit = Unit(self.runtime.events, "run", f"run:opencode/{run.run_id}/{node.id}",
                         name=f"opencode node {node.id}", parent=run.unit.unit if run.unit else None,
                         owner=run.owner, attrs={
                             "run_id": f"{run.run_id}/{node.id}", "caller": run.caller, "profile": node.agent,
                             "mode": node.mode, "surface": "opencode",
                             "events_url": f"{self.events_path.format(run_id=run.run_id)}?after={run.log.seq}"})
        driver = node.driver = SessionDriver(run.bus, lambda name, fields: self.emit(run, node, name, fields),
                                             on_child=lambda child: self.sessions.bind_child(child,
                                                                                             node.session_id or ""))
        try:
            allowed = [s for s in node.skills if s in run.skills_materialized]
            rules = skill_rules(allowed)
            if not writer:
                rules.append({"permission": "edit", "pattern": "*", "action": "deny"})
            deadline = time.monotonic() + node.timeout_s
            try:
                async with asyncio.timeout(node.timeout_s):  # a stalling server: the node's timeout holds
                    node.session_id = await driver.create({"title": f"scillm {run.run_id} {node.id}",
                                                           "agent": node.agent, "permission": [*rules, *node.rules]})
                    self.sessions.bind(node.session_id, run, node.unit)
                    self.emit(run, node, "node_started", {
                        "session_id": node.session_id, "agent": node.agent, "mode": node.mode,
                        "model": node.resolved_model, "skills_materialized": allowed,
                        "skills_missing": [s for s in node.skills if s not in run.skills_materialized]})
                    await driver.prompt(self._prompt(node, node.prompt))
            except TimeoutError:
                ended = Ended.TIMEOUT
            else:
                ended = await self.follow(driver, run.stop, deadline)
            if ended in (Ended.TIMEOUT, Ended.STOPPED):
                await driver.abort(ABORT_GRACE_S)
            if not run.server.died.is_set() and driver.session_id is not None:
                with contextlib.suppress(ServeError):
                    node.assistant_text, _ = assistant_text(await driver.messages(RESULT_S))
            if ended == Ended.IDLE and not writer:
                wrote = [t for t in driver.wrote if t in WRITE_TOOLS]
                if not wrote and run.writers == 0 and run.writer_epoch == epoch:  # nobody else could have written
                    async with run.diff_lock:
                        after = await worktree_diff(run.worktree)
                    if after != before:
                        wrote = [p for p in after[1] if p not in (before or ("", []))[1]] or after[1]
                if wrote:
                    ended = Ended.ERROR
                    driver.error = ("propose-only node changed the workspace (" + ", ".join(wrote) + "); it may "
                                    "only propose changes in its answer")
            self._end_node(run, node, ended, driver, await run.bus.why_lost() if ended == Ended.LOST else None)
        finally:
            if writer:
                run.writers -= 1
            await driver.close()
            self.sessions.unbind(node.session_id)
            if node.session_id and not run.server.died.is_set():
                with contextlib.suppress(ServeError):
                    await run.server.client.delete_session(str(run.worktree.workdir), node.session_id)

    def _prompt(self, node: Node, message: str) -> dict[str, Any]:
        body: dict[str, Any] = {"parts": [{"type": "text", "text": message}], "agent": node.agent}
        if node.resolved_model:
            body["model"] = node.resolved_model
        if node.system:
            body["system"] = node.system
        return body

    def _end_node(self, run: TransportRun, node: Node, ended: str, driver: SessionDriver, lost: str | None) -> None:
        node.finished_at = time.time()
        if ended == Ended.IDLE:
            if node.decide("completed"):
                self.emit(run, node, "node_completed", {"assistant_text": node.assistant_text})
            return
        if ended == Ended.STOPPED:
            node.decide("aborted", f"the run was {run.status}")
            return
        reason = {Ended.ERROR: driver.error or "session error",
                  Ended.TIMEOUT: f"no result within timeout_s={node.timeout_s:g}; the session was aborted",
                  Ended.LOST: lost or "lost the OpenCode server"}.get(ended, ended)
        if node.decide("timeout" if ended == Ended.TIMEOUT else "failed", reason):
            self.emit(run, node, "node_failed", {"error": reason, "status": node.status})

    async def _finish(self, run: TransportRun) -> None:
        statuses = [n.status for n in run.nodes.values()]
        run.decide("completed" if all(s == "completed" for s in statuses) else "failed",
                   None if all(s == "completed" for s in statuses) else "not every node completed")
        for node in run.nodes.values():
            if node.status in ("pending", "running"):
                node.status = "aborted" if run.status == "aborted" else "skipped"
                node.error = node.error or f"the run ended {run.status}"
        diff, paths = "", []
        async with run.diff_lock:
            with contextlib.suppress(Exception):
                diff, paths = await worktree_diff(run.worktree)
            await self.sessions.release(run.bus, str(run.worktree.workdir) if run.bus is not None else None)
            if not self.cfg.keep_worktrees:
                with contextlib.suppress(Exception):
                    await remove_worktree(run.worktree)
        await self.finish(run, {"diff": diff, "changed_paths": paths},
                          nodes={n.id: n.status for n in run.nodes.values()})

    def doc(self, run: TransportRun, *, final: bool = False) -> dict[str, Any]:
        """The run's document; its status is terminal only once the result (diff) is complete."""
        done = final or run.result is not None
        return {"run_id": run.run_id, "status": run.status if done else "running",
                "error": run.error if done else None, "workspace": run.workspace,
                "caller": run.caller, "owner": run.owner, "cost_usd": run.job.cost_usd if run.job else None,
                "max_cost_usd": run.job.max_cost_usd if run.job else None, "title": run.title,
                "timeout_s": run.timeout_s,
                "nodes": [n.view() for n in run.nodes.values()], "scillm_metadata": run.metadata,
                "skills_materialized": run.skills_materialized, "skills_missing": sorted(run.skills_missing),
                "created_at": run.created_at, "finished_at": run.finished_at,
                "worktree": str(run.worktree.path) if self.cfg.keep_worktrees or not run.decided else None,
                "base_commit": run.worktree.base, "repo": str(run.worktree.repo),
                "artifacts": {"run_dir": str(run.run_dir), "events_jsonl": str(run.run_dir / "events.jsonl"),
                              "diff_patch": str(run.run_dir / "diff.patch"),
                              "result_json": str(run.run_dir / "result.json")},
                **self.records.stamp()}

    # -- reading and steering -----------------------------------------------------------------------------------

    def live_run(self, run_id: str, doc: dict[str, Any]) -> TransportRun:
        """The run this process drives, to steer or answer; 409 when it is over or another instance drives it."""
        run = self.runs.get(run_id)
        if run is None and doc.get("status") not in TERMINAL:
            raise errors.Conflict(f"run {errors.quote(run_id)} is driven by another scillm instance "
                                  f"({doc.get('instance')}); "
                                  "steer it and answer its permission requests through that instance")
        if run is None or run.done.is_set() or run.decided:
            raise errors.Conflict(f"run {errors.quote(run_id)} is not running")
        return run

    async def steer(self, run_id: str, body: Any) -> dict[str, Any]:
        body = check_object(body, {"node", "message"})
        message = text(body.get("message"), "$.message", required=True, limit=64 << 10) or ""
        run = self.live_run(run_id, await self.load(run_id))  # 404 for an unknown run
        node = self._pick(run, body.get("node"))
        if node.status != "running" or node.driver is None or node.driver.session_id is None:
            raise errors.Conflict(f"node {node.id!r} is {node.status}; only a running node can be steered",
                                  param="$.node")
        await node.driver.prompt(self._prompt(node, message))
        self.emit(run, node, "steer", {"text": message[:2000]})
        return {"run_id": run_id, "node": node.id, "session_id": node.session_id, "delivered": True}

    def _pick(self, run: TransportRun, name: Any) -> Node:
        if name is None:
            running = [n for n in run.nodes.values() if n.status == "running"]
            if len(running) != 1:
                raise bad(f"node is required when {len(running)} nodes are running", "$.node")
            return running[0]
        if not isinstance(name, str) or name not in run.nodes:
            raise bad(f"unknown node {errors.quote(name)} (nodes: {', '.join(run.nodes)})", "$.node")
        return run.nodes[name]

    async def permission(self, run_id: str, body: Any) -> dict[str, Any]:
        body = check_object(body, {"permission_id", "reply", "message", "node"})
        permission_id = body.get("permission_id")
        if not isinstance(permission_id, str) or not permission_id:
            raise bad("permission_id is required (from a permission_requested event)", "$.permission_id")
        reply = body.get("reply")
        if reply not in ("once", "always", "reject"):
            raise bad(f"reply must be once, always or reject, got {reply!r}", "$.reply")
        message = text(body.get("message"), "$.message", limit=4000)
        run = self.live_run(run_id, await self.load(run_id))
        for node in run.nodes.values():
            if node.driver is not None and permission_id in node.driver.pending:
                await node.driver.reply(permission_id, reply, message)
                return {"run_id": run_id, "node": node.id, "permission_id": permission_id, "reply": reply}
        raise errors.NotFound(f"no pending permission request {errors.quote(permission_id)} in run "
                              f"{errors.quote(run_id)}",
                              param="$.permission_id")


async def _ended(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel what is still going of a run's tasks (one already cancelled is left to finish its clean-up: its
    session's abort and deletion) and wait until every one has ended, however often the run itself is cancelled
    meanwhile: its result is written only once nothing of it runs."""
    pending = {task for task in tasks if not task.done()}
    for task in pending:
        if not task.cancelling():
            task.cancel()
    while pending:
        with contextlib.suppress(asyncio.CancelledError):
            _, pending = await asyncio.wait(pending)
