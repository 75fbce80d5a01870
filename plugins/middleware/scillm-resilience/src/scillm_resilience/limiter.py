"""Per-provider concurrency limiter: a bounded fair wait queue and an AIMD effective limit.

The queue is fair between callers: waiters are grouped by owner (the virtual key, or the master key) and, within an
owner, by flow (one batch, one agent run, or its other calls), and a freed slot goes round robin over owners, then
over the owner's flows; each flow is first in, first out. So one key's flood, or one batch of thousands of items,
delays another caller by at most one call per slot. When the queue is full, a newcomer lighter than the heaviest
owner (or, within its own owner, than the heaviest flow) takes the place of that one's newest waiter, which is
refused as if it had found the queue full; otherwise the newcomer is refused.

On an upstream 429 the effective limit halves (never below 1) — once per "window": a 429 for a call that was
admitted before the last decrease does not halve again. After ``recover_s`` without a 429 it grows by one per
quiet period, back to the configured limit. Slots are released exactly once, on success, error, cancellation or
when a stream ends or is closed (and, as a last resort, when an unconsumed stream is garbage collected).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

__all__ = ["FairQueue", "Limiter", "QueueFullSignal", "QueueTimeoutSignal", "Slot", "SlotIterator"]

_NOTHING: Any = object()  # no first chunk held


class QueueFullSignal(Exception):
    def __init__(self, displaced: bool = False) -> None:
        super().__init__(displaced)
        self.displaced = displaced  # it waited, and gave its place to a caller with fewer waiting


class QueueTimeoutSignal(Exception):
    def __init__(self, waited_s: float) -> None:
        super().__init__(waited_s)
        self.waited_s = waited_s


class FairQueue:
    """Waiting futures by owner, then by flow: :meth:`pop` serves owners round robin, each owner's flows round robin,
    each flow in arrival order."""

    def __init__(self) -> None:
        self.owners: dict[str, dict[str, collections.deque[asyncio.Future[None]]]] = {}  # in turn order
        self.sizes: dict[str, int] = {}
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def push(self, owner: str, flow: str, waiter: asyncio.Future[None]) -> None:
        self.owners.setdefault(owner, {}).setdefault(flow, collections.deque()).append(waiter)
        self._count(owner, 1)

    def pop(self) -> asyncio.Future[None] | None:
        """The next waiter, or ``None`` when none waits; its owner and flow go to the back of their turns."""
        if not self.owners:
            return None
        owner, flows = next(iter(self.owners.items()))
        flow, queue = next(iter(flows.items()))
        waiter = queue.popleft()
        del flows[flow], self.owners[owner]
        if queue:
            flows[flow] = queue
        if flows:
            self.owners[owner] = flows
        self._count(owner, -1)
        return waiter

    def remove(self, owner: str, flow: str, waiter: asyncio.Future[None]) -> None:
        queue = self.owners.get(owner, {}).get(flow)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        if not queue:
            flows = self.owners[owner]
            del flows[flow]
            if not flows:
                del self.owners[owner]
        self._count(owner, -1)

    def displace(self, owner: str, flow: str) -> asyncio.Future[None] | None:
        """The waiter a newcomer of ``owner``/``flow`` may take the place of in a full queue (taken out of the
        queue), or ``None`` when the newcomer is the one to refuse: the newest waiter of the heaviest owner if the
        newcomer's owner has at least two fewer waiting, else of the heaviest flow of its own owner likewise."""
        if not self.sizes:
            return None
        heaviest = max(self.sizes, key=self.sizes.__getitem__)
        if self.sizes.get(owner, 0) + 1 < self.sizes[heaviest]:
            victim_owner = heaviest
        else:
            victim_owner = owner
        flows = self.owners.get(victim_owner, {})
        if not flows:
            return None
        victim_flow = max(flows, key=lambda f: len(flows[f]))
        if victim_owner == owner and len(flows.get(flow, ())) + 1 >= len(flows[victim_flow]):
            return None
        waiter = flows[victim_flow][-1]
        self.remove(victim_owner, victim_flow, waiter)
        return waiter

    def _count(self, owner: str, change: int) -> None:
        self.size += change
        left = self.sizes.get(owner, 0) + change
        if left:
            self.sizes[owner] = left
        else:
            del self.sizes[owner]


