"""The virtual-key store: key documents in the state store, secrets only as SHA-256 hashes, and an in-memory cache
of resolved keys that a per-key version counter keeps exact.

A key is ``sk-scillm-key_<12 hex>.<43 url-safe chars>``: the part before the dot is the key's id (shown in lists as
its prefix, recorded as the owner of what the key creates), the rest is a 256-bit secret shown once. Because the
secret is random, one SHA-256 is the right hash (a slow password hash protects guessable secrets only).

Every change to a key (revoke, rotate) first increments the counter ``v:<id>`` and then writes the document with
that version. A request with a cached key reads the counter (SQLite: one primary-key read on the request's own
thread, :meth:`StateStore.peek`; Redis: a read batched with concurrent requests') and uses the cache only if the
counter still equals the cached version;
otherwise it reloads the document. So a revoked or rotated key is refused on its next request in every process
sharing the store, without a store read of the document per request.

An inline read is shared by the requests the event loop runs before it next looks for I/O (a callback queued with
the read forgets it): each of them was received before the read was made, so the read sees every change committed
before any of them arrived. Under load one read then serves every request of a pass of the loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from scillm_core import Identity, errors
from scillm_core.state import Count
from scillm_core.state.counters import CountBatcher
from scillm_keys.limits import Limits

if TYPE_CHECKING:
    from scillm_core import Runtime

__all__ = ["KEY_ID", "KEY_PREFIX", "KeyStore", "identity_from"]

KEY_PREFIX = "sk-scillm-"
KEY_ID = re.compile(r"^key_[0-9a-f]{12}$")
_TOKEN = re.compile(r"^sk-scillm-(key_[0-9a-f]{12})\.([A-Za-z0-9_-]{43})$")
NAMESPACE = "keys"
CACHE_MAX = 10_000
PUBLIC_FIELDS = ("id", "prefix", "name", "team", "models", "limits", "created_at", "expires_at", "revoked_at",
                 "rotated_at", "version")


def _hash(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def identity_from(doc: Mapping[str, Any]) -> Identity:
    models = doc.get("models")
    return Identity(owner=doc["id"], name=doc.get("name") or doc["id"], team=doc.get("team"),
                    models=tuple(models) if models is not None else None,
                    limits=Limits(**(doc.get("limits") or {})), version=int(doc.get("version") or 0))


def public(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A key document as the admin API shows it: everything but the hash, plus its state."""
    out = {name: doc.get(name) for name in PUBLIC_FIELDS}
    now = time.time()
    out["status"] = ("revoked" if doc.get("revoked_at") else
                     "expired" if doc.get("expires_at") and doc["expires_at"] <= now else "active")
    return out


