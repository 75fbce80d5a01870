"""Failover faults through the official openai client: upstream timeouts that fail over instead of retrying the
silent deployment, a group's first-token limit, a stream that finished without its end marker, a malformed chunk
in the middle, context_length_exceeded, and one info line per failover step. Timeouts are configured short; no
test bounds elapsed time tightly (the upstreams would otherwise hang for an hour)."""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import openai
import pytest
from resilience_helpers import GROUP, HI, client_for, health

from scillm_core.testing import DEV_KEY, FakeUpstream, Reply, ServerThread

CLAUDE = "anthropic/claude-sonnet-4-5"


def text_of(chunks: Any) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def answer(raw: Any, stream: bool) -> str:
    parsed = raw.parse()
    return text_of(parsed) if stream else parsed.choices[0].message.content


def upstream(kind: str, fake_a: FakeUpstream, fake_claude: FakeUpstream) -> tuple[FakeUpstream, str]:
    """The fake and the model name of an OpenAI or an Anthropic upstream."""
    return (fake_a, "openai/gpt-a") if kind == "openai" else (fake_claude, CLAUDE)


# -- timeouts ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("where", ["group", "provider"])
def test_a_silent_upstream_fails_over_within_its_timeout_and_is_not_asked_again(start, fake_a, fake_b, stream,
                                                                                where):
    limit = {"headers_timeout_s": 0.5} if stream else {"timeout_s": 0.5}
    groups = {"g": {**GROUP["g"], **(limit if where == "group" else {})}}
    tables: dict[str, Any] = {"providers": {"openai": limit}} if where == "provider" else {}
    server = start(fake_a.base_url, fake_b.base_url, groups=groups, resilience={"max_retries": 2}, **tables)
    fake_a.default = Reply(hang=True)  # accepts the request and never answers
    fake_b.script(Reply.say("the fallback answered"))
    began = time.monotonic()
    raw = client_for(server).chat.completions.with_raw_response.create(model="g", messages=HI, stream=stream)
    assert answer(raw, stream) == "the fallback answered"
    assert time.monotonic() - began < 15  # the limit, not the hour the primary would hold the caller
    assert len(fake_a.requests) == 1  # the silent deployment was not asked again (max_retries = 2)
    assert raw.headers["x-scillm-served-model"] == "deepseek-chat" and raw.headers["x-scillm-attempts"] == "2"


def test_a_slow_first_token_over_the_groups_limit_fails_over(start, fake_a, fake_b):
    server = start(fake_a.base_url, fake_b.base_url, groups={"g": {**GROUP["g"], "first_token_timeout_s": 0.5}})
    fake_a.default = Reply.say("far too late", first_chunk_delay_s=60)  # headers at once, the first token never
    fake_b.script(Reply.say("in time"))
    raw = client_for(server).chat.completions.with_raw_response.create(model="g", messages=HI, stream=True)
    assert text_of(raw.parse()) == "in time"
    assert raw.headers["x-scillm-served-model"] == "deepseek-chat"
    assert len(fake_a.requests) == 1


def test_a_timeout_without_a_fallback_is_a_504_naming_the_limit_and_where_it_is_set(start, fake_a):
    server = start(fake_a.base_url, providers={"openai": {"first_token_timeout_s": 0.5}})
    fake_a.default = Reply.say("far too late", first_chunk_delay_s=60)
    with pytest.raises(openai.APIStatusError) as caught:
        list(client_for(server).chat.completions.create(model="openai/gpt-a", messages=HI, stream=True))
    error = caught.value.response.json()["error"]
    assert caught.value.status_code == 504 and error["code"] == "upstream_timeout"
    assert "openai (gpt-a)" in error["message"] and "no first token within 0.5s" in error["message"]
    assert "first_token_timeout_s = 0.5 ([providers.openai])" in error["message"]
    assert error["details"] == {"timeout": "first_token", "seconds": 0.5}
    assert len(fake_a.requests) == 1  # a timeout is not retried on the same deployment