class Limiter:
    def __init__(self, provider: str, limit: int, max_queue: int, *, aimd: bool, recover_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.provider = provider
        self.limit = limit
        self.max_queue = max_queue
        self.aimd = aimd
        self.recover_s = recover_s
        self.clock = clock
        self.effective = limit
        self.in_flight = 0
        self.waiters = FairQueue()
        self.last_change = clock()
        self.last_decrease = float("-inf")
        self.decreases = 0
        self.rejected = 0
        self.served = 0
        self.shared: Any = None  # scillm_resilience.shared.Shared when the limit holds across instances

    # -- AIMD ---------------------------------------------------------------------------------------------------

    def _recover(self) -> None:
        if self.effective >= self.limit:
            return
        now = self.clock()
        steps = int((now - self.last_change) / self.recover_s)
        if steps > 0:
            self.effective = min(self.limit, self.effective + steps)
            self.last_change = now if self.effective >= self.limit else self.last_change + steps * self.recover_s
            self._wake()

    def rate_limited(self, slot: Slot) -> None:
        """An upstream 429 for a call admitted through ``slot``."""
        if not self.aimd or slot.admitted_at < self.last_decrease:
            return
        self._recover()
        now = self.clock()
        halved = max(1, self.effective // 2)
        if halved < self.effective:  # at 1 there is nothing left to halve: not a decrease
            self.decreases += 1
        self.effective = halved
        self.last_change = self.last_decrease = now

    # -- slots --------------------------------------------------------------------------------------------------

    def _wake(self) -> None:
        while self.in_flight < self.effective:
            waiter = self.waiters.pop()
            if waiter is None:
                return
            if waiter.done():
                continue
            self.in_flight += 1
            waiter.set_result(None)

    def _release(self) -> None:
        self.in_flight -= 1
        self._recover()
        self._wake()

    def try_acquire(self) -> Slot | None:
        """A slot at once, or ``None`` when the limit is reached or others are already waiting."""
        self._recover()
        if self.in_flight < self.effective and not self.waiters:
            self.in_flight += 1
            return self._granted()
        return None

    async def acquire(self, wait_s: float, owner: str = "", flow: str = "") -> Slot:
        """A slot, waiting at most ``wait_s`` in the fair queue as ``owner``'s ``flow``. Raises
        :class:`QueueFullSignal` when the queue is full (at once, or later when a lighter caller takes this
        waiter's place), :class:`QueueTimeoutSignal` when no slot freed up in time."""
        slot = self.try_acquire()
        if slot is not None:
            return slot
        if len(self.waiters) >= self.max_queue:
            displaced = self.waiters.displace(owner, flow)
            if displaced is None:
                self.rejected += 1
                raise QueueFullSignal()
            if not displaced.done():  # (done: cancelled, its task yet to run and leave; its place was free)
                self.rejected += 1
                displaced.set_exception(QueueFullSignal(displaced=True))
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.push(owner, flow, waiter)
        started = self.clock()
        try:
            async with asyncio.timeout(max(wait_s, 0.0)):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release()  # granted just as we gave up: hand the slot on
            else:
                waiter.cancel()
                self.waiters.remove(owner, flow, waiter)  # (a displaced waiter is out already)
            if isinstance(exc, TimeoutError):
                self.rejected += 1
                raise QueueTimeoutSignal(self.clock() - started) from None
            raise
        return self._granted()

    def _granted(self) -> Slot:
        self.served += 1
        return Slot(self, self.clock())

    def snapshot(self) -> dict[str, Any]:
        self._recover()
        return {"limit": self.limit, "effective_limit": self.effective, "in_flight": self.in_flight,
                "waiting": len(self.waiters), "max_queue": self.max_queue,
                "aimd_decreases": self.decreases, "rejected": self.rejected, "served": self.served}


class Slot:
    __slots__ = ("__weakref__", "admitted_at", "also_release", "limiter", "released")

    def __init__(self, limiter: Limiter, admitted_at: float) -> None:
        self.limiter = limiter
        self.admitted_at = admitted_at
        self.released = False
        self.also_release: Callable[[], None] | None = None  # e.g. the global lease held with this slot

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limiter._release()
            if self.also_release is not None:
                self.also_release()


class SlotIterator:
    """A stream holding a slot (if any) until it ends, fails or is closed; ``first``, a chunk already taken from
    it, comes first, and ``on_error`` hears of a failure before it propagates. One layer per chunk for all three
    (the stream hot path has dozens of chunks per request)."""

    __slots__ = ("_first", "_inner", "_loop", "_on_error", "_slot")

    def __init__(self, inner: AsyncIterator[Any], slot: Slot | None, on_error: Callable[[BaseException], None],
                 first: Any = _NOTHING) -> None:
        self._inner = inner
        self._slot = slot
        self._on_error = on_error
        self._first = first
        self._loop = asyncio.get_running_loop()

    def __aiter__(self) -> SlotIterator:
        return self

    async def __anext__(self) -> Any:
        first = self._first
        if first is not _NOTHING:
            self._first = _NOTHING
            return first
        slot = self._slot
        if slot is not None and slot.released:
            raise StopAsyncIteration
        try:
            return await self._inner.__anext__()
        except StopAsyncIteration:
            if slot is not None:
                slot.release()
            raise
        except BaseException as exc:
            try:
                self._on_error(exc)
            finally:
                await self.aclose()
            raise

    async def aclose(self) -> None:
        try:
            close = getattr(self._inner, "aclose", None)
            if close is not None:
                await close()
        finally:
            if self._slot is not None:
                self._slot.release()

    def __del__(self) -> None:  # an opened stream nobody consumed or closed: never leak its slot
        slot = getattr(self, "_slot", None)
        if slot is not None and not slot.released:
            try:
                self._loop.call_soon_threadsafe(slot.release)
            except RuntimeError:
                pass  # loop closed: nothing left to release into
