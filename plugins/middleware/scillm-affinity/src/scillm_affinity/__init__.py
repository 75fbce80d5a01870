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
open: without a session, outside groups, or ``[affinity] enabled = false``, routing is unchanged. State is per
process (like the breakers), bounded (``max_sessions``, least recently used first out) and forgets a session idle
for ``ttl_s``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any

from attrs import evolve, frozen

from scillm_core import Route, Runtime, hookimpl

if TYPE_CHECKING:
    from scillm_core import CallContext, ChatRequest
    from scillm_core.pipeline import ChatResult, ChatThunk

__all__ = ["AffinityConfig", "Sessions"]


@frozen(kw_only=True)
class AffinityConfig:
    enabled: bool = True
    max_sessions: int = 10_000
    ttl_s: float = 3600.0


class Sessions:
    """(group, session) -> the deployment that last served it; LRU-bounded, entries expire after ``ttl_s`` idle."""

    def __init__(self, config: AffinityConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._map: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self.moves = 0

    def get(self, group: str, session: str) -> str | None:
        entry = self._map.get((group, session))
        if entry is None:
            return None
        if self.clock() - entry[1] > self.config.ttl_s:
            del self._map[(group, session)]
            return None
        return entry[0]

    def remember(self, group: str, session: str, deployment: str) -> None:
        key = (group, session)
        previous = self._map.get(key)
        if previous is not None and previous[0] != deployment:
            self.moves += 1
        self._map[key] = (deployment, self.clock())
        self._map.move_to_end(key)
        while len(self._map) > max(1, self.config.max_sessions):
            self._map.popitem(last=False)

    def snapshot(self) -> dict[str, Any]:
        return {"sessions": len(self._map), "max_sessions": self.config.max_sessions, "ttl_s": self.config.ttl_s,
                "moves": self.moves}


def _sessions(runtime: Runtime) -> Sessions | None:
    sessions = runtime.plugin_state.get("affinity")
    if sessions is None:
        config = runtime.config.sections.get("affinity") or AffinityConfig()
        if not config.enabled:
            return None
        sessions = runtime.plugin_state["affinity"] = Sessions(config)
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
        if ctx.route is not None and ctx.attempts:
            sessions.remember(key[0], key[1], ctx.route.deployment)
        return result

    return sticky
