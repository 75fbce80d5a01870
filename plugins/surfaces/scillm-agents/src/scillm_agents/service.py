"""The app's standing workers and their durable state.

Everything that must outlive a process lives in the state store (so a restarted scillm, or a second scillm on the
same store, sees it): ``agents.leases`` (one document per worker, written only by compare-and-set with the lease's
TTL, so two processes can never both hold it), ``agents.handoffs_by_key`` (each key's handoffs, under ids of its
own, capped by one atomic insert), ``agents.workers`` (thread id, worktree, context), ``agents.turns`` (each turn's
result) and ``agents.results`` (the last turn per key and handoff). Processes, the running turn and the event
followers are per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from scillm_exec import exec_config, run_keys

from scillm_agents.config import settings, workers
from scillm_agents.worker import DIFF_INLINE, LiveTurn, Worker
from scillm_core import MASTER, Identity, Job, Runtime, errors, require_visible
from scillm_core.redact import env_secrets
from scillm_core.state import StateStore

__all__ = ["Agents", "LEASES", "agents_of"]

LEASES, HANDOFFS, WORKERS, TURNS, RESULTS = ("agents.leases", "agents.handoffs", "agents.workers", "agents.turns",
                                             "agents.results")
LAST_TURNS = "agents.last_turns"   # ``<worker>/<owner>``: each key's last turn on a worker
# ``<worker>/<owner>/<handoff_id>``: each key's handoffs, ids scoped to the key, counted per key by the store's capped
# insert. ``{}`` there points to a handoff stored before ids were per key (``agents.handoffs``, ``<worker>/<id>``),
# which stays readable by id and is never written again.
HANDOFFS_BY_KEY = "agents.handoffs_by_key"
CAS_ATTEMPTS = 5


class Found(NamedTuple):
    """A handoff found by the name a caller gave it: its key, its id there, its document, and whether it was stored
    before ids were per key (``agents.handoffs``)."""

    owner: str
    handoff_id: str
    doc: dict[str, Any]
    legacy: bool


def handoff_name(owner: str, handoff_id: str) -> str:
    """How the master key names a key's handoff: its own by id, another key's as ``<owner>/<id>`` (ids never hold a
    ``/``, so the name is never ambiguous)."""
    return handoff_id if owner == MASTER.owner else f"{owner}/{handoff_id}"


def agents_of(runtime: Runtime) -> Agents:
    agents = runtime.plugin_state.get("agents")
    if agents is None:
        agents = runtime.plugin_state["agents"] = Agents(runtime)
    return agents  # type: ignore[no-any-return]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class Agents:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.keys = run_keys(runtime)
        # values never written to an event, log or result (run keys are added as they are minted)
        self.secrets = list(env_secrets(runtime.env))
        self.kill_grace_s = exec_config(runtime).kill_grace_s
        self.lifecycle = asyncio.Lock()   # starts and stops of every worker's process, one at a time
        self.workers = {name: Worker(self, name, cfg) for name, cfg in workers(runtime).items()}
        self.finishing: set[asyncio.Task[Any]] = set()
        self.io = ThreadPoolExecutor(1, thread_name_prefix="scillm-agents-io")  # diff files (not the store's pool)

    @property
    def store(self) -> StateStore:
        return self.runtime.store

    def worker(self, name: str, viewer: Identity = MASTER) -> Worker:
        """The worker ``viewer`` may use, else 404 listing the ones it may (a key restricted to some models sees
        only the workers whose model it may call)."""
        worker = self.workers.get(name)
        if worker is None or not self.usable(worker, viewer):
            declared = ", ".join(w.name for w in self.visible(viewer)) or \
                "none: declare them as [agents.<name>] in scillm.toml"
            raise errors.NotFound(f"no standing worker {errors.quote(name)} (declared: {declared})")
        return worker

    def usable(self, worker: Worker, viewer: Identity) -> bool:
        """Whether ``viewer`` may call the worker's model (by name, or the group or model it routes to: the match
        the keys middleware applies to the worker's model calls, through the ``route_model`` hook as they are)."""
        if viewer.may_call(worker.cfg.model):
            return True
        try:
            route = self.runtime.route(worker.cfg.model)
        except errors.ScillmError:
            return False
        return viewer.may_call(*route.reaches)

    def visible(self, viewer: Identity) -> list[Worker]:
        return [w for w in self.workers.values() if self.usable(w, viewer)]

    # -- worker documents ------------------------------------------------------------------------------------------

    async def worker_doc(self, name: str) -> dict[str, Any]:
        return await self.store.get(WORKERS, name) or {}

    async def update_worker(self, name: str, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into the worker's document (compare-and-set, so concurrent writers do not lose fields)."""
        for _ in range(CAS_ATTEMPTS):
            current = await self.store.get(WORKERS, name)
            new = {**(current or {}), **fields, "updated_at": time.time()}
            if await self.store.compare_and_set(WORKERS, name, current, new):
                return new
        raise errors.Conflict(f"worker {errors.quote(name)}: its state changed concurrently too often; try again")

    # -- leases ----------------------------------------------------------------------------------------------------

    async def lease(self, name: str) -> dict[str, Any] | None:
        return await self.store.get(LEASES, name)  # an expired lease reads as absent

    def _held_by(self, lease: Mapping[str, Any]) -> str:
        return (f"worker {lease.get('worker')!r} is leased by {lease.get('owner')!r} (lease {lease.get('lease_id')!r}) "
                f"until {_iso(float(lease.get('expires_at') or 0))}")

    def _lease_conflict(self, lease: Mapping[str, Any], hint: str, viewer: Identity = MASTER) -> errors.Conflict:
        """409: the worker is taken; who took it (owner, lease id) only for the key that holds it or the master."""
        if not viewer.can_see(lease.get("identity")):
            return errors.Conflict(f"worker {lease.get('worker')!r} is leased by another key until "
                                   f"{_iso(float(lease.get('expires_at') or 0))}; {hint}", code="lease_held",
                                   details={"expires_at": lease.get("expires_at")})
        return errors.Conflict(f"{self._held_by(lease)}; {hint}", code="lease_held", details={
            "holder": lease.get("owner"), "lease_id": lease.get("lease_id"), "expires_at": lease.get("expires_at")})

    async def acquire(self, name: str, *, owner: str, lease_id: str, handoff_id: str | None, ttl_s: float,
                      who: Mapping[str, Any], viewer: Identity = MASTER) -> dict[str, Any]:
        """Take the worker's lease: one compare-and-set against "absent or expired". The same owner asking again
        with the same lease id renews it."""
        now = time.time()
        doc = {"worker": name, "lease_id": lease_id, "owner": owner, "handoff_id": handoff_id, "ttl_s": ttl_s,
               "acquired_at": now, "renewed_at": now, "expires_at": now + ttl_s, **who}
        if await self.store.compare_and_set(LEASES, name, None, doc, ttl_s=ttl_s):
            self.worker(name).emit("lease.acquired", lease_id=lease_id, owner=owner, handoff_id=handoff_id,
                                   expires_at=doc["expires_at"], identity=who.get("identity"))
            return doc
        current = await self.lease(name)
        if current is None:  # it expired between the two calls: one more atomic attempt
            if await self.store.compare_and_set(LEASES, name, None, doc, ttl_s=ttl_s):
                return doc
            current = await self.lease(name)
        if current is not None and current.get("lease_id") == lease_id and current.get("owner") == owner and \
                viewer.can_see(current.get("identity")):
            return await self.renew(name, lease_id=lease_id, owner=owner, ttl_s=ttl_s, viewer=viewer)
        raise self._lease_conflict(current or {}, "try again after it expires, or ask the holder to release it",
                                   viewer)

    async def holder(self, name: str, lease_id: Any, action: str, viewer: Identity = MASTER) -> dict[str, Any]:
        """The live lease if ``lease_id`` is it, else 409 (naming the holder to the key that holds it); 404 when
        ``viewer`` is another key than the one that took it: a key controls only its own leases."""
        lease = await self.lease(name)
        if lease is None:
            raise errors.Conflict(f"worker {errors.quote(name)} has no live lease; take one with POST "
                                  f"/v1/scillm/agents/{name}"
                                  f"/leases before you {action}", code="lease_required")
        if lease.get("lease_id") != lease_id:
            raise self._lease_conflict(lease, f"only the holder may {action}", viewer)
        require_visible(viewer, lease.get("identity"), f"lease {errors.quote(lease_id)}")
        return lease

    async def renew(self, name: str, *, lease_id: str, owner: str | None, ttl_s: float,
                    viewer: Identity = MASTER) -> dict[str, Any]:
        current = await self.holder(name, lease_id, "renew it", viewer)
        if owner is not None and current.get("owner") != owner:
            raise self._lease_conflict(current, "only the holder may renew it", viewer)
        now = time.time()
        new = {**current, "renewed_at": now, "expires_at": now + ttl_s, "ttl_s": ttl_s}
        if not await self.store.compare_and_set(LEASES, name, current, new, ttl_s=ttl_s):
            raise errors.Conflict(f"the lease on worker {errors.quote(name)} changed while renewing it; read "
                                  "its status and try again", code="lease_changed")
        self.worker(name).emit("lease.renewed", lease_id=lease_id, expires_at=new["expires_at"],
                               identity=current.get("identity"))
        return new

    async def release(self, name: str, *, lease_id: str, viewer: Identity = MASTER) -> dict[str, Any]:
        current = await self.holder(name, lease_id, "release it", viewer)
        if not await self.store.compare_and_set(LEASES, name, current, None):
            raise errors.Conflict(f"the lease on worker {errors.quote(name)} changed while releasing it",
                                  code="lease_changed")
        self.worker(name).emit("lease.released", lease_id=lease_id, identity=current.get("identity"))
        return {**current, "released": True}

    # -- handoffs --------------------------------------------------------------------------------------------------

    async def handoff(self, name: str, handoff: str, viewer: Identity = MASTER) -> dict[str, Any] | None:
        """The handoff ``viewer`` names (see :func:`handoff_name`), or ``None``: another key's is not there."""
        found = await self._find(name, handoff, viewer)
        return found.doc if found else None

    async def _find(self, name: str, handoff: str, viewer: Identity) -> Found | None:
        """The handoff ``viewer`` names: ``<id>`` is its own, ``<owner>/<id>`` that key's, which only the master
        key (or that key) may open; a handoff stored before ids were per key is its key's by id too."""
        owner, _, handoff_id = handoff.rpartition("/")
        owner = owner or viewer.owner
        if owner != viewer.owner and not viewer.master:
            return None  # another key's: as if absent
        doc = await self.store.get(HANDOFFS_BY_KEY, f"{name}/{owner}/{handoff_id}")
        if doc:
            return Found(owner, handoff_id, doc, legacy=False)
        legacy = await self.store.get(HANDOFFS, f"{name}/{handoff_id}")
        if legacy is not None and (legacy.get("identity") or MASTER.owner) == owner:
            return Found(owner, handoff_id, legacy, legacy=True)
        return None

    async def add_handoff(self, name: str, doc: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Store a handoff once in its key's own namespace of ids; the same handoff again is accepted as is (a
        retry), a different one with the key's id is a 409. At ``max_handoffs_per_key`` of the key's on the worker
        a new one is a 409 too: counted and stored in one atomic step of the store, so posts racing at the cap never
        pass it. Returns ``(document, created)``."""
        owner, handoff_id = doc.get("identity") or MASTER.owner, doc["handoff_id"]
        legacy = await self.store.get(HANDOFFS, f"{name}/{handoff_id}")
        if legacy is not None and (legacy.get("identity") or MASTER.owner) == owner:
            return self._same(name, legacy, doc)  # the key's own, stored before ids were per key
        cfg = settings(self.runtime)
        cap, ttl_s = cfg.max_handoffs_per_key, cfg.handoff_ttl_s
        doc = {**doc, "expires_at": doc["created_at"] + ttl_s if ttl_s else None}
        key = f"{name}/{owner}/{handoff_id}"
        # its lifetime is the store's expiry of the document: gone, it reads as absent and no longer counts
        inserted = await self.store.insert(HANDOFFS_BY_KEY, key, doc, prefix=f"{name}/{owner}/", cap=cap, ttl_s=ttl_s)
        if inserted.current == {}:  # a pointer left to a handoff from before that is gone: the id is free (counted)
            inserted = inserted._replace(created=await self.store.compare_and_set(HANDOFFS_BY_KEY, key, {}, doc,
                                                                                  ttl_s=ttl_s))
        if inserted.created:
            self.worker(name).emit("handoff.created", handoff_id=handoff_id, goal=doc["goal"],
                                   owner=doc.get("caller"), identity=doc.get("identity"))
            return doc, True
        if inserted.current is None:
            raise errors.RequestError(f"this key already has {cap} handoffs on worker {name!r} "
                                      "(standing_agents.max_handoffs_per_key); delete finished ones first, or "
                                      "wait for older ones to expire (standing_agents.handoff_lifetime_days)",
                                      status=409, code="too_many_handoffs")
        return self._same(name, inserted.current, doc)

    @staticmethod
    def _same(name: str, existing: dict[str, Any], doc: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        content = ("goal", "context", "validation_expectations", "metadata", "phase_id", "identity")
        if all(existing.get(k) == doc.get(k) for k in content):
            return existing, False
        raise errors.Conflict(f"worker {errors.quote(name)} already has a different handoff "
                              f"{doc['handoff_id']!r} of this key; use a new handoff_id", code="handoff_exists")

    async def handoff_ids(self, name: str, viewer: Identity = MASTER) -> list[str]:
        """The worker's handoffs that ``viewer`` may see, as it names them: a key's own ids (another key's many
        cannot push them out of the list); for the master key every key's, another key's as ``<owner>/<id>``."""
        if not viewer.master:
            prefix = f"{name}/{viewer.owner}/"
            return [key[len(prefix):] for key, _ in await self.store.scan(HANDOFFS_BY_KEY, prefix, limit=1000)]
        names = [handoff_name(*key.split("/", 2)[1:])
                 for key, _ in await self.store.scan(HANDOFFS_BY_KEY, f"{name}/", limit=1000)]
        names += [handoff_name(doc.get("identity") or MASTER.owner, key.split("/", 1)[1])
                  for key, doc in await self.store.scan(HANDOFFS, f"{name}/", limit=1000)]
        return sorted(set(names))

    async def delete_handoff(self, name: str, handoff: str, viewer: Identity) -> bool:
        """Forget the handoff ``viewer`` names (its turns' results stay); whether there was one."""
        found = await self._find(name, handoff, viewer)
        if found is None:
            return False
        key = f"{name}/{found.owner}/{found.handoff_id}"
        if not found.legacy:
            return await self.store.compare_and_set(HANDOFFS_BY_KEY, key, found.doc, None)
        await self.store.compare_and_set(HANDOFFS, f"{name}/{found.handoff_id}", found.doc, None)
        await self.store.compare_and_set(HANDOFFS_BY_KEY, key, {}, None)
        return True

    # -- turns -----------------------------------------------------------------------------------------------------

    async def begin_turn(self, worker: Worker, record: dict[str, Any], text: str, timeout_s: float,
                         base_url: str, trace: Mapping[str, str] | None = None, identity: Identity = MASTER
                         ) -> tuple[dict[str, Any], asyncio.Task[dict[str, Any]]]:
        """Start a turn (the worker must be free); returns its running record and the task that stores its result.
        The turn is a unit of work inside the worker's run from before ``turn/start`` (so its first model call is
        already made for it) until its result is stored; its model calls (the worker's key) are charged to, limited
        as and logged under ``identity``."""
        if worker.busy.locked():
            running = worker.current.turn_id if worker.current and identity.can_see(worker.holder) else None
            raise errors.Conflict(f"worker {errors.quote(worker.name)} is running " + (
                f"turn {running}; steer it, interrupt it, or wait for its result" if running else
                "a turn; try again when it ends"), code="turn_running")
        await worker.busy.acquire()
        try:
            worker.holder = identity.owner
            await worker.ensure_running(base_url, trace)
            if not identity.master:
                await worker.own_thread(identity.owner)
            await worker.own_worktree(identity)
            worker.turn_run = worker.unit(
                f"agent turn {worker.name}", uuid.uuid4().hex[:12], trace, worker.run.unit if worker.run else None,
                key_owner=identity.owner, caller=record.get("caller"), owner=record.get("owner"),
                handoff_id=record.get("handoff_id"))
            # named by its turn once codex tells it; until then by an id of this turn alone, so the ceiling of a
            # call made before that never counts another turn's spend
            job = Job(kind="run", id=f"agent-{worker.name}/starting-{uuid.uuid4().hex[:12]}", owner=identity.owner,
                      max_cost_usd=record.get("max_cost_usd"),
                      on_exceeded=lambda reason: self._stop_turn(worker, reason))
            self.keys.assign(worker.key, run_id=f"agent-{worker.name}", caller="agents", identity=identity, job=job)
            self.keys.set_unit(worker.key, worker.turn_run.unit)
            live = await worker.start_turn(text)
            job.id = f"agent-{worker.name}/{live.turn_id}"
            if job.exceeded is not None:  # refused before codex told us the turn
                self._stop_turn(worker, job.exceeded)
        except BaseException as exc:
            self._end_turn_run(worker, "failed", getattr(exc, "message", None) or type(exc).__name__)
            worker.busy.release()
            raise
        doc = {**record, "worker": worker.name, "turn_id": live.turn_id, "thread_id": worker.thread_id,
               "status": "running", "started_at": time.time(), "timeout_s": timeout_s}
        worker.emit("turn.requested", turn_id=live.turn_id, handoff_id=doc.get("handoff_id"), owner=doc.get("owner"),
                    input=text)
        recorded = asyncio.Event()   # the result is stored only after the running record (which may fail)
        task = worker.task = asyncio.ensure_future(self._finish(worker, live, doc, timeout_s, recorded, job))
        self.finishing.add(task)
        task.add_done_callback(self.finishing.discard)
        try:
            await self.store.put(TURNS, f"{worker.name}/{live.turn_id}", doc)
            await self.update_worker(worker.name, last_turn_id=live.turn_id)
            await self.store.put(LAST_TURNS, f"{worker.name}/{identity.owner}", {"turn_id": live.turn_id})
            if doc.get("handoff_id"):  # per key, as the handoff ids are
                await self.store.put(RESULTS, f"{worker.name}/{identity.owner}/{doc['handoff_id']}",
                                     {"turn_id": live.turn_id})
        finally:
            recorded.set()
        return doc, task

    def _stop_turn(self, worker: Worker, reason: str) -> None:
        """A model call of the running turn was refused for its ``max_cost_usd`` (or its key's budget): the turn
        ends ``failed`` saying so (``turn/interrupt``, then the process if codex does not end it)."""
        live = worker.current
        if live is not None and not live.done.is_set():
            task = asyncio.ensure_future(worker.end_turn(live, "failed", f"stopped: {reason}"))
            self.finishing.add(task)
            task.add_done_callback(self.finishing.discard)

    def _end_turn_run(self, worker: Worker, status: str, error: str | None, **attrs: Any) -> None:
        """The turn's unit ends; the worker's model calls are its run's (and the master's) again."""
        self.keys.assign(worker.key, run_id=f"agent-{worker.name}", caller="agents")
        worker.holder = None
        if worker.turn_run is not None:
            worker.turn_run.end(status, error, **attrs)
            worker.turn_run = None
            self.keys.set_unit(worker.key, worker.run.unit if worker.run else None)

    async def _finish(self, worker: Worker, live: LiveTurn, doc: dict[str, Any], timeout_s: float,
                      recorded: asyncio.Event, job: Job) -> dict[str, Any]:
        ended: tuple[str, str | None] = ("failed", "the turn's result could not be stored")
        try:
            await worker.wait_turn(live, timeout_s)
            await recorded.wait()
            status = {"completed": "completed", "interrupted": "interrupted"}.get(live.status or "", "failed")
            error = live.error
            if live.ended_by is not None and status != "completed":
                status, error = live.ended_by  # scillm ended it: timeout, interrupt, cleanup, shutdown
            if job.exceeded is not None:  # a model call was refused for the turn's max_cost_usd or the key's budget
                status, error = "failed", f"stopped: {job.exceeded}"
            patch, paths = "", list[str]()
            try:
                patch, paths = await worker.evidence()
            except errors.ScillmError as exc:
                error = error or f"could not diff the worktree: {exc.message}"
            if worker.cfg.sandbox == "read-only" and paths:
                status = "failed"
                error = (f"sandbox_violation: read-only worker {worker.name!r} changed {', '.join(paths[:20])}; "
                         "its worktree was reset to the base commit (the diff is kept as evidence)")
                with contextlib.suppress(errors.ScillmError):
                    await worker.reset()
            diff_path = worker.dir / "turns" / f"{live.turn_id}.diff"
            await asyncio.get_running_loop().run_in_executor(self.io, _write, diff_path, patch)
            now = time.time()
            result = {**doc, "status": status, "error": error, "cost_usd": job.cost_usd,
                      "final_text": live.messages[-1] if live.messages else "",
                      "turn_diff": live.diff, "diff": patch[:DIFF_INLINE], "diff_truncated": len(patch) > DIFF_INLINE,
                      "changed_paths": paths, "usage": live.usage, "completed_at": now,
                      "duration_s": round(now - doc["started_at"], 3),
                      "artifacts": {"diff": str(diff_path), "events_jsonl": str(worker.events.path)}}
            await self.store.put(TURNS, f"{worker.name}/{live.turn_id}", result)
            worker.emit("turn.completed", turn_id=live.turn_id, handoff_id=doc.get("handoff_id"), status=status,
                        error=error, final_text=result["final_text"], changed_paths=paths)
            ended = (status, error)
            return result
        finally:
            self._end_turn_run(worker, *ended, turn_id=live.turn_id, thread_id=doc.get("thread_id"))
            worker.turns.pop(live.turn_id, None)
            if worker.current is live:
                worker.current = None
            worker.last_active = time.monotonic()
            worker.busy.release()

    async def turn(self, name: str, turn_id: str) -> dict[str, Any] | None:
        return await self.store.get(TURNS, f"{name}/{turn_id}")

    async def last_turn(self, name: str, viewer: Identity) -> dict[str, Any] | None:
        """The worker's last turn as ``viewer`` sees it: the last of all for the master key, else that key's own."""
        if viewer.master:
            turn_id = (await self.worker_doc(name)).get("last_turn_id")
        else:
            turn_id = (await self.store.get(LAST_TURNS, f"{name}/{viewer.owner}") or {}).get("turn_id")
        return await self.turn(name, turn_id) if turn_id else None

    async def result(self, name: str, handoff_id: str | None, viewer: Identity = MASTER) -> dict[str, Any]:
        """The last turn of a handoff, or of the worker (``viewer``'s own last turn for a virtual key); 404 for
        another key's, as for one that does not exist."""
        if handoff_id is not None:
            found = await self._find(name, handoff_id, viewer)
            if found is None:  # none, or another key's: the same answer
                raise errors.NotFound(f"worker {errors.quote(name)} has no handoff {errors.quote(handoff_id)}")
            # each key's turns on a handoff are pointed to under that key, by the name it gave the handoff
            pointers = [f"{name}/{viewer.owner}/{handoff_id}"]
            if found.owner != viewer.owner:  # the master key on another key's handoff: that key's turns too
                pointers.append(f"{name}/{found.owner}/{found.handoff_id}")
            if found.legacy:  # a handoff from before ids were per key: its turns' pointer then
                pointers.append(f"{name}/{found.handoff_id}")
            turns = [t for p in await self.store.get_many(RESULTS, pointers) if p
                     for t in (await self.turn(name, p["turn_id"]),) if t]
            if not turns:
                raise errors.NotFound(f"handoff {errors.quote(handoff_id)} of worker {errors.quote(name)} has "
                                      f"no finished turn yet")
            doc = max(turns, key=lambda t: float(t.get("started_at") or 0))
        else:
            doc = await self.last_turn(name, viewer)
            if doc is None:
                raise errors.NotFound(f"worker {errors.quote(name)} has run no turn yet" + ("" if viewer.master else
                                                                               " for this key"))
        if doc is None:
            raise errors.NotFound(f"the turn of worker {errors.quote(name)} is not stored")
        require_visible(viewer, doc.get("identity"), f"turn of worker {errors.quote(name)} for this key")
        return doc

    # -- capacity and lifecycle ------------------------------------------------------------------------------------

    async def make_room(self, starting: Worker) -> None:
        """Called with ``lifecycle`` held before a process starts: at ``max_live`` live processes, stop the one idle
        longest; when every live worker is running a turn, refuse (429)."""
        limit = settings(self.runtime).max_live
        live = [w for w in self.workers.values() if w is not starting and w.alive]
        while len(live) >= limit:
            idle = [w for w in live if not w.busy.locked()]
            if not idle:
                raise errors.ScillmError(
                    f"all {limit} live standing workers are running turns (standing_agents.max_live); try again "
                    "when one finishes", status=429, code="too_many_live_workers", headers={"retry-after": "5"})
            victim = min(idle, key=lambda w: w.last_active)
            await victim.stop_locked(f"stopped to make room for worker {starting.name!r} "
                                      f"(standing_agents.max_live={limit}); the next turn resumes its thread")
            live.remove(victim)

    async def shutdown(self) -> None:
        """scillm is stopping: end running turns, stop every process (whole process groups), store the results."""
        for worker in self.workers.values():
            if worker.current is not None and not worker.current.done.is_set():
                worker.current.ended_by = ("failed", "scillm stopped during the turn; the thread resumes on the "
                                                     "next turn")
        async with self.lifecycle:
            for worker in self.workers.values():
                await worker.stop_locked("scillm stopped")
        for task in list(self.finishing):
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 10)
        for worker in self.workers.values():
            worker.events.close()
        self.io.shutdown(wait=True)

    def health(self) -> dict[str, Any]:
        return {"workers": len(self.workers), "live": sum(1 for w in self.workers.values() if w.alive),
                "running_turns": sum(1 for w in self.workers.values() if w.busy.locked()),
                "max_live": settings(self.runtime).max_live}
