"""The hand-written OTLP encoder says exactly what the SDK's encoder says: both outputs decoded with the
OpenTelemetry proto package are equal messages, for spans using every field and value type."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace.span import TraceState
from scillm_tracing.otlp import encode


def _spans() -> list:
    memory = InMemorySpanExporter()
    spans = []
    for service, limits in (("a", SpanLimits(max_span_attributes=6, max_events=2, max_links=1)), ("b", None)):
        provider = TracerProvider(resource=Resource.create({"service.name": service, "n": 3}), span_limits=limits)
        provider.add_span_processor(SimpleSpanProcessor(memory))
        tracer = provider.get_tracer("scillm" if service == "a" else "other", "1.2" if service == "a" else None,
                                     schema_url="https://opentelemetry.io/schemas/1.30.0" if service == "b" else None)
        remote = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, True, TraceFlags(1),
                             TraceState([("vendor", "x1"), ("other", "y")]))
        root = tracer.start_span("chat gpt-4o-mini", context=set_span_in_context(NonRecordingSpan(remote)),
                                 kind=SpanKind.SERVER, attributes={
                                     "s": "text ü", "empty": "", "t": True, "f": False, "i": -42, "big": 2**62,
                                     "x": 0.25, "strs": ["a", "b"], "ints": [1, -2], "floats": [1.5],
                                     "bools": [True, False], "none_yet": []})
        root.add_event("retry", {"scillm.retry": 1, "error.type": "upstream_unavailable"}, timestamp=123)
        root.add_event("plain")
        root.add_event("third", {"k": "v"})
        child = tracer.start_span("call_provider", context=set_span_in_context(root), kind=SpanKind.CLIENT,
                                  links=[Link(remote, {"why": "batch"}), Link(remote)])
        child.set_status(Status(StatusCode.ERROR, "upstream said no"))
        child.end(end_time=2_000_000_123)
        other = tracer.start_span("ok", kind=SpanKind.PRODUCER)
        other.set_status(Status(StatusCode.OK))
        other.end()
        tracer.start_span("bare", kind=SpanKind.CONSUMER).end()
        root.end()
        spans = memory.get_finished_spans()
    return list(spans)


def test_the_encoder_matches_the_sdk_encoder() -> None:
    spans = _spans()
    assert len(spans) == 8 and any(s.dropped_attributes for s in spans) and any(s.dropped_events for s in spans)
    assert any(s.dropped_links for s in spans)
    ours = ExportTraceServiceRequest.FromString(encode(spans))
    theirs = ExportTraceServiceRequest.FromString(encode_spans(spans).SerializeToString())
    assert ours == theirs
    assert len(ours.resource_spans) == 2 and ours.resource_spans[1].scope_spans[0].schema_url
