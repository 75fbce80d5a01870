"""The state-store interface: namespaced JSON documents, compare-and-set for leases, atomic counters with expiry,
append-only logs that can be followed, and work queues with acknowledgement.

Two backends, chosen by ``[state] backend``: SQLite (WAL) under the data dir, the embedded default
(:mod:`scillm_core.state.sqlite`; shared by the processes of one machine), and Redis (:mod:`scillm_core.state.redis`;
shared by every process and instance pointed at it). Every backend takes values as parameters, never as query text.
Callers never read then write: what must be atomic (leases, budgets, rate windows, concurrency slots, capped
collections) is one call (``compare_and_set``, ``insert``, ``commit``, ``count``, ``take``, ``ack``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from attrs import frozen

__all__ = ["LOG_FIELD", "Change", "Count", "Counted", "Inserted", "StateStore", "flow_group", "open_store"]

#: what a field name in ``tail(match=...)`` must look like (a plain identifier; anything else is a ValueError)
LOG_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


@frozen
class Change:
    """One compare-and-set of a :meth:`StateStore.commit`: replace the document ``namespace``/``key`` with ``value``
    (``None``: delete) if it equals ``expected`` (``None``: absent or expired); when it does, also append ``record``
    to the log ``log`` (a change and its announcement land together or not at all)."""

    namespace: str
    key: str
    expected: Mapping[str, Any] | None
    value: Mapping[str, Any] | None
    ttl_s: float | None = None
    log: str | None = None
    record: Mapping[str, Any] | None = None


class Count(NamedTuple):
    """One change to one counter, for :meth:`StateStore.count`.

    ``delta`` is added (``0`` reads). With a ``limit``, a positive ``delta`` that would take the counter above it
    refuses the change's whole group. ``ttl_s`` (re)sets the counter's expiry to now + ``ttl_s`` (a counter
    nobody changes for that long disappears, i.e. reads 0 again); ``None`` leaves its expiry as it is (a new
    counter then never expires)."""

    key: str
    delta: float = 0.0
    limit: float | None = None
    ttl_s: float | None = None


class Counted(NamedTuple):
    """The outcome of one group of :class:`Count` changes: whether it was applied, and each change's counter value
    after the group (when refused: the unchanged values, so the caller can tell which limit stood in the way)."""

    applied: bool
    values: tuple[float, ...]


class Inserted(NamedTuple):
    """The outcome of :meth:`StateStore.insert`: ``created``; else ``current`` is the document already under the key,
    or ``None`` when the prefix already held ``cap`` documents (then nothing was written)."""

    created: bool
    current: dict[str, Any] | None = None


class StateStore(Protocol):
    async def get(self, namespace: str, key: str) -> dict[str, Any] | None:
        """The document stored under ``key``, or ``None`` (also when it expired)."""

    async def put(self, namespace: str, key: str, value: Mapping[str, Any], *, ttl_s: float | None = None) -> None:
        """Store (replace) a document."""

    async def put_many(self, namespace: str, documents: Sequence[tuple[str, Mapping[str, Any]]], *,
                       ttl_s: float | None = None) -> None:
        """Store (replace) several documents in one write: all or none."""

    async def compare_and_set(self, namespace: str, key: str, expected: Mapping[str, Any] | None,
                              value: Mapping[str, Any] | None, *, ttl_s: float | None = None) -> bool:
        """Replace the document only if the current one equals ``expected`` (``None``: absent or expired).
        ``value=None`` deletes. Returns whether it happened."""

    async def insert(self, namespace: str, key: str, value: Mapping[str, Any], *, prefix: str, cap: int,
                     ttl_s: float | None = None) -> Inserted:
        """Store a new document under ``key`` (which starts with ``prefix``) only if none is there and fewer than
        ``cap`` live documents of the namespace have keys starting with ``prefix``: the check and the write are one
        atomic step (SQLite: one transaction; Redis: one script), so callers racing at the cap never pass it. A
        collection bounded per owner (a key's handoffs) keeps its documents under ``<owner prefix>/``."""

    async def get_many(self, namespace: str, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        """The documents under ``keys`` (``None`` where absent), in one read."""

    async def commit(self, changes: Sequence[Change], ack: tuple[str, Sequence[str]] | None = None) -> list[bool]:
        """Several compare-and-sets (each succeeds or fails on its own; a successful one appends its record) and,
        with ``ack=(queue, ids)``, those queue entries acknowledged: one atomic step, one round trip. Whether each
        change happened. What many concurrent finishers share as one write (group commit)."""

    async def delete(self, namespace: str, key: str) -> bool:
        """Remove a document; whether it existed."""

    async def scan(self, namespace: str, prefix: str = "", limit: int = 1000) -> list[tuple[str, dict[str, Any]]]:
        """Documents whose key starts with ``prefix``, in key order."""

    async def count(self, namespace: str, groups: Sequence[Sequence[Count]]) -> list[Counted]:
        """Atomic counters with expiry (budgets, rate windows, concurrency slots), one result per group.

        Groups are applied in order, each all-or-nothing and atomically with respect to every other caller (other
        processes and instances included): a group is refused, changing nothing, when one of its changes has a
        ``limit`` and a positive ``delta`` that would take its counter above the limit. An absent or expired
        counter is 0. Several groups in one call share one round trip (what :class:`scillm_core.state.counters.
        CountBatcher` uses for group commit); each group stays independent of the others."""

    def peek(self, namespace: str, key: str) -> float | None:
        """A counter's current value read at once, on the caller's thread, when the backend can do that without a
        round trip (SQLite: a read-only connection; an absent or expired counter is 0.0), as fresh as :meth:`count`'s
        read: every change committed before the call is seen. ``None`` when it cannot (Redis, or the reader is in
        use): then read with :meth:`count`."""

    async def append(self, namespace: str, record: Mapping[str, Any]) -> None:
        """Add a record to an append-only log (call log, events)."""

    async def append_many(self, namespace: str, records: Sequence[Mapping[str, Any]]) -> None:
        """Add several records in one write (a background log writer drains its queue with this)."""

    async def tail(self, namespace: str, limit: int = 100, *, since: float | None = None, until: float | None = None,
                   match: Mapping[str, str | int | float | bool | None] | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` log records, oldest first: only those appended at or after ``since`` and before
        ``until`` (Unix seconds), and whose top-level fields equal every value in ``match`` (field names are
        plain identifiers; a ``None`` value matches an absent or null field)."""

    async def trim(self, namespace: str, keep: int | None = None, *, before: float | None = None) -> int:
        """Drop all but the newest ``keep`` records of a log and (``before``, Unix seconds) every record appended
        before that instant; how many were dropped (Redis: ``XTRIM MAXLEN`` / ``MINID``)."""

    async def expire_log(self, namespace: str, ttl_s: float | None) -> None:
        """The whole log goes ``ttl_s`` from now (a finished run's or batch's events); ``None``: it stays (a log
        that is written to again). Redis: ``PEXPIRE`` / ``PERSIST`` on its stream; SQLite: deleted by the store's
        sweep (on its own thread, a chunk at a time, at most every ``SWEEP_S``), not readable once expired."""

    async def follow(self, namespace: str, after: str = "", limit: int = 100,
                     block_s: float = 0.0) -> list[tuple[str, dict[str, Any]]]:
        """Log records appended after the cursor ``after`` (``""``: from the start), oldest first, each with its own
        cursor; waits up to ``block_s`` for the first one when there is none yet. ``ValueError`` when ``after`` is
        not a cursor's form (a client's resume cursor is checked by the store that gave it out)."""

    async def enqueue(self, queue: str, entries: Sequence[Mapping[str, Any]], *, flow: str = "") -> list[str]:
        """Add work entries of one ``flow`` (a batch, say; ``group/name`` for a group's flow, see
        :func:`flow_group`) to a queue (all or none); their ids, in order."""

    async def take(self, queue: str, consumer: str, count: int, *,
                   block_s: float = 0.0) -> list[tuple[str, dict[str, Any]]]:
        """Claim up to ``count`` entries nobody holds for ``consumer``, waiting up to ``block_s`` for the first:
        round robin over the queue's flow groups and within a group over its flows (:func:`flow_group`), each flow's
        oldest first (a flow of thousands of entries enqueued first does not hold up one enqueued after it, nor a
        group of fifty flows another group's one). What a take costs grows with ``count``, not with how many flows
        wait. An entry stays claimed until :meth:`ack`; every entry goes to exactly one consumer at a time."""

    async def reclaim(self, queue: str, consumer: str, idle_s: float,
                      count: int) -> list[tuple[str, dict[str, Any]]]:
        """Claim for ``consumer`` up to ``count`` entries whose holder has not touched them for ``idle_s`` (it
        died, or hung): how work held by a dead process goes on elsewhere."""

    async def touch(self, queue: str, consumer: str, ids: Sequence[str]) -> int:
        """Mark entries ``consumer`` still holds as alive (not reclaimable); how many it still held."""

    async def ack(self, queue: str, ids: Sequence[str]) -> None:
        """Done with these entries: they leave the queue."""

    async def queue_depth(self, queue: str) -> dict[str, int]:
        """``{"waiting": entries nobody holds, "claimed": entries held}``."""

    async def hold_slots(self, pool: str, holder: str, held: int, want: int, limit: int, ttl_s: float) -> int:
        """A counting semaphore shared by processes, counted per holder (one process): in one atomic step, record
        that ``holder`` holds ``held`` slots of ``pool`` (its own count of what it took and has not given back:
        a reply it never got cannot leave a slot taken) and take up to ``want`` more while fewer than ``limit``
        are held by all live holders; how many were taken. A holder that does not call again within ``ttl_s``
        lapses with all its slots (its process died); ``held`` and ``want`` 0 removes it."""

    async def slots_held(self, pool: str) -> int:
        """Slots of ``pool`` held by live holders."""

    async def health(self) -> dict[str, Any]:
        """``{"backend", "reachable", ...}`` for ``GET /v1/scillm/health``, answered within the backend's timeout;
        never a secret."""

    async def close(self) -> None:
        """Release the backend."""


def flow_group(flow: str) -> str:
    """The group a work queue's flow takes turns in: a flow named ``group/name`` (a key's batch: ``<owner>/<batch
    id>``) is in the group ``group/`` with the others of that prefix; any other flow is a group of its own. A take
    serves the groups in turn and, in a group's turn, its flows in turn: a key with fifty batches waiting gets one
    turn per round, as a key with one does."""
    cut = flow.find("/")
    return flow[:cut + 1] if cut >= 0 else flow


def open_store(config: Any) -> StateStore:
    """The backend ``config.state`` names (``config`` is a :class:`scillm_core.config.Config`)."""
    state = config.state
    if state.backend == "redis":
        from scillm_core.state.redis import RedisStore

        url = state.url(config.env)
        if not url:
            from scillm_core.config import ConfigError

            raise ConfigError("[state] backend = \"redis\" needs redis_url in [state] or REDIS_URL in the environment")
        return RedisStore(url, prefix=state.key_prefix, timeout_s=state.timeout_s)
    from scillm_core.state.sqlite import SQLiteStore

    return SQLiteStore(config.data_dir / "scillm.sqlite3")
