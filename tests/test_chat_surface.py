"""The chat surface end to end through the official openai client and raw HTTP: contract details of SPEC §2."""

from __future__ import annotations

import time

import anthropic
import httpx
import openai
import pytest

from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, make_app

AUTH = {"authorization": f"Bearer {DEV_KEY}"}
MODEL = "deepseek/deepseek-chat"


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def server(fake, tmp_path_factory):
    env = {"DEEPSEEK_API_KEY": "sk-secret-deepseek-abcdef123456", "DEEPSEEK_API_BASE": fake.base_url}
    # core + chat semantics without middleware (no retries, no cache): SPEC §2 as the surface itself provides it
    app = make_app(env=env, config={"server": {"heartbeat_s": 0.2}}, data_dir=tmp_path_factory.mktemp("d"),
                   only=("chat", "auth", "ops", "openai-compat"))
    with ServerThread(app) as server:
        yield server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)


def post(server, body, headers=None, **kw):
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers={**AUTH, **(headers or {})},
                      timeout=20, **kw)


def test_request_id_is_echoed_or_generated(server):
    assert post(server, {"model": "nope", "messages": []}, {"x-request-id": "abc-123"}).headers["x-request-id"] == \
        "abc-123"
    assert len(httpx.get(server.url + "/health/liveliness").headers["x-request-id"]) >= 8


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": MODEL, "messages": []}, 400, "$.messages"),
    ({"model": MODEL}, 400, "$.messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}, 400,
     "$.messages[1].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "$.messages[0].content[0].image_url"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "$.temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "timeout": -1}, 400, "$.timeout"),
    ({"model": 42, "messages": [{"role": "user", "content": "x"}]}, 400, "$.model"),
    ([1, 2], 400, "$"),
])
def test_bad_input_is_a_4xx_naming_the_path(server, body, status, param):
    response = post(server, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_malformed_json_and_empty_body(server):
    response = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "x", "messages": [', headers=AUTH)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = httpx.post(server.url + "/v1/chat/completions", content=b"", headers=AUTH)
    assert response.status_code == 400


def test_huge_body_is_413_and_the_server_keeps_serving(server, client, fake):
    big = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (65 * 1024 * 1024) + b'"}]}'
    response = httpx.post(server.url + "/v1/chat/completions", content=big, headers=AUTH, timeout=60)
    assert response.status_code == 413
    fake.script(Reply.say("still here"))
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}]) \
        .choices[0].message.content == "still here"


def test_unknown_route_and_method_use_the_error_envelope(server):
    response = httpx.get(server.url + "/v1/nothing", headers=AUTH)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    response = httpx.get(server.url + "/v1/chat/completions", headers=AUTH)
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def test_metadata_is_echoed_never_sent_upstream_and_served_headers_are_set(client, fake):
    fake.script(Reply.say("ok", model="deepseek-chat-v3"))
    raw = client.chat.completions.with_raw_response.create(
        model="text-deepseek", messages=[{"role": "user", "content": "hi"}],
        extra_body={"scillm_metadata": {"batch_id": "b1", "item_id": "i7"}, "timeout": 30, "unknown_knob": 3})
    body = raw.http_response.json()
    assert body["scillm_metadata"] == {"batch_id": "b1", "item_id": "i7"}
    assert body["model"] == "deepseek-chat-v3"
    assert raw.headers["x-scillm-provider"] == "deepseek"
    assert raw.headers["x-scillm-served-model"] == "deepseek-chat"
    assert raw.headers["x-scillm-attempts"] == "1"
    sent = fake.last.body
    assert "scillm_metadata" not in sent and "timeout" not in sent
    assert sent["unknown_knob"] == 3  # unknown OpenAI params pass through to OpenAI-compatible upstreams
    assert fake.last.headers["user-agent"].startswith("scillm/")
    assert fake.last.headers["authorization"] == "Bearer sk-secret-deepseek-abcdef123456"


def test_client_headers_are_not_forwarded(server, fake):
    fake.script(Reply.say("ok"))
    post(server, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
         {"user-agent": "evil-client/1.0", "x-custom": "leak"})
    assert fake.last.headers["user-agent"].startswith("scillm/")
    assert "x-custom" not in fake.last.headers


def test_heartbeats_while_waiting_for_the_first_token(server, fake):
    fake.script(Reply.say("late answer", delay_s=0.7))
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH, timeout=20,
                      json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
        body = r.read().decode()
    assert r.status_code == 200
    assert body.startswith(": heartbeat")
    assert body.rstrip().endswith("data: [DONE]")


def test_failure_before_the_first_byte_keeps_its_status(client, fake):
    fake.script(Reply.fail(429, "slow down", headers={"retry-after": "2"}))
    with pytest.raises(openai.RateLimitError):
        list(client.chat.completions.create(model=MODEL, stream=True, messages=[{"role": "user", "content": "x"}]))


