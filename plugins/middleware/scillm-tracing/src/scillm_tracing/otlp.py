"""OTLP/HTTP export: spans encoded by hand on a background thread, sent with the SDK's OTLP/HTTP client.

:class:`Encoder` writes an ``ExportTraceServiceRequest`` directly in the protobuf wire format from
:class:`~scillm_tracing.spans.Span` objects (a test decodes it with ``opentelemetry-proto`` and compares it with
what the SDK's own encoder makes of the same spans): the SDK's encoder builds a protobuf object per span,
attribute and value, ~40-65 µs a span here, more than a whole request's budget for tracing. :class:`BatchExporter`
encodes a finished call's spans when they come (a few µs each: cheaper than keeping them, because span objects
held until an export outlive the garbage collector's young generation and make every later collection walk them,
where bytes are never walked) and queues the bytes; its thread sends them in batches, the way the SDK's
``BatchSpanProcessor`` does (``OTEL_BSP_*``), through the SDK's ``OTLPSpanExporter`` HTTP client (its
retries, headers and compression) on the SDK's urllib3 transport (``_client`` and ``_transport`` are those of the
pinned version, see ``pyproject.toml``).

Every string that goes out (span and event names, attribute values, status messages) passes through
:func:`~scillm_core.redact.redact_name`: they hold names a client or the configuration chose (``chat
llama3:sk-live-...``, a caller). Encoded attributes and names are remembered, so that is paid once per distinct value.
"""

from __future__ import annotations

import collections
import logging
import struct
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from scillm_core.redact import redact_name

if TYPE_CHECKING:
    from scillm_tracing.config import Settings
    from scillm_tracing.spans import Span

__all__ = ["BatchExporter", "Encoder", "http_sender"]

log = logging.getLogger("scillm.tracing")

_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200
_pack_d = struct.Struct("<d").pack
_pack_q = struct.Struct("<Q").pack
_pack_i = struct.Struct("<I").pack
_times = struct.Struct("<BQBQ").pack  # start (fixed64, field 7) and end (field 8), tags included
_id = struct.Struct(">HQ").pack  # the span id (field 2), its tag and length included
_ids = struct.Struct(">HQHQ").pack  # the span id and the parent's (field 4)


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n < 0x4000:  # (most lengths)
        return bytes((n & 0x7F | 0x80, n >> 7))
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
V2, V3, V6 = _tag(2, 0), _tag(3, 0), _tag(6, 0)  # varint fields
F64_1, F64_7, F64_8 = _tag(1, 1), _tag(7, 1), _tag(8, 1)  # fixed64
D4 = _tag(4, 1)  # double
T9, T11, T15 = _tag(9, 2), _tag(11, 2), _tag(15, 2)
F32_16 = _tag(16, 5)


def _value(value: Any) -> bytes:
    """An ``AnyValue`` message."""
    if isinstance(value, bool):
        return V2 + (b"\x01" if value else b"\x00")
    if isinstance(value, str):
        return _ld(T1, redact_name(value).encode())
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


_CACHE_MAX = 8192
_PER_KEY = 256


