"""OTLP/HTTP export with spans encoded by hand.

The SDK's encoder builds a protobuf object for every span, attribute and value from Python, ~40-65 µs per span on
the benchmark machine, which alone put tracing far past its budget (1.15x the CPU of a request). :func:`encode`
writes the same ``ExportTraceServiceRequest`` directly in the protobuf wire format (a test decodes both encoders'
output with ``opentelemetry-proto`` and compares), and :class:`Exporter` is the SDK's ``OTLPSpanExporter`` (its
HTTP client, retries, headers, compression, TLS settings) with only the encoding step replaced. The exporter's
internals it uses (``_client``, ``_shutdown``) are those of the pinned version (``pyproject.toml``).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanKind

__all__ = ["Exporter", "encode"]

log = logging.getLogger("scillm.tracing")

_KIND = {SpanKind.INTERNAL: 1, SpanKind.SERVER: 2, SpanKind.CLIENT: 3, SpanKind.PRODUCER: 4, SpanKind.CONSUMER: 5}
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200
_pack_d = struct.Struct("<d").pack
_pack_q = struct.Struct("<Q").pack
_pack_i = struct.Struct("<I").pack


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field."""
    return tag + _varint(len(payload)) + payload


# field tags, precomputed
T1, T2, T3, T4, T5, T6, T7 = (_tag(n, 2) for n in range(1, 8))  # length-delimited fields 1..7
V2, V3, V4, V6, V10, V12, V14 = (_tag(n, 0) for n in (2, 3, 4, 6, 10, 12, 14))  # varint fields
F64_1, F64_7, F64_8 = _tag(1, 1), _tag(7, 1), _tag(8, 1)  # fixed64
D4 = _tag(4, 1)  # double
T9, T11, T13, T15 = (_tag(n, 2) for n in (9, 11, 13, 15))
F32_16 = _tag(16, 5)
F32_6 = _tag(6, 5)


def _value(value: Any) -> bytes:
    """An ``AnyValue`` message."""
    if isinstance(value, bool):
        return V2 + (b"\x01" if value else b"\x00")
    if isinstance(value, str):
        return _ld(T1, value.encode())
    if isinstance(value, int):
        return V3 + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return D4 + _pack_d(value)
    if isinstance(value, bytes):
        return _ld(T7, value)
    if value is None:
        return b""
    if isinstance(value, Mapping):
        return _ld(T6, b"".join(_ld(T1, _key_value(str(k), v)) for k, v in value.items()))
    if isinstance(value, Sequence):
        return _ld(T5, b"".join(_ld(T1, _value(v)) for v in value))
    raise TypeError(f"cannot encode an attribute value of type {type(value).__name__}")


def _key_value(key: str, value: Any) -> bytes:
    return _ld(T1, key.encode()) + _ld(T2, _value(value))


#: encoded attributes of scalar values, by (tag, key, type, value): most repeat from span to span (operation,
#: provider, model, caller, kind), and a dict lookup is a fraction of encoding them again
_SEEN: dict[tuple[bytes, str, type, Any], bytes] = {}
_SEEN_MAX = 8192


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    if not attributes:
        return b""
    out = []
    for key, value in attributes.items():
        kind = type(value)
        if kind is str or kind is int or kind is bool or kind is float:
            cache_key = (tag, key, kind, value)
            encoded = _SEEN.get(cache_key)
            if encoded is None:
                encoded = _ld(tag, _key_value(key, value))
                if len(_SEEN) >= _SEEN_MAX:
                    _SEEN.clear()
                _SEEN[cache_key] = encoded
            out.append(encoded)
        else:
            out.append(_ld(tag, _key_value(key, value)))
    return b"".join(out)


def _uint(tag: bytes, n: int) -> bytes:
    return tag + _varint(n) if n else b""


_TRACE_ID, _SPAN_ID, _PARENT_ID = T1 + b"\x10", T2 + b"\x08", T4 + b"\x08"  # tags and fixed lengths
_KIND_FIELD = {kind: V6 + _varint(value) for kind, value in _KIND.items()}
_FLAGS = {False: F32_16 + _pack_i(_HAS_IS_REMOTE), True: F32_16 + _pack_i(_HAS_IS_REMOTE | _IS_REMOTE)}
_UNSET_STATUS = _ld(T15, b"")
_NAMES: dict[str, bytes] = {}


