"""Claude's signed thinking in a group that falls back from Claude to another upstream in the middle of a tool loop
with thinking on: the thinking the client carries back (chat's ``thinking_blocks``, a Messages assistant turn's
thinking blocks, a Responses reasoning item's ``encrypted_content``) goes to the Anthropic attempt, and the
fallback's attempt gets a body its own dialect takes, without it. Each attempt decides for its own provider (core's
dispatch), whichever member of the group comes first. Through the official SDKs, against fakes of each wire."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from scillm_responses.translate import THINKING

from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, ToolCallSpec, make_app
from scillm_core.testing.fake_anthropic import FakeAnthropic
from scillm_core.testing.fake_codex import FakeOpenAIResponses

CLAUDE = "anthropic/claude-sonnet-4-5"
GROUPS = {"claude-then-deepseek": {"models": [CLAUDE, "deepseek/deepseek-chat"]},
          "claude-then-openai": {"models": [CLAUDE, "openai/gpt-r"]},
          "deepseek-then-claude": {"models": ["deepseek/deepseek-chat", CLAUDE]}}
ASK = {"role": "user", "content": "Weather in Oslo?"}
THOUGHT = Reply(reasoning="The user wants the weather: call the tool.",
                tool_calls=(ToolCallSpec("get_weather", {"city": "Oslo"}),))
OVERLOADED = Reply.fail(529, "Overloaded", type="overloaded_error")
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": SCHEMA}}
FLAT_TOOL = {"type": "function", "name": "get_weather", "description": "Weather", "parameters": SCHEMA}
CLAUDE_TOOL = {"name": "get_weather", "description": "Weather", "input_schema": SCHEMA}


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeAnthropic, FakeOpenAI, FakeOpenAIResponses]]:
    with FakeAnthropic() as claude, FakeOpenAI() as deepseek, FakeOpenAIResponses() as responses:
        yield claude, deepseek, responses  # type: ignore[misc]


@pytest.fixture
def upstreams(fakes: tuple[Any, ...]) -> tuple[Any, ...]:
    for fake in fakes:
        fake.requests.clear()
        fake._script.clear()
        fake.default = type(fake).default
    return fakes


@pytest.fixture(scope="module")
def server(fakes: tuple[Any, ...], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    claude, deepseek, responses = fakes
    env = {"ANTHROPIC_API_KEY": "sk-ant-fallback-0123456789", "ANTHROPIC_API_BASE": claude.base_url,
           "DEEPSEEK_API_KEY": "sk-fallback-deepseek-0123456789", "DEEPSEEK_API_BASE": deepseek.base_url,
           "OPENAI_API_KEY": "sk-fallback-openai-0123456789", "OPENAI_API_BASE": responses.base_url,
           "OPENAI_API_RESPONSES": "1"}
    config = {"groups": GROUPS, "plugins": {"disable": ["cache"]},
              "resilience": {"max_retries": 0, "breaker": False}}
    with ServerThread(make_app(env=env, config=config, data_dir=tmp_path_factory.mktemp("data"))) as running:
        yield running


def chat_client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)


def claude_client(server: ServerThread) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0, timeout=20)


def no_thinking(messages: list[dict[str, Any]]) -> bool:
    return all("thinking_blocks" not in m and "thinking" not in str(m.get("content")) for m in messages)


def claude_got_its_thinking_back(claude: FakeAnthropic) -> None:
    """The failed Anthropic attempt of the second turn had the signed thinking block first in the tool turn."""
    first = claude.last.body["messages"][1]["content"][0]
    assert first == {"type": "thinking", "thinking": THOUGHT.reasoning, "signature": FakeAnthropic.signature(THOUGHT)}


# -- chat completions ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_fallback_from_claude_mid_tool_loop_gets_no_thinking_blocks(server, upstreams, stream):
    claude, deepseek, _ = upstreams
    client = chat_client(server)
    claude.script(THOUGHT)
    first = client.chat.completions.create(model="claude-then-deepseek", messages=[ASK], tools=[CHAT_TOOL],
                                           reasoning_effort="low")
    assistant = first.choices[0].message.model_dump(exclude_none=True)  # sent back as it came, extras included
    assert assistant["thinking_blocks"][0]["signature"] == FakeAnthropic.signature(THOUGHT)
    claude.default = OVERLOADED
    deepseek.script(Reply.say("Sunny in Oslo."))
    loop = [ASK, assistant, {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": "sunny"}]
    raw = client.chat.completions.with_raw_response.create(
        model="claude-then-deepseek", messages=loop, tools=[CHAT_TOOL], reasoning_effort="low", stream=stream)
    answer = raw.parse()
    text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices) if stream \
        else answer.choices[0].message.content
    assert text == "Sunny in Oslo." and raw.headers["x-scillm-provider"] == "deepseek"
    claude_got_its_thinking_back(claude)
    sent = deepseek.last.body
    assert no_thinking(sent["messages"]) and sent["reasoning_effort"] == "low"
    assert sent["messages"][1]["tool_calls"] == assistant["tool_calls"]
    assert raw.headers["x-scillm-dialect"] == "openai-chat"  # still the client's own body, less the thinking


def test_chat_thinking_blocks_reach_claude_when_it_is_the_fallback(server, upstreams):
    """The other way round: the first member is not Anthropic, the fallback is, and gets the blocks back."""
    claude, deepseek, _ = upstreams
    client = chat_client(server)
    claude.script(THOUGHT)
    first = client.chat.completions.create(model=CLAUDE, messages=[ASK], tools=[CHAT_TOOL], reasoning_effort="low")
    assistant = first.choices[0].message.model_dump(exclude_none=True)
    deepseek.default = Reply.fail(503, "Server busy", type="server_error")
    claude.script(Reply.say("Sunny in Oslo."))
    loop = [ASK, assistant, {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"], "content": "sunny"}]
    answer = client.chat.completions.create(model="deepseek-then-claude", messages=loop, tools=[CHAT_TOOL],
                                            reasoning_effort="low")
    assert answer.choices[0].message.content == "Sunny in Oslo."
    assert no_thinking(deepseek.last.body["messages"])
    claude_got_its_thinking_back(claude)
    assert claude.last.body["thinking"] == {"type": "enabled", "budget_tokens": 1024}


# -- Anthropic Messages -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_messages_fallback_from_claude_mid_tool_loop_gets_no_thinking(server, upstreams, stream):
    claude, deepseek, _ = upstreams
    client = claude_client(server)
    claude.script(THOUGHT)
    thinking = {"type": "enabled", "budget_tokens": 1024}
    first = client.messages.create(model="claude-then-deepseek", max_tokens=2048, thinking=thinking,
                                   tools=[CLAUDE_TOOL], messages=[ASK])
    assert [b.type for b in first.content] == ["thinking", "tool_use"]
    claude.default = OVERLOADED
    deepseek.script(Reply.say("Sunny in Oslo.", model="deepseek-chat-v3"))
    loop = [ASK, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": first.content[1].id,
                                          "content": "sunny"}]}]
    kwargs: dict[str, Any] = {"model": "claude-then-deepseek", "max_tokens": 2048, "thinking": thinking,
                              "tools": [CLAUDE_TOOL], "messages": loop}
    if stream:
        with client.messages.stream(**kwargs) as events:
            answer = events.get_final_message()
    else:
        answer = client.messages.create(**kwargs)
    assert [(b.type, getattr(b, "text", None)) for b in answer.content] == [("text", "Sunny in Oslo.")]
    assert answer.model == "deepseek-chat-v3"  # the model that served, as chat says it
    claude_got_its_thinking_back(claude)
    sent = deepseek.last.body
    assert no_thinking(sent["messages"]) and sent["reasoning_effort"] == "low"
    assert sent["messages"][1]["tool_calls"][0]["id"] == first.content[1].id


# -- OpenAI Responses ---------------------------------------------------------------------------------------------

def _responses_first_turn(client: openai.OpenAI, model: str) -> list[dict[str, Any]]:
    first = client.responses.create(model=model, input=[ASK], tools=[FLAT_TOOL], reasoning={"effort": "low"})
    output = [item.model_dump(exclude_none=True) for item in first.output]
    assert [i["type"] for i in output] == ["reasoning", "function_call"]
    assert output[0]["encrypted_content"].startswith(THINKING)
    return [ASK, *output, {"type": "function_call_output", "call_id": output[1]["call_id"], "output": "sunny"}]


def test_responses_fallback_from_claude_to_chat_upstream_gets_no_thinking(server, upstreams):
    claude, deepseek, _ = upstreams
    client = chat_client(server)
    claude.script(THOUGHT)
    items = _responses_first_turn(client, "claude-then-deepseek")
    claude.default = OVERLOADED
    deepseek.script(Reply.say("Sunny in Oslo."))
    answer = client.responses.create(model="claude-then-deepseek", input=items, tools=[FLAT_TOOL],
                                     reasoning={"effort": "low"})
    assert answer.output_text == "Sunny in Oslo." and answer.model == "deepseek-chat"
    claude_got_its_thinking_back(claude)
    sent = deepseek.last.body
    assert no_thinking(sent["messages"]) and sent["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_responses_fallback_to_an_openai_responses_upstream_as_sent_without_scillms_reasoning(server, upstreams,
                                                                                              stream):
    """The fallback takes the client's Responses body as sent, less the reasoning item that seals Claude's
    thinking (the upstream could not open it: a 400 from OpenAI); the rest goes as the client wrote it."""
    claude, _, responses = upstreams
    client = chat_client(server)
    claude.script(THOUGHT)
    items = _responses_first_turn(client, "claude-then-openai")
    claude.default = OVERLOADED
    responses.script(Reply.say("Sunny in Oslo."))
    raw = client.responses.with_raw_response.create(model="claude-then-openai", input=items, tools=[FLAT_TOOL],
                                                    reasoning={"effort": "low"}, stream=stream)
    answer = raw.parse()
    text = "".join(e.delta for e in answer if e.type == "response.output_text.delta") if stream \
        else answer.output_text
    assert text == "Sunny in Oslo." and raw.headers["x-scillm-dialect"] == "openai-responses"
    claude_got_its_thinking_back(claude)
    sent = responses.last.body["input"]
    assert [i.get("type", "message") for i in sent] == ["message", "function_call", "function_call_output"]
    assert sent[1] == items[2] and sent[0] == ASK and sent[2] == items[3]
    assert responses.last.body["reasoning"] == {"effort": "low"}
