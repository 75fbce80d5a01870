"""A small OTLP/HTTP collector for tests: accepts protobuf exports on ``/v1/traces`` and decodes them with the
OpenTelemetry proto package, keeping every span as a plain dict and every raw body (for secret scans)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from scillm_core.testing import ServerThread

__all__ = ["OTLPReceiver"]


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, which) if which else None


class OTLPReceiver:
    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.bodies: list[bytes] = []
        self.content_types: set[str] = set()
        self._changed = threading.Condition()
        self.server = ServerThread(Starlette(routes=[Route("/v1/traces", self.traces, methods=["POST"])]))

    async def traces(self, request: Request) -> Response:
        body = await request.body()
        self.content_types.add(request.headers.get("content-type", ""))
        export = ExportTraceServiceRequest.FromString(body)
        spans = []
        for resource_spans in export.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append({
                        "name": span.name, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                        "parent_id": span.parent_span_id.hex() or None, "kind": span.kind,
                        "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                        "attrs": {kv.key: _value(kv.value) for kv in span.attributes},
                        "status": span.status.code, "status_message": span.status.message,
                        "events": [e.name for e in span.events], "resource": resource,
                        "scope": scope_spans.scope.name})
        with self._changed:
            self.bodies.append(body)
            self.spans.extend(spans)
            self._changed.notify_all()
        return Response(ExportTraceServiceResponse().SerializeToString(), media_type="application/x-protobuf")

    def wait_for(self, found: Callable[[list[dict[str, Any]]], Any], timeout_s: float = 30.0) -> Any:
        """Block until ``found(spans)`` is truthy (woken by each export; the timeout only bounds a failure)."""
        with self._changed:
            if self._changed.wait_for(lambda: found(self.spans), timeout=timeout_s):
                return found(self.spans)
        raise AssertionError(f"spans never arrived; have: {[s['name'] for s in self.spans]}")

    def clear(self) -> None:
        with self._changed:
            self.spans.clear()
            self.bodies.clear()

    @property
    def url(self) -> str:
        return self.server.url

    def __enter__(self) -> OTLPReceiver:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
