"""What happens, reported: the pipeline and plugins emit events, observers (tracing, the dashboard) listen.

``runtime.events`` is the one seam. Emitters call ``events.emit(kind, ctx, **data)``; with nobody listening to
that kind it returns at once, and the per-request paths check ``events.listening`` (and ``wants(kind)`` for the
stages) first, so an app without observers does no observation work at all. Observers are plain functions
``observer(event)``, run synchronously in the emitter's task: they must be quick (anything slow goes to a queue
or a background thread) and treat the data as read-only, with one exception: ``attempt.start`` carries
``upstream_headers``, a dict an observer may add headers to (trace propagation) that core sends with that
upstream request. An observer that raises is logged and counted; it never fails the call that emitted.

Kinds (``ctx`` is the :class:`CallContext` for events of one call, else ``None``):

===================================  ===========================================================================
``request.start`` / ``request.end``  one request through ``run_chat`` (every surface, batch items, llm runs);
                                     end: ``response`` or ``error``, ``usage``, ``duration_s``, ``first_chunk_s``
                                     (streams end when the stream ends, fails or is closed)
``attempt.start`` / ``attempt.end``  one upstream call (core dispatch): ``route``, ``attempt`` (1, 2, ...),
                                     ``request``; start: ``upstream_headers``; end as ``request.end``
``cache``                            ``result`` (hit, miss, bypass), ``route``                 (scillm-cache)
``timeout``                          ``route``, ``limit`` (connect, headers, first_token, idle, total, read),
                                     ``error``: an upstream stayed silent past a limit (core dispatch)
``chunk.skipped``                    ``route``, ``reason``: a stream event that could not be parsed was skipped
                                     (``scillm_core.upstream.Malformed``, in the provider)
``retry``                            ``route``, ``retry`` (1, 2, ...), ``delay_s``, ``error``   (scillm-resilience)
``fallback``                         ``route`` (the one that failed), ``to``, ``error``
``continuation``                     ``route`` (the stream that broke), ``to``, ``error``, ``mode`` (prefill,
                                     instruction), ``sent_chars``; then ``continuation.end`` with ``outcome``
``circuit.skip``                     ``route``, ``remaining_s``: an open circuit skipped this deployment
``queue.wait``                       ``provider``, ``waited_s``, ``outcome`` (granted, timeout): waited for a slot
``breaker.transition``               ``deployment``, ``old``, ``new`` (closed, open, half_open), ``error``,
                                     ``request_id`` (the call that moved it, if any)
===================================  ===========================================================================

The hook stages a call goes through (``preprocess_files``, ``postprocess_json`` and ``call_provider``: routing and
the call_provider chain, again for a JSON re-ask) are not events: while an observer wants ``stage`` (tracing),
core records them on ``ctx.stages`` as :class:`Stage` records, which observers read on the call's events
(:func:`open_stage` is the innermost one running, e.g. on ``attempt.start``; all of them on ``request.end``). A
stage costs a small object and two clock reads, not two events and a wrapper around the step.

Units of work that calls belong to (batches and their items, exec runs and graphs, and whatever agent surfaces
add) follow one convention, so observers handle new ones without change: ``<thing>.start`` and ``<thing>.end``
with ``unit`` (a unique id such as ``"run:run_ab12"``), ``parent`` (the enclosing unit or ``None``), ``name``
(human readable), ``attrs`` (flat, non-secret values) and, on start, ``trace`` (the ``traceparent`` /
``tracestate`` of the HTTP request that started it, see :func:`trace_headers`); end adds ``status`` (``ok``,
``error``, or the unit's own word such as ``timeout``) and ``error`` (a message or ``None``), and may repeat
``parent`` and ``name`` (an end without a start, such as a batch item resumed from storage). In between,
``<thing>.event`` reports progress (``unit``, ``event``: the run's own event record). A call made for a unit
names it in ``CallContext.parent``. :class:`Unit` emits a unit's events. Bundled units: ``batch`` and
``batch.item`` (scillm-batch), ``run`` and ``graph`` (scillm-exec; a graph node's run has the graph as parent),
``run`` (scillm-agents: a worker's process, and each turn inside it) and ``run`` / ``graph`` (scillm-opencode: a
serve run; a transport run and its nodes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scillm_core.context import CallContext

__all__ = ["PARENT_SCOPE_KEY", "Event", "Events", "Observer", "Stage", "Unit", "open_stage", "trace_headers"]

log = logging.getLogger("scillm.events")

TRACE_HEADERS = ("traceparent", "tracestate")
#: ASGI scope key naming the unit an HTTP request is made for (set by middleware, e.g. exec's run keys: a CLI's
#: model call belongs to its run); surfaces pass it on as ``CallContext.parent``.
PARENT_SCOPE_KEY = "scillm.parent"


class Event:
    """One thing that happened: ``kind``, ``ctx`` (the call, or ``None``), ``data`` and ``time_ns`` (epoch)."""

    __slots__ = ("ctx", "data", "kind", "time_ns")

    def __init__(self, kind: str, ctx: CallContext | None, data: dict[str, Any]) -> None:
        self.kind = kind
        self.ctx = ctx
        self.data = data
        self.time_ns = time.time_ns()

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __repr__(self) -> str:
        return f"Event({self.kind!r}, {sorted(self.data)})"


Observer = Callable[[Event], None]


class Events:
    """The observers of one app, by kind. ``listening`` is false while there are none."""

    def __init__(self) -> None:
        self.listening = False
        self.failures = 0
        self._subscriptions: list[tuple[Observer, frozenset[str] | None]] = []
        self._by_kind: dict[str, tuple[Observer, ...]] = {}
        self._any: tuple[Observer, ...] = ()

    def subscribe(self, observer: Observer, kinds: Iterable[str] | None = None) -> Callable[[], None]:
        """Call ``observer`` for every event of ``kinds`` (all kinds when ``None``); returns an unsubscribe."""
        entry = (observer, None if kinds is None else frozenset(kinds))
        self._subscriptions.append(entry)
        self._rebuild()

        def unsubscribe() -> None:
            if entry in self._subscriptions:
                self._subscriptions.remove(entry)
                self._rebuild()

        return unsubscribe

    def wants(self, kind: str) -> bool:
        return bool(self._by_kind.get(kind, self._any))

    def emit(self, kind: str, ctx: CallContext | None = None, /, **data: Any) -> None:
        observers = self._by_kind.get(kind, self._any)
        if not observers:
            return
        event = Event(kind, ctx, data)
        for observer in observers:
            try:
                observer(event)
            except Exception:
                self.failures += 1
                log.warning("observer %s failed on %s", getattr(observer, "__qualname__", observer), kind,
                            exc_info=True)

    def _rebuild(self) -> None:
        self._any = tuple(obs for obs, kinds in self._subscriptions if kinds is None)
        named = {kind for _, kinds in self._subscriptions if kinds for kind in kinds}
        self._by_kind = {kind: tuple(obs for obs, kinds in self._subscriptions if kinds is None or kind in kinds)
                         for kind in named}
        self.listening = bool(self._subscriptions)


class Stage:
    """One hook stage of a call, appended to ``stages`` (the call's ``ctx.stages``) when made: ``name``,
    ``parent`` (the stage it runs in, or ``None``), ``start_ns`` and ``end_ns`` (epoch; ``end_ns`` is 0 while it
    runs) and ``error`` (what it raised). ``with Stage(stages, name): ...`` around the step."""

    __slots__ = ("end_ns", "error", "name", "parent", "start_ns")

    def __init__(self, stages: list[Stage], name: str) -> None:
        self.name = name
        self.parent = open_stage(stages)
        self.error: BaseException | None = None
        self.end_ns = 0
        stages.append(self)
        self.start_ns = time.time_ns()

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        self.end_ns = time.time_ns()
        self.error = error

    def __repr__(self) -> str:
        return f"Stage({self.name!r}, {'running' if not self.end_ns else 'ended'})"


def open_stage(stages: list[Stage] | None) -> Stage | None:
    """The innermost stage of ``stages`` still running, if any."""
    if stages:
        for stage in reversed(stages):
            if not stage.end_ns:
                return stage
    return None


class Unit:
    """A unit of work as events report it (see the module doc): ``<kind>.start`` when made, then ``<kind>.event``
    for progress (only while someone listens) and ``<kind>.end`` once. ``unit`` is its id (``"run:..."``), what its
    calls name in ``CallContext.parent`` or, for a child's HTTP calls, ``PARENT_SCOPE_KEY``."""

    __slots__ = ("ended", "events", "kind", "unit")

    def __init__(self, events: Events, kind: str, unit: str, *, name: str, parent: str | None = None,
                 trace: Mapping[str, str] | None = None, attrs: Mapping[str, Any] | None = None,
                 owner: str | None = None) -> None:
        self.events, self.kind, self.unit, self.ended = events, kind, unit, False
        events.emit(f"{kind}.start", None, unit=unit, parent=parent, name=name, trace=dict(trace or {}),
                    attrs=dict(attrs or {}), owner=owner)

    def event(self, record: Mapping[str, Any]) -> None:
        kind = f"{self.kind}.event"
        if not self.ended and self.events.wants(kind):
            self.events.emit(kind, None, unit=self.unit, event=record)

    def end(self, status: str, error: str | None = None, **attrs: Any) -> None:
        """``status``: ``ok`` / ``completed``, or the unit's own word (``failed``, ``timeout``, ...)."""
        if not self.ended:
            self.ended = True
            self.events.emit(f"{self.kind}.end", None, unit=self.unit, status=status, error=error, attrs=attrs)


def trace_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The W3C trace context of incoming ``headers`` (``traceparent``, ``tracestate``), nothing else: what a unit's
    start event carries so that a tracer can continue the caller's trace."""
    if not headers:
        return {}
    return {name: value[:512] for name in TRACE_HEADERS if (value := headers.get(name))}
