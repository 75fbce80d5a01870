"""Resilience state shared by every process and instance on a Redis state store (``[state] backend = "redis"``).

- **Concurrency limits**: each upstream call holds, besides its slot of this process's limiter (which keeps the
  FIFO wait queue), one of the provider's global slots (``StateStore.hold_slots``, counted per process): at most
  ``max_concurrency`` calls are in flight across all instances. A process's count is renewed while it holds slots
  and lapses after ``[state] claim_timeout_s`` when the process dies, so a dead instance never keeps slots.
- **AIMD**: the effective limit is one document per provider; an upstream 429 halves it by compare-and-set (once
  per window, as locally), and every process computes the recovery from it (one step per ``aimd_recover_s``).
- **Circuit breakers**: failures are counted in one document per deployment (compare-and-set); a circuit opened by
  one instance is mirrored into every other's local breaker within ``MIRROR_S``.
- **429 pauses** (:class:`SharedPauses`): one document per paused deployment (compare-and-set); every instance adopts
  it within ``MIRROR_S`` and holds its callers; when it ends, one caller per instance asks for the probe and exactly
  one wins it (the document names the instance holding it, with a TTL); the others wait for its verdict.

Redis down: limits fall back to this process's limiter at ``max_concurrency / live instances`` (so the total still
holds roughly), breakers, AIMD and pauses to this process's own state; everything goes back to shared when Redis
answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from scillm_resilience.breaker import CLOSED, OPEN, Breaker
from scillm_resilience.limiter import Limiter, QueueTimeoutSignal

if TYPE_CHECKING:
    from scillm_core import Runtime
    from scillm_resilience.pause import Pauses

__all__ = ["Shared", "SharedPauses"]

log = logging.getLogger("scillm.resilience")
MIRROR_S = 0.2          # how stale this process's view of shared breakers and AIMD may be
RETRY_S = 1.0           # after the store failed, requests use local state this long before asking it again
POLL_S = (0.01, 0.2)    # waiting for a global slot: first and longest pause between tries
TURN_POLL_S = (0.02, 0.2)  # waiting for another instance's probe: first and longest pause between reads
AIMD_NS, BREAKER_NS, PAUSE_NS = "resilience-aimd", "resilience-breaker", "resilience-pause"


class SlotBatch:
    """Group commit for one provider's global slots, counted for this process: acquires queued while a round trip
    is under way go together in the next one (``StateStore.hold_slots``), so under load one Redis call serves many
    requests. Each call tells the store how many slots this process holds now (its own count: a release is a
    smaller count, a reply that never arrived cannot leave a slot taken); a release nobody waits for rides along
    with the next acquire, or goes on its own at once, and so does a renewal."""

    def __init__(self, shared: Shared, provider: str) -> None:
        self.shared = shared
        self.pool = "limits:" + provider
        self.held = 0  # slots this process holds (granted, not given back)
        self.acquires: list[tuple[int, asyncio.Future[bool]]] = []
        self.stale = False  # the store's count for this process is not this one (a release, a renewal is due)
        self.task: asyncio.Task[None] | None = None

    async def acquire(self, limit: int) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.acquires.append((limit, future))
        self._wake()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.result():
                self.release()  # taken just as its caller left
            raise

    def release(self) -> None:
        self.held -= 1
        self.stale = True
        self._wake()

    def renew(self) -> None:
        self.stale = True
        self._wake()

    def _wake(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        while self.acquires or self.stale:
            acquires, self.acquires = self.acquires, []
            self.stale = False
            limit = min((limit for limit, _ in acquires), default=1)
            try:
                taken = await self.shared.store.hold_slots(self.pool, self.shared.holder, self.held, len(acquires),
                                                           limit, self.shared.ttl_s)
            except Exception as exc:  # a count the store missed lapses after the TTL; waiting acquires hear why
                self.shared._failed(exc)
                for _, future in acquires:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for i, (_, future) in enumerate(acquires):
                if future.done():  # its caller left: a slot taken for it goes back with the next call
                    self.stale = self.stale or i < taken
                    continue
                future.set_result(i < taken)
                if i < taken:
                    self.held += 1


class Shared:
    def __init__(self, runtime: Runtime, *, aimd: bool, recover_s: float) -> None:
        self.runtime = runtime
        self.aimd = aimd
        self.recover_s = recover_s
        self.ttl_s = runtime.config.state.claim_timeout_s
        self.holder = runtime.instance_id              # whose slots these are in the store
        self.held: dict[int, str] = {}                 # lease -> provider
        self.leases = itertools.count(1)
        self.batches: dict[str, SlotBatch] = {}        # provider -> its group commit of slot changes
        self.freed: dict[str, asyncio.Event] = {}      # provider -> woken when this process frees a slot
        self.mirrors: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}
        self.reading: dict[tuple[str, str], asyncio.Future[dict[str, Any] | None]] = {}  # reads under way
        self.degraded: str | None = None               # why the shared state is not in use right now
        self.retry_at = 0.0                            # monotonic time before which the store is not asked
        self.counts = {"global_waits": 0, "store_errors": 0}
        self.renewer: asyncio.Task[None] | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.pauses = SharedPauses(self)

    def spawn(self, work: Any) -> None:
        """Run ``work`` (a coroutine that handles its own errors) without making the caller wait for the store."""
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    @property
    def store(self) -> Any:
        return self.runtime.store

    @property
    def skipping(self) -> bool:
        """The store failed a moment ago: a Redis that hangs costs one request its timeout, not every request."""
        return self.degraded is not None and time.monotonic() < self.retry_at

    def _failed(self, exc: BaseException) -> None:
        self.retry_at = time.monotonic() + RETRY_S
        self.counts["store_errors"] += 1
        if self.degraded is None:
            log.warning("shared resilience state unavailable, using this process's own: %s", exc)
        self.degraded = getattr(exc, "message", None) or type(exc).__name__

    async def _doc(self, namespace: str, key: str) -> dict[str, Any] | None:
        """A shared document, read at most every ``MIRROR_S``: when the copy here is older, one read goes to the
        store and every caller that needs the document meanwhile waits for that read (under load, dozens of calls
        find the copy stale at once; one round trip serves them all)."""
        seen = self.mirrors.get((namespace, key))
        if seen is not None and time.monotonic() - seen[0] < MIRROR_S:
            return seen[1]
        reading = self.reading.get((namespace, key))
        if reading is None:
            reading = self.reading[(namespace, key)] = asyncio.ensure_future(self._read(namespace, key))
            reading.add_done_callback(lambda task: task.cancelled() or task.exception())  # retrieved, never logged
        return await asyncio.shield(reading)  # a caller that is cancelled leaves the read to the others

    async def _read(self, namespace: str, key: str) -> dict[str, Any] | None:
        try:
            now = time.monotonic()
            doc = await self.store.get(namespace, key)
            self.mirrors[(namespace, key)] = (now, doc)
            return doc
        finally:
            self.reading.pop((namespace, key), None)

    # -- limits -------------------------------------------------------------------------------------------------

    def effective(self, doc: dict[str, Any] | None, limit: int) -> int:
        if not self.aimd or doc is None:
            return limit
        steps = int((time.time() - float(doc["changed"])) / self.recover_s)
        return min(limit, int(doc["effective"]) + max(steps, 0))

    async def acquire(self, limiter: Limiter, wait_s: float) -> int | None:
        """A global slot of ``limiter``'s provider (a lease number), waiting up to ``wait_s``. ``None``: Redis is
        down and this process's limiter, narrowed to its share, stands in."""
        provider = limiter.provider
        if self.skipping:
            self.narrow(limiter)
            return None
        deadline = time.monotonic() + wait_s
        pause = POLL_S[0]
        while True:
            try:
                limit = self.effective(await self._doc(AIMD_NS, provider), limiter.limit)
                if await self.batch(provider).acquire(limit):
                    self.recovered(limiter)
                    lease = next(self.leases)
                    self.held[lease] = provider
                    self._start_renewer()
                    return lease
            except Exception as exc:
                self._failed(exc)
                self.narrow(limiter)
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise QueueTimeoutSignal(wait_s)
            self.counts["global_waits"] += 1
            event = self.freed.setdefault(provider, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(pause, left))
            pause = min(pause * 2, POLL_S[1])

    def narrow(self, limiter: Limiter) -> None:
        presence = self.runtime.presence
        live = presence.live if presence is not None else 1
        limiter.effective = max(1, limiter.limit // max(live, 1))

    def recovered(self, limiter: Limiter) -> None:
        if self.degraded is not None:
            log.warning("shared resilience state reachable again")
            self.degraded = None
        limiter.effective = limiter.limit

    def release(self, lease: int) -> None:
        provider = self.held.pop(lease, None)
        if provider is None:
            return
        self.batch(provider).release()
        event = self.freed.pop(provider, None)
        if event is not None:
            event.set()

    def batch(self, provider: str) -> SlotBatch:
        found = self.batches.get(provider)
        if found is None:
            found = self.batches[provider] = SlotBatch(self, provider)
        return found

    def _start_renewer(self) -> None:
        if self.renewer is None or self.renewer.done():
            self.renewer = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        """While this process holds slots, its count is renewed every third of the TTL (through the same group
        commit as acquires and releases, so counts reach the store in order)."""
        while self.held:
            await asyncio.sleep(self.ttl_s / 3)
            for batch in list(self.batches.values()):
                if batch.held:
                    batch.renew()

    async def rate_limited(self, limiter: Limiter, admitted_wall: float) -> None:
        """AIMD across instances: halve the shared effective limit, once per window."""
        if not self.aimd:
            return
        provider = limiter.provider
        try:
            for _ in range(8):
                doc = await self.store.get(AIMD_NS, provider)
                if doc is not None and admitted_wall < float(doc.get("decreased", 0)):
                    return
                now = time.time()
                new = {"effective": max(1, self.effective(doc, limiter.limit) // 2), "changed": now, "decreased": now}
                if await self.store.compare_and_set(AIMD_NS, provider, doc, new,
                                                    ttl_s=self.recover_s * limiter.limit + 60):
                    self.mirrors[(AIMD_NS, provider)] = (time.monotonic(), new)
                    return
        except Exception as exc:
            self._failed(exc)

    def snapshot(self, limiter: Limiter) -> dict[str, Any]:
        seen = self.mirrors.get((AIMD_NS, limiter.provider))
        return {"shared": self.degraded is None, "global_effective_limit": self.effective(
            seen[1] if seen else None, limiter.limit), "leases_held_here": sum(
            1 for p in self.held.values() if p == limiter.provider)}

    # -- breakers ------------------------------------------------------------------------------------------------

    async def sync_circuit(self, breaker: Breaker, deployment: str) -> None:
        """Bring the shared state of ``deployment`` into this process's breaker (at most every ``MIRROR_S``)."""
        if self.skipping:
            return
        try:
            doc = await self._doc(BREAKER_NS, deployment)
        except Exception as exc:
            self._failed(exc)
            return
        circuit = breaker.circuits.get(deployment)
        if doc is None or doc.get("state") != OPEN:
            return
        age = time.time() - float(doc["opened_at"])
        if age >= breaker.cooldown_s:
            return  # cooling down is over: the local breaker lets one call probe
        circuit = breaker._circuit(deployment)
        if circuit.state == CLOSED or circuit.opened_at < breaker.clock() - age - 0.5:
            circuit.state = OPEN
            circuit.opened_at = breaker.clock() - age
            circuit.consecutive_failures = max(circuit.consecutive_failures, int(doc.get("failures", 0)))
            circuit.last_error = doc.get("last_error")
            circuit.probing = False

    async def circuit_failure(self, breaker: Breaker, deployment: str, error: str) -> None:
        try:
            for _ in range(8):
                doc = await self.store.get(BREAKER_NS, deployment)
                failures = int((doc or {}).get("failures", 0)) + 1
                now = time.time()
                opening = failures >= breaker.threshold or (doc or {}).get("state") == OPEN
                new = {"failures": failures, "state": OPEN if opening else CLOSED, "last_error": error[:300],
                       "opened_at": now if opening else (doc or {}).get("opened_at", 0)}
                if await self.store.compare_and_set(BREAKER_NS, deployment, doc, new,
                                                    ttl_s=max(breaker.cooldown_s * 4, 60)):
                    self.mirrors[(BREAKER_NS, deployment)] = (time.monotonic(), new)
                    return
        except Exception as exc:
            self._failed(exc)

    async def circuit_success(self, deployment: str) -> None:
        try:
            await self.store.delete(BREAKER_NS, deployment)
            self.mirrors[(BREAKER_NS, deployment)] = (time.monotonic(), None)
        except Exception as exc:
            self._failed(exc)

    async def close(self) -> None:
        for batch in self.batches.values():
            if batch.task is not None:
                self.tasks.add(batch.task)
        for task in [*self.tasks, *([self.renewer] if self.renewer else [])]:
            task.cancel()
        for task in [*self.tasks, *([self.renewer] if self.renewer else [])]:
            with contextlib.suppress(BaseException):
                await task

    def describe(self) -> dict[str, Any]:
        return {"shared": self.degraded is None, "degraded": self.degraded, "lease_ttl_s": self.ttl_s,
                "leases_held_here": len(self.held), **self.counts}


class SharedPauses:
    """The arbiter of :class:`scillm_resilience.pause.Pauses` across instances. One document per paused deployment,
    changed only by compare-and-set: ``{"until": wall time the pause ends, "hint_s", "probe": the instance holding
    the probe ("" when nobody does), "probe_until": when that claim lapses}``. A probe success deletes it."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.me = shared.runtime.instance_id

    def _seen(self, deployment: str, doc: dict[str, Any] | None) -> None:
        self.shared.mirrors[(PAUSE_NS, deployment)] = (time.monotonic(), doc)

    async def sync(self, pauses: Pauses, deployment: str) -> None:
        """Adopt a pause another process started (this view of the shared ones is at most ``MIRROR_S`` old)."""
        shared = self.shared
        if shared.skipping:
            return
        try:
            doc = await shared._doc(PAUSE_NS, deployment)
        except Exception as exc:
            shared._failed(exc)
            return
        if doc is not None:
            pauses.adopt(deployment, max(0.0, float(doc["until"]) - time.time()), float(doc.get("hint_s", 0)))

    def paused(self, deployment: str, seconds: float, probe: bool) -> None:
        until = time.time() + seconds

        def change(doc: dict[str, Any] | None) -> dict[str, Any] | None:
            doc = doc or {"until": 0.0, "probe": "", "probe_until": 0.0}
            mine = doc["probe"] == self.me
            return {"until": max(float(doc["until"]), until), "hint_s": seconds,
                    "probe": "" if probe and mine else doc["probe"],
                    "probe_until": 0.0 if probe and mine else doc["probe_until"]}

        self._seen(deployment, change(None))  # this process's next callers wait without asking the store
        self.shared.spawn(self._change(deployment, change))

    def lifted(self, deployment: str) -> None:
        self._seen(deployment, None)
        self.shared.spawn(self._change(deployment, lambda doc: None if doc and doc["probe"] == self.me else doc))

    def abandoned(self, deployment: str) -> None:
        self.shared.spawn(self._change(deployment, lambda doc: {**doc, "probe": "", "probe_until": 0.0}
                                       if doc and doc["probe"] == self.me else doc))

    async def _change(self, deployment: str,
                      change: Callable[[dict[str, Any] | None], dict[str, Any] | None]) -> None:
        """Apply ``change(doc)`` (a new document, ``None`` to delete, the same object for no change) by
        compare-and-set, read again on a race."""
        store = self.shared.store
        try:
            for _ in range(16):
                doc = await store.get(PAUSE_NS, deployment)
                new = change(doc)
                if new is doc:
                    return
                if await store.compare_and_set(PAUSE_NS, deployment, doc, new, ttl_s=self._ttl(new)):
                    self._seen(deployment, new)
                    return
        except Exception as exc:
            self.shared._failed(exc)

    def _ttl(self, doc: dict[str, Any] | None) -> float | None:
        """A pause nobody probes any more (traffic stopped) is forgotten a while after it ended."""
        return max(float(doc["until"]) - time.time(), 0.0) + max(60.0, 2 * self.shared.ttl_s) if doc else None

    async def turn(self, deployment: str) -> bool | float | None:
        """Claim the probe for this process once the pause ended and nobody else holds it (or their claim lapsed:
        their process died); otherwise wait for the verdict. The store down: this process's own caller probes."""
        shared, store = self.shared, self.shared.store
        pause = TURN_POLL_S[0]
        while True:
            if shared.skipping:
                return True
            try:
                doc = await store.get(PAUSE_NS, deployment)
                self._seen(deployment, doc)
                now = time.time()
                if doc is None:
                    return None
                if float(doc["until"]) > now:
                    return float(doc["until"]) - now
                if doc["probe"] in ("", self.me) or float(doc["probe_until"]) <= now:
                    claimed = {**doc, "probe": self.me, "probe_until": now + shared.ttl_s}
                    if await store.compare_and_set(PAUSE_NS, deployment, doc, claimed, ttl_s=self._ttl(claimed)):
                        self._seen(deployment, claimed)
                        return True
                    continue  # changed meanwhile: look again at once
            except Exception as exc:
                shared._failed(exc)
                return True
            await asyncio.sleep(pause)
            pause = min(pause * 2, TURN_POLL_S[1])
