"""Metrics and the call log through the official ``openai`` client against the OpenAI-format fake."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, make_app

MODEL = "gpt-4o-mini"
KEY = "sk-metrics-test-secret-0123456789abcdef"
AUTH = {"authorization": f"Bearer {DEV_KEY}"}


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture
def serve(fake: FakeOpenAI, tmp_path: Any) -> Iterator[Any]:
    servers: list[ServerThread] = []

    def start(config: dict[str, Any] | None = None, app_hook: Any = None) -> ServerThread:
        app = make_app(env={"OPENAI_API_KEY": KEY, "OPENAI_API_BASE": fake.base_url}, config=config or {},
                       data_dir=tmp_path / f"d{len(servers)}")
        if app_hook is not None:
            app_hook(app.runtime)
        server = ServerThread(app).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


_CLIENTS: dict[str, openai.OpenAI] = {}


def client(server: ServerThread, caller: str | None = None) -> openai.OpenAI:
    """One client per server (constructing one costs ~0.2 s); the caller header goes per request."""
    if server.url not in _CLIENTS:
        _CLIENTS[server.url] = openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)
    base = _CLIENTS[server.url]
    return base.with_options(default_headers={"X-Caller-Skill": caller}) if caller else base


def ask(server: ServerThread, caller: str | None = None, **kw: Any) -> Any:
    kw.setdefault("model", MODEL)
    kw.setdefault("messages", [{"role": "user", "content": "hi"}])
    return client(server, caller).chat.completions.with_raw_response.create(**kw)


def series(text: str, name: str, **labels: str) -> float:
    """The value of the one sample of ``name`` whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line[line.index("{"):line.index("}")]))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"no {name}{labels} in /metrics"
    return total


def calls(server: ServerThread, limit: int = 50) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.url}/v1/scillm/calls", params={"limit": limit}, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()["data"]  # type: ignore[no-any-return]


def test_series_per_provider_model_and_caller(fake: FakeOpenAI, serve: Any) -> None:
    server = serve()
    ask(server, "skill-a")
    ask(server, "skill-a")
    ask(server, "skill-b")
    fake.script(Reply.fail(400, "no such parameter", type="invalid_request_error"))  # not retried
    with pytest.raises(openai.BadRequestError):
        ask(server, "skill-b")
    list(client(server, "skill-b").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "s"}],
                                                           stream=True, stream_options={"include_usage": True}))
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    base = {"provider": "openai", "model": MODEL}
    assert series(text, "scillm_upstream_requests_total", **base, caller="skill-a", status="2xx", code="ok") == 2
    assert series(text, "scillm_upstream_requests_total", **base, caller="skill-b", status="2xx", code="ok") == 2
    assert series(text, "scillm_upstream_requests_total", **base, caller="skill-b", status="4xx") == 1
    assert series(text, "scillm_upstream_latency_seconds_count", **base, caller="skill-a") == 2
    assert series(text, "scillm_upstream_first_chunk_seconds_count", **base, caller="skill-b") == 1
    assert series(text, "scillm_upstream_tokens_total", **base, caller="skill-a", kind="prompt") == 22
    assert series(text, "scillm_upstream_tokens_total", **base, caller="skill-b", kind="completion") == 14
    assert series(text, "scillm_requests_total", model=MODEL, caller="skill-b", status="2xx") == 2
    assert series(text, "scillm_requests_total", model=MODEL, caller="skill-b", status="4xx") == 1
    assert series(text, "scillm_request_latency_seconds_count", model=MODEL, caller="skill-a") == 2


def test_caller_label_cardinality_is_bounded(serve: Any) -> None:
    server = serve({"metrics": {"max_callers": 2}})
    for caller in ("one", "two", "three", "four", None):
        ask(server, caller)
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    callers = set(re.findall(r'scillm_upstream_requests_total\{[^}]*caller="([^"]*)"', text))
    assert callers == {"one", "two", "other", "unknown"}


def test_call_log_records_a_call(serve: Any) -> None:
    server = serve()
    raw = ask(server, "skill-log", extra_body={"scillm_metadata": {"run": "r1", "step": 3}},
              extra_headers={"x-request-id": "req-abc-123"})
    assert raw.headers["x-request-id"] == "req-abc-123"
    records = calls(server)
    assert len(records) == 1
    record = records[0]
    assert record["request_id"] == "req-abc-123" and record["caller"] == "skill-log"
    assert (record["model"], record["provider"], record["served_model"]) == (MODEL, "openai", MODEL)
    assert record["status"] == 200 and record["error_code"] is None and record["stream"] is False
    assert record["tokens"] == {"prompt": 11, "completion": 7, "total": 18}
    assert record["scillm_metadata"] == {"run": "r1", "step": 3}
    assert record["latency_ms"] >= 0 and abs(record["ts"] - time.time()) < 60
    assert record["attempts"] == 1


def test_call_log_never_holds_the_api_key(fake: FakeOpenAI, serve: Any) -> None:
    server = serve()
    fake.script(Reply.fail(401, f"Incorrect API key provided: {KEY}. Find your key at the dashboard.",
                           type="invalid_request_error", code="invalid_api_key"))
    with pytest.raises(openai.APIStatusError) as caught:
        ask(server, "skill-x", extra_body={"scillm_metadata": {"note": f"leaked {KEY}", "auth": "Bearer abcdefghijk"}})
    assert KEY not in str(caught.value.body)
    text = httpx.get(f"{server.url}/v1/scillm/calls", headers=AUTH).text
    assert KEY not in text and KEY[:20] not in text and "abcdefghijk" not in text
    record = calls(server)[-1]
    assert record["status"] == caught.value.status_code and record["error_code"] == caught.value.body["code"]
    assert "[redacted]" in record["scillm_metadata"]["note"]
    health = httpx.get(server.url + "/v1/scillm/health", headers=AUTH).text
    assert KEY not in health


