"""Hostile input to the Responses surface's kept items: ``item_reference`` ids that are huge or hold control
characters, references that name one long answer many times over, another key's items, and ``store`` of the wrong
type. Each is a clear 4xx naming where, before any upstream call."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from scillm_core.testing import FakeOpenAI, Reply, ServerThread, make_app

MASTER_KEY = "sk-master-hostile-items-0123456789"
MODEL = "deepseek/deepseek-chat"
LIMIT_MB = 1.0


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture(scope="module")
def server(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    env = {"DEEPSEEK_API_KEY": "sk-hostile-deepseek-0123456789", "DEEPSEEK_API_BASE": fake.base_url,
           "SCILLM_MASTER_KEY": MASTER_KEY}
    config = {"resilience": {"max_retries": 0}, "server": {"max_body_mb": LIMIT_MB}}
    with ServerThread(make_app(env=env, config=config, data_dir=tmp_path_factory.mktemp("items"))) as server:
        yield server


def client(server: ServerThread, key: str = MASTER_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)


def post(server: ServerThread, body: Any, key: str = MASTER_KEY) -> httpx.Response:
    return httpx.post(server.url + "/v1/responses", content=json.dumps(body), timeout=30,
                      headers={"authorization": f"Bearer {key}", "content-type": "application/json"})


def reference(item_id: Any) -> dict[str, Any]:
    return {"type": "item_reference", "id": item_id}


def test_references_naming_one_long_answer_many_times_are_held_to_the_body_limit(server, fake):
    """A reference is a few dozen bytes and the item it names a whole answer: a body far under the limit that
    names a 300 kB answer ten times would reach the upstream (and scillm's memory) as 3 MB, a few thousand times
    as many gigabytes. The body with its items in is held to max_body_mb: a 413 naming $.input, no upstream call;
    three of them (under the limit) still go."""
    fake.script(Reply.say("long " * 60_000), Reply.say("fine"))
    long = client(server).responses.create(model=MODEL, input="Write at length.")
    item_id = long.output[0].id
    sent = len(fake.requests)
    response = post(server, {"model": MODEL, "input": [reference(item_id)] * 10 + [
        {"role": "user", "content": "Again?"}]})
    assert response.status_code == 413, response.text[:300]
    error = response.json()["error"]
    assert error["param"] == "$.input" and "10 item_reference" in error["message"], error
    assert len(fake.requests) == sent
    answer = client(server).responses.create(model=MODEL, input=[reference(item_id)] * 3 + [
        {"role": "user", "content": "Again?"}])
    assert answer.output_text == "fine"
    assert [m["role"] for m in fake.last.body["messages"]] == ["assistant"] * 3 + ["user"]


@pytest.mark.parametrize("item_id", ["z" * 100_000, "msg_\x00\x1b[31m\u202e" + "z" * 200, "\u00e9" * 129])
def test_a_huge_or_hostile_item_reference_id_is_never_echoed_whole(server, fake, item_id):
    sent = len(fake.requests)
    response = post(server, {"model": MODEL, "input": [{"role": "user", "content": "hi"}, reference(item_id)]})
    assert response.status_code == 400, response.text[:300]
    assert len(response.content) < 2000 and item_id[:65] not in response.text, response.text[:300]
    error = response.json()["error"]
    assert error["param"] == "$.input[1]" and "no such item kept" in error["message"]
    assert f"({len(item_id)} characters)" in error["message"] and "\x1b" not in error["message"]
    assert len(fake.requests) == sent


def test_another_keys_item_is_not_found_by_its_id(server, fake):
    """Items are kept under the key that got the answer: another key that learns an id (a leaked log, a shared
    transcript) gets the same 400 as for an id never made, and the owner still resolves it."""
    keys = [httpx.post(server.url + "/v1/scillm/keys", headers={"authorization": f"Bearer {MASTER_KEY}"},
                       json={"name": name}, timeout=30).json()["key"] for name in ("alice", "mallory")]
    fake.script(Reply.say("Alice's secret plan."), Reply.say("ok"))
    said = client(server, keys[0]).responses.create(model=MODEL, input="Plan?")
    sent = len(fake.requests)
    for key in (keys[1], MASTER_KEY):
        response = post(server, {"model": MODEL, "input": [reference(said.output[0].id)]}, key)
        assert response.status_code == 400 and "no such item kept" in response.text
        assert "secret plan" not in response.text
    assert len(fake.requests) == sent
    client(server, keys[0]).responses.create(model=MODEL, input=[reference(said.output[0].id)])
    assert fake.last.body["messages"] == [{"role": "assistant", "content": "Alice's secret plan."}]


@pytest.mark.parametrize("store", ["false", 0, None, [], {"keep": False}])
def test_store_of_the_wrong_type_is_a_400_naming_it_never_taken_as_keep(server, fake, store):
    """``store`` is a boolean; a client that sent "false" or 0 meant not to have its answer kept, and would have
    had it kept (anything but false kept). null is absent (OpenAI's default: kept)."""
    sent = len(fake.requests)
    response = post(server, {"model": MODEL, "input": "hi", "store": store})
    if store is None:
        assert response.status_code == 200 and response.json()["store"] is True
        return
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["param"] == "$.store" and "expected boolean" in error["message"], error
    assert len(fake.requests) == sent
