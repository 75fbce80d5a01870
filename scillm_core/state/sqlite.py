"""SQLite (WAL) state store. One connection, used from one worker thread of its own: nothing else (file work,
other plugins' ``asyncio.to_thread`` calls) can fill the pool storage waits in.

Every operation is handed to the store's thread through a queue and its result posted back to the caller's event
loop: about a quarter of the CPU of ``asyncio.to_thread`` or an executor per operation (no executor, no context
copy, no concurrent future).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from scillm_core.state import LOG_FIELD, Count, Counted, Inserted, flow_group

if TYPE_CHECKING:
    from scillm_core.state import Change

__all__ = ["SQLiteStore"]

T = TypeVar("T")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (ns TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, expires REAL,
                                 PRIMARY KEY (ns, key));
CREATE INDEX IF NOT EXISTS docs_expiry ON docs (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS logs (id INTEGER PRIMARY KEY AUTOINCREMENT, ns TEXT NOT NULL, ts REAL NOT NULL,
                                 value BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS logs_ns ON logs (ns, id);
CREATE INDEX IF NOT EXISTS logs_ts ON logs (ns, ts);
CREATE TABLE IF NOT EXISTS queue (id INTEGER PRIMARY KEY AUTOINCREMENT, q TEXT NOT NULL, value BLOB NOT NULL,
                                  owner TEXT, touched REAL, flow TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS queue_q ON queue (q, owner, id);
DROP TABLE IF EXISTS slots;
CREATE TABLE IF NOT EXISTS slot_holders (pool TEXT NOT NULL, holder TEXT NOT NULL, held INTEGER NOT NULL,
                                         expires REAL NOT NULL, PRIMARY KEY (pool, holder)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (ns TEXT NOT NULL, key TEXT NOT NULL, value REAL NOT NULL, expires REAL,
                                     PRIMARY KEY (ns, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log_expiry (ns TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS log_expiry_at ON log_expiry (expires);
"""
POLL_S = (0.02, 0.25)  # waits for other processes' writes: first poll, longest poll
_COUNTER_UPSERT = ("INSERT INTO counters (ns, key, value, expires) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, expires = excluded.expires")
_PEEK = "SELECT value, expires FROM counters WHERE ns = ? AND key = ?"
PURGE_EVERY = 2000  # count() calls between sweeps of expired counters
SWEEP_S = 600.0  # expired logs are deleted at most this often (after a write that finds the last sweep this old)
SWEEP_ROWS = 5000  # rows one step of the sweep deletes: other writers (other processes too) wait at most for one
MAX_FLOW_TURNS = 10_000  # groups whose flow turn a process remembers (the others start from their first flow)
_GONE = "SELECT 1 FROM log_expiry WHERE ns = ? AND expires <= ?"
_UPSERT = ("INSERT INTO docs (ns, key, value, expires) VALUES (?, ?, ?, ?) "
           "ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, expires = excluded.expires")


def _rounds(columns: Iterable[Sequence[T]]) -> list[T]:
    """One from each column per round, in column order, until every column is spent."""
    return [one for one_round in itertools.zip_longest(*columns) for one in one_round if one is not None]


def _add_queue_flows(db: sqlite3.Connection) -> None:
    """Queues made before flows existed get the column (their entries are flow ``""``) and the index."""
    if not any(row[1] == "flow" for row in db.execute("PRAGMA table_info(queue)")):
        try:
            db.execute("ALTER TABLE queue ADD COLUMN flow TEXT NOT NULL DEFAULT ''")
        except sqlite3.OperationalError as exc:  # another process added it meanwhile
            if "duplicate column" not in str(exc):
                raise
    db.execute("CREATE INDEX IF NOT EXISTS queue_flow ON queue (q, owner, flow, id)")