class Encoder:
    """``ExportTraceServiceRequest`` bytes for spans of one resource and instrumentation scope. Encoded attributes
    and names are remembered: most repeat from span to span (operation, provider, model, caller, stage names)."""

    def __init__(self, resource: Mapping[str, Any], scope_name: str, scope_version: str | None) -> None:
        #: encoded attributes by ``(key, value)`` for a string (or a tuple of strings), ``(key, value, type)`` for a
        #: number (``True == 1 == 1.0``: the type tells them apart)
        self.attrs: dict[tuple[Any, ...], bytes] = {}
        self.values: dict[str, int] = {}  # key -> how many of its values are remembered
        self.keys: dict[str, bytes] = {}  # key -> its encoded key field and the value's tag (for unremembered ones)
        self.names: dict[tuple[str, int], bytes] = {}  # (name, kind) -> encoded
        scope = _ld(T1, scope_name.encode()) + (_ld(T2, scope_version.encode()) if scope_version else b"")
        self.resource = _ld(T1, b"".join(_ld(T1, _key_value(k, v)) for k, v in resource.items()))
        self.scope = _ld(T1, scope)

    def _attributes(self, attributes: Mapping[str, Any]) -> bytes:
        """A span's attributes (field 9). Values are remembered up to ``_PER_KEY`` per key: a key whose values do
        not repeat (a request id) is encoded each time once it has had that many."""
        cache = self.attrs
        out = []
        for item in attributes.items():
            value = item[1]
            kind = value.__class__
            if kind is str:
                encoded = cache.get(item)
            elif kind is int or kind is float or kind is bool:
                item = (item[0], value, kind)
                encoded = cache.get(item)
            elif kind is tuple and all(v.__class__ is str for v in value):
                encoded = cache.get(item)
            else:  # not remembered
                out.append(_ld(T9, _key_value(item[0], value)))
                continue
            if encoded is None:
                encoded = self._remember(item, value)
            out.append(encoded)
        return b"".join(out)

    def _remember(self, item: tuple[Any, ...], value: Any) -> bytes:
        key = item[0]
        remembered = self.values.get(key, 0)
        if remembered >= _PER_KEY and value.__class__ is str:  # a string that does not repeat (an id)
            key_field = self.keys.get(key)
            if key_field is None:
                key_field = self.keys[key] = _ld(T1, key.encode()) + T2
            text = redact_name(value).encode()
            field = key_field + _varint(len(text) + 1 + len(_varint(len(text)))) + T1 + _varint(len(text)) + text
            return T9 + _varint(len(field)) + field
        encoded = _ld(T9, _key_value(key, value))
        if remembered < _PER_KEY:
            if len(self.attrs) >= _CACHE_MAX:
                self.attrs.clear()
                self.values.clear()
                self.keys.clear()
                remembered = 0
            self.attrs[item] = encoded
            self.values[key] = remembered + 1
        return encoded

    def _name(self, name: str, kind: int) -> bytes:
        encoded = self.names.get((name, kind))
        if encoded is None:
            encoded = _ld(T5, redact_name(name).encode()) + V6 + _varint(kind)
            if len(self.names) < _CACHE_MAX:
                self.names[(name, kind)] = encoded
        return encoded

    def span(self, span: Span) -> bytes:
        """One ``ScopeSpans.spans`` field."""
        trace = span.trace
        head = trace.encoded
        if head is None:  # the trace's id and state, the same for each of its spans
            head = trace.encoded = _TRACE + trace.trace_id.to_bytes(16, "big") + (
                _ld(T3, trace.state.encode()) if trace.state else b"")
        if span.status or span.message:
            status = (_ld(T2, redact_name(span.message).encode()) if span.message else b"") + (
                V3 + _varint(span.status) if span.status else b"")
            tail = T15 + _varint(len(status)) + status + (_REMOTE if span.remote_parent else _LOCAL)
        else:
            tail = _UNSET_REMOTE if span.remote_parent else _UNSET_LOCAL
        parent = span.parent_id
        body = b"".join((
            head, _id(_SPAN, span.span_id) if parent is None else _ids(_SPAN, span.span_id, _PARENT, parent),
            self.names.get((span.name, span.kind)) or self._name(span.name, span.kind),
            _times(0x39, span.start, 0x41, span.end),
            self._attributes(span.attrs) if span.attrs else b"",
            b"".join(_ld(T11, F64_1 + _pack_q(time_ns) + _ld(T2, redact_name(name).encode())
                         + b"".join(_ld(T3, _key_value(k, v)) for k, v in attrs.items()))
                     for name, attrs, time_ns in span.events) if span.events else b"",
            tail))
        return T2 + _varint(len(body)) + body

    def request(self, spans: Iterable[bytes]) -> bytes:
        """The ``ExportTraceServiceRequest`` of spans encoded by :meth:`span`."""
        return _ld(T1, self.resource + _ld(T2, self.scope + b"".join(spans)))

    def encode(self, spans: Iterable[Span]) -> bytes:
        return self.request(self.span(span) for span in spans)


_TRACE = T1 + b"\x10"  # the trace id's tag and fixed length
_SPAN, _PARENT = int.from_bytes(T2 + b"\x08", "big"), int.from_bytes(T4 + b"\x08", "big")  # ids' tags and lengths
_LOCAL, _REMOTE = F32_16 + _pack_i(_HAS_IS_REMOTE), F32_16 + _pack_i(_HAS_IS_REMOTE | _IS_REMOTE)  # flags
_UNSET_LOCAL, _UNSET_REMOTE = T15 + b"\x00" + _LOCAL, T15 + b"\x00" + _REMOTE  # an empty status, then flags


