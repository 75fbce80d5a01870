"""The batch engine: items spread over lanes, results in completion order, each stored as it finishes.

Every item gets exactly one result. A lane that answers 429 pauses (for its ``retry-after``, else a backoff) and
work shifts to the other lanes; an item fails only when its deadline passes, every lane refused it for a
non-retryable reason, or it exhausted its attempts, and the result says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
from attrs import define, field, frozen

from scillm_core import (
    MASTER,
    CallContext,
    ChatRequest,
    ChatResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    Identity,
    Job,
    Runtime,
    errors,
    run_chat,
    run_embeddings,
    schemas,
    structure,
    unstructure,
)
from scillm_core.identity import owner_identity
from scillm_core.models.extensions import take_extensions
from scillm_core.pipeline import check_model

__all__ = ["BatchItem", "BatchSpec", "Lane", "PoolConfig", "run_batch", "stored_results"]

ITEM_NS = "batch-items:"
BATCH_NS = "batches"
log = logging.getLogger("scillm.batch")


@frozen(kw_only=True)
class Lane:
    model: str
    name: str = ""
    weight: float = 1.0
    max_concurrency: int = 8
    timeout_s: float | None = None

    @property
    def label(self) -> str:
        return self.name or self.model


@frozen(kw_only=True)
class PoolConfig:
    lanes: tuple[Lane, ...]


@frozen(kw_only=True)
class BatchItem:
    index: int
    item_id: str
    body: Mapping[str, Any]  # the chat body for this item (shared params merged, model left to the lane)
    error: str | None = None  # set when the item itself is unusable; it fails without a call


@frozen(kw_only=True)
class BatchSpec:
    """One batch. ``kind`` says what each item's body is: a chat request (``"chat"``) or an embeddings request
    (``"embeddings"``). ``timeout_s`` bounds the whole batch (default: an hour)."""

    batch_id: str
    pool: str
    lanes: tuple[Lane, ...]
    items: tuple[BatchItem, ...]
    timeout_s: float | None
    caller: str | None
    kind: str = "chat"
    trace: Mapping[str, str] = field(factory=dict)  # the client's trace context (scillm_core.events.trace_headers)
    identity: Identity = MASTER  # who submitted it: its calls are charged to and limited as that key
    max_cost_usd: float | None = None  # what its calls may cost in total

    def job(self) -> Job:
        """The batch as the job its calls are made for (spend, ``max_cost_usd``)."""
        return Job(kind="batch", id=self.batch_id, owner=self.identity.owner, max_cost_usd=self.max_cost_usd)

    @property
    def unit(self) -> str:
        """This batch as a unit of work in events (``batch.*``, ``batch.item.*``)."""
        return f"batch:{self.batch_id}"

    def item_unit(self, item: BatchItem) -> str:
        return f"batch.item:{self.batch_id}/{item.item_id}"

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(orjson.dumps([item.item_id, item.body], option=orjson.OPT_SORT_KEYS))
        return digest.hexdigest()


@define
class LaneState:
    lane: Lane
    paused_until: float = 0.0
    backoff_s: float = 1.0
    in_flight: int = 0
    served: int = 0
    rate_limited: int = 0

    def share(self) -> float:
        """Work taken relative to the lane's weight; the dispatcher fills the lowest first."""
        return (self.served + self.in_flight) / max(self.lane.weight, 1e-6)


@define
class Pending:
    item: BatchItem
    deadline: float
    attempts: int = 0
    refused: dict[str, str] = field(factory=dict)
    last_error: BaseException | None = None
    ticket: Any = None  # the worker's handle on the queue entry this item came from
    cost_usd: float | None = 0.0  # what its attempts cost; None once one of them had no known price

    def add_cost(self, ctx: CallContext) -> None:
        cost = ctx.notes.get("cost_usd", 0.0 if "cost_usd" in ctx.notes else None)
        self.cost_usd = None if cost is None or self.cost_usd is None else self.cost_usd + cost


Emit = Callable[[str, Mapping[str, Any]], Awaitable[None]]


