"""Traces as a collector receives them: real OTLP/HTTP protobuf from a real scillm, decoded with the
OpenTelemetry proto package, while official SDK clients call and fake upstreams answer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from scillm_tracing import check_endpoint
from scillm_tracing.config import TracingConfig, resolve
from scillm_tracing_receiver import OTLPReceiver
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from scillm_core.config import ConfigError
from scillm_core.testing import FakeOpenAI, Reply, ServerThread, make_app

OPENAI_KEY = "sk-tracing-openai-secret-0123456789"
DEEPSEEK_KEY = "sk-tracing-deepseek-secret-9876543210"
MASTER_KEY = "sk-tracing-master-key-5555555555"
PROMPT = "PROMPT-MARKER what is the capital of France?"
CLIENT, SERVER, INTERNAL = 3, 2, 1  # span kinds in the proto


class PausingOpenAI(FakeOpenAI):
    """Streams one chunk, then waits for ``release`` before the rest (so a test can look mid-stream)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def routes(self) -> list[Route]:
        return [Route(f"{self.base_path}/chat/completions", self.paused, methods=["POST"])]

    async def paused(self, request: Request) -> Response:
        recorded = await self.record(request)
        model = recorded.body["model"]

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return b"data: " + orjson.dumps({"id": "chatcmpl-p", "object": "chat.completion.chunk", "created": 0,
                                              "model": model, "choices": [{"index": 0, "delta": delta,
                                                                           "finish_reason": finish}]}) + b"\n\n"

        async def events() -> Any:
            yield chunk({"role": "assistant", "content": "Hel"})
            while not self.release.is_set():
                await asyncio.sleep(0.01)
            yield chunk({"content": "lo"}, "stop")
            yield b"data: " + orjson.dumps({"id": "chatcmpl-p", "object": "chat.completion.chunk", "created": 0,
                                             "model": model, "choices": [], "usage": {
                                                 "prompt_tokens": 5, "completion_tokens": 2,
                                                 "total_tokens": 7}}) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    with FakeOpenAI() as a, FakeOpenAI() as b:
        yield a, b  # type: ignore[misc]


def _env(receiver: OTLPReceiver, a: FakeOpenAI, b: FakeOpenAI, **extra: str) -> dict[str, str]:
    return {"OPENAI_API_KEY": OPENAI_KEY, "OPENAI_API_BASE": a.url + "/v1", "DEEPSEEK_API_KEY": DEEPSEEK_KEY,
            "DEEPSEEK_API_BASE": b.url + "/v1", "SCILLM_MASTER_KEY": MASTER_KEY,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "20", **extra}


CONFIG = {"tracing": {"enabled": True},
          "groups": {"duo": {"models": ["openai/gpt-4o-mini", "deepseek/deepseek-chat"]}},
          "resilience": {"backoff_base_s": 0.01, "backoff_max_s": 0.02, "max_retries": 1}}


@pytest.fixture
def server(receiver: OTLPReceiver, upstreams: tuple[FakeOpenAI, FakeOpenAI], tmp_path: Any) -> Iterator[ServerThread]:
    receiver.clear()
    for fake in upstreams:
        fake.requests.clear()
        fake._script.clear()
    with ServerThread(make_app(env=_env(receiver, *upstreams), config=CONFIG, data_dir=tmp_path)) as server:
        yield server


def _client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=MASTER_KEY, max_retries=0)


def _request_span(model: str) -> Any:
    return lambda spans: next((s for s in spans if s["name"] == f"chat {model}" and s["kind"] != CLIENT), None)


def _trace(spans: list[dict[str, Any]], trace_id: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["trace_id"] == trace_id]


