"""OpenAI <-> Ollama native translation, end to end through the official ``openai`` client, plus ``/api/tags``
for ``/v1/models`` (lazy, cached, never in the way of startup or requests)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from scillm_ollama import build_body
from scillm_ollama.provider import parse_response

from scillm_core import ChatRequest, errors, structure
from scillm_core.testing import DEV_KEY, Reply, ServerThread, make_app
from scillm_core.testing.contract import TINY_PNG_B64, TINY_PNG_URL, WEATHER_TOOL
from scillm_core.testing.fake_ollama import FakeOllama

FIXTURES = Path("/work/shared/fixtures/ollama")
if not FIXTURES.is_dir():
    FIXTURES = Path(__file__).resolve().parents[4].parent / "shared" / "fixtures" / "ollama"
PLUGINS = ("chat", "auth", "ops", "ollama")
HEADERS = {"authorization": f"Bearer {DEV_KEY}"}


async def no_fetch(url: str, where: str) -> str:
    raise AssertionError(f"unexpected fetch of {url}")


def body_for(**kw: Any) -> dict[str, Any]:
    kw.setdefault("model", "llama3.2:latest")
    return asyncio.run(build_body(structure(kw, ChatRequest), "llama3.2", no_fetch))


# -- request ---------------------------------------------------------------------------------------------------------

def test_messages_images_and_options() -> None:
    body = body_for(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "what is in this image?"},
                                     {"type": "image_url", "image_url": {"url": TINY_PNG_URL}}]}],
        max_tokens=64, temperature=0, top_p=0.5, stop="END", seed=3, stream=True)
    recorded = json.loads((FIXTURES / "chat_images_base64.json").read_text())["request"]["messages"][0]
    assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "what is in this image?", "images": [TINY_PNG_B64]}]
    assert list(body["messages"][1]) == list(recorded)  # role, content, images: raw base64 like the recording
    assert body["options"] == {"num_predict": 64, "temperature": 0, "top_p": 0.5, "stop": ["END"], "seed": 3}
    assert body["stream"] is True and body["model"] == "llama3.2"
    assert body_for(messages=[{"role": "user", "content": "hi"}])["stream"] is False


def test_tools_and_tool_results_like_the_recording() -> None:
    recorded = json.loads((FIXTURES / "chat_tool_result_roundtrip.json").read_text())["request"]
    tool = {"type": "function", "function": recorded["tools"][0]["function"]}
    body = body_for(tools=[tool], messages=[
        {"role": "user", "content": "what is the weather in Toronto?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_abc", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Toronto"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "11 degrees celsius"}])
    assert body["tools"] == recorded["tools"]
    assert body["messages"][1]["tool_calls"] == [
        {"id": "call_abc", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Toronto"}}}]
    assert body["messages"][2] == {**recorded["messages"][2], "tool_call_id": "call_abc"}
    with pytest.raises(errors.InvalidRequest) as caught:
        body_for(messages=[{"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}])
    assert caught.value.param == "$.messages[0].tool_calls[0].function.arguments"


def test_format_and_think() -> None:
    schema = json.loads((FIXTURES / "chat_structured_output_format_schema.json").read_text())["request"]["format"]
    hi = [{"role": "user", "content": "hi"}]
    assert body_for(messages=hi, response_format={"type": "json_object"})["format"] == "json"
    assert body_for(messages=hi, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema}})["format"] == schema
    assert body_for(messages=hi, reasoning_effort="none")["think"] is False
    assert body_for(messages=hi, reasoning_effort="medium")["think"] == "medium"
    with pytest.raises(errors.InvalidRequest):
        body_for(messages=[{"role": "user", "content": [{"type": "file", "file": {"file_data": "data:application/pdf;"
                                                                                                "base64,JVBE"}}]}])


def test_recorded_responses_translate() -> None:
    nonstream = json.loads((FIXTURES / "chat_nonstream_tool_call.json").read_text())["response"]
    response = parse_response(nonstream, "llama3.2")
    call = response.choices[0].message.tool_calls[0]
    assert call.id.startswith("call_") and json.loads(call.function.arguments) == {"city": "Tokyo"}
    assert response.choices[0].finish_reason == "tool_calls"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == \
        (169, 18, 187)
    schema = json.loads((FIXTURES / "chat_structured_output_format_schema.json").read_text())["response"]
    text = parse_response(schema, "llama3.1")
    assert text.choices[0].message.content == '{"age": 22, "available": false}'
    assert text.choices[0].finish_reason == "stop" and text.model == "llama3.1"
    assert parse_response({**schema, "done_reason": "length"}, "m").choices[0].finish_reason == "length"
    assert parse_response({**schema, "done_reason": "load"}, "m").choices[0].finish_reason == "stop"
    cached = {k: v for k, v in schema.items() if k != "prompt_eval_count"}  # omitted when the prompt was cached
    assert parse_response(cached, "m").usage.prompt_tokens == 0


# -- end to end ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllama() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture(scope="module")
def server(fake: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    app = make_app(env={"OLLAMA_API_BASE": fake.url}, only=PLUGINS, data_dir=tmp_path_factory.mktemp("ollama"))
    with ServerThread(app) as server:
        yield server


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)


def test_tool_round_trip_sends_tool_name(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.tool_call_ids = False  # an older server: ids are synthesized
    try:
        fake.script(Reply.call("get_weather", {"city": "Toronto"}), Reply.say("11 degrees."))
        first = client.chat.completions.create(model="llama3.2:latest", tools=[WEATHER_TOOL],
                                               messages=[{"role": "user", "content": "Toronto?"}])
    finally:
        fake.tool_call_ids = True
    call = first.choices[0].message.tool_calls[0]
    assert call.id.startswith("call_") and first.choices[0].finish_reason == "tool_calls"
    client.chat.completions.create(model="llama3.2:latest", tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "Toronto?"}, {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "11 degrees celsius"}])
    messages = fake.last.body["messages"]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Toronto"}
    assert messages[2] == {"role": "tool", "content": "11 degrees celsius", "tool_name": "get_weather",
                           "tool_call_id": call.id}


def test_upstream_tool_call_ids_are_kept(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.script(Reply.call("get_weather", {"city": "Oslo"}, id="call_k3m9x2ab"))
    chunks = list(client.chat.completions.create(model="llama3.2:latest", tools=[WEATHER_TOOL], stream=True,
                                                 messages=[{"role": "user", "content": "Oslo?"}]))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(c.index, c.id) for c in calls] == [(0, "call_k3m9x2ab")]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_thinking_json_format_and_usage(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.script(Reply.say('{"age": 22}', reasoning="Ollama is 22.", prompt_tokens=34, completion_tokens=12))
    completion = client.chat.completions.create(model="qwen3:8b", reasoning_effort="high",
                                                response_format={"type": "json_object"},
                                                messages=[{"role": "user", "content": "age?"}])
    assert completion.choices[0].message.content == '{"age": 22}'
    assert completion.choices[0].message.model_extra["reasoning_content"] == "Ollama is 22."
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (34, 12)
    assert fake.last.body["format"] == "json" and fake.last.body["think"] == "high"
    fake.script(Reply.say("391", reasoning="17 \u00d7 23"))
    chunks = list(client.chat.completions.create(model="qwen3:8b", stream=True, stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "17*23"}]))
    assert "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content", "") for c in chunks
                   if c.choices) == "17 \u00d7 23"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7


def test_logprobs_are_asked_for_and_come_back_as_openai_s(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.script(Reply.say("Hello there", chunk_size=6))
    completion = client.chat.completions.create(model="llama3.2:latest", logprobs=True, top_logprobs=2,
                                                messages=[{"role": "user", "content": "hi"}])
    assert (fake.last.body["logprobs"], fake.last.body["top_logprobs"]) == (True, 2)
    content = completion.choices[0].logprobs.content
    assert [(t.token, t.logprob, t.bytes, [(a.token, a.logprob) for a in t.top_logprobs]) for t in content] == [
        ("Hello ", -0.125, list(b"Hello "), [("Hello ", -0.125), ("alt1", -1.125)]),
        ("there", -0.25, list(b"there"), [("there", -0.25), ("alt1", -1.25)])]
    assert "".join(t.token for t in content) == completion.choices[0].message.content

    fake.script(Reply.say("Hello there", chunk_size=6, reasoning="hm"))
    chunks = list(client.chat.completions.create(model="qwen3:8b", logprobs=True, stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]))
    assert fake.last.body["logprobs"] is True and "top_logprobs" not in fake.last.body
    streamed = [(t.token, t.logprob, t.top_logprobs) for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    # the thinking line's logprobs are the reasoning's: OpenAI's cover the answer's tokens
    assert streamed == [("Hello ", -0.25, []), ("there", -0.375, [])]
    assert all(c.choices[0].logprobs is None for c in chunks if c.choices and not c.choices[0].delta.content)


def test_top_logprobs_alone_asks_for_logprobs_and_nothing_asked_sends_nothing(client: openai.OpenAI,
                                                                              fake: FakeOllama) -> None:
    fake.script(Reply.say("Hi"))
    completion = client.chat.completions.create(model="llama3.2:latest", top_logprobs=1,
                                                messages=[{"role": "user", "content": "hi"}])
    assert (fake.last.body["logprobs"], fake.last.body["top_logprobs"]) == (True, 1)
    assert [t.token for t in completion.choices[0].logprobs.content] == ["Hi"]
    fake.script(Reply.say("Hi"))
    completion = client.chat.completions.create(model="llama3.2:latest", logprobs=False, top_logprobs=0,
                                                messages=[{"role": "user", "content": "hi"}])
    assert not {"logprobs", "top_logprobs"} & set(fake.last.body) and completion.choices[0].logprobs is None


@pytest.mark.parametrize(("ask", "param"), [({"top_logprobs": 21}, "$.top_logprobs"),
                                            ({"top_logprobs": "2"}, "$.top_logprobs"),
                                            ({"logprobs": "yes"}, "$.logprobs")])
def test_bad_logprobs_values_are_a_400_naming_them(client: openai.OpenAI, fake: FakeOllama, ask: dict[str, Any],
                                                   param: str) -> None:
    before = len(fake.requests)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="llama3.2:latest", messages=[{"role": "user", "content": "hi"}],
                                       extra_body=ask)
    assert caught.value.param == param and len(fake.requests) == before


def test_length_finish(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.script(Reply.say("Partial", finish_reason="length"))
    chunks = list(client.chat.completions.create(model="llama3.2:latest", stream=True, max_tokens=2,
                                                 messages=[{"role": "user", "content": "long"}]))
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]
    assert fake.last.body["options"] == {"num_predict": 2}


def test_model_not_found_is_404_with_the_fix(client: openai.OpenAI, fake: FakeOllama) -> None:
    fake.models = ("llama3.2:latest",)
    try:
        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="llama9:7b", messages=[{"role": "user", "content": "hi"}])
    finally:
        fake.models = None
    assert caught.value.code == "model_not_found"
    assert "model 'llama9:7b' not found" in caught.value.message and "ollama pull llama9:7b" in caught.value.message


@pytest.mark.parametrize("fault", [{"error_after": 1}, {"cut_after": 1}])
def test_midstream_failures_reach_the_client(client: openai.OpenAI, fake: FakeOllama, fault: dict[str, int]) -> None:
    fake.script(Reply.say("Yes. I can answer.", chunk_size=3, **fault))
    with pytest.raises(openai.APIError) as caught:
        list(client.chat.completions.create(model="llama3.2:latest", stream=True,
                                            messages=[{"role": "user", "content": "hi"}]))
    assert "ollama" in str(caught.value.message)
    if "error_after" in fault:
        assert "an error was encountered while running the model" in str(caught.value.message)


def test_tags_feed_v1_models(server: ServerThread, fake: FakeOllama) -> None:
    deadline = time.monotonic() + 5
    while True:  # the startup refresh runs in the background
        ids = {m["id"] for m in httpx.get(server.url + "/v1/models", headers=HEADERS).json()["data"]}
        if set(fake.tags) <= ids or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert set(fake.tags) <= ids
    before = fake.tags_requests
    for _ in range(5):  # cached: no /api/tags call per listing
        httpx.get(server.url + "/v1/models", headers=HEADERS)
    assert fake.tags_requests == before


def test_slow_or_absent_ollama_never_delays_startup_or_requests(tmp_path: Path) -> None:
    with FakeOllama() as slow:
        slow.tags_delay_s = 2.0
        started = time.monotonic()
        with ServerThread(make_app(env={"OLLAMA_API_BASE": slow.url}, only=PLUGINS, data_dir=tmp_path)) as server:
            assert time.monotonic() - started < 1.5
            t0 = time.monotonic()
            listing = httpx.get(server.url + "/v1/models", headers=HEADERS)
            answer = httpx.post(server.url + "/v1/chat/completions", headers=HEADERS, json={
                "model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}]})
            assert time.monotonic() - t0 < 1.0
            assert listing.status_code == 200 and answer.status_code == 200
            assert slow.tags_requests == 1  # the startup refresh is in flight; no second one was started
    with ServerThread(make_app(env={"OLLAMA_API_BASE": "http://127.0.0.1:9"}, only=PLUGINS,
                               data_dir=tmp_path / "absent")) as server:
        t0 = time.monotonic()
        assert httpx.get(server.url + "/v1/models", headers=HEADERS).status_code == 200
        assert time.monotonic() - t0 < 1.0


def test_ollama_host_and_prefix(tmp_path: Path) -> None:
    """``OLLAMA_HOST`` in the CLI's ``host:port`` form is understood, and ``ollama/<m>`` routes here unchanged."""
    with FakeOllama() as fake, ServerThread(make_app(env={"OLLAMA_HOST": fake.url.removeprefix("http://")},
                                                     only=PLUGINS, data_dir=tmp_path)) as server:
        fake.script(Reply.say("Hi."))
        response = httpx.post(server.url + "/v1/chat/completions", headers=HEADERS, json={
            "model": "ollama/llama3.2", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 200 and response.headers["x-scillm-provider"] == "ollama"
        assert fake.last.body["model"] == "llama3.2"
