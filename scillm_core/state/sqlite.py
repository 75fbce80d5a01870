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
from typing import Any, TypeVar

import orjson

__all__ = ["SQLiteStore"]

T = TypeVar("T")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (ns TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, expires REAL,
                                 PRIMARY KEY (ns, key));
CREATE TABLE IF NOT EXISTS logs (id INTEGER PRIMARY KEY AUTOINCREMENT, ns TEXT NOT NULL, ts REAL NOT NULL,
                                 value BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS logs_ns ON logs (ns, id);
"""
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

    async def append_many(self, namespace: str, records: Sequence[Mapping[str, Any]]) -> None:
        """All of ``records`` in one statement (one transaction, one release of the GIL): a row-by-row insert would
        commit, or hand the GIL to and from the event loop's thread, once per row."""
        batch = orjson.dumps(list(records)).decode()  # text: SQLite 3.45+ reads a BLOB argument as JSONB
        await self._run(lambda db: db.execute(
            "INSERT INTO logs (ns, ts, value) SELECT ?, ?, value FROM json_each(?)", (namespace, time.time(), batch)))

    async def tail(self, namespace: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self._run(lambda db: db.execute(
            "SELECT value FROM logs WHERE ns = ? ORDER BY id DESC LIMIT ?", (namespace, limit)).fetchall())
        return [orjson.loads(value) for (value,) in reversed(rows)]

    async def trim(self, namespace: str, keep: int) -> int:
        return await self._run(lambda db: db.execute(
            "DELETE FROM logs WHERE ns = ? AND id <= (SELECT id FROM logs WHERE ns = ? ORDER BY id DESC LIMIT 1 "
            "OFFSET ?)", (namespace, namespace, max(0, keep))).rowcount)

    async def close(self) -> None:
        await self._run(lambda db: db.close())
        self._thread.shutdown(wait=False)
