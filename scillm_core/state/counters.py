"""Group commit for :meth:`StateStore.count`: counter changes from concurrent requests share store round trips.

``await batcher.count(group)`` queues one group of changes and waits for its outcome. While a round trip is under
way, newly queued groups wait for the next one, which then carries all of them: under load a thread hop and a
transaction serve many requests, and a group still never sees a store state older than the moment it was queued.

``batcher.later(group)`` queues a change nobody waits for (settling a reservation, releasing a slot): it rides
along with the next awaited round trip, or is written after ``linger_s``. Groups are applied in the order they were
queued, so a release queued before a later request's admission is applied before it. A round trip that fails
fails the awaited groups in it; the deferred ones are queued again (up to ``RETRIES`` times), so a store that is
briefly unavailable does not leave reservations held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from scillm_core.state import Count, Counted

if TYPE_CHECKING:
    from scillm_core.state import StateStore

__all__ = ["CountBatcher"]

log = logging.getLogger("scillm.state")
RETRIES = 3


class CountBatcher:
    def __init__(self, store: Callable[[], StateStore], namespace: str, *, linger_s: float = 0.05,
                 max_groups: int = 256) -> None:
        self.store = store
        self.namespace = namespace
        self.linger_s = linger_s
        self.max_groups = max_groups
        self.queue: list[tuple[tuple[Count, ...], asyncio.Future[Counted] | None, int]] = []
        self.busy = False  # a round trip is under way (what is queued now waits for the next)
        self.waiting = 0  # queued groups someone awaits (the rest are deferred)
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.stats = {"round_trips": 0, "groups": 0, "errors": 0}

    async def count(self, group: Sequence[Count]) -> Counted:
        future: asyncio.Future[Counted] = asyncio.get_running_loop().create_future()
        self.queue.append((tuple(group), future, 0))
        self.waiting += 1
        if not self.busy:  # idle: this caller makes the round trip itself (no task), carrying what is queued
            self.busy = True
            try:
                await self._round_trip()
            finally:
                self.busy = False
                self._wake()
        return await future

    def later(self, group: Sequence[Count]) -> None:
        if not group:
            return
        self.queue.append((tuple(group), None, 0))
        if not self.busy and self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.linger_s, self._linger_done)

    def _linger_done(self) -> None:
        """The linger is over: write what is queued (deferred changes nobody awaits included)."""
        self.timer = None
        if not self.busy and self.queue:
            self.busy = True
            self.task = asyncio.ensure_future(self._drain())

    def _wake(self) -> None:
        """Drain what is queued in a task of its own, unless a round trip is under way (it will, when done)."""
        if not self.busy and self.waiting:
            self.busy = True
            self.task = asyncio.ensure_future(self._drain())
        elif not self.busy and self.queue and self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.linger_s, self._linger_done)

    async def _drain(self) -> None:
        try:
            while self.queue:
                if not await self._round_trip():
                    break
        finally:
            self.busy = False
        self._wake()

    async def _round_trip(self) -> bool:
        """One store call for up to ``max_groups`` queued groups; ``False`` when it failed (its deferred groups
        are queued again, to be retried after the linger)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch, self.queue = self.queue[:self.max_groups], self.queue[self.max_groups:]
        self.waiting -= sum(1 for _, future, _ in batch if future is not None)
        self.stats["round_trips"] += 1
        self.stats["groups"] += len(batch)
        try:
            outcomes = await self.store().count(self.namespace, [group for group, _, _ in batch])
        except Exception as exc:
            self.stats["errors"] += 1
            log.warning("counter round trip failed: %s", type(exc).__name__)
            retry = [(group, None, tries + 1) for group, future, tries in batch if future is None and tries < RETRIES]
            for _, future, _ in batch:
                if future is not None and not future.done():
                    future.set_exception(exc)
            self.queue[:0] = retry  # the deferred changes it carried: again after the linger, ahead of newer ones
            return False
        for (_, future, _), outcome in zip(batch, outcomes, strict=True):
            if future is not None and not future.done():
                future.set_result(outcome)
        return True

    async def flush(self) -> None:
        """Write everything queued (at shutdown; deferred changes that keep failing are dropped after RETRIES)."""
        for _ in range(RETRIES + 2):
            if self.task is not None and not self.task.done():
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.task)
            if not self.queue or self.busy:
                break
            self.busy = True
            try:
                await self._round_trip()
            finally:
                self.busy = False
        if self.timer is not None and not self.queue:
            self.timer.cancel()
            self.timer = None
