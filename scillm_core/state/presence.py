"""Which scillm processes share this state store: each one keeps a document with a TTL under ``instances`` alive
while it runs, so ``GET /v1/scillm/health`` lists the live ones and shared limits know how many share them.

What waits for the store to answer again (settling the runs a dead process left ``running``) is called after each
beat that reaches it (:meth:`Presence.when_reachable`), instead of polling the store itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from scillm_core.version import __version__

if TYPE_CHECKING:
    from scillm_core.context import Runtime

__all__ = ["INSTANCES", "Presence"]

INSTANCES = "instances"
log = logging.getLogger("scillm.state")


class Presence:
    def __init__(self, runtime: Runtime, every_s: float = 5.0) -> None:
        self.runtime = runtime
        self.every_s = every_s
        self.task: asyncio.Task[None] | None = None
        self.live = 1  # processes seen at the last beat (this one included)
        self.listeners: list[Callable[[], None]] = []

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._beat())

    async def _beat(self) -> None:
        runtime = self.runtime
        doc = {"instance_id": runtime.instance_id, "pid": os.getpid(), "version": __version__,
               "started_at": runtime.started_at}
        while True:
            try:
                await runtime.store.put(INSTANCES, runtime.instance_id, {**doc, "seen_at": time.time()},
                                        ttl_s=3 * self.every_s)
                self.live = max(1, len(await runtime.store.scan(INSTANCES, limit=10_000)))
            except Exception as exc:  # the store is down: keep the last count, try again next beat
                log.debug("presence beat failed: %s", type(exc).__name__)
            else:
                for listener in list(self.listeners):
                    try:
                        listener()
                    except Exception as exc:  # a listener's bug never stops the beat
                        log.warning("presence listener failed: %s", type(exc).__name__)
            await asyncio.sleep(self.every_s)

    def when_reachable(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` (quick: it starts what it needs as a task) after each beat that reached the store,
        this process's own presence there again; returns how to stop."""
        self.listeners.append(listener)

        def stop() -> None:
            if listener in self.listeners:
                self.listeners.remove(listener)

        return stop

    async def instances(self) -> list[dict[str, Any]]:
        return [doc for _, doc in await self.runtime.store.scan(INSTANCES, limit=10_000)]

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
            self.task = None
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.runtime.config.state.timeout_s):
                await self.runtime.store.delete(INSTANCES, self.runtime.instance_id)
