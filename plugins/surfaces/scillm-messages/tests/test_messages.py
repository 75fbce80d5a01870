"""``POST /v1/messages`` through the official ``anthropic`` SDK, routed to an OpenAI-compatible fake upstream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import orjson
import pytest
import scillm_auth
import scillm_messages
import scillm_openai_compat

from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, ToolCallSpec, make_app
from scillm_core.testing.contract import TINY_PNG_B64, TINY_PNG_URL

KEY = "sk-upstream-secret-0123456789abcdef"
MODEL = "deepseek/deepseek-chat"          # text-only upstream (DeepSeek)
VISION = "gpt-4o-mini"                    # vision-capable upstream (OpenAI)
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake  # type: ignore[misc]


#: Only what this surface needs (core, auth, the OpenAI-compatible providers, this plugin): other middleware
#: (retries, breakers, caching) would change what reaches the scripted fake. test_installed_entry_point checks
#: the real install.
PLUGINS = [("auth", scillm_auth), ("openai-compat", scillm_openai_compat), ("messages", scillm_messages)]


@pytest.fixture(scope="module")
def server(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    env = {"DEEPSEEK_API_KEY": KEY, "DEEPSEEK_API_BASE": fake.base_url,
           "OPENAI_API_KEY": KEY, "OPENAI_API_BASE": fake.base_url}
    app = make_app(env=env, config={"server": {"heartbeat_s": 0.3}, "aliases": {"claude-sonnet-5-5": MODEL}},
                   plugins=PLUGINS, entry_points=False, data_dir=tmp_path_factory.mktemp("messages"))
    with ServerThread(app) as server:
        yield server


@pytest.fixture
def client(server: ServerThread) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0, timeout=20)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def raw_events(server: ServerThread, body: dict[str, Any], query: str = "") -> list[tuple[str, dict[str, Any]]]:
    response = httpx.post(server.url + "/v1/messages" + query, json=body, headers={"x-api-key": DEV_KEY}, timeout=20)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        data = orjson.loads(lines["data"])
        assert data["type"] == lines["event"]
        events.append((lines["event"], data))
    return events


# -- text ---------------------------------------------------------------------------------------------------------

def test_text_non_streaming(client: anthropic.Anthropic, fake: FakeOpenAI) -> None:
    fake.script(Reply.say("Hello there, friend.", prompt_tokens=21, completion_tokens=5))
    message = client.messages.create(model=MODEL, max_tokens=100, system="Be brief.", stop_sequences=["END"],
                                     metadata={"user_id": "u-1"}, messages=user("Hi"),
                                     extra_body={"temperature": 0.2, "top_k": 5})  # older clients send these
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.model == "deepseek-chat"  # the model that served, as chat and Responses answers say
    assert [(b.type, b.text) for b in message.content] == [("text", "Hello there, friend.")]
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens) == (21, 5)
    sent = fake.last
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.body["model"] == "deepseek-chat"
    assert sent.body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert sent.body["max_tokens"] == 100
    assert sent.body["temperature"] == 0.2
    assert sent.body["stop"] == ["END"]
    assert not sent.body.get("stream")
    for dropped in ("top_k", "metadata", "system", "stop_sequences", "user"):
        assert dropped not in sent.body


def test_system_blocks_and_multi_turn(client: anthropic.Anthropic, fake: FakeOpenAI) -> None:
    fake.script(Reply.say("Three."))
    client.messages.create(model=MODEL, max_tokens=50, system=[
        {"type": "text", "text": "You are a counter.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Answer with one word."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "One?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "Two."}]},
                  {"role": "user", "content": "Next?"}])
    assert fake.last.body["messages"] == [
        {"role": "system", "content": "You are a counter.\n\nAnswer with one word."},
        {"role": "user", "content": "One?"}, {"role": "assistant", "content": "Two."},
        {"role": "user", "content": "Next?"}]


def test_alias_routes_claude_name(client: anthropic.Anthropic, fake: FakeOpenAI) -> None:
    fake.script(Reply.say("routed"))
    message = client.messages.create(model="claude-sonnet-5-5", max_tokens=10, messages=user("x"))
    assert message.content[0].text == "routed"
    assert message.model == "deepseek-chat"  # the model that served, not the name asked for
    assert fake.last.body["model"] == "deepseek-chat"


def test_streaming_text(client: anthropic.Anthropic, fake: FakeOpenAI) -> None:
    text = "Streaming works across many small pieces."
    fake.script(Reply.say(text, prompt_tokens=30, completion_tokens=9))
    with client.messages.stream(model=MODEL, max_tokens=100, messages=user("Stream please")) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 3 and "".join(pieces) == text
    assert [b.type for b in final.content] == ["text"] and final.content[0].text == text
    assert final.stop_reason == "end_turn" and final.model == "deepseek-chat"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (30, 9)
    assert fake.last.body["stream"] is True
    assert fake.last.body["stream_options"] == {"include_usage": True}


def test_stream_event_sequence(server: ServerThread, fake: FakeOpenAI) -> None:
    fake.script(Reply.say("abcdefgh", chunk_size=4))
    # Claude Code posts to /v1/messages?beta=true
    events = raw_events(server, {"model": MODEL, "max_tokens": 20, "stream": True, "messages": user("go")},
                        query="?beta=true")
    names = [name for name, _ in events]
    assert names == ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
                     "content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["stop_reason"] is None
    assert start["model"] == "deepseek-chat"  # the model that served
    assert start["usage"]["input_tokens"] > 0  # the estimate, until the upstream's count arrives
    assert events[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert events[3][1]["delta"] == {"type": "text_delta", "text": "abcd"}
    assert events[6][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[6][1]["usage"]["output_tokens"] == 7


def test_slow_first_chunk_sends_pings(server: ServerThread, fake: FakeOpenAI) -> None:
    fake.script(Reply.say("late", delay_s=0.8))
    events = raw_events(server, {"model": MODEL, "max_tokens": 20, "stream": True, "messages": user("go")})
    names = [name for name, _ in events]
    assert names[0] == "message_start"
    assert events[0][1]["message"]["model"] == "deepseek-chat"  # started before it answered: the route tried
    assert names.count("ping") >= 2
    assert names[-2:] == ["message_delta", "message_stop"]


# -- tools ---------------------------------------------------------------------------------------------------------

def test_tool_use_round_trip(client: anthropic.Anthropic, fake: FakeOpenAI) -> None:
    fake.script(Reply.call("get_weather", {"city": "Paris"}, id="call_weather_1", prompt_tokens=40),
                Reply.say("It is sunny in Paris."))
    first = client.messages.create(model=MODEL, max_tokens=200, tools=[WEATHER],
                                   tool_choice={"type": "auto", "disable_parallel_tool_use": True},
                                   messages=user("Weather in Paris?"))
    assert first.stop_reason == "tool_use"
    (call,) = [b for b in first.content if b.type == "tool_use"]
    assert (call.id, call.name, call.input) == ("call_weather_1", "get_weather", {"city": "Paris"})
    sent = fake.last.body
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city", "parameters": WEATHER["input_schema"]}}]
    assert sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is False

    second = client.messages.create(model=MODEL, max_tokens=200, tools=[WEATHER], messages=[
        *user("Weather in Paris?"),
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21C"},
                                     {"type": "text", "text": "Thanks!"}]}])
    assert second.content[0].text == "It is sunny in Paris." and second.stop_reason == "end_turn"
    messages = fake.last.body["messages"]
    assert messages[1]["role"] == "assistant"
    (tool_call,) = messages[1]["tool_calls"]
    assert tool_call["id"] == "call_weather_1" and tool_call["function"]["name"] == "get_weather"
    assert orjson.loads(tool_call["function"]["arguments"]) == {"city": "Paris"}
    assert messages[2] == {"role": "tool", "tool_call_id": "call_weather_1", "content": "Sunny, 21C"}
    assert messages[3] == {"role": "user", "content": "Thanks!"}


@anthropic.beta_tool
def get_weather(city: str) -> str:
    """Weather for a city.

    Args:
        city: the city
    """
    return f"Sunny in {city}"


def test_the_sdk_tool_runner_sends_the_whole_conversation(client: anthropic.Anthropic, fake: FakeOpenAI) -> None:
    # the runner asks for a message thread (the server keeps the history, later turns send only what is new);
    # scillm cannot keep one for a non-Anthropic upstream, so it refuses the way Anthropic does and the runner
    # falls back to sending everything
    fake.script(Reply.call("get_weather", {"city": "Paris"}, id="call_weather_1"), Reply.say("It is sunny."))
    final = client.beta.messages.tool_runner(model=MODEL, max_tokens=200, tools=[get_weather],
                                             messages=user("Weather in Paris?")).until_done()
    assert final.content[0].text == "It is sunny."
    assert [m["role"] for m in fake.last.body["messages"]] == ["user", "assistant", "tool"]
    assert fake.last.body["messages"][2] == {"role": "tool", "tool_call_id": "call_weather_1",
                                             "content": "Sunny in Paris"}
    assert fake.last.body["tools"][0]["function"]["name"] == "get_weather"
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.beta.messages.create(model=MODEL, max_tokens=200, messages=user("hi"), thread={"type": "create"})
    assert type(refused.value).__name__ == "ThreadUnsupportedRequestError"  # the SDK's typed form, by error_code
    assert "$.thread" in refused.value.message


def test_tool_result_blocks_and_error(client: anthropic.Anthropic, fake: FakeOpenAI) -> None:
    fake.script(Reply.say("ok"))
    client.messages.create(model=MODEL, max_tokens=50, tools=[WEATHER], messages=[
        *user("Weather?"),
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should call the tool.", "signature": "sig"},
            {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Oslo"}},
            {"type": "tool_use", "id": "toolu_b", "name": "get_weather", "input": {"city": "Rome"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_a", "content": [{"type": "text", "text": "Snow"}]},
            {"type": "tool_result", "tool_use_id": "toolu_b", "content": "service down", "is_error": True}]}])
    messages = fake.last.body["messages"]
    assert [m["id"] for m in messages[1]["tool_calls"]] == ["toolu_a", "toolu_b"]
    assert "thinking" not in str(messages[1]) and "sig" not in str(messages[1])
    assert messages[2:] == [{"role": "tool", "tool_call_id": "toolu_a", "content": "Snow"},
                            {"role": "tool", "tool_call_id": "toolu_b", "content": "Error: service down"}]


def test_tool_choice_mapping(client: anthropic.Anthropic, fake: FakeOpenAI) -> None:
    for choice, expected in (({"type": "any"}, "required"), ({"type": "none"}, "none"),
                             ({"type": "tool", "name": "get_weather"},
                              {"type": "function", "function": {"name": "get_weather"}})):
        fake.script(Reply.say("ok"))
        client.messages.create(model=MODEL, max_tokens=20, tools=[WEATHER], messages=user("x"),
                               tool_choice=choice)  # type: ignore[arg-type]
        assert fake.last.body["tool_choice"] == expected


def test_a_strict_tool_stays_strict_for_an_openai_style_upstream(client: anthropic.Anthropic,
                                                                   fake: FakeOpenAI) -> None:
    """Anthropic's tool ``strict: true`` (structured outputs) is chat's function ``strict``; a non-boolean is a 400
    naming the client's path."""
    fake.script(Reply.say("ok"))
    strict = {**WEATHER, "strict": True}
    client.messages.create(model=MODEL, max_tokens=20, tools=[strict, WEATHER], messages=user("x"))
    first, second = fake.last.body["tools"]
    assert first["function"]["strict"] is True and "strict" not in second["function"]
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=MODEL, max_tokens=20, tools=[{**WEATHER, "strict": "yes"}],  # type: ignore[list-item]
                               messages=user("x"))
    assert "$.tools[0].strict" in str(caught.value)


