"""What the dashboard knows, built from events only: live and recent calls (with their attempts), per-minute
series, batches, runs and graphs, and circuit transitions. Bounded in memory; nothing here is persisted (the call
log and the batch store keep the history).

The observer runs on every request, so it only stores: a call's prompt and answer previews and its metadata are
kept as they came (cut) and redacted when a page asks for them (:meth:`UiState.detail`), error texts are redacted
when recorded (they are rare), and a minute's series count per (model, caller, key) and are summed by dimension
when read."""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from attrs import frozen

from scillm_core import MASTER, ChatResponse, Identity, errors
from scillm_core.events import Event
from scillm_core.redact import redact

__all__ = ["DIMENSIONS", "KINDS", "UiConfig", "UiState"]

#: what calls and series can be grouped and filtered by; "key" is the name of the virtual key a call was made with
#: (none for the master key), or what a plugin puts in ``ctx.notes["key"]`` (a non-secret name)
DIMENSIONS = ("model", "caller", "key")
KINDS = ("request.start", "request.end", "attempt.end", "cache", "retry", "fallback", "circuit.skip", "queue.wait",
         "timeout", "chunk.skipped", "continuation", "continuation.end", "breaker.transition", "batch.start",
         "batch.item.end", "batch.end", "run.start", "run.end", "graph.start", "graph.end")


@frozen(kw_only=True)
class UiConfig:
    enabled: bool = True
    max_calls: int = 1000         # live and recent calls kept
    max_units: int = 200          # recent batches, and recent runs and graphs, kept
    preview_chars: int = 500      # of the prompt and the answer shown in a call's detail; 0 keeps none
    series_minutes: int = 60      # history of the charts
    refresh_s: float = 2.0        # how often the page polls


def _now() -> float:
    return time.time()


def _code(error: BaseException) -> tuple[int | None, str]:
    if isinstance(error, GeneratorExit) or type(error).__name__ == "CancelledError":
        return 499, "client_closed"
    status, body, _ = errors.to_response_parts(error)
    return status, str(body["error"].get("code") or body["error"].get("type"))


class Bucket:
    __slots__ = ("cost", "errors", "latencies", "requests", "tokens_in", "tokens_out")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latencies: list[float] = []
        self.tokens_in = 0
        self.tokens_out = 0
        self.cost = 0.0

    def add(self, other: Bucket) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.latencies += other.latencies
        self.tokens_in += other.tokens_in
        self.tokens_out += other.tokens_out
        self.cost += other.cost


