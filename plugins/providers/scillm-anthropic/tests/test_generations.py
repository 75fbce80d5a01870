"""What each Claude generation is sent, end to end through the official ``openai`` client (chat completions and
Responses) against the fake Anthropic, which refuses what the API refuses by generation: a ``json_schema`` answer
from a model before structured outputs (4.5) comes through a forced tool, and ``reasoning_effort`` becomes the
effort that generation takes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
from pydantic import BaseModel
from scillm_anthropic_helpers import ApiKeyFake

from scillm_core.testing import DEV_KEY, Reply, ServerThread, ToolCallSpec, make_app

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "celsius": {"type": "integer"}},
          "required": ["city", "celsius"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
ANSWER = {"city": "Oslo", "celsius": -3}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
#: before structured outputs: Claude 4.0, 4.1 and 3.x
EARLIER = ("anthropic/claude-sonnet-4-20250514", "anthropic/claude-opus-4-1", "anthropic/claude-3-5-haiku-20241022")


class Weather(BaseModel):
    city: str
    celsius: int


@pytest.fixture(scope="module")
def fake() -> Iterator[ApiKeyFake]:
    with ApiKeyFake() as server:
        yield server  # type: ignore[misc]


@pytest.fixture(scope="module")
def server(fake: ApiKeyFake, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    env = {"ANTHROPIC_API_KEY": ApiKeyFake.api_key, "ANTHROPIC_API_BASE": fake.url,
           "SCILLM_CLAUDE_CREDENTIALS": "/nonexistent/.credentials.json"}
    app = make_app(env=env, data_dir=tmp_path_factory.mktemp("generations"),
                   only=("chat", "responses", "auth", "ops", "anthropic"))
    with ServerThread(app) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh_script(fake: ApiKeyFake) -> Iterator[None]:
    yield
    fake._script.clear()  # a failed test must not leave its replies to the next one


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)


def answered(**kw: Any) -> Reply:
    """Claude answering through the answer tool, as a model before structured outputs does when it is forced."""
    return Reply(tool_calls=(ToolCallSpec("json_tool_call", ANSWER),), **kw)


# -- json_schema before structured outputs -------------------------------------------------------------------------

@pytest.mark.parametrize("model", EARLIER)
def test_a_json_schema_answer_from_an_earlier_claude_comes_through_a_forced_tool(client: openai.OpenAI,
                                                                                 fake: ApiKeyFake, model: str) -> None:
    """The API refuses ``output_config.format`` before the 4.5 generation (the fake too): the schema goes as a
    single tool the model is made to call, and its input comes back as the message's JSON text."""
    fake.script(answered())
    answer = client.chat.completions.parse(model=model, messages=[{"role": "user", "content": "Oslo?"}],
                                           response_format=Weather)
    choice = answer.choices[0]
    assert choice.message.parsed == Weather(**ANSWER) and orjson.loads(choice.message.content or "") == ANSWER
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    body = fake.last.body
    assert "output_config" not in body
    [tool] = body["tools"]
    assert tool["name"] == "json_tool_call" and tool["input_schema"] == Weather.model_json_schema() | {
        "additionalProperties": False}  # the SDK's strict schema
    assert body["tool_choice"] == {"type": "tool", "name": "json_tool_call"}