def test_a_stream_that_stalls_mid_way_ends_with_an_error_naming_the_idle_limit(start, fake_a):
    server = start(fake_a.base_url, providers={"openai": {"idle_timeout_s": 0.5}})
    fake_a.script(Reply.say("It stalls here and never finishes", stall_after=3))
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client_for(server, timeout=10).chat.completions.create(model="openai/gpt-a", messages=HI,
                                                                             stream=True):
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "It stall"  # the role chunk and two text chunks came before the stall
    assert "sent nothing for 0.5s after its last chunk" in str(caught.value.message)
    assert "idle_timeout_s = 0.5 ([providers.openai])" in str(caught.value.message)


def test_timeouts_are_checked_at_startup(start, fake_a):
    with pytest.raises(Exception, match=r"groups\.g\.first_token_timeout_s"):
        start(fake_a.base_url, groups={"g": {**GROUP["g"], "first_token_timeout_s": 0}})
    with pytest.raises(Exception, match=r"unknown key 'first_token_s'"):
        start(fake_a.base_url, providers={"openai": {"first_token_s": 3}})


# -- streams that finished, and chunks that cannot be parsed -------------------------------------------------------

@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_stream_that_finished_without_its_end_marker_is_a_success_and_never_opens_the_circuit(start, fake_a,
                                                                                             fake_claude, kind):
    server = start(fake_a.base_url, anthropic_base=fake_claude.base_url,
                   resilience={"breaker_threshold": 2, "max_retries": 0})
    fake, model = upstream(kind, fake_a, fake_claude)
    fake.default = Reply.say("every token arrived", no_terminal=True, prompt_tokens=5, completion_tokens=3)
    client = client_for(server)
    for _ in range(3):  # more than the breaker's threshold
        chunks = list(client.chat.completions.create(model=model, messages=HI, stream=True,
                                                     stream_options={"include_usage": True}))
        assert text_of(chunks) == "every token arrived"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert len(fake.requests) == 3
    deployment = model if kind == "openai" else "anthropic/claude-sonnet-4-5"
    circuit = health(server)["breaker"]["circuits"].get(deployment, {"total_failures": 0, "state": "closed"})
    assert circuit["total_failures"] == 0 and circuit["state"] == "closed"


def metric(server: ServerThread, name: str, **labels: str) -> float:
    text = httpx.get(server.url + "/metrics", headers={"authorization": f"Bearer {DEV_KEY}"}).text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_malformed_chunk_in_the_middle_is_skipped_counted_and_logged(start, fake_a, fake_claude, kind, caplog):
    caplog.set_level(logging.WARNING, logger="scillm.upstream")
    server = start(fake_a.base_url, anthropic_base=fake_claude.base_url, resilience={"max_retries": 0})
    fake, model = upstream(kind, fake_a, fake_claude)
    fake.script(Reply.say("one two three four", malformed_at=(3,)))
    raw = client_for(server).chat.completions.with_raw_response.create(model=model, messages=HI, stream=True)
    assert text_of(raw.parse()) == "one two three four"  # the garbage never reached the client
    # OpenAI: the upstream's own events (as sent); Anthropic: translated
    assert raw.headers["x-scillm-dialect"] == {"openai": "openai-chat", "anthropic": "openai-chat -> anthropic"}[kind]
    provider = model.split("/")[0]
    assert metric(server, "scillm_upstream_chunks_skipped_total", provider=provider) == 1.0
    request_id = raw.headers["x-request-id"]
    lines = [r.getMessage() for r in caplog.records if r.name == "scillm.upstream"]
    assert len(lines) == 1 and f"request_id={request_id}" in lines[0] and f"provider={provider}" in lines[0]
    assert "reason=malformed JSON" in lines[0]
    assert health(server)["breaker"]["circuits"].get(model, {"total_failures": 0})["total_failures"] == 0


def test_a_stream_of_nothing_but_garbage_still_ends_in_an_error(start, fake_a):
    server = start(fake_a.base_url, resilience={"max_retries": 0})
    fake_a.script(Reply.say("x" * 80, chunk_size=1, malformed_at=tuple(range(2, 80))))
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client_for(server).chat.completions.create(model="openai/gpt-a", messages=HI, stream=True):
            received.append(chunk)
    assert "unparseable stream events" in str(caught.value.message) and "not recovering" in str(caught.value.message)


# -- context_length_exceeded ----------------------------------------------------------------------------------------

