"""OpenAI <-> Messages translation, both ways, as pure functions (what reaches Anthropic and what clients get)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
from scillm_anthropic import (
    ANSWER_TOOL,
    DEFAULT_MAX_TOKENS,
    THINKING_BUDGETS,
    StreamTranslator,
    claude_version,
    error_from_event,
    error_from_status,
    from_messages_response,
    sanitize_tool_call_id,
    to_messages_body,
)

from scillm_core import ChatRequest, errors, structure, unstructure
from scillm_core.testing.contract import TINY_PNG_B64, TINY_PNG_URL
from scillm_core.upstream import SSEEvent, iter_sse

FIXTURES = Path(__file__).parent / "fixtures"  # copies of shared/fixtures/anthropic (see fixtures/README.md)


def req(**body: Any) -> ChatRequest:
    body.setdefault("model", "claude-haiku-4-5")
    return structure(body, ChatRequest)


def body_for(**body: Any) -> dict[str, Any]:
    return to_messages_body(req(**body), "claude-haiku-4-5")


# -- request --------------------------------------------------------------------------------------------------------

def test_system_and_developer_messages_become_top_level_system() -> None:
    body = body_for(messages=[{"role": "system", "content": "Be brief."},
                              {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
                              {"role": "user", "content": "Weather?"}])
    assert body["system"] == [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use metric units."}]
    assert body["messages"] == [{"role": "user", "content": "Weather?"}]
    assert body["max_tokens"] == DEFAULT_MAX_TOKENS


def test_parameters_max_tokens_temperature_stop() -> None:
    body = body_for(messages=[{"role": "user", "content": "hi"}], max_completion_tokens=300, temperature=1.7,
                    top_p=0.9, stop=["END", "###"], seed=3, user="alice", stream=True,
                    stream_options={"include_usage": True})
    assert body["max_tokens"] == 300 and body["temperature"] == 1.0 and body["top_p"] == 0.9
    assert body["stop_sequences"] == ["END", "###"] and body["stream"] is True
    assert body["metadata"] == {"user_id": "alice"}
    assert not {"seed", "user", "stream_options", "stop", "max_completion_tokens"} & set(body)
    assert body_for(messages=[{"role": "user", "content": "hi"}], temperature=-1)["temperature"] == 0.0


def test_images_data_url_and_https_url() -> None:
    body = body_for(messages=[{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": TINY_PNG_URL}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}}]}])
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "Compare"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": TINY_PNG_B64}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]


def test_unsupported_image_type_is_a_400_naming_the_part() -> None:
    with pytest.raises(errors.InvalidRequest) as caught:
        body_for(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}]}])
    assert caught.value.param == "$.messages[0].content[0].image_url.url"
    assert "image/tiff" in caught.value.message


def test_pdf_file_part_becomes_document_block() -> None:
    pdf = base64.b64encode(b"%PDF-1.4 tiny").decode()
    text = base64.b64encode(b"plain notes").decode()
    body = body_for(messages=[{"role": "user", "content": [
        {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{pdf}", "filename": "paper.pdf"}},
        {"type": "file", "file": {"file_data": f"data:text/plain;base64,{text}"}},
        {"type": "text", "text": "Summarise"}]}])
    assert body["messages"][0]["content"][:2] == [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": pdf},
         "title": "paper.pdf"},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain notes"}}]
    with pytest.raises(errors.InvalidRequest) as caught:
        body_for(messages=[{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-abc"}}]}])
    assert caught.value.param == "$.messages[0].content[0].file"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_tools_tool_choice_and_parallel() -> None:
    body = body_for(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER], tool_choice="required",
                    parallel_tool_calls=False)
    assert body["tools"] == [{"name": "get_weather", "description": "Weather",
                              "input_schema": WEATHER["function"]["parameters"]}]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    named = body_for(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
                     tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named["tool_choice"] == {"type": "tool", "name": "get_weather"}
    assert body_for(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
                    tool_choice="none")["tool_choice"] == {"type": "none"}
    assert "tool_choice" not in body_for(messages=[{"role": "user", "content": "hi"}], tools=[WEATHER])


def test_tool_round_trip_all_results_in_one_user_turn_with_sanitised_ids() -> None:
    odd_id = "functions.get_weather:0"  # Kimi-style ids are not valid for Anthropic
    body = body_for(tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": odd_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": odd_id, "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "snow"}]},
        {"role": "user", "content": "Thanks, summarise."}])
    clean = sanitize_tool_call_id(odd_id)
    assert clean != odd_id and clean == sanitize_tool_call_id(odd_id) and len(clean) <= 64
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": clean, "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": clean, "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "snow"}]},
            {"type": "text", "text": "Thanks, summarise."}]}]


def test_sanitised_ids_stay_distinct_and_bounded() -> None:
    assert sanitize_tool_call_id("a.b") != sanitize_tool_call_id("a:b")
    assert len(sanitize_tool_call_id("x" * 200)) <= 64
    assert sanitize_tool_call_id("toolu_01ABC-def") == "toolu_01ABC-def"


def test_bad_tool_arguments_are_a_400_with_the_path() -> None:
    with pytest.raises(errors.InvalidRequest) as caught:
        body_for(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}])
    assert caught.value.param == "$.messages[1].tool_calls[0].function.arguments"


def test_reasoning_effort_and_json_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    body = body_for(messages=[{"role": "user", "content": "hi"}], reasoning_effort="high", temperature=0.2,
                    max_tokens=1000, response_format={"type": "json_schema",
                                                      "json_schema": {"name": "x", "schema": schema}})
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 4096}
    assert body["max_tokens"] > 4096  # the budget must stay below max_tokens
    assert "temperature" not in body  # thinking requires the default temperature
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    with pytest.raises(errors.InvalidRequest):
        body_for(messages=[{"role": "user", "content": "hi"}], reasoning_effort="extreme")


def test_thinking_blocks_round_trip_unchanged() -> None:
    data = orjson.loads((FIXTURES / "messages_thinking_tool_roundtrip.json").read_bytes())[0]["response"]["body"]
    response = from_messages_response(data)
    message = response.choices[0].message
    assert message.extra["reasoning_content"].startswith("The user is asking about the weather")
    assert response.choices[0].finish_reason == "tool_calls"
    # the client sends the assistant message back as it got it (extras included)
    wire = unstructure(message)
    body = body_for(tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Florence?"}, wire,
        {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "sunny"}])
    thinking, tool_use = body["messages"][1]["content"]
    assert thinking == {"type": "thinking", "thinking": data["content"][0]["thinking"],
                        "signature": data["content"][0]["signature"]}
    assert tool_use["id"] == data["content"][1]["id"] and tool_use["input"] == {"location": "Florence, Italy"}



def test_reasoning_effort_leaves_thinking_off_for_a_tool_turn_sent_back_without_its_thinking_blocks() -> None:
    """A chat client that does not send ``thinking_blocks`` back (openai-agents' chat completions model) would get
    Anthropic's 400 for the tool loop's next call with thinking on; that call goes without thinking instead, and
    thinking is back once the final assistant turn has no tool call (or came back with its blocks)."""
    call = {"id": "toolu_01", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    loop = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "toolu_01", "content": "sunny"}]
    body = body_for(tools=[WEATHER], messages=loop, reasoning_effort="low", temperature=0.3, max_tokens=500)
    assert "thinking" not in body and body["max_tokens"] == 500 and body["temperature"] == 0.3
    blocks = [{"type": "thinking", "thinking": "Use the tool.", "signature": "Es8DCkYICxgC"}]
    kept = body_for(tools=[WEATHER], reasoning_effort="low", messages=[
        loop[0], {**loop[1], "thinking_blocks": blocks}, loop[2]])
    assert kept["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert kept["messages"][1]["content"][0] == blocks[0]
    later = body_for(tools=[WEATHER], reasoning_effort="low", messages=[
        *loop, {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "And Rome?"}])
    assert later["thinking"] == {"type": "enabled", "budget_tokens": 1024}


@pytest.mark.parametrize(("model", "version"), [
    ("claude-opus-4-6", (4, 6)), ("claude-sonnet-4-6-20260217", (4, 6)), ("claude-sonnet-4-5-20250929", (4, 5)),
    ("claude-haiku-4-5", (4, 5)), ("claude-sonnet-4-20250514", (4, 0)), ("claude-opus-4-1", (4, 1)),
    ("claude-3-7-sonnet-latest", (3, 7)), ("claude-3-5-haiku-20241022", (3, 5)), ("claude-opus-5", (5, 0)),
    ("my-proxy-model", None)])
def test_the_generation_is_read_from_the_model_name(model: str, version: tuple[int, int] | None) -> None:
    assert claude_version(model) == version


@pytest.mark.parametrize(("effort", "level", "from_4_7"), [
    ("minimal", "low", "low"), ("low", "low", "low"), ("medium", "medium", "medium"), ("high", "high", "high"),
    ("xhigh", "max", "xhigh"), ("max", "max", "max"), ("ultra", "max", "max")])
def test_reasoning_effort_is_adaptive_thinking_with_an_effort_on_the_4_6_generation(effort: str, level: str,
                                                                                     from_4_7: str) -> None:
    """provider-protocols.md §3.2/§9.6: 4.6-generation models think adaptively at an ``output_config.effort``;
    earlier ones with a ``budget_tokens`` (below ``max_tokens``). Temperature is left out with thinking on either
    way, and a json_schema's format shares ``output_config`` with the effort. 4.6 takes low to max, so ``xhigh``
    is ``max`` there (§6.2's xhigh/ultra -> max); from 4.7 on ``xhigh`` is sent as it is; ``ultra`` is ``max``."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    request = req(messages=[{"role": "user", "content": "hi"}], reasoning_effort=effort, temperature=0.2,
                  max_tokens=1000, response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                                           "schema": schema}})
    body = to_messages_body(request, "claude-opus-4-6")
    assert body["thinking"] == {"type": "adaptive"} and body["max_tokens"] == 1000 and "temperature" not in body
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": schema}, "effort": level}
    assert to_messages_body(request, "claude-opus-4-7")["output_config"]["effort"] == from_4_7
    earlier = to_messages_body(request, "claude-sonnet-4-5")
    assert earlier["thinking"] == {"type": "enabled", "budget_tokens": THINKING_BUDGETS[effort]}
    assert earlier["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert earlier["max_tokens"] > THINKING_BUDGETS[effort] and "temperature" not in earlier
    assert "thinking" not in to_messages_body(attrs.evolve(request, reasoning_effort="none"), "claude-opus-4-6")


def test_a_messages_clients_own_thinking_and_effort_go_as_sent_and_adaptive_fits_an_earlier_model() -> None:
    """A /v1/messages request translated for Anthropic keeps the client's own ``thinking`` and effort (its effort,
    also read as ``reasoning_effort`` for other upstreams, adds nothing); adaptive thinking sent to a model before
    the 4.6 generation (a group's fallback) becomes a budget of that effort, and an ``xhigh`` effort sent to a
    model before 4.7 is that model's top effort, ``max``."""
    native = {"thinking": {"type": "adaptive"}, "output_config": {"effort": "xhigh"}}
    request = req(messages=[{"role": "user", "content": "hi"}], reasoning_effort="high", max_tokens=2000,
                  scillm={"anthropic_native": native})
    body = to_messages_body(request, "claude-opus-4-7")
    assert body["thinking"] == {"type": "adaptive"} and body["output_config"] == {"effort": "xhigh"}
    assert to_messages_body(request, "claude-opus-4-6")["output_config"] == {"effort": "max"}
    earlier = to_messages_body(request, "claude-sonnet-4-5")
    assert earlier["thinking"] == {"type": "enabled", "budget_tokens": THINKING_BUDGETS["xhigh"]}
    assert "output_config" not in earlier and earlier["max_tokens"] > THINKING_BUDGETS["xhigh"]
    effort_only = req(messages=[{"role": "user", "content": "hi"}], reasoning_effort="medium",
                      scillm={"anthropic_native": {"output_config": {"effort": "medium"}}})
    assert "thinking" not in to_messages_body(effort_only, "claude-opus-4-6")  # effort asked, not thinking


def test_strict_tools_go_to_models_with_structured_outputs_and_are_dropped_before() -> None:
    """provider-protocols.md §9.5: structured outputs are GA from the 4.5 generation, which takes a tool's
    ``strict: true``; earlier models get the tool without it (no strict tool use there without a beta)."""
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    request = req(messages=[{"role": "user", "content": "hi"}], tools=[strict, WEATHER])
    tools = to_messages_body(request, "claude-sonnet-4-5")["tools"]
    assert tools[0]["strict"] is True and "strict" not in tools[1]
    assert to_messages_body(request, "claude-opus-4-6")["tools"][0]["strict"] is True
    for earlier in ("claude-sonnet-4-20250514", "claude-opus-4-1", "claude-3-7-sonnet-latest"):
        assert "strict" not in to_messages_body(request, earlier)["tools"][0]
        assert to_messages_body(request, earlier)["tools"][0]["input_schema"] == WEATHER["function"]["parameters"]


def test_a_json_schema_before_structured_outputs_is_an_answer_tool_and_unknown_names_keep_the_format() -> None:
    """Before the 4.5 generation the schema is a forced tool; a name without a version keeps
    ``output_config.format``; ``json_object`` stays a system instruction; the tool choice follows the client's
    (``none``: its tools left out, ``parallel_tool_calls: false`` kept); a /v1/messages client's own format does
    not reach an earlier model."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "description": "The a.", "schema": schema}}
    hi = [{"role": "user", "content": "hi"}]
    body = to_messages_body(req(messages=hi, response_format=fmt), "claude-3-7-sonnet-latest")
    assert body["tools"] == [{"name": ANSWER_TOOL, "input_schema": schema, "description": (
        "Give your final answer by calling this tool: its input is the answer. The a.")}]
    assert body["tool_choice"] == {"type": "tool", "name": ANSWER_TOOL} and "output_config" not in body
    for model in ("my-proxy-model", "claude-sonnet-4-5"):
        assert to_messages_body(req(messages=hi, response_format=fmt), model)["output_config"] == {
            "format": {"type": "json_schema", "schema": schema}}
    plain = to_messages_body(req(messages=hi, response_format={"type": "json_object"}), "claude-3-7-sonnet-latest")
    assert "tools" not in plain and "JSON object" in plain["system"][-1]["text"]
    none = to_messages_body(req(messages=hi, response_format=fmt, tools=[WEATHER], tool_choice="none",
                                parallel_tool_calls=False), "claude-opus-4-1")
    assert [t["name"] for t in none["tools"]] == [ANSWER_TOOL]
    assert none["tool_choice"] == {"type": "tool", "name": ANSWER_TOOL, "disable_parallel_tool_use": True}
    named = to_messages_body(req(messages=hi, response_format=fmt, tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "get_weather"}}), "claude-opus-4-1")
    assert named["tool_choice"] == {"type": "tool", "name": "get_weather"} and len(named["tools"]) == 1
    native = req(messages=hi, response_format=fmt, scillm={"anthropic_native": {"output_config": {
        "format": {"type": "json_schema", "schema": schema}}}})
    assert "output_config" not in to_messages_body(native, "claude-sonnet-4-20250514")
    assert to_messages_body(native, "claude-sonnet-4-5")["output_config"]["format"]["schema"] == schema


def test_the_answer_tools_input_is_the_content_and_the_clients_calls_stay_calls() -> None:
    data = {"type": "message", "id": "msg_1", "model": "claude-sonnet-4-20250514", "stop_reason": "tool_use",
            "content": [{"type": "text", "text": "Let me see."},
                        {"type": "tool_use", "id": "toolu_1", "name": ANSWER_TOOL, "input": {"a": 1}}]}
    answer = from_messages_response(data, answer_tool=ANSWER_TOOL)
    assert answer.choices[0].message.content == '{"a":1}' and answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.tool_calls is None
    both = {**data, "content": [*data["content"], {"type": "tool_use", "id": "toolu_2", "name": "get_weather",
                                                   "input": {"city": "Oslo"}}]}
    answer = from_messages_response(both, answer_tool=ANSWER_TOOL)
    assert answer.choices[0].finish_reason == "tool_calls" and answer.choices[0].message.content == '{"a":1}'
    assert [c.function.name for c in answer.choices[0].message.tool_calls or ()] == ["get_weather"]
    assert from_messages_response(data).choices[0].message.tool_calls[0].function.name == ANSWER_TOOL  # type: ignore[index]


# -- response -------------------------------------------------------------------------------------------------------

def test_response_text_tool_calls_and_usage() -> None:
    data = orjson.loads((FIXTURES / "messages_tool_use_roundtrip.json").read_bytes())[0]["response"]["body"]
    response = from_messages_response(data)
    call = response.choices[0].message.tool_calls[0]
    assert call.id == "toolu_013DU6hV4C1M8dJ32ybQFAFi" and call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"location": "SF", "units": "c"}
    assert response.choices[0].message.content is None
    assert response.usage.prompt_tokens == 597 and response.usage.completion_tokens == 71
    assert response.usage.total_tokens == 668


def test_usage_counts_cache_tokens_in_prompt() -> None:
    response = from_messages_response({"type": "message", "id": "m", "model": "claude", "stop_reason": "end_turn",
                                       "content": [{"type": "text", "text": "ok"}],
                                       "usage": {"input_tokens": 10, "cache_creation_input_tokens": 5,
                                                 "cache_read_input_tokens": 100, "output_tokens": 3}})
    usage = unstructure(response.usage)
    assert usage["prompt_tokens"] == 115 and usage["total_tokens"] == 118
    assert usage["prompt_tokens_details"] == {"cached_tokens": 100}


@pytest.mark.parametrize(("stop", "finish"), [("end_turn", "stop"), ("stop_sequence", "stop"),
                                              ("max_tokens", "length"), ("tool_use", "tool_calls"),
                                              ("refusal", "content_filter"), ("pause_turn", "stop")])
def test_stop_reasons(stop: str, finish: str) -> None:
    response = from_messages_response({"type": "message", "content": [{"type": "text", "text": "x"}],
                                       "stop_reason": stop, "usage": {"input_tokens": 1, "output_tokens": 1}})
    assert response.choices[0].finish_reason == finish


# -- streaming ------------------------------------------------------------------------------------------------------

async def _events(name: str) -> list[SSEEvent]:
    raw = (FIXTURES / name).read_bytes()

    async def chunks() -> Any:
        for i in range(0, len(raw), 97):  # odd chunking: events split across reads
            yield raw[i:i + 97]

    return [e async for e in iter_sse(chunks())]


async def _translate(name: str, include_usage: bool = True) -> list[dict[str, Any]]:
    translator = StreamTranslator(provider="anthropic", model="claude", include_usage=include_usage)
    out: list[dict[str, Any]] = []
    for event in await _events(name):
        out.extend(unstructure(c) for c in translator.feed(event.event, orjson.loads(event.data)))
    assert translator.stopped
    return out


@pytest.mark.anyio
async def test_stream_text_fixture() -> None:
    chunks = await _translate("messages_stream_stop_sequence.sse")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.startswith("\ndef pelican():")
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")] \
        == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 28  # cumulative, final
    assert chunks[-1]["usage"]["prompt_tokens"] == 16
    assert all(c["id"] == "msg_01KozUDYHvRtgs3NLgG7jzN9" for c in chunks)
    assert not any(c["choices"] == [] for c in await _translate("messages_stream_stop_sequence.sse", False))


@pytest.mark.anyio
async def test_stream_thinking_then_tool_call_indexes_tool_ordinal() -> None:
    chunks = await _translate("messages_stream_thinking_tool_use.sse")
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    assert reasoning.startswith("The user is asking for weather information for Florence")
    signed = [d["thinking_blocks"][0] for d in deltas if "thinking_blocks" in d]
    assert len(signed) == 1 and signed[0]["thinking"] == reasoning and signed[0]["signature"]
    calls = [tc for d in deltas for tc in d.get("tool_calls") or []]
    assert {tc["index"] for tc in calls} == {0}  # the tool is content block 1 but tool call 0
    assert calls[0]["id"].startswith("toolu_") and calls[0]["function"]["name"] == "weather"
    arguments = "".join(tc["function"].get("arguments") or "" for tc in calls)
    assert orjson.loads(arguments) == {"location": "Florence, Italy"}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] \
        == ["tool_calls"]


@pytest.mark.anyio
async def test_stream_refusal_maps_to_content_filter() -> None:
    chunks = await _translate("messages_stream_refusal.sse")
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] \
        == ["content_filter"]


@pytest.mark.anyio
async def test_stream_midstream_error_raises_overloaded() -> None:
    translator = StreamTranslator(provider="anthropic", model="claude-x", include_usage=False)
    texts = []
    with pytest.raises(errors.UpstreamUnavailable) as caught:
        for event in await _events("messages_stream_midstream_error_overloaded.sse"):
            for chunk in translator.feed(event.event, orjson.loads(event.data)):
                texts.append(chunk.choices[0].delta.content)
    assert "Hello" in texts
    assert caught.value.code == "overloaded" and "Overloaded" in caught.value.message
    assert "anthropic (claude-x)" in caught.value.message


def test_error_bodies_from_fixtures() -> None:
    overloaded = orjson.loads((FIXTURES / "error_529_overloaded.json").read_bytes())
    exc = error_from_status(529, orjson.dumps(overloaded["body"]), overloaded["headers"], provider="anthropic",
                            model="m")
    assert isinstance(exc, errors.UpstreamUnavailable) and exc.status == 503 and exc.retryable
    bad = orjson.loads((FIXTURES / "error_400_invalid_request.json").read_bytes())["response"]
    exc = error_from_status(400, orjson.dumps(bad["body"]), bad["headers"], provider="anthropic", model="m")
    assert isinstance(exc, errors.UpstreamBadRequest) and not exc.retryable
    assert "unexpected `tool_use_id`" in exc.message
    limited = error_from_status(429, b'{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}',
                                {"retry-after": "12"}, provider="anthropic", model="m")
    assert isinstance(limited, errors.UpstreamRateLimited) and limited.headers["retry-after"] == "12"
    auth = error_from_status(401, b'{"type":"error","error":{"type":"authentication_error",'
                                  b'"message":"invalid x-api-key sk-ant-api03-secret"}}', {},
                             provider="anthropic", model="m", secrets=("sk-ant-api03-secret",))
    assert isinstance(auth, errors.UpstreamAuthError) and "sk-ant-api03-secret" not in auth.message
    too_long = error_from_status(400, b'{"type":"error","error":{"type":"invalid_request_error",'
                                      b'"message":"prompt is too long: 250000 tokens > 200000 maximum"}}', {},
                                 provider="anthropic", model="m")
    assert too_long.code == "context_length_exceeded"
    assert isinstance(error_from_event({"type": "error", "error": {"type": "rate_limit_error", "message": "x"}},
                                       provider="p", model="m"), errors.UpstreamRateLimited)


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("messages_stream_*.sse")
                                        if "error" not in p.name))
async def test_every_recorded_stream_translates_faithfully(name: str) -> None:
    """Text and tool arguments the client assembles equal what the recording carried, block by block."""
    events = [(e.event, orjson.loads(e.data)) for e in await _events(name)]
    text = "".join(d["delta"].get("text", "") for _, d in events if d["type"] == "content_block_delta")
    tools = [d["content_block"] for _, d in events if d["type"] == "content_block_start"
             and d["content_block"]["type"] == "tool_use"]
    chunks = await _translate(name)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == text
    calls = [tc for d in deltas for tc in d.get("tool_calls") or []]
    assert [tc["id"] for tc in calls if tc.get("id")] == [t["id"] for t in tools]
    for ordinal in range(len(tools)):
        arguments = "".join(tc["function"].get("arguments") or "" for tc in calls if tc["index"] == ordinal)
        assert isinstance(orjson.loads(arguments), dict)
    assert chunks[-1]["usage"]["completion_tokens"] == next(
        d["usage"]["output_tokens"] for _, d in reversed(events) if d["type"] == "message_delta")


def test_structured_output_body_matches_the_recorded_request() -> None:
    recorded = orjson.loads((FIXTURES / "messages_structured_output_json_schema.json").read_bytes())["request"]["body"]
    schema = recorded["output_config"]["format"]["schema"]
    body = to_messages_body(req(messages=[{"role": "user", "content": recorded["messages"][0]["content"]}],
                                max_tokens=1024, response_format={"type": "json_schema", "json_schema": {
                                    "name": "OrderItem", "schema": schema, "strict": True}}), recorded["model"])
    assert body == recorded
    text = from_messages_response(orjson.loads((FIXTURES / "messages_structured_output_json_schema.json")
                                               .read_bytes())["response"]["body"]).text
    assert orjson.loads(text)["product_name"] == "Green Tea"