async def stored_results(runtime: Runtime, batch_id: str) -> dict[str, dict[str, Any]]:
    """The results stored so far for ``batch_id``, by item id (what a resume reuses)."""
    return dict(await runtime.store.scan(ITEM_NS + batch_id, limit=1_000_000))


async def run_batch(spec: BatchSpec, runtime: Runtime, emit: Emit) -> dict[str, Any]:
    """Run (or resume) a batch and follow it to the end; ``emit(event, data)`` is awaited for every event in order.

    The items go on the shared work queue, where the batch workers of every process and instance on this state
    store take them (:mod:`scillm_batch.worker`); this call follows the batch's stored results, from whichever
    process stores them, so it ends even when the process that ran an item is not this one. A resubmitted
    ``batch_id`` starts a new run: stored successes are reported as ``resumed`` and only the rest is queued again.
    If the caller leaves before the end, the run is cancelled: no process starts another of its items."""
    started = time.time()
    run = await _new_run(spec, runtime, started)
    if run > 1:
        await _retain(runtime, spec.batch_id, None)  # running again: its event log stays while it runs
    events = runtime.events
    events.emit("batch.start", None, unit=spec.unit, parent=None, name=f"batch {spec.pool}", trace=spec.trace,
                attrs={"batch_id": spec.batch_id, "pool": spec.pool, "total": len(spec.items),
                       "caller": spec.caller, "lanes": ",".join(lane.label for lane in spec.lanes), "run": run},
                owner=spec.identity.owner)
    ttl_s = runtime.config.state.finished_logs_ttl_s
    try:
        summary = await _follow(spec, runtime, emit, run, started)
    except BaseException as exc:
        cancelled = isinstance(exc, asyncio.CancelledError)  # a cancel, its caller gone, or a shutdown
        events.emit("batch.end", None, unit=spec.unit, status="cancelled" if cancelled else "error",
                    error="cancelled" if cancelled or not isinstance(exc, Exception) else _message(exc))
        if ttl_s is not None:  # the caller may be gone: nobody waits for it
            task = asyncio.ensure_future(_retain(runtime, spec.batch_id, ttl_s))
            _RETAINING.add(task)
            task.add_done_callback(_RETAINING.discard)
        raise
    events.emit("batch.end", None, unit=spec.unit, status="ok",
                attrs={k: summary[k] for k in ("completed", "failed", "elapsed_s")})
    if ttl_s is not None:
        await _retain(runtime, spec.batch_id, ttl_s)
    return summary


_RETAINING: set[asyncio.Task[None]] = set()


async def _retain(runtime: Runtime, batch_id: str, ttl_s: float | None) -> None:
    """Retention of the batch's event log: it goes ``ttl_s`` after the run ended (``[state] finished_logs_days``);
    ``None`` while a run is under way. A store that fails leaves it as it was (logged)."""
    from scillm_batch.worker import events_ns

    try:
        await runtime.store.expire_log(events_ns(batch_id), ttl_s)
    except Exception as exc:
        log.warning("batch %s: its event log's retention not set: %s", batch_id, type(exc).__name__)


async def _follow(spec: BatchSpec, runtime: Runtime, emit: Emit, run: int, started: float) -> dict[str, Any]:
    from scillm_batch.worker import QUEUE, events_ns

    store = runtime.store
    previous = await stored_results(runtime, spec.batch_id)
    await emit("batch_started", {"batch_id": spec.batch_id, "model_pool": spec.pool, "total": len(spec.items),
                                 "lanes": [lane.label for lane in spec.lanes], "resumed": run > 1})
    follower = Follower(spec, run, emit, runtime)
    queued: list[dict[str, Any]] = []
    for item in spec.items:
        done = previous.get(item.item_id)
        if done is not None and done.get("ok"):
            await follower.report({**done, "resumed": True})
        elif item.error:
            result = {"ok": False, "item_id": item.item_id, "index": item.index, "lane": None, "error": item.error,
                      "error_code": "invalid_item", "status_code": 400, "run": run}
            if await store.compare_and_set(ITEM_NS + spec.batch_id, item.item_id, done, result):
                await follower.report(result)
        else:
            queued.append({"batch_id": spec.batch_id, "run": run, "item_id": item.item_id, "index": item.index,
                           "body": item.body})
    # keys take turns, then each key's batches (scillm_core.state.flow_group): the key's group is its owner id
    flow = spec.identity.owner.replace("%", "%25").replace("/", "%2F") + "/" + spec.batch_id
    try:
        cursor = ""
        if queued:
            for start in range(0, len(queued), 1000):
                await store.enqueue(QUEUE, queued[start:start + 1000], flow=flow)
        while not follower.complete:
            events = await store.follow(events_ns(spec.batch_id), cursor, limit=1000, block_s=5.0)
            for cursor, result in events:  # noqa: B007 (the last cursor is where the next read starts)
                await follower.report(result)
    except BaseException:
        if not follower.complete:  # the caller left (or the store failed): no process starts more of this run
            with contextlib.suppress(Exception):
                await _cancel(runtime, spec.batch_id, run)
                if (worker := runtime.plugin_state.get("batch")) is not None:  # this process: at once
                    await worker.drop_cancelled(spec.batch_id, run)
        raise
    costs = [r.get("cost_usd") for r in follower.results]
    summary = {"batch_id": spec.batch_id, "model_pool": spec.pool, "total": follower.total,
               "completed": follower.completed, "failed": follower.failed,
               "not_run": sum(1 for r in follower.results if r.get("not_run")),
               "cost_usd": None if None in costs else round(sum(c for c in costs if c is not None), 9),
               "max_cost_usd": spec.max_cost_usd, "elapsed_s": round(time.time() - started, 3),
               "lanes": follower.lane_totals()}
    await emit("batch_done", summary)
    return {**summary, "results": follower.results, "ordered": False, "completion_order": "as_completed"}


async def _new_run(spec: BatchSpec, runtime: Runtime, started: float) -> int:
    """Bind ``batch_id`` to this item set (409 when it is bound to another) and start its next run, atomically:
    two submissions at once get two run numbers."""
    store = runtime.store
    while True:
        stored = await store.get(BATCH_NS, spec.batch_id)
        if stored is not None and not spec.identity.can_see(stored.get("owner")):
            raise errors.Conflict(f"batch_id {spec.batch_id!r} is taken; use another batch_id", param="batch_id")
        if stored is not None and stored.get("fingerprint") != spec.fingerprint:
            raise errors.Conflict(f"batch_id {spec.batch_id!r} is bound to a different item set; use a new batch_id",
                                  param="batch_id")
        run = int((stored or {}).get("run", 0)) + 1
        doc = {"batch_id": spec.batch_id, "fingerprint": spec.fingerprint, "pool": spec.pool,
               "total": len(spec.items), "lanes": [lane.label for lane in spec.lanes],
               "lane_specs": [unstructure(lane) for lane in spec.lanes], "timeout_s": spec.timeout_s,
               "caller": spec.caller, "kind": spec.kind, "trace": dict(spec.trace),
               "created": (stored or {}).get("created", started), "run": run, "run_started": started,
               "cancelled_run": (stored or {}).get("cancelled_run", 0),
               # the master key resuming a key's batch leaves it (and its spend) that key's
               "owner": (stored or {}).get("owner", spec.identity.owner), "max_cost_usd": spec.max_cost_usd}
        if await store.compare_and_set(BATCH_NS, spec.batch_id, stored, doc):
            return run


async def _cancel(runtime: Runtime, batch_id: str, run: int) -> None:
    store = runtime.store
    while (stored := await store.get(BATCH_NS, batch_id)) is not None and stored.get("cancelled_run", 0) < run:
        if await store.compare_and_set(BATCH_NS, batch_id, stored, {**stored, "cancelled_run": run}):
            return


