"""Claude's signed thinking blocks through ``/v1/responses``: scillm keeps no response state, so a translated
answer's reasoning item carries them in ``encrypted_content`` and the client's next call, sending that item back,
gives them to Anthropic at the start of the tool-calling turn, as a tool loop with thinking on requires. Other
upstreams never get them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
from scillm_responses.translate import THINKING

from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, ToolCallSpec, make_app
from scillm_core.testing.fake_anthropic import FakeAnthropic

CLAUDE = "anthropic/claude-sonnet-4-5"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ASK = {"role": "user", "content": "Weather in Oslo?"}
THOUGHT = Reply(reasoning="The user wants the weather: call the tool.",
                tool_calls=(ToolCallSpec("get_weather", {"city": "Oslo"}),))


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeAnthropic, FakeOpenAI]]:
    with FakeAnthropic() as claude, FakeOpenAI() as deepseek:
        yield claude, deepseek  # type: ignore[misc]


@pytest.fixture(scope="module")
def client(fakes: tuple[FakeAnthropic, FakeOpenAI], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    claude, deepseek = fakes
    env = {"ANTHROPIC_API_KEY": "sk-ant-think-0123456789abcdef", "ANTHROPIC_API_BASE": claude.base_url,
           "DEEPSEEK_API_KEY": "sk-think-deepseek-0123456789", "DEEPSEEK_API_BASE": deepseek.base_url}
    app = make_app(env=env, data_dir=tmp_path_factory.mktemp("thinking"),
                   only=("chat", "auth", "ops", "responses", "anthropic", "openai-compat"))
    with ServerThread(app) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)


def _first_turn(client: Any, stream: bool) -> list[Any]:
    """The output items of the first call (reasoning effort on, a tool in reach), streamed or not."""
    kwargs: dict[str, Any] = {"model": CLAUDE, "input": [ASK], "tools": [WEATHER], "reasoning": {"effort": "low"}}
    if not stream:
        return list(client.responses.create(**kwargs).output)
    events = list(client.responses.create(**kwargs, stream=True))
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.type for i in events[-1].response.output] == [i.type for i in done]
    return done


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_claudes_thinking_blocks_go_back_to_claude_in_the_tool_loop(client, fakes, stream):
    claude, _ = fakes
    claude.script(THOUGHT, Reply.say("Sunny in Oslo."))
    output = _first_turn(client, stream)
    reasoning, call = output
    assert reasoning.type == "reasoning" and reasoning.summary[0].text == THOUGHT.reasoning
    assert reasoning.encrypted_content.startswith(THINKING)
    assert call.type == "function_call" and call.arguments == '{"city":"Oslo"}'
    items = [ASK, *(item.model_dump(exclude_none=True) for item in output),
             {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    answer = client.responses.create(model=CLAUDE, input=items, tools=[WEATHER], reasoning={"effort": "low"})
    assert answer.output_text == "Sunny in Oslo."
    sent = claude.last.body
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    thinking, tool_use = sent["messages"][1]["content"]
    assert thinking == {"type": "thinking", "thinking": THOUGHT.reasoning,
                        "signature": FakeAnthropic.signature(THOUGHT)}
    assert tool_use["type"] == "tool_use" and tool_use["input"] == {"city": "Oslo"}


def test_a_4_6_claude_thinks_adaptively_at_the_reasoning_effort_through_its_tool_loop(client, fakes):
    """provider-protocols.md §3.2: the 4.6 generation takes ``thinking: {"type": "adaptive"}`` with
    ``output_config.effort`` (the fake refuses adaptive thinking before 4.6, and a budget is not what was asked)."""
    claude, _ = fakes
    claude.script(THOUGHT, Reply.say("Sunny in Oslo."))
    first = client.responses.create(model="anthropic/claude-opus-4-6", input=[ASK], tools=[WEATHER],
                                    reasoning={"effort": "high"})
    assert claude.last.body["thinking"] == {"type": "adaptive"}
    assert claude.last.body["output_config"] == {"effort": "high"} and "budget_tokens" not in str(claude.last.body)
    items = [ASK, *(item.model_dump(exclude_none=True) for item in first.output),
             {"type": "function_call_output", "call_id": first.output[1].call_id, "output": "sunny"}]
    answer = client.responses.create(model="anthropic/claude-opus-4-6", input=items, tools=[WEATHER],
                                     reasoning={"effort": "high"})
    assert answer.output_text == "Sunny in Oslo." and answer.model == "claude-opus-4-6"
    assert claude.last.body["messages"][1]["content"][0]["signature"] == FakeAnthropic.signature(THOUGHT)
    assert claude.last.body["thinking"] == {"type": "adaptive"}


def test_thinking_blocks_from_claude_never_reach_another_upstream(client, fakes):
    claude, deepseek = fakes
    claude.script(THOUGHT)
    output = _first_turn(client, stream=False)
    deepseek.script(Reply.say("Sunny."))
    items = [ASK, *(item.model_dump(exclude_none=True) for item in output),
             {"type": "function_call_output", "call_id": output[1].call_id, "output": "sunny"}]
    assert client.responses.create(model="deepseek/deepseek-chat", input=items, tools=[WEATHER]).output_text == "Sunny."
    assistant = deepseek.last.body["messages"][1]
    assert assistant["role"] == "assistant" and "thinking_blocks" not in assistant
    assert assistant["tool_calls"][0]["function"]["arguments"] == '{"city":"Oslo"}'


def test_encrypted_content_that_is_not_scillms_is_left_alone(client, fakes):
    claude, _ = fakes
    claude.script(Reply.say("Sunny in Oslo."))
    items = [ASK, {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAAABo-openai-own"},
             {"role": "assistant", "content": "Let me think."}, {"role": "user", "content": "Go on."}]
    assert client.responses.create(model=CLAUDE, input=items).output_text == "Sunny in Oslo."
    assert claude.last.body["messages"][1] == {"role": "assistant",
                                               "content": [{"type": "text", "text": "Let me think."}]}


def test_a_continuation_signing_a_reasoning_item_the_upstream_opened_keeps_the_blocks() -> None:
    """A stream the upstream started as sent (its reasoning item open) and another model went on with: the thinking
    blocks the continuation signs ride on that item when it closes."""
    from scillm_responses.translate import EventStream, unsealed_thinking

    from scillm_core import ChatChunk
    from scillm_core.models.chat import ChunkChoice, Delta
    from scillm_core.models.native import with_native

    events = EventStream("claude-sonnet-4-6", {})
    opened = ChatChunk(id="c", model="m", choices=(ChunkChoice(delta=Delta(extra={"reasoning_content": "Hm."})),))
    with_native(opened, b'event: response.output_item.added\ndata: {"type": "response.output_item.added", '
                          b'"output_index": 0, "sequence_number": 2, "item": {"id": "rs_1", "type": "reasoning", '
                          b'"summary": []}}\n\n')
    events.follow(opened)
    block = {"type": "thinking", "thinking": "Hm.", "signature": "Es8DCkYICxgC"}
    events.feed(ChatChunk(id="c", model="m", choices=(ChunkChoice(delta=Delta(extra={"thinking_blocks": [block]})),)))
    done = [orjson.loads(e.split(b"data: ", 1)[1]) for e in events.complete() if b"output_item.done" in e]
    assert done[0]["item"]["id"] == "rs_1" and unsealed_thinking(done[0]["item"]["encrypted_content"]) == [block]
