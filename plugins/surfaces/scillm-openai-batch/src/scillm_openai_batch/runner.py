"""OpenAI batches on the durable batch engine: one engine run per batch, driven by whichever process holds its lease.

A batch is a document in the state store (the OpenAI batch object plus scillm's ``_lease``). Every change to it is
a compare-and-set, so processes (``--workers``, restarts, crashes) never overwrite each other. The process that holds
the lease runs the batch with :func:`scillm_batch.engine.run_batch` (stored results, resume, exactly one result per
request) and renews the lease every third of ``lease_s``; a process that stops cleanly gives its leases back, and one
that crashed loses them when they run out. Every process looks for active batches without a live lease at startup
and every ``lease_s``, and takes them over: the engine reuses every stored result and calls the model only for
requests that have none. A cancel sets ``cancelling`` (in any process); the lease holder sees it and stops.
When the engine is done, the output file gets one line per successful request and the error file one line per
failed or never-run request, in input order: exactly one line per input line between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import orjson
from attrs import define, field
from scillm_batch.engine import BatchItem, BatchSpec, Lane, PoolConfig, run_batch, stored_results

from scillm_core import MASTER, Identity, Runtime, errors, require_visible
from scillm_core.identity import MASTER_OWNER, owner_identity
from scillm_openai_batch.files import ENDPOINTS, FileStore, read_batch_lines

__all__ = ["ACTIVE", "BatchRunner", "OpenAIBatchConfig"]

log = logging.getLogger("scillm.openai_batch")
BATCHES_NS = "openai-batches"
ACTIVE_NS = "openai-batches-active"  # ids of batches not finished yet: what the takeover scan reads
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
WINDOW_S = 24 * 3600.0


@attrs.frozen(kw_only=True)
class OpenAIBatchConfig:
    """``[openai_batch]``: upload limits and how batches run."""

    max_file_mb: float = attrs.field(default=100.0, validator=attrs.validators.gt(0))
    max_lines: int = attrs.field(default=50_000, validator=attrs.validators.ge(1))
    concurrency: int = attrs.field(default=16, validator=attrs.validators.ge(1))  # a pool's lanes have their own
    item_timeout_s: float = attrs.field(default=600.0, validator=attrs.validators.gt(0))  # per upstream call
    lease_s: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))


@define
class Live:
    """A batch this process runs: its task and its counts so far."""

    task: asyncio.Task[None] | None = None
    completed: int = 0
    failed: int = 0
    stopping_for: str | None = None  # "cancel" when a cancel stopped it


@define
class BatchRunner:
    runtime: Runtime
    config: OpenAIBatchConfig
    files: FileStore
    pools: Mapping[str, PoolConfig]
    owner: str = field(factory=lambda: secrets.token_hex(8))
    clock: Callable[[], float] = time.time
    live: dict[str, Live] = field(factory=dict)
    scanner: asyncio.Task[None] | None = None
    identities: dict[str, Identity] = field(factory=dict)  # who created the batches this process started

    # -- the document ---------------------------------------------------------------------------------------------

    async def get(self, batch_id: str) -> dict[str, Any]:
        doc = await self.runtime.store.get(BATCHES_NS, batch_id) if batch_id.startswith("batch_") else None
        if doc is None:
            raise errors.NotFound(f"no batch {errors.quote(batch_id)}", param="batch_id")
        return doc

    async def update(self, batch_id: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]) \
            -> dict[str, Any] | None:
        """Apply ``change`` with compare-and-set until it sticks; ``None`` from ``change`` leaves the doc alone
        (the result is then ``None``)."""
        store = self.runtime.store
        while True:
            current = await store.get(BATCHES_NS, batch_id)
            if current is None:
                return None
            new = change(dict(current))
            if new is None:
                return None
            if await store.compare_and_set(BATCHES_NS, batch_id, current, new):
                return new

    async def get_for(self, batch_id: str, identity: Identity) -> dict[str, Any]:
        """:meth:`get` for a caller: 404 as well when the batch belongs to another key."""
        doc = await self.get(batch_id)
        require_visible(identity, doc.get("_owner"), f"batch {errors.quote(batch_id)}")
        return doc

    async def owner_identity(self, doc: Mapping[str, Any]) -> Identity:
        """Who the batch's calls are charged to and limited as: the key that created it, as it is now (a batch
        taken over after a restart asks the key store; a revoked key's batch fails)."""
        owner = str(doc.get("_owner") or MASTER_OWNER)
        known = self.identities.get(str(doc["id"]))
        if known is not None or owner == MASTER_OWNER:
            return known or MASTER
        return await owner_identity(self.runtime, owner)

    def view(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """The batch object as clients see it, with this process's live counts while it runs the batch."""
        out = {k: v for k, v in doc.items() if not k.startswith("_")}
        live = self.live.get(str(doc["id"]))
        if live is not None and doc["status"] in ACTIVE:
            out["request_counts"] = {**out["request_counts"], "completed": live.completed, "failed": live.failed}
        return out

    # -- create / cancel ------------------------------------------------------------------------------------------

    async def create(self, input_file: Mapping[str, Any], endpoint: str, metadata: Mapping[str, str] | None,
                     caller: str | None, identity: Identity = MASTER) -> dict[str, Any]:
        now = int(self.clock())
        batch_id = "batch_" + secrets.token_hex(12)
        checked = input_file["_batch"]
        doc = {"id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None,
               "input_file_id": input_file["id"], "completion_window": "24h", "status": "in_progress",
               "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": now,
               "expires_at": now + int(WINDOW_S), "finalizing_at": None, "completed_at": None, "failed_at": None,
               "expired_at": None, "cancelling_at": None, "cancelled_at": None,
               "request_counts": {"total": checked["lines"], "completed": 0, "failed": 0},
               "metadata": dict(metadata) if metadata is not None else None, "model": checked["model"],
               "_caller": caller, "_lease": None, "_owner": identity.owner}
        self.identities[batch_id] = identity
        await self.runtime.store.put(ACTIVE_NS, batch_id, {"created_at": now})
        await self.runtime.store.put(BATCHES_NS, batch_id, doc)
        await self.adopt(batch_id)
        return doc

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        now = int(self.clock())

        def cancelling(doc: dict[str, Any]) -> dict[str, Any] | None:
            if doc["status"] in ("cancelling", "cancelled"):
                return None
            if doc["status"] not in ACTIVE or doc["status"] == "finalizing":
                raise errors.Conflict(f"batch {errors.quote(batch_id)} is {doc['status']}; there is nothing "
                                      f"left to cancel",
                                      param="batch_id")
            return {**doc, "status": "cancelling", "cancelling_at": now}

        await self.get(batch_id)
        await self.update(batch_id, cancelling)
        live = self.live.get(batch_id)
        if live is not None and live.task is not None and not live.task.done():
            live.stopping_for = "cancel"
            live.task.cancel()
        elif live is None:
            await self.adopt(batch_id)  # nobody runs it here: finish the cancel now if no live lease elsewhere
        return await self.get(batch_id)

    # -- leases and takeover -------------------------------------------------------------------------------------

    def _claim(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        lease = doc.get("_lease")
        if doc["status"] not in ACTIVE:
            return None
        if lease and lease["owner"] != self.owner and lease["until"] > self.clock():
            return None  # another process runs it
        return {**doc, "_lease": {"owner": self.owner, "until": self.clock() + self.config.lease_s}}

    async def adopt(self, batch_id: str) -> bool:
        """Take the batch over if it is active and nobody holds a live lease on it; start running it."""
        if batch_id in self.live:
            return True
        claimed = await self.update(batch_id, self._claim)
        if claimed is None:
            if (await self.runtime.store.get(BATCHES_NS, batch_id) or {}).get("status") not in ACTIVE:
                await self.runtime.store.delete(ACTIVE_NS, batch_id)
            return False
        live = self.live[batch_id] = Live()
        live.task = asyncio.ensure_future(self._drive(batch_id, live))
        return True

    async def scan(self) -> None:
        for batch_id, _ in await self.runtime.store.scan(ACTIVE_NS, limit=100_000):
            try:
                await self.adopt(batch_id)
            except Exception:  # one broken batch must not stop the others from being taken over
                log.warning("could not take over batch %s", batch_id, exc_info=True)

    async def start(self) -> None:
        async def keep_scanning() -> None:
            while True:
                await self.scan()
                await asyncio.sleep(self.config.lease_s)

        self.scanner = asyncio.ensure_future(keep_scanning())

    async def stop(self) -> None:
        """Stop running batches without finishing them and give their leases back (the next start resumes)."""
        tasks = [t for t in (self.scanner, *(live.task for live in self.live.values())) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- running one batch -----------------------------------------------------------------------------------------

    async def _drive(self, batch_id: str, live: Live) -> None:
        heartbeat = asyncio.ensure_future(self._heartbeat(batch_id, live))
        try:
            doc = await self.get(batch_id)
            if doc["status"] == "cancelling":
                await self._finish(batch_id, "cancelled")
            elif doc["status"] == "finalizing" or self.clock() >= doc["expires_at"]:
                await self._finish(batch_id, "expired" if self.clock() >= doc["expires_at"] else "completed")
            else:
                await self._run(doc, live)
                heartbeat.cancel()  # done running: a cancel arriving now is too late to matter
                await self._finish(batch_id, "expired" if self.clock() >= doc["expires_at"] else "completed")
        except asyncio.CancelledError:
            if live.stopping_for == "cancel":
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._finish(batch_id, "cancelled"))
            else:  # shutting down: give the lease back so the next start resumes at once
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.update(batch_id, self._release))
            raise
        except Exception as exc:
            log.exception("batch %s failed", batch_id)
            await self._fail(batch_id, exc)
        finally:
            heartbeat.cancel()
            self.live.pop(batch_id, None)

    def _release(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        lease = doc.get("_lease")
        return {**doc, "_lease": None} if lease and lease["owner"] == self.owner else None

    async def _heartbeat(self, batch_id: str, live: Live) -> None:
        """Renew the lease and persist the counts; stop the run when a cancel came through another process or the
        lease was lost."""
        while True:
            await asyncio.sleep(self.config.lease_s / 3)
            lost = False

            def renew(doc: dict[str, Any]) -> dict[str, Any] | None:
                nonlocal lost
                lease = doc.get("_lease")
                if not lease or lease["owner"] != self.owner:
                    lost = True
                    return None
                counts = {**doc["request_counts"], "completed": live.completed, "failed": live.failed}
                return {**doc, "request_counts": counts,
                        "_lease": {"owner": self.owner, "until": self.clock() + self.config.lease_s}}

            doc = await self.update(batch_id, renew)
            if lost or (doc is not None and doc["status"] == "cancelling"):
                live.stopping_for = None if lost else "cancel"
                if live.task is not None:
                    live.task.cancel()
                return

    async def _run(self, doc: Mapping[str, Any], live: Live) -> None:
        lines = await asyncio.to_thread(read_batch_lines, self.files.path(str(doc["input_file_id"])))
        model = str(doc["model"])
        if model in self.pools:
            pool, lanes = model, self.pools[model].lanes
        else:
            pool, lanes = model, (Lane(model=model, name=model, max_concurrency=self.config.concurrency,
                                       timeout_s=self.config.item_timeout_s),)
        items = tuple(BatchItem(index=i, item_id=line.custom_id,
                                body={k: v for k, v in line.body.items() if k != "model"})
                      for i, line in enumerate(lines))
        spec = BatchSpec(batch_id=str(doc["id"]), pool=pool, lanes=lanes, items=items,
                         timeout_s=max(float(doc["expires_at"]) - self.clock(), 0.001),
                         caller=doc.get("_caller") or "openai-batch", kind=ENDPOINTS[str(doc["endpoint"])],
                         identity=await self.owner_identity(doc))

        async def count(event: str, data: Mapping[str, Any]) -> None:
            if event == "item_completed":
                live.completed += 1
            elif event == "item_failed":
                live.failed += 1

        await run_batch(spec, self.runtime, count)

    async def _finish(self, batch_id: str, status: str) -> None:
        """Write the output and error files from the stored results and close the batch as ``status``."""
        now = int(self.clock())
        marked = await self.update(batch_id, lambda d: {**d, "status": "finalizing", "finalizing_at": now}
                                   if d["status"] in ACTIVE and d["status"] != "finalizing" else d)
        doc = marked or await self.get(batch_id)
        lines = await asyncio.to_thread(read_batch_lines, self.files.path(str(doc["input_file_id"])))
        results = await stored_results(self.runtime, batch_id)
        never_ran = {"cancelled": ("batch_cancelled", "This request was not run before the batch was cancelled."),
                     "expired": ("batch_expired", "This request was not run before the batch's 24h window ended.")
                     }.get(status, ("batch_failed", "This request was not run."))
        output, failed_lines = [], []
        usage = {"input_tokens": 0, "output_tokens": 0}
        for line in lines:
            result = results.get(line.custom_id)
            request_id = "batch_req_" + hashlib.sha256(f"{batch_id}\0{line.custom_id}".encode()).hexdigest()[:24]
            entry: dict[str, Any] = {"id": request_id, "custom_id": line.custom_id}
            if result is not None and result.get("ok"):
                body = result["response"]
                tokens = body.get("usage") or {}
                usage["input_tokens"] += int(tokens.get("prompt_tokens") or 0)
                usage["output_tokens"] += int(tokens.get("completion_tokens") or 0)
                output.append({**entry, "response": {"status_code": 200, "request_id": request_id, "body": body},
                               "error": None})
            elif result is not None:
                status_code = int(result.get("status_code") or 500)
                failed_lines.append({**entry, "response": {"status_code": status_code, "request_id": request_id,
                                                           "body": {"error": {
                                                               "message": result.get("error"),
                                                               "type": _error_type(status_code),
                                                               "param": None, "code": result.get("error_code")}}},
                                     "error": None})
            else:
                code, message = never_ran
                failed_lines.append({**entry, "response": None, "error": {"code": code, "message": message}})
        owner = str(doc.get("_owner") or MASTER_OWNER)
        out_file = await self._save(output, f"{batch_id}_output.jsonl", owner)
        err_file = await self._save(failed_lines, f"{batch_id}_error.jsonl", owner)
        done = int(self.clock())
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[status]

        def close(d: dict[str, Any]) -> dict[str, Any]:
            return {**d, "status": status, stamp: done, "output_file_id": out_file, "error_file_id": err_file,
                    "request_counts": {"total": len(lines), "completed": len(output), "failed": len(failed_lines)},
                    "usage": {"input_tokens": usage["input_tokens"], "output_tokens": usage["output_tokens"],
                              "total_tokens": usage["input_tokens"] + usage["output_tokens"],
                              "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens_details": {"reasoning_tokens": 0}},
                    "_lease": None}

        await self.update(batch_id, close)
        await self.runtime.store.delete(ACTIVE_NS, batch_id)

    async def _save(self, entries: list[dict[str, Any]], filename: str, owner: str) -> str | None:
        if not entries:
            return None
        doc = await self.files.save_output([orjson.dumps(e) + b"\n" for e in entries], filename, owner)
        return str(doc["id"])

    async def _fail(self, batch_id: str, exc: BaseException) -> None:
        now = int(self.clock())
        message = exc.message if isinstance(exc, errors.ScillmError) else f"internal error ({type(exc).__name__})"

        def failed(d: dict[str, Any]) -> dict[str, Any]:
            return {**d, "status": "failed", "failed_at": now, "_lease": None, "errors": {
                "object": "list", "data": [{"code": "batch_failed", "message": message, "param": None,
                                            "line": None}]}}

        await self.update(batch_id, failed)
        await self.runtime.store.delete(ACTIVE_NS, batch_id)


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status == 401:
        return "authentication_error"
    return "invalid_request_error" if 400 <= status < 500 else "server_error"