class Follower:
    """One run's view of the batch: each item reported once, when it has a result of this run (or a success)."""

    def __init__(self, spec: BatchSpec, run: int, emit: Emit, runtime: Runtime) -> None:
        self.spec = spec
        self.runtime = runtime
        self.run = run
        self.emit = emit
        self.waiting = {item.item_id for item in spec.items}
        self.total = len(self.waiting)
        self.completed = self.failed = 0
        self.results: list[dict[str, Any]] = []
        self.lanes: dict[str, dict[str, dict[str, int]]] = {}  # instance -> lane -> counts, the latest seen

    @property
    def complete(self) -> bool:
        return not self.waiting

    async def report(self, result: dict[str, Any]) -> None:
        item_id = result.get("item_id")
        if item_id not in self.waiting or not (result.get("ok") or result.get("run", 0) >= self.run):
            return
        if result.get("run") == self.run and isinstance(result.get("lane_counts"), dict):
            self.lanes[str(result.get("instance"))] = result["lane_counts"]
        result = {k: v for k, v in result.items() if k not in ("lane_counts", "instance")}
        self.waiting.discard(item_id)
        self.results.append(result)
        if result["ok"]:
            self.completed += 1
        else:
            self.failed += 1
        spec = self.spec
        self.runtime.events.emit(
            "batch.item.end", None, unit=f"batch.item:{spec.batch_id}/{item_id}", parent=spec.unit,
            name=f"batch item {item_id}", status="ok" if result["ok"] else "error", error=result.get("error"),
            attrs={"item_id": item_id, "index": result.get("index"), "lane": result.get("lane"),
                   "resumed": bool(result.get("resumed")), "error_code": result.get("error_code"),
                   "completed": self.completed, "failed": self.failed, "total": self.total})
        await self.emit("item_completed" if result["ok"] else "item_failed", result)

    def lane_totals(self) -> dict[str, dict[str, int]]:
        totals: dict[str, dict[str, int]] = {}
        for counts in self.lanes.values():
            for label, numbers in counts.items():
                into = totals.setdefault(label, {"served": 0, "rate_limited": 0})
                for name in into:
                    into[name] += int(numbers.get(name, 0))
        return totals


def _storable(result: dict[str, Any]) -> dict[str, Any]:
    try:
        orjson.dumps(result)
        return result
    except orjson.JSONEncodeError as exc:
        return _unstored(result, exc)


def _unstored(result: Mapping[str, Any], exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "item_id": result.get("item_id"), "index": result.get("index"), "lane": result.get("lane"),
            "error": f"the result could not be stored ({type(exc).__name__}: {str(exc)[:200]})",
            "error_code": "unstorable_result", "status_code": 502}


def _deadline(item: BatchItem, spec: BatchSpec, started: float) -> float:
    item_timeout = item.body.get("timeout")
    candidates = [started + (spec.timeout_s or 3600.0)]
    if isinstance(item_timeout, int | float) and not isinstance(item_timeout, bool) and item_timeout > 0:
        candidates.append(started + item_timeout)
    return min(candidates)