class KeyStore:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.versions = CountBatcher(lambda: runtime.store, NAMESPACE)
        self.cache: dict[str, tuple[Identity, float | None]] = {}  # token -> (identity, expires_at)
        # key id -> the newest identity loaded and its expiry (for the identities agent runs carry)
        self.current: dict[str, tuple[Identity, float | None]] = {}
        self.lock = asyncio.Lock()
        self.stats = {"hits": 0, "misses": 0, "refused": 0}
        self.peeked: dict[str, float] = {}  # versions read inline in this pass of the event loop (module doc)

    # -- requests -------------------------------------------------------------------------------------------------

    async def resolve(self, token: str) -> Identity:
        """The identity of a presented virtual key; 401 when it is unknown, wrong, revoked or expired."""
        entry = self.cache.get(token)
        if entry is not None:
            identity, expires_at = entry
            if expires_at is not None and expires_at <= time.time():
                self.cache.pop(token, None)
            elif await self._version(identity.owner) == identity.version:
                self.stats["hits"] += 1
                return identity
            else:
                self.cache.pop(token, None)
        self.stats["misses"] += 1
        match = _TOKEN.match(token)
        doc = await self.runtime.store.get(NAMESPACE, match.group(1)) if match else None
        if match is None or doc is None or not hmac.compare_digest(_hash(match.group(2)), str(doc.get("hash"))):
            self.stats["refused"] += 1
            raise errors.AuthenticationError("invalid API key")
        identity = self._usable(doc)
        if await self._version(identity.owner) == identity.version:
            if len(self.cache) >= CACHE_MAX:
                self.cache.clear()
            self.cache[token] = (identity, doc.get("expires_at"))
        return identity

    async def verify(self, identity: Identity) -> Identity:
        """``identity`` (carried by an agent run's key) as the key is now: 401 once it was revoked or expired."""
        version = await self._version(identity.owner)
        newer, expires_at = self.current.get(identity.owner, (None, None))
        if expires_at is not None and expires_at <= time.time():
            raise errors.AuthenticationError(f"this API key expired at {_iso(expires_at)}")
        if version == identity.version:
            return identity
        if newer is not None and newer.version == version:
            return newer
        doc = await self.runtime.store.get(NAMESPACE, identity.owner)
        if doc is None:
            raise errors.AuthenticationError("the API key that started this run no longer exists")
        return self._usable(doc)

    async def identity(self, owner: str) -> Identity:
        """The identity of key ``owner`` as it is now, for work a key started that runs later (a batch taken over
        after a restart): 401 once the key was revoked or expired, or no longer exists."""
        doc = await self.runtime.store.get(NAMESPACE, owner) if KEY_ID.match(owner) else None
        if doc is None:
            raise errors.AuthenticationError(f"the key {owner[:40]!r} no longer exists")
        return self._usable(doc)

    def _usable(self, doc: Mapping[str, Any]) -> Identity:
        if doc.get("revoked_at"):
            self.stats["refused"] += 1
            raise errors.AuthenticationError("this API key was revoked")
        expires_at = doc.get("expires_at")
        if expires_at is not None and expires_at <= time.time():
            self.stats["refused"] += 1
            raise errors.AuthenticationError(f"this API key expired at {_iso(expires_at)}")
        identity = identity_from(doc)
        if len(self.current) >= CACHE_MAX:
            self.current.clear()
        self.current[identity.owner] = (identity, expires_at)
        return identity

    async def _version(self, key_id: str) -> int:
        """The key's version as the store has it now: read inline where the store can (SQLite; one read per key
        and pass of the event loop, see the module doc), else in a round trip shared with concurrent requests
        (Redis). Either read sees every change committed before the request arrived."""
        peeked = self.peeked
        version = peeked.get(key_id)
        if version is not None:
            return int(version)
        version = self.runtime.store.peek(NAMESPACE, f"v:{key_id}")
        if version is None:
            return int((await self.versions.count((Count(f"v:{key_id}"),))).values[0])
        if not peeked:
            asyncio.get_running_loop().call_soon(peeked.clear)
        peeked[key_id] = version
        return int(version)

    # -- administration -------------------------------------------------------------------------------------------

    async def create(self, *, name: str, team: str | None, models: list[str] | None, limits: Limits,
                     expires_at: float | None) -> tuple[dict[str, Any], str]:
        """A new key: its document and its secret (the only time the secret exists outside the client)."""
        store = self.runtime.store
        for _ in range(5):
            key_id = "key_" + secrets.token_hex(6)
            if await store.get(NAMESPACE, key_id) is None:
                break
        else:  # pragma: no cover - 48 random bits colliding five times
            raise errors.Conflict("could not allocate a key id; try again")
        secret = secrets.token_urlsafe(32)
        version = await self._bump(key_id)
        doc = {"id": key_id, "prefix": KEY_PREFIX + key_id, "name": name, "team": team, "models": models,
               "limits": limits.as_dict(), "hash": _hash(secret), "created_at": time.time(),
               "expires_at": expires_at, "revoked_at": None, "rotated_at": None, "version": version}
        if not await store.compare_and_set(NAMESPACE, key_id, None, doc):
            raise errors.Conflict("key id collision; try again")
        return doc, f"{KEY_PREFIX}{key_id}.{secret}"

    async def get(self, key_id: str) -> dict[str, Any]:
        doc = await self.runtime.store.get(NAMESPACE, key_id) if KEY_ID.match(key_id) else None
        if doc is None:
            raise errors.NotFound(f"no key {errors.quote(key_id)}")
        return doc

    async def list(self) -> list[dict[str, Any]]:
        return [doc for _, doc in await self.runtime.store.scan(NAMESPACE, "key_", limit=1_000_000)]

    async def revoke(self, key_id: str) -> dict[str, Any]:
        return await self._change(key_id, lambda doc: {"revoked_at": doc.get("revoked_at") or time.time()})

    async def rotate(self, key_id: str) -> tuple[dict[str, Any], str]:
        secret = secrets.token_urlsafe(32)

        def rotated(doc: Mapping[str, Any]) -> dict[str, Any]:
            if doc.get("revoked_at"):
                raise errors.Conflict(f"key {key_id} is revoked; create a new key instead")
            return {"hash": _hash(secret), "rotated_at": time.time()}

        doc = await self._change(key_id, rotated)
        return doc, f"{KEY_PREFIX}{key_id}.{secret}"

    async def _change(self, key_id: str, change: Any) -> dict[str, Any]:
        """Apply ``change(doc) -> fields`` under a new version: bump the counter, then compare-and-set the document
        (so no cache can take the old document for current once the change is written)."""
        async with self.lock:
            for _ in range(10):
                doc = await self.get(key_id)
                fields = change(doc)
                version = await self._bump(key_id)
                new = {**doc, **fields, "version": version}
                if await self.runtime.store.compare_and_set(NAMESPACE, key_id, doc, new):
                    for token in [t for t, (i, _) in self.cache.items() if i.owner == key_id]:
                        self.cache.pop(token, None)
                    return new
            raise errors.Conflict(f"key {key_id} is being changed concurrently; try again")

    async def _bump(self, key_id: str) -> int:
        outcome = await self.versions.count((Count(f"v:{key_id}", 1),))
        self.peeked.pop(key_id, None)
        return int(outcome.values[0])

    def health(self) -> dict[str, Any]:
        return {"cached": len(self.cache), **self.stats, "version_round_trips": self.versions.stats["round_trips"]}


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
