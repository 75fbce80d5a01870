"""The output items of translated answers, kept for a day so that the ``item_reference`` inputs clients send back
find them (the Vercel AI SDK's OpenAI provider sends its history so by default).

Keeping is off the request path: an answer's items are queued (a dictionary insert) and a background task writes
what is queued every ``DELAY_S`` in one ``put_many``, so under load one store write carries many answers' items.
A reference looks in what this process has queued or is writing first, then in the store, and once more after
``RETRY_S`` (another instance's write may be landing) before it is a 400. Items are keyed ``<owner>/<item id>``: a
key reads only its own. What is queued when the process stops is written then; a process that dies loses it (as
an expired item would be lost)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from scillm_core import Runtime

__all__ = ["ITEMS", "ITEM_TTL_S", "KeptItems"]

ITEMS = "responses.items"  # the state-store namespace
ITEM_TTL_S = 24 * 3600.0
DELAY_S = 0.02  # a batch's first item waits this long for others
RETRY_S = 0.1  # a reference not found yet is looked up once more after this
BACKLOG = 10_000  # items queued at most; past it an answer's items are not kept (counted)

log = logging.getLogger("scillm")


class KeptItems:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.queued: dict[str, Mapping[str, Any]] = {}
        self.writing: dict[str, Mapping[str, Any]] = {}
        self.task: asyncio.Task[None] | None = None
        self.counts = {"kept": 0, "dropped": 0, "write_errors": 0}

    def keep(self, owner: str, output: Sequence[Mapping[str, Any]]) -> None:
        """Queue an answer's output items (those with an id) for the next write."""
        items = {f"{owner}/{item['id']}": item for item in output if isinstance(item.get("id"), str)}
        if not items:
            return
        if len(self.queued) + len(items) > BACKLOG:
            self.counts["dropped"] += len(items)
            return
        self.queued.update(items)
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        while self.queued:
            await asyncio.sleep(DELAY_S)
            self.writing, self.queued = self.queued, {}
            try:
                await self.runtime.store.put_many(ITEMS, list(self.writing.items()), ttl_s=ITEM_TTL_S)
                self.counts["kept"] += len(self.writing)
            except Exception as exc:  # the answers stand; only a later reference to these items fails
                self.counts["write_errors"] += 1
                log.warning("responses: could not keep %d output item(s) for item_reference: %s",
                            len(self.writing), exc)
            finally:
                self.writing = {}

    async def find(self, owner: str, item_ids: Sequence[str]) -> list[Mapping[str, Any] | None]:
        keys = [f"{owner}/{item_id}" for item_id in item_ids]
        found: list[Mapping[str, Any] | None] = [self.queued.get(k) or self.writing.get(k) for k in keys]
        for attempt in range(2):
            missing = [i for i, item in enumerate(found) if item is None]
            if not missing:
                break
            if attempt:
                await asyncio.sleep(RETRY_S)
            for i, item in zip(missing, await self.runtime.store.get_many(ITEMS, [keys[i] for i in missing]),
                               strict=True):
                found[i] = item
        return found

    async def stop(self) -> None:
        """Write what is queued (at shutdown)."""
        if self.task is not None and not self.task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self.task), 5.0)
            except Exception:
                pass
