"""The state-store interface: namespaced JSON documents, compare-and-set for leases, append-only logs.

SQLite (WAL) under the data dir is the default (:mod:`scillm_core.state.sqlite`); a plugin can install another
backend (Redis for several instances) with ``runtime.use_store(factory)``. Every backend takes values as
parameters, never as query text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

__all__ = ["StateStore"]


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

    async def delete(self, namespace: str, key: str) -> bool:
        """Remove a document; whether it existed."""

    async def scan(self, namespace: str, prefix: str = "", limit: int = 1000) -> list[tuple[str, dict[str, Any]]]:
        """Documents whose key starts with ``prefix``, in key order."""

    async def append(self, namespace: str, record: Mapping[str, Any]) -> None:
        """Add a record to an append-only log (call log, events)."""

    async def append_many(self, namespace: str, records: Sequence[Mapping[str, Any]]) -> None:
        """Add several records in one write (a background log writer drains its queue with this)."""

    async def tail(self, namespace: str, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` log records, oldest first."""

    async def trim(self, namespace: str, keep: int) -> int:
        """Drop all but the newest ``keep`` records of a log; how many were dropped."""

    async def close(self) -> None:
        """Release the backend."""