def test_failure_after_the_first_chunk_is_an_error_event_not_a_clean_end(server, client, fake):
    fake.script(Reply.say("a long answer that breaks", error_after=3))
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model=MODEL, stream=True, messages=[{"role": "user", "content": "x"}]))
    fake.script(Reply.say("a long answer that is cut", cut_after=3))
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH, timeout=20,
                      json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
        body = r.read().decode()
    assert '"error"' in body and "[DONE]" not in body
    assert "sk-secret" not in body


def test_empty_answer_with_finish_length_is_thinking_budget_exhausted(client, fake):
    fake.script(Reply(text="", finish_reason="length"))
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "thinking_budget_exhausted"


@pytest.mark.parametrize(("reply", "status", "code"), [
    (Reply(text="", finish_reason="length"), 502, "thinking_budget_exhausted"),
    (Reply.fail(429, "You exceeded your current quota", type="insufficient_quota", code="insufficient_quota"), 429,
     "insufficient_quota"),
])
def test_the_sdk_does_not_retry_what_retrying_cannot_help(server, fake, reply, status, code):
    # the openai SDK retries 429 and 5xx twice by default: each retry would be another paid upstream call
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, timeout=20)
    before = len(fake.requests)
    fake.script(reply, Reply.say("a retry reached the upstream"))
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert (caught.value.status_code, caught.value.body["code"]) == (status, code)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(fake.requests) - before == 1
    fake.next_reply()  # drop the unused retry answer


def test_the_sdk_still_retries_what_may_pass(server, fake):
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, timeout=20)
    fake.script(Reply.fail(503, "overloaded, try again"), Reply.say("second time lucky"))
    answer = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert answer.parse().choices[0].message.content == "second time lucky" and answer.retries_taken == 1


def test_translated_stream_usage_chunk_only_when_asked_and_usage_in_finish_chunk_normalised(client, fake):
    # content parts: DeepSeek takes string content only, so the body is translated (flattened), not sent as is
    parts = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    fake.script(Reply.say("abc", usage_in_finish=True))
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, messages=parts))
    assert all(c.usage is None for c in chunks)
    assert fake.last.json["messages"] == [{"role": "user", "content": "x"}]
    fake.script(Reply.say("abc", usage_in_finish=True, keepalive=True, whole_tool_call=True))
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True},
                                                 messages=parts))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 18
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_same_dialect_stream_comes_back_as_the_upstream_sent_it(server, fake):
    fake.script(Reply.say("abc", usage_in_finish=True, keepalive=True))
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH, timeout=20, json={
            "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
        assert r.headers["x-scillm-dialect"] == "openai-chat"
        body = r.read()
    events = [e for e in body.split(b"\n\n") if e.strip()]
    assert events[0].startswith(b": keep-alive")  # the upstream's comments too, before its first event
    finish = [e for e in events if b'"finish_reason":"stop"' in e]
    assert len(finish) == 1 and b'"usage":{' in finish[0]  # usage where the upstream put it
    assert events[-1] == b"data: [DONE]"


def test_reasoning_content_passes_through(client, fake):
    fake.script(Reply.say("42", reasoning="thinking hard"))
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    message = reply.choices[0].message
    assert message.model_extra["reasoning_content"] == "thinking hard"


def test_request_timeout_is_an_overall_deadline(client, fake):
    fake.script(Reply(hang=True))
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       extra_body={"timeout": 0.5})
    assert caught.value.status_code == 504
    assert time.monotonic() - started < 5


def test_upstream_error_never_leaks_the_key(client, fake):
    key = "sk-secret-deepseek-abcdef123456"
    fake.script(Reply.fail(400, f"bad key {key} in header Bearer {key}"))
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert "sk-secret" not in caught.value.response.text


def test_models_lists_configured_providers_only(server):
    ids = {m["id"] for m in httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"]}
    assert {"deepseek/deepseek-chat", "text-deepseek"} <= ids
    assert not any(i.startswith("gpt-") for i in ids)


def test_models_read_by_the_anthropic_sdk(server):
    client = anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0, timeout=20)
    models = list(client.models.list())
    assert "deepseek/deepseek-chat" in [m.id for m in models]
    one = client.models.retrieve("deepseek/deepseek-chat")
    for model in (*models, one):  # ModelInfo's required fields, typed
        assert model.type == "model" and model.display_name == model.id and model.created_at.year == 1970


def test_models_retrieve_one_with_the_sdk(client):
    model = client.models.retrieve("deepseek/deepseek-chat")  # the SDK escapes the slash; the route takes it back
    assert (model.id, model.object) == ("deepseek/deepseek-chat", "model")
    with pytest.raises(openai.NotFoundError) as unknown:
        client.models.retrieve("no-such-model")
    assert unknown.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as unconfigured:  # known, but its provider has no key here
        client.models.retrieve("gpt-4o")
    assert "OPENAI_API_KEY" in unconfigured.value.message
