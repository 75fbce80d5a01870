"""Prometheus metrics per provider, model and caller, and a redacted call log in the state store.

Both are built from the pipeline's events (``runtime.events``; the observer is a function, no hook wrapper, and a
stream's end is observed by the one tap core already has on it):

- ``attempt.end`` (every upstream attempt, retries and fallbacks included):
  ``scillm_upstream_requests_total{provider,model,caller,status,code}``, ``scillm_upstream_latency_seconds``,
  ``scillm_upstream_first_chunk_seconds`` (streams), ``scillm_upstream_tokens_total{kind}`` and
  ``scillm_upstream_chunks_skipped_total`` (stream events that could not be parsed and were skipped).
- ``request.end`` (the whole request, JSON re-asks and cache hits included, rejected requests too):
  ``scillm_requests_total{model,caller,status,code}``, ``scillm_request_latency_seconds`` and one call-log record
  per request (ts, request id, caller, owner key, requested model, provider, served model, status, error code,
  latency, tokens, attempts, cache result, cost, batch or run, scillm_metadata), secrets redacted. Records go
  through a bounded queue to a background writer (``store.append_many("calls", ...)``), never on the response
  path; a full queue drops records (counted).
- ``GET /v1/scillm/calls?limit=N`` returns the newest records: a virtual key's own, or everyone's for the master.
- Label cardinality is bounded: at most ``max_callers`` callers and ``max_models`` models per label, the rest
  count as ``other``. Fails open: a metrics or call-log failure never fails a request.

Config: ``[metrics] enabled = true``, ``call_log = true``, ``max_callers``, ``max_models``, ``backlog``,
``call_log_max_rows`` (the log keeps the newest N records), ``call_log_max_days`` (and none older).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from attrs import define, field, frozen, validators
from starlette.requests import Request
from starlette.responses import Response

from scillm_core import Runtime, SurfaceRegistry, errors, hookimpl, identity_of, ops_response, runtime_of
from scillm_core.redact import env_secrets, redact, redact_tree
from scillm_core.state.writer import LogWriter
from scillm_core.web import query_int
from scillm_metrics.series import Counters, Histograms, SeriesCollector

if TYPE_CHECKING:
    from scillm_core import Usage
    from scillm_core.events import Event

__all__ = ["BoundedLabel", "MetricsConfig", "redact_batch"]

log = logging.getLogger("scillm.metrics")
NAMESPACE = "calls"
OTHER = "other"
UNKNOWN = "unknown"
_LABEL_JUNK = re.compile(r"[^A-Za-z0-9_.:/@+\-]")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@frozen(kw_only=True)
class MetricsConfig:
    enabled: bool = True
    call_log: bool = True
    max_callers: int = 100
    max_models: int = 200
    backlog: int = 1000
    call_log_max_rows: int = field(default=100_000, validator=validators.ge(1))  # older records are dropped
    call_log_max_days: float = field(default=30.0, validator=validators.ge(0))  # and older ones (0: no age limit)


# -- bounded labels ------------------------------------------------------------------------------------------------

class BoundedLabel:
    """At most ``limit`` distinct values; later newcomers become ``other``. Values already seen are looked up,
    not re-sanitised (this runs several times per request)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.known: dict[str, str] = {}  # raw value -> label, at most ``limit`` entries
        self.seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if not value:
            return UNKNOWN
        label = self.known.get(value)
        if label is not None:
            return label
        label = _LABEL_JUNK.sub("_", value)[:64]
        if label not in self.seen:
            if len(self.seen) >= self.limit:
                return OTHER
            self.seen.add(label)
        if len(self.known) < self.limit:
            self.known[value] = label
        return label


# -- per-app state -------------------------------------------------------------------------------------------------

@define
class MetricsState:
    config: MetricsConfig
    runtime: Any
    secrets: tuple[str, ...]
    callers: BoundedLabel
    models: BoundedLabel
    attempts: Counters
    latency: Histograms
    first_chunk: Histograms
    tokens: Counters
    skipped: Counters
    requests: Counters
    request_latency: Histograms
    dropped_counter: Counters
    log: LogWriter
    counts: dict[str, int] = field(factory=lambda: {"metric_errors": 0})

    def enqueue(self, record: dict[str, Any]) -> None:
        if self.config.call_log and not self.log.add(record):  # redacted by the writer, a batch at a time
            self.dropped_counter.inc(())


def _state(runtime: Runtime) -> MetricsState | None:
    return runtime.plugin_state.get("metrics")  # type: ignore[no-any-return]