def test_retried_then_fallen_back_request_is_one_trace_with_sibling_attempts(
        server: ServerThread, receiver: OTLPReceiver, upstreams: tuple[FakeOpenAI, FakeOpenAI]) -> None:
    upstreams[0].script(Reply.fail(503, "overloaded"), Reply.fail(503, "overloaded"))
    reply = _client(server).chat.completions.create(model="duo", messages=[{"role": "user", "content": PROMPT}],
                                                    temperature=0.2, max_tokens=50)
    assert reply.model == "deepseek-chat"
    root = receiver.wait_for(_request_span("duo"))
    spans = _trace(receiver.spans, root["trace_id"])
    by_id = {s["span_id"]: s for s in spans}
    assert root["parent_id"] is None and root["kind"] == SERVER
    assert root["attrs"]["gen_ai.operation.name"] == "chat" and root["attrs"]["gen_ai.request.model"] == "duo"
    assert root["attrs"]["gen_ai.response.model"] == "deepseek-chat"
    assert root["attrs"]["gen_ai.provider.name"] == "deepseek" and root["attrs"]["scillm.attempts"] == 3
    assert root["attrs"]["gen_ai.usage.input_tokens"] == 11 and root["attrs"]["gen_ai.usage.output_tokens"] == 7
    assert root["resource"]["service.name"] == "scillm"
    # a span for each hook stage
    stages = {s["name"]: s for s in spans if s["name"] in ("preprocess_files", "postprocess_json", "call_provider")}
    assert set(stages) == {"preprocess_files", "postprocess_json", "call_provider"}
    assert stages["preprocess_files"]["parent_id"] == root["span_id"]
    assert stages["call_provider"]["parent_id"] == stages["postprocess_json"]["span_id"]
    # the attempts are siblings under call_provider, in order, with GenAI attributes
    attempts = sorted((s for s in spans if s["kind"] == CLIENT), key=lambda s: s["attrs"]["scillm.attempt"])
    assert {s["parent_id"] for s in attempts} == {stages["call_provider"]["span_id"]}
    assert [s["attrs"]["scillm.attempt.kind"] for s in attempts] == ["first", "retry", "fallback"]
    assert [s["attrs"]["gen_ai.provider.name"] for s in attempts] == ["openai", "openai", "deepseek"]
    assert [s["attrs"]["gen_ai.request.model"] for s in attempts] == ["gpt-4o-mini", "gpt-4o-mini", "deepseek-chat"]
    assert [s["name"] for s in attempts] == ["chat gpt-4o-mini", "chat gpt-4o-mini", "chat deepseek-chat"]
    for failed in attempts[:2]:
        assert failed["status"] == 2 and failed["attrs"]["http.response.status_code"] == 503
        assert failed["attrs"]["error.type"]
    ok = attempts[2]
    assert ok["status"] != 2 and ok["attrs"]["gen_ai.response.model"] == "deepseek-chat"
    assert ok["attrs"]["gen_ai.usage.input_tokens"] == 11 and ok["attrs"]["gen_ai.usage.output_tokens"] == 7
    assert ok["attrs"]["gen_ai.request.temperature"] == 0.2 and ok["attrs"]["gen_ai.request.max_tokens"] == 50
    assert ok["attrs"]["gen_ai.response.finish_reasons"] == ["stop"] and ok["attrs"]["scillm.fallback.from"]
    assert "retry" in stages["call_provider"]["events"]
    # each upstream call carried its own attempt span as traceparent
    sent = [r.headers["traceparent"] for r in (*upstreams[0].requests, *upstreams[1].requests)]
    assert [h.rsplit("-", 1)[0] for h in sent] == [f"00-{root['trace_id']}-{s['span_id']}" for s in attempts]
    assert all(int(h.rsplit("-", 1)[1], 16) & 1 for h in sent)  # sampled
    assert all(by_id[s["parent_id"]] for s in spans if s["parent_id"])  # no dangling parent in the trace


def test_a_failed_request_marks_the_stages_it_failed_in(server: ServerThread, receiver: OTLPReceiver,
                                                         upstreams: tuple[FakeOpenAI, FakeOpenAI]) -> None:
    upstreams[0].script(Reply.fail(400, "context too long", type="invalid_request_error"))
    with pytest.raises(openai.BadRequestError):
        _client(server).chat.completions.create(model="openai/gpt-4o-mini",
                                                messages=[{"role": "user", "content": "hi"}])
    root = receiver.wait_for(_request_span("openai/gpt-4o-mini"))
    spans = _trace(receiver.spans, root["trace_id"])
    assert root["status"] == 2 and root["attrs"]["http.response.status_code"] == 400
    stages = {s["name"]: s for s in spans if s["kind"] == INTERNAL}
    assert set(stages) == {"preprocess_files", "postprocess_json", "call_provider"}
    # the stages the error went through failed with it, the one before it did not; each within its parent
    assert stages["preprocess_files"]["status"] != 2
    for name in ("postprocess_json", "call_provider"):
        assert stages[name]["status"] == 2 and stages[name]["attrs"]["error.type"] and stages[name]["status_message"]
    assert root["start"] <= stages["preprocess_files"]["start"] <= stages["preprocess_files"]["end"] \
        <= stages["postprocess_json"]["start"] <= stages["call_provider"]["start"]
    attempt = next(s for s in spans if s["kind"] == CLIENT)
    assert attempt["parent_id"] == stages["call_provider"]["span_id"] and attempt["status"] == 2
    assert stages["call_provider"]["start"] <= attempt["start"] <= attempt["end"] <= stages["call_provider"]["end"]
    assert stages["call_provider"]["end"] <= stages["postprocess_json"]["end"] <= root["end"]