def test_streaming_parallel_tool_calls(client: anthropic.Anthropic, fake: FakeOpenAI, server: ServerThread) -> None:
    reply = Reply(text="Checking both.", tool_calls=(ToolCallSpec("get_weather", {"city": "Paris"}, "call_p"),
                                                     ToolCallSpec("get_weather", {"city": "Tokyo"}, "call_t")))
    fake.script(reply)
    with client.messages.stream(model=MODEL, max_tokens=200, tools=[WEATHER], messages=user("Both?")) as stream:
        json_events = [e for e in stream if e.type == "input_json"]
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    assert final.content[0].text == "Checking both."
    assert [(b.id, b.input) for b in final.content[1:]] == [("call_p", {"city": "Paris"}),
                                                             ("call_t", {"city": "Tokyo"})]
    assert final.stop_reason == "tool_use"
    assert len(json_events) > 2  # arguments arrive as input_json_delta fragments

    fake.script(reply)
    events = raw_events(server, {"model": MODEL, "max_tokens": 200, "stream": True, "tools": [WEATHER],
                                 "messages": user("Both?")})
    starts = [data["content_block"] for name, data in events if name == "content_block_start"]
    assert starts[1] == {"type": "tool_use", "id": "call_p", "name": "get_weather", "input": {}}
    assert [data["index"] for name, data in events if name == "content_block_stop"] == [0, 1, 2]


