"""Exact-match response cache for chat and embeddings calls: a ``call_provider`` wrapper, outermost (``tryfirst``).

- Key: SHA-256 over the canonical wire request minus ``stream``/``stream_options`` (model as requested, messages,
  sampling params, tools, tool_choice, response_format, n, seed, reasoning_effort and every extra upstream
  parameter; for embeddings the input, encoding_format and dimensions) plus the routed deployment, and the
  client's own body and dialect headers when it carries them (same-dialect pass-through sends fields the chat model
  does not hold). ``scillm_metadata``, ``timeout``, the session and the request id never enter the key.
- Non-streaming answers are stored (TTL): in a memory LRU bounded by ``max_entries``, or in the state store
  (``[state]``: Redis shares hits between every process and instance, SQLite between the processes of a machine),
  with the upstream's own body when it came in the client's dialect, so a hit answers as the upstream did.
- Streams: a hit is served as a synthesized stream of the cached answer; a miss passes through untouched and is
  not stored (``x-scillm-cache: miss``).
- Identical in-flight requests share one upstream call (single-flight); an error is shared with the waiters, never
  cached. With the state store, identical requests in other processes wait for the first one's stored answer
  (a flight document with a TTL), and call the upstream themselves only if it does not come.
- ``Cache-Control: no-cache`` skips the lookup (the fresh answer is stored); ``no-store`` or ``"cache": false`` in
  the body bypass the cache entirely (both answer ``bypass``). Every answer says ``x-scillm-cache: hit|miss|bypass``.
- Fails open: a broken backend (Redis down, corrupt entry) is a miss, never a failed request.

- Scoped (``scope``): by default a hit is only ever the caller's own key's answer (the master and dev key share
  one partition), so a virtual key can neither read another key's answers nor learn from a hit that another key
  asked the same; ``"team"`` shares within a key's team, ``"shared"`` between everyone (the most hits).

Config: ``[cache] enabled = true`` (off by default), ``backend = "auto"|"memory"|"store"`` (auto: the state store
when it is Redis, else memory), ``ttl_s``, ``max_entries``, ``max_entry_kb``, ``scope = "key"|"team"|"shared"``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from attrs import define, field, frozen

from scillm_core import (
    ChatChunk,
    ChatResponse,
    ChunkChoice,
    Delta,
    EmbeddingsRequest,
    EmbeddingsResponse,
    FunctionCallDelta,
    Route,
    Runtime,
    SurfaceRegistry,
    ToolCallDelta,
    hookimpl,
    structure,
    unstructure,
    with_native,
)
from scillm_core.config import ConfigError
from scillm_core.redact import redact

if TYPE_CHECKING:
    from scillm_core import CallContext, ChatRequest, Identity
    from scillm_core.pipeline import ChatResult, ChatThunk

__all__ = ["CacheConfig", "cache_key", "partition"]

log = logging.getLogger("scillm.cache")
HEADER = "x-scillm-cache"
KEY_VERSION = "v2"


@frozen(kw_only=True)
class CacheConfig:
    enabled: bool = False
    backend: str = "auto"           # auto: the state store when it is Redis ([state]), else memory
    ttl_s: float = 3600.0
    max_entries: int = 1000         # memory backend LRU bound
    max_entry_kb: int = 1024        # larger answers are not stored
    scope: str = "key"              # whose answers a hit may be: "key" (each caller's own), "team", "shared"
    redis_url: str | None = None    # moved to [state]; set here it stops startup saying so


# -- backends ------------------------------------------------------------------------------------------------------

class MemoryBackend:
    name = "memory"

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max(1, max_entries)
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= time.monotonic():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._data[key] = (time.monotonic() + ttl_s, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def close(self) -> None:
        self._data.clear()

    def describe(self) -> dict[str, Any]:
        return {"entries": len(self._data), "max_entries": self.max_entries}


class StoreBackend:
    """The state store (``[state]``): one cache for every process on it. Entries are documents with a TTL."""

    name = "store"
    NAMESPACE = "cache"

    RETRY_S = 1.0  # after a failure the store is left alone this long: a Redis that hangs slows one request

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.retry_at = 0.0

    async def _guard(self, work: Any) -> Any:
        if time.monotonic() < self.retry_at:
            work.close()
            raise ConnectionError("the state store failed a moment ago; not asking it again yet")
        try:
            return await work
        except Exception:
            self.retry_at = time.monotonic() + self.RETRY_S
            raise

    async def get(self, key: str) -> bytes | None:
        doc = await self._guard(self.runtime.store.get(self.NAMESPACE, key))
        return orjson.dumps(doc) if doc is not None else None

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._guard(self.runtime.store.put(self.NAMESPACE, key, orjson.loads(value), ttl_s=ttl_s))

    async def close(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"state_backend": self.runtime.config.state.backend}


# -- per-app state -------------------------------------------------------------------------------------------------

@define
class Flight:
    task: asyncio.Future[Any] | None = None
    waiters: int = 0
    route: Route | None = None
    attempts: int = 0


@define
class CacheState:
    config: CacheConfig
    backend: MemoryBackend | StoreBackend
    flights: dict[str, Flight] = field(factory=dict)
    counts: dict[str, int] = field(factory=lambda: {"hit": 0, "miss": 0, "bypass": 0, "shared": 0,
                                                    "stored": 0, "backend_errors": 0})
    last_error: str | None = None
    counter: Any = None




def _state(runtime: Runtime) -> CacheState | None:
    return runtime.plugin_state.get("cache")  # type: ignore[no-any-return]


def _config(runtime: Runtime) -> CacheConfig:
    return runtime.config.sections.get("cache") or CacheConfig()  # type: ignore[no-any-return]


@hookimpl
def scillm_config_sections() -> Mapping[str, type]:
    return {"cache": CacheConfig}


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    config = _config(runtime)
    if not config.enabled:
        return
    if config.redis_url:
        raise ConfigError("[cache] redis_url moved: set [state] backend = \"redis\" and redis_url there (the cache, "
                          "limits, breakers, batches and leases then share that Redis)")
    if config.backend not in ("auto", "memory", "store"):
        raise ConfigError(f"[cache] backend must be 'auto', 'memory' or 'store', not {config.backend!r}")
    if config.scope not in SCOPES:
        raise ConfigError(f"[cache] scope must be one of {', '.join(SCOPES)}, not {config.scope!r}")
    if config.ttl_s <= 0 or config.max_entries < 1:
        raise ConfigError("[cache] ttl_s must be > 0 and max_entries >= 1")
    use_store = config.backend == "store" or (config.backend == "auto" and runtime.shared)
    backend: MemoryBackend | StoreBackend = StoreBackend(runtime) if use_store else MemoryBackend(config.max_entries)
    state = CacheState(config=config, backend=backend)
    from prometheus_client import Counter

    state.counter = Counter("scillm_cache_requests", "Chat calls by cache outcome", ["result"],
                            registry=runtime.metrics)
    runtime.plugin_state["cache"] = state
    surfaces.on_shutdown(backend.close)


@hookimpl
def scillm_health(runtime: Runtime) -> Mapping[str, Any]:
    state = _state(runtime)
    if state is None:
        return {"cache": {"enabled": False, "fails": "open"}}
    return {"cache": {"enabled": True, "fails": "open", "backend": state.backend.name,
                      **state.backend.describe(), "ttl_s": state.config.ttl_s, "in_flight": len(state.flights),
                      "counts": dict(state.counts), "last_error": state.last_error}}


# -- the key -------------------------------------------------------------------------------------------------------

SCOPES = ("key", "team", "shared")


def partition(identity: Identity, scope: str) -> str | None:
    """Whose entries a caller reads and writes: its key's own (the master and dev key share one), its team's (a
    key without a team: its own), or everyone's (``None``)."""
    if scope == "shared":
        return None
    if scope == "team" and identity.team:
        return f"team:{identity.team}"
    return f"key:{identity.owner}"


