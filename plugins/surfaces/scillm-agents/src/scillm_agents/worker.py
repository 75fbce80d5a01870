"""One standing worker: the owner of its ``codex app-server`` process, its git worktree, its codex thread and the
turn running on it.

The process starts on demand (the first turn), in the worker's worktree, with a CODEX_HOME under the data dir whose
model provider is this scillm (a run key in ``SCILLM_API_KEY``). Its thread id is kept in the state store, so a
process that died, was stopped for being idle, or belonged to a scillm that restarted is resumed with
``thread/resume``; when codex cannot resume it, the worker starts a new thread and says so (``context: lost``).

Each process's life is a unit of work on ``runtime.events`` (a ``run``, ``run:agents/<worker>/<id>``) and each
turn a ``run`` inside it; the run key names the running turn (else the process's run) as the unit its model calls
are made for, so the dashboard lists both with the worker's event stream and traces nest the calls under the turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from scillm_agent_runners.base import cli_path
from scillm_agent_runners.clis import CODEX_OPT_OUTS, codex_config, codex_env
from scillm_exec import (
    EventLog,
    GitError,
    ManagedProcess,
    Worktree,
    create_worktree,
    remove_worktree,
    reset_worktree,
    worktree_diff,
)

from scillm_agents.config import WorkerConfig
from scillm_agents.rpc import METHOD_NOT_FOUND, RpcClient, RpcError
from scillm_core import Identity, errors
from scillm_core.events import Unit

if TYPE_CHECKING:
    from scillm_agents.service import Agents

__all__ = ["LiveTurn", "Worker"]

RPC_TIMEOUT_S = 60.0        # initialize, thread/start, thread/resume, turn/start, turn/steer
INTERRUPT_GRACE_S = 15.0    # after turn/interrupt, how long the turn may take to end before the process is killed
DIFF_INLINE = 1 << 20       # result documents carry at most this much of the diff; the file has all of it
OUTPUT_PREVIEW = 4096
EVENT_DIFF = 64 << 10       # turn.diff events carry at most this much (the result has all of it)
QUIET = {"account/rateLimits/updated", "remoteControl/status/changed", "thread/started", "thread/status/changed",
         "item/reasoning/summaryTextDelta", "item/reasoning/summaryPartAdded", "item/reasoning/textDelta",
         "serverRequest/resolved", "mcpServer/startupStatus/updated", "thread/tokenUsage/updated",
         "item/commandExecution/outputDelta", "item/fileChange/outputDelta", "thread/settings/updated"}


def unavailable(message: str) -> errors.ScillmError:
    return errors.ScillmError(message, status=503, code="worker_unavailable")


@attrs.define
class LiveTurn:
    """What codex told us about one turn, gathered from its notifications."""

    turn_id: str
    done: asyncio.Event = attrs.field(factory=asyncio.Event)
    status: str | None = None          # codex's: completed | interrupted | failed
    error: str | None = None
    messages: list[str] = attrs.field(factory=list)   # agentMessage texts, in order
    diff: str | None = None            # the last turn/diff/updated
    usage: Any = None
    ended_by: tuple[str, str] | None = None   # (status, why) when scillm ended it: timeout, interrupted, cancelled


def _item_summary(item: Mapping[str, Any]) -> dict[str, Any]:
    kind = item.get("type")
    out: dict[str, Any] = {"id": item.get("id"), "type": kind}
    if kind == "agentMessage":
        out["text"] = item.get("text")
    elif kind == "userMessage":
        out["text"] = "".join(str(c.get("text") or "") for c in item.get("content") or [] if isinstance(c, dict))
    elif kind == "commandExecution":
        output = item.get("aggregatedOutput")
        out |= {"command": item.get("command"), "status": item.get("status"), "exit_code": item.get("exitCode"),
                "output": output[:OUTPUT_PREVIEW] if isinstance(output, str) else None}
    elif kind == "fileChange":
        out |= {"status": item.get("status"), "changes": [
            {"path": c.get("path"), "kind": (c.get("kind") or {}).get("type") if isinstance(c.get("kind"), dict)
             else c.get("kind")} for c in item.get("changes") or [] if isinstance(c, dict)]}
    return out


def _inside(path: Any, root: Path) -> bool:
    if not isinstance(path, str) or not path:
        return False
    return Path(os.path.normpath(root / path)).is_relative_to(root)


class Worker:
    def __init__(self, service: Agents, name: str, cfg: WorkerConfig) -> None:
        self.service, self.name, self.cfg = service, name, cfg
        self.dir = service.runtime.config.data_dir / "agents" / name
        self.events = EventLog(self.dir / "events.jsonl", redact=service.secrets)
        self.process: ManagedProcess | None = None
        self.rpc: RpcClient | None = None
        self.worktree: Worktree | None = None
        self.thread_id: str | None = None
        self.key: str | None = None
        self.turns: dict[str, LiveTurn] = {}
        self.current: LiveTurn | None = None
        self.busy = asyncio.Lock()          # held from a turn request until its result is stored
        self.last_active = time.monotonic()
        self.stopped: dict[str, Any] | None = None   # why the last process ended
        #: every task the worker starts for its process (its exit and idle watchers, its answers to codex): cancelled
        #: when the process ends, and awaited when the worker stops (:meth:`stop_locked`, also at shutdown)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.task: asyncio.Task[dict[str, Any]] | None = None   # stores the running turn's result
        self.run: Unit | None = None          # the live process, as a unit of work (events, traces)
        self.turn_run: Unit | None = None     # the running turn, a unit inside it
        #: the key (its owner id) whose turn the worker is running: what it emits meanwhile is that key's
        self.holder: str | None = None
        #: the seq of each key's last event (what ``status`` tells a key to resume its event stream after)
        self.seqs: dict[str | None, int] = {}

    # -- state -----------------------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.alive

    def emit(self, type: str, **fields: Any) -> None:
        if self.events.closed:  # cleanup ended the followers of the last log; the numbering goes on
            self.events = EventLog(self.events.path, redact=[s.decode() for s in self.events.secrets])
        fields.setdefault("identity", self.holder)  # who may read it: that key (and the master); None: the master
        event = self.events.append(type, worker=self.name, **fields)
        self.seqs[fields["identity"]] = event["seq"]
        unit = self.turn_run or self.run
        if unit is not None:
            unit.event({"seq": event["seq"], "type": type})  # what observers use; the record stays in the log

    def unit(self, name: str, key: str, trace: Mapping[str, str] | None, parent: str | None,
             key_owner: str | None = None, **attrs: Any) -> Unit:
        """A unit of work of this worker (its process's run, or a turn in it, owned by ``key_owner``, the key whose
        turn it is): listed with the worker's event stream from now on."""
        unit_id = f"run:agents/{self.name}/{key}"
        return Unit(self.service.runtime.events, "run", unit_id, name=name, parent=parent, trace=trace,
                    owner=key_owner, attrs={
            "run_id": unit_id.removeprefix("run:"), "worker": self.name, "model": self.cfg.model,
            "profile": "standing agent", "sandbox": self.cfg.sandbox, "surface": "agents",
            "events_url": f"/v1/scillm/agents/{self.name}/events/stream?after={self.events.seq}", **attrs})

    def process_status(self) -> dict[str, Any]:
        if self.alive:
            assert self.process is not None
            return {"status": "running", "pid": self.process.pid}
        return {"status": "stopped", **(self.stopped or {"reason": "not started since scillm started"})}

    # -- start -----------------------------------------------------------------------------------------------------

    async def ensure_running(self, base_url: str, trace: Mapping[str, str] | None = None) -> None:
        """Start the app-server (and resume or start the thread) unless it runs; ``service.lifecycle`` held.
        ``trace``: the trace context of the request that needs it (its run continues that trace)."""
        if self.alive and self.thread_id:
            return
        async with self.service.lifecycle:
            if self.alive and self.thread_id:
                return
            await self.service.make_room(self)
            await self._start(base_url, trace)

    async def _start(self, base_url: str, trace: Mapping[str, str] | None = None) -> None:
        cli = cli_path(self.service.runtime, "codex")
        if cli is None:
            raise unavailable("the codex CLI is not installed (scripts/install-agent-clis; see `scillm doctor`)")
        run = self.run = self.unit(f"agent {self.name}", uuid.uuid4().hex[:12], trace, None)
        try:
            await self._launch(cli, base_url)
        except BaseException as exc:
            run.end("failed", getattr(exc, "message", None) or str(exc) or type(exc).__name__)
            raise

    async def _launch(self, cli: str, base_url: str) -> None:
        assert self.run is not None
        doc = await self.service.worker_doc(self.name)
        self.worktree = await self._worktree(doc)
        home = self.dir / "home"
        codex_home = home / ".codex"
        codex_home.mkdir(parents=True, exist_ok=True)
        home.chmod(0o700)
        (codex_home / "config.toml").write_text(codex_config(self.cfg.model, base_url, self.cfg.sandbox))
        self.key = self.service.keys.mint(f"agent-{self.name}", "agents", unit=self.run.unit)
        self.events.secrets.append(self.key.encode())
        rpc = RpcClient(self._write, on_notification=self._on_notification, on_request=self._on_request,
                        spawn=self.spawn)
        process = ManagedProcess(
            f"codex app-server ({self.name})", [cli, "app-server", *CODEX_OPT_OUTS],
            env=codex_env(cli, home, codex_home, self.key), cwd=self.worktree.workdir,
            log_path=self.dir / "app-server.log", on_stdout=rpc.feed, stdin=True,
            redact=[*self.service.secrets, self.key], kill_grace_s=self.service.kill_grace_s)
        self.process, self.rpc, self.thread_id = process, rpc, None
        try:
            await process.start()
        except OSError as exc:
            self.process = None
            self.service.keys.revoke(self.key)
            raise unavailable(f"worker {self.name!r}: could not start codex app-server: {exc}") from None
        self.spawn(self._watch(process, rpc))
        try:
            await rpc.request("initialize", {"clientInfo": {"name": "scillm", "title": "scillm standing agents",
                                                            "version": "1"}}, timeout=RPC_TIMEOUT_S)
            await rpc.notify("initialized")
            await self._open_thread(doc, rpc)
        except (RpcError, ConnectionError, TimeoutError) as exc:
            self.run.end("failed", f"codex app-server failed to start: {_reason(exc)}")
            await self.stop_locked(f"codex app-server failed to start: {_reason(exc)}")
            raise unavailable(f"worker {self.name!r}: codex app-server failed to start: {_reason(exc)}") from None
        self.stopped = None
        self.last_active = time.monotonic()
        self.spawn(self._idle_watch(process))

    async def _worktree(self, doc: Mapping[str, Any]) -> Worktree:
        stored = _stored_worktree(doc)
        if stored is not None and stored.path.is_dir():
            return stored
        repository = Path(self.cfg.repository).expanduser()
        if not repository.is_absolute() or not repository.is_dir():
            raise unavailable(f"worker {self.name!r}: repository {self.cfg.repository!r} is not an existing absolute "
                              f"directory (agents.{self.name}.repository)")
        try:
            worktree = await create_worktree(repository, self.dir / "worktree", ref=self.cfg.base_ref)
        except GitError as exc:
            raise unavailable(f"worker {self.name!r}: {exc.message} (agents.{self.name})") from None
        await self.service.update_worker(self.name, worktree={
            "path": str(worktree.path), "workdir": str(worktree.workdir), "repo": str(worktree.repo),
            "base": worktree.base}, worktree_owner=None)
        self.emit("worktree.created", path=str(worktree.path), base=worktree.base)
        return worktree

    def _thread_params(self) -> dict[str, Any]:
        assert self.worktree is not None
        params: dict[str, Any] = {"cwd": str(self.worktree.workdir), "model": self.cfg.model,
                                  "approvalPolicy": "never", "sandbox": self.cfg.sandbox}
        if self.cfg.instructions:
            params["developerInstructions"] = self.cfg.instructions
        return params

    async def _open_thread(self, doc: Mapping[str, Any], rpc: RpcClient) -> None:
        previous = doc.get("thread_id")
        if isinstance(previous, str) and previous:
            try:
                await rpc.request("thread/resume", {"threadId": previous, "excludeTurns": True,
                                                    **self._thread_params()}, timeout=RPC_TIMEOUT_S)
            except RpcError as exc:
                result = await rpc.request("thread/start", self._thread_params(), timeout=RPC_TIMEOUT_S)
                self.thread_id = result["thread"]["id"]
                note = (f"context lost: codex could not resume thread {previous} ({exc.message}); thread "
                        f"{self.thread_id} started without the earlier conversation")
                await self.service.update_worker(self.name, thread_id=self.thread_id, context="lost", context_note=note,
                                                 lost_thread_id=previous, context_at=time.time(),
                                                 thread_owner=self.holder)
                self.emit("worker.context_lost", thread_id=self.thread_id, previous_thread_id=previous,
                          reason=exc.message)
                return
            self.thread_id = previous
            await self.service.update_worker(self.name, context="resumed", context_at=time.time(),
                                             context_note=f"thread {previous} resumed by a new codex app-server")
            self.emit("worker.resumed", thread_id=previous, pid=self.process.pid if self.process else None)
            return
        result = await rpc.request("thread/start", self._thread_params(), timeout=RPC_TIMEOUT_S)
        self.thread_id = result["thread"]["id"]
        await self.service.update_worker(self.name, thread_id=self.thread_id, context="new", context_at=time.time(),
                                         context_note=f"thread {self.thread_id} started", lost_thread_id=None,
                                         thread_owner=self.holder)
        self.emit("worker.started", thread_id=self.thread_id, pid=self.process.pid if self.process else None)

    async def own_thread(self, owner: str) -> None:
        """A virtual key's turn continues only a thread of its own: when another key's turns (or the master's) wrote
        the current one, it gets a new thread, so no key reads another's conversation through the model (the
        master key's turns continue any thread)."""
        doc = await self.service.worker_doc(self.name)
        if doc.get("thread_owner") == owner and doc.get("thread_id") == self.thread_id:
            return
        assert self.rpc is not None
        previous = self.thread_id
        try:
            result = await self.rpc.request("thread/start", self._thread_params(), timeout=RPC_TIMEOUT_S)
        except (RpcError, ConnectionError, TimeoutError) as exc:
            raise unavailable(f"worker {self.name!r}: codex could not start a thread: {_reason(exc)}") from None
        self.thread_id = result["thread"]["id"]
        await self.service.update_worker(self.name, thread_id=self.thread_id, context="new", context_at=time.time(),
                                         context_note=f"thread {self.thread_id} started: thread {previous} was "
                                                      "another key's", lost_thread_id=None, thread_owner=owner)
        self.emit("worker.thread_started", thread_id=self.thread_id, reason="the previous thread was another key's")

    async def own_worktree(self, identity: Identity) -> None:
        """A turn works only on what its own key's turns left: when the worktree holds another key's work (or the
        master's), it is reset to its base commit first (changes, untracked and ignored files all go), so no key
        reads another's files. The master key's turns continue any worktree."""
        doc = await self.service.worker_doc(self.name)
        holder = doc.get("worktree_owner")
        if holder == identity.owner or (identity.master and holder is not None):
            return
        if holder is not None:
            try:
                await self.reset()
            except errors.ScillmError as exc:
                raise unavailable(f"worker {self.name!r}: could not reset its worktree: {exc.message}") from None
            self.emit("worktree.reset", reason="the worktree held another key's work; it is back at its base commit",
                      base=self.worktree.base if self.worktree else None)
        await self.service.update_worker(self.name, worktree_owner=identity.owner)

    async def _write(self, data: bytes) -> None:
        if self.process is None:
            raise ConnectionResetError("the codex app-server is not running")
        await self.process.write(data)

    # -- stop ------------------------------------------------------------------------------------------------------

    async def stop(self, reason: str) -> None:
        async with self.service.lifecycle:
            await self.stop_locked(reason)

    async def stop_locked(self, reason: str) -> None:
        """Stop the process (if it runs), then end every task the worker started: none outlives it."""
        process = self.process
        if process is not None:
            self.stopped = {"reason": reason, "at": time.time()}
            await process.stop()
            self._gone(process, self.rpc, reason)
        await self._end_tasks()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as one of the worker's :attr:`tasks`."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _cancel_tasks(self) -> list[asyncio.Task[Any]]:
        current = asyncio.current_task()
        tasks = [task for task in self.tasks if task is not current]
        for task in tasks:
            task.cancel()
        return tasks

    async def _end_tasks(self) -> None:
        """Cancel the worker's tasks (but the caller's own) and wait until they are gone."""
        await asyncio.gather(*self._cancel_tasks(), return_exceptions=True)

    async def _watch(self, process: ManagedProcess, rpc: RpcClient) -> None:
        await process.exited.wait()
        if self.process is process and self.stopped is None:  # it ended on its own: nothing else is stopping it
            self.stopped = {"reason": f"codex app-server exited with code {process.returncode}", "at": time.time(),
                            "exit_code": process.returncode}
            self._gone(process, rpc, self.stopped["reason"])
            self._cancel_tasks()  # its idle watcher and answers; whoever stops the worker next awaits them
            return
        self._gone(process, rpc, (self.stopped or {}).get("reason", "exited"))

    def _gone(self, process: ManagedProcess, rpc: RpcClient | None, reason: str) -> None:
        """The process ended (stopped or died): fail what waited on it, revoke its key. Idempotent."""
        if self.process is not process:
            return
        self.process = None
        if rpc is not None:
            rpc.close(f"codex app-server stopped: {reason}")
        for live in self.turns.values():
            if not live.done.is_set():
                live.status, live.error = "failed", f"the codex app-server ended during the turn: {reason}"
                live.done.set()
        self.service.keys.revoke(self.key)
        self.key = None
        self.emit("worker.stopped", reason=reason, exit_code=process.returncode, thread_id=self.thread_id,
                  context="kept: the next turn resumes this thread" if self.thread_id else None)
        if self.run is not None:
            died = "exit_code" in (self.stopped or {})  # it ended on its own; else scillm stopped it
            self.run.end("failed" if died else "completed", reason if died else None, exit_code=process.returncode,
                         stopped=reason)
            self.run = None

    async def _idle_watch(self, process: ManagedProcess) -> None:
        idle_s = self.cfg.idle_timeout_s
        while self.process is process:
            left = self.last_active + idle_s - time.monotonic()
            if self.busy.locked() or left > 0:
                await asyncio.sleep(left if left > 0 else idle_s)
                continue
            async with self.service.lifecycle:
                if self.process is process and not self.busy.locked():
                    await self.stop_locked(f"idle for idle_timeout_s={idle_s:g}")
            return

    # -- turns -----------------------------------------------------------------------------------------------------

    def _live(self, turn_id: str) -> LiveTurn:
        live = self.turns.get(turn_id)
        if live is None:
            live = self.turns[turn_id] = LiveTurn(turn_id)
        return live

    async def start_turn(self, text: str) -> LiveTurn:
        """``turn/start`` on the worker's thread (``busy`` held by the caller)."""
        assert self.rpc is not None and self.thread_id is not None
        try:
            result = await self.rpc.request("turn/start", {"threadId": self.thread_id,
                                                           "input": [{"type": "text", "text": text}]},
                                            timeout=RPC_TIMEOUT_S)
        except RpcError as exc:
            raise errors.Conflict(f"codex refused the turn: {exc.message}") from None
        except (ConnectionError, TimeoutError) as exc:
            raise unavailable(f"worker {self.name!r}: turn/start failed: {_reason(exc)}") from None
        live = self._live(result["turn"]["id"])
        self.turns = {live.turn_id: live}  # what earlier turns left (late notifications) goes
        self.current = live
        self.last_active = time.monotonic()
        return live

    async def wait_turn(self, live: LiveTurn, timeout_s: float) -> None:
        """Until the turn ends; past ``timeout_s`` it is interrupted (then the process killed) as ``timeout``."""
        try:
            await asyncio.wait_for(live.done.wait(), timeout_s)
        except TimeoutError:
            await self.end_turn(live, "timeout", f"turn exceeded turn timeout {timeout_s:g}s")

    async def end_turn(self, live: LiveTurn, status: str, why: str) -> None:
        """End a running turn on scillm's initiative: ``turn/interrupt``, and if codex does not end it within the
        grace, kill the process (the thread resumes next time)."""
        if live.done.is_set():
            return
        live.ended_by = live.ended_by or (status, why)
        rpc, thread_id = self.rpc, self.thread_id
        if rpc is not None and thread_id is not None:
            with contextlib.suppress(RpcError, ConnectionError, TimeoutError):
                await rpc.request("turn/interrupt", {"threadId": thread_id, "turnId": live.turn_id},
                                  timeout=INTERRUPT_GRACE_S)
        try:
            await asyncio.wait_for(live.done.wait(), INTERRUPT_GRACE_S)
        except TimeoutError:
            await self.stop(f"{why}; codex did not end the turn after turn/interrupt")

    async def steer(self, live: LiveTurn, text: str) -> str:
        assert self.rpc is not None and self.thread_id is not None
        try:
            result = await self.rpc.request("turn/steer", {"threadId": self.thread_id, "expectedTurnId": live.turn_id,
                                                           "input": [{"type": "text", "text": text}]},
                                            timeout=RPC_TIMEOUT_S)
        except RpcError as exc:
            raise errors.Conflict(f"codex refused the steer: {exc.message}") from None
        except (ConnectionError, TimeoutError) as exc:
            raise errors.Conflict(f"the turn ended before the steer reached codex: {_reason(exc)}") from None
        return str((result or {}).get("turnId") or live.turn_id)

    async def evidence(self) -> tuple[str, list[str]]:
        """The worktree's diff against its base commit (every change since the worker started) and its paths."""
        if self.worktree is None or not self.worktree.path.is_dir():
            return "", []
        return await worktree_diff(self.worktree)

    async def reset(self) -> None:
        if self.worktree is not None:
            await reset_worktree(self.worktree)

    async def remove_worktree(self) -> bool:
        worktree = self.worktree or _stored_worktree(await self.service.worker_doc(self.name))
        if worktree is None:
            return False
        await remove_worktree(worktree)
        self.worktree = None
        return True

    # -- what codex says -------------------------------------------------------------------------------------------

    def _on_notification(self, method: str, params: Any) -> None:
        params = params if isinstance(params, Mapping) else {}
        turn = params.get("turn") if isinstance(params.get("turn"), Mapping) else {}
        turn_id = params.get("turnId") or turn.get("id")
        live = self._live(turn_id) if isinstance(turn_id, str) and turn_id else None
        where = {"turn_id": turn_id} if live is not None else {}
        if method == "turn/started":
            self.emit("turn.started", **where)
        elif method in ("item/started", "item/completed") and isinstance(params.get("item"), Mapping):
            item = params["item"]
            if method == "item/completed" and item.get("type") == "agentMessage" and live is not None:
                live.messages.append(str(item.get("text") or ""))
            self.emit(method.replace("/", "."), item=_item_summary(item), **where)
        elif method == "item/agentMessage/delta":
            self.emit("message.delta", item_id=params.get("itemId"), delta=params.get("delta"), **where)
        elif method == "turn/diff/updated":
            diff = params.get("diff") if isinstance(params.get("diff"), str) else ""
            if live is not None:
                live.diff = diff
            self.emit("turn.diff", diff=diff[:EVENT_DIFF], truncated=len(diff) > EVENT_DIFF, **where)
        elif method == "thread/tokenUsage/updated" and live is not None:
            live.usage = (params.get("tokenUsage") or {}).get("total")
        elif method == "turn/completed" and live is not None:
            live.status = str(turn.get("status") or "completed")
            error = turn.get("error")
            live.error = str(error.get("message")) if isinstance(error, Mapping) and error.get("message") else None
            if not live.messages:
                live.messages = [str(i.get("text") or "") for i in turn.get("items") or []
                                 if isinstance(i, Mapping) and i.get("type") == "agentMessage"]
            live.done.set()
        elif method == "error":
            error = params.get("error") if isinstance(params.get("error"), Mapping) else {}
            self.emit("codex.error", message=error.get("message"), will_retry=params.get("willRetry"), **where)
        elif method in ("configWarning", "warning", "deprecationNotice"):
            self.emit("codex.warning", method=method, message=params.get("summary") or params.get("message"))
        elif method not in QUIET:
            self.emit("codex.notification", method=method, **where)

    async def _on_request(self, method: str, params: Mapping[str, Any]) -> Any:
        """Answer what codex asks: approvals by the worker's sandbox, refusals for what nobody here can answer."""
        writable = self.cfg.sandbox == "workspace-write"
        root = self.worktree.path if self.worktree is not None else None

        def within(path: Any) -> bool:
            return path is None or (root is not None and _inside(path, root))

        if method in ("item/fileChange/requestApproval", "item/commandExecution/requestApproval"):
            ok = writable and within(params.get("grantRoot") if "fileChange" in method else params.get("cwd"))
            if method == "item/commandExecution/requestApproval" and params.get("networkApprovalContext"):
                ok = False  # network access is never granted
            decision: Any = "accept" if ok else "decline"
        elif method in ("applyPatchApproval", "execCommandApproval"):
            ok = writable and within(params.get("grantRoot") if method == "applyPatchApproval" else params.get("cwd"))
            why = f"scillm: not allowed for a {self.cfg.sandbox} standing worker (outside its worktree or sandbox)"
            decision = "approved" if ok else {"denied": {"rejection": why}}
        elif method == "item/permissions/requestApproval":
            self.emit("approval", method=method, decision="none granted", turn_id=params.get("turnId"))
            return {"permissions": {}, "scope": "turn"}
        elif method == "mcpServer/elicitation/request":
            self.emit("approval", method=method, decision="decline", turn_id=params.get("turnId"))
            return {"action": "decline", "content": None}
        elif method == "item/tool/call":
            raise RpcError(METHOD_NOT_FOUND, "scillm registers no dynamic tools for standing workers")
        elif method == "item/tool/requestUserInput":
            raise RpcError(METHOD_NOT_FOUND, "no user is attached to a standing worker; its lease holder steers it "
                                             "with POST /v1/scillm/agents/{worker}/steer")
        elif method == "account/chatgptAuthTokens/refresh":
            raise RpcError(METHOD_NOT_FOUND, "this worker signs in to scillm with a run key, not a ChatGPT login; "
                                             "scillm refreshes the Codex login itself")
        else:
            raise RpcError(METHOD_NOT_FOUND, f"scillm does not handle {method}")
        self.emit("approval", method=method, decision=decision, turn_id=params.get("turnId"))
        return {"decision": decision}


def _stored_worktree(doc: Mapping[str, Any]) -> Worktree | None:
    stored = doc.get("worktree")
    if not isinstance(stored, dict):
        return None
    return Worktree(path=Path(stored["path"]), workdir=Path(stored["workdir"]), repo=Path(stored["repo"]),
                    base=stored["base"])


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RpcError):
        return exc.message
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__
