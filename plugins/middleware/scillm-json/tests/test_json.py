"""JSON repair and schema re-asks through the official ``openai`` client against the OpenAI-format fake."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, make_app

MODEL = "gpt-4o-mini"
KEY = "sk-json-test-secret-0123456789"
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture(scope="module")
def server(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    app = make_app(env={"OPENAI_API_KEY": KEY, "OPENAI_API_BASE": fake.base_url},
                   data_dir=tmp_path_factory.mktemp("json"))
    with ServerThread(app) as server:
        yield server


@pytest.fixture
def client(server: ServerThread, fake: FakeOpenAI) -> openai.OpenAI:
    fake.requests.clear()
    fake._script.clear()
    return openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)


def ask(client: openai.OpenAI, **kw: Any) -> Any:
    kw.setdefault("model", MODEL)
    kw.setdefault("messages", [{"role": "user", "content": "Describe Ada as JSON."}])
    return client.chat.completions.create(**kw)


def test_fenced_answer_with_trailing_comma_is_repaired(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.script(Reply.say('```json\n{"name": "Ada", "age": 36,}\n```'))
    answer = ask(client, response_format={"type": "json_object"})
    assert json.loads(answer.choices[0].message.content) == {"name": "Ada", "age": 36}
    assert answer.model_extra["json_repaired"] is True
    assert fake.last.body["response_format"] == {"type": "json_object"}


def test_x_expect_json_header_asks_for_json(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.script(Reply.say("Sure! Here it is:\n```json\n{\"ok\": true}\n```\nAnything else?"))
    answer = ask(client, extra_headers={"x-expect-json": "true"})
    assert json.loads(answer.choices[0].message.content) == {"ok": True}


def test_valid_json_and_non_json_requests_are_untouched(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.script(Reply.say('{"a": 1}'), Reply.say("```json\n{\"a\": 1,}\n```"))
    valid = ask(client, response_format={"type": "json_object"})
    assert valid.choices[0].message.content == '{"a": 1}'
    assert "json_repaired" not in (valid.model_extra or {})
    prose = ask(client)  # JSON not asked for: nothing is repaired
    assert prose.choices[0].message.content == "```json\n{\"a\": 1,}\n```"


def test_unrepairable_answer_is_502_json_validation_error(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.script(Reply.say("I am sorry, I cannot produce that."))
    with pytest.raises(openai.APIStatusError) as caught:
        ask(client, response_format={"type": "json_object"})
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "json_validation_error"
    assert "openai (gpt-4o-mini)" in caught.value.body["message"]


def test_schema_reask_succeeds_on_the_second_answer(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.script(Reply.say('{"name": "Ada", "age": "thirty-six"}'), Reply.say('{"name": "Ada", "age": 36}'))
    answer = ask(client, extra_body={"json_schema": {"name": "person", "schema": PERSON}})
    assert json.loads(answer.choices[0].message.content) == {"name": "Ada", "age": 36}
    assert answer.model_extra["schema_validated"] is True and answer.model_extra["schema_attempts"] == 2
    assert len(fake.requests) == 2
    reask = fake.requests[1].body["messages"]
    assert reask[-2] == {"role": "assistant", "content": '{"name": "Ada", "age": "thirty-six"}'}
    assert reask[-1]["role"] == "user" and "$.age" in reask[-1]["content"] and "integer" in reask[-1]["content"]
    assert "json_schema" not in fake.requests[0].body and "schema_retries" not in fake.requests[0].body


def test_schema_still_invalid_is_422_with_the_errors(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.script(*[Reply.say('{"name": 7}')] * 2)
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        ask(client, extra_body={"json_schema": PERSON, "schema_retries": 1})
    error = caught.value.body
    assert error["code"] == "schema_validation_failed"
    assert error["details"]["attempts"] == 2
    assert any("'age' is a required property" in e for e in error["details"]["errors"])
    assert any(e.startswith("$.name:") for e in error["details"]["errors"])
    assert len(fake.requests) == 2


def test_bad_schema_or_retries_is_400_before_any_upstream_call(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, extra_body={"json_schema": {"type": "objekt"}})
    assert caught.value.body["param"] == "$.json_schema.type"  # the path inside the schema
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, extra_body={"json_schema": PERSON, "schema_retries": 99})
    assert caught.value.body["param"] == "$.schema_retries"
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, extra_body={"json_schema": PERSON}, stream=True)
    assert caught.value.body["param"] == "$.json_schema"
    assert fake.requests == []


def test_streams_pass_through_untouched(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.script(Reply.say('{"a": 1,}'))
    stream = ask(client, response_format={"type": "json_object"}, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == '{"a": 1,}'


def test_health_reports_the_switch(server: ServerThread, tmp_path: Any, fake: FakeOpenAI) -> None:
    health = httpx.get(server.url + "/v1/scillm/health", headers={"authorization": f"Bearer {DEV_KEY}"}).json()
    assert health["middleware"]["json"] == {"enabled": True, "fails": "closed", "schema_retries": 2,
                                            "streams": "pass-through"}
    off = make_app(env={"OPENAI_API_KEY": KEY, "OPENAI_API_BASE": fake.base_url}, config={"json": {"enabled": False}},
                   data_dir=tmp_path)
    fake.script(Reply.say("not json at all"))
    with ServerThread(off) as plain:
        client = openai.OpenAI(base_url=plain.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)
        answer = ask(client, response_format={"type": "json_object"})
    assert answer.choices[0].message.content == "not json at all"


def test_exhausted_budget_is_reported_as_such_not_as_bad_json(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.script(Reply(text="", finish_reason="length"))
    with pytest.raises(openai.APIStatusError) as caught:
        ask(client, response_format={"type": "json_object"})
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "thinking_budget_exhausted"
