"""Run records: a document per run in the state store (so the index and status survive a restart and are shared
by every instance) plus the run directory (``events.jsonl``, ``diff.patch``, ``result.json``).

A record names the process that drives the run (:meth:`scillm_exec.SharedRuns.stamp`). When a scillm restarts, the
runs its previous process left in flight are finalised ``error`` (``interrupted``) instead of staying ``running``
forever: at start-up, and on read for any record whose driver is gone (:meth:`scillm_exec.SharedRuns.driver_gone`).

The run dir keeps a copy of the record (``status.json``, :meth:`scillm_exec.SharedRuns.keep`) as exec runs do: a read
on this machine answers from it, and while the state store is down answers it as it stands, marked ``degraded``
(:meth:`scillm_exec.SharedRuns.local`); a run whose driver is gone is finalised only once the store answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from scillm_exec import EventLog, SharedRuns, Worktree, remove_worktree

from scillm_core import errors

if TYPE_CHECKING:
    from scillm_core import Runtime

__all__ = ["RUN_ID", "Records", "TERMINAL", "blocking", "write_json"]

log = logging.getLogger("scillm.opencode")
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
TERMINAL = ("completed", "failed", "timeout", "error", "aborted")
STORE_TEXT_LIMIT = 1 << 20   # the store keeps at most this much of a run's diff / text; the run dir keeps all
_FILES = ThreadPoolExecutor(max_workers=2, thread_name_prefix="scillm-opencode-files")
T = TypeVar("T")


async def blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run file work (result documents, diffs, skill copies) off the event loop, in this plugin's own small pool:
    never in the default one the state store uses."""
    return await asyncio.get_running_loop().run_in_executor(_FILES, functools.partial(fn, *args))


