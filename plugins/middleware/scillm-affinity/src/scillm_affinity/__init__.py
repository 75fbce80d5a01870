"""Session affinity: the requests of one agent session stay on one deployment of a group while it is healthy, so
the provider's prompt cache stays warm.

A surface names the session in ``request.scillm["session"]`` (``scillm_core.session_of``: ``x-scillm-session``,
the session headers Claude Code, Codex and OpenCode send, or the body's ``prompt_cache_key``). Two wrappers:

- ``route_model``: a group route whose session last succeeded on another member is reordered to start there (the
  rest stay its fallbacks, in the group's order);
- ``call_provider`` (outermost, ``tryfirst``): when a group call succeeds, the member that served is remembered for
  the session (a call answered from the cache is not a call, and changes nothing).

So a healthy deployment keeps its sessions; when it fails, resilience fails over as always, the member that
answers becomes the session's, and the session stays there (it does not move back when the first recovers). Fails
open: without a session, outside groups, or ``[affinity] enabled = false``, routing is unchanged. Each process keeps
its sessions bounded (``max_sessions``, least recently used first out) and forgets a session idle for ``ttl_s``.

Shared (a Redis state store, or ``--workers``): the session's deployment is a document on the state store (expiring
``ttl_s`` after it was last written), so a session sticks to its deployment whichever process or instance serves it.
This process's copy is trusted for ``shared_cache_s``; a request of a group and a session whose copy is older reads
the document once before routing (``postprocess_json``, outermost: one store read, shared by concurrent requests of
the session). A move is written when it happens, and the document's expiry renewed at most every ``ttl_s / 4``, in
the background. A store that fails leaves routing to this process's copy (fails open; counted in health).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any

from attrs import evolve, frozen

from scillm_core import Route, Runtime, hookimpl

if TYPE_CHECKING:
    from scillm_core import CallContext, ChatRequest
    from scillm_core.pipeline import ChatResult, ChatThunk
    from scillm_core.state import StateStore

__all__ = ["AffinityConfig", "Sessions"]

log = logging.getLogger("scillm.affinity")


@frozen(kw_only=True)
class AffinityConfig:
    enabled: bool = True
    max_sessions: int = 10_000
    ttl_s: float = 3600.0
    shared_cache_s: float = 2.0


NAMESPACE = "affinity"
RETRY_S = 1.0  # after the store failed, this process's copy is used this long before the store is asked again
NEVER = -math.inf  # "written to the store at" of a copy the store has not been told about


class Sessions:
    """(group, session) -> the deployment that last served it; LRU-bounded, entries expire after ``ttl_s`` idle.
    ``store``: the shared state store (``None``: this process's sessions only)."""

    def __init__(self, config: AffinityConfig, clock: Callable[[], float] = time.monotonic,
                 store: Callable[[], StateStore] | None = None, wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.wall = wall  # the documents' "at": wall time, comparable across machines
        self.store = store
        # (group, session) -> (deployment or "" when the store has none, last used, read from the store at,
        # written to the store at)
        self._map: OrderedDict[tuple[str, str], tuple[str, float, float, float]] = OrderedDict()
        self.reading: dict[tuple[str, str], asyncio.Future[None]] = {}
        self.retry_at = -math.inf  # before this instant (after a store failure) the store is not asked
        self.moves = 0
        self.counts = {"store_reads": 0, "store_writes": 0, "store_errors": 0}

    def get(self, group: str, session: str) -> str | None:
        entry = self._map.get((group, session))
        if entry is None:
            return None
        if self.clock() - entry[1] > self.config.ttl_s:
            del self._map[(group, session)]
            return None
        return entry[0] or None

    def fresh(self, group: str, session: str) -> bool:
        """Whether this process's copy may be used without asking the store."""
        entry = self._map.get((group, session))
        return self.store is None or self.skipping or (
            entry is not None and self.clock() - entry[2] < self.config.shared_cache_s)

    async def load(self, group: str, session: str) -> None:
        """Bring the store's answer for the session into this process's copy (one read for every concurrent
        caller); a failing store leaves the copy as it is."""
        key = (group, session)
        reading = self.reading.get(key)
        if reading is None:
            reading = self.reading[key] = asyncio.ensure_future(self._read(key))
        await asyncio.shield(reading)

    async def _read(self, key: tuple[str, str]) -> None:
        assert self.store is not None
        try:
            self.counts["store_reads"] += 1
            doc = await self.store().get(NAMESPACE, _doc_key(*key))
        except Exception as exc:
            self._failed(exc)
            return
        finally:
            self.reading.pop(key, None)
        now = self.clock()
        deployment = doc.get("deployment") if doc else None
        old = self._map.get(key)
        if isinstance(deployment, str) and deployment:  # written (its expiry renewed) "at" by whichever process
            age = max(0.0, self.wall() - float(doc.get("at", 0.0))) if doc else 0.0
            self._put(key, (deployment, now, now, now - age))
        elif old is not None:
            self._put(key, ("", old[1], now, NEVER))  # the store forgot it (expired): so does this process
        else:
            self._put(key, ("", now, now, NEVER))  # nothing known: remember that, for shared_cache_s

    def remember(self, group: str, session: str, deployment: str) -> bool:
        """Note that ``deployment`` served the session; whether the store should be told (:meth:`publish`): a new
        or moved session, or a document whose expiry was last renewed ``ttl_s / 4`` ago."""
        key = (group, session)
        previous = self._map.get(key)
        if previous is not None and previous[0] and previous[0] != deployment:
            self.moves += 1
        now = self.clock()
        written = previous[3] if previous is not None and previous[0] == deployment else NEVER
        due = self.store is not None and now - written >= self.config.ttl_s / 4
        self._put(key, (deployment, now, now, now if due else written))
        return due

    async def publish(self, group: str, session: str, deployment: str) -> None:
        """Write the session's deployment to the store (before the call that chose it answers, so the session's
        next request finds it whichever instance it reaches)."""
        key = (group, session)
        if self.store is None or self.skipping:
            self._unwritten(key, deployment)
            return
        try:
            self.counts["store_writes"] += 1
            await self.store().put(NAMESPACE, _doc_key(*key), {"deployment": deployment, "at": self.wall()},
                                   ttl_s=self.config.ttl_s)
        except Exception as exc:
            self._failed(exc)
            self._unwritten(key, deployment)

    def _unwritten(self, key: tuple[str, str], deployment: str) -> None:
        entry = self._map.get(key)
        if entry is not None and entry[0] == deployment:  # the session's next call tries again
            self._map[key] = (*entry[:3], NEVER)

    def _put(self, key: tuple[str, str], entry: tuple[str, float, float, float]) -> None:
        self._map[key] = entry
        self._map.move_to_end(key)
        while len(self._map) > max(1, self.config.max_sessions):
            self._map.popitem(last=False)

    @property
    def skipping(self) -> bool:
        """The store failed a moment ago: a Redis that hangs costs one request its timeout, not every request."""
        return self.clock() < self.retry_at

    def _failed(self, exc: BaseException) -> None:
        if not self.counts["store_errors"]:
            log.warning("session affinity: the state store failed (%s); this process's sessions are used",
                        type(exc).__name__)
        self.counts["store_errors"] += 1
        self.retry_at = self.clock() + RETRY_S

    def snapshot(self) -> dict[str, Any]:
        return {"sessions": sum(1 for entry in self._map.values() if entry[0]), "max_sessions":
                self.config.max_sessions, "ttl_s": self.config.ttl_s, "moves": self.moves,
                "shared": self.store is not None, **(self.counts if self.store is not None else {})}


def _doc_key(group: str, session: str) -> str:
    """A bounded key (session names are the client's, of any length)."""
    return group + "/" + hashlib.sha256(session.encode()).hexdigest()[:32]


def _sessions(runtime: Runtime) -> Sessions | None:
    sessions = runtime.plugin_state.get("affinity")
    if sessions is None:
        config = runtime.config.sections.get("affinity") or AffinityConfig()
        if not config.enabled:
            return None
        shared = runtime.shared or runtime.own_url is not None  # Redis, or --workers on one machine's store
        sessions = runtime.plugin_state["affinity"] = Sessions(config, store=(lambda: runtime.store) if shared
                                                                else None)
    return sessions  # type: ignore[no-any-return]


@hookimpl
def scillm_config_sections() -> Mapping[str, type]:
    return {"affinity": AffinityConfig}


@hookimpl
def scillm_health(runtime: Runtime) -> Mapping[str, Any]:
    sessions = _sessions(runtime)
    if sessions is None:
        return {"affinity": {"enabled": False, "fails": "open"}}
    return {"affinity": {"enabled": True, "fails": "open", **sessions.snapshot()}}


@hookimpl(wrapper=True, tryfirst=True)
def postprocess_json(request: ChatRequest, ctx: CallContext) -> Generator[None, Any, Any]:
    """Shared sessions: a group request whose session's copy here is stale reads it from the store before it is
    routed (``route_model`` is synchronous and reads this process's copy)."""
    call = yield
    session = getattr(request, "scillm", {}).get("session")
    group = _group_of(request.model, ctx.runtime) if isinstance(session, str) and session else None
    sessions = _sessions(ctx.runtime) if group is not None else None
    if group is None or sessions is None or sessions.fresh(group, session):
        return call

    async def loaded() -> Any:
        await sessions.load(group, session)
        return await call()

    return loaded


def _group_of(model: str, runtime: Runtime) -> str | None:
    """The configured group ``model`` names, through ``scillm.toml`` aliases (as routing resolves it)."""
    config = runtime.config
    for _ in range(8):
        if model in config.groups:
            return model
        if model not in config.aliases:
            return None
        model = config.aliases[model]
    return None


def _session_group(request: ChatRequest, route: Route | None) -> tuple[str, str] | None:
    session = request.scillm.get("session")
    if route is None or not route.fallbacks or not route.group or not isinstance(session, str) or not session:
        return None
    return route.group, session


@hookimpl(wrapper=True)
def route_model(request: ChatRequest, runtime: Runtime) -> Generator[None, Any, Route | None]:
    route: Route | None = yield
    key = _session_group(request, route)
    if key is None:
        return route
    sessions = _sessions(runtime)
    sticky = sessions.get(*key) if sessions is not None else None
    assert route is not None
    if sticky is None or sticky == route.deployment:
        return route
    members = (evolve(route, fallbacks=()), *route.fallbacks)
    chosen = next((m for m in members if m.deployment == sticky), None)
    if chosen is None:  # no longer a member (the group changed): the group's order
        return route
    # each member's route already has its timeouts with the group's applied (core's routing)
    return evolve(chosen, requested=route.requested, group=route.group,
                  fallbacks=tuple(m for m in members if m is not chosen))


@hookimpl(wrapper=True, tryfirst=True)
def call_provider(request: ChatRequest, route: Route, ctx: CallContext) -> Generator[None, Any, ChatThunk]:
    call: ChatThunk = yield
    key = _session_group(request, route)
    sessions = _sessions(ctx.runtime) if key is not None else None
    if key is None or sessions is None:
        return call

    async def sticky() -> ChatResult:
        result = await call()  # a stream: after its first chunk, when the deployment has answered
        if ctx.route is not None and ctx.attempts and sessions.remember(key[0], key[1], ctx.route.deployment):
            await sessions.publish(key[0], key[1], ctx.route.deployment)
        return result

    return sticky
