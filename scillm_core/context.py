"""Runtime (one per app) and CallContext (one per request): what hooks receive besides the request."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from attrs import define, field

from scillm_core.events import Events, Stage
from scillm_core.identity import MASTER, Identity, Job
from scillm_core.models import ChatRequest

if TYPE_CHECKING:
    import httpx

    from scillm_core.config import Config
    from scillm_core.hooks import Hooks
    from scillm_core.pipeline import CallResult, ProviderRequest
    from scillm_core.plugins import PluginInfo
    from scillm_core.registry import ProviderRegistry, Route
    from scillm_core.state import StateStore
    from scillm_core.state.presence import Presence

__all__ = ["CallContext", "Runtime"]


def _metrics_registry() -> Any:
    from prometheus_client import CollectorRegistry

    return CollectorRegistry(auto_describe=True)


@define(kw_only=True)
class Runtime:
    """App-wide services. ``http`` is the shared upstream client (scillm's User-Agent, tuned transport);
    ``metrics`` is the app's Prometheus registry, served at ``/metrics``; ``plugin_state`` holds what a plugin
    keeps for one app (breakers, limiters, queues), so it lives and dies with the app; ``events`` is where the
    pipeline and plugins report what happens (``scillm_core.events``); ``public_paths`` are the routes surfaces
    declared public (no key)."""

    config: Config
    hooks: Hooks
    providers: ProviderRegistry
    plugins: list[PluginInfo]
    http: httpx.AsyncClient | None = None
    metrics: Any = field(factory=_metrics_registry)
    started_at: float = field(factory=time.time)
    ready: bool = False
    plugin_state: dict[str, Any] = field(factory=dict)  # each plugin's per-app state, by plugin name
    events: Events = field(factory=Events)
    public_paths: frozenset[str] = frozenset()
    instance_id: str = field(factory=lambda: f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    presence: Presence | None = None  # this process in the store's list of live instances (while the app runs)
    #: this process's own loopback URL under ``--workers`` (``scillm_core.own_listener``), for children it starts
    own_url: str | None = None
    _store: StateStore | None = None
    _store_factory: Callable[[], StateStore] | None = None

    @property
    def env(self) -> Mapping[str, str]:
        return self.config.env

    @property
    def store(self) -> StateStore:
        """The state store, opened on first use: the ``[state]`` backend (SQLite under the data dir by default)
        unless a plugin set another."""
        if self._store is None:
            if self._store_factory is not None:
                self._store = self._store_factory()
            else:
                from scillm_core.state import open_store

                self._store = open_store(self.config)
        return self._store

    @property
    def shared(self) -> bool:
        """Whether the state store is shared beyond this machine (Redis): limits, breakers, pauses and the cache
        then live in it too instead of in this process."""
        return self.config.state.backend == "redis"

    def use_store(self, factory: Callable[[], StateStore]) -> None:
        self._store_factory = factory

    def route(self, model: str) -> Route:
        """Where ``model`` goes, as the ``route_model`` hook decides (routing plugins included) for a bare name:
        for checks and listings made outside a call (which models a key reaches, whether a name routes)."""
        return self.hooks.route_model(ChatRequest(model=model, messages=()), self)

    def client(self) -> httpx.AsyncClient:
        if self.http is None:
            raise RuntimeError("the app is not started (the shared HTTP client opens in the lifespan)")
        return self.http


@define(kw_only=True)
class CallContext:
    """Per-request state. ``deadline`` is a ``time.monotonic()`` instant or ``None``; ``attempts`` counts
    upstream calls; ``route`` is the route that served (set by core's dispatch); ``parent`` names the unit of work
    the call is made for (``"batch.item:..."``, ``"run:..."``; see ``scillm_core.events``), if any. ``identity`` is
    who is calling (the key authentication resolved) and ``job`` the batch or agent run the call is made for, if
    any."""

    runtime: Runtime
    request_id: str = field(factory=lambda: uuid.uuid4().hex[:16])
    caller: str | None = None
    identity: Identity = MASTER
    job: Job | None = None
    headers: Mapping[str, str] = field(factory=dict)
    deadline: float | None = None
    attempts: int = 0
    route: Route | None = None
    notes: dict[str, Any] = field(factory=dict)
    parent: str | None = None
    #: the hook stages this call went through, recorded while an observer wants them (``scillm_core.events``)
    stages: list[Stage] | None = None
    #: who is told when the stream being handed on ends (``scillm_core.pipeline.tap_stream``), while it is open
    stream_ended: list[Any] | None = None

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def emit(self, kind: str, /, **data: Any) -> None:
        """Report an event of this call to the app's observers (``scillm_core.events``)."""
        self.runtime.events.emit(kind, self, **data)

    async def complete(self, request: ProviderRequest) -> CallResult:
        """Route ``request`` and call its provider through the ``call_provider`` chain (middleware included)."""
        stages = self.stages
        if stages is not None:
            with Stage(stages, "call_provider"):
                return await self._complete(request)
        return await self._complete(request)

    async def _complete(self, request: ProviderRequest) -> CallResult:
        route = self.runtime.hooks.route_model(request, self.runtime)
        return await self.runtime.hooks.call_provider(request, route, self)()