def test_a_streamed_request_span_ends_when_the_stream_ends(receiver: OTLPReceiver, tmp_path: Any,
                                                           upstreams: tuple[FakeOpenAI, FakeOpenAI]) -> None:
    receiver.clear()
    with PausingOpenAI() as pausing:
        app = make_app(env=_env(receiver, pausing, upstreams[1]), config=CONFIG, data_dir=tmp_path)
        with ServerThread(app) as server:
            stream = _client(server).chat.completions.create(
                model="openai/gpt-4o-mini", stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "hi"}])
            assert stream.response.headers["x-scillm-dialect"] == "openai-chat"  # the pass-through path: as sent
            chunks = iter(stream)
            assert next(chunks).choices[0].delta.content == "Hel"
            tracing = server.app.runtime.plugin_state["tracing"]
            assert tracing.processor.force_flush()
            assert not any(s["name"] == "chat openai/gpt-4o-mini" for s in receiver.spans)  # still streaming
            released = time.time_ns()
            pausing.release.set()
            assert [c.usage.completion_tokens for c in chunks if c.usage] == [2]
            root = receiver.wait_for(_request_span("openai/gpt-4o-mini"))
    assert root["end"] >= released and root["attrs"]["gen_ai.usage.output_tokens"] == 2
    assert 0 < root["attrs"]["scillm.first_chunk_s"] < (root["end"] - root["start"]) / 1e9
    attempt = next(s for s in _trace(receiver.spans, root["trace_id"]) if s["kind"] == CLIENT)
    assert attempt["end"] >= released and attempt["attrs"]["gen_ai.usage.output_tokens"] == 2


def test_a_client_traceparent_is_continued_and_passed_upstream(server: ServerThread, receiver: OTLPReceiver,
                                                               upstreams: tuple[FakeOpenAI, FakeOpenAI]) -> None:
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    _client(server).chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                                            extra_headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    root = receiver.wait_for(_request_span("openai/gpt-4o-mini"))
    assert root["trace_id"] == trace_id and root["parent_id"] == parent
    assert upstreams[0].last.headers["traceparent"].startswith(f"00-{trace_id}-")
    # an unsampled caller's decision is followed: no spans, but the context still goes upstream
    receiver.clear()
    unsampled = "5bf92f3577b34da6a3ce929d0e0e4736"
    _client(server).chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                                            extra_headers={"traceparent": f"00-{unsampled}-{parent}-00"})
    assert upstreams[0].last.headers["traceparent"].startswith(f"00-{unsampled}-")
    assert not int(upstreams[0].last.headers["traceparent"].rsplit("-", 1)[1], 16) & 1  # not sampled
    server.app.runtime.plugin_state["tracing"].processor.force_flush()
    assert not any(s["trace_id"] == unsampled for s in receiver.spans)


