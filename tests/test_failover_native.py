"""Failover faults on same-dialect routes, where the provider gets the client's own body and the upstream's own bytes
go back (``x-scillm-dialect`` without ``->``): Anthropic Messages through the anthropic SDK to an Anthropic
upstream, Responses through the openai SDK to OpenAI's Responses API. A silent upstream and context_length_exceeded
fail over, a stream without its end marker is a whole answer, a malformed event is skipped and never reaches the
client, and a stream cut mid-way is continued by another model in the same stream. (Chat completions as sent:
``scillm-resilience/tests/test_failover.py``; continuation in general: ``test_continuation.py``.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, make_app
from scillm_core.testing.fake_anthropic import FakeAnthropic
from scillm_core.testing.fake_codex import FakeOpenAIResponses

CLAUDE = "anthropic/claude-sonnet-4-5"
GROUPS = {"claude-first": {"models": [CLAUDE, "deepseek/deepseek-chat"]},
          "claude-soon": {"models": [CLAUDE, "deepseek/deepseek-chat"], "first_token_timeout_s": 1.0},
          "responses-first": {"models": ["openai/gpt-r", "deepseek/deepseek-chat"]}}
LIMITS = {"headers_timeout_s": 1.0, "timeout_s": 1.0, "idle_timeout_s": 1.0}  # silent fakes would hold an hour
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeAnthropic, FakeOpenAIResponses, FakeOpenAI]]:
    with FakeAnthropic() as claude, FakeOpenAIResponses() as responses, FakeOpenAI() as deepseek:
        yield claude, responses, deepseek  # type: ignore[misc]


@pytest.fixture
def upstreams(fakes: tuple[Any, ...]) -> tuple[Any, ...]:
    for fake in fakes:
        fake.requests.clear()
        fake._script.clear()
        fake.default = type(fake).default
        fake.responder = None
    return fakes


@pytest.fixture(scope="module")
def server(fakes: tuple[Any, ...], tmp_path_factory: Any) -> Iterator[ServerThread]:
    claude, responses, deepseek = fakes
    env = {"ANTHROPIC_API_KEY": "sk-ant-native-0123456789abcdef", "ANTHROPIC_API_BASE": claude.base_url,
           "OPENAI_API_KEY": "sk-native-openai-0123456789", "OPENAI_API_BASE": responses.base_url,
           "OPENAI_API_RESPONSES": "1",
           "DEEPSEEK_API_KEY": "sk-native-deepseek-0123456789", "DEEPSEEK_API_BASE": deepseek.base_url}
    config = {"groups": GROUPS, "plugins": {"disable": ["cache"]},
              "resilience": {"backoff_base_s": 0.01, "backoff_max_s": 0.02, "max_retries": 2},
              "providers": {"anthropic": LIMITS, "openai": LIMITS}}
    with ServerThread(make_app(env=env, config=config, data_dir=tmp_path_factory.mktemp("data"))) as running:
        yield running


def claude_client(server: ServerThread) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0, timeout=20)


def openai_client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)


# -- Anthropic Messages, as sent ----------------------------------------------------------------------------------

def test_a_messages_stream_without_message_stop_is_whole_and_ends_as_a_stream_should(server, upstreams):
    claude, _, deepseek = upstreams
    claude.default = Reply.say("every token arrived", no_terminal=True, completion_tokens=3)
    for _ in range(3):
        with claude_client(server).messages.with_streaming_response.create(
                model="claude-first", max_tokens=100, messages=HI, stream=True) as raw:
            assert raw.headers["x-scillm-dialect"] == "anthropic-messages"
            events = list(raw.parse())
        assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == "every token arrived"
        assert [e.type for e in events][-2:] == ["message_delta", "message_stop"]  # the stop the upstream left out
        assert next(e for e in events if e.type == "message_delta").delta.stop_reason == "end_turn"
    assert len(claude.requests) == 3 and deepseek.requests == []  # a success: no failover, nothing retried


@pytest.mark.parametrize("shape", ["not JSON", "JSON of the wrong shape"])
def test_a_malformed_event_in_a_messages_stream_is_skipped_and_not_passed_on(server, upstreams, shape):
    claude, _, deepseek = upstreams
    garbage = claude.wrong_shape_event if shape == "JSON of the wrong shape" else None
    claude.script(Reply.say("one two three four", malformed_at=(4,), garbage=garbage))
    with claude_client(server).messages.stream(model="claude-first", max_tokens=100, messages=HI) as stream:
        message = stream.get_final_message()
    assert message.content[0].text == "one two three four" and message.stop_reason == "end_turn"
    assert deepseek.requests == []


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_silent_anthropic_upstream_fails_over_within_its_timeout(server, upstreams, stream):
    claude, _, deepseek = upstreams
    claude.default = Reply(hang=True)
    deepseek.script(Reply.say("the fallback answered"))
    client = claude_client(server)
    if stream:
        with client.messages.stream(model="claude-first", max_tokens=100, messages=HI) as streamed:
            text = streamed.get_final_text()
    else:
        text = client.messages.create(model="claude-first", max_tokens=100, messages=HI).content[0].text
    assert text == "the fallback answered"
    assert len(claude.requests) == 1  # not asked again (max_retries = 2)


def test_a_first_token_later_than_the_groups_limit_fails_over_though_message_start_came(server, upstreams):
    claude, _, deepseek = upstreams
    claude.script(Reply.say("far too late", stall_after=3))  # message_start, content_block_start, ping: no token
    deepseek.script(Reply.say("in time"))
    with claude_client(server).messages.with_streaming_response.create(
            model="claude-soon", max_tokens=100, messages=HI, stream=True) as raw:
        events = list(raw.parse())
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == "in time"
    assert [e.type for e in events].count("message_start") == 1 and events[-1].type == "message_stop"
    assert len(claude.requests) == 1 and len(deepseek.requests) == 1
    delta = next(e for e in events if e.type == "message_delta")
    assert "first_token_timeout_s = 1 ([groups.claude-soon])" in delta.model_extra["scillm_continuation"]["reason"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_too_long_prompt_for_claude_falls_back_on_a_messages_route(server, upstreams, stream):
    claude, _, deepseek = upstreams
    claude.script(Reply.fail(400, "prompt is too long: 210345 tokens > 200000 maximum", type="invalid_request_error"))
    deepseek.script(Reply.say("a longer context"))
    client = claude_client(server)
    if stream:
        with client.messages.stream(model="claude-first", max_tokens=100, messages=HI) as streamed:
            text = streamed.get_final_text()
    else:
        text = client.messages.create(model="claude-first", max_tokens=100, messages=HI).content[0].text
    assert text == "a longer context"
    assert len(claude.requests) == 1 and len(deepseek.requests) == 1


# -- OpenAI Responses, as sent --------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["not JSON", "JSON of the wrong shape"])
def test_a_malformed_event_in_a_responses_stream_is_skipped_and_not_passed_on(server, upstreams, shape):
    _, responses, deepseek = upstreams
    garbage = responses.wrong_shape_event if shape == "JSON of the wrong shape" else None
    responses.script(Reply.say("one two three four", malformed_at=(5,), garbage=garbage))
    with openai_client(server).responses.with_streaming_response.create(model="responses-first", input="hi",
                                                                         stream=True) as raw:
        assert raw.headers["x-scillm-dialect"] == "openai-responses"
        events = list(raw.parse())
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "one two three four"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "one two three four"
    assert all(getattr(e, "output_index", None) != 7 for e in events)  # the wrong-shaped item, not passed on
    assert deepseek.requests == []


@pytest.mark.parametrize(("kind", "index"), [("added", 10**15), ("added", "first"), ("done", -3)])
def test_an_upstream_item_event_with_an_odd_output_index_is_passed_on_and_not_followed(server, upstreams, kind,
                                                                                      index):
    """The surface follows a same-dialect stream's items (for a continuation to go on in them): an upstream's
    output_item event whose output_index is not a small count was followed as int(index), so 10**15 was a list that
    long (MemoryError), and "first" or -3 broke off the stream with response.failed; it goes to the client as sent,
    unfollowed, and the stream ends as the upstream ended it."""
    _, responses, deepseek = upstreams
    odd = json.dumps({"type": f"response.output_item.{kind}", "output_index": index, "sequence_number": 2**70,
                        "item": {"type": "message", "id": "msg_odd", "role": "assistant", "content": []}}).encode()
    responses.script(Reply.say("one two three four", malformed_at=(5,),
                               garbage=f"event: response.output_item.{kind}\ndata: ".encode() + odd + b"\n\n"))
    with openai_client(server).responses.with_streaming_response.create(model="responses-first", input="hi",
                                                                         stream=True) as raw:
        events = list(raw.parse())
    assert [e.type for e in events if e.type.startswith("response.") and "output_text" not in e.type][-1] \
        == "response.completed", [e.type for e in events]
    assert events[-1].response.output_text == "one two three four"
    assert deepseek.requests == []

@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_silent_responses_upstream_fails_over_within_its_timeout(server, upstreams, stream):
    _, responses, deepseek = upstreams
    responses.default = Reply(hang=True)
    deepseek.script(Reply.say("the fallback answered"))
    client = openai_client(server)
    if stream:
        with client.responses.stream(model="responses-first", input="hi") as streamed:
            text = streamed.get_final_response().output_text
    else:
        text = client.responses.create(model="responses-first", input="hi").output_text
    assert text == "the fallback answered"
    assert len(responses.requests) == 1


TOKENS = [f"w{i:02d} " for i in range(60)]  # one text event each (chunk_size 4)
FULL = "".join(TOKENS)
SENT = "".join(TOKENS[:40])
AFTER_40 = 44  # response.created, response.in_progress, output_item.added, content_part.added, 40 deltas


def continues_after_repeating_two(fake: FakeOpenAI) -> None:
    """``fake`` answers a continuation with the rest of the tokens, after repeating the last two it was given."""
    def answer(request: Any) -> Reply:
        partial = next(m["content"] for m in reversed(request.body["messages"]) if m["role"] == "assistant")
        given = len(partial.split())
        return Reply.say("".join(TOKENS[given - 2:]), chunk_size=4)

    fake.responder = answer


@pytest.mark.parametrize("fault", ["end_after", "stall_after"])
def test_the_openai_sdk_reads_a_continued_responses_stream_as_sent_as_one_response(server, upstreams, fault):
    _, responses, deepseek = upstreams
    responses.script(Reply.say(FULL, chunk_size=4, **{fault: AFTER_40}))
    continues_after_repeating_two(deepseek)
    with openai_client(server).responses.with_streaming_response.create(model="responses-first", input="count",
                                                                         stream=True) as raw:
        assert raw.headers["x-scillm-dialect"] == "openai-responses"
        events = list(raw.parse())
    kinds = [e.type for e in events]
    assert kinds.count("response.created") == 1 and kinds.count("response.output_item.added") == 1
    assert kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == FULL
    assert {e.output_index for e in events if e.type == "response.output_text.delta"} == {0}
    completed = events[-1].response
    assert completed.output_text == FULL and completed.id == events[0].response.id  # the upstream's response
    assert completed.model_extra["scillm_continuation"]["after"] == "openai/gpt-r"
    assert next(m for m in deepseek.last.body["messages"] if m["role"] == "assistant")["content"] == SENT
    responses.script(Reply.say(FULL, chunk_size=4, **{fault: AFTER_40}))  # and the SDK's own reader
    with openai_client(server).responses.stream(model="responses-first", input="count") as stream:
        final = stream.get_final_response()
    assert final.output_text == FULL and [item.type for item in final.output] == ["message"]
