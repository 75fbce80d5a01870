"""The Anthropic fake is faithful: the official ``anthropic`` SDK parses its bodies and streams, and its event
sequences and payload shapes match the recorded fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest
from scillm_anthropic_helpers import HTTP

from scillm_core.testing import Reply, ToolCallSpec
from scillm_core.testing.fake_anthropic import FakeAnthropic

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as server:
        yield server  # type: ignore[misc]


@pytest.fixture
def sdk(fake: FakeAnthropic) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fake.url, api_key="sk-ant-api03-test", max_retries=0, timeout=10)


WEATHER = {"name": "get_weather", "description": "Weather", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
FULL = Reply(text="It is sunny.", reasoning="The user wants weather; call the tool.",
             tool_calls=(ToolCallSpec("get_weather", {"city": "Paris"}),), prompt_tokens=21, completion_tokens=13)


def test_sdk_parses_non_streaming_message(sdk: anthropic.Anthropic, fake: FakeAnthropic) -> None:
    fake.script(FULL)
    message = sdk.messages.create(model="claude-haiku-4-5", max_tokens=100, tools=[WEATHER],
                                  messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[0].thinking == FULL.reasoning and message.content[0].signature
    assert message.content[2].input == {"city": "Paris"} and message.content[2].id.startswith("toolu_")
    assert message.stop_reason == "tool_use"
    assert message.usage.input_tokens == 21 and message.usage.output_tokens == 13
    assert "sk-ant-api03-test" in (fake.last.headers.get("x-api-key"), fake.last.headers.get("authorization", "")[7:])


def test_sdk_parses_stream(sdk: anthropic.Anthropic, fake: FakeAnthropic) -> None:
    fake.script(FULL)
    with sdk.messages.stream(model="claude-haiku-4-5", max_tokens=100, tools=[WEATHER],
                             messages=[{"role": "user", "content": "Weather in Paris?"}]) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "thinking" in events and "signature" in events and "input_json" in events and "text" in events
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[0].thinking == FULL.reasoning and final.content[0].signature
    assert final.content[1].text == "It is sunny." and final.content[2].input == {"city": "Paris"}
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 13  # cumulative in message_delta


def test_sdk_raises_on_error_statuses(sdk: anthropic.Anthropic, fake: FakeAnthropic) -> None:
    fake.script(Reply.fail(529, "Overloaded"))
    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 529 and caught.value.body["error"]["type"] == "overloaded_error"
    assert caught.value.response.headers["x-should-retry"] == "true"
    fake.script(Reply.fail(429, "slow down", headers={"retry-after": "3"}))
    with pytest.raises(anthropic.RateLimitError) as limited:
        sdk.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert limited.value.response.headers["retry-after"] == "3"


def test_sdk_raises_on_midstream_error(sdk: anthropic.Anthropic, fake: FakeAnthropic) -> None:
    fake.script(Reply.say("Hello there, streaming", error_after=4))
    seen: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        with sdk.messages.stream(model="claude-haiku-4-5", max_tokens=10,
                                 messages=[{"role": "user", "content": "hi"}]) as stream:
            seen.extend(event.type for event in stream)
    assert "overloaded_error" in str(caught.value.body)
    assert "message_stop" not in seen


def test_fake_enforces_auth_and_rejects_what_anthropic_rejects(fake: FakeAnthropic) -> None:
    url = fake.url + "/v1/messages"
    ok = {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    no_version = HTTP.post(url, json=ok, headers={"x-api-key": "k"})
    assert no_version.status_code == 400
    no_key = HTTP.post(url, json=ok, headers={"anthropic-version": "2023-06-01"})
    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    for bad, needle in [({**ok, "max_tokens": None}, "max_tokens"),
                        ({**ok, "messages": [{"role": "system", "content": "x"}]}, "role"),
                        ({**ok, "temperature": 1.5}, "temperature"),
                        ({**ok, "messages": [{"role": "user", "content": [
                            {"type": "tool_result", "tool_use_id": "toolu_x", "content": "r"}]}]}, "tool_use_id")]:
        response = HTTP.post(url, json=bad, headers=headers)
        assert response.status_code == 400, bad
        assert response.json()["type"] == "error" and needle in response.json()["error"]["message"]


def test_fake_takes_thinking_effort_and_strict_tools_as_each_generation_does(fake: FakeAnthropic) -> None:
    """provider-protocols.md §3.2: a thinking budget is at least 1024 and below max_tokens; adaptive thinking is the
    4.6 generation's, an effort low to high from 4.5, max from 4.6 and xhigh from 4.7; temperature stays unset (or
    1) with thinking, and the tool choice is not forced; a tool's ``strict`` and ``output_config.format`` are
    structured outputs (from 4.5); a custom tool has no other keys."""
    url = fake.url + "/v1/messages"
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    hi = [{"role": "user", "content": "hi"}]
    strict = {**WEATHER, "strict": True}
    accepted = [{"model": "claude-opus-4-6", "max_tokens": 100, "thinking": {"type": "adaptive"},
                 "output_config": {"effort": "high"}, "messages": hi},
                {"model": "claude-sonnet-4-5", "max_tokens": 2048, "temperature": 1,
                 "thinking": {"type": "enabled", "budget_tokens": 1024}, "messages": hi},
                {"model": "claude-haiku-4-5", "max_tokens": 100, "tools": [strict], "messages": hi},
                {"model": "claude-sonnet-4-20250514", "max_tokens": 100, "thinking": {"type": "disabled"},
                 "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_weather"}, "messages": hi},
                {"model": "claude-opus-4-7", "max_tokens": 100, "thinking": {"type": "adaptive"},
                 "output_config": {"effort": "xhigh"}, "messages": hi},
                {"model": "claude-sonnet-4-6", "max_tokens": 100, "output_config": {"effort": "max"}, "messages": hi},
                {"model": "claude-haiku-4-5", "max_tokens": 100, "output_config": {"format": {
                    "type": "json_schema", "schema": {"type": "object"}}}, "messages": hi}]
    for body in accepted:
        fake.script(Reply.say("ok"))
        assert HTTP.post(url, json=body, headers=headers).status_code == 200, body
    refused = [({"model": "claude-sonnet-4-5", "max_tokens": 100, "thinking": {"type": "adaptive"}}, "adaptive"),
               ({"model": "claude-sonnet-4-5", "max_tokens": 2048, "thinking": {"type": "enabled",
                                                                                "budget_tokens": 512}}, "1024"),
               ({"model": "claude-sonnet-4-5", "max_tokens": 1024, "thinking": {"type": "enabled",
                                                                                "budget_tokens": 1024}}, "max_tokens"),
               ({"model": "claude-opus-4-6", "max_tokens": 100, "thinking": {"type": "adaptive"},
                 "temperature": 0.2}, "temperature"),
               ({"model": "claude-opus-4-6", "max_tokens": 100, "output_config": {"effort": "extreme"}}, "effort"),
               ({"model": "claude-sonnet-4-20250514", "max_tokens": 100, "output_config": {"effort": "low"}},
                "effort"),
               ({"model": "claude-opus-4-6", "max_tokens": 100, "output_config": {"effort": "xhigh"}}, "xhigh"),
               ({"model": "claude-opus-4-5", "max_tokens": 100, "output_config": {"effort": "max"}}, "max"),
               ({"model": "claude-sonnet-4-20250514", "max_tokens": 100, "output_config": {"format": {
                   "type": "json_schema", "schema": {"type": "object"}}}}, "output_config.format"),
               ({"model": "claude-opus-4-1", "max_tokens": 100, "output_config": {"format": {
                   "type": "json_schema", "schema": {"type": "object"}}}}, "output_config.format"),
               ({"model": "claude-sonnet-4-5", "max_tokens": 2048, "thinking": {"type": "enabled",
                 "budget_tokens": 1024}, "tools": [WEATHER], "tool_choice": {"type": "any"}}, "tool_choice"),
               ({"model": "claude-sonnet-4-20250514", "max_tokens": 100, "tools": [strict]}, "strict"),
               ({"model": "claude-opus-4-6", "max_tokens": 100, "tools": [{**WEATHER, "parameters": {}}]},
                "parameters")]
    for bad, needle in refused:
        response = HTTP.post(url, json={**bad, "messages": hi}, headers=headers)
        assert response.status_code == 400, bad
        assert response.json()["error"]["type"] == "invalid_request_error" and needle in response.text, bad


def test_fake_rejects_a_thinking_tool_loop_that_dropped_its_thinking_blocks(fake: FakeAnthropic) -> None:
    """With thinking on, the assistant turn that called the tool after thinking must come back starting with its
    signed thinking block, as the real API insists (the recorded round trip sends it back; dropping it is a 400).
    A tool call the fake made without thinking (scripted without reasoning) is not held to it."""
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    call = {"type": "tool_use", "id": "toolu_01think", "name": "weather", "input": {"location": "Florence"}}
    thought = {"type": "thinking", "thinking": "Use the tool.", "signature": "Es8DCkYICxgC"}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "sunny"}]}
    unthought = {**call, "id": "toolu_01plain"}
    fake.script(Reply(reasoning="Use the tool.", tool_calls=(ToolCallSpec("weather", call["input"], call["id"]),)),
                Reply(tool_calls=(ToolCallSpec("weather", call["input"], unthought["id"]),)))
    for _ in range(2):
        asked = {"model": "claude-sonnet-4-5", "max_tokens": 2048, "messages": [{"role": "user", "content": "Hi"}]}
        assert HTTP.post(fake.url + "/v1/messages", json=asked, headers=headers).status_code == 200

    def body(assistant: list[dict[str, Any]], thinking: bool = True) -> dict[str, Any]:
        return {"model": "claude-sonnet-4-5", "max_tokens": 2048, "tools": [WEATHER],
                **({"thinking": {"type": "enabled", "budget_tokens": 1024}} if thinking else {}),
                "messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": assistant},
                             result]}

    dropped = HTTP.post(fake.url + "/v1/messages", json=body([call]), headers=headers)
    assert dropped.status_code == 400
    assert dropped.json()["error"]["message"].startswith("messages.1.content.0.type: Expected `thinking`")
    unsigned = HTTP.post(fake.url + "/v1/messages", json=body([{**thought, "signature": ""}, call]), headers=headers)
    assert unsigned.status_code == 400 and "signature" in unsigned.json()["error"]["message"]
    plain = {**body([unthought]), "messages": [*body([unthought])["messages"][:2], {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": unthought["id"], "content": "sunny"}]}]}
    for fine in (body([thought, call]), body([call], thinking=False), plain):
        assert HTTP.post(fake.url + "/v1/messages", json=fine, headers=headers).status_code == 200


# -- the fake's stream against the recorded fixtures --------------------------------------------------------------

def _parse(raw: bytes) -> list[tuple[str, bytes, Any]]:
    events = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = dict(line.split(b": ", 1) for line in block.split(b"\n") if line)
        if lines:
            events.append((lines[b"event"].decode(), lines[b"data"], orjson.loads(lines[b"data"])))
    return events


def _shape(events: list[tuple[str, bytes, Any]]) -> list[tuple[str, str | None]]:
    """Event sequence with runs of the same delta type collapsed (chunk counts differ, order must not)."""
    out: list[tuple[str, str | None]] = []
    for name, _, data in events:
        key = (name, (data.get("content_block") or data.get("delta") or {}).get("type"))
        if not out or out[-1] != key or name != "content_block_delta":
            out.append(key)
    return out


def _fake_stream(fake: FakeAnthropic, reply: Reply) -> list[tuple[str, bytes, Any]]:
    fake.script(reply)
    response = HTTP.post(fake.url + "/v1/messages", headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
                          json={"model": "claude-haiku-4-5-20251001", "max_tokens": 100, "stream": True,
                                "messages": [{"role": "user", "content": "hi"}]})
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    return _parse(response.content)


@pytest.mark.parametrize(("fixture", "reply"), [
    ("messages_stream_text_sonnet45.sse", Reply.say("Pelican names: Pouch and Scoop.")),
    ("messages_stream_thinking_haiku45.sse", Reply.say("1. Pouch\n2. Pelé", reasoning="The user wants two names.")),
    ("messages_stream_tool_use_haiku45.sse", Reply.call("get_weather", {"location": "San Francisco, CA"})),
    ("messages_stream_thinking_tool_use.sse", Reply(reasoning="Use the weather tool.",
                                                    tool_calls=(ToolCallSpec("weather", {"location": "Florence"}),))),
])
def test_fake_stream_matches_fixture(fake: FakeAnthropic, fixture: str, reply: Reply) -> None:
    recorded = _parse((FIXTURES / fixture).read_bytes())
    ours = _fake_stream(fake, reply)
    assert _shape(ours) == _shape(recorded)
    by_name = {name: data for name, _, data in recorded}
    for name, _, data in ours:  # same payload keys as the recording, event by event type
        assert set(data) == set(by_name[name]), name
        assert data["type"] == name
    start, ref_start = ours[0][2]["message"], recorded[0][2]["message"]
    assert set(start) <= set(ref_start) | {"stop_details"} and set(start["usage"]) == set(ref_start["usage"])
    assert ours[-2][2]["usage"]["output_tokens"] == reply.completion_tokens  # cumulative count at the end
    ping = next(raw for name, raw, _ in ours if name == "ping")
    assert ping == next(raw for name, raw, _ in recorded if name == "ping") == b'{"type": "ping"}'
    assert any(raw.endswith(b" }") for _, raw, _ in ours)  # padded like the real API
    if reply.tool_calls:
        first = next(d for n, _, d in ours if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta")
        assert first["delta"]["partial_json"] == ""


def test_fake_midstream_error_matches_fixture(fake: FakeAnthropic) -> None:
    recorded = _parse((FIXTURES / "messages_stream_midstream_error_overloaded.sse").read_bytes())
    ours = _fake_stream(fake, Reply.say("Hello", error_after=4))
    assert [n for n, _, _ in ours] == [n for n, _, _ in recorded]
    assert ours[-1][1] == recorded[-1][1]  # byte-identical error event