def test_a_streamed_json_schema_answer_from_an_earlier_claude_is_content(client: openai.OpenAI,
                                                                          fake: ApiKeyFake) -> None:
    """The tool's ``input_json_delta`` pieces are the answer's content deltas; no tool call, finish ``stop``."""
    fake.script(answered())
    chunks = list(client.chat.completions.create(model=EARLIER[0], stream=True, response_format=FORMAT,  # type: ignore[call-overload]
                                                 messages=[{"role": "user", "content": "Oslo?"}]))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    pieces = [d.content for d in deltas if d.content]
    assert len(pieces) > 1 and orjson.loads("".join(pieces)) == ANSWER
    assert not any(d.tool_calls for d in deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_responses_json_schema_answer_from_an_earlier_claude_is_output_text(client: openai.OpenAI,
                                                                               fake: ApiKeyFake, stream: bool) -> None:
    fake.script(answered())
    text = {"format": {"type": "json_schema", "name": "weather", "schema": SCHEMA, "strict": True}}
    if stream:
        events = list(client.responses.create(model=EARLIER[0], input="Oslo?", text=text, stream=True))  # type: ignore[arg-type]
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert len(deltas) > 1 and orjson.loads("".join(deltas)) == ANSWER
        response = events[-1].response  # type: ignore[union-attr]
    else:
        response = client.responses.create(model=EARLIER[0], input="Oslo?", text=text)  # type: ignore[arg-type]
    assert [item.type for item in response.output] == ["message"]
    assert orjson.loads(response.output_text) == ANSWER and response.status == "completed"
    assert fake.last.body["tool_choice"] == {"type": "tool", "name": "json_tool_call"}
    assert "output_config" not in fake.last.body


def test_the_4_5_generation_and_unknown_names_get_output_config_format(client: openai.OpenAI,
                                                                       fake: ApiKeyFake) -> None:
    fake.script(Reply.say(orjson.dumps(ANSWER).decode()))
    answer = client.chat.completions.create(model="anthropic/claude-haiku-4-5", response_format=FORMAT,  # type: ignore[call-overload]
                                            messages=[{"role": "user", "content": "Oslo?"}])
    assert orjson.loads(answer.choices[0].message.content) == ANSWER
    assert fake.last.body["output_config"] == {"format": {"type": "json_schema", "schema": SCHEMA}}
    assert "tools" not in fake.last.body


def test_with_the_clients_tools_the_model_calls_them_or_answers(client: openai.OpenAI, fake: ApiKeyFake) -> None:
    """With the client's own tools the answer tool is one more and a tool call is required (``any``): the model
    calls the client's tools while it needs them and gives the JSON answer last, so a tool loop keeps working."""
    fake.script(Reply.call("get_weather", {"city": "Oslo"}), answered())
    messages: list[Any] = [{"role": "user", "content": "Oslo?"}]
    first = client.chat.completions.create(model=EARLIER[0], tools=[WEATHER], response_format=FORMAT,  # type: ignore[call-overload]
                                           messages=messages)
    assert first.choices[0].finish_reason == "tool_calls"
    [call] = first.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and first.choices[0].message.content is None
    assert [t["name"] for t in fake.last.body["tools"]] == ["get_weather", "json_tool_call"]
    assert fake.last.body["tool_choice"] == {"type": "any"}
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "-3 C"}]
    second = client.chat.completions.create(model=EARLIER[0], tools=[WEATHER], response_format=FORMAT,  # type: ignore[call-overload]
                                            messages=messages)
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls
    assert orjson.loads(second.choices[0].message.content) == ANSWER
    # a client that requires a tool call now gets its choice, without the answer tool
    fake.script(Reply.call("get_weather", {"city": "Oslo"}))
    client.chat.completions.create(model=EARLIER[0], tools=[WEATHER], response_format=FORMAT,  # type: ignore[call-overload]
                                   tool_choice="required", messages=[{"role": "user", "content": "Oslo?"}])
    assert [t["name"] for t in fake.last.body["tools"]] == ["get_weather"]
    assert fake.last.body["tool_choice"] == {"type": "any"}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_with_thinking_the_answer_tool_is_offered_and_text_beside_it_left_out(client: openai.OpenAI,
                                                                              fake: ApiKeyFake, stream: bool) -> None:
    """Anthropic refuses a forced tool choice with thinking on (the fake too): the tool is offered (``auto``), and
    the text the model writes before calling it is left out of the JSON answer."""
    fake.script(answered(reasoning="Look it up.", text="Here it is: "))
    kwargs: dict[str, Any] = dict(model=EARLIER[0], reasoning_effort="low", response_format=FORMAT,
                                  messages=[{"role": "user", "content": "Oslo?"}])
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        answer = client.chat.completions.create(**kwargs)
        content, finish = answer.choices[0].message.content or "", [answer.choices[0].finish_reason]
    assert orjson.loads(content) == ANSWER and finish == ["stop"]
    assert fake.last.body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert fake.last.body["tool_choice"] == {"type": "auto"}


