"""``POST /v1/messages`` routed to the Anthropic provider: native fields (thinking, top_k, metadata) pass through,
and thinking blocks with their signatures survive a tool loop, as Anthropic requires with thinking on."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest
import scillm_anthropic
import scillm_auth
import scillm_messages

from scillm_core.testing import DEV_KEY, Reply, ServerThread, make_app
from scillm_core.testing.fake_anthropic import FakeAnthropic

KEY = "sk-ant-api03-messages-secret-0123456789"
MODEL = "claude-sonnet-5-5"
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture(scope="module")
def client(fake: FakeAnthropic, tmp_path_factory: pytest.TempPathFactory) -> Iterator[anthropic.Anthropic]:
    env = {"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_API_BASE": fake.url,
           "SCILLM_CLAUDE_CREDENTIALS": "/nonexistent/scillm/.credentials.json"}
    app = make_app(env=env, entry_points=False, data_dir=tmp_path_factory.mktemp("messages-anthropic"),
                   plugins=[("auth", scillm_auth), ("anthropic", scillm_anthropic), ("messages", scillm_messages)])
    with ServerThread(app) as server:
        yield anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0, timeout=20)


def test_thinking_tool_loop_keeps_signatures(client: anthropic.Anthropic, fake: FakeAnthropic) -> None:
    thinking = {"type": "enabled", "budget_tokens": 2048}
    fake.script(Reply(reasoning="The user wants Paris weather.", tool_calls=(
        Reply.call("get_weather", {"city": "Paris"}).tool_calls)), Reply.say("Sunny in Paris."))
    question = {"role": "user", "content": "Weather in Paris?"}
    with client.messages.stream(model=MODEL, max_tokens=4096, thinking=thinking, tools=[WEATHER],
                                messages=[question], metadata={"user_id": "u-7"}) as stream:
        first = stream.get_final_message()
    sent = fake.last.body
    assert sent["thinking"] == thinking and sent["metadata"] == {"user_id": "u-7"}
    assert sent["max_tokens"] == 4096
    assert [b.type for b in first.content] == ["thinking", "tool_use"]
    signature = first.content[0].signature
    assert signature and first.content[0].thinking == "The user wants Paris weather."
    assert first.stop_reason == "tool_use"
    call = first.content[1]

    second = client.messages.create(model=MODEL, max_tokens=4096, thinking=thinking, tools=[WEATHER], messages=[
        question, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21C"}]}])
    assert second.content[-1].text == "Sunny in Paris."
    assistant = fake.last.body["messages"][1]["content"]
    assert assistant[0] == {"type": "thinking", "thinking": "The user wants Paris weather.", "signature": signature}
    assert assistant[1]["type"] == "tool_use" and assistant[1]["id"] == call.id
    result = fake.last.body["messages"][2]["content"][0]
    assert result["type"] == "tool_result" and result["tool_use_id"] == call.id
