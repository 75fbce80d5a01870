"""The event seam: what the pipeline and the bundled plugins report, in order (and the hook stages it records on
``ctx.stages``), and that nobody listening costs nothing but one attribute check."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from scillm_core import Runtime, SurfaceRegistry, hookimpl
from scillm_core.events import Event, Events, Stage, open_stage, trace_headers
from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, make_app

OPENAI_KEY = "sk-events-openai-secret-0123456789"
DEEPSEEK_KEY = "sk-events-deepseek-secret-0123456789"


class Recorder:
    """A plugin that records every event, and asks for a header on each upstream attempt."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.open_at_attempt: list[str | None] = []  # the stage running when each attempt started

    @hookimpl
    def scillm_register_surfaces(self, surfaces: SurfaceRegistry, runtime: Runtime) -> None:
        runtime.events.subscribe(self.observe)

    def observe(self, event: Event) -> None:
        self.events.append(event)
        if event.kind == "attempt.start":
            event["upstream_headers"]["x-test-attempt"] = str(event["attempt"])
            stage = open_stage(event.ctx.stages)
            self.open_at_attempt.append(stage.name if stage else None)

    def kinds(self, *, skip: tuple[str, ...] = ()) -> list[str]:
        return [e.kind for e in self.events if e.kind not in skip]


def _stages(stages: list[Stage] | None) -> list[tuple[str, str | None]]:
    return [(s.name, s.parent.name if s.parent else None) for s in stages or ()]


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    with FakeOpenAI() as a, FakeOpenAI() as b:
        yield a, b  # type: ignore[misc]


@pytest.fixture
def served(upstreams: tuple[FakeOpenAI, FakeOpenAI], tmp_path: Any) -> Iterator[tuple[Recorder, openai.OpenAI]]:
    a, b = upstreams
    for fake in (a, b):
        fake.requests.clear()
        fake._script.clear()
    recorder = Recorder()
    env = {"OPENAI_API_KEY": OPENAI_KEY, "OPENAI_API_BASE": a.url + "/v1", "DEEPSEEK_API_KEY": DEEPSEEK_KEY,
           "DEEPSEEK_API_BASE": b.url + "/v1"}
    config = {"groups": {"duo": {"models": ["openai/gpt-4o-mini", "deepseek/deepseek-chat"]}},
              "resilience": {"backoff_base_s": 0.01, "backoff_max_s": 0.02, "max_retries": 1}}
    with ServerThread(make_app(env=env, config=config, plugins=[("recorder", recorder)],
                               data_dir=tmp_path)) as server:
        yield recorder, openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0)


def test_events_unit() -> None:
    events = Events()
    assert not events.listening
    events.emit("request.start", None, x=1)  # nobody listens: nothing happens
    seen: list[str] = []

    def broken(event: Event) -> None:
        raise RuntimeError("observer bug")

    stop_all = events.subscribe(lambda e: seen.append(f"all:{e.kind}"))
    events.subscribe(broken, kinds=["cache"])
    events.subscribe(lambda e: seen.append(f"cache:{e['result']}"), kinds=["cache"])
    assert events.listening and events.wants("cache") and events.wants("retry") and events.wants("stage")
    events.emit("cache", None, result="hit")
    events.emit("retry", None, retry=1)
    assert seen == ["all:cache", "cache:hit", "all:retry"]
    assert events.failures == 1  # the broken observer was counted, the others still ran
    stop_all()
    assert not events.wants("retry") and events.wants("cache") and not events.wants("stage")
    assert trace_headers({"traceparent": "00-a-b-01", "authorization": "Bearer sk-x"}) == {"traceparent": "00-a-b-01"}