# -- thinking ------------------------------------------------------------------------------------------------------

def test_thinking_from_reasoning_content(client: anthropic.Anthropic, fake: FakeOpenAI) -> None:
    fake.script(Reply.say("42.", reasoning="Six times seven."))
    message = client.messages.create(model=MODEL, max_tokens=3000, thinking={"type": "enabled", "budget_tokens": 2048},
                                     messages=user("6*7?"))
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Six times seven."
    assert fake.last.body["reasoning_effort"] == "low"
    assert "thinking" not in fake.last.body

    fake.script(Reply.say("42.", reasoning="Six times seven."))
    with client.messages.stream(model=MODEL, max_tokens=20000, messages=user("6*7?"),
                                thinking={"type": "enabled", "budget_tokens": 16384}) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert "thinking" in kinds
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in final.content] == [
        ("thinking", "Six times seven."), ("text", "42.")]
    assert fake.last.body["reasoning_effort"] == "high"


# -- images and documents --------------------------------------------------------------------------------------------

def test_image_input_reaches_upstream_as_image_url(client: anthropic.Anthropic, fake: FakeOpenAI) -> None:
    fake.script(Reply.say("A red pixel."))
    message = client.messages.create(model=VISION, max_tokens=50, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": TINY_PNG_B64}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "text", "text": "What is this?"}]}])
    assert message.content[0].text == "A red pixel."
    assert fake.last.body["model"] == "gpt-4o-mini"
    assert fake.last.body["messages"] == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": TINY_PNG_URL}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "text", "text": "What is this?"}]}]


def test_pdf_document_becomes_file_part(client: anthropic.Anthropic, fake: FakeOpenAI) -> None:
    fake.script(Reply.say("A PDF."))
    client.messages.create(model=VISION, max_tokens=50, messages=[{"role": "user", "content": [
        {"type": "document", "title": "report.pdf",
         "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK"}},
        {"type": "text", "text": "Summarise."}]}])
    assert fake.last.body["messages"][0]["content"][0] == {
        "type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0xLjQK", "filename": "report.pdf"}}