def _config(runtime: Runtime) -> MetricsConfig:
    return runtime.config.sections.get("metrics") or MetricsConfig()  # type: ignore[no-any-return]


def redact_batch(records: list[dict[str, Any]], secrets: Iterable[str] = ()) -> list[dict[str, Any]]:
    """``records`` redacted and writable. One scan of the batch's JSON tells whether anything needs redaction
    (almost never): without a backslash every string, key included, appears in it verbatim. Only then is each
    record walked. A record that cannot be serialised is replaced by its plain fields and the reason, alone: the
    rest of the batch is written as usual."""
    try:
        text = orjson.dumps(records).decode()
    except orjson.JSONEncodeError:
        records = [_writable(record) for record in records]
        text = orjson.dumps(records).decode()
    if "\\" not in text and redact(text, secrets) == text:
        return records
    return [redact_tree(record, secrets) for record in records]


def _writable(record: dict[str, Any]) -> dict[str, Any]:
    try:
        orjson.dumps(record)
        return record
    except orjson.JSONEncodeError as exc:
        plain = {k: v for k, v in record.items() if v is None or isinstance(v, str | int | float | bool)}
        return {**plain, "log_error": f"record could not be serialised ({exc}); its structured fields are left out"}


@hookimpl
def scillm_config_sections() -> Mapping[str, type]:
    return {"metrics": MetricsConfig}


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    surfaces.route("/v1/scillm/calls", calls, ["GET"], plugin="metrics")
    config = _config(runtime)
    if not config.enabled:
        return
    upstream = ("provider", "model", "caller")
    secrets = env_secrets(runtime.env)
    state = MetricsState(
        config=config, runtime=runtime, secrets=secrets, callers=BoundedLabel(config.max_callers),
        models=BoundedLabel(config.max_models),
        attempts=Counters("scillm_upstream_requests", "Upstream attempts by outcome", (*upstream, "status", "code")),
        latency=Histograms("scillm_upstream_latency_seconds", "Upstream attempt duration (streams: to the end)",
                           upstream, LATENCY_BUCKETS),
        first_chunk=Histograms("scillm_upstream_first_chunk_seconds", "Time to the first streamed chunk", upstream,
                               LATENCY_BUCKETS),
        tokens=Counters("scillm_upstream_tokens", "Tokens reported by upstreams", (*upstream, "kind")),
        skipped=Counters("scillm_upstream_chunks_skipped", "Upstream stream events skipped as unparseable", upstream),
        requests=Counters("scillm_requests", "Chat requests by result", ("model", "caller", "status", "code")),
        request_latency=Histograms("scillm_request_latency_seconds", "Chat request duration", ("model", "caller"),
                                   LATENCY_BUCKETS),
        dropped_counter=Counters("scillm_call_log_dropped", "Call-log records dropped (backlog full)", ()),
        log=LogWriter(lambda: runtime.store, NAMESPACE, backlog=config.backlog, max_rows=config.call_log_max_rows,
                      max_age_s=config.call_log_max_days * 86400.0 or None,
                      prepare=lambda records: redact_batch(records, secrets),
                      describe_error=lambda exc: redact(str(exc), secrets)))
    runtime.metrics.register(SeriesCollector(state.attempts, state.latency, state.first_chunk, state.tokens,
                                             state.skipped, state.requests, state.request_latency,
                                             state.dropped_counter))
    runtime.plugin_state["metrics"] = state
    runtime.events.subscribe(observer(state), ["attempt.end", "request.end"])
    surfaces.on_shutdown(state.log.stop)


@hookimpl
def scillm_health(runtime: Runtime) -> Mapping[str, Any]:
    state = _state(runtime)
    if state is None:
        return {"metrics": {"enabled": False, "fails": "open"}}
    return {"metrics": {"enabled": True, "fails": "open", "call_log": state.config.call_log,
                        "backlog": state.log.pending, "max_backlog": state.config.backlog,
                        "call_log_max_rows": state.config.call_log_max_rows,
                        "call_log_max_days": state.config.call_log_max_days,
                        "callers_tracked": len(state.callers.seen), **state.log.counts, **state.counts}}


# -- outcomes ------------------------------------------------------------------------------------------------------

def _outcome(exc: BaseException | None) -> tuple[int | None, str, str]:
    """``(status, status class, code)`` for a finished call."""
    if exc is None:
        return 200, "2xx", "ok"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return None, "cancelled", "client_closed"
    status, body, _ = errors.to_response_parts(exc)
    return status, f"{status // 100}xx", str(body["error"].get("code") or body["error"].get("type"))


