"""The Codex dialect both ways: recorded fixtures parse, the official openai SDK accepts the fake's stream, the
request body follows the backend's rules, and every failure shape maps to the right client error."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from scillm_codex.wire import DEFAULT_INSTRUCTIONS, StreamState, to_codex_body

from scillm_core import ChatRequest, errors, structure
from scillm_core.testing import Reply
from scillm_core.testing.contract import WEATHER_TOOL
from scillm_core.testing.fake_codex import FakeCodex
from scillm_core.upstream import iter_sse

from .conftest import openai_client

FIXTURES = Path(__file__).parent / "fixtures"  # copies of shared/fixtures/responses_codex (see its README)


def replay(name: str, *, include_usage: bool = True) -> tuple[StreamState, list[Any]]:
    async def run() -> tuple[StreamState, list[Any]]:
        async def chunks() -> Any:
            yield (FIXTURES / name).read_bytes()

        state = StreamState(provider="codex", model="gpt-5", include_usage=include_usage)
        out: list[Any] = []
        async for event in iter_sse(chunks()):
            out += state.feed(orjson.loads(event.data))
        return state, out

    return asyncio.run(run())


def test_recorded_stream_with_reasoning_summary_and_function_call() -> None:
    state, chunks = replay("responses_stream_reasoning_summary_function_call.sse")
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(c.choices[0].delta.extra.get("reasoning_content", "") for c in chunks if c.choices)
    assert reasoning.startswith("**Getting weather info**") and "Florence" in reasoning
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert calls[0].id == "call_zgUaIBRPTwxxOusyyKw5NVMH" and calls[0].function.name == "weather"
    assert {tc.index for tc in calls} == {0}
    assert "".join(tc.function.arguments or "" for tc in calls) == '{"location":"Florence, Italy"}'
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == () and usage.prompt_tokens > 0 and usage.total_tokens > usage.prompt_tokens
    assert state.served_model == "gpt-5-2025-08-07"


def test_recorded_text_stream_and_codex_mock_streams() -> None:
    state, chunks = replay("responses_stream_text.sse", include_usage=False)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Oi!"
    assert all(c.usage is None for c in chunks) and state.usage.completion_tokens == 118
    assert state.usage.extra["completion_tokens_details"] == {"reasoning_tokens": 64}
    _, chunks = replay("codex_mock_stream_text.sse")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    # Codex's own mock server sends a function call only as output_item.done (no added/deltas)
    state, chunks = replay("codex_mock_stream_function_call.sse")
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert calls[0].id == "call-1" and calls[0].function.name == "shell"
    assert "".join(tc.function.arguments or "" for tc in calls) == '{"command":["ls"]}'
    assert state.finish_reason == "tool_calls"


def test_recorded_response_failed_is_rate_limit_with_retry_after() -> None:
    with pytest.raises(errors.UpstreamRateLimited) as caught:
        replay("codex_mock_stream_response_failed.sse")
    assert caught.value.status == 429 and caught.value.headers["retry-after"] == "11"
    assert "codex (gpt-5)" in caught.value.message


def test_recorded_error_bodies_map_to_the_error_tree() -> None:
    from scillm_codex.wire import error_from_body

    limit = orjson.loads((FIXTURES / "codex_error_429_usage_limit.json").read_bytes())
    error = error_from_body(429, orjson.dumps(limit["body"]), {}, provider="codex", model="gpt-5")
    assert isinstance(error, errors.UpstreamQuotaExceeded) and error.headers["retry-after"] == "1"  # resets_at passed
    assert "pro plan usage limit" in error.message
    for body in orjson.loads((FIXTURES / "codex_error_400_detail.json").read_bytes())["bodies"]:
        bad = error_from_body(400, orjson.dumps(body), {}, provider="codex", model="gpt-5")
        assert isinstance(bad, errors.UpstreamBadRequest) and body["detail"] in bad.message and bad.status == 400


def test_request_body_follows_the_backend_rules() -> None:
    request = structure({"model": "codex/gpt-5", "temperature": 0.2, "top_p": 0.5, "max_tokens": 99,
                         "reasoning_effort": "high", "tools": [WEATHER_TOOL], "tool_choice": "required",
                         "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {
                             "type": "object"}, "strict": True}},
                         "messages": [
                             {"role": "system", "content": "Be terse."},
                             {"role": "developer", "content": "Use metric units."},
                             {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                                                          {"type": "file", "file": {
                                                              "file_data": "data:application/pdf;base64,JVBERi0=",
                                                              "filename": "a.pdf"}}]},
                             {"role": "assistant", "content": None, "tool_calls": [
                                 {"id": "call_1", "type": "function",
                                  "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
                             {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 3}"},
                             {"role": "assistant", "content": "3 degrees."}]}, ChatRequest)
    body = to_codex_body(request, "gpt-5")
    assert body["instructions"] == "Be terse.\n\nUse metric units."
    assert body["store"] is False and body["stream"] is True
    assert not {"temperature", "top_p", "max_tokens", "max_output_tokens", "max_completion_tokens"} & set(body)
    assert body["reasoning"] == {"effort": "high", "summary": "auto"}
    assert body["tools"] == [{"type": "function", "name": "get_weather", "description": "Weather for a city",
                              "parameters": WEATHER_TOOL["function"]["parameters"], "strict": False}]
    assert body["tool_choice"] == "required"
    assert body["text"] == {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"},
                                       "strict": True}}
    assert body["input"] == [
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Weather?"},
            {"type": "input_file", "file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "{\"temp\": 3}"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "3 degrees."}]}]
    bare = to_codex_body(structure({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, ChatRequest), "m")
    assert bare["instructions"] == DEFAULT_INSTRUCTIONS and "tools" not in bare and "text" not in bare


def test_verbosity_is_text_verbosity_as_codex_sends_it() -> None:
    """Chat's ``verbosity`` is the Responses ``text.verbosity`` the Codex CLI sends (``text: {"verbosity":
    "medium"}`` in shared/fixtures/responses_codex/codex_request_example.json), beside a response format; a hint
    dropped when not a string, and for the -codex models, which take only "medium" (Codex leaves it out too)."""

    def text_of(model: str = "gpt-5", **extra: Any) -> Any:
        body = {"model": "codex/" + model, "messages": [{"role": "user", "content": "hi"}], **extra}
        return to_codex_body(structure(body, ChatRequest), model).get("text")

    assert text_of(verbosity="medium") == {"verbosity": "medium"}
    assert text_of(verbosity="low", response_format={"type": "json_object"}) == {
        "format": {"type": "json_object"}, "verbosity": "low"}
    assert text_of(verbosity=2) is None
    assert text_of("gpt-5.1-codex", verbosity="low") is None and text_of("gpt-5-codex", verbosity="medium") is None
    assert text_of("gpt-5.1-codex-mini", verbosity="low", response_format={"type": "json_object"}) == {
        "format": {"type": "json_object"}}


def test_openai_sdk_parses_the_fake_stream(codex: FakeCodex) -> None:
    """The fake speaks the public Responses dialect: the official client's typed stream accepts it."""
    import openai

    login = codex.login()
    client = openai.OpenAI(base_url=codex.base_url, api_key=login["access_token"], max_retries=0,
                           default_headers={"chatgpt-account-id": login["account_id"]})
    codex.script(Reply(text="Sunny and warm.", reasoning="Think about the weather."),
                 Reply.call("get_weather", {"city": "Rome"}, id="call_rome"))
    events = list(client.responses.create(model="gpt-5-codex", instructions="Be brief.", input="Weather?",
                                          store=False, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    final = events[-1].response
    assert final.output_text == "Sunny and warm." and final.usage.total_tokens == 18
    assert final.output[0].type == "reasoning" and final.output[0].summary[0].text == "Think about the weather."
    with client.responses.stream(model="gpt-5-codex", instructions="Be brief.", input="Weather in Rome?",
                                 store=False, tools=[{"type": "function", "name": "get_weather",
                                                      "parameters": WEATHER_TOOL["function"]["parameters"]}]) as stream:
        done = stream.get_final_response()
    call = done.output[0]
    assert call.type == "function_call" and call.call_id == "call_rome" and call.arguments == '{"city":"Rome"}'
    for status, detail, body in ((400, "Store must be set to false", {"store": True}),
                                 (400, "Instructions are required", {"instructions": ""})):
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(model="gpt-5-codex", input="x", stream=True,
                                    **{"instructions": "x", "store": False, **body})
        assert caught.value.status_code == status and caught.value.body["detail"] == detail


def test_streaming_with_reasoning_and_usage(codex: FakeCodex, codex_env: Any, serve: Any) -> None:
    client = openai_client(serve(codex_env()))
    codex.script(Reply(text="Forty-two.", reasoning="The answer is well known."))
    chunks = list(client.chat.completions.create(model="codex/gpt-5", stream=True, reasoning_effort="low",
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "Answer?"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    assert text == "Forty-two." and reasoning == "The answer is well known."
    assert chunks[-1].usage.prompt_tokens == 11 and chunks[-1].usage.completion_tokens == 7
    assert codex.last.body["reasoning"] == {"effort": "low", "summary": "auto"}
    codex.script(Reply(text="Forty-two.", reasoning="Known."))
    message = client.chat.completions.create(model="codex/gpt-5", messages=[
        {"role": "user", "content": "Answer?"}]).choices[0].message
    assert message.content == "Forty-two." and message.model_extra["reasoning_content"] == "Known."


def test_usage_limit_is_429_insufficient_quota_with_retry_after(codex: FakeCodex, codex_env: Any,
                                                              serve: Any) -> None:
    import openai

    client = openai_client(serve(codex_env()))
    for status in (429, 404):  # some gateways answer usage limits with 404 and the same body
        codex.script(FakeCodex.usage_limit(resets_in_s=5400, status=status))
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="codex/gpt-5", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.code == "insufficient_quota"
        assert 5300 <= int(caught.value.response.headers["retry-after"]) <= 5400
        assert "usage limit" in caught.value.message and "codex (gpt-5)" in caught.value.message


def test_detail_400_and_response_failed_before_output(codex: FakeCodex, codex_env: Any, serve: Any) -> None:
    import openai

    client = openai_client(serve(codex_env()))
    codex.script(FakeCodex.detail(400, "Instructions are not valid"))
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="codex/gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert "Instructions are not valid" in caught.value.message
    failed = {"code": "rate_limit_exceeded", "message": "Rate limit reached. Please try again in 2.5s."}
    for stream in (False, True):  # a failure before any output keeps its status, streaming or not
        codex.script(Reply(text="never", error_after=2, error_event=failed))
        with pytest.raises(openai.RateLimitError) as limited:
            result = client.chat.completions.create(model="codex/gpt-5", stream=stream,
                                                    messages=[{"role": "user", "content": "hi"}])
            list(result) if stream else None
        assert limited.value.response.headers["retry-after"] == "2"
    codex.script(Reply(text="never", error_after=2, error_event={"code": "context_length_exceeded",
                                                                 "message": "Your input exceeds the context window"}))
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="codex/gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert too_long.value.code == "context_length_exceeded"


def test_failure_after_output_is_an_error_event_not_a_clean_end(codex: FakeCodex, codex_env: Any,
                                                               serve: Any) -> None:
    import openai

    client = openai_client(serve(codex_env()))
    codex.script(Reply(text="This answer breaks off", chunk_size=3, error_after=6))
    seen: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(model="codex/gpt-5", stream=True,
                                                    messages=[{"role": "user", "content": "hi"}]):
            seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen) and "codex" in str(caught.value.message)
    codex.script(Reply(text="Cut", cut_after=5))
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="codex/gpt-5", stream=True,
                                            messages=[{"role": "user", "content": "hi"}]))


def test_whole_function_call_items_and_parallel_calls(codex: FakeCodex, codex_env: Any, serve: Any) -> None:
    from scillm_core.testing import ToolCallSpec

    client = openai_client(serve(codex_env()))
    calls = (ToolCallSpec("get_weather", {"city": "Oslo"}, "call_a"), ToolCallSpec("get_weather", {"city": "Rome"},
                                                                                  "call_b"))
    for whole in (False, True):
        codex.script(Reply(tool_calls=calls, whole_tool_call=whole))
        chunks = list(client.chat.completions.create(model="codex/gpt-5", stream=True, tools=[WEATHER_TOOL],
                                                     messages=[{"role": "user", "content": "Oslo and Rome?"}]))
        deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
        by_index: dict[int, str] = {}
        for tc in deltas:
            by_index[tc.index] = by_index.get(tc.index, "") + (tc.function.arguments or "")
        assert by_index == {0: '{"city":"Oslo"}', 1: '{"city":"Rome"}'}
        assert [tc.id for tc in deltas if tc.id] == ["call_a", "call_b"]
    assert codex.last.body["tools"][0]["name"] == "get_weather" and codex.last.body["parallel_tool_calls"] is True


def test_a_terminal_event_with_odd_details_still_completes_the_stream() -> None:
    """Usage and incomplete details are metadata: odd shapes of them (a number, a list) neither fail the terminal
    event nor leave the stream half-finished."""
    state = StreamState(provider="codex", model="gpt-5", include_usage=True)
    state.feed({"type": "response.output_text.delta", "item_id": "m1", "output_index": 0, "delta": "Hi"})
    chunks = state.feed({"type": "response.completed", "response": {
        "id": "resp_1", "status": "completed", "incomplete_details": 5,
        "usage": {"input_tokens": 3, "output_tokens": 1, "input_tokens_details": [], "output_tokens_details": 7}}})
    assert state.finished and state.finish_reason == "stop"
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].usage.prompt_tokens == 3
