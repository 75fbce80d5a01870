"""Mid-stream continuation: a group's stream cut or stalled after its first chunk is finished by the next model, on
every streaming surface, through the official SDKs' own stream readers. The answer is 60 tokens; the primary is cut
after 40 of them; the fallback is asked to continue and its repeat of the last tokens is cut."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from scillm_resilience.continuation import INSTRUCTION

from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, make_app
from scillm_core.testing.fake_anthropic import FakeAnthropic

TOKENS = [f"w{i:02d} " for i in range(60)]  # four characters each: one text chunk each (chunk_size 4)
FULL = "".join(TOKENS)
SENT = "".join(TOKENS[:40])
CLAUDE = "anthropic/claude-sonnet-4-5"
GROUPS = {
    "g": {"models": ["openai/gpt-a", "deepseek/deepseek-chat"]},              # the fallback gets an instruction
    "to-claude": {"models": ["openai/gpt-a", CLAUDE]},                        # the fallback takes a prefill
    "from-claude": {"models": [CLAUDE, "deepseek/deepseek-chat"]},
    "three": {"models": ["openai/gpt-a", CLAUDE, "deepseek/deepseek-chat"]},
}


def counting(**fault: Any) -> Reply:
    """The primary's answer, 60 tokens of 4 characters, one per chunk, with the stream fault ``fault``."""
    return Reply.say(FULL, chunk_size=4, **fault)


#: after the role chunk (OpenAI: event 0) and 40 tokens. ``end_after`` ends the body cleanly there, ``stall_after``
#: goes silent; ``cut_after`` drops the connection, and what scillm had not read by then is lost with it (as with a
#: real reset), so a cut stream may have handed on fewer than 40 tokens
AFTER_40 = 41


def continues(fake: Any, *, repeat: int = 3, prefill: bool = False) -> None:
    """``fake`` answers a continuation as a model would: the tokens after the partial answer it was given, after
    repeating its last ``repeat`` tokens (as models told to go on often do); after a prefill, from the next token
    on, with its leading space."""
    def answer(request: Any) -> Reply:
        partial = next(content_of(m) for m in reversed(request.body["messages"]) if m["role"] == "assistant")
        given = len(partial.split())
        rest = "".join(TOKENS[given:])
        return Reply.say(" " + rest if prefill else "".join(TOKENS[given - repeat:given]) + rest, chunk_size=4)

    fake.responder = answer


def partial_given(fake: Any) -> str:
    """The partial answer the fallback was asked to continue."""
    return next(content_of(m) for m in reversed(asked(fake)) if m["role"] == "assistant")


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeOpenAI, FakeOpenAI, FakeAnthropic]]:
    with FakeOpenAI() as a, FakeOpenAI() as b, FakeAnthropic() as c:
        yield a, b, c  # type: ignore[misc]


@pytest.fixture
def upstreams(fakes: tuple[FakeOpenAI, FakeOpenAI, FakeAnthropic]) -> tuple[FakeOpenAI, FakeOpenAI, FakeAnthropic]:
    for fake in fakes:
        fake.requests.clear()
        fake._script.clear()
        fake.default = type(fake).default
        fake.responder = None
    return fakes


@pytest.fixture(scope="module")
def server(fakes: tuple[FakeOpenAI, FakeOpenAI, FakeAnthropic], tmp_path_factory: Any) -> Iterator[ServerThread]:
    a, b, c = fakes
    env = {"OPENAI_API_KEY": "sk-cont-openai-0123456789", "OPENAI_API_BASE": a.base_url,
           "DEEPSEEK_API_KEY": "sk-cont-deepseek-0123456789", "DEEPSEEK_API_BASE": b.base_url,
           "ANTHROPIC_API_KEY": "sk-ant-cont-0123456789abcdef", "ANTHROPIC_API_BASE": c.base_url}
    config = {"groups": GROUPS, "plugins": {"disable": ["cache"]},
              "resilience": {"backoff_base_s": 0.01, "backoff_max_s": 0.02, "max_retries": 0},
              "providers": {"openai": {"idle_timeout_s": 0.5}}}
    with ServerThread(make_app(env=env, config=config, data_dir=tmp_path_factory.mktemp("data"))) as running:
        yield running