def _tokens(usage: Usage | None) -> dict[str, int] | None:
    if usage is None:
        return None
    return {"prompt": usage.prompt_tokens, "completion": usage.completion_tokens, "total": usage.total_tokens}


# -- per upstream attempt and per request: observed through runtime.events -----------------------------------------

def _attempt_end(state: MetricsState, event: Event) -> None:
    ctx = event.ctx
    if ctx is None:
        return
    data = event.data
    route = data["route"]
    labels = (route.provider, state.models(route.model), state.callers(ctx.caller))
    _, status_class, code = _outcome(data["error"])
    state.attempts.inc((*labels, status_class, code))
    state.latency.observe(labels, data["duration_s"])
    first_chunk_s = data["first_chunk_s"]
    if first_chunk_s is not None:
        state.first_chunk.observe(labels, first_chunk_s)
    usage = data["usage"]
    if usage is not None:
        state.tokens.inc((*labels, "prompt"), max(0, usage.prompt_tokens))
        state.tokens.inc((*labels, "completion"), max(0, usage.completion_tokens))
    notes = ctx.notes
    skipped = notes.pop("chunks_skipped", 0)  # this attempt's (scillm_core.upstream.Malformed)
    if skipped:
        state.skipped.inc(labels, skipped)
        notes["chunks_skipped_total"] = notes.get("chunks_skipped_total", 0) + skipped


def _request_end(state: MetricsState, event: Event) -> None:
    ctx = event.ctx
    if ctx is None:
        return
    data = event.data
    request, exc, usage, elapsed = data["request"], data["error"], data["usage"], data["duration_s"]
    status, status_class, code = _outcome(exc)
    model, caller = state.models(request.model), state.callers(ctx.caller)
    state.requests.inc((model, caller, status_class, code))
    state.request_latency.observe((model, caller), elapsed)
    if not state.config.call_log:
        return
    route = ctx.route
    identity = ctx.identity
    record: dict[str, Any] = {
        "ts": time.time(), "request_id": ctx.request_id, "caller": ctx.caller, "owner": identity.owner,
        "key_name": identity.name, "team": identity.team, "model": request.model,
        "provider": route.provider if route else None, "served_model": route.model if route else None,
        "stream": request.stream, "status": status if exc is None or status is not None else 499,
        "error_code": None if exc is None else code, "latency_ms": round(elapsed * 1000, 1),
        "attempts": ctx.attempts, "tokens": _tokens(usage), "cache": ctx.notes.get("cache"),
        "cost_usd": ctx.notes.get("cost_usd", 0.0 if ctx.notes.get("cache") == "hit" else None),
        "scillm_metadata": request.scillm.get("scillm_metadata"), "session": request.scillm.get("session"),
        "dialect": (ctx.notes.get("headers") or {}).get("x-scillm-dialect"),
        "chunks_skipped": ctx.notes.get("chunks_skipped_total", 0) + ctx.notes.get("chunks_skipped", 0),
        "continuation": ctx.notes.get("continuation"),
    }
    if ctx.job is not None:
        record[ctx.job.kind] = ctx.job.id
    if exc is not None and isinstance(exc, errors.ScillmError):
        record["error"] = exc.message[:500]
    state.enqueue(record)


def observer(state: MetricsState) -> Any:
    """The observer of ``attempt.end`` (upstream series) and ``request.end`` (request series, call log)."""
    handlers = {"attempt.end": _attempt_end, "request.end": _request_end}

    def observe(event: Event) -> None:
        try:
            handlers[event.kind](state, event)
        except Exception:
            state.counts["metric_errors"] += 1
            log.warning("recording metrics failed", exc_info=True)

    return observe


# -- GET /v1/scillm/calls ------------------------------------------------------------------------------------------

async def calls(request: Request) -> Response:
    runtime = runtime_of(request)
    limit = query_int(request, "limit", default=100, minimum=1, maximum=1000)
    state = _state(runtime)
    if state is not None:
        await state.log.flush(1.0)  # records still queued are part of the tail
    identity = identity_of(request)  # a virtual key sees its own calls only
    if identity.master:
        records = await runtime.store.tail(NAMESPACE, limit)
    else:
        records = await runtime.store.tail(NAMESPACE, limit, match={"owner": identity.owner})
    return ops_response({"object": "list", "data": records, "count": len(records),
                          "enabled": state is not None and state.config.call_log})
