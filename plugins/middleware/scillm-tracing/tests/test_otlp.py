"""The hand-written OTLP encoder says exactly what the SDK's encoder says: the same spans, made with the SDK and
copied into scillm's plain spans, encoded by both and decoded with the OpenTelemetry proto package, are equal
messages, for spans using every field and value type scillm records."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace.span import TraceState
from scillm_tracing.otlp import BatchExporter, Encoder
from scillm_tracing.spans import Span, Trace

KINDS = {SpanKind.INTERNAL: 1, SpanKind.SERVER: 2, SpanKind.CLIENT: 3}


def _sdk_spans() -> tuple[list[ReadableSpan], Resource]:
    memory = InMemorySpanExporter()
    resource = Resource.create({"service.name": "scillm", "n": 3})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("scillm", "1.2")
    remote = SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, True, TraceFlags(1),
                         TraceState([("vendor", "x1"), ("other", "y")]))
    root = tracer.start_span("chat gpt-4o-mini", context=set_span_in_context(NonRecordingSpan(remote)),
                             kind=SpanKind.SERVER, attributes={
                                 "s": "text ü", "empty": "", "t": True, "f": False, "i": -42, "big": 2**62,
                                 "x": 0.25, "strs": ["a", "b"], "ints": [1, -2], "floats": [1.5],
                                 "bools": [True, False]})
    root.add_event("retry", {"scillm.retry": 1, "error.type": "upstream_unavailable"}, timestamp=123)
    root.add_event("plain", timestamp=456)
    child = tracer.start_span("call_provider", context=set_span_in_context(root), kind=SpanKind.CLIENT,
                              attributes={"s": "text ü", "i": 7})
    child.set_status(Status(StatusCode.ERROR, "upstream said no"))
    child.end(end_time=2_000_000_123)
    # the same keys and equal values of other types (True == 1 == 1.0) after the encoder has remembered the first
    other = tracer.start_span("ok", kind=SpanKind.INTERNAL, attributes={
        "t": 1, "f": 0.0, "i": True, "x": 0.25, "s": "text ü", "strs": ["a", "b"], "ints": [True, False]})
    other.set_status(Status(StatusCode.OK))
    other.end()
    tracer.start_span("bare", kind=SpanKind.INTERNAL).end()
    root.end()
    return list(memory.get_finished_spans()), resource


def _ours(sdk: ReadableSpan, traces: dict[int, Trace]) -> Span:
    context = sdk.get_span_context()
    assert context is not None
    state = ",".join(f"{k}={v}" for k, v in context.trace_state.items()) or None
    trace = traces.setdefault(context.trace_id, Trace(context.trace_id, True, state))
    span = Span(trace, sdk.parent.span_id if sdk.parent else None, sdk.name, KINDS[sdk.kind], sdk.start_time or 0,
                dict(sdk.attributes or {}))
    span.span_id, span.end = context.span_id, sdk.end_time or 0
    span.status, span.message = sdk.status.status_code.value, sdk.status.description or ""
    span.events = [(e.name, dict(e.attributes or {}), e.timestamp) for e in sdk.events] or None
    span.remote_parent = bool(sdk.parent and sdk.parent.is_remote)
    return span


def test_the_encoder_matches_the_sdk_encoder() -> None:
    sdk, resource = _sdk_spans()
    assert len(sdk) == 4
    traces: dict[int, Trace] = {}
    ours = ExportTraceServiceRequest.FromString(
        Encoder(resource.attributes, "scillm", "1.2").encode(_ours(s, traces) for s in sdk))
    theirs = ExportTraceServiceRequest.FromString(encode_spans(sdk).SerializeToString())
    assert ours == theirs
    assert ours.resource_spans[0].scope_spans[0].spans[3].trace_state == "vendor=x1,other=y"


def test_values_past_what_the_encoder_remembers_decode_the_same() -> None:
    encoder = Encoder({"service.name": "t"}, "scillm", None)
    trace = Trace(7, True)
    spans = [Span(trace, None, "chat", 2, 1, {"scillm.request_id": f"req-{i:04d}", "note": "ü" * (i % 200),
                                              "n": i}) for i in range(600)]
    decoded = ExportTraceServiceRequest.FromString(encoder.request(encoder.span(s) for s in spans))
    got = [{a.key: a.value.string_value or a.value.int_value for a in span.attributes}
           for span in decoded.resource_spans[0].scope_spans[0].spans]
    assert got == [{"scillm.request_id": f"req-{i:04d}", "note": "ü" * (i % 200) or 0, "n": i} for i in range(600)]


def test_the_exporter_sends_full_batches_and_the_rest_on_flush() -> None:
    sent: list[int] = []
    results: list[tuple[int, bool]] = []

    def send(data: bytes) -> bool:
        sent.append(len(ExportTraceServiceRequest.FromString(data).resource_spans[0].scope_spans[0].spans))
        return len(sent) != 2  # the second export fails: counted, not retried here

    exporter = BatchExporter(Encoder({"service.name": "t"}, "scillm", None), send, max_queue_size=10,
                             max_export_batch_size=4, on_result=lambda n, ok: results.append((n, ok)),
                             background=False)
    trace = Trace(1, True)
    calls = [[Span(trace, None, f"s{i}.{j}", 1, 1, {}) for j in range(3)] for i in range(4)]
    for spans in calls:
        exporter.add(spans)  # 12 spans: the last call does not fit in a queue of 10
    assert exporter.dropped == 3
    exporter.force_flush()
    assert sent == [4, 4, 1] and results == [(4, True), (4, False), (1, True)]
    exporter.shutdown()
    exporter.add(calls[0])
    assert exporter.dropped == 6 and sent == [4, 4, 1]
