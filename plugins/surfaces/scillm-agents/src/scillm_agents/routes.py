"""HTTP routes under ``/v1/scillm/agents``: registry, status, handoffs, leases, turn, steer, interrupt, events
stream, result, cleanup. Mutating routes need ``X-Caller-Skill``; bodies are strict (unknown fields are a 400)."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from scillm_exec import ID, check_fields, exec_config, resume_after, sse_tail
from scillm_exec.routes import base_url_of
from starlette.requests import Request
from starlette.responses import Response

from scillm_agents.config import settings
from scillm_agents.service import Agents, agents_of
from scillm_agents.worker import Worker
from scillm_core import Identity, errors, identity_of, max_cost_of
from scillm_core.events import trace_headers
from scillm_core.streaming import EventStreamResponse
from scillm_core.web import caller_of, json_response, ops_response, read_json, runtime_of

__all__ = ["routes"]

PREFIX = "/v1/scillm/agents"
BODY_LIMIT = 1 << 20
TEXT_LIMIT = 256 << 10


def _bad(message: str, param: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(f"{message} @ {param}", param=param)


def _identity(request: Request) -> str:
    """Who authenticated: the key's owner (``master`` for the master key)."""
    return identity_of(request).owner


async def _held(agents: Agents, request: Request, worker: Worker, lease_id: Any, action: str) -> dict[str, Any]:
    """The live lease ``lease_id`` (409 otherwise), and 404 when another key took it: a key controls only the
    turns of its own leases (the master key controls every one)."""
    return await agents.holder(worker.name, lease_id, action, identity_of(request))


def _who(request: Request, caller: str | None) -> dict[str, Any]:
    return {"caller": caller, "identity": _identity(request)}


def _for_turn(worker: Worker, request: Request, caller: str | None) -> dict[str, Any]:
    """An event about the running turn: the turn's key's (``identity``), whoever acted on it (``by``)."""
    return {"caller": caller, "by": _identity(request), "identity": worker.holder}


async def _body(request: Request, allowed: set[str]) -> dict[str, Any]:
    body = await read_json(request, limit_bytes=BODY_LIMIT)
    if not isinstance(body, dict):
        raise _bad(f"expected a JSON object, got {type(body).__name__}", "$")
    check_fields(body, allowed)
    return body