CONTEXT_ERRORS = {
    "openai": Reply.fail(400, "This model's maximum context length is 8192 tokens. However, your messages resulted "
                              "in 9031 tokens. Please reduce the length of the messages.",
                         type="invalid_request_error", code="context_length_exceeded"),
    "anthropic": Reply.fail(400, "prompt is too long: 210345 tokens > 200000 maximum", type="invalid_request_error"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_context_length_exceeded_falls_back_to_the_next_model_and_is_never_retried(start, fake_a, fake_b,
                                                                                   fake_claude, kind, stream):
    fake, model = upstream(kind, fake_a, fake_claude)
    server = start(fake_a.base_url, fake_b.base_url, fake_claude.base_url, resilience={"max_retries": 3},
                   groups={"g": {"models": [model, "deepseek/deepseek-chat"]}})
    fake.script(CONTEXT_ERRORS[kind])
    fake_b.script(Reply.say("a larger window"))
    raw = client_for(server).chat.completions.with_raw_response.create(model="g", messages=HI, stream=stream)
    assert answer(raw, stream) == "a larger window"
    assert len(fake.requests) == 1 and raw.headers["x-scillm-attempts"] == "2"
    assert raw.headers["x-scillm-served-model"] == "deepseek-chat"


def test_context_length_exceeded_everywhere_is_the_400_with_what_was_tried(start, fake_a, fake_b):
    server = start(fake_a.base_url, fake_b.base_url, groups=GROUP)
    fake_a.script(CONTEXT_ERRORS["openai"])
    fake_b.script(Reply.fail(400, "This model's maximum context length is 65536 tokens. However, you requested "
                                  "70000 tokens", type="invalid_request_error"))  # DeepSeek: no code, the words
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(server).chat.completions.create(model="g", messages=HI)
    error = caught.value.response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "deepseek (deepseek-chat)" in error["message"]
    assert [t["deployment"] for t in error["details"]["tried"]] == ["openai/gpt-a", "deepseek/deepseek-chat"]


@pytest.mark.parametrize("reply", [
    Reply.fail(400, "The request was rejected because it was considered high risk", type="content_filter"),
    Reply.fail(400, "Invalid value for 'temperature': must be between 0 and 2", code="invalid_value"),
], ids=["content_filter", "bad_request"])
def test_other_400s_stay_the_clients_answer_and_are_not_failed_over(start, fake_a, fake_b, reply):
    server = start(fake_a.base_url, fake_b.base_url, groups=GROUP)
    fake_a.script(reply)
    with pytest.raises(openai.BadRequestError):
        client_for(server).chat.completions.create(model="g", messages=HI)
    assert len(fake_a.requests) == 1 and fake_b.requests == []


# -- the log --------------------------------------------------------------------------------------------------------

def test_each_failover_step_is_one_info_line_naming_request_provider_model_and_reason(start, fake_a, fake_b,
                                                                                      caplog):
    caplog.set_level(logging.INFO, logger="scillm.failover")
    server = start(fake_a.base_url, fake_b.base_url, groups={"g": {**GROUP["g"], "timeout_s": 0.5}},
                   resilience={"max_retries": 2, "breaker_threshold": 2})
    fake_a.script(Reply.fail(503, "the server had an error, try again"), Reply(hang=True))
    fake_b.script(Reply.say("served"))
    raw = client_for(server).chat.completions.with_raw_response.create(model="g", messages=HI)
    assert raw.parse().choices[0].message.content == "served"
    lines = [r.getMessage() for r in caplog.records if r.name == "scillm.failover" and r.levelno == logging.INFO]
    assert [line.split(" ", 1)[0] for line in lines] == ["retry", "timeout", "breaker", "fallback"], lines
    request_id = raw.headers["x-request-id"]
    for line in lines:
        assert f"request_id={request_id}" in line and "provider=openai" in line and "model=gpt-a" in line, line
        assert "reason=" in line and "reason=-" not in line, line
    retry, timeout, breaker, fallback = lines
    assert "upstream_unavailable" in retry and "retry=1" in retry
    assert "limit=total" in timeout and "timeout_s = 0.5 ([groups.g])" in timeout
    assert "old=closed new=open" in breaker
    assert "to=deepseek/deepseek-chat" in fallback and "upstream_timeout" in fallback