def cache_key(request: ChatRequest, route: Route, within: str | None = None) -> str:
    """SHA-256 over everything that changes the answer (see the module docstring), in the partition ``within``."""
    wire = unstructure(request)
    wire.pop("stream", None)
    wire.pop("stream_options", None)
    material: dict[str, Any] = {"v": KEY_VERSION, "deployment": route.deployment, "request": wire}
    if within is not None:
        material["partition"] = within
    native = getattr(request, "native", None)  # embeddings requests have none
    if native is not None:
        body = {k: v for k, v in native.body.items() if k not in ("stream", "stream_options")}
        material["native"] = {"dialect": native.dialect, "body": body, "headers": dict(native.headers)}
    return hashlib.sha256(orjson.dumps(material, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _mode(request: ChatRequest, ctx: CallContext) -> str:
    """``use`` (look up and store), ``refresh`` (store only: no-cache) or ``bypass``."""
    if request.scillm.get("cache") is False:
        return "bypass"
    directives = {d.strip().lower() for d in (ctx.headers.get("cache-control") or "").split(",")}
    if "no-store" in directives:
        return "bypass"
    if "no-cache" in directives or "max-age=0" in directives:
        return "refresh"
    return "use"


def _mark(state: CacheState, ctx: CallContext, result: str, route: Route) -> None:
    ctx.notes.setdefault("headers", {})[HEADER] = result
    ctx.notes["cache"] = result
    state.counts[result] = state.counts.get(result, 0) + 1
    if state.counter is not None:
        state.counter.labels(result).inc()
    ctx.emit("cache", result=result, route=route)


def _backend_failed(state: CacheState, exc: BaseException) -> None:
    state.counts["backend_errors"] += 1
    state.last_error = redact(f"{type(exc).__name__}: {exc}")[:300]
    log.warning("cache backend %s failed (serving without the cache): %s", state.backend.name, state.last_error)


# -- the wrapper ---------------------------------------------------------------------------------------------------

@hookimpl(wrapper=True, tryfirst=True)
def call_provider(request: ChatRequest, route: Route, ctx: CallContext) -> Any:
    call: ChatThunk = yield
    state = _state(ctx.runtime)
    if state is None:
        return call
    mode = _mode(request, ctx)
    if mode == "bypass":
        async def bypass() -> ChatResult:
            _mark(state, ctx, "bypass", route)
            return await call()

        return bypass

    kind = EmbeddingsResponse if isinstance(request, EmbeddingsRequest) else ChatResponse

    async def cached() -> ChatResult:
        key = cache_key(request, route, partition(ctx.identity, state.config.scope))
        if mode == "use":
            hit = await _lookup(state, key, kind)
            if hit is not None:
                response, served = hit
                ctx.route = served
                _mark(state, ctx, "hit", served)
                return _as_stream(response, request) if request.stream else response
        _mark(state, ctx, "miss" if mode == "use" else "bypass", route)
        if request.stream:
            return await call()
        if mode == "use":
            return await _single_flight(state, key, call, ctx, route, kind)
        fresh = await call()
        await _store(state, key, fresh, ctx.route or route)
        return fresh

    return cached


async def _lookup(state: CacheState, key: str, kind: type[Any]) -> tuple[Any, Route] | None:
    """The stored answer as ``kind`` (``ChatResponse`` or ``EmbeddingsResponse``) and the route that served it,
    with the upstream's own body when one was stored."""
    try:
        raw = await state.backend.get(key)
        if raw is None:
            return None
        doc = orjson.loads(raw)
        served = Route(provider=doc["provider"], model=doc["model"], requested=doc["requested"])
        response = structure(doc["response"], kind, what="cached response")
        if isinstance(doc.get("native"), str):  # the upstream's own body (the key holds the client's: same dialect)
            with_native(response, doc["native"].encode())
        return response, served
    except Exception as exc:
        _backend_failed(state, exc)
        return None


async def _store(state: CacheState, key: str, response: Any, served: Route) -> None:
    if not ((isinstance(response, ChatResponse) and response.choices)
            or (isinstance(response, EmbeddingsResponse) and response.data)):
        return
    try:
        doc = {"provider": served.provider, "model": served.model, "requested": served.requested,
               "stored_at": time.time(), "response": unstructure(response)}
        native = getattr(response, "native", None)
        if native is not None:
            doc["native"] = native.decode()
        raw = orjson.dumps(doc)
        if len(raw) > state.config.max_entry_kb * 1024:
            return
        await state.backend.set(key, raw, state.config.ttl_s)
        state.counts["stored"] += 1
    except Exception as exc:
        _backend_failed(state, exc)


async def _single_flight(state: CacheState, key: str, call: ChatThunk, ctx: CallContext,
                         route: Route, kind: type[Any] = ChatResponse) -> ChatResult:
    """The first caller of ``key`` runs the upstream call as a task; identical callers await the same task. The
    task is cancelled only when every waiter has gone (client disconnects)."""
    flight = state.flights.get(key)
    leader = flight is None
    if flight is None:
        flight = Flight()

        async def lead(this: Flight) -> ChatResult:
            try:
                elsewhere = await _other_flight(state, key, kind)
                if elsewhere is not None:  # another process is asking the same: its stored answer is ours
                    response, this.route = elsewhere
                    state.counts["shared"] += 1
                    return response
                try:
                    response = await call()
                    this.route, this.attempts = ctx.route, ctx.attempts
                    await _store(state, key, response, ctx.route or route)
                finally:
                    await _land(state, key)
                return response
            finally:
                if state.flights.get(key) is this:
                    del state.flights[key]

        flight.task = asyncio.ensure_future(lead(flight))
        state.flights[key] = flight
    else:
        state.counts["shared"] += 1
    task = flight.task
    assert task is not None
    flight.waiters += 1
    try:
        result = await asyncio.shield(task)
    except asyncio.CancelledError:
        flight.waiters -= 1
        if flight.waiters <= 0 and not task.done():
            task.cancel()  # nobody waits any more: the upstream call goes too
        raise
    except BaseException:
        flight.waiters -= 1
        raise
    flight.waiters -= 1
    if not leader:
        ctx.route = flight.route or route
    return result  # type: ignore[no-any-return]


FLIGHTS = "cache-flights"
FLIGHT_WAIT_S = 60.0  # the longest another process's identical call is waited for (its flight lapses then)
FLIGHT_POLL_S = (0.01, 0.2)


async def _other_flight(state: CacheState, key: str, kind: type[Any]) -> tuple[Any, Route] | None:
    """With the state store: take the flight of ``key`` for this process (a document with a TTL), or, when another
    process has it, wait for the answer it stores. ``None``: this process calls the upstream."""
    if not isinstance(state.backend, StoreBackend) or time.monotonic() < state.backend.retry_at:
        return None
    store = state.backend.runtime.store
    mine = {"owner": state.backend.runtime.instance_id, "at": time.time()}
    deadline = time.monotonic() + FLIGHT_WAIT_S
    pause = FLIGHT_POLL_S[0]
    try:
        while time.monotonic() < deadline:
            if await store.compare_and_set(FLIGHTS, key, None, mine, ttl_s=FLIGHT_WAIT_S):
                # the flight is this process's; but its last holder stores its answer and then lands, so both may
                # have happened since this process last missed: that answer is still the answer
                hit = await _lookup(state, key, kind)
                if hit is not None:
                    await _land(state, key)
                return hit
            await asyncio.sleep(pause)
            pause = min(pause * 2, FLIGHT_POLL_S[1])
            hit = await _lookup(state, key, kind)
            if hit is not None:
                return hit
    except Exception as exc:
        state.backend.retry_at = time.monotonic() + StoreBackend.RETRY_S
        _backend_failed(state, exc)
    return None


async def _land(state: CacheState, key: str) -> None:
    if isinstance(state.backend, StoreBackend):
        try:
            await state.backend.runtime.store.delete(FLIGHTS, key)
        except Exception as exc:
            _backend_failed(state, exc)


# -- cached answer as a stream -------------------------------------------------------------------------------------

def _as_stream(response: ChatResponse, request: ChatRequest) -> AsyncIterator[ChatChunk]:
    async def chunks() -> AsyncIterator[ChatChunk]:
        base: dict[str, Any] = {"id": response.id, "model": response.model, "created": response.created,
                "system_fingerprint": response.system_fingerprint}
        for choice in response.choices:
            message = choice.message
            yield ChatChunk(**base, choices=(ChunkChoice(index=choice.index, delta=Delta(role="assistant",
                                                                                         content="")),))
            reasoning = message.extra.get("reasoning_content") if message.extra else None
            if reasoning:
                yield ChatChunk(**base, choices=(ChunkChoice(index=choice.index, delta=Delta(
                    extra={"reasoning_content": reasoning})),))
            if message.text:
                yield ChatChunk(**base, choices=(ChunkChoice(index=choice.index, delta=Delta(
                    content=message.text)),))
            if message.tool_calls:
                yield ChatChunk(**base, choices=(ChunkChoice(index=choice.index, delta=Delta(tool_calls=tuple(
                    ToolCallDelta(index=i, id=call.id, type=call.type, function=FunctionCallDelta(
                        name=call.function.name, arguments=call.function.arguments))
                    for i, call in enumerate(message.tool_calls)))),))
            yield ChatChunk(**base, choices=(ChunkChoice(index=choice.index, delta=Delta(),
                                                         finish_reason=choice.finish_reason or "stop"),))
        if request.include_usage and response.usage is not None:
            yield ChatChunk(**base, choices=(), usage=response.usage)

    return chunks()