class UiState:
    def __init__(self, config: UiConfig, secrets: tuple[str, ...] = (), clock: Any = _now) -> None:
        self.config = config
        self.secrets = secrets
        self.clock = clock
        self.calls: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self.units: dict[str, collections.OrderedDict[str, dict[str, Any]]] = {
            "batch": collections.OrderedDict(), "run": collections.OrderedDict()}
        self.transitions: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        self.minutes: collections.OrderedDict[int, dict[tuple[str, str, str, str], Bucket]] = \
            collections.OrderedDict()
        self.ids = itertools.count(1)
        self.handlers = {
            "request.start": self.request_start, "request.end": self.request_end, "attempt.end": self.attempt_end,
            "cache": self.mark, "retry": self.mark, "fallback": self.mark, "circuit.skip": self.mark,
            "queue.wait": self.mark, "timeout": self.mark, "chunk.skipped": self.mark, "continuation": self.mark,
            "continuation.end": self.mark, "breaker.transition": self.transition,
        }

    # -- the observer --------------------------------------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        handler = self.handlers.get(event.kind)
        if handler is not None:
            handler(event)
        elif "unit" in event.data:
            self.unit(event)

    def _text(self, value: Any, limit: int) -> str:
        return redact(str(value), self.secrets)[:limit]

    def _preview(self, text: str | None) -> str | None:
        limit = self.config.preview_chars
        if not limit or not text:
            return None
        return redact(text[:limit * 2], self.secrets)[:limit]

    def request_start(self, event: Event) -> None:
        ctx = event.ctx
        if ctx is None:
            return
        request = event.data["request"]
        call_id = f"c{next(self.ids)}"
        prompt = None
        keep = self.config.preview_chars * 2  # cut now, redacted (and cut to preview_chars) when shown
        messages = getattr(request, "messages", None)  # an embeddings request has none
        if keep and messages:
            for message in reversed(messages):
                if message.role == "user":
                    prompt = message.text[:keep]
                    break
        record: dict[str, Any] = {
            "id": call_id, "request_id": ctx.request_id, "started": event.time_ns / 1e9, "ended": None,
            "status": "live", "http_status": None, "error_code": None, "error": None, "model": request.model,
            "provider": None, "served_model": None, "caller": ctx.caller,
            "key": ctx.notes.get("key") or (None if ctx.identity.master else ctx.identity.name),
            "owner": ctx.identity.owner,
            "stream": request.stream, "duration_ms": None, "first_chunk_ms": None, "tokens_in": None,
            "tokens_out": None, "cost_usd": None, "cache": None, "parent": ctx.parent, "attempts": [],
            "marks": [], "prompt": prompt, "answer": None, "metadata": request.scillm.get("scillm_metadata")}
        ctx.notes["ui"] = record
        calls = self.calls
        calls[call_id] = record
        if len(calls) > self.config.max_calls:
            calls.popitem(last=False)

    def request_end(self, event: Event) -> None:
        ctx = event.ctx
        record = ctx.notes.get("ui") if ctx is not None else None
        if record is None:
            return
        data = event.data
        error = data["error"]
        route = ctx.route
        notes = ctx.notes
        record["ended"] = event.time_ns / 1e9
        record["duration_ms"] = round(data["duration_s"] * 1000, 1)
        if route is not None:
            record["provider"], record["served_model"] = route.provider, route.model
        record["cache"], record["cost_usd"] = notes.get("cache"), notes.get("cost_usd")
        key = notes.get("key")
        if key is not None:
            record["key"] = key
        if data["first_chunk_s"] is not None:
            record["first_chunk_ms"] = round(data["first_chunk_s"] * 1000, 1)
        usage = data["usage"]
        if usage is not None:
            record["tokens_in"], record["tokens_out"] = usage.prompt_tokens, usage.completion_tokens
        response = data["response"]
        if isinstance(response, ChatResponse):
            record["served_model"] = response.model
            keep = self.config.preview_chars * 2
            if keep:
                record["answer"] = response.text[:keep] or None
        if error is None:
            record["status"], record["http_status"] = "ok", 200
        else:
            status, code = _code(error)
            record.update(status="error", http_status=status, error_code=code,
                          error=self._text(getattr(error, "message", None) or error, 300))
        self._count(record)

    def detail(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """One call as a page shows it: previews and metadata redacted and cut."""
        metadata = record["metadata"]
        return {**record, "prompt": self._preview(record["prompt"]), "answer": self._preview(record["answer"]),
                "metadata": self._text(orjson.dumps(metadata, default=str).decode(), 500) if metadata else None}

    def attempt_end(self, event: Event) -> None:
        record = event.ctx.notes.get("ui") if event.ctx is not None else None
        if record is None:
            return
        route, error = event["route"], event["error"]
        attempt: dict[str, Any] = {"n": event["attempt"], "provider": route.provider, "model": route.model,
                                   "duration_ms": round(event["duration_s"] * 1000, 1), "outcome": "ok"}
        if error is not None:
            attempt["outcome"] = _code(error)[1]
            attempt["error"] = self._text(getattr(error, "message", None) or error, 200)
        record["attempts"].append(attempt)

    def mark(self, event: Event) -> None:
        record = event.ctx.notes.get("ui") if event.ctx is not None else None
        if record is None or len(record["marks"]) >= 50:
            return
        data = event.data
        mark: dict[str, Any] = {"kind": event.kind, "at": event.time_ns / 1e9}
        if "route" in data:
            mark["deployment"] = data["route"].deployment
        if "to" in data:
            mark["to"] = data["to"].deployment
        for key in ("result", "retry", "delay_s", "remaining_s", "provider", "waited_s", "outcome", "limit", "mode",
                    "sent_chars", "reason"):
            if key in data:
                value = data[key]
                mark[key] = round(value, 3) if isinstance(value, float) else value
        if data.get("error") is not None:
            mark["error"] = _code(data["error"])[1]
        record["marks"].append(mark)

    def transition(self, event: Event) -> None:
        self.transitions.appendleft({"at": event.time_ns / 1e9, "deployment": event["deployment"],
                                     "old": event["old"], "new": event["new"],
                                     "error": self._text(event["error"], 200) if event["error"] else None})

    def unit(self, event: Event) -> None:
        family, _, phase = event.kind.rpartition(".")
        unit = event["unit"]
        if family == "batch.item":
            batch = self.units["batch"].get(event.get("parent") or "")
            if batch is not None and phase == "end":
                attrs = event.get("attrs") or {}
                batch["completed"], batch["failed"] = attrs.get("completed", 0), attrs.get("failed", 0)
            return
        table = self.units["batch" if family == "batch" else "run"]
        if phase == "start":
            attrs = {k: self._text(v, 300) if isinstance(v, str) else v
                     for k, v in (event.get("attrs") or {}).items()}
            table[unit] = {"unit": unit, "kind": family, "owner": event.get("owner"),
                           "name": self._text(event.get("name") or unit, 200),
                           "parent": event.get("parent"), "status": "running", "error": None,
                           "started": event.time_ns / 1e9, "ended": None, "attrs": attrs,
                           "completed": 0, "failed": 0, "total": attrs.get("total")}
            while len(table) > self.config.max_units:
                table.popitem(last=False)
        elif phase == "end" and unit in table:
            row = table[unit]
            row.update(status=event.get("status") or "ok", ended=event.time_ns / 1e9,
                       error=self._text(event["error"], 300) if event.get("error") else None)
            for key, value in (event.get("attrs") or {}).items():
                if key in ("completed", "failed"):
                    row[key] = value
                else:
                    row["attrs"][key] = value

    # -- series --------------------------------------------------------------------------------------------------

    def _count(self, record: dict[str, Any]) -> None:
        minute = int((record["ended"] or self.clock()) // 60)
        buckets = self.minutes.get(minute)
        if buckets is None:
            buckets = self.minutes[minute] = {}
            oldest = minute - self.config.series_minutes
            while self.minutes and next(iter(self.minutes)) <= oldest:
                self.minutes.popitem(last=False)
        # DIMENSIONS, in order, then whose calls they were (a key's series are its own calls')
        group = (record["model"] or "-", record["caller"] or "-", record["key"] or "-", record["owner"])
        bucket = buckets.get(group)
        if bucket is None:
            bucket = buckets[group] = Bucket()
        bucket.requests += 1
        if record["status"] != "ok":
            bucket.errors += 1
        if len(bucket.latencies) < 500 and record["duration_ms"] is not None:
            bucket.latencies.append(record["duration_ms"])
        bucket.tokens_in += record["tokens_in"] or 0
        bucket.tokens_out += record["tokens_out"] or 0
        bucket.cost += record["cost_usd"] or 0.0

    def series(self, by: str, top: int = 8, owner: str | None = None) -> dict[str, Any]:
        """Per-minute figures summed by ``by``; only the calls of ``owner`` when given (a virtual key's view)."""
        now_minute = int(self.clock() // 60)
        minutes = list(range(now_minute - self.config.series_minutes + 1, now_minute + 1))
        index = DIMENSIONS.index(by)
        per_minute: dict[int, dict[str, Bucket]] = {}  # the minute's buckets summed by the dimension's value
        totals: collections.Counter[str] = collections.Counter()
        for minute, buckets in self.minutes.items():
            summed = per_minute[minute] = {}
            for group, bucket in buckets.items():
                if owner is not None and group[3] != owner:
                    continue
                name = group[index]
                total = summed.get(name)
                if total is None:
                    total = summed[name] = Bucket()
                total.add(bucket)
                totals[name] += bucket.requests
        names = [name for name, _ in totals.most_common(top)]
        out: dict[str, dict[str, list[Any]]] = {}
        for name in names:
            rows: dict[str, list[Any]] = {k: [] for k in ("requests", "errors", "p50_ms", "p95_ms", "tokens",
                                                          "cost_usd")}
            for minute in minutes:
                bucket = per_minute.get(minute, {}).get(name) or Bucket()
                latencies = sorted(bucket.latencies)
                rows["requests"].append(bucket.requests)
                rows["errors"].append(bucket.errors)
                rows["p50_ms"].append(_pct(latencies, 0.5))
                rows["p95_ms"].append(_pct(latencies, 0.95))
                rows["tokens"].append(bucket.tokens_in + bucket.tokens_out)
                rows["cost_usd"].append(round(bucket.cost, 6))
            out[name] = rows
        return {"by": by, "minutes": [m * 60 for m in minutes], "series": out}

    # -- queries -------------------------------------------------------------------------------------------------

    def find_calls(self, filters: Mapping[str, str], limit: int, viewer: Identity = MASTER) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for record in reversed(self.calls.values()):
            if viewer.can_see(record["owner"]) and _matches(record, filters):
                rows.append(_summary(record))
                if len(rows) >= limit:
                    break
        return rows

    def units_of(self, family: str, viewer: Identity = MASTER) -> list[dict[str, Any]]:
        """The batches (or runs and graphs) ``viewer`` may see: a virtual key its own, the master key all."""
        rows = [r for r in reversed(self.units[family].values()) if viewer.can_see(r["owner"])]
        return sorted(rows, key=lambda r: r["status"] != "running")  # live first, then newest


def _matches(record: Mapping[str, Any], filters: Mapping[str, str]) -> bool:
    for key, wanted in filters.items():
        if not wanted:
            continue
        if key == "status":
            if wanted == "error" and record["status"] != "error":
                return False
            if wanted in ("ok", "live") and record["status"] != wanted:
                return False
            if wanted.isdigit() and str(record["http_status"]) != wanted:
                return False
        elif key == "model":
            if wanted.lower() not in f"{record['model']} {record['served_model'] or ''}".lower():
                return False
        elif wanted.lower() not in str(record.get(key) or "").lower():
            return False
    return True


def _summary(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("attempts", "marks", "prompt", "answer", "metadata")} | {
        "attempt_count": len(record["attempts"])}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


def provider_rows(runtime: Any, health: Mapping[str, Any], calls: Iterable[Mapping[str, Any]],
                  since: float) -> list[dict[str, Any]]:
    """One row per provider: configuration, circuits of its deployments, its concurrency limit, and the calls
    it served since ``since`` (epoch s) with how many failed."""
    resilience = health.get("resilience") or {}
    circuits = ((resilience.get("breaker") or {}).get("circuits") or {})
    limiters = ((resilience.get("concurrency") or {}).get("providers") or {})
    default_limit = (resilience.get("concurrency") or {}).get("default_limit") or {}
    per_provider: dict[str, tuple[int, int]] = {}
    for call in calls:
        if call["provider"] and call["status"] != "live" and (call["ended"] or 0) >= since:
            requests, failed = per_provider.get(call["provider"], (0, 0))
            per_provider[call["provider"]] = (requests + 1, failed + (call["status"] == "error"))
    rows = []
    for name, provider in sorted(runtime.providers.items()):
        deployments = {d: {"state": c["state"], "consecutive_failures": c["consecutive_failures"],
                           "cooldown_remaining_s": c["cooldown_remaining_s"], "times_opened": c["times_opened"]}
                       for d, c in circuits.items() if d.split("/", 1)[0] == name}
        states = {d["state"] for d in deployments.values()}
        circuit = "open" if "open" in states else "half_open" if "half_open" in states else "closed"
        limiter = limiters.get(name)
        concurrency = ({k: limiter[k] for k in ("in_flight", "waiting", "effective_limit", "limit", "max_queue",
                                                 "aimd_decreases", "rejected")} if limiter else
                       {"in_flight": 0, "waiting": 0, "effective_limit": default_limit.get("max_concurrency"),
                        "limit": default_limit.get("max_concurrency"), "max_queue": default_limit.get("max_queue"),
                        "aimd_decreases": 0, "rejected": 0})
        missing = provider.missing_config()
        requests, failed = per_provider.get(name, (0, 0))
        if missing is not None:
            status = "unconfigured"
        elif circuit == "open":
            status = "down" if states == {"open"} else "degraded"
        elif circuit == "half_open" or (requests and failed * 2 >= requests):
            status = "degraded"
        else:
            status = "healthy"
        rows.append({"name": name, "family": provider.family or name, "configured": missing is None,
                     "missing": missing, "status": status, "circuit": circuit, "deployments": deployments,
                     "concurrency": concurrency, "recent_calls": requests, "recent_errors": failed})
    return rows
