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

    batch <pool> / exec <profile> / agent <worker> / exec graph    units of work; their items, runs, turns and
                                                                    calls nest under them

Nothing is recorded from message text unless ``record_content`` is on, and then redacted; headers never are.

A span here is a plain :class:`Span` (ids are integers, attributes a dict), made when its start event comes and
finished when its end event does (a hook stage's from the call's ``ctx.stages`` records, when a span under it
starts or else when the call ends); a call's spans go to the exporter together when the call ends, a unit's span when
the unit ends, and are encoded as OTLP protobuf there (``otlp.py``); its thread sends them.
No OpenTelemetry SDK object is made on the request path: the SDK's live spans (locks, attribute validation on
every set, a context object per parent) and its batch processor (a lock and a notify per span) cost more than the
whole budget of tracing (1.15x the CPU of a request).
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from scillm_core import ChatRequest, ChatResponse, errors
from scillm_core.events import open_stage
from scillm_core.redact import redact

if TYPE_CHECKING:
    from scillm_core import CallContext, Route
    from scillm_core.events import Event, Stage
    from scillm_core.pipeline import ProviderRequest

__all__ = ["CLIENT", "INTERNAL", "SERVER", "Sampler", "Span", "SpanMaker", "Trace", "parse_traceparent"]

NOTE = "tracing"
MAX_UNITS = 10_000       # open unit spans kept (a unit that never ends is dropped past this)
MAX_UNIT_EVENTS = 200    # span events per unit (a run's progress)
INTERNAL, SERVER, CLIENT = 1, 2, 3  # OTLP span kinds
UNSET, OK, ERROR = 0, 1, 2          # OTLP status codes
#: gen_ai.provider.name for scillm provider names the conventions know under another name
PROVIDER_NAMES = {"anthropic": "anthropic", "claude-oauth": "anthropic", "gemini": "gcp.gemini", "openai": "openai",
                  "codex": "openai", "deepseek": "deepseek", "ollama": "ollama"}
_random_bits = random.getrandbits  # W3C asks for random ids, not secret ones
_HEX = "0123456789abcdef"


class Trace:
    """What the spans of one trace share: its id, the caller's ``tracestate`` and whether it is sampled
    (``encoded``: the exporter's encoding of the first two)."""

    __slots__ = ("encoded", "sampled", "state", "trace_id")

    def __init__(self, trace_id: int, sampled: bool, state: str | None = None) -> None:
        self.trace_id, self.sampled, self.state = trace_id, sampled, state
        self.encoded: bytes | None = None


class Span:
    """One span: ``start`` / ``end`` in epoch ns, ``status`` an OTLP status code, ``events`` as
    ``(name, attributes, time_ns)``; ``remote_parent`` when the parent is a caller's span."""

    __slots__ = ("attrs", "end", "events", "kind", "message", "name", "parent_id", "remote_parent", "span_id",
                 "start", "status", "trace")

    def __init__(self, trace: Trace, parent_id: int | None, name: str, kind: int, start: int,
                 attrs: dict[str, Any]) -> None:
        self.trace, self.parent_id, self.name, self.kind, self.start, self.attrs = \
            trace, parent_id, name, kind, start, attrs
        self.span_id = _random_bits(64) or 1
        self.end = 0
        self.status = UNSET
        self.message = ""
        self.events: list[tuple[str, dict[str, Any], int]] | None = None
        self.remote_parent = False

    def fail(self, error_type: str | None, message: str) -> None:
        if error_type is not None:
            self.attrs["error.type"] = error_type
        self.status, self.message = ERROR, message

    def add_event(self, name: str, attrs: dict[str, Any], time_ns: int) -> None:
        if self.events is None:
            self.events = []
        self.events.append((name, attrs, time_ns))

    def child(self, name: str, kind: int, start: int, attrs: dict[str, Any]) -> Span:
        return Span(self.trace, self.span_id, name, kind, start, attrs)

    @property
    def traceparent(self) -> str:
        trace = self.trace  # (to_bytes().hex() is twice as fast as formatting with :032x)
        return (f"00-{trace.trace_id.to_bytes(16, 'big').hex()}-{self.span_id.to_bytes(8, 'big').hex()}-"
                f"{'01' if trace.sampled else '00'}")


