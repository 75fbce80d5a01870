"""Thinking models that want their reasoning back in a tool loop (Kimi answers 400 without it, DeepSeek's and GLM's
thinking modes read it): whatever dialect the client speaks, the reasoning it carries back on an assistant turn
reaches such an upstream as ``reasoning_content`` (a Messages thinking block's text, a Responses reasoning item's
summary), and never an upstream that takes no such key (OpenAI), even as a fallback in the same group. Through the
official SDKs, against fakes of each wire."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, ToolCallSpec, make_app

KIMI = "moonshot/kimi-k2-thinking"
GROUPS = {"kimi-then-openai": {"models": [KIMI, "openai/gpt-4.1"]}}
THOUGHT = Reply(reasoning="Oslo weather needs the tool.", tool_calls=(ToolCallSpec("get_weather", {"city": "Oslo"}),))
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
ASK = "Weather in Oslo?"


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    with FakeOpenAI() as kimi, FakeOpenAI() as gpt:
        kimi.wants_reasoning_back = True
        yield kimi, gpt


@pytest.fixture
def upstreams(fakes: tuple[FakeOpenAI, FakeOpenAI]) -> tuple[FakeOpenAI, FakeOpenAI]:
    for fake in fakes:
        fake.requests.clear()
        fake._script.clear()
    return fakes


@pytest.fixture(scope="module")
def server(fakes: tuple[FakeOpenAI, FakeOpenAI], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    kimi, gpt = fakes
    env = {"MOONSHOT_API_KEY": "sk-kimi-reasoning-0123456789", "MOONSHOT_API_BASE": kimi.base_url,
           "OPENAI_API_KEY": "sk-openai-reasoning-0123456789", "OPENAI_API_BASE": gpt.base_url}
    config = {"groups": GROUPS, "plugins": {"disable": ["cache"]}, "resilience": {"max_retries": 0, "breaker": False}}
    with ServerThread(make_app(env=env, config=config, data_dir=tmp_path_factory.mktemp("data"))) as running:
        yield running


def assistant_turn(body: dict[str, Any]) -> dict[str, Any]:
    return next(m for m in body["messages"] if m["role"] == "assistant")


@pytest.mark.parametrize("stream", [False, True])
def test_claude_code_style_tool_loop_on_kimi_sends_the_thinking_back_as_reasoning_content(
        server: ServerThread, upstreams: tuple[FakeOpenAI, FakeOpenAI], stream: bool) -> None:
    kimi, _ = upstreams
    kimi.script(THOUGHT, Reply.say("12 degrees"))
    client = anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0, timeout=20)
    asked = {"model": KIMI, "max_tokens": 2048, "thinking": {"type": "enabled", "budget_tokens": 1024},
             "tools": [{"name": "get_weather", "description": "Weather", "input_schema": SCHEMA}]}
    messages: list[dict[str, Any]] = [{"role": "user", "content": ASK}]
    if stream:
        with client.messages.stream(**asked, messages=messages) as events:
            first = events.get_final_message()
    else:
        first = client.messages.create(**asked, messages=messages)
    assert [b.type for b in first.content] == ["thinking", "tool_use"]
    call = first.content[1]
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "12C"}]}]
    second = client.messages.create(**asked, messages=messages)
    assert second.content[-1].text == "12 degrees"
    turn = assistant_turn(kimi.last.body)
    assert turn["reasoning_content"] == THOUGHT.reasoning and "thinking_blocks" not in turn
    assert turn["tool_calls"][0]["function"]["name"] == "get_weather"


def test_a_responses_reasoning_item_goes_back_to_kimi_as_reasoning_content(
        server: ServerThread, upstreams: tuple[FakeOpenAI, FakeOpenAI]) -> None:
    kimi, _ = upstreams
    kimi.script(THOUGHT, Reply.say("12 degrees"))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)
    tools: Any = [{"type": "function", "name": "get_weather", "description": "Weather", "parameters": SCHEMA}]
    first = client.responses.create(model=KIMI, input=ASK, tools=tools)
    assert [item.type for item in first.output] == ["reasoning", "function_call"]
    call = first.output[1]
    items: Any = [{"role": "user", "content": ASK}, *(i.model_dump(exclude_none=True) for i in first.output),
                  {"type": "function_call_output", "call_id": call.call_id, "output": "12C"}]  # type: ignore[union-attr]
    second = client.responses.create(model=KIMI, input=items, tools=tools)
    assert second.output_text == "12 degrees"
    assert assistant_turn(kimi.last.body)["reasoning_content"] == THOUGHT.reasoning


def test_a_fallback_to_openai_gets_no_reasoning_content(
        server: ServerThread, upstreams: tuple[FakeOpenAI, FakeOpenAI]) -> None:
    """The group's Kimi attempt fails on the second turn; OpenAI's attempt gets the turn without the key."""
    kimi, gpt = upstreams
    kimi.script(THOUGHT, Reply.fail(503, "overloaded"))
    gpt.script(Reply.say("12 degrees"))
    client = anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0, timeout=20)
    asked = {"model": "kimi-then-openai", "max_tokens": 2048,
             "tools": [{"name": "get_weather", "description": "Weather", "input_schema": SCHEMA}]}
    first = client.messages.create(**asked, messages=[{"role": "user", "content": ASK}])
    call = first.content[1]
    second = client.messages.create(**asked, messages=[
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "12C"}]}])
    assert second.content[-1].text == "12 degrees"
    assert assistant_turn(kimi.last.body)["reasoning_content"] == THOUGHT.reasoning
    turn = assistant_turn(gpt.last.body)
    assert "reasoning_content" not in turn and turn["tool_calls"][0]["function"]["name"] == "get_weather"