def openai_client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)


def anthropic_client(server: ServerThread) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0, timeout=20)


def last_call(server: ServerThread) -> dict[str, Any]:
    """The dashboard's record of the newest call (what the event seam reported about it)."""
    headers = {"authorization": f"Bearer {DEV_KEY}"}
    newest = httpx.get(server.url + "/v1/scillm/ui/calls?limit=1", headers=headers).json()["data"][0]
    return httpx.get(server.url + f"/v1/scillm/ui/calls/{newest['id']}", headers=headers).json()  # type: ignore[no-any-return]


def asked(fake: Any) -> list[dict[str, Any]]:
    """The messages of the fake's last request."""
    return fake.last.body["messages"]  # type: ignore[no-any-return]


def content_of(message: dict[str, Any]) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


# -- chat completions ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["end_after", "stall_after", "cut_after"])
def test_a_stream_broken_after_40_of_60_tokens_reaches_the_client_whole_through_a_continuation(server, upstreams,
                                                                                               fault, caplog):
    caplog.set_level(logging.INFO, logger="scillm.failover")
    a, b, _ = upstreams
    a.script(counting(**{fault: AFTER_40}))
    continues(b, repeat=3)
    with openai_client(server).chat.completions.stream(model="g", messages=[{"role": "user", "content": "count"}],
                                                       stream_options={"include_usage": True}) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        final = stream.get_final_completion()
    assert final.choices[0].message.content == FULL  # one complete answer, nothing repeated, nothing missing
    assert final.choices[0].finish_reason == "stop"
    assert len({c.id for c in chunks}) == 1 and len({c.model for c in chunks}) == 1  # one stream
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1
    # the fallback was asked to go on after the partial answer the client had
    messages = asked(b)
    partial = partial_given(b)
    assert messages[0] == {"role": "user", "content": "count"}
    assert messages[1:] == [{"role": "assistant", "content": partial}, {"role": "user", "content": INSTRUCTION}]
    if fault == "cut_after":
        assert FULL.startswith(partial) and 0 < len(partial) <= len(SENT)
    else:
        assert partial == SENT  # exactly the 40 tokens
    # the last chunk says what happened
    note = chunks[-1].model_extra["scillm_continuation"]
    assert note["by"] == "deepseek/deepseek-chat" and note["after"] == "openai/gpt-a"
    assert note["mode"] == "instruction" and note["at_char"] == len(partial) and note["count"] == 1
    reason = {"end_after": "stream ended before [DONE]", "stall_after": "idle_timeout_s = 0.5",
              "cut_after": "connection failed"}[fault]
    assert reason in note["reason"], note
    assert chunks[-1].usage is not None  # the usage chunk is the last one here
    assert all("scillm_continuation" not in (c.model_extra or {}) for c in chunks[:-1])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("continuation ")]
    assert len(lines) == 1 and "provider=openai model=gpt-a" in lines[0] and "to=deepseek/deepseek-chat" in lines[0]
    # and through the event seam (here as the dashboard records it)
    marks = {m["kind"]: m for m in last_call(server)["marks"]}
    assert marks["continuation"]["deployment"] == "openai/gpt-a" and marks["continuation"]["mode"] == "instruction"
    assert marks["continuation"]["to"] == "deepseek/deepseek-chat"
    assert marks["continuation.end"]["outcome"] == "completed"
    assert ("timeout" in marks) == (fault == "stall_after")
    # the request ended once, when the continued stream did: a success with the whole answer's usage, after both
    # attempts (the first broke, the second finished it)
    call = last_call(server)
    assert (call["status"], call["http_status"], call["error"]) == ("ok", 200, None)
    assert call["tokens_out"] == chunks[-1].usage.completion_tokens
    assert [a["model"] for a in call["attempts"]] == ["gpt-a", "deepseek-chat"]
    assert call["attempts"][1]["outcome"] == "ok"