class Sampler:
    """The SDK's samplers as numbers: a new trace is kept when its id's low 64 bits fall under ``ratio`` of the
    range (``TraceIdRatioBased``); a continued trace follows the caller's sampled flag when ``parent_based``."""

    def __init__(self, ratio: float, parent_based: bool) -> None:
        self.bound = round(ratio * (1 << 64))
        self.parent_based = parent_based

    def __call__(self, trace_id: int, parent_sampled: bool | None) -> bool:
        if parent_sampled is not None and self.parent_based:
            return parent_sampled
        return (trace_id & 0xFFFFFFFFFFFFFFFF) < self.bound


def parse_traceparent(headers: Mapping[str, str] | None) -> tuple[int, int, bool, str | None] | None:
    """``(trace_id, parent span id, sampled, tracestate)`` of a valid W3C ``traceparent``, else ``None``."""
    if not headers or "traceparent" not in headers:  # (no KeyError raised and caught inside Starlette's get)
        return None
    value = headers["traceparent"]
    if not value:
        return None
    parts = value.strip().lower().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or (parts[0] == "00" and len(parts) != 4):
        return None
    version, trace_hex, span_hex, flags = parts[:4]
    if len(trace_hex) != 32 or len(span_hex) != 16 or len(flags) != 2 or \
            not all(c in _HEX for c in version + trace_hex + span_hex + flags):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    state = headers.get("tracestate")
    if state:
        state = ",".join(member.strip() for member in state.split(",") if member.strip())[:512] or None
    return trace_id, span_id, bool(int(flags, 16) & 1), state or None


class CallSpans:
    """The open spans of one call (kept in ``ctx.notes["tracing"]``) and those it finished; ``stages`` is the
    call's ``ctx.stages`` (core records the hook stages there), ``stage_spans`` their spans made so far."""

    __slots__ = ("attempts", "done", "next_attempt", "request", "stage_spans", "stages")

    def __init__(self, request: Span, stages: list[Stage] | None) -> None:
        self.request = request
        self.stages = stages
        self.stage_spans: dict[Stage, Span] = {}
        self.attempts: dict[int, Span] = {}
        self.done: list[Span] = []
        self.next_attempt: tuple[str, str | None] = ("first", None)  # kind, the deployment it falls back from

    def parent(self) -> Span:
        """The span of the innermost stage running (of the request when none is, or when not sampled)."""
        stage = open_stage(self.stages)
        if stage is None or not self.request.trace.sampled:
            return self.request
        return self.stage_span(stage)

    def stage_span(self, stage: Stage) -> Span:
        span = self.stage_spans.get(stage)
        if span is None:
            parent = self.request if stage.parent is None else self.stage_span(stage.parent)
            span = self.stage_spans[stage] = parent.child(stage.name, INTERNAL, stage.start_ns, {})
        return span