@pytest.mark.parametrize("model", ["anthropic/claude-sonnet-4-5", "anthropic/claude-opus-4-6"])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_a_required_or_named_tool_with_reasoning_effort_is_called_without_thinking(
        client: openai.OpenAI, fake: ApiKeyFake, model: str, choice: Any) -> None:
    """Anthropic refuses thinking with a tool_choice that forces a tool (400; the fake too): the client's required or
    named tool is what it relies on, so the call goes with that choice and without thinking, instead of failing."""
    fake.script(Reply.call("get_weather", {"city": "Oslo"}))
    answer = client.chat.completions.create(model=model, tools=[WEATHER], tool_choice=choice,  # type: ignore[arg-type]
                                            reasoning_effort="high", messages=[{"role": "user", "content": "Oslo?"}])
    assert answer.choices[0].finish_reason == "tool_calls"
    assert answer.choices[0].message.tool_calls[0].function.name == "get_weather"  # type: ignore[index]
    assert fake.last.body["tool_choice"]["type"] in ("any", "tool") and "thinking" not in fake.last.body


def test_an_answer_in_text_without_the_tool_comes_back_as_written(client: openai.OpenAI, fake: ApiKeyFake) -> None:
    """With the tool only offered (thinking on) the model may answer in text: streamed, that text is held until
    it is known not to precede the answer, then sent as it is."""
    fake.script(Reply(reasoning="Easy.", text='{"city": "Oslo", "celsius": -3}'))
    chunks = list(client.chat.completions.create(model=EARLIER[0], stream=True, reasoning_effort="low",  # type: ignore[call-overload]
                                                 response_format=FORMAT,
                                                 messages=[{"role": "user", "content": "Oslo?"}]))
    assert orjson.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)) == ANSWER


# -- reasoning_effort by generation --------------------------------------------------------------------------------

@pytest.mark.parametrize(("model", "effort", "sent"), [
    ("anthropic/claude-opus-4-6", "xhigh", {"effort": "max"}),  # 4.6 takes low to max: xhigh is its max
    ("anthropic/claude-sonnet-4-6", "xhigh", {"effort": "max"}),
    ("anthropic/claude-opus-4-7", "xhigh", {"effort": "xhigh"}),  # 4.7 has xhigh
    ("anthropic/claude-opus-4-6", "max", {"effort": "max"}),
    ("anthropic/claude-opus-4-7", "ultra", {"effort": "max"}),  # provider-protocols.md: xhigh/ultra -> max
    ("anthropic/claude-opus-4-6", "minimal", {"effort": "low"}),
    ("anthropic/claude-sonnet-4-5", "xhigh", None),  # before adaptive thinking: a budget
])
def test_reasoning_effort_is_the_effort_each_generation_takes(client: openai.OpenAI, fake: ApiKeyFake, model: str,
                                                              effort: str, sent: dict[str, str] | None) -> None:
    fake.script(Reply(reasoning="Thinking.", text="Done."), Reply(reasoning="Thinking.", text="Done."))
    answer = client.chat.completions.create(model=model, reasoning_effort=effort,  # type: ignore[arg-type]
                                            messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "Done."
    assert fake.last.body.get("output_config") == sent
    assert fake.last.body["thinking"] == ({"type": "adaptive"} if sent else {"type": "enabled", "budget_tokens": 8192})
    response = client.responses.create(model=model, input="hi", reasoning={"effort": effort})  # type: ignore[typeddict-item]
    assert response.output_text == "Done." and fake.last.body.get("output_config") == sent
