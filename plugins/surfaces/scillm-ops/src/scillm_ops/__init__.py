"""Ops surface: liveness, readiness, health, providers, plugins and Prometheus metrics. Never shows a secret: what
they print includes names a client or the configuration chose (a model ``llama3:sk-live-...``, a caller, a group
member), so the JSON answers go out through ``ops_response`` and every label value of ``/metrics`` through
``redact_name``."""

from __future__ import annotations

import os
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from scillm_core import Runtime, SurfaceRegistry, __version__, hookimpl, json_response, ops_response, runtime_of
from scillm_core.redact import redact, redact_name


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    from prometheus_client import Gauge
    from prometheus_client.process_collector import ProcessCollector

    ProcessCollector(registry=runtime.metrics)
    Gauge("scillm_build_info", "scillm version", ["version"], registry=runtime.metrics).labels(__version__).set(1)
    for path, endpoint in (("/health/liveliness", liveliness), ("/health/readiness", readiness),
                           ("/v1/scillm/health", health), ("/v1/scillm/providers", providers),
                           ("/v1/scillm/plugins", plugins), ("/v1/scillm/auth", auth), ("/metrics", metrics)):
        surfaces.route(path, endpoint, ["GET"], plugin="ops")


async def liveliness(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readiness(request: Request) -> Response:
    runtime = runtime_of(request)
    if not runtime.ready:
        return json_response({"status": "not_ready"}, 503)
    configured = sum(1 for p in runtime.providers.values() if p.missing_config() is None)
    return json_response({"status": "ready", "providers_configured": configured, "version": __version__})


async def state_health(runtime: Runtime) -> dict[str, Any]:
    """The state backend, whether it answers (within its timeout), this instance's id and the live instances."""
    out: dict[str, Any] = {"backend": runtime.config.state.backend, "instance_id": runtime.instance_id,
                           "shared_across_instances": runtime.shared}
    try:
        out.update(await runtime.store.health())
    except Exception as exc:  # a store that cannot say: health still answers, saying so
        out.update(reachable=False, error=type(exc).__name__)
    if out["reachable"]:
        try:
            out["instances"] = sorted(doc["instance_id"] for doc in await runtime.presence.instances()) \
                if runtime.presence is not None else [runtime.instance_id]
        except Exception as exc:
            out.update(reachable=False, error=type(exc).__name__)
    return out


async def health(request: Request) -> Response:
    runtime = runtime_of(request)
    config = runtime.config
    groups = {name: {"models": list(group.models), "primary": group.models[0], "fallbacks": list(group.models[1:])}
              for name, group in config.groups.items()}
    state = await state_health(runtime)
    return ops_response({
        "status": ("ok" if state["reachable"] else "degraded") if runtime.ready else "starting",
        "version": __version__,
        "uptime_seconds": round(time.time() - runtime.started_at, 3),
        "pid": os.getpid(),
        "instance_id": runtime.instance_id,
        "state": state,
        "groups": groups,
        "aliases": dict(config.aliases),
        "providers": {name: p.missing_config() is None for name, p in runtime.providers.items()},
        "middleware": runtime.hooks.health(runtime),
    })


async def providers(request: Request) -> Response:
    runtime = runtime_of(request)
    rows: list[dict[str, Any]] = []
    for provider in runtime.providers.by_rule_order():
        rows.append(provider.describe())
    return ops_response({"providers": rows, "routing_order": ["alias", "group", "prefix", "name rule"]})


async def auth(request: Request) -> Response:
    runtime = runtime_of(request)
    logins = {name: status for name, p in runtime.providers.items() if (status := p.auth_status()) is not None}
    return ops_response({"timestamp": int(time.time()), "logins": logins})


async def plugins(request: Request) -> Response:
    runtime = runtime_of(request)
    return ops_response({"plugins": [info.as_dict() for info in runtime.plugins]})


async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry = runtime_of(request).metrics
    text = generate_latest(registry)
    decoded = text.decode()
    if redact(decoded) != decoded:  # a label value holds a secret (nearly never): render them redacted
        text = generate_latest(RedactedLabels(registry))
    return Response(text, media_type=CONTENT_TYPE_LATEST)


class RedactedLabels:
    """A registry's metrics with every label value through ``redact_name``; series whose labels became the same
    (``llama3:sk-a...`` and ``llama3:sk-b...`` are both ``llama3:[redacted]``) are added up into one."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def collect(self) -> Any:
        for family in self.registry.collect():
            samples: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
            for sample in family.samples:
                labels = {k: redact_name(v) for k, v in sample.labels.items()}
                key = (sample.name, tuple(sorted(labels.items())))
                seen, value = samples.get(key), sample.value
                if seen is not None:
                    value = min(seen.value, value) if sample.name.endswith("_created") else seen.value + value
                samples[key] = sample._replace(labels=labels, value=value)
            family.samples = list(samples.values())
            yield family