class SpanMaker:
    """The observer (subscribed to every event kind while tracing is on): ``export(spans)`` receives a finished
    call's sampled spans, or a finished unit's span."""

    def __init__(self, export: Callable[[list[Span]], None], sampler: Sampler, *, secrets: tuple[str, ...] = (),
                 record_content: bool = False, max_content_chars: int = 4096) -> None:
        self.export = export
        self.sampler = sampler
        self.secrets = secrets
        self.record_content = record_content
        self.max_content_chars = max_content_chars
        self.units: collections.OrderedDict[str, Span] = collections.OrderedDict()
        self.unit_events: dict[str, int] = {}
        self.handlers = {
            "request.start": self.request_start, "request.end": self.request_end,
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

    def _root(self, unit: str | None, headers: Mapping[str, str] | None, name: str, start: int,
              attrs: dict[str, Any]) -> Span:
        """A span under an open unit, else continuing the caller's trace context, else a new trace."""
        if unit is not None:
            parent = self.units.get(unit)
            if parent is not None:
                return parent.child(name, INTERNAL, start, attrs)
        remote = parse_traceparent(headers)
        if remote is None:
            trace_id = _random_bits(128) or 1
            return Span(Trace(trace_id, self.sampler(trace_id, None)), None, name, SERVER, start, attrs)
        trace_id, parent_id, parent_sampled, state = remote
        span = Span(Trace(trace_id, self.sampler(trace_id, parent_sampled), state), parent_id, name, SERVER, start,
                    attrs)
        span.remote_parent = True
        return span

    def _text(self, value: Any, limit: int = 300) -> str:
        return redact(str(value), self.secrets)[:limit]

    def _fail(self, span: Span, error: BaseException) -> None:
        if isinstance(error, GeneratorExit | KeyboardInterrupt) or type(error).__name__ == "CancelledError":
            span.fail("cancelled", "cancelled (the client went away)")
            return
        code = getattr(error, "code", None) or type(error).__name__
        span.fail(str(code), self._text(getattr(error, "message", None) or error))

    def _content(self, payload: Any) -> str:
        text = orjson.dumps(payload, default=str).decode()
        return redact(text, self.secrets)[:self.max_content_chars]

    # -- one call -------------------------------------------------------------------------------------------------

    def request_start(self, event: Event) -> None:
        ctx: CallContext = event.ctx  # type: ignore[assignment]
        request: ProviderRequest = event.data["request"]
        operation = "chat" if isinstance(request, ChatRequest) else "embeddings"
        attrs: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.request.model": request.model,
                                 "scillm.request_id": ctx.request_id, "scillm.stream": request.stream}
        if ctx.caller:
            attrs["scillm.caller"] = ctx.caller
        if self.record_content and isinstance(request, ChatRequest):
            attrs["gen_ai.input.messages"] = self._content(
                [{"role": m.role, "content": m.text} for m in request.messages])
        ctx.notes[NOTE] = CallSpans(self._root(ctx.parent, ctx.headers, f"{operation} {request.model}",
                                               event.time_ns, attrs), ctx.stages)

    def request_end(self, event: Event) -> None:
        ctx: CallContext = event.ctx  # type: ignore[assignment]
        calls: CallSpans | None = ctx.notes.pop(NOTE, None)
        if calls is None:
            return
        span = calls.request
        if not span.trace.sampled:
            return
        data = event.data
        attrs = span.attrs
        attrs["scillm.attempts"] = ctx.attempts
        route = ctx.route
        if route is not None:
            _provider(route, attrs)
        response = data["response"]
        if response is not None:
            attrs["gen_ai.response.model"] = response.model
            if self.record_content and isinstance(response, ChatResponse):
                attrs["gen_ai.output.messages"] = self._content(
                    [{"role": c.message.role, "content": c.message.text, "finish_reason": c.finish_reason}
                     for c in response.choices])
        elif route is not None:
            attrs["gen_ai.response.model"] = route.model
        usage = data["usage"]
        if usage is not None:
            attrs["gen_ai.usage.input_tokens"] = usage.prompt_tokens
            attrs["gen_ai.usage.output_tokens"] = usage.completion_tokens
        notes = ctx.notes
        if notes:
            cost = notes.get("cost_usd")
            if cost is not None:
                attrs["scillm.cost_usd"] = cost
            cache = notes.get("cache")
            if cache:
                attrs["scillm.cache"] = cache
        if data["first_chunk_s"] is not None:
            attrs["scillm.first_chunk_s"] = round(data["first_chunk_s"], 6)
        error = data["error"]
        if error is None:
            attrs["http.response.status_code"] = 200
        else:
            if isinstance(error, Exception):
                attrs["http.response.status_code"] = errors.to_response_parts(error)[0]
            self._fail(span, error)
        end = event.time_ns
        done = calls.done
        for stage in calls.stages or ():
            stage_span = calls.stage_span(stage)
            stage_span.end = stage.end_ns or end  # (0: still running when the call ended)
            if stage.error is not None:
                self._fail(stage_span, stage.error)
            done.append(stage_span)
        for attempt in calls.attempts.values():  # an attempt whose end never came (a stream nobody finished)
            attempt.end = end
            done.append(attempt)
        span.end = end
        done.append(span)
        self.export(done)

    def attempt_start(self, event: Event) -> None:
        calls: CallSpans | None = event.ctx.notes.get(NOTE)  # type: ignore[union-attr]
        if calls is None:
            return
        data = event.data
        route: Route = data["route"]
        request = data["request"]
        kind, after = calls.next_attempt
        calls.next_attempt = ("retry", None)  # unless a fallback event says otherwise
        operation = "chat" if isinstance(request, ChatRequest) else "embeddings"
        attrs: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.request.model": route.model,
                                 "scillm.attempt": data["attempt"], "scillm.attempt.kind": kind}
        _provider(route, attrs)
        if after is not None:
            attrs["scillm.fallback.from"] = after
        if isinstance(request, ChatRequest):
            _request_params(request, attrs)
        span = calls.parent().child(f"{operation} {route.model}", CLIENT, event.time_ns, attrs)
        calls.attempts[data["attempt"]] = span
        headers = data["upstream_headers"]
        headers["traceparent"] = span.traceparent
        if span.trace.state:
            headers["tracestate"] = span.trace.state

    def attempt_end(self, event: Event) -> None:
        calls: CallSpans | None = event.ctx.notes.get(NOTE)  # type: ignore[union-attr]
        if calls is None:
            return
        data = event.data
        span = calls.attempts.pop(data["attempt"], None)
        if span is None or not span.trace.sampled:
            return
        attrs = span.attrs
        response = data["response"]
        if response is not None:
            attrs["gen_ai.response.model"] = response.model
            if isinstance(response, ChatResponse):
                attrs["gen_ai.response.id"] = response.id
                reasons = tuple(c.finish_reason for c in response.choices if c.finish_reason)
                if reasons:
                    attrs["gen_ai.response.finish_reasons"] = reasons
        usage = data["usage"]
        if usage is not None:
            attrs["gen_ai.usage.input_tokens"] = usage.prompt_tokens
            attrs["gen_ai.usage.output_tokens"] = usage.completion_tokens
        if data["first_chunk_s"] is not None:
            attrs["scillm.first_chunk_s"] = round(data["first_chunk_s"], 6)
        error = data["error"]
        if error is not None:
            if isinstance(error, errors.UpstreamError) and error.upstream_status:
                attrs["http.response.status_code"] = error.upstream_status
            self._fail(span, error)
        span.end = event.time_ns
        calls.done.append(span)

    def retry(self, event: Event) -> None:
        calls: CallSpans | None = event.ctx.notes.get(NOTE)  # type: ignore[union-attr]
        if calls is None:
            return
        if open_stage(calls.stages) is not None and calls.request.trace.sampled:
            error = event["error"]
            calls.parent().add_event("retry", {"scillm.retry": event["retry"], "scillm.delay_s": event["delay_s"],
                                                 "error.type": str(getattr(error, "code", None) or
                                                                   type(error).__name__)}, event.time_ns)
        calls.next_attempt = ("retry", None)

    def fallback(self, event: Event) -> None:
        calls: CallSpans | None = event.ctx.notes.get(NOTE)  # type: ignore[union-attr]
        if calls is not None:
            calls.next_attempt = ("fallback", event["route"].deployment)

    def circuit_skip(self, event: Event) -> None:
        route: Route = event["route"]
        span = self._mark(event, f"circuit open {route.deployment}",
                          {"scillm.deployment": route.deployment, "scillm.provider": route.provider,
                           "scillm.circuit.remaining_s": round(event["remaining_s"], 3)})
        if span is not None:
            span.fail(None, "circuit open: deployment skipped")
        calls: CallSpans | None = event.ctx.notes.get(NOTE)  # type: ignore[union-attr]
        if calls is not None:
            calls.next_attempt = ("fallback", route.deployment)

    def cache(self, event: Event) -> None:
        if event["result"] == "hit":
            self._mark(event, "cache hit", {"scillm.cache": "hit", "scillm.deployment": event["route"].deployment})

    def queue_wait(self, event: Event) -> None:
        waited_ns = int(event["waited_s"] * 1e9)
        span = self._mark(event, f"queue wait {event['provider']}",
                          {"scillm.provider": event["provider"], "scillm.queue.outcome": event["outcome"],
                           "scillm.queue.waited_s": round(event["waited_s"], 6)}, start=event.time_ns - waited_ns)
        if span is not None and event["outcome"] != "granted":
            span.fail(None, f"no concurrency slot ({event['outcome']})")

    def _mark(self, event: Event, name: str, attrs: dict[str, Any], start: int | None = None) -> Span | None:
        """A span that has ended by the time its event comes (a cache hit, a wait, a skipped deployment)."""
        calls: CallSpans | None = event.ctx.notes.get(NOTE)  # type: ignore[union-attr]
        if calls is None or not calls.request.trace.sampled:
            return None
        span = calls.parent().child(name, INTERNAL, event.time_ns if start is None else start, attrs)
        span.end = event.time_ns
        calls.done.append(span)
        return span

    # -- units of work (batches, items, runs, graphs, and whatever agent surfaces add) --------------------------

    def unit_start(self, event: Event) -> None:
        unit = event["unit"]
        attrs = _flat(event.get("attrs") or {}, prefix="scillm.")
        attrs["scillm.unit"] = unit
        span = self._root(event.get("parent"), event.get("trace"), event.get("name") or unit, event.time_ns, attrs)
        self.units[unit] = span
        while len(self.units) > MAX_UNITS:
            old, dropped = self.units.popitem(last=False)
            self.unit_events.pop(old, None)
            self._end_unit(dropped, event.time_ns)

    def unit_end(self, event: Event) -> None:
        unit = event["unit"]
        span = self.units.pop(unit, None)
        self.unit_events.pop(unit, None)
        if span is None:  # ended without a start (an item resumed from an earlier run): a point in the trace
            span = self._root(event.get("parent"), None, event.get("name") or unit, event.time_ns,
                              {"scillm.unit": unit})
            span.kind = INTERNAL
        if span.trace.sampled:
            span.attrs.update(_flat(event.get("attrs") or {}, prefix="scillm."))
            status = event.get("status") or "ok"
            span.attrs["scillm.status"] = status
            if status not in ("ok", "completed"):
                span.fail(None, self._text(event.get("error") or status))
        self._end_unit(span, event.time_ns)

    def _end_unit(self, span: Span, end: int) -> None:
        if span.trace.sampled:
            span.end = end
            self.export([span])

    def unit_event(self, event: Event) -> None:
        unit = event["unit"]
        span = self.units.get(unit)
        if span is None or not span.trace.sampled:
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

    def close(self, end: int) -> None:
        """End every open unit span (shutdown)."""
        while self.units:
            _, span = self.units.popitem()
            self._end_unit(span, end)


def _provider(route: Route, attrs: dict[str, Any]) -> None:
    """``gen_ai.provider.name``, and scillm's own provider name when the conventions call it otherwise."""
    name = PROVIDER_NAMES.get(route.provider, route.provider)
    attrs["gen_ai.provider.name"] = name
    if name != route.provider:
        attrs["scillm.provider"] = route.provider


def _request_params(request: ChatRequest, attrs: dict[str, Any]) -> None:
    if request.temperature is not None:
        attrs["gen_ai.request.temperature"] = request.temperature
    if request.top_p is not None:
        attrs["gen_ai.request.top_p"] = request.top_p
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is not None:
        attrs["gen_ai.request.max_tokens"] = max_tokens
    if request.seed is not None:
        attrs["gen_ai.request.seed"] = request.seed


def _flat(values: Mapping[str, Any], *, prefix: str) -> dict[str, Any]:
    """Scalar attributes only (others as short strings); ``None`` dropped."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        out[prefix + key] = value if isinstance(value, str | bool | int | float) else str(value)[:300]
    return out
