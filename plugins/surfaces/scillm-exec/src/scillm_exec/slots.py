"""Run slots shared fairly between keys: ``[exec] max_concurrency`` runs at once, and a freed slot goes to the key
(owner) that has waited longest since its last one, not to whichever run queued first. So one key's burst of
runs queues behind its own runs only: another key's run starts at the next free slot."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import AsyncIterator

__all__ = ["FairSlots"]


class FairSlots:
    def __init__(self, size: int) -> None:
        self.size = self.free = max(1, size)
        self.waiting: dict[str, deque[asyncio.Future[None]]] = {}  # owner -> its runs waiting, in order
        self.last: dict[str, int] = {}  # owner -> when it was last given a slot (a grant number)
        self._grants = itertools.count(1)

    @contextlib.asynccontextmanager
    async def slot(self, owner: str) -> AsyncIterator[None]:
        """Hold one slot for ``owner`` (waiting for it in round-robin order among the owners waiting)."""
        if self.free > 0 and not self.waiting:
            self.free -= 1
            self.last[owner] = next(self._grants)
        else:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiting.setdefault(owner, deque()).append(turn)
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release()  # given the slot as it was cancelled: pass it on
                else:
                    queue = self.waiting.get(owner)
                    if queue is not None and turn in queue:
                        queue.remove(turn)
                        if not queue:
                            del self.waiting[owner]
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        """Give the freed slot to the waiting owner whose last slot is the oldest (never had one: first)."""
        while self.waiting:
            owner = min(self.waiting, key=lambda o: self.last.get(o, 0))
            queue = self.waiting[owner]
            turn = queue.popleft()
            if not queue:
                del self.waiting[owner]
            if not turn.done():
                self.last[owner] = next(self._grants)
                turn.set_result(None)
                return
        self.free += 1
        if self.free == self.size:
            self.last.clear()  # nobody holds or waits: nothing to be fair about