def test_image_to_text_only_upstream_is_refused_with_path(client: anthropic.Anthropic, fake: FakeOpenAI) -> None:
    sent = len(fake.requests)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": TINY_PNG_B64}}]}])
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert "content[1]" in caught.value.body["error"]["message"]
    assert len(fake.requests) == sent


def test_errors_about_the_translated_request_name_the_clients_paths(client: anthropic.Anthropic,
                                                                    fake: FakeOpenAI) -> None:
    """The system prompt and tool results move things in the chat request scillm translates to (a tool result's
    image follows in a user message); an error about that request names where the client's body has it."""
    sent = len(fake.requests)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": TINY_PNG_B64}}
    turns: list[Any] = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": [{"type": "text", "text": "sunny"}, image]},
                                     {"type": "text", "text": "And this?"}, image]}]
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.messages.create(model=MODEL, max_tokens=50, system="Be brief.", tools=[WEATHER],  # type: ignore[arg-type]
                                   messages=turns, stream=stream)
        message = caught.value.body["error"]["message"]
        assert "@ $.messages[2].content[0].content[1];" in message, message  # chat's $.messages[4].content[0]
    assert len(fake.requests) == sent


# -- stop reasons --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("finish", "stop_reason"), [("length", "max_tokens"), ("content_filter", "refusal"),
                                                     ("stop", "end_turn")])
def test_stop_reason_mapping(client: anthropic.Anthropic, fake: FakeOpenAI, finish: str, stop_reason: str) -> None:
    fake.script(Reply.say("partial answer", finish_reason=finish))
    assert client.messages.create(model=MODEL, max_tokens=5, messages=user("x")).stop_reason == stop_reason
    fake.script(Reply.say("partial answer", finish_reason=finish))
    with client.messages.stream(model=MODEL, max_tokens=5, messages=user("x")) as stream:
        assert stream.get_final_message().stop_reason == stop_reason


def test_empty_answer_at_length_is_an_error_not_blank_success(client: anthropic.Anthropic,
                                                               fake: FakeOpenAI) -> None:
    fake.script(Reply(text="", finish_reason="length"))
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.create(model=MODEL, max_tokens=5, messages=user("x"))
    assert caught.value.status_code == 502
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "api_error"
    assert "max_tokens" in caught.value.body["error"]["message"]