async def _dispatch(work: deque[Pending], lanes: list[LaneState], spec: BatchSpec, runtime: Runtime,
                    finish: Callable[[Pending, dict[str, Any]], Awaitable[None]],
                    changed: asyncio.Event | None = None, job: Job | None = None) -> None:
    """Assign an item to a lane only when that lane has a free slot and is not paused, choosing the lane that
    is furthest below its weighted share; a rate-limited item goes back to the front of the queue. Items added
    to ``work`` while it runs are taken too (set ``changed`` after adding). Once a budget that will not come back
    in time (the batch's ``max_cost_usd``, a key's or team's dollars) refuses an item, or the key that submitted the
    batch was revoked or expired, no further item is started: each one left gets a ``not_run`` result saying why."""
    job = job or spec.job()
    running: set[asyncio.Task[None]] = set()
    halted: list[errors.ScillmError] = []
    changed = changed or asyncio.Event()
    active = 0  # attempts not yet fully handled (the task set lags: done callbacks run later)

    async def attempt(pending: Pending, state: LaneState) -> None:
        nonlocal active
        try:
            try:
                outcome = await _try_once(pending, state, spec, runtime, job)
            except asyncio.CancelledError:
                raise
            except (errors.BudgetExceeded, errors.AuthenticationError) as exc:
                outcome = _not_run(pending.item, exc, pending.cost_usd)
                halted.append(exc)
            except Exception as exc:  # never lose an item, whatever happened
                outcome = _failure(pending.item, exc, state.lane, cost_usd=pending.cost_usd)
            finally:
                state.in_flight -= 1
            if outcome is None:
                work.appendleft(pending)
            else:
                await finish(pending, outcome)
        finally:
            active -= 1
            changed.set()

    try:
        while work or active:
            if halted:
                while work:
                    pending = work.popleft()
                    await finish(pending, _not_run(pending.item, halted[0], pending.cost_usd))
                if not active:
                    break
            now = time.monotonic()
            free = [s for s in lanes if s.in_flight < s.lane.max_concurrency and s.paused_until <= now]
            chosen: tuple[Pending, LaneState] | None = None
            for _ in range(len(work)):
                pending = work[0]
                if pending.deadline <= now:
                    work.popleft()
                    await finish(pending, _failure(pending.item, pending.last_error, None,
                                                   f"deadline reached after {pending.attempts} attempts"
                                          + (f"; last error: {_message(pending.last_error)}"
                                             if pending.last_error else ""), cost_usd=pending.cost_usd))
                    continue
                if len(pending.refused) == len(lanes):
                    work.popleft()
                    reasons = "; ".join(f"{name}: {why}" for name, why in pending.refused.items())
                    await finish(pending, _failure(pending.item, pending.last_error, None,
                                                   f"every lane refused this item ({reasons})",
                                                   cost_usd=pending.cost_usd))
                    continue
                usable = [s for s in free if s.lane.label not in pending.refused]
                if usable:
                    work.popleft()
                    chosen = (pending, min(usable, key=lambda s: (s.share(), random.random())))
                    break
                work.rotate(-1)
            if chosen is not None:
                pending, state = chosen
                if pending.attempts == 0 and runtime.events.listening:
                    item = pending.item
                    runtime.events.emit("batch.item.start", None, unit=spec.item_unit(item), parent=spec.unit,
                                        name=f"batch item {item.item_id}",
                                        attrs={"item_id": item.item_id, "index": item.index})
                state.in_flight += 1
                active += 1
                task = asyncio.ensure_future(attempt(pending, state))
                running.add(task)
                task.add_done_callback(running.discard)
                continue
            if not work and not active:
                break  # the last items were just finished above (expired or refused everywhere)
            waits = [s.paused_until - now for s in lanes if s.paused_until > now]
            waits += [p.deadline - now for p in work]
            changed.clear()
            try:
                await asyncio.wait_for(changed.wait(), max(min(waits), 0.0) if waits else None)
            except TimeoutError:
                pass
    finally:
        for task in running:
            task.cancel()
        if running:  # let the cancelled calls unwind (release limits, log) before the batch counts as stopped
            await asyncio.gather(*running, return_exceptions=True)


async def _try_once(pending: Pending, state: LaneState, spec: BatchSpec, runtime: Runtime,
                    job: Job) -> dict[str, Any] | None:
    """One call on one lane: a result, or ``None`` to put the item back in the queue. Raises
    :class:`~scillm_core.errors.BudgetExceeded` when a budget refused the item for longer than it can wait, and
    :class:`~scillm_core.errors.AuthenticationError` once the key that submitted the batch was revoked or expired
    (checked before every item: one version read while the key is unchanged)."""
    if not spec.identity.master:
        await owner_identity(runtime, spec.identity.owner, spec.identity)
    pending.attempts += 1
    started = time.monotonic()
    try:
        served = await _call(pending, state.lane, spec, runtime, job)
    except (errors.UpstreamRateLimited, errors.LimitExceeded) as exc:
        wait = exc.retry_after_s
        if isinstance(exc, errors.BudgetExceeded) and (wait is None or time.monotonic() + wait >= pending.deadline):
            raise  # this budget will not come back before the deadline: stop admitting items
        pending.last_error = exc
        state.rate_limited += 1
        pause = wait if wait else state.backoff_s
        state.backoff_s = min(state.backoff_s * 2, 30.0)
        state.paused_until = max(state.paused_until, time.monotonic() + pause)
        return None
    except errors.ScillmError as exc:
        pending.last_error = exc
        if isinstance(exc, errors.RequestError | errors.UpstreamBadRequest):
            return _failure(pending.item, exc, state.lane, cost_usd=pending.cost_usd)  # a bad item: no lane takes it
        if not exc.retryable or pending.attempts >= 3 * len(spec.lanes):
            pending.refused[state.lane.label] = _message(exc)
        return None
    state.served += 1
    state.backoff_s = 1.0
    return _success(pending, state.lane, served, time.monotonic() - started)