def test_calls_route_validates_limit_and_requires_auth(serve: Any) -> None:
    server = serve()
    for _ in range(3):
        ask(server)
    assert len(calls(server, limit=2)) == 2
    bad = httpx.get(f"{server.url}/v1/scillm/calls", params={"limit": "0"}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "query.limit"
    assert httpx.get(f"{server.url}/v1/scillm/calls").status_code == 401


def test_the_call_log_keeps_only_its_newest_records(serve: Any) -> None:
    server = serve({"metrics": {"call_log_max_rows": 10}})
    for i in range(25):
        ask(server, f"skill-{i}")
    records = calls(server, limit=1000)
    assert len(records) == 10 and records[-1]["caller"] == "skill-24"
    health = httpx.get(server.url + "/v1/scillm/health", headers=AUTH).json()["middleware"]["metrics"]
    assert health["pruned"] == 15 and health["call_log_max_rows"] == 10


class BrokenStore:
    async def append(self, namespace: str, record: Any) -> None:
        raise OSError("disk full")

    async def append_many(self, namespace: str, records: Any) -> None:
        raise OSError("disk full")

    async def tail(self, namespace: str, limit: int = 100) -> list[dict[str, Any]]:
        return []

    async def close(self) -> None:
        return None


def test_fails_open_when_the_call_log_cannot_be_written(serve: Any) -> None:
    server = serve(app_hook=lambda runtime: runtime.use_store(BrokenStore))
    for _ in range(2):
        assert ask(server).parse().choices[0].message.content == "Hello from the fake."
    calls(server)  # flushes the queue
    health = httpx.get(server.url + "/v1/scillm/health", headers=AUTH).json()["middleware"]["metrics"]
    assert health["enabled"] is True and health["fails"] == "open" and health["write_errors"] == 2


def test_disabled_records_nothing(serve: Any) -> None:
    server = serve({"metrics": {"enabled": False}})
    ask(server, "skill-a")
    assert "scillm_upstream_requests_total" not in httpx.get(server.url + "/metrics", headers=AUTH).text
    assert calls(server) == []


@pytest.mark.parametrize("metadata", [
    {"note": f"leaked {KEY}"},                      # a configured secret
    {f"key {KEY}": 1},                              # ... in a key
    {"auth": "Bearer\tabcdefghijklmnop"},           # a shape whose JSON form is escaped (\t)
    {"quote": f'"{KEY}"', "nested": [{"x": "sk-live-0123456789"}]},
])
def test_redact_batch_finds_secrets_anywhere_in_a_batch(metadata: dict[str, Any]) -> None:
    from scillm_metrics import redact_batch

    clean = {"request_id": "r1", "model": MODEL, "scillm_metadata": {"run": 1}}
    out = redact_batch([clean, {"request_id": "r2", "scillm_metadata": metadata}], [KEY])
    text = repr(out)
    assert KEY not in text and "abcdefghijklmnop" not in text and "0123456789" not in text
    assert out[0] == clean and "[redacted]" in text


def test_redact_batch_returns_clean_records_untouched() -> None:
    from scillm_metrics import redact_batch

    records = [{"request_id": "r1", "caller": "skill", "error": "upstream said \"no\"\n", "tokens": None}]
    assert redact_batch(records, [KEY]) == records


def test_bounded_label_caches_without_growing_past_its_limit() -> None:
    from scillm_metrics import BoundedLabel

    label = BoundedLabel(2)
    assert [label(v) for v in ("a b", "a b", "c", "d", None, "a b")] == ["a_b", "a_b", "c", "other", "unknown", "a_b"]
    for i in range(1000):
        label(f"caller-{i}")
    assert len(label.known) <= 2 and label.seen == {"a_b", "c"}


def test_series_render_as_prometheus_counters_and_cumulative_histograms() -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from scillm_metrics.series import Counters, Histograms, SeriesCollector

    counters = Counters("demo_requests", "Requests", ("caller",))
    histograms = Histograms("demo_latency_seconds", "Latency", ("caller",), (0.1, 1.0))
    registry = CollectorRegistry(auto_describe=True)
    registry.register(SeriesCollector(counters, histograms))
    for value in (0.05, 0.1, 0.5, 3.0):
        counters.inc(("a",))
        histograms.observe(("a",), value)
    counters.inc(("b",), 2.5)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in families["demo_requests"].samples}
    assert samples == {("demo_requests_total", (("caller", "a"),)): 4.0,
                       ("demo_requests_total", (("caller", "b"),)): 2.5}
    buckets = {s.labels.get("le"): s.value for s in families["demo_latency_seconds"].samples
               if s.name.endswith("_bucket")}
    assert buckets == {"0.1": 2.0, "1.0": 3.0, "+Inf": 4.0}  # le is inclusive: 0.1 falls in the 0.1 bucket
    totals = {s.name: s.value for s in families["demo_latency_seconds"].samples if not s.name.endswith("_bucket")}
    assert totals == {"demo_latency_seconds_count": 4.0, "demo_latency_seconds_sum": 3.65}
    with pytest.raises(ValueError):  # a second collector with the same names is refused, as with prometheus_client
        registry.register(SeriesCollector(Counters("demo_requests", "Requests", ("caller",))))