def _id(body: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise _bad(f"{key} is required", f"$.{key}")
        return None
    if not isinstance(value, str) or not ID.match(value):
        raise _bad(f"{key} must be 1-128 letters, digits or ._:@- (starting with a letter or digit)", f"$.{key}")
    return value


OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")  # a key's owner id (``key_...``, ``master``)


def _handoff(value: Any, param: str, viewer: Identity) -> str | None:
    """The name of a handoff to use: ``<id>`` (the caller's own) or ``<owner>/<id>`` (as the master key's
    ``status`` lists another key's), with the caller's own owner dropped. Whether the caller may open it is the
    service's (another key's is as if absent)."""
    if value is None:
        return None
    owner, slash, handoff_id = value.rpartition("/") if isinstance(value, str) else ("", "", None)
    if not isinstance(handoff_id, str) or not ID.match(handoff_id) or (slash and not OWNER.match(owner)):
        raise _bad("handoff_id must be an id (1-128 letters, digits or ._:@-), or <owner>/<id> as status lists "
                   "another key's to the master key", param)
    return handoff_id if owner in ("", viewer.owner) else value


def _text(body: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _bad(f"{key} must be a non-empty string", f"$.{key}")
    if len(value) > TEXT_LIMIT:
        raise _bad(f"{key} is {len(value)} characters; the limit is {TEXT_LIMIT}", f"$.{key}")
    return value


def _flag(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise _bad(f"{key} must be true or false", f"$.{key}")
    return value


def _seconds(body: Mapping[str, Any], key: str, default: float, limit: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise _bad(f"{key} must be a positive number of seconds", f"$.{key}")
    if value > limit:
        raise _bad(f"{key} is {value}; the limit is {limit:g}", f"$.{key}")
    return float(value)


def _worker(request: Request) -> tuple[Agents, Worker]:
    """The worker named in the path, if the caller may use it (404 otherwise, listing the ones it may)."""
    agents = agents_of(runtime_of(request))
    return agents, agents.worker(request.path_params["worker"], identity_of(request))


# -- reading --------------------------------------------------------------------------------------------------------

class View:
    """What ``viewer`` may know about a worker's use right now. The master key sees everything; a virtual key sees
    its own lease and turn, and of another key's only that the worker is ``taken`` (and until when)."""

    def __init__(self, worker: Worker, viewer: Identity, lease: Mapping[str, Any] | None) -> None:
        self.lease = lease
        self.own_lease = lease is not None and viewer.can_see(lease.get("identity"))
        self.own_turn = worker.busy.locked() and viewer.can_see(worker.holder)
        if self.own_turn or (viewer.master and worker.busy.locked()):
            self.state = "running"
        elif worker.busy.locked() or (lease is not None and not self.own_lease):
            self.state = "taken"   # another key's turn runs (its lease may have expired meanwhile), or its lease
        elif lease is not None:
            self.state = "leased"
        else:
            self.state = "idle"
        self.mine = viewer.master or self.state in ("leased", "running")   # the caller is using the worker now

    def public_lease(self) -> dict[str, Any] | None:
        if self.lease is None:
            return None
        if not self.own_lease:
            return {"held_by_another_key": True, "expires_at": self.lease.get("expires_at")}
        keys = ("lease_id", "owner", "handoff_id", "acquired_at", "renewed_at", "expires_at", "ttl_s", "caller",
                "identity")
        return {k: self.lease.get(k) for k in keys}


async def registry(request: Request) -> Response:
    """The workers the caller may use (a key restricted to some models: those whose model it may call)."""
    agents, identity = agents_of(runtime_of(request)), identity_of(request)
    rows = []
    for w in agents.visible(identity):
        view = View(w, identity, await agents.lease(w.name))
        rows.append({"name": w.name, "description": w.cfg.description, "model": w.cfg.model, "sandbox": w.cfg.sandbox,
                     "repository": w.cfg.repository, "base_ref": w.cfg.base_ref, "state": view.state,
                     "process": w.process_status()["status"] if view.mine else None, "running_turn": view.own_turn
                     or (identity.master and w.busy.locked())})
    return ops_response({"status": "configured", "workers": rows})


async def status(request: Request) -> Response:
    """The worker's state; its lease, turns, thread, worktree and handoffs as far as they are the calling key's
    (another key's lease or turn shows only that the worker is ``taken`` and until when; the master key sees
    everything)."""
    agents, worker = _worker(request)
    identity = identity_of(request)
    view = View(worker, identity, await agents.lease(worker.name))
    doc = await agents.worker_doc(worker.name)
    last = await agents.last_turn(worker.name, identity)
    thread_id = doc.get("thread_id")
    note = doc.get("context_note")
    if thread_id and not worker.alive and doc.get("context") != "lost":
        note = f"thread {thread_id} is kept; the next turn resumes it in a new codex app-server"
    running = worker.current if view.own_turn or (identity.master and worker.busy.locked()) else None
    own_thread = identity.can_see(doc.get("thread_owner"))
    own_worktree = identity.master or doc.get("worktree_owner") == identity.owner
    return ops_response({
        "worker": worker.name, "state": view.state,
        "description": worker.cfg.description, "model": worker.cfg.model, "sandbox": worker.cfg.sandbox,
        "repository": worker.cfg.repository, "base_ref": worker.cfg.base_ref,
        "turn_timeout_s": worker.cfg.turn_timeout_s, "idle_timeout_s": worker.cfg.idle_timeout_s,
        "process": worker.process_status() if view.mine else None,
        "thread": {"id": thread_id, "context": doc.get("context"), "note": note,
                   "lost_thread_id": doc.get("lost_thread_id")} if own_thread else
                  {"id": None, "note": "your next turn on this worker starts a thread of its own"},
        "lease": view.public_lease(),
        "turn": {"turn_id": running.turn_id, "status": "running"} if running is not None else None,
        "last_turn": {k: last.get(k) for k in ("turn_id", "handoff_id", "status", "error", "started_at",
                                               "completed_at", "cost_usd", "max_cost_usd")} if last else None,
        "handoffs": await agents.handoff_ids(worker.name, identity),
        "worktree": doc.get("worktree") if own_worktree else None,
        "events_seq": worker.events.seq if identity.master else worker.seqs.get(identity.owner, 0),
    })


async def result(request: Request) -> Response:
    agents, worker = _worker(request)
    identity = identity_of(request)
    handoff_id = _handoff(request.query_params.get("handoff_id"), "query.handoff_id", identity)
    return json_response(await agents.result(worker.name, handoff_id, identity))


async def events(request: Request) -> Response:
    agents, worker = _worker(request)
    identity = identity_of(request)
    if not identity.master:  # a key tails a worker whose lease it holds or where it ran a turn
        lease = await agents.lease(worker.name) or {}
        if lease.get("identity") != identity.owner and await agents.last_turn(worker.name, identity) is None:
            raise errors.NotFound(f"no events of worker {errors.quote(worker.name)} for this key")
    after = resume_after(request)  # the last event seq the client has (after=, or an EventSource's Last-Event-ID)
    runtime = runtime_of(request)
    heartbeat = exec_config(runtime).heartbeat_s or runtime.config.server.heartbeat_s
    end = {"type": "end", "worker": worker.name}
    keep = None if identity.master else lambda event: event.get("identity") == identity.owner  # its own work only
    return EventStreamResponse(sse_tail(worker.events, after, heartbeat, end, keep),
                               headers={"cache-control": "no-cache"})


# -- handoffs and leases --------------------------------------------------------------------------------------------

HANDOFF_KEYS = {"handoff_id", "phase_id", "goal", "context", "memory_context", "validation_expectations", "metadata"}


def _context(body: Mapping[str, Any]) -> Any:
    """``context`` is text, or a list of ``{key, summary}`` notes (``memory_context``, as the old clients send)."""
    if "context" in body and "memory_context" in body:
        raise _bad("give context or memory_context, not both", "$.memory_context")
    key = "memory_context" if "memory_context" in body else "context"
    value = body.get(key)
    if value is None or isinstance(value, str):
        if isinstance(value, str) and len(value) > TEXT_LIMIT:
            raise _bad(f"{key} is longer than {TEXT_LIMIT} characters", f"$.{key}")
        return value
    if not isinstance(value, list):
        raise _bad("expected a string or an array of {key, summary} objects", f"$.{key}")
    notes = []
    for i, note in enumerate(value):
        if not isinstance(note, dict) or not isinstance(note.get("summary"), str) or \
                not isinstance(note.get("key", ""), str):
            raise _bad("expected {key: string, summary: string}", f"$.{key}[{i}]")
        notes.append({"key": note.get("key", ""), "summary": note["summary"]})
    return notes


async def handoffs(request: Request) -> Response:
    caller = caller_of(request, required=True)
    agents, worker = _worker(request)
    body = await _body(request, HANDOFF_KEYS)
    goal = _text(body, "goal", required=True)
    expectations = body.get("validation_expectations", [])
    if not isinstance(expectations, list) or not all(isinstance(e, str) for e in expectations):
        raise _bad("validation_expectations must be an array of strings", "$.validation_expectations")
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict):
        raise _bad("metadata must be an object", "$.metadata")
    doc = {"worker": worker.name, "handoff_id": _id(body, "handoff_id") or f"handoff-{uuid.uuid4().hex[:16]}",
           "phase_id": _id(body, "phase_id"), "goal": goal, "context": _context(body),
           "validation_expectations": expectations, "metadata": metadata, "created_at": time.time(),
           **_who(request, caller)}
    stored, created = await agents.add_handoff(worker.name, doc)
    return json_response(stored, 201 if created else 200)


async def delete_handoff(request: Request) -> Response:
    caller = caller_of(request, required=True)
    agents, worker = _worker(request)
    identity, named = identity_of(request), request.path_params["handoff_id"]
    try:
        handoff_id = _handoff(named, "path.handoff_id", identity)
    except errors.InvalidRequest:
        handoff_id = None  # no such name: none to delete
    if handoff_id is None or not await agents.delete_handoff(worker.name, handoff_id, identity):
        raise errors.NotFound(f"worker {errors.quote(worker.name)} has no handoff {errors.quote(named)}")
    worker.emit("handoff.deleted", handoff_id=handoff_id, **_who(request, caller))
    return json_response({"worker": worker.name, "handoff_id": handoff_id, "deleted": True})


async def leases(request: Request) -> Response:
    caller = caller_of(request, required=True)
    agents, worker = _worker(request)
    body = await _body(request, {"action", "lease_id", "owner", "handoff_id", "ttl_s"})
    action = body.get("action", "acquire")
    if action not in ("acquire", "renew", "release"):
        raise _bad(f"action must be acquire, renew or release, got {action!r}", "$.action")
    cfg = settings(runtime_of(request))
    ttl_s = _seconds(body, "ttl_s", cfg.lease_ttl_s, cfg.max_lease_ttl_s)
    owner = _id(body, "owner", required=action == "acquire")
    handoff_id = _handoff(body.get("handoff_id"), "$.handoff_id", identity_of(request))
    if action == "acquire":
        assert owner is not None
        if handoff_id is not None and await agents.handoff(worker.name, handoff_id, identity_of(request)) is None:
            raise _bad(f"worker {errors.quote(worker.name)} has no handoff {errors.quote(handoff_id)} "
                       "(POST it to .../handoffs first)", "$.handoff_id")
        lease_id = _id(body, "lease_id") or (f"{handoff_id.rpartition('/')[2]}-lease" if handoff_id else
                                             f"lease-{uuid.uuid4().hex[:16]}")
        return json_response(await agents.acquire(worker.name, owner=owner, lease_id=lease_id, handoff_id=handoff_id,
                                                  ttl_s=ttl_s, who=_who(request, caller),
                                                  viewer=identity_of(request)))
    lease_id = _id(body, "lease_id", required=True)
    assert lease_id is not None
    if action == "renew":
        return json_response(await agents.renew(worker.name, lease_id=lease_id, owner=owner, ttl_s=ttl_s,
                                                viewer=identity_of(request)))
    return json_response(await agents.release(worker.name, lease_id=lease_id, viewer=identity_of(request)))


# -- turns ----------------------------------------------------------------------------------------------------------

def handoff_prompt(handoff: Mapping[str, Any]) -> str:
    """The first message of a handoff's work when the turn brings no ``input`` of its own."""
    parts = [f"Goal: {handoff['goal']}"]
    context = handoff.get("context")
    if isinstance(context, str) and context.strip():
        parts.append(f"Context:\n{context}")
    elif isinstance(context, list) and context:
        parts.append("Context:\n" + "\n".join(f"- {n['key']}: {n['summary']}" if n.get("key") else f"- {n['summary']}"
                                              for n in context))
    if handoff.get("validation_expectations"):
        parts.append("Validation expectations:\n" + "\n".join(f"- {e}" for e in handoff["validation_expectations"]))
    return "\n\n".join(parts)


async def turn(request: Request) -> Response:
    caller = caller_of(request, required=True)
    agents, worker = _worker(request)
    body = await _body(request, {"lease_id", "handoff_id", "input", "wait", "timeout_s", "max_cost_usd"})
    lease_id = _id(body, "lease_id", required=True)
    handoff_id = _handoff(body.get("handoff_id"), "$.handoff_id", identity_of(request))
    text = _text(body, "input")
    wait = _flag(body, "wait", False)
    timeout_s = _seconds(body, "timeout_s", worker.cfg.turn_timeout_s, worker.cfg.turn_timeout_s)
    max_cost = max_cost_of(body.get("max_cost_usd"), "$.max_cost_usd")
    lease = await _held(agents, request, worker, lease_id, "run a turn")
    handoff_id = handoff_id or lease.get("handoff_id") or None
    handoff = await agents.handoff(worker.name, handoff_id, identity_of(request)) if handoff_id else None
    if handoff_id and handoff is None:
        raise _bad(f"worker {errors.quote(worker.name)} has no handoff {errors.quote(handoff_id)} "
                   "(POST it to .../handoffs first)",
                   "$.handoff_id")
    if text is None:
        if handoff is None:
            raise _bad("give input, or a handoff_id (here or on the lease) whose goal becomes the prompt", "$.input")
        text = handoff_prompt(handoff)
    record = {"handoff_id": handoff_id, "lease_id": lease_id, "owner": lease.get("owner"), "input": text,
              "max_cost_usd": max_cost, **_who(request, caller)}
    doc, task = await agents.begin_turn(worker, record, text, timeout_s, base_url_of(request),
                                        trace_headers(request.headers), identity_of(request))
    if wait:
        return json_response(await asyncio.shield(task))
    return json_response(doc, 202)


def _running(worker: Worker, action: str, viewer: Identity) -> Any:
    """The running turn, if it is ``viewer``'s to act on: another key's turn (still running after its lease
    expired and the caller took the worker) is as if there were none."""
    live = worker.current
    if live is None or live.done.is_set() or not viewer.can_see(worker.holder):
        raise errors.Conflict(f"worker {errors.quote(worker.name)} has no running turn to {action}",
                              code="no_running_turn")
    return live


async def steer(request: Request) -> Response:
    caller = caller_of(request, required=True)
    agents, worker = _worker(request)
    body = await _body(request, {"lease_id", "input", "handoff_id", "actor"})
    lease_id = _id(body, "lease_id", required=True)
    text = _text(body, "input", required=True)
    actor = _id(body, "actor")
    _handoff(body.get("handoff_id"), "$.handoff_id", identity_of(request))
    lease = await _held(agents, request, worker, lease_id, "steer it")
    live = _running(worker, "steer", identity_of(request))
    assert text is not None
    turn_id = await worker.steer(live, text)
    worker.emit("turn.steered", turn_id=turn_id, input=text, owner=lease.get("owner"), actor=actor,
                **_for_turn(worker, request, caller))
    return json_response({"worker": worker.name, "turn_id": turn_id, "steered": True})


async def interrupt(request: Request) -> Response:
    caller = caller_of(request, required=True)
    agents, worker = _worker(request)
    body = await _body(request, {"lease_id"})
    lease_id = _id(body, "lease_id", required=True)
    lease = await _held(agents, request, worker, lease_id, "interrupt it")
    live = _running(worker, "interrupt", identity_of(request))
    task = worker.task
    worker.emit("turn.interrupt", turn_id=live.turn_id, owner=lease.get("owner"), **_for_turn(worker, request, caller))
    await worker.end_turn(live, "interrupted", f"interrupted by {lease.get('owner')}")
    assert task is not None
    return json_response(await asyncio.shield(task))


async def cleanup(request: Request) -> Response:
    caller = caller_of(request, required=True)
    agents, worker = _worker(request)
    body = await _body(request, {"lease_id", "remove_worktree"})
    lease_id = _id(body, "lease_id")
    remove = _flag(body, "remove_worktree", False)
    identity = identity_of(request)
    if await agents.lease(worker.name) is not None:  # only its holder (or the master) cleans up a leased worker
        await agents.holder(worker.name, lease_id, "clean it up", identity)
    elif not identity.master:  # unleased: a key cleans up only a worker whose thread or worktree is its own
        doc = await agents.worker_doc(worker.name)
        if identity.owner not in (doc.get("thread_owner"), doc.get("worktree_owner")):
            raise errors.NotFound(f"nothing of this key's on worker {errors.quote(worker.name)} to clean up")
    live = worker.current
    if live is not None and not live.done.is_set() and not identity.can_see(worker.holder):
        raise errors.Conflict(f"worker {errors.quote(worker.name)} is running another key's turn; clean it up "
                              "after that turn ends", code="turn_running")
    if live is not None and not live.done.is_set():
        task = worker.task
        await worker.end_turn(live, "cancelled", "cancelled by cleanup")
        if task is not None:
            await asyncio.shield(task)
    async with worker.busy:
        await worker.stop("cleanup")
        removed = await worker.remove_worktree() if remove else False
        if remove:
            await agents.update_worker(worker.name, worktree=None, worktree_owner=None, thread_id=None, context="reset",
                                       context_note="cleanup removed the worktree; the next turn starts a new "
                                                    "thread in a fresh worktree")
        doc = await agents.worker_doc(worker.name)
        outcome = "removed" if removed else ("none" if remove else "kept")
        worker.emit("worker.cleanup", worktree=outcome, **_who(request, caller))
        worker.events.close()  # followers get their end event
    return json_response({"worker": worker.name, "process": worker.process_status(), "worktree": outcome,
                          "thread_id": doc.get("thread_id")})


def routes() -> list[tuple[str, Any, list[str]]]:
    return [(f"{PREFIX}/registry", registry, ["GET"]),
            (f"{PREFIX}/{{worker}}/status", status, ["GET"]),
            (f"{PREFIX}/{{worker}}/handoffs", handoffs, ["POST"]),
            (f"{PREFIX}/{{worker}}/handoffs/{{handoff_id:path}}", delete_handoff, ["DELETE"]),
            (f"{PREFIX}/{{worker}}/leases", leases, ["POST"]),
            (f"{PREFIX}/{{worker}}/turn", turn, ["POST"]),
            (f"{PREFIX}/{{worker}}/steer", steer, ["POST"]),
            (f"{PREFIX}/{{worker}}/interrupt", interrupt, ["POST"]),
            (f"{PREFIX}/{{worker}}/events/stream", events, ["GET"]),
            (f"{PREFIX}/{{worker}}/result", result, ["GET"]),
            (f"{PREFIX}/{{worker}}/cleanup", cleanup, ["POST"])]