async def _call(pending: Pending, lane: Lane, spec: BatchSpec, runtime: Runtime,
                job: Job) -> tuple[ChatResponse | EmbeddingsResponse, CallContext]:
    item, deadline = pending.item, pending.deadline
    body = dict(item.body)
    body["model"] = lane.model
    extensions = take_extensions(body)  # checked at submission
    metadata = dict(extensions.get("scillm_metadata") or {})
    metadata.update(batch_id=spec.batch_id, item_id=item.item_id, model_pool=spec.pool, lane=lane.label)
    remaining = deadline - time.monotonic()
    timeout = min(t for t in (remaining, lane.timeout_s, extensions.get("timeout")) if t is not None)
    body["scillm"] = {**extensions, "scillm_metadata": metadata, "timeout": timeout}
    ctx = CallContext(runtime=runtime, caller=spec.caller or "scillm-batch", identity=spec.identity, job=job,
                      deadline=time.monotonic() + max(timeout, 0.001), parent=spec.item_unit(item))
    ctx.notes["batch"] = metadata
    what = f"batch item {item.item_id!r}"
    try:
        if spec.kind == "embeddings":
            body.pop("stream", None)
            return await run_embeddings(structure(body, EmbeddingsRequest, what=what), ctx), ctx
        body["stream"] = False
        result = await run_chat(structure(body, ChatRequest, what=what), ctx)
    finally:
        pending.add_cost(ctx)
    assert isinstance(result, ChatResponse)
    return result, ctx


def _success(pending: Pending, lane: Lane, served: tuple[ChatResponse | EmbeddingsResponse, CallContext],
             latency_s: float) -> dict[str, Any]:
    response, ctx = served
    route, item = ctx.route, pending.item
    result = {"ok": True, "item_id": item.item_id, "index": item.index, "lane": lane.label,
              "provider": route.provider if route else None, "model": lane.model, "served_model": response.model}
    if isinstance(response, ChatResponse):
        result["content"] = response.text
    return {**result, "response": unstructure(response), "cost_usd": pending.cost_usd,
            "latency_s": round(latency_s, 3)}


def _not_run(item: BatchItem, exc: errors.ScillmError, cost_usd: float | None = 0.0) -> dict[str, Any]:
    """An item no provider was asked about because a budget ran out or its key was revoked: says why, and that it
    was never run."""
    return {**_failure(item, exc, None, f"not run: {exc.message}", cost_usd=cost_usd), "not_run": True}


def _failure(item: BatchItem, exc: BaseException | None, lane: Lane | None, why: str | None = None,
             cost_usd: float | None = 0.0) -> dict[str, Any]:
    status = exc.status if isinstance(exc, errors.ScillmError) else 500
    code = getattr(exc, "code", None) if isinstance(exc, errors.ScillmError) else "internal_error"
    message = why or _message(exc)
    return {"ok": False, "item_id": item.item_id, "index": item.index, "lane": lane.label if lane else None,
            "error": message, "error_code": code, "status_code": status, "cost_usd": cost_usd}


def _message(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    return exc.message if isinstance(exc, errors.ScillmError) else f"internal error ({type(exc).__name__})"


def lanes_for(pool: str | None, model: str | None, pools: Mapping[str, PoolConfig],
              concurrency: int) -> tuple[str, tuple[Lane, ...]]:
    for value, where in ((pool, "$.model_pool"), (model, "$.model")):
        if value is not None and not isinstance(value, str):
            raise errors.InvalidRequest(f"{where[2:]} must be a string @ {where}", param=where)
    if pool:
        if pool not in pools:
            known = ", ".join(sorted(pools)) or "none configured"
            raise errors.InvalidRequest(f"unknown model_pool {pool!r:.60} (known: {known})", param="$.model_pool")
        return pool, pools[pool].lanes
    if not model:
        raise errors.InvalidRequest("give model_pool or model @ $.model_pool", param="$.model_pool")
    check_model(model)  # the batch keeps it (lanes, progress) before any call would refuse it
    return model, (Lane(model=model, name=model, max_concurrency=concurrency),)


#: batch and item ids: they name stored records and appear in URLs (``GET /v1/scillm/batch/{batch_id}``)
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,127}")