# -- errors --------------------------------------------------------------------------------------------------------

def test_unknown_model_is_404_not_found_error(client: anthropic.Anthropic, fake: FakeOpenAI) -> None:
    sent = len(fake.requests)
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="no-such-model-xyz", max_tokens=10, messages=user("x"))
    body = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert "no-such-model-xyz" in body["error"]["message"]
    assert body["request_id"] == caught.value.response.headers["x-request-id"]
    assert len(fake.requests) == sent
    with pytest.raises(anthropic.NotFoundError):  # streaming: the status comes before any event
        with client.messages.stream(model="no-such-model-xyz", max_tokens=10, messages=user("x")) as stream:
            stream.get_final_message()


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_429_is_rate_limit_error_with_retry_after(client: anthropic.Anthropic, fake: FakeOpenAI,
                                                           stream: bool) -> None:
    fake.script(Reply.fail(429, "Rate limit reached for requests", type="requests", code="rate_limit_exceeded",
                           headers={"retry-after": "7"}))
    with pytest.raises(anthropic.RateLimitError) as caught:
        if stream:
            with client.messages.stream(model=MODEL, max_tokens=10, messages=user("x")) as s:
                s.get_final_message()
        else:
            client.messages.create(model=MODEL, max_tokens=10, messages=user("x"))
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.body["error"]["type"] == "rate_limit_error"
    assert "deepseek" in caught.value.body["error"]["message"]


def test_upstream_overloaded_is_529(client: anthropic.Anthropic, fake: FakeOpenAI) -> None:
    fake.script(Reply.fail(529, "Overloaded", type="overloaded_error"))
    with pytest.raises(anthropic.OverloadedError) as caught:
        client.messages.create(model=MODEL, max_tokens=10, messages=user("x"))
    assert caught.value.status_code == 529
    assert caught.value.body["error"]["type"] == "overloaded_error"


def test_upstream_auth_failure_never_leaks_the_key(client: anthropic.Anthropic, fake: FakeOpenAI) -> None:
    fake.script(Reply.fail(401, f"Incorrect API key provided: {KEY}", type="invalid_request_error",
                           code="invalid_api_key"))
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.create(model=MODEL, max_tokens=10, messages=user("x"))
    assert caught.value.body["type"] == "error"
    assert KEY not in caught.value.response.text and KEY[-12:] not in caught.value.response.text


@pytest.mark.parametrize(("body", "path"), [
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, "$.max_tokens"),
    ({"model": MODEL, "max_tokens": 10, "messages": []}, "$.messages"),
    ({"model": MODEL, "max_tokens": 10, "messages": [{"role": "system", "content": "x"}]}, "$.messages[0].role"),
    ({"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}, {"type": "image", "source": {"type": "base64", "media_type": "image/bmp",
                                                                  "data": "AA"}}]}]},
     "$.messages[0].content[1].source.media_type"),
    ({"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "video"}]}]}]},
     "$.messages[0].content[0].content[0].type"),
    ({"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
      "tools": [{"name": "t"}]}, "$.tools[0].input_schema"),
    ({"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
      "temperature": "hot"}, "$.temperature"),
    ({"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
      "tool_choice": {"type": "sometimes"}}, "$.tool_choice.type"),
])
def test_bad_body_is_400_naming_the_path(server: ServerThread, body: dict[str, Any], path: str) -> None:
    response = httpx.post(server.url + "/v1/messages", json=body, headers={"x-api-key": DEV_KEY}, timeout=10)
    assert response.status_code == 400
    data = response.json()
    assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    assert path in data["error"]["message"], data


