"""SQLite (WAL) state store. One connection guarded by a lock, used from the store's own thread: nothing else
(file work, other plugins' ``asyncio.to_thread`` calls) can fill the pool storage waits in."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

if TYPE_CHECKING:
    from scillm_core.state import Change

__all__ = ["SQLiteStore"]

T = TypeVar("T")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (ns TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, expires REAL,
                                 PRIMARY KEY (ns, key));
CREATE TABLE IF NOT EXISTS logs (id INTEGER PRIMARY KEY AUTOINCREMENT, ns TEXT NOT NULL, ts REAL NOT NULL,
                                 value BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS logs_ns ON logs (ns, id);
CREATE TABLE IF NOT EXISTS queue (id INTEGER PRIMARY KEY AUTOINCREMENT, q TEXT NOT NULL, value BLOB NOT NULL,
                                  owner TEXT, touched REAL);
CREATE INDEX IF NOT EXISTS queue_q ON queue (q, owner, id);
CREATE TABLE IF NOT EXISTS slots (pool TEXT NOT NULL, holder TEXT NOT NULL, expires REAL NOT NULL,
                                  PRIMARY KEY (pool, holder));
"""
POLL_S = (0.02, 0.25)  # waits for other processes' writes: first poll, longest poll
_UPSERT = ("INSERT INTO docs (ns, key, value, expires) VALUES (?, ?, ?, ?) "
           "ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, expires = excluded.expires")


class SQLiteStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scillm-store")
        self._wakers: dict[str, asyncio.Event] = {}  # this process's appends/enqueues wake its followers at once

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return fn(self._db)

        return await asyncio.get_running_loop().run_in_executor(self._thread, locked)

    @staticmethod
    def _live(row: tuple[bytes, float | None] | None) -> dict[str, Any] | None:
        if row is None or (row[1] is not None and row[1] <= time.time()):
            return None
        return orjson.loads(row[0])  # type: ignore[no-any-return]

    async def get(self, namespace: str, key: str) -> dict[str, Any] | None:
        return await self._run(lambda db: self._live(db.execute(
            "SELECT value, expires FROM docs WHERE ns = ? AND key = ?", (namespace, key)).fetchone()))

    async def put(self, namespace: str, key: str, value: Mapping[str, Any], *, ttl_s: float | None = None) -> None:
        await self.put_many(namespace, [(key, value)], ttl_s=ttl_s)

    async def put_many(self, namespace: str, documents: Sequence[tuple[str, Mapping[str, Any]]], *,
                       ttl_s: float | None = None) -> None:
        expires = time.time() + ttl_s if ttl_s else None
        rows = [(namespace, key, orjson.dumps(value), expires) for key, value in documents]

        def upsert(db: sqlite3.Connection) -> None:
            db.execute("BEGIN")
            try:
                db.executemany(_UPSERT, rows)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

        await self._run(upsert)

    async def compare_and_set(self, namespace: str, key: str, expected: Mapping[str, Any] | None,
                              value: Mapping[str, Any] | None, *, ttl_s: float | None = None) -> bool:
        def cas(db: sqlite3.Connection) -> bool:
            db.execute("BEGIN IMMEDIATE")
            try:
                current = self._live(db.execute("SELECT value, expires FROM docs WHERE ns = ? AND key = ?",
                                                (namespace, key)).fetchone())
                if current != (dict(expected) if expected is not None else None):
                    db.execute("ROLLBACK")
                    return False
                if value is None:
                    db.execute("DELETE FROM docs WHERE ns = ? AND key = ?", (namespace, key))
                else:
                    db.execute(_UPSERT, (namespace, key, orjson.dumps(value), time.time() + ttl_s if ttl_s else None))
                db.execute("COMMIT")
                return True
            except BaseException:
                db.execute("ROLLBACK")
                raise

        return await self._run(cas)

    async def get_many(self, namespace: str, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        def read(db: sqlite3.Connection) -> list[dict[str, Any] | None]:
            found: dict[str, dict[str, Any] | None] = {}
            for start in range(0, len(keys), 500):
                part = keys[start:start + 500]
                rows = db.execute(f"SELECT key, value, expires FROM docs WHERE ns = ? AND key IN "
                                  f"({','.join('?' * len(part))})", (namespace, *part)).fetchall()
                found.update((key, self._live((value, expires))) for key, value, expires in rows)
            return [found.get(key) for key in keys]

        return await self._run(read) if keys else []

    async def commit(self, changes: Sequence[Change], ack: tuple[str, Sequence[str]] | None = None) -> list[bool]:
        rows = [(change, orjson.dumps(change.value) if change.value is not None else None,
                 orjson.dumps(change.record) if change.log and change.record is not None else None)
                for change in changes]
        acked = [int(i) for i in ack[1]] if ack else []

        def commit(db: sqlite3.Connection) -> list[bool]:
            now = time.time()
            done: list[bool] = []
            db.execute("BEGIN IMMEDIATE")
            try:
                for change, blob, record in rows:
                    current = self._live(db.execute("SELECT value, expires FROM docs WHERE ns = ? AND key = ?",
                                                    (change.namespace, change.key)).fetchone())
                    if current != (dict(change.expected) if change.expected is not None else None):
                        done.append(False)
                        continue
                    if blob is None:
                        db.execute("DELETE FROM docs WHERE ns = ? AND key = ?", (change.namespace, change.key))
                    else:
                        db.execute(_UPSERT, (change.namespace, change.key, blob,
                                             now + change.ttl_s if change.ttl_s else None))
                    if record is not None:
                        db.execute("INSERT INTO logs (ns, ts, value) VALUES (?, ?, ?)", (change.log, now, record))
                    done.append(True)
                if acked:
                    db.execute(f"DELETE FROM queue WHERE q = ? AND id IN ({','.join('?' * len(acked))})",
                               (ack[0] if ack else "", *acked))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return done

        done = await self._run(commit)
        for log in {c.log for c, ok in zip(changes, done, strict=True) if ok and c.log and c.record is not None}:
            self._wake("log:" + log)
        return done

    async def delete(self, namespace: str, key: str) -> bool:
        return await self._run(lambda db: db.execute(
            "DELETE FROM docs WHERE ns = ? AND key = ?", (namespace, key)).rowcount > 0)

    async def scan(self, namespace: str, prefix: str = "", limit: int = 1000) -> list[tuple[str, dict[str, Any]]]:
        def scan(db: sqlite3.Connection) -> list[tuple[str, dict[str, Any]]]:
            rows = db.execute(
                "SELECT key, value, expires FROM docs WHERE ns = ? AND substr(key, 1, ?) = ? ORDER BY key LIMIT ?",
                (namespace, len(prefix), prefix, limit)).fetchall()
            return [(key, doc) for key, value, expires in rows if (doc := self._live((value, expires))) is not None]

        return await self._run(scan)

    async def append(self, namespace: str, record: Mapping[str, Any]) -> None:
        blob = orjson.dumps(record)
        await self._run(lambda db: db.execute("INSERT INTO logs (ns, ts, value) VALUES (?, ?, ?)",
                                              (namespace, time.time(), blob)))
        self._wake("log:" + namespace)

    async def append_many(self, namespace: str, records: Sequence[Mapping[str, Any]]) -> None:
        """All of ``records`` in one statement (one transaction, one release of the GIL): a row-by-row insert would
        commit, or hand the GIL to and from the event loop's thread, once per row."""
        batch = orjson.dumps(list(records)).decode()  # text: SQLite 3.45+ reads a BLOB argument as JSONB
        await self._run(lambda db: db.execute(
            "INSERT INTO logs (ns, ts, value) SELECT ?, ?, value FROM json_each(?)", (namespace, time.time(), batch)))
        self._wake("log:" + namespace)

    async def tail(self, namespace: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self._run(lambda db: db.execute(
            "SELECT value FROM logs WHERE ns = ? ORDER BY id DESC LIMIT ?", (namespace, limit)).fetchall())
        return [orjson.loads(value) for (value,) in reversed(rows)]

    async def trim(self, namespace: str, keep: int) -> int:
        return await self._run(lambda db: db.execute(
            "DELETE FROM logs WHERE ns = ? AND id <= (SELECT id FROM logs WHERE ns = ? ORDER BY id DESC LIMIT 1 "
            "OFFSET ?)", (namespace, namespace, max(0, keep))).rowcount)

    # -- following a log, work queues ------------------------------------------------------------------------------

    def _wake(self, name: str) -> None:
        event = self._wakers.pop(name, None)
        if event is not None:
            event.set()

    async def _poll(self, name: str, block_s: float, fetch: Callable[[], Any]) -> Any:
        """``fetch()`` until it returns something or ``block_s`` passed; woken at once by this process's writes,
        polling (with backoff) for other processes'."""
        deadline = time.monotonic() + block_s
        pause = POLL_S[0]
        while True:
            found = await fetch()
            left = deadline - time.monotonic()
            if found or left <= 0:
                return found
            event = self._wakers.setdefault(name, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), min(pause, left))
            except TimeoutError:
                pause = min(pause * 2, POLL_S[1])

    async def follow(self, namespace: str, after: str = "", limit: int = 100,
                     block_s: float = 0.0) -> list[tuple[str, dict[str, Any]]]:
        start = int(after) if after else 0

        async def fetch() -> list[tuple[str, dict[str, Any]]]:
            rows = await self._run(lambda db: db.execute(
                "SELECT id, value FROM logs WHERE ns = ? AND id > ? ORDER BY id LIMIT ?",
                (namespace, start, limit)).fetchall())
            return [(str(i), orjson.loads(value)) for i, value in rows]

        return await self._poll("log:" + namespace, block_s, fetch)  # type: ignore[no-any-return]

    async def enqueue(self, queue: str, entries: Sequence[Mapping[str, Any]]) -> list[str]:
        rows = [(queue, orjson.dumps(entry)) for entry in entries]

        def insert(db: sqlite3.Connection) -> list[str]:
            db.execute("BEGIN IMMEDIATE")
            try:
                ids = [str(db.execute("INSERT INTO queue (q, value) VALUES (?, ?)", row).lastrowid) for row in rows]
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return ids

        ids = await self._run(insert)
        self._wake("queue:" + queue)
        return ids

    async def _claim(self, queue: str, consumer: str, count: int,
                     idle_s: float | None) -> list[tuple[str, dict[str, Any]]]:
        """Claim unheld entries (``idle_s`` None) or entries held but untouched for ``idle_s``, in one
        ``BEGIN IMMEDIATE`` transaction (no other connection or process can interleave)."""
        def claim(db: sqlite3.Connection) -> list[tuple[str, dict[str, Any]]]:
            now = time.time()
            db.execute("BEGIN IMMEDIATE")
            try:
                if idle_s is None:
                    rows = db.execute("SELECT id, value FROM queue WHERE q = ? AND owner IS NULL ORDER BY id LIMIT ?",
                                      (queue, count)).fetchall()
                else:
                    rows = db.execute("SELECT id, value FROM queue WHERE q = ? AND owner IS NOT NULL AND touched <= ? "
                                      "ORDER BY id LIMIT ?", (queue, now - idle_s, count)).fetchall()
                if rows:
                    marks = ",".join("?" * len(rows))
                    db.execute(f"UPDATE queue SET owner = ?, touched = ? WHERE id IN ({marks})",
                               (consumer, now, *(i for i, _ in rows)))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return [(str(i), orjson.loads(value)) for i, value in rows]

        return await self._run(claim)

    async def take(self, queue: str, consumer: str, count: int, *,
                   block_s: float = 0.0) -> list[tuple[str, dict[str, Any]]]:
        return await self._poll("queue:" + queue, block_s,  # type: ignore[no-any-return]
                                lambda: self._claim(queue, consumer, count, None))

    async def reclaim(self, queue: str, consumer: str, idle_s: float,
                      count: int) -> list[tuple[str, dict[str, Any]]]:
        return await self._claim(queue, consumer, count, idle_s)

    async def touch(self, queue: str, consumer: str, ids: Sequence[str]) -> int:
        numbers = [int(i) for i in ids]
        marks = ",".join("?" * len(numbers))
        return await self._run(lambda db: db.execute(  # type: ignore[no-any-return]
            f"UPDATE queue SET touched = ? WHERE q = ? AND owner = ? AND id IN ({marks})",
            (time.time(), queue, consumer, *numbers)).rowcount) if numbers else 0

    async def ack(self, queue: str, ids: Sequence[str]) -> None:
        numbers = [int(i) for i in ids]
        marks = ",".join("?" * len(numbers))
        if numbers:
            await self._run(lambda db: db.execute(f"DELETE FROM queue WHERE q = ? AND id IN ({marks})",
                                                  (queue, *numbers)))

    async def queue_depth(self, queue: str) -> dict[str, int]:
        waiting, claimed = await self._run(lambda db: db.execute(
            "SELECT count(*) - count(owner), count(owner) FROM queue WHERE q = ?", (queue,)).fetchone())
        return {"waiting": int(waiting or 0), "claimed": int(claimed or 0)}

    async def acquire_slot(self, pool: str, holder: str, limit: int, ttl_s: float) -> bool:
        return (await self.exchange_slots(pool, (), (holder,), limit, ttl_s))[0]

    async def exchange_slots(self, pool: str, release: Sequence[str], acquire: Sequence[str], limit: int,
                             ttl_s: float) -> list[bool]:
        def exchange(db: sqlite3.Connection) -> list[bool]:
            now = time.time()
            taken: list[bool] = []
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM slots WHERE pool = ? AND expires <= ?", (pool, now))
                db.executemany("DELETE FROM slots WHERE pool = ? AND holder = ?", [(pool, h) for h in release])
                (held,) = db.execute("SELECT count(*) FROM slots WHERE pool = ?", (pool,)).fetchone()
                for holder in acquire:
                    taken.append(held < limit)
                    if held < limit:
                        db.execute("INSERT OR REPLACE INTO slots (pool, holder, expires) VALUES (?, ?, ?)",
                                   (pool, holder, now + ttl_s))
                        held += 1
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return taken

        return await self._run(exchange)

    async def renew_slots(self, pool: str, holders: Sequence[str], ttl_s: float) -> int:
        marks = ",".join("?" * len(holders))
        return await self._run(lambda db: db.execute(  # type: ignore[no-any-return]
            f"UPDATE slots SET expires = ? WHERE pool = ? AND expires > ? AND holder IN ({marks})",
            (time.time() + ttl_s, pool, time.time(), *holders)).rowcount) if holders else 0

    async def release_slots(self, pool: str, holders: Sequence[str]) -> None:
        marks = ",".join("?" * len(holders))
        if holders:
            await self._run(lambda db: db.execute(f"DELETE FROM slots WHERE pool = ? AND holder IN ({marks})",
                                                  (pool, *holders)))

    async def slots_held(self, pool: str) -> int:
        return await self._run(lambda db: int(db.execute(
            "SELECT count(*) FROM slots WHERE pool = ? AND expires > ?", (pool, time.time())).fetchone()[0]))

    async def health(self) -> dict[str, Any]:
        try:
            await self._run(lambda db: db.execute("SELECT 1").fetchone())
            return {"backend": "sqlite", "reachable": True, "path": str(self.path)}
        except Exception as exc:
            return {"backend": "sqlite", "reachable": False, "path": str(self.path), "error": type(exc).__name__}

    async def close(self) -> None:
        await self._run(lambda db: db.close())
        self._thread.shutdown(wait=False)