def test_a_batch_is_one_trace_with_a_span_per_item(server: ServerThread, receiver: OTLPReceiver) -> None:
    trace_id = "6bf92f3577b34da6a3ce929d0e0e4736"
    body = {"model": "openai/gpt-4o-mini", "batch_id": "traced-batch",
            "items": [{"item_id": f"i{n}", "prompt": f"question {n}"} for n in range(3)]}
    answer = httpx.post(server.url + "/v1/scillm/batch/completions", json=body, timeout=30,
                        headers={"authorization": f"Bearer {MASTER_KEY}",
                                 "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert answer.status_code == 200 and answer.json()["completed"] == 3
    batch = receiver.wait_for(lambda spans: next((s for s in spans if s["attrs"].get("scillm.unit") ==
                                                  "batch:traced-batch"), None))
    spans = _trace(receiver.spans, trace_id)  # the batch span ends last: everything else was exported before it
    assert len(spans) == 1 + 3 + 3 * 5  # batch, items, and per item its request, three stages and an attempt
    assert batch["trace_id"] == trace_id and batch["attrs"]["scillm.total"] == 3
    assert batch["attrs"]["scillm.completed"] == 3
    items = [s for s in spans if s["name"].startswith("batch item ")]
    assert sorted(s["name"] for s in items) == ["batch item i0", "batch item i1", "batch item i2"]
    assert {s["parent_id"] for s in items} == {batch["span_id"]}
    requests = [s for s in spans if s["name"] == "chat openai/gpt-4o-mini"]
    assert sorted(s["parent_id"] for s in requests) == sorted(s["span_id"] for s in items)
    assert all(s["kind"] == INTERNAL for s in requests)


def test_exec_graph_nodes_and_their_model_calls_are_children_of_the_graph(
        server: ServerThread, receiver: OTLPReceiver) -> None:
    nodes = [{"id": "a", "profile": "llm-call", "prompt": "one", "model": "openai/gpt-4o-mini"},
             {"id": "b", "profile": "llm-call", "prompt": "two", "model": "openai/gpt-4o-mini", "depends_on": ["a"]}]
    answer = httpx.post(server.url + "/v1/scillm/exec/graph", json={"nodes": nodes}, timeout=60,
                        headers={"authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": "tests"})
    assert answer.status_code == 200 and answer.json()["status"] == "completed"
    graph = receiver.wait_for(lambda spans: next((s for s in spans if s["name"] == "exec graph"), None))
    spans = receiver.wait_for(lambda spans: len([s for s in _trace(spans, graph["trace_id"])
                                                 if s["name"] == "chat openai/gpt-4o-mini"]) == 2 and
                              _trace(spans, graph["trace_id"]))
    runs = [s for s in spans if s["name"] == "exec llm-call"]
    assert len(runs) == 2 and {s["parent_id"] for s in runs} == {graph["span_id"]}
    calls = [s for s in spans if s["name"] == "chat openai/gpt-4o-mini"]
    assert sorted(s["parent_id"] for s in calls) == sorted(s["span_id"] for s in runs)
    assert all("response" in s["events"] for s in runs)  # the run's own events, by type only


def test_no_prompt_or_secret_in_any_exported_span(server: ServerThread, receiver: OTLPReceiver,
                                                  upstreams: tuple[FakeOpenAI, FakeOpenAI], tmp_path: Any) -> None:
    upstreams[0].script(Reply.fail(401, f"invalid key {OPENAI_KEY}"))
    messages = [{"role": "user", "content": PROMPT}]
    with pytest.raises(openai.AuthenticationError):
        _client(server).chat.completions.create(model="openai/gpt-4o-mini", messages=messages)
    _client(server).chat.completions.create(model="duo", messages=messages)
    receiver.wait_for(_request_span("duo"))
    server.app.runtime.plugin_state["tracing"].processor.force_flush()
    exported = b"".join(receiver.bodies)
    assert exported and receiver.content_types == {"application/x-protobuf"}
    for secret in (PROMPT, "PROMPT-MARKER", OPENAI_KEY, DEEPSEEK_KEY, MASTER_KEY, "Hello from the fake"):
        assert secret.encode() not in exported, secret
    # the switch records content (redacted): the scan above could have failed
    receiver.clear()
    config = {**CONFIG, "tracing": {"enabled": True, "record_content": True}}
    with ServerThread(make_app(env=_env(receiver, *upstreams), config=config, data_dir=tmp_path / "c")) as other:
        _client(other).chat.completions.create(model="openai/gpt-4o-mini", messages=[
            {"role": "user", "content": f"{PROMPT} my key is {OPENAI_KEY}"}])
        root = receiver.wait_for(_request_span("openai/gpt-4o-mini"))
    assert "PROMPT-MARKER" in root["attrs"]["gen_ai.input.messages"]
    assert "Hello from the fake" in root["attrs"]["gen_ai.output.messages"]
    assert OPENAI_KEY.encode() not in b"".join(receiver.bodies)


def test_a_secret_in_a_model_name_or_caller_is_redacted_in_span_names_and_attributes(
        server: ServerThread, receiver: OTLPReceiver, upstreams: tuple[FakeOpenAI, FakeOpenAI]) -> None:
    token = "sk-live-" + "7f3a9c" * 6  # chosen by the client: the model's name and its caller header
    upstreams[1].script(Reply.say("fine"))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=MASTER_KEY, max_retries=0,
                           default_headers={"x-caller-skill": f"team-{token}"})
    assert client.chat.completions.create(model=f"deepseek/{token}", messages=[{"role": "user", "content": "hi"}]
                                          ).choices[0].message.content == "fine"
    assert upstreams[1].last.json["model"] == token  # the upstream gets the name as asked
    root = receiver.wait_for(_request_span("deepseek/[redacted]"))
    server.app.runtime.plugin_state["tracing"].processor.force_flush()
    assert root["attrs"]["scillm.caller"] == "team-[redacted]"
    assert b"7f3a9c7f3a9c" not in b"".join(receiver.bodies)


def test_settings_honour_otel_variables_and_refuse_what_is_not_supported(receiver: OTLPReceiver) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SERVICE_NAME": "gw",
           "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,team=ml", "OTEL_TRACES_SAMPLER":
           "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25",
           "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20collector-token"}
    settings = resolve(TracingConfig(enabled=True), env)
    assert settings.endpoint == "http://collector:4318/v1/traces" and settings.service_name == "gw"
    assert settings.resource == {"deployment.environment": "prod", "team": "ml", "service.name": "gw"}
    assert settings.sample_ratio == 0.25 and settings.parent_based
    assert settings.headers == {"authorization": "Bearer collector-token"}
    table = resolve(TracingConfig(enabled=True, endpoint="http://tempo:4318/v1/traces", sample_ratio=1.0,
                                  service_name="edge"), env)
    assert table.endpoint == "http://tempo:4318/v1/traces" and table.service_name == "edge"
    assert resolve(TracingConfig(), {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://j:4318/x"}).endpoint == \
        "http://j:4318/x"
    for bad, needle in ((TracingConfig(protocol="grpc"), "http/protobuf"),
                        (TracingConfig(sample_ratio=2.0), "sample_ratio"),
                        (TracingConfig(endpoint="collector:4318"), "endpoint")):
        with pytest.raises(ConfigError, match=needle):
            resolve(bad, {})
    with pytest.raises(ConfigError, match="protocol"):
        make_app(env={"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, config={"tracing": {"enabled": True}})
    # doctor: a reachable collector answers 2xx; a closed port is a failure naming what to do
    runtime = make_app(config={"tracing": {"enabled": True, "endpoint": receiver.url}}).runtime
    assert next(c for c in runtime.hooks.doctor(runtime) if c["check"] == "tracing endpoint")["ok"]
    off = make_app().runtime
    assert [c["detail"] for c in off.hooks.doctor(off) if c["check"] == "tracing"] == [
        "off ([tracing] enabled = false)"]
    down = check_endpoint(resolve(TracingConfig(endpoint="http://127.0.0.1:9"), {}), timeout_s=2)
    assert not down["ok"] and "unreachable" in down["detail"] and "collector" in down["detail"]


def test_off_by_default_and_health_reports_exports(server: ServerThread, receiver: OTLPReceiver,
                                                   upstreams: tuple[FakeOpenAI, FakeOpenAI], tmp_path: Any) -> None:
    with ServerThread(make_app(env=_env(receiver, *upstreams), data_dir=tmp_path / "off")) as plain:
        _client(plain).chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        assert "traceparent" not in upstreams[0].last.headers
        assert not plain.app.runtime.events.wants("attempt.start")
        health = httpx.get(plain.url + "/v1/scillm/health", headers={"authorization": f"Bearer {MASTER_KEY}"})
        assert health.json()["middleware"]["tracing"] == {"enabled": False, "fails": "open"}
    _client(server).chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    receiver.wait_for(_request_span("openai/gpt-4o-mini"))
    health = httpx.get(server.url + "/v1/scillm/health", headers={"authorization": f"Bearer {MASTER_KEY}"})
    tracing = health.json()["middleware"]["tracing"]
    assert tracing["enabled"] and tracing["exported_spans"] >= 5 and tracing["failed_spans"] == 0
    assert tracing["endpoint"] == receiver.url + "/v1/traces"
