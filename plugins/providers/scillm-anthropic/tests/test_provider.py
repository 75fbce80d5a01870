"""The ``anthropic`` provider end to end through the official ``openai`` client: stream failures, overload,
documents, thinking, structured output and bad input."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
from scillm_anthropic_helpers import HTTP, ISOLATED, ApiKeyFake, tiny_pdf

from scillm_core.testing import DEV_KEY, Reply, ServerThread, ToolCallSpec, make_app

MODEL = "anthropic/claude-haiku-4-5"


@pytest.fixture(scope="module")
def fake() -> Iterator[ApiKeyFake]:
    with ApiKeyFake() as server:
        yield server  # type: ignore[misc]


@pytest.fixture(scope="module")
def server(fake: ApiKeyFake, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    env = {"ANTHROPIC_API_KEY": ApiKeyFake.api_key, "ANTHROPIC_API_BASE": fake.url + "/v1",  # /v1 is tolerated
           "SCILLM_CLAUDE_CREDENTIALS": "/nonexistent/.credentials.json"}
    with ServerThread(make_app(env=env, data_dir=tmp_path_factory.mktemp("anthropic"), only=ISOLATED)) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh_script(fake: ApiKeyFake) -> Iterator[None]:
    yield
    fake._script.clear()  # a failed test must not leave its replies to the next one


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)


def test_midstream_error_reaches_the_client_as_an_error(client: openai.OpenAI, fake: ApiKeyFake) -> None:
    fake.script(Reply.say("Hello there, this will break", chunk_size=3, error_after=5))
    seen: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(model=MODEL, stream=True,
                                                    messages=[{"role": "user", "content": "hi"}]):
            seen.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(seen) == "Hello "  # what came before the failure, then an error, not a clean end
    assert "Overloaded" in caught.value.message and "anthropic" in caught.value.message


def test_cut_stream_is_an_error_not_a_clean_end(server: ServerThread, fake: ApiKeyFake) -> None:
    fake.script(Reply.say("Hello there, this will be cut", cut_after=5))
    response = HTTP.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {DEV_KEY}"},
                          json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] != "[DONE]" and "error" in orjson.loads(events[-1])


def test_overloaded_529_is_a_503_with_code_overloaded(server: ServerThread, fake: ApiKeyFake) -> None:
    fake.script(*[Reply.fail(529, "Overloaded", type="overloaded_error")] * 5)
    response = HTTP.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {DEV_KEY}"},
                          json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "overloaded"
    assert "anthropic (claude-haiku-4-5)" in response.json()["error"]["message"]


def test_system_pdf_and_structured_output_reach_anthropic(client: openai.OpenAI, fake: ApiKeyFake) -> None:
    pdf = base64.b64encode(tiny_pdf()).decode()
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"],
              "additionalProperties": False}
    fake.script(Reply.say('{"title": "scillm"}'))
    answer = client.chat.completions.create(model=MODEL, max_tokens=200, stop="END", messages=[
        {"role": "system", "content": "You extract titles."},
        {"role": "user", "content": [{"type": "text", "text": "Title?"},
                                     {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{pdf}",
                                                               "filename": "doc.pdf"}}]}],
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    assert orjson.loads(answer.choices[0].message.content) == {"title": "scillm"}
    body = fake.last.body
    assert body["system"] == [{"type": "text", "text": "You extract titles."}]
    assert body["messages"][0]["content"][1] == {"type": "document", "title": "doc.pdf", "source": {
        "type": "base64", "media_type": "application/pdf", "data": pdf}}
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert body["max_tokens"] == 200 and body["stop_sequences"] == ["END"]


def test_openai_metadata_and_service_tier_do_not_reach_anthropic_as_sent(client: openai.OpenAI,
                                                                          fake: ApiKeyFake) -> None:
    # the openai SDK's metadata is free-form tags and its service_tier OpenAI's tiers; Anthropic's metadata holds
    # user_id only and its service_tier is auto | standard_only: anything else is a 400 there
    fake.script(Reply.say("tagged"), Reply.say("tagged too"))
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            metadata={"purpose": "eval", "run": "7"}, user="alice",
                                            service_tier="flex")
    assert answer.choices[0].message.content == "tagged"
    assert fake.last.body["metadata"] == {"user_id": "alice"} and "service_tier" not in fake.last.body
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            metadata={"user_id": "bob", "purpose": "eval"}, service_tier="auto")
    assert answer.choices[0].message.content == "tagged too"
    assert fake.last.body["metadata"] == {"user_id": "bob"} and fake.last.body["service_tier"] == "auto"


def test_thinking_round_trip_through_the_openai_client(client: openai.OpenAI, fake: ApiKeyFake) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    fake.script(Reply(reasoning="I should call the tool.", tool_calls=(ToolCallSpec("get_weather", {"city": "Oslo"}),)),
                Reply.say("Snowy."))
    first = client.chat.completions.create(model=MODEL, reasoning_effort="low", tools=[tool],
                                           messages=[{"role": "user", "content": "Oslo?"}])
    message = first.choices[0].message.model_dump(exclude_none=True)
    assert message["reasoning_content"] == "I should call the tool."
    assert fake.last.body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    second = client.chat.completions.create(model=MODEL, reasoning_effort="low", tools=[tool], messages=[
        {"role": "user", "content": "Oslo?"}, message,
        {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "snow"}])
    assert second.choices[0].message.content == "Snowy."
    thinking = fake.last.body["messages"][1]["content"][0]
    assert thinking["type"] == "thinking" and thinking["thinking"] == "I should call the tool."
    assert thinking["signature"] == fake.signature(Reply(reasoning="I should call the tool."))


@pytest.mark.parametrize(("model", "strict"), [("anthropic/claude-haiku-4-5", True),
                                             ("anthropic/claude-opus-4-6", True),
                                             ("anthropic/claude-sonnet-4-20250514", False)])
def test_a_strict_tool_is_strict_where_claude_has_structured_outputs(client: openai.OpenAI, fake: ApiKeyFake,
                                                                     model: str, strict: bool) -> None:
    """A function's ``strict: true`` reaches Claude as the tool's ``strict`` from the 4.5 generation on; Claude 4
    gets the tool without it (the fake, like the API, refuses ``strict`` there)."""
    tool = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": False}}}
    fake.script(Reply.call("get_weather", {"city": "Oslo"}))
    answer = client.chat.completions.create(model=model, tools=[tool], messages=[{"role": "user", "content": "Oslo?"}])
    assert answer.choices[0].message.tool_calls[0].function.arguments == '{"city":"Oslo"}'
    sent = fake.last.body["tools"][0]
    assert sent.get("strict") is (True if strict else None)
    assert sent["input_schema"] == tool["function"]["parameters"]


def test_streamed_reasoning_and_tool_indexes(client: openai.OpenAI, fake: ApiKeyFake) -> None:
    fake.script(Reply(reasoning="Two lookups.", tool_calls=(ToolCallSpec("a", {"x": 1}), ToolCallSpec("b", {"y": 2}))))
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, reasoning_effort="medium",
                                                 messages=[{"role": "user", "content": "go"}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas: list[Any] = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Two lookups."
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert [tc.index for tc in calls if tc.id] == [0, 1]  # blocks 1 and 2 are tool calls 0 and 1
    args = {i: "".join(tc.function.arguments or "" for tc in calls if tc.index == i) for i in (0, 1)}
    assert orjson.loads(args[0]) == {"x": 1} and orjson.loads(args[1]) == {"y": 2}
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_bad_input_is_a_400_before_any_upstream_call(server: ServerThread, fake: ApiKeyFake) -> None:
    sent = len(fake.requests)
    response = HTTP.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {DEV_KEY}"},
                          json={"model": MODEL, "messages": [{"role": "user", "content": [
                              {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "$.messages[0].content[0]"
    assert len(fake.requests) == sent