def test_malformed_json_and_wrong_method(server: ServerThread) -> None:
    response = httpx.post(server.url + "/v1/messages", content=b"{not json", timeout=10,
                          headers={"x-api-key": DEV_KEY, "content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    response = httpx.get(server.url + "/v1/messages", headers={"x-api-key": DEV_KEY}, timeout=10)
    assert response.status_code == 405
    assert response.json()["type"] == "error"


@pytest.mark.parametrize("fault", [{"error_after": 2}, {"cut_after": 3}])
def test_mid_stream_failure_raises_in_the_sdk(client: anthropic.Anthropic, fake: FakeOpenAI, server: ServerThread,
                                              fault: dict[str, int]) -> None:
    fake.script(Reply.say("a long answer that will not finish", **fault))
    seen: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        with client.messages.stream(model=MODEL, max_tokens=100, messages=user("x")) as stream:
            seen.extend(stream.text_stream)
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] in ("api_error", "overloaded_error")
    assert "deepseek" in caught.value.body["error"]["message"]

    fake.script(Reply.say("a long answer that will not finish", **fault))
    events = raw_events(server, {"model": MODEL, "max_tokens": 100, "stream": True, "messages": user("x")})
    names = [name for name, _ in events]
    assert names[-1] == "error" and "message_stop" not in names


# -- auth ----------------------------------------------------------------------------------------------------------

def test_x_api_key_and_bearer_auth(server: ServerThread, fake: FakeOpenAI) -> None:
    fake.script(Reply.say("via x-api-key"), Reply.say("via bearer"))
    with_key = anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0)
    assert with_key.messages.create(model=MODEL, max_tokens=5, messages=user("x")).content[0].text == "via x-api-key"
    with_token = anthropic.Anthropic(base_url=server.url, auth_token=DEV_KEY, max_retries=0)
    assert with_token.messages.create(model=MODEL, max_tokens=5, messages=user("x")).content[0].text == "via bearer"


def test_wrong_key_is_401_in_anthropic_envelope(server: ServerThread, fake: FakeOpenAI) -> None:
    sent = len(fake.requests)
    wrong = anthropic.Anthropic(base_url=server.url, api_key="sk-wrong-key", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        wrong.messages.create(model=MODEL, max_tokens=5, messages=user("x"))
    assert caught.value.status_code == 401
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "authentication_error"
    assert "sk-wrong-key" not in caught.value.response.text
    assert caught.value.response.headers["request-id"]
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.count_tokens(model=MODEL, messages=user("x"))
    assert len(fake.requests) == sent


# -- count_tokens --------------------------------------------------------------------------------------------------

def test_count_tokens_estimate(client: anthropic.Anthropic, fake: FakeOpenAI) -> None:
    sent = len(fake.requests)
    small = client.messages.count_tokens(model=MODEL, messages=user("Hello"))
    big = client.messages.count_tokens(model=MODEL, system="S" * 400, tools=[WEATHER], messages=[
        {"role": "user", "content": [
            {"type": "text", "text": "x" * 4000},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": TINY_PNG_B64}}]}])
    assert 0 < small.input_tokens < 20
    assert 1000 + 100 + 1600 <= big.input_tokens <= 1000 + 100 + 1600 + 200
    assert len(fake.requests) == sent  # an estimate: nothing goes upstream
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="no-such-model-xyz", messages=user("x"))
    with pytest.raises(anthropic.BadRequestError):
        client.messages.count_tokens(model=MODEL, messages=[])


def test_installed_entry_point(tmp_path: Any) -> None:
    """The installed distribution registers ``messages`` through the ``scillm`` entry points and works with every
    other installed plugin (retries, caching, metrics, files...) in the pipeline."""
    with FakeOpenAI() as upstream:
        app = make_app(env={"DEEPSEEK_API_KEY": KEY, "DEEPSEEK_API_BASE": upstream.base_url}, data_dir=tmp_path)
        assert "messages" in {info.name for info in app.runtime.plugins}
        with ServerThread(app) as server:
            client = anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0, timeout=20)
            message = client.messages.create(model=MODEL, max_tokens=20, messages=user("plain"))
            assert message.content[0].text == "Hello from the fake."
            with client.messages.stream(model=MODEL, max_tokens=20, messages=user("streamed")) as stream:
                assert "".join(stream.text_stream) == "Hello from the fake."
            assert client.messages.count_tokens(model=MODEL, messages=user("Hello there")).input_tokens > 0
            denied = httpx.post(server.url + "/v1/messages", headers={"x-api-key": "nope"}, timeout=10,
                                json={"model": MODEL, "max_tokens": 5, "messages": user("x")})
            assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"


def test_an_empty_answer_cut_by_the_output_limit_is_a_502(client: anthropic.Anthropic, fake: FakeOpenAI) -> None:
    fake.script(Reply(text="", finish_reason="length"))
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.create(model=MODEL, max_tokens=16, messages=user("Hi"))
    message = caught.value.body["error"]["message"]  # Anthropic's envelope carries no code
    assert caught.value.status_code == 502 and "whole output budget" in message and "max_tokens" in message
