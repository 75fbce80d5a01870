"""OpenTelemetry traces over OTLP/HTTP (protobuf), built from the events the pipeline and the surfaces emit.

Off by default (``[tracing] enabled = true`` turns it on); off, it subscribes to nothing, so requests do no
tracing work at all. On, one observer (``spans.SpanMaker``) turns events into plain spans and hands each finished
call's spans to ``otlp.BatchExporter``, whose thread encodes them as OTLP protobuf and sends them with the SDK's
OTLP/HTTP client; each upstream attempt carries a W3C ``traceparent`` to the provider, and a client's
``traceparent`` is continued. Fails open: an unreachable collector drops spans (counted in ``/v1/scillm/health``),
never a request.

Config: ``[tracing]`` (see ``config.TracingConfig``) and the standard ``OTEL_*`` variables.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from attrs import define, field

from scillm_core import Runtime, SurfaceRegistry, hookimpl
from scillm_core.redact import env_secrets
from scillm_tracing.config import Settings, TracingConfig, resolve

__all__ = ["TracingConfig", "public_endpoint"]

log = logging.getLogger("scillm.tracing")


@define
class TracingState:
    config: TracingConfig
    settings: Settings | None = None
    processor: Any = None  # the BatchExporter (its thread sends the spans), while running
    maker: Any = None
    unsubscribe: Any = None
    counts: dict[str, int] = field(factory=lambda: {"exported_spans": 0, "failed_spans": 0, "failed_exports": 0})
    last_error: str | None = None


def _config(runtime: Runtime) -> TracingConfig:
    return runtime.config.sections.get("tracing") or TracingConfig()  # type: ignore[no-any-return]


def _state(runtime: Runtime) -> TracingState:
    state = runtime.plugin_state.get("tracing")
    if state is None:
        state = runtime.plugin_state["tracing"] = TracingState(config=_config(runtime))
    return state  # type: ignore[no-any-return]


def _enabled(runtime: Runtime) -> bool:
    return _config(runtime).enabled and runtime.env.get("OTEL_SDK_DISABLED", "").strip().lower() != "true"


def public_endpoint(url: str) -> str:
    """``url`` without credentials in it (``https://user:pw@host`` -> ``https://[redacted]@host``)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="[redacted]@" + parts.netloc.rsplit("@", 1)[1]))


@hookimpl
def scillm_config_sections() -> Mapping[str, type]:
    return {"tracing": TracingConfig}


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    state = _state(runtime)
    if not _enabled(runtime):
        return
    state.settings = resolve(state.config, runtime.env)  # a wrong setting stops start-up, naming it

    async def start() -> None:
        _start(state, runtime)

    async def stop() -> None:
        _stop(state)

    surfaces.on_startup(start)
    surfaces.on_shutdown(stop)


def _start(state: TracingState, runtime: Runtime) -> None:
    from opentelemetry.sdk.resources import Resource

    from scillm_core import __version__
    from scillm_tracing.otlp import BatchExporter, Encoder, http_sender
    from scillm_tracing.spans import Sampler, SpanMaker

    settings = state.settings
    assert settings is not None

    def counted(spans: int, ok: bool) -> None:
        if ok:
            state.counts["exported_spans"] += spans
        else:
            state.counts["failed_spans"] += spans
            state.counts["failed_exports"] += 1
            state.last_error = f"export to {public_endpoint(settings.endpoint)} failed"

    resource = Resource.create(dict(settings.resource)).attributes  # with the SDK's telemetry.sdk.* attributes
    exporter = BatchExporter(Encoder(resource, "scillm", __version__),
                             http_sender(settings), on_result=counted, **settings.batch)
    maker = SpanMaker(exporter.add, Sampler(settings.sample_ratio, settings.parent_based),
                      secrets=env_secrets(runtime.env), record_content=settings.record_content,
                      max_content_chars=settings.max_content_chars)
    state.processor, state.maker = exporter, maker
    state.unsubscribe = runtime.events.subscribe(maker)


def _stop(state: TracingState) -> None:
    if state.unsubscribe is not None:
        state.unsubscribe()
        state.unsubscribe = None
    if state.maker is not None:
        state.maker.close(time.time_ns())
    if state.processor is not None:
        processor, state.processor = state.processor, None
        processor.shutdown()  # exports what is queued


@hookimpl
def scillm_health(runtime: Runtime) -> Mapping[str, Any]:
    state = _state(runtime)
    settings = state.settings
    if settings is None:
        return {"tracing": {"enabled": False, "fails": "open"}}
    return {"tracing": {"enabled": True, "fails": "open", "endpoint": public_endpoint(settings.endpoint),
                        "protocol": "http/protobuf", "service_name": settings.service_name,
                        "sample_ratio": settings.sample_ratio, "record_content": settings.record_content,
                        "running": state.processor is not None, **state.counts,
                        "dropped_spans": state.processor.dropped if state.processor is not None else 0,
                        "last_error": state.last_error}}


@hookimpl
def scillm_doctor(runtime: Runtime) -> list[dict[str, Any]]:
    if not _enabled(runtime):
        return [{"check": "tracing", "ok": True, "detail": "off ([tracing] enabled = false)"}]
    settings = resolve(_config(runtime), runtime.env)
    return [check_endpoint(settings)]


def check_endpoint(settings: Settings, timeout_s: float = 3.0) -> dict[str, Any]:
    """POST an empty OTLP export request (no spans) to the endpoint: a collector answers 2xx."""
    import httpx

    shown = public_endpoint(settings.endpoint)
    started = time.perf_counter()
    try:
        response = httpx.post(settings.endpoint, content=b"", timeout=timeout_s, trust_env=False,
                              headers={"content-type": "application/x-protobuf", **settings.headers})
    except httpx.HTTPError as exc:
        return {"check": "tracing endpoint", "ok": False, "required": True,
                "detail": f"{shown} unreachable ({type(exc).__name__}); start an OTLP collector there (Jaeger, "
                          f"Tempo, an OpenTelemetry Collector: OTLP/HTTP, port 4318) or set [tracing] endpoint"}
    took = (time.perf_counter() - started) * 1000
    ok = 200 <= response.status_code < 300
    detail = f"{shown} answered HTTP {response.status_code} in {took:.0f} ms"
    if not ok:
        detail += " (expected 2xx from an OTLP/HTTP traces endpoint; check the URL and the collector's auth)"
    return {"check": "tracing endpoint", "ok": ok, "required": True, "detail": detail}
