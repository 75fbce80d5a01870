"""Events in, spans out: one trace per request (or per batch / run), following the OpenTelemetry GenAI semantic
conventions.

::

    chat <model>                  request (SERVER; INTERNAL under a unit), continues a client's traceparent
      preprocess_files            hook stage
      postprocess_json            hook stage
        call_provider             hook stage: routing and the call_provider chain (a JSON re-ask adds another)
          queue wait <provider>   waiting for a concurrency slot
          circuit open <deploy>   a deployment skipped by its open circuit
          cache hit               answered from the cache
          chat <upstream model>   each upstream attempt (CLIENT): first, retry or fallback, siblings

    batch <pool> / exec <profile> / exec graph     units of work; their items, runs and calls nest under them

Nothing is recorded from message text unless ``record_content`` is on, and then redacted; headers never are.

Spans are the SDK's ``ReadableSpan``, made by :class:`Recorder` when they end (events say when they started), with
the SDK's sampler, ids and resource, and handed to its ``BatchSpanProcessor``: the SDK's live ``Span`` (locks,
attribute validation on every set, a context object per parent) cost more per span than the whole request's
budget for tracing.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event as SpanEvent
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from scillm_core import ChatRequest, ChatResponse, errors
from scillm_core.redact import redact

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from scillm_core import CallContext, Route
    from scillm_core.events import Event
    from scillm_core.pipeline import ProviderRequest

__all__ = ["OpenSpan", "Recorder", "SpanMaker"]

NOTE = "tracing"
MAX_UNITS = 10_000       # open unit spans kept (a unit that never ends is dropped past this)
MAX_UNIT_EVENTS = 200    # span events per unit (a run's progress)
#: gen_ai.provider.name for scillm provider names the conventions know under another name
PROVIDER_NAMES = {"anthropic": "anthropic", "claude-oauth": "anthropic", "gemini": "gcp.gemini", "openai": "openai",
                  "codex": "openai", "deepseek": "deepseek", "ollama": "ollama"}


class OpenSpan:
    """A span between its start and end events: what it will be exported as, if ``sampled``."""

    __slots__ = ("attributes", "context", "events", "kind", "name", "parent", "sampled", "start", "status")

    def __init__(self, name: str, context: SpanContext, parent: SpanContext | None, kind: SpanKind,
                 attributes: dict[str, Any], start: int, sampled: bool) -> None:
        self.name, self.context, self.parent, self.kind = name, context, parent, kind
        self.attributes, self.start, self.sampled = attributes, start, sampled
        self.events: list[SpanEvent] = []
        self.status = Status(StatusCode.UNSET)

    def fail(self, error_type: str, description: str) -> None:
        self.attributes["error.type"] = error_type
        self.status = Status(StatusCode.ERROR, description)

    def add_event(self, name: str, attributes: dict[str, Any], timestamp: int) -> None:
        self.events.append(SpanEvent(name, attributes, timestamp))

    @property
    def traceparent(self) -> str:
        context = self.context
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


class Recorder:
    """Starts and ends spans: the sampler decides for a new trace (or one continued from a caller), children follow
    their parent; an ended sampled span goes to the processor."""

    def __init__(self, processor: SpanProcessor, resource: Resource, sampler: Sampler,
                 scope: InstrumentationScope) -> None:
        self.processor, self.resource, self.sampler, self.scope = processor, resource, sampler, scope
        self.ids = RandomIdGenerator()

    def start(self, name: str, parent: OpenSpan | Context | None, kind: SpanKind, attributes: dict[str, Any],
              start: int) -> OpenSpan:
        if isinstance(parent, OpenSpan):
            context = parent.context
            return OpenSpan(name, SpanContext(context.trace_id, self.ids.generate_span_id(), False,
                                              context.trace_flags, context.trace_state),
                            context, kind, attributes, start, parent.sampled)
        remote = get_current_span(parent).get_span_context() if parent is not None else None
        if remote is not None and not remote.is_valid:
            remote, parent = None, None
        trace_id = remote.trace_id if remote is not None else self.ids.generate_trace_id()
        result = self.sampler.should_sample(parent, trace_id, name, kind, attributes)
        sampled = result.decision.is_sampled()
        context = SpanContext(trace_id, self.ids.generate_span_id(), False,
                              TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT), result.trace_state)
        return OpenSpan(name, context, remote, kind, attributes, start, sampled)

    def end(self, span: OpenSpan, end: int | None = None) -> None:
        if span.sampled:
            self.processor.on_end(ReadableSpan(
                name=span.name, context=span.context, parent=span.parent, resource=self.resource,
                attributes=span.attributes, events=tuple(span.events), kind=span.kind, status=span.status,
                start_time=span.start, end_time=end or time.time_ns(), instrumentation_scope=self.scope))


class CallSpans:
    """The open spans of one call (kept in ``ctx.notes["tracing"]``)."""

    __slots__ = ("attempts", "next_attempt", "request", "stages")

    def __init__(self, request: OpenSpan) -> None:
        self.request = request
        self.stages: list[OpenSpan] = []
        self.attempts: dict[int, OpenSpan] = {}
        self.next_attempt: tuple[str, str | None] = ("first", None)  # kind, the deployment it falls back from

    def parent(self) -> OpenSpan:
        return self.stages[-1] if self.stages else self.request


class SpanMaker:
    """The observer: subscribed to every event kind while tracing is on."""

    def __init__(self, recorder: Recorder, *, secrets: tuple[str, ...] = (), record_content: bool = False,
                 max_content_chars: int = 4096) -> None:
        self.rec = recorder
        self.secrets = secrets
        self.record_content = record_content
        self.max_content_chars = max_content_chars
        self.propagator = TraceContextTextMapPropagator()
        self.units: collections.OrderedDict[str, OpenSpan] = collections.OrderedDict()
        self.unit_events: dict[str, int] = {}
        self.handlers = {
            "request.start": self.request_start, "request.end": self.request_end,
            "stage.start": self.stage_start, "stage.end": self.stage_end,
            "attempt.start": self.attempt_start, "attempt.end": self.attempt_end,
            "retry": self.retry, "fallback": self.fallback, "circuit.skip": self.circuit_skip,
            "cache": self.cache, "queue.wait": self.queue_wait,
        }

    def __call__(self, event: Event) -> None:
        handler = self.handlers.get(event.kind)
        if handler is not None:
            if event.ctx is not None:
                handler(event)
            return
        if "unit" in event.data:
            kind = event.kind.rpartition(".")[2]
            if kind == "start":
                self.unit_start(event)
            elif kind == "end":
                self.unit_end(event)
            elif kind == "event":
                self.unit_event(event)

    # -- helpers --------------------------------------------------------------------------------------------------

    def _context(self, unit: str | None, headers: Mapping[str, str] | None) -> OpenSpan | Context | None:
        """The parent of a new span: an open unit, else the caller's trace context, else none (a new trace)."""
        if unit is not None:
            span = self.units.get(unit)
            if span is not None:
                return span
        if headers and headers.get("traceparent"):
            return self.propagator.extract(headers, context=Context())
        return None

    def _text(self, value: Any, limit: int = 300) -> str:
        return redact(str(value), self.secrets)[:limit]

    def _fail(self, span: OpenSpan, error: BaseException) -> None:
        if isinstance(error, GeneratorExit | KeyboardInterrupt) or type(error).__name__ == "CancelledError":
            span.fail("cancelled", "cancelled (the client went away)")
            return
        code = getattr(error, "code", None) or type(error).__name__
        span.fail(str(code), self._text(getattr(error, "message", None) or error))

    def _calls(self, ctx: CallContext) -> CallSpans | None:
        return ctx.notes.get(NOTE)  # type: ignore[no-any-return]

    def _content(self, payload: Any) -> str:
        text = orjson.dumps(payload, default=str).decode()
        return redact(text, self.secrets)[:self.max_content_chars]

    # -- one call -------------------------------------------------------------------------------------------------

    def request_start(self, event: Event) -> None:
        ctx: CallContext = event.ctx  # type: ignore[assignment]
        request: ProviderRequest = event["request"]
        operation = _operation(request)
        attrs: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.request.model": request.model,
                                 "scillm.request_id": ctx.request_id, "scillm.stream": request.stream}
        if ctx.caller:
            attrs["scillm.caller"] = ctx.caller
        if self.record_content and isinstance(request, ChatRequest):
            attrs["gen_ai.input.messages"] = self._content(
                [{"role": m.role, "content": m.text} for m in request.messages])
        span = self.rec.start(f"{operation} {request.model}", self._context(ctx.parent, ctx.headers),
                              SpanKind.INTERNAL if ctx.parent else SpanKind.SERVER, attrs, event.time_ns)
        ctx.notes[NOTE] = CallSpans(span)

    def request_end(self, event: Event) -> None:
        ctx: CallContext = event.ctx  # type: ignore[assignment]
        calls = self._calls(ctx)
        if calls is None:
            return
        span = calls.request
        if span.sampled:
            attrs: dict[str, Any] = {"scillm.attempts": ctx.attempts}
            route = ctx.route
            if route is not None:
                _provider(route, attrs)
            response = event["response"]
            if response is not None:
                attrs["gen_ai.response.model"] = response.model
                if self.record_content and isinstance(response, ChatResponse):
                    attrs["gen_ai.output.messages"] = self._content(
                        [{"role": c.message.role, "content": c.message.text, "finish_reason": c.finish_reason}
                         for c in response.choices])
            elif route is not None:
                attrs["gen_ai.response.model"] = route.model
            _usage(event["usage"], attrs)
            cost = ctx.notes.get("cost_usd")
            if cost is not None:
                attrs["scillm.cost_usd"] = cost
            cache = ctx.notes.get("cache")
            if cache:
                attrs["scillm.cache"] = cache
            if event["first_chunk_s"] is not None:
                attrs["scillm.first_chunk_s"] = round(event["first_chunk_s"], 6)
            error = event["error"]
            if error is None:
                attrs["http.response.status_code"] = 200
            elif isinstance(error, Exception):
                attrs["http.response.status_code"] = errors.to_response_parts(error)[0]
            span.attributes.update(attrs)
            if error is not None:
                self._fail(span, error)
        for stage in reversed(calls.stages):  # left open by a failure that skipped their end
            self.rec.end(stage, event.time_ns)
        self.rec.end(span, event.time_ns)
        del ctx.notes[NOTE]

    def stage_start(self, event: Event) -> None:
        calls = self._calls(event.ctx)  # type: ignore[arg-type]
        if calls is None:
            return
        calls.stages.append(self.rec.start(event["stage"], calls.parent(), SpanKind.INTERNAL, {}, event.time_ns))

    def stage_end(self, event: Event) -> None:
        calls = self._calls(event.ctx)  # type: ignore[arg-type]
        if calls is None or not calls.stages:
            return
        span = calls.stages.pop()
        if event["error"] is not None and span.sampled:
            self._fail(span, event["error"])
        self.rec.end(span, event.time_ns)

    def attempt_start(self, event: Event) -> None:
        calls = self._calls(event.ctx)  # type: ignore[arg-type]
        if calls is None:
            return
        route: Route = event["route"]
        kind, after = calls.next_attempt
        calls.next_attempt = ("retry", None)  # unless a fallback event says otherwise
        operation = _operation(event["request"])
        attrs: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.request.model": route.model,
                                 "scillm.attempt": event["attempt"], "scillm.attempt.kind": kind}
        _provider(route, attrs)
        if after is not None:
            attrs["scillm.fallback.from"] = after
        _request_params(event["request"], attrs)
        span = self.rec.start(f"{operation} {route.model}", calls.parent(), SpanKind.CLIENT, attrs, event.time_ns)
        calls.attempts[event["attempt"]] = span
        headers = event["upstream_headers"]
        headers["traceparent"] = span.traceparent
        if span.context.trace_state:
            headers["tracestate"] = span.context.trace_state.to_header()

    def attempt_end(self, event: Event) -> None:
        calls = self._calls(event.ctx)  # type: ignore[arg-type]
        if calls is None:
            return
        span = calls.attempts.pop(event["attempt"], None)
        if span is None:
            return
        if span.sampled:
            attrs: dict[str, Any] = {}
            response = event["response"]
            if response is not None:
                attrs["gen_ai.response.model"] = response.model
            if isinstance(response, ChatResponse):
                attrs["gen_ai.response.id"] = response.id
                reasons = [c.finish_reason for c in response.choices if c.finish_reason]
                if reasons:
                    attrs["gen_ai.response.finish_reasons"] = reasons
            _usage(event["usage"], attrs)
            if event["first_chunk_s"] is not None:
                attrs["scillm.first_chunk_s"] = round(event["first_chunk_s"], 6)
            error = event["error"]
            if error is not None and isinstance(error, errors.UpstreamError) and error.upstream_status:
                attrs["http.response.status_code"] = error.upstream_status
            span.attributes.update(attrs)
            if error is not None:
                self._fail(span, error)
        self.rec.end(span, event.time_ns)

    def retry(self, event: Event) -> None:
        calls = self._calls(event.ctx)  # type: ignore[arg-type]
        if calls is not None and calls.stages:
            calls.stages[-1].add_event("retry", {"scillm.retry": event["retry"], "scillm.delay_s": event["delay_s"],
                                                 "error.type": str(getattr(event["error"], "code", None) or
                                                                   type(event["error"]).__name__)}, event.time_ns)
        if calls is not None:
            calls.next_attempt = ("retry", None)

    def fallback(self, event: Event) -> None:
        calls = self._calls(event.ctx)  # type: ignore[arg-type]
        if calls is not None:
            calls.next_attempt = ("fallback", event["route"].deployment)

    def circuit_skip(self, event: Event) -> None:
        route: Route = event["route"]
        span = self._mark(event, f"circuit open {route.deployment}",
                          {"scillm.deployment": route.deployment, "scillm.provider": route.provider,
                           "scillm.circuit.remaining_s": round(event["remaining_s"], 3)})
        if span is not None:
            span.status = Status(StatusCode.ERROR, "circuit open: deployment skipped")
            self.rec.end(span, event.time_ns)
        calls = self._calls(event.ctx)  # type: ignore[arg-type]
        if calls is not None:
            calls.next_attempt = ("fallback", route.deployment)

    def cache(self, event: Event) -> None:
        if event["result"] != "hit":
            return
        route: Route = event["route"]
        span = self._mark(event, "cache hit", {"scillm.cache": "hit", "scillm.deployment": route.deployment})
        if span is not None:
            self.rec.end(span, event.time_ns)

    def queue_wait(self, event: Event) -> None:
        waited_ns = int(event["waited_s"] * 1e9)
        span = self._mark(event, f"queue wait {event['provider']}",
                          {"scillm.provider": event["provider"], "scillm.queue.outcome": event["outcome"],
                           "scillm.queue.waited_s": round(event["waited_s"], 6)}, start=event.time_ns - waited_ns)
        if span is not None:
            if event["outcome"] != "granted":
                span.status = Status(StatusCode.ERROR, f"no concurrency slot ({event['outcome']})")
            self.rec.end(span, event.time_ns)

    def _mark(self, event: Event, name: str, attrs: dict[str, Any], start: int | None = None) -> OpenSpan | None:
        calls = self._calls(event.ctx)  # type: ignore[arg-type]
        if calls is None:
            return None
        return self.rec.start(name, calls.parent(), SpanKind.INTERNAL, attrs,
                              event.time_ns if start is None else start)

    # -- units of work (batches, items, runs, graphs, and whatever agent surfaces add) --------------------------

    def unit_start(self, event: Event) -> None:
        unit = event["unit"]
        parent = self._context(event.get("parent"), event.get("trace"))
        attrs = _flat(event.get("attrs") or {}, prefix="scillm.")
        attrs["scillm.unit"] = unit
        span = self.rec.start(event.get("name") or unit, parent, SpanKind.INTERNAL if isinstance(parent, OpenSpan)
                              else SpanKind.SERVER, attrs, event.time_ns)
        self.units[unit] = span
        while len(self.units) > MAX_UNITS:
            old, dropped = self.units.popitem(last=False)
            self.unit_events.pop(old, None)
            self.rec.end(dropped)

    def unit_end(self, event: Event) -> None:
        unit = event["unit"]
        span = self.units.pop(unit, None)
        self.unit_events.pop(unit, None)
        if span is None:  # ended without a start (an item resumed from an earlier run): a point in the trace
            span = self.rec.start(event.get("name") or unit, self._context(event.get("parent"), None),
                                  SpanKind.INTERNAL, {"scillm.unit": unit}, event.time_ns)
        if span.sampled:
            span.attributes.update(_flat(event.get("attrs") or {}, prefix="scillm."))
            status = event.get("status") or "ok"
            span.attributes["scillm.status"] = status
            if status not in ("ok", "completed"):
                span.status = Status(StatusCode.ERROR, self._text(event.get("error") or status))
        self.rec.end(span, event.time_ns)

    def unit_event(self, event: Event) -> None:
        unit = event["unit"]
        span = self.units.get(unit)
        if span is None or not span.sampled:
            return
        count = self.unit_events.get(unit, 0)
        if count >= MAX_UNIT_EVENTS:
            return
        self.unit_events[unit] = count + 1
        record = event.get("event") or {}
        attrs = {"scillm.event.type": str(record.get("type") or record.get("kind") or "event")[:100]}
        if isinstance(record.get("seq"), int):
            attrs["scillm.event.seq"] = record["seq"]
        span.add_event(attrs["scillm.event.type"], attrs, event.time_ns)

    def close(self) -> None:
        """End every open unit span (shutdown)."""
        while self.units:
            _, span = self.units.popitem()
            self.rec.end(span)