Sender = Callable[[bytes], bool]


def http_sender(settings: Settings) -> Any:
    """The SDK's OTLP/HTTP client (retries with backoff on 429/502/503/504 and ``Retry-After``, compression) over
    its urllib3 transport (a fifth of the CPU of its default, requests: 0.2 vs 0.6 ms per export of 512 spans), as
    ``send(data) -> bool`` with ``close()``."""
    from opentelemetry.exporter.http.transport._urllib3 import Urllib3HTTPTransport
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    cert: str | tuple[str, str] | None = settings.client_certificate
    if settings.client_certificate and settings.client_key:
        cert = (settings.client_certificate, settings.client_key)
    exporter = OTLPSpanExporter(
        endpoint=settings.endpoint, headers=dict(settings.headers), timeout=settings.timeout_s,
        compression=Compression(settings.compression) if settings.compression else Compression.NoCompression,
        _transport=Urllib3HTTPTransport(verify=settings.certificate or True, cert=cert))

    class HttpSender:
        def __call__(self, data: bytes) -> bool:
            return bool(exporter._client.export(data).success)

        def close(self) -> None:
            exporter.shutdown()

    return HttpSender()


class BatchExporter:
    """Finished spans in, OTLP exports out, from one daemon thread. ``add`` (the event loop's side) encodes the
    spans and puts their bytes on a deque; the thread wakes when ``max_export_batch_size`` spans are queued, or
    every ``schedule_delay_millis``, and sends batches of at most that many spans. Past ``max_queue_size`` queued
    spans, new ones are dropped (counted)."""

    def __init__(self, encoder: Encoder, send: Sender, *, schedule_delay_millis: int = 5000,
                 max_queue_size: int = 2048, max_export_batch_size: int = 512, export_timeout_millis: int = 30000,
                 on_result: Callable[[int, bool], None] | None = None, background: bool = True) -> None:
        self.encoder, self.send = encoder, send
        self.delay_s = schedule_delay_millis / 1000
        self.max_queue = max_queue_size
        self.batch = min(max_export_batch_size, max_queue_size)
        self.timeout_s = export_timeout_millis / 1000
        self.on_result = on_result or (lambda n, ok: None)
        self.queue: collections.deque[bytes] = collections.deque()  # encoded spans
        self.dropped = 0
        self.stopped = False
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="scillm-tracing-export", daemon=True)
        if background:  # else only force_flush and shutdown send (tests)
            self.thread.start()

    def add(self, spans: list[Span]) -> None:
        queued = len(self.queue) + len(spans)
        if queued > self.max_queue or self.stopped:
            self.dropped += len(spans)
            return
        self.queue.extend(map(self.encoder.span, spans))
        if queued >= self.batch and not self.wake.is_set():
            self.wake.set()

    def _run(self) -> None:
        while not self.stopped:
            woken = self.wake.wait(self.delay_s)
            self.wake.clear()
            if not self.stopped:
                self._export(everything=not woken)

    def _export(self, everything: bool) -> None:
        """Send queued spans in batches: while a full batch is queued, or all of them."""
        with self.lock:
            queue = self.queue
            while queue and (everything or len(queue) >= self.batch):
                batch = [queue.popleft() for _ in range(min(self.batch, len(queue)))]
                try:
                    ok = self.send(self.encoder.request(batch))
                except Exception as exc:
                    log.warning("exporting %d spans failed: %s", len(batch), type(exc).__name__)
                    ok = False
                self.on_result(len(batch), ok)

    def force_flush(self, timeout_millis: int | None = None) -> bool:
        """Send everything queued now (from the calling thread)."""
        if self.stopped:
            return False
        self._export(everything=True)
        return True

    def shutdown(self) -> None:
        """Send what is queued, then stop the thread."""
        if self.stopped:
            return
        self.stopped = True
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(self.timeout_s)
        self._export(everything=True)
        close = getattr(self.send, "close", None)
        if close is not None:
            close()