def check_id(value: Any, what: str, where: str) -> str:
    """``value`` as an id, or a 400 naming ``where``: 1-128 characters, letters, digits and ``._:@+=-``, starting
    with a letter or digit (no ``/``, spaces or control characters). Integers are taken as their decimal text."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise errors.InvalidRequest(f"{what} must be 1-128 characters of letters, digits and ._:@+=- starting with a "
                                    f"letter or digit, got {value!r:.60} @ {where}", param=where)
    return value


def build_items(raw_items: Any, shared: Mapping[str, Any], max_items: int) -> tuple[BatchItem, ...]:
    """Validate the items at submission: ids, and scillm's own fields (``timeout``, ``scillm_metadata``,
    ``json_schema`` through the shared schema gate) are 400s naming ``$.items[i]...``; an item without messages
    or a prompt fails on its own without a call."""
    if not isinstance(raw_items, list) or not raw_items:
        raise errors.InvalidRequest("items must be a non-empty array @ $.items", param="$.items")
    if len(raw_items) > max_items:
        raise errors.InvalidRequest(f"{len(raw_items)} items; the limit is {max_items} @ $.items", param="$.items")
    items: list[BatchItem] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_items):
        where = f"$.items[{index}]"
        if not isinstance(raw, dict):
            raise errors.InvalidRequest(f"each item must be an object @ {where}", param=where)
        raw = dict(raw)
        given, alias = raw.pop("item_id", None), raw.pop("id", None)
        key = "item_id" if given is not None else "id"
        given = given if given is not None else alias
        item_id = f"item-{index}" if given is None else check_id(given, "item_id", f"{where}.{key}")
        if item_id in seen:
            raise errors.InvalidRequest(f"duplicate item_id {errors.quote(item_id)} @ {where}.{key}",
                                        param=f"{where}.{key}")
        seen.add(item_id)
        take_extensions(dict(raw), where=where)  # raises for a bad timeout / scillm_metadata of this item
        body = {**shared, **raw}
        body.pop("model", None)
        prompt = body.pop("prompt", None)
        error = None
        if "messages" not in body:
            if isinstance(prompt, str) and prompt:
                body["messages"] = [{"role": "user", "content": prompt}]
            else:
                error = f"item has neither messages nor a prompt @ {where}"
        items.append(BatchItem(index=index, item_id=item_id, body=body, error=error))
    return tuple(items)


async def check_schemas(items: Sequence[BatchItem], shared: Mapping[str, Any]) -> None:
    """Every ``json_schema`` (shared or per item) through the one schema gate before any call: a bad one is a 400
    naming where it was given."""
    checked: set[int] = set()
    shared_schema = shared.get("json_schema")
    if shared_schema is not None:
        await _check_schema(shared_schema, "$")
        checked.add(id(shared_schema))
    for item in items:
        schema = item.body.get("json_schema")
        if schema is not None and id(schema) not in checked:
            await _check_schema(schema, f"$.items[{item.index}]")
            checked.add(id(schema))


async def _check_schema(raw: Any, where: str) -> None:
    if not isinstance(raw, dict):
        raise errors.InvalidRequest(f"json_schema must be a JSON Schema object @ {where}.json_schema",
                                    param=f"{where}.json_schema")
    schema, suffix = schemas.unwrap(raw)
    await schemas.check_schema_async(schema, f"{where}.json_schema{suffix}")


def progress_of(batch: Mapping[str, Any] | None, results: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    total = int(batch["total"]) if batch else 0
    completed = sum(1 for _, r in results if r.get("ok"))
    failed = len(results) - completed
    return {"batch_id": batch["batch_id"] if batch else None, "model_pool": batch.get("pool") if batch else None,
            "total": total, "completed": completed, "failed": failed, "pending": max(total - len(results), 0),
            "done": len(results) >= total, "results": [dict(r) for _, r in results]}