def _provider(route: Route, attrs: dict[str, Any]) -> None:
    """``gen_ai.provider.name``, and scillm's own provider name when the conventions call it otherwise."""
    name = PROVIDER_NAMES.get(route.provider, route.provider)
    attrs["gen_ai.provider.name"] = name
    if name != route.provider:
        attrs["scillm.provider"] = route.provider


def _operation(request: ProviderRequest) -> str:
    return "chat" if isinstance(request, ChatRequest) else "embeddings"


def _request_params(request: ProviderRequest, attrs: dict[str, Any]) -> None:
    if not isinstance(request, ChatRequest):
        return
    if request.temperature is not None:
        attrs["gen_ai.request.temperature"] = request.temperature
    if request.top_p is not None:
        attrs["gen_ai.request.top_p"] = request.top_p
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is not None:
        attrs["gen_ai.request.max_tokens"] = max_tokens
    if request.seed is not None:
        attrs["gen_ai.request.seed"] = request.seed


def _usage(usage: Any, attrs: dict[str, Any]) -> None:
    if usage is not None:
        attrs["gen_ai.usage.input_tokens"] = usage.prompt_tokens
        attrs["gen_ai.usage.output_tokens"] = usage.completion_tokens


def _flat(values: Mapping[str, Any], *, prefix: str) -> dict[str, Any]:
    """Scalar attributes only (others as short strings); ``None`` dropped."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        out[prefix + key] = value if isinstance(value, str | bool | int | float) else str(value)[:300]
    return out