def test_a_fallback_that_takes_a_prefill_gets_the_partial_answer_as_its_own(server, upstreams):
    a, _, claude = upstreams
    a.script(counting(end_after=AFTER_40))
    continues(claude, prefill=True)
    chunks = list(openai_client(server).chat.completions.create(
        model="to-claude", messages=[{"role": "user", "content": "count"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == FULL
    last = asked(claude)[-1]
    assert last["role"] == "assistant" and content_of(last) == SENT.rstrip()  # no trailing space in a prefill
    assert chunks[-1].model_extra["scillm_continuation"]["mode"] == "prefill"


def test_a_fallback_that_refuses_to_continue_ends_in_an_error_naming_the_cut(server, upstreams):
    a, _, claude = upstreams
    a.script(counting(end_after=AFTER_40))
    claude.script(Reply.fail(400, "This model does not support assistant message prefill.",
                             type="invalid_request_error"))
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in openai_client(server).chat.completions.create(
                model="to-claude", messages=[{"role": "user", "content": "count"}], stream=True):
            received.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert "".join(received) == SENT
    message = str(caught.value.message)
    assert message.startswith("openai (gpt-a): stream ended before [DONE]"), message  # not the fallback's 400
    assert "after 160 characters" in message and "refused to continue" in message
    assert len(claude.requests) == 1


def test_the_next_member_continues_when_the_first_fallback_refuses(server, upstreams):
    a, b, claude = upstreams
    a.script(counting(end_after=AFTER_40))
    claude.script(Reply.fail(400, "prefill is not supported", type="invalid_request_error"))
    continues(b, repeat=0)
    chunks = list(openai_client(server).chat.completions.create(
        model="three", messages=[{"role": "user", "content": "count"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == FULL
    note = chunks[-1].model_extra["scillm_continuation"]
    assert note["by"] == "deepseek/deepseek-chat" and note["count"] == 2


def test_a_stream_cut_inside_a_tool_call_ends_in_a_clear_error(server, upstreams):
    a, b, _ = upstreams
    a.script(Reply.call("get_weather", {"city": "Paris", "unit": "celsius", "days": 3}, cut_after=4))
    b.script(Reply.say("must not be asked"))
    with pytest.raises(openai.APIError) as caught:
        list(openai_client(server).chat.completions.create(
            model="g", messages=[{"role": "user", "content": "weather?"}], stream=True,
            tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]))
    assert "inside tool call 'get_weather'" in str(caught.value.message)
    assert b.requests == []


def test_a_stream_broken_after_its_finish_chunk_is_complete(server, upstreams):
    a, b, _ = upstreams
    a.script(Reply.say("all of it", end_after=4))  # the role chunk, three text chunks, no finish: continued
    b.script(Reply.say("all of it"))  # started over: the repeat is cut
    text = "".join(c.choices[0].delta.content or "" for c in openai_client(server).chat.completions.create(
        model="g", messages=[{"role": "user", "content": "say it"}], stream=True) if c.choices)
    assert text == "all of it"
    a.script(Reply.say("all of it", stall_after=5))  # stalls after the finish chunk, before [DONE]
    chunks = list(openai_client(server).chat.completions.create(
        model="g", messages=[{"role": "user", "content": "say it"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "all of it"
    assert len(b.requests) == 1  # nothing left to continue the second time


# -- /v1/messages and /v1/responses ------------------------------------------------------------------------------

def test_the_anthropic_sdk_reads_a_continued_stream_as_one_message(server, upstreams):
    a, b, _ = upstreams
    a.script(counting(end_after=AFTER_40))
    continues(b, repeat=2)
    with anthropic_client(server).messages.stream(model="g", max_tokens=500,
                                                  messages=[{"role": "user", "content": "count"}]) as stream:
        events = list(stream)
        message = stream.get_final_message()
    assert [block.type for block in message.content] == ["text"] and message.content[0].text == FULL
    assert message.stop_reason == "end_turn"
    assert sum(1 for e in events if e.type == "message_start") == 1
    delta = next(e for e in events if e.type == "message_delta")
    assert delta.model_extra["scillm_continuation"]["by"] == "deepseek/deepseek-chat"
    assert content_of(asked(b)[1]) == SENT


def test_a_messages_stream_from_claude_is_continued_by_another_dialect(server, upstreams):
    _, b, claude = upstreams
    claude.script(counting(end_after=43))  # message_start, content_block_start, ping, 40 deltas
    continues(b)
    with anthropic_client(server).messages.with_streaming_response.create(
            model="from-claude", max_tokens=500, messages=[{"role": "user", "content": "count"}], stream=True) as raw:
        assert raw.headers["x-scillm-dialect"] == "anthropic-messages"  # Claude's own events, as it sent them
        events = list(raw.parse())
    # one message: Claude's events, then the continuation's in the same text block, closed once
    assert [e.type for e in events].count("message_start") == 1
    assert {e.index for e in events if e.type == "content_block_delta"} == {0}
    assert [e.type for e in events][-4:] == ["content_block_delta", "content_block_stop", "message_delta",
                                             "message_stop"]
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == FULL
    delta = events[-2]
    assert delta.delta.stop_reason == "end_turn"
    assert delta.model_extra["scillm_continuation"]["after"] == CLAUDE
    assert delta.model_extra["scillm_continuation"]["by"] == "deepseek/deepseek-chat"
    assert content_of(asked(b)[1]) == SENT
    claude.script(counting(end_after=43))  # and the SDK's own reader makes one message of it
    with anthropic_client(server).messages.stream(model="from-claude", max_tokens=500,
                                                  messages=[{"role": "user", "content": "count"}]) as stream:
        message = stream.get_final_message()
    assert [block.type for block in message.content] == ["text"] and message.content[0].text == FULL
    assert message.stop_reason == "end_turn"


def test_a_continuation_refused_on_a_messages_route_ends_with_the_cut(server, upstreams):
    _, b, claude = upstreams
    claude.script(counting(end_after=43))
    b.script(Reply.fail(400, "continuation not accepted", type="invalid_request_error"))
    received = []
    with pytest.raises(anthropic.APIError) as caught:
        with anthropic_client(server).messages.stream(model="from-claude", max_tokens=500,
                                                      messages=[{"role": "user", "content": "count"}]) as stream:
            for text in stream.text_stream:
                received.append(text)
    assert "".join(received) == SENT
    message = str(caught.value.message)
    assert "stream ended before message_stop" in message and "after 160 characters" in message, message
    assert "refused to continue" in message and "continuation not accepted" not in message.split(";")[0]


def test_the_openai_sdk_reads_a_continued_responses_stream_as_one_response(server, upstreams):
    a, b, _ = upstreams
    a.script(counting(end_after=AFTER_40))
    continues(b, repeat=4)
    with openai_client(server).responses.stream(model="g", input="count") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.output_text == FULL
    assert [item.type for item in final.output] == ["message"]
    completed = next(e for e in events if e.type == "response.completed")
    assert completed.response.model_extra["scillm_continuation"]["after"] == "openai/gpt-a"
    assert content_of(asked(b)[1]) == SENT


def test_continuation_can_be_switched_off(fakes, upstreams, tmp_path):
    a, b, _ = upstreams
    env = {"OPENAI_API_KEY": "sk-x-0123456789", "OPENAI_API_BASE": a.base_url, "DEEPSEEK_API_KEY": "sk-y-0123456789",
           "DEEPSEEK_API_BASE": b.base_url}
    config = {"groups": GROUPS | {"three": {"models": ["openai/gpt-a", "deepseek/deepseek-chat"]},
                                  "to-claude": GROUPS["g"], "from-claude": GROUPS["g"]},
              "resilience": {"continuation": False, "max_retries": 0}}
    with ServerThread(make_app(env=env, config=config, data_dir=tmp_path)) as off:
        a.script(counting(end_after=AFTER_40))
        with pytest.raises(openai.APIError):
            list(openai_client(off).chat.completions.create(model="g", messages=[{"role": "user", "content": "c"}],
                                                            stream=True))
    assert b.requests == []