def test_a_request_reports_its_stages_and_attempts_in_order(served: tuple[Recorder, openai.OpenAI],
                                                            upstreams: tuple[FakeOpenAI, FakeOpenAI]) -> None:
    recorder, client = served
    reply = client.chat.completions.create(model="openai/gpt-4o-mini",
                                           messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    assert recorder.kinds() == ["request.start", "attempt.start", "attempt.end", "request.end"]
    end = recorder.events[-1]
    # the hook stages, recorded on the call (an observer that gets every kind wants them), nested and timed
    stages = end.ctx.stages
    assert _stages(stages) == [("preprocess_files", None), ("postprocess_json", None),
                               ("call_provider", "postprocess_json")]
    assert recorder.open_at_attempt == ["call_provider"]
    preprocess, postprocess, call = stages
    attempt_start = recorder.events[1].time_ns
    assert preprocess.start_ns <= preprocess.end_ns <= postprocess.start_ns <= call.start_ns <= attempt_start
    assert attempt_start <= call.end_ns <= postprocess.end_ns <= end.time_ns
    assert all(s.error is None for s in stages)
    assert end["error"] is None and end["usage"].prompt_tokens == 11 and end.ctx.route.provider == "openai"
    attempt = next(e for e in recorder.events if e.kind == "attempt.end")
    assert attempt["route"].model == "gpt-4o-mini" and attempt["attempt"] == 1 and attempt["duration_s"] >= 0
    # the header an observer asked for went upstream with that attempt only
    assert upstreams[0].last.headers["x-test-attempt"] == "1"


def test_retry_then_fallback_is_reported(served: tuple[Recorder, openai.OpenAI],
                                         upstreams: tuple[FakeOpenAI, FakeOpenAI]) -> None:
    recorder, client = served
    upstreams[0].script(Reply.fail(503, "overloaded"), Reply.fail(503, "overloaded"))
    reply = client.chat.completions.create(model="duo", messages=[{"role": "user", "content": "hi"}])
    assert reply.model == "deepseek-chat"
    flow = [e for e in recorder.events if e.kind in ("attempt.end", "retry", "fallback")]
    assert [e.kind for e in flow] == ["attempt.end", "retry", "attempt.end", "fallback", "attempt.end"]
    assert [e["route"].provider for e in flow] == ["openai", "openai", "openai", "openai", "deepseek"]
    assert flow[0]["error"].upstream_status == 503 and flow[1]["retry"] == 1
    assert flow[3]["to"].provider == "deepseek" and flow[4]["error"] is None
    assert [e["attempt"] for e in flow if e.kind == "attempt.end"] == [1, 2, 3]
    assert upstreams[1].last.headers["x-test-attempt"] == "3"


def test_a_stream_ends_its_request_when_the_stream_ends(served: tuple[Recorder, openai.OpenAI]) -> None:
    recorder, client = served
    stream = client.chat.completions.create(model="openai/gpt-4o-mini", stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "hi"}])
    assert list(stream)
    end = next(e for e in recorder.events if e.kind == "request.end")
    # the usage chunk is the stream's last: the request ended when the stream did, not when it opened
    assert end["error"] is None and end["usage"].completion_tokens == 7
    assert 0 < end.ctx.stages[1].end_ns <= end.time_ns and end.ctx.stages[1].name == "postprocess_json"
    assert end["first_chunk_s"] is not None and end["first_chunk_s"] <= end["duration_s"]
    assert recorder.kinds().index("attempt.end") < recorder.kinds().index("request.end")


def test_nobody_listening_means_no_event_work(upstreams: tuple[FakeOpenAI, FakeOpenAI], tmp_path: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(Events, "emit", lambda self, kind, *a, **k: calls.append(kind))
    env = {"OPENAI_API_KEY": OPENAI_KEY, "OPENAI_API_BASE": upstreams[0].url + "/v1"}
    off = {"ui": {"enabled": False}, "metrics": {"enabled": False}}  # the bundled observers
    with ServerThread(make_app(env=env, data_dir=tmp_path, config=off)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0)
        client.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert not server.app.runtime.events.listening
    assert calls == []