def _prefix_end(prefix: str) -> str:
    """The least key after every key that starts with ``prefix`` (non-empty): the end of its range in key order."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class SQLiteStore:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        #: wall time for everything that lapses: documents, logs and the sweep, counters, slot leases and queue claims
        #: (tests move it); a log record's own timestamp stays the machine's (callers trim and tail by it)
        self.clock = clock
        self.next_sweep = clock() + SWEEP_S
        self.sweeper: asyncio.Task[int] | None = None
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        _add_queue_flows(self._db)
        self._lock = threading.Lock()
        self._wakers: dict[str, asyncio.Event] = {}  # this process's appends/enqueues wake its followers at once
        self._group_turns: dict[str, tuple[str, bool]] = {}  # per queue: where the next take's first group starts
        self._flow_turns: dict[tuple[str, str], str] = {}  # per queue and group: its flow the last take began with
        self._counts = 0
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._reader: sqlite3.Connection | None = None  # read-only, for counter reads on the caller's thread
        self._reader_lock = threading.Lock()

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=f"scillm-state:{self.path.name}", daemon=True)
            self._thread.start()
        self._jobs.put((fn, future, loop))
        return await future

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, future, loop = job
            try:
                with self._lock:
                    result = fn(self._db)
            except BaseException as exc:
                _post(loop, future, None, exc)
            else:
                _post(loop, future, result, None)

    def _live(self, row: tuple[bytes, float | None] | None) -> dict[str, Any] | None:
        if row is None or (row[1] is not None and row[1] <= self.clock()):
            return None
        return orjson.loads(row[0])  # type: ignore[no-any-return]

    async def get(self, namespace: str, key: str) -> dict[str, Any] | None:
        return await self._run(lambda db: self._live(db.execute(
            "SELECT value, expires FROM docs WHERE ns = ? AND key = ?", (namespace, key)).fetchone()))

    async def put(self, namespace: str, key: str, value: Mapping[str, Any], *, ttl_s: float | None = None) -> None:
        await self.put_many(namespace, [(key, value)], ttl_s=ttl_s)

    async def put_many(self, namespace: str, documents: Sequence[tuple[str, Mapping[str, Any]]], *,
                       ttl_s: float | None = None) -> None:
        expires = self.clock() + ttl_s if ttl_s else None
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
        if ttl_s:
            self._sweep_when_due()

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
                    db.execute(_UPSERT, (namespace, key, orjson.dumps(value), self.clock() + ttl_s if ttl_s else None))
                db.execute("COMMIT")
                return True
            except BaseException:
                db.execute("ROLLBACK")
                raise

        done = await self._run(cas)
        if ttl_s:
            self._sweep_when_due()
        return done

    async def insert(self, namespace: str, key: str, value: Mapping[str, Any], *, prefix: str, cap: int,
                     ttl_s: float | None = None) -> Inserted:
        if not key.startswith(prefix) or not prefix:
            raise ValueError("insert: the key must start with a non-empty prefix")
        blob = orjson.dumps(value)

        def insert(db: sqlite3.Connection) -> Inserted:
            now = self.clock()
            db.execute("BEGIN IMMEDIATE")  # the write lock before the reads: nobody inserts between count and write
            try:
                current = self._live(db.execute("SELECT value, expires FROM docs WHERE ns = ? AND key = ?",
                                                (namespace, key)).fetchone())
                if current is None:
                    (held,) = db.execute(
                        "SELECT COUNT(*) FROM docs WHERE ns = ? AND key >= ? AND key < ? AND "
                        "(expires IS NULL OR expires > ?)", (namespace, prefix, _prefix_end(prefix), now)).fetchone()
                    if held < cap:
                        db.execute(_UPSERT, (namespace, key, blob, now + ttl_s if ttl_s else None))
                        db.execute("COMMIT")
                        return Inserted(True)
                db.execute("ROLLBACK")
                return Inserted(False, current)
            except BaseException:
                db.execute("ROLLBACK")
                raise

        inserted = await self._run(insert)
        if ttl_s:
            self._sweep_when_due()
        return inserted

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
            now, clock = time.time(), self.clock()
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
                                             clock + change.ttl_s if change.ttl_s else None))
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
        if any(change.ttl_s for change in changes):
            self._sweep_when_due()
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

    async def count(self, namespace: str, groups: Sequence[Sequence[Count]]) -> list[Counted]:
        """Every group in one ``BEGIN IMMEDIATE`` transaction (the write lock is taken before reading, so no other
        connection or process can interleave): one read of every counter involved, the groups applied in order in
        memory, one write of what changed. A call that only reads takes no write lock."""
        work = [tuple(group) for group in groups]
        writes = any(c.delta or c.ttl_s for group in work for c in group)
        if not writes:
            values = self._read_inline(namespace, {c.key: None for g in work for c in g})
            if values is not None:
                return [Counted(True, tuple(values.get(c.key, 0.0) for c in group)) for group in work]
        self._counts += 1
        purge = writes and self._counts % PURGE_EVERY == 0

        def apply(db: sqlite3.Connection) -> list[Counted]:
            now = self.clock()
            if writes:
                db.execute("BEGIN IMMEDIATE")
            try:
                if purge:
                    db.execute("DELETE FROM counters WHERE expires IS NOT NULL AND expires <= ?", (now,))
                values, expiry = self._read_counters(db, namespace, {c.key: None for g in work for c in g}, now)
                dirty: dict[str, None] = {}
                out: list[Counted] = []
                for group in work:
                    before = {c.key: values.get(c.key, 0.0) for c in group}
                    after = dict(before)
                    fits = True
                    for change in group:
                        after[change.key] += change.delta
                        if change.limit is not None and change.delta > 0 and after[change.key] > change.limit:
                            fits = False
                    if not fits:
                        out.append(Counted(False, tuple(before[c.key] for c in group)))
                        continue
                    for change in group:
                        if change.ttl_s:
                            expiry[change.key] = now + change.ttl_s
                        if change.delta or change.ttl_s:
                            dirty[change.key] = None
                    values.update(after)
                    out.append(Counted(True, tuple(after[c.key] for c in group)))
                if dirty:
                    db.executemany(_COUNTER_UPSERT, [(namespace, k, values[k], expiry.get(k)) for k in dirty])
            except BaseException:
                if writes:
                    db.execute("ROLLBACK")
                raise
            if writes:
                db.execute("COMMIT")
            return out

        return await self._run(apply)

    def _read_inline(self, namespace: str, keys: Mapping[str, None]) -> dict[str, float] | None:
        """Counter values read on the caller's thread from a read-only connection: in WAL mode a reader never waits
        for a writer, and a primary-key read costs less than handing it to the store's thread. ``None`` (use the
        store's thread) if the reader is in use or SQLite says busy."""
        if not self._reader_lock.acquire(blocking=False):
            return None
        try:
            return self._read_counters(self._reader or self._open_reader(), namespace, keys, self.clock())[0]
        except sqlite3.OperationalError:
            return None
        finally:
            self._reader_lock.release()

    def peek(self, namespace: str, key: str) -> float | None:
        """One counter read inline (see :meth:`_read_inline`): each statement is its own read transaction, so it
        sees every commit made before it, by any connection or process."""
        if not self._reader_lock.acquire(blocking=False):
            return None
        try:
            row = (self._reader or self._open_reader()).execute(_PEEK, (namespace, key)).fetchone()
        except sqlite3.OperationalError:
            return None
        finally:
            self._reader_lock.release()
        if row is None or (row[1] is not None and row[1] <= self.clock()):
            return 0.0
        return float(row[0])

    def _open_reader(self) -> sqlite3.Connection:
        self._reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._reader.execute("PRAGMA query_only=1")
        self._reader.execute("PRAGMA busy_timeout=0")
        return self._reader

    @staticmethod
    def _read_counters(db: sqlite3.Connection, namespace: str, keys: Mapping[str, None],
                       now: float) -> tuple[dict[str, float], dict[str, float | None]]:
        """The live values and expiries of ``keys`` (absent or expired counters are left out: they count as 0)."""
        values: dict[str, float] = {}
        expiry: dict[str, float | None] = {}
        names = list(keys)
        for start in range(0, len(names), 500):
            chunk = names[start:start + 500]
            marks = ",".join("?" * len(chunk))  # placeholders only: the keys themselves are bound
            for key, value, expires in db.execute(
                    f"SELECT key, value, expires FROM counters WHERE ns = ? AND key IN ({marks})", (namespace, *chunk)):
                if expires is None or expires > now:
                    values[key], expiry[key] = value, expires
        return values, expiry

    async def append(self, namespace: str, record: Mapping[str, Any]) -> None:
        text = orjson.dumps(record).decode()  # text, like append_many, so json_extract reads it everywhere
        await self._run(lambda db: db.execute("INSERT INTO logs (ns, ts, value) VALUES (?, ?, ?)",
                                              (namespace, time.time(), text)))
        self._wake("log:" + namespace)
        self._sweep_when_due()

    async def append_many(self, namespace: str, records: Sequence[Mapping[str, Any]]) -> None:
        """All of ``records`` in one statement (one transaction, one release of the GIL): a row-by-row insert would
        commit, or hand the GIL to and from the event loop's thread, once per row."""
        batch = orjson.dumps(list(records)).decode()  # text: SQLite 3.45+ reads a BLOB argument as JSONB
        await self._run(lambda db: db.execute(
            "INSERT INTO logs (ns, ts, value) SELECT ?, ?, value FROM json_each(?)", (namespace, time.time(), batch)))
        self._wake("log:" + namespace)
        self._sweep_when_due()

    async def tail(self, namespace: str, limit: int = 100, *, since: float | None = None, until: float | None = None,
                   match: Mapping[str, str | int | float | bool | None] | None = None) -> list[dict[str, Any]]:
        where: list[str] = ["ns = ?"]
        params: list[Any] = [namespace]
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        if until is not None:
            where.append("ts < ?")
            params.append(until)
        for name, value in (match or {}).items():
            if not LOG_FIELD.match(name):
                raise ValueError(f"log field names are plain identifiers, not {name[:80]!r}")
            # the name is checked above, the value bound; CAST: rows written as BLOB would read as JSONB on SQLite 3.45+
            where.append(f"json_extract(CAST(value AS TEXT), '$.{name}') IS ?")
            params.append(value)
        query = f"SELECT value FROM logs WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?"
        now = self.clock()
        rows = await self._run(lambda db: [] if db.execute(_GONE, (namespace, now)).fetchone() else db.execute(
            query, (*params, limit)).fetchall())
        return [orjson.loads(value) for (value,) in reversed(rows)]

    async def trim(self, namespace: str, keep: int | None = None, *, before: float | None = None) -> int:
        def delete(db: sqlite3.Connection) -> int:
            dropped = 0
            if before is not None:
                dropped += db.execute("DELETE FROM logs WHERE ns = ? AND ts < ?", (namespace, before)).rowcount
            if keep is not None:
                dropped += db.execute(
                    "DELETE FROM logs WHERE ns = ? AND id <= (SELECT id FROM logs WHERE ns = ? ORDER BY id DESC "
                    "LIMIT 1 OFFSET ?)", (namespace, namespace, max(0, keep))).rowcount
            return dropped

        return await self._run(delete)

    async def expire_log(self, namespace: str, ttl_s: float | None) -> None:
        if ttl_s is None:
            await self._run(lambda db: db.execute("DELETE FROM log_expiry WHERE ns = ?", (namespace,)))
            return
        expires = self.clock() + ttl_s
        await self._run(lambda db: db.execute(
            "INSERT INTO log_expiry (ns, expires) VALUES (?, ?) ON CONFLICT (ns) DO UPDATE SET expires = "
            "excluded.expires", (namespace, expires)))
        self._sweep_when_due()

    def _sweep_when_due(self) -> None:
        """Start a sweep in the background when the last one is ``SWEEP_S`` old (no caller waits for it); called
        after writes of logs and of documents that expire."""
        if self.clock() >= self.next_sweep and (self.sweeper is None or self.sweeper.done()):
            self.next_sweep = self.clock() + SWEEP_S
            self.sweeper = asyncio.ensure_future(self.sweep())
            self.sweeper.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def sweep(self) -> int:
        """Delete the documents and logs whose expiry passed, ``SWEEP_ROWS`` rows per step on the store's thread
        (the event loop never waits for it; other operations run between its steps); how many rows went."""
        now = self.clock()

        def expired(db: sqlite3.Connection) -> int:  # documents (a handoff past its lifetime): unreadable already
            return int(db.execute("DELETE FROM docs WHERE rowid IN (SELECT rowid FROM docs WHERE expires <= ? "
                                  "LIMIT ?)", (now, SWEEP_ROWS)).rowcount)

        dropped = 0
        while (n := await self._run(expired)) == SWEEP_ROWS:
            dropped += n
        dropped += n
        gone = await self._run(lambda db: [ns for (ns,) in db.execute(
            "SELECT ns FROM log_expiry WHERE expires <= ? LIMIT 1000", (now,))])
        for namespace in gone:
            def step(db: sqlite3.Connection, ns: str = namespace) -> int:  # unless kept (expiry lifted) meanwhile
                return int(db.execute(f"DELETE FROM logs WHERE id IN (SELECT id FROM logs WHERE ns = ? ORDER BY id "
                                      f"LIMIT ?) AND EXISTS ({_GONE})", (ns, SWEEP_ROWS, ns, now)).rowcount)

            def forget(db: sqlite3.Connection, ns: str = namespace) -> None:  # the log is gone, so is its expiry
                db.execute("DELETE FROM log_expiry WHERE ns = ? AND expires <= ?", (ns, now))

            while (n := await self._run(step)) == SWEEP_ROWS:
                dropped += n
            dropped += n
            await self._run(forget)
        return dropped

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
        if after and not (after.isascii() and after.isdigit() and len(after) <= 18):  # a row id SQLite can hold
            raise ValueError(f"not a log cursor: {after[:40]!r}")
        start = int(after) if after else 0

        async def fetch() -> list[tuple[str, dict[str, Any]]]:
            now = self.clock()
            rows = await self._run(lambda db: [] if db.execute(_GONE, (namespace, now)).fetchone() else db.execute(
                "SELECT id, value FROM logs WHERE ns = ? AND id > ? ORDER BY id LIMIT ?",
                (namespace, start, limit)).fetchall())
            return [(str(i), orjson.loads(value)) for i, value in rows]

        return await self._poll("log:" + namespace, block_s, fetch)  # type: ignore[no-any-return]

    async def enqueue(self, queue: str, entries: Sequence[Mapping[str, Any]], *, flow: str = "") -> list[str]:
        rows = [(queue, orjson.dumps(entry), flow) for entry in entries]

        def insert(db: sqlite3.Connection) -> list[str]:
            db.execute("BEGIN IMMEDIATE")
            try:
                ids = [str(db.execute("INSERT INTO queue (q, value, flow) VALUES (?, ?, ?)", row).lastrowid)
                       for row in rows]
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
            now = self.clock()
            if idle_s is None and db.execute("SELECT 1 FROM queue WHERE q = ? AND owner IS NULL LIMIT 1",
                                             (queue,)).fetchone() is None:
                return []  # an idle queue's poll reads without the write lock every process's writes wait for
            db.execute("BEGIN IMMEDIATE")
            try:
                if idle_s is None:
                    rows = self._fair(db, queue, count)
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

    def _fair(self, db: sqlite3.Connection, queue: str, count: int) -> list[tuple[int, bytes]]:
        """Up to ``count`` unclaimed entries, round robin over the queue's flow groups (:func:`flow_group`), each
        group's from its flows in turn, each flow's oldest first. Flows are found by index seeks in name order (a
        group's flows share its prefix, so a group is one range): a take looks at no more groups and flows than it
        can give entries from, however many wait. The next take starts with the group after the one given this take's
        last entry, and a group's next turn with the flow after the one it last gave (this process's turns; another
        process keeps its own)."""
        def first(low: str, strict: bool, high: str | None = None) -> str | None:
            sql = "SELECT min(flow) FROM queue WHERE q = ? AND owner IS NULL AND flow " + (">" if strict else ">=")
            if high is None:
                return db.execute(sql + " ?", (queue, low)).fetchone()[0]  # type: ignore[no-any-return]
            return db.execute(sql + " ? AND flow < ?", (queue, low, high)).fetchone()[0]  # type: ignore[no-any-return]

        def past(group: str) -> tuple[str, bool]:  # the bound just after a group's range
            return (group[:-1] + "0", False) if group.endswith("/") else (group, True)  # "0" follows "/"

        start = self._group_turns.get(queue, ("", False))
        groups: list[str] = []
        low, strict, wrapped = *start, False
        while len(groups) < count:
            flow = first(low, strict)
            if flow is None:
                if wrapped or start == ("", False):
                    break
                low, strict, wrapped = "", False, True
                continue
            group = flow_group(flow)
            if group in groups[:1]:  # round again
                break
            groups.append(group)
            low, strict = past(group)
        if not groups:  # another process claimed them between the look and the lock
            return []

        def rows_of(group: str, limit: int) -> tuple[list[tuple[int, bytes]], str]:
            """The group's entries, one per flow per round from the flow after the last one served, and the last
            flow served."""
            def oldest(flow: str, after: int, n: int) -> list[tuple[int, bytes]]:
                return db.execute("SELECT id, value FROM queue WHERE q = ? AND owner IS NULL AND flow = ? AND id > ? "
                                  "ORDER BY id LIMIT ?", (queue, flow, after, n)).fetchall()

            if not group.endswith("/"):  # a flow of its own
                return oldest(group, -1, limit), group
            high = past(group)[0]
            served = self._flow_turns.get((queue, group))
            began = (first(served, True, high) if served is not None else None) or first(group, False, high)
            by_flow: dict[str, list[tuple[int, bytes]]] = {}  # in turn order: the first round finds the flows
            flow = began
            while flow is not None and len(by_flow) < limit:  # every flow found has an entry nobody holds
                by_flow[flow] = oldest(flow, -1, 1)
                flow = first(flow, True, high) or first(group, False, high)
                if flow == began:
                    break
            need, live = limit - len(by_flow), list(by_flow)
            while need > 0 and live:  # the next rounds: each flow's share of what is still wanted, one read each
                share = -(-need // len(live))
                for flow in list(live):
                    more = oldest(flow, by_flow[flow][-1][0], share)
                    by_flow[flow] += more
                    need -= len(more)
                    if len(more) < share:
                        live.remove(flow)
            rounds = _rounds([(flow, row) for row in rows] for flow, rows in by_flow.items())[:limit]
            return [row for _, row in rounds], rounds[-1][0] if rounds else str(began)

        share = -(-count // len(groups))
        turns = [rows_of(group, share) for group in groups]
        found = [rows for rows, _ in turns]
        need = count - sum(map(len, found))
        for n, group in enumerate(groups):  # some groups had fewer than their share: the others may give more
            if need <= 0:
                break
            if len(found[n]) == share:
                found[n] = rows_of(group, share + need)[0]
                need -= len(found[n]) - share
        for group, (_, flow) in zip(groups, turns, strict=True):
            if group.endswith("/"):
                self._flow_turns.pop((queue, group), None)
                self._flow_turns[(queue, group)] = flow
        while len(self._flow_turns) > MAX_FLOW_TURNS:  # forget the groups served longest ago
            del self._flow_turns[next(iter(self._flow_turns))]
        given = _rounds([(n, row) for row in rows] for n, rows in enumerate(found))[:count]
        if given:  # the next take starts with the group after the one given the last entry
            self._group_turns[queue] = past(groups[given[-1][0]])
        return [row for _, row in given]

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
            (self.clock(), queue, consumer, *numbers)).rowcount) if numbers else 0

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

    async def hold_slots(self, pool: str, holder: str, held: int, want: int, limit: int, ttl_s: float) -> int:
        def hold(db: sqlite3.Connection) -> int:
            now = self.clock()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM slot_holders WHERE pool = ? AND expires <= ?", (pool, now))
                (others,) = db.execute("SELECT coalesce(sum(held), 0) FROM slot_holders WHERE pool = ? AND holder != ?",
                                       (pool, holder)).fetchone()
                taken = max(0, min(want, limit - others - held))
                if held + taken > 0:
                    db.execute("INSERT OR REPLACE INTO slot_holders (pool, holder, held, expires) VALUES (?, ?, ?, ?)",
                               (pool, holder, held + taken, now + ttl_s))
                else:
                    db.execute("DELETE FROM slot_holders WHERE pool = ? AND holder = ?", (pool, holder))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return int(taken)

        return await self._run(hold)

    async def slots_held(self, pool: str) -> int:
        return await self._run(lambda db: int(db.execute(
            "SELECT coalesce(sum(held), 0) FROM slot_holders WHERE pool = ? AND expires > ?",
            (pool, self.clock())).fetchone()[0]))

    async def health(self) -> dict[str, Any]:
        try:
            await self._run(lambda db: db.execute("SELECT 1").fetchone())
            return {"backend": "sqlite", "reachable": True, "path": str(self.path)}
        except Exception as exc:
            return {"backend": "sqlite", "reachable": False, "path": str(self.path), "error": type(exc).__name__}

    async def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        await self._run(lambda db: db.close())
        self._jobs.put(None)  # the thread ends after the close (a later call starts one that reports the closed db)
        self._thread = None


def _post(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any,
          exc: BaseException | None) -> None:
    """Hand an outcome to the caller's loop (gone already if its loop closed: nothing waits any more)."""

    def deliver() -> None:
        if not future.done():
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)

    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(deliver)