def write_json(path: Path, doc: Any) -> None:
    tmp = path.with_suffix(f".{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2, default=str))
    tmp.replace(path)


class Records:
    def __init__(self, runtime: Runtime, namespace: str, dirname: str, redact: Any,
                 shared: SharedRuns) -> None:
        self.runtime = runtime
        self.namespace = namespace
        self.shared = shared
        self.root = runtime.config.data_dir / "opencode" / dirname
        self.redact = redact  # () -> secrets to scrub from what is stored

    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id

    def stamp(self) -> dict[str, Any]:
        return self.shared.stamp()

    def _scrub(self, doc: dict[str, Any]) -> dict[str, Any]:
        raw = orjson.dumps(doc, default=str)
        for secret in self.redact():
            raw = raw.replace(secret.encode(), b"[redacted]")
        return orjson.loads(raw)  # type: ignore[no-any-return]

    def stored(self, doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The document with secrets scrubbed, and as the store keeps it (long text cut; result.json keeps it)."""
        doc = self._scrub(doc)
        stored = dict(doc)
        for key in ("diff", "assistant_text"):
            value = stored.get(key)
            if isinstance(value, str) and len(value) > STORE_TEXT_LIMIT:
                stored[key] = value[:STORE_TEXT_LIMIT]
                stored[f"{key}_truncated"] = True
        return doc, stored

    async def save(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Store the document (secrets scrubbed; long text cut for the store, kept whole in result.json), and the
        same in the run dir's status.json when this machine has the run dir. A store that is down never stops a
        run: the final record goes again with the end of the run's events (:meth:`SharedRuns.drive`)."""
        doc, stored = self.stored(doc)
        run_dir = self.run_dir(doc["run_id"])
        if run_dir.is_dir():
            with contextlib.suppress(OSError):  # the store still has it
                await blocking(self.shared.keep, run_dir, stored)
        with contextlib.suppress(Exception):  # the run dir still has it; a store outage must not lose the run
            await self.runtime.store.put(self.namespace, doc["run_id"], stored)
        return doc

    async def write_result(self, doc: dict[str, Any]) -> None:
        run_dir = self.run_dir(doc["run_id"])
        run_dir.mkdir(parents=True, exist_ok=True)
        await blocking(write_json, run_dir / "result.json", doc)

    async def load(self, run_id: str) -> dict[str, Any]:
        """A run's document: this machine's run dir (result.json, else status.json), else the store's record; 404
        when unknown. A record whose driver is gone is finalised ``error: interrupted`` first (:meth:`settle`);
        while the store is down, status.json is answered as it stands, marked (:meth:`SharedRuns.local`)."""
        if not RUN_ID.match(run_id):
            raise errors.NotFound(f"no run {errors.quote(run_id)}")
        doc = await self.shared.local(self.run_dir(run_id), self.settle, lambda path: blocking(path.read_bytes))
        if doc is not None:
            return doc
        doc = await self.runtime.store.get(self.namespace, run_id)
        if doc is None:
            raise errors.NotFound(f"no run {errors.quote(run_id)}")
        return await self.settle(doc)

    async def settle(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The record as it stands, or finalised ``error: interrupted`` when the process driving it is gone."""
        return await self.interrupt(doc) if await self.gone(doc) else doc

    async def exists(self, run_id: str) -> bool:
        return self.run_dir(run_id).exists() or await self.runtime.store.get(self.namespace, run_id) is not None

    async def index(self, limit: int, *, owner: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """The newest runs (only ``owner``'s, when given), a run whose driver is gone finalised first; and, while the
        state store is down, why the list is what this machine's run dirs hold, as it stands
        (:meth:`SharedRuns.records`), else ``None``."""
        docs, degraded = await self.shared.records(self.namespace, self.root, RUN_ID, blocking)
        docs = [doc for doc in docs if owner is None or doc.get("owner") == owner]
        docs.sort(key=lambda d: d.get("created_at") if isinstance(d.get("created_at"), (int, float)) else 0,
                  reverse=True)
        out: list[dict[str, Any]] = []
        for doc in docs[:limit]:
            if degraded is None and await self.gone(doc):
                doc = await self.interrupt(doc)
            out.append({k: doc.get(k) for k in ("run_id", "status", "agent", "caller", "owner", "workspace",
                                                 "cwd", "created_at", "finished_at", "error") if k in doc})
        return out, degraded

    async def gone(self, doc: dict[str, Any]) -> bool:
        """Whether the run is still ``running`` by its record while the process that drove it is gone."""
        return doc.get("status") not in TERMINAL and await self.shared.driver_gone(doc)

    async def interrupt(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Finalise a run whose driver died: ``error`` (interrupted), a terminal event, result.json, the store. The
        store's record is read first: a 503 while the store is down (nothing is finalised before it answers), and a
        record another reader finalised already is answered as it is."""
        stored = await self.runtime.store.get(self.namespace, doc["run_id"])
        if stored is not None and stored.get("status") in TERMINAL:
            return stored
        doc = dict(doc)
        doc.update(status="error", error="interrupted: scillm stopped while the run was in flight",
                   finished_at=time.time())
        await self._drop_worktree(doc)
        run_dir = self.run_dir(doc["run_id"])
        doc = await self.save(doc)
        if run_dir.is_dir():
            await self.write_result(doc)
        log = EventLog(run_dir / "events.jsonl") if run_dir.is_dir() else None
        await self.shared.end_interrupted(doc["run_id"], log, {"type": "run_completed", "node": None,
                                                               "status": "error", "error": doc["error"]},
                                          {"type": "end", "run_id": doc["run_id"], "status": "error",
                                           "seq": log.seq + 1 if log is not None else None})
        return doc

    async def _drop_worktree(self, doc: dict[str, Any]) -> None:
        """The interrupted run's worktree goes too (unless worktrees are kept): its checkout and its entry in the
        caller's repository."""
        from scillm_opencode.config import opencode_config

        path, repo = doc.get("worktree"), doc.get("repo")
        if not path or not repo or opencode_config(self.runtime).keep_worktrees:
            return
        with contextlib.suppress(Exception):
            await remove_worktree(Worktree(path=Path(path), workdir=Path(path), repo=Path(repo),
                                           base=str(doc.get("base_commit") or "")))
        doc["worktree"] = None

    async def recover(self) -> None:
        """At start-up, and once the state store answers when it did not then: finalise the runs whose process is
        gone (a scillm killed or restarted; :meth:`SharedRuns.recover`)."""
        await self.shared.recover(self._sweep)

    async def _sweep(self) -> bool:
        """Finalise the stored runs whose process is gone; whether the store let every one through."""
        through = True
        for _, doc in await self.runtime.store.scan(self.namespace, "", limit=100_000):
            try:
                if await self.gone(doc):
                    await self.interrupt(doc)
            except errors.StateUnavailable:
                through = False
            except Exception as exc:  # one unreadable run never stops the others
                log.warning("run %s: not finalised: %s", str(doc.get("run_id"))[:80], type(exc).__name__)
        return through