def _span(span: ReadableSpan) -> bytes:
    context = span.get_span_context()
    assert context is not None
    parent = span.parent
    name = _NAMES.get(span.name)
    if name is None:
        name = _ld(T5, span.name.encode())
        if len(_NAMES) < _SEEN_MAX:
            _NAMES[span.name] = name
    out = [_TRACE_ID, context.trace_id.to_bytes(16, "big"), _SPAN_ID, context.span_id.to_bytes(8, "big")]
    if context.trace_state:
        out.append(_ld(T3, ",".join(f"{k}={v}" for k, v in context.trace_state.items()).encode()))
    if parent is not None:
        out += (_PARENT_ID, parent.span_id.to_bytes(8, "big"))
    out += (name, _KIND_FIELD[span.kind], F64_7, _pack_q(span.start_time or 0), F64_8, _pack_q(span.end_time or 0),
            _attributes(T9, span.attributes))
    if span.dropped_attributes:
        out.append(V10 + _varint(span.dropped_attributes))
    for event in span.events:
        body = F64_1 + _pack_q(event.timestamp) + _ld(T2, event.name.encode()) + _attributes(T3, event.attributes)
        out.append(_ld(T11, body + _uint(V4, event.dropped_attributes)))
    out.append(_uint(V12, span.dropped_events))
    for link in span.links:
        body = (_ld(T1, link.context.trace_id.to_bytes(16, "big")) + _ld(T2, link.context.span_id.to_bytes(8, "big"))
                + _attributes(T4, link.attributes) + _uint(_tag(5, 0), link.dropped_attributes)
                + F32_6 + _pack_i(_HAS_IS_REMOTE | (_IS_REMOTE if link.context.is_remote else 0)))
        out.append(_ld(T13, body))
    out.append(_uint(V14, span.dropped_links))
    status = span.status
    if status.description or status.status_code.value:
        out.append(_ld(T15, (_ld(T2, status.description.encode()) if status.description else b"")
                       + _uint(V3, status.status_code.value)))
    else:
        out.append(_UNSET_STATUS)
    out.append(_FLAGS[parent is not None and parent.is_remote])
    return b"".join(out)


def encode(spans: Sequence[ReadableSpan]) -> bytes:
    """An ``ExportTraceServiceRequest`` holding ``spans``, grouped by resource and instrumentation scope."""
    groups: dict[int, tuple[Any, dict[int, tuple[Any, list[bytes]]]]] = {}
    for span in spans:
        resource, scope = span.resource, span.instrumentation_scope
        _, scopes = groups.setdefault(id(resource), (resource, {}))
        scopes.setdefault(id(scope), (scope, []))[1].append(_ld(T2, _span(span)))
    out = []
    for resource, scopes in groups.values():
        body = [_ld(T1, _attributes(T1, resource.attributes))]
        for scope, encoded in scopes.values():
            scope_msg = b""
            if scope is not None:
                scope_msg = (_ld(T1, scope.name.encode()) if scope.name else b"") + (
                    _ld(T2, scope.version.encode()) if scope.version else b"") + _attributes(T3, scope.attributes)
            scope_spans = _ld(T1, scope_msg) + b"".join(encoded)
            if scope is not None and scope.schema_url:
                scope_spans += _ld(T3, scope.schema_url.encode())
            body.append(_ld(T2, scope_spans))
        if resource.schema_url:
            body.append(_ld(T3, resource.schema_url.encode()))
        out.append(_ld(T1, b"".join(body)))
    return b"".join(out)


class Exporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP span exporter with :func:`encode` as its encoder."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            return SpanExportResult.FAILURE
        try:
            data = encode(spans)
        except Exception as exc:
            log.error("could not encode %d spans: %s", len(spans), exc)
            return SpanExportResult.FAILURE
        result = self._client.export(data)
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE
