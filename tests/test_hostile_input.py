"""Hostile input on the request path, with every bundled plugin loaded: schemas that point off the machine or at
themselves, JSON nested 300 deep in every carrier, malformed query integers, and what an error response carries.
Each is a 4xx naming where, before any upstream call, while the server keeps answering everyone else."""

from __future__ import annotations

import concurrent.futures
import json
import logging
from typing import Any

import httpx
import openai
import pytest

from scillm_core import hookimpl
from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, SilentListener, make_app

AUTH = {"authorization": f"Bearer {DEV_KEY}"}
MODEL = "deepseek/deepseek-chat"
USER = [{"role": "user", "content": "x"}]


def deep(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = {"a": value}
    return value


def deep_answer() -> Reply:
    """A well-formed completion whose message carries an extra field nested 300 deep."""
    body = FakeOpenAI().completion(Reply.say("fine"), "chatcmpl-deep", MODEL)
    body["choices"][0]["message"]["extra_detail"] = deep(300)
    return Reply(raw=json.dumps(body).encode())


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def server(fake, tmp_path_factory):
    env = {"DEEPSEEK_API_KEY": "sk-hostile-deepseek-0123456789", "DEEPSEEK_API_BASE": fake.base_url}
    app = make_app(env=env, data_dir=tmp_path_factory.mktemp("d"), config={"resilience": {"max_retries": 0}})
    with ServerThread(app) as server:
        yield server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=30)


def post(server, path: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(server.url + path, content=json.dumps(body), timeout=30,  # orjson stops at 254 levels
                      headers={**AUTH, "content-type": "application/json", "x-caller-skill": "hostile"}, **kw)


# -- schemas never fetch, never loop -------------------------------------------------------------------------------

def test_remote_ref_is_a_400_and_never_fetched_while_the_server_keeps_answering(server, fake, client):
    sent = len(fake.requests)
    with SilentListener() as listener, concurrent.futures.ThreadPoolExecutor(1) as pool:
        schema = {"type": "object", "properties": {"a": {"$ref": listener.url + "/anything"}}}
        call = pool.submit(post, server, "/v1/chat/completions",
                           {"model": MODEL, "messages": USER, "json_schema": schema})
        for _ in range(3):  # the event loop is never blocked by the schema
            assert httpx.get(server.url + "/health/liveliness", timeout=5).status_code == 200
        response = call.result(timeout=30)
        assert listener.connections == 0
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "$.json_schema.properties.a.$ref"
    assert "never fetched" in error["message"]
    assert len(fake.requests) == sent  # rejected before any upstream call


@pytest.mark.parametrize(("schema", "param"), [
    ({"$ref": "#"}, "$.json_schema"),
    ({"$ref": "#/$defs/a", "$defs": {"a": {"allOf": [{"$ref": "#/$defs/b"}]}, "b": {"$ref": "#/$defs/a"}}},
     "$.json_schema.$defs.a"),
    ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "$.json_schema.properties.a.$ref"),
    ({"properties": {"a": {"$ref": "file:///etc/passwd"}}}, "$.json_schema.properties.a.$ref"),
    ({"name": "wrapped", "schema": {"$ref": "other.json"}}, "$.json_schema.schema.$ref"),
])
def test_self_referencing_or_unresolvable_schemas_are_400_before_the_upstream_call(server, fake, schema, param):
    sent = len(fake.requests)
    response = post(server, "/v1/chat/completions", {"model": MODEL, "messages": USER, "json_schema": schema})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert len(fake.requests) == sent


def test_a_recursive_schema_that_descends_still_validates(client, fake):
    tree = {"type": "object", "properties": {"child": {"$ref": "#"}, "n": {"type": "integer"}}, "required": ["n"]}
    fake.script(Reply.say('{"n": 1, "child": {"n": 2}}'))
    completion = client.chat.completions.create(model=MODEL, messages=USER, extra_body={"json_schema": tree})
    assert completion.model_extra["schema_validated"] is True


# -- 300-deep JSON in every carrier --------------------------------------------------------------------------------

CHAT = {"model": MODEL, "messages": USER}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(("path", "body", "carrier"), [
    ("/v1/chat/completions", {**CHAT, "scillm_metadata": deep(300)}, "$.scillm_metadata"),
    ("/v1/chat/completions", {**CHAT, "vendor_option": deep(300)}, "$.vendor_option"),
    ("/v1/chat/completions", {**CHAT, "tools": [{**TOOL, "function": {"name": "f", "parameters": deep(300)}}]},
     "$.tools[0].function.parameters"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "meta": deep(300)}]},
     "$.messages[0].meta"),
    ("/v1/chat/completions", {**CHAT, "json_schema": deep(300)}, "$.json_schema"),
    ("/v1/chat/completions", {**CHAT, "json_schema": {"properties": {"a": deep(100)}}}, "$.json_schema"),
    ("/v1/messages", {"model": MODEL, "max_tokens": 5, "messages": USER, "metadata": deep(300)}, "$.metadata"),
    ("/v1/responses", {"model": MODEL, "input": "x", "metadata": deep(300)}, "$.metadata"),
    ("/v1/scillm/batch/completions", {"model": MODEL, "items": [{"prompt": "x"}], "vendor_option": deep(300)},
     "$.vendor_option"),
    ("/v1/scillm/batch/completions", {"model": MODEL, "items": [{"prompt": "x", "scillm_metadata": deep(300)}]},
     "$.items[0].scillm_metadata"),
    ("/v1/scillm/batch/completions", {"model": MODEL, "items": [{"prompt": "x", "json_schema": deep(70)}]},
     "$.items[0].json_schema"),
])
def test_deep_json_is_a_400_naming_the_carrier(server, fake, path, body, carrier):
    sent = len(fake.requests)
    response = post(server, path, body)
    assert response.status_code == 400, response.text[:300]
    error = response.json().get("error") or {}
    param = error.get("param") or error.get("message", "")  # the Anthropic envelope has no param: in the message
    assert carrier in param, response.text[:300]
    assert "nested" in error["message"]
    assert len(fake.requests) == sent
    assert httpx.get(server.url + "/health/liveliness").status_code == 200


def test_an_upstream_answer_nested_300_deep_is_a_502_not_a_500(client, fake):
    fake.script(deep_answer())
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=USER)
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_bad_response" and "nested deeper" in caught.value.body["message"]


@pytest.mark.parametrize("code", ["²", "9" * 5000, "99999999999"])
def test_an_upstream_error_event_with_an_odd_code_is_an_upstream_error_not_an_internal_one(server, fake, code):
    fake.script(Reply.say("a long answer", error_after=1, error_event={"error": {"message": "it broke", "code": code}}))
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                      json={"model": MODEL, "stream": True, "messages": USER}) as response:
        body = response.read().decode()
    error = json.loads(body.split("data: ")[-1])["error"]
    assert error["code"] != "internal_error" and "it broke" in error["message"], error


def test_one_unwritable_call_log_record_never_loses_the_others(server):
    runtime = server.app.runtime
    state = runtime.plugin_state["metrics"]

    async def write() -> list[dict[str, Any]]:
        good = [{"request_id": f"good-{i}", "caller": "c", "scillm_metadata": {"i": i}} for i in range(20)]
        bad = {"request_id": "bad", "caller": "c", "scillm_metadata": deep(300)}
        for record in [*good[:10], bad, *good[10:]]:
            state.enqueue(record)
        await state.log.flush(10)
        return await runtime.store.tail("calls", 1000)

    records = server_loop_run(server, write())
    ids = {r["request_id"] for r in records}
    assert {f"good-{i}" for i in range(20)} <= ids
    bad = next(r for r in records if r["request_id"] == "bad")
    assert "log_error" in bad and "scillm_metadata" not in bad
    assert state.log.counts["write_errors"] == 0


def server_loop_run(server: ServerThread, coro: Any) -> Any:
    import asyncio

    return asyncio.run_coroutine_threadsafe(coro, server.loop).result(timeout=30)


# -- bodies that are not JSON text ---------------------------------------------------------------------------------

BODIES = [("/v1/chat/completions", CHAT), ("/v1/messages", {**CHAT, "max_tokens": 5}),
          ("/v1/responses", {"model": MODEL, "input": "x"}), ("/v1/embeddings", {"model": MODEL, "input": "x"}),
          ("/v1/scillm/batch/completions", {"model": MODEL, "items": [{"prompt": "x"}]})]


@pytest.mark.parametrize(("path", "body"), BODIES)
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_a_compressed_body_is_a_415_naming_content_encoding_and_is_never_inflated(server, fake, path, body, encoding):
    import gzip

    sent = len(fake.requests)
    bomb = gzip.compress(b"[" + b" " * 20_000_000 + b"]")  # 20 MB of JSON in 20 KB: never inflated
    response = httpx.post(server.url + path, content=bomb, timeout=30,
                          headers={**AUTH, "content-type": "application/json", "content-encoding": encoding})
    assert response.status_code == 415, response.text[:300]
    error = response.json()["error"]
    assert "Content-Encoding" in (error.get("param") or error["message"]) and encoding in error["message"]
    assert len(fake.requests) == sent


@pytest.mark.parametrize(("path", "body"), BODIES)
def test_a_body_that_is_not_utf8_is_a_400_naming_the_byte(server, fake, path, body):
    sent = len(fake.requests)
    raw = json.dumps(body).encode().replace(b'"x"', b'"x\xff"', 1)  # a Latin-1 byte inside a string
    at = raw.index(b"\xff")
    response = httpx.post(server.url + path, content=raw, timeout=30,
                          headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 400, response.text[:300]
    message = response.json()["error"]["message"]
    assert f"not valid UTF-8: byte {at} is 0xff" in message and "surrogates" not in message
    assert len(fake.requests) == sent


@pytest.mark.parametrize(("path", "body"), BODIES)
def test_a_model_name_of_a_megabyte_is_a_400_never_echoed_nor_kept(server, fake, path, body):
    name = "deepseek/" + "m" * 1_000_000  # routable by its prefix: only the bound stops it going upstream
    sent = len(fake.requests)
    response = post(server, path, {**body, "model": name})
    assert len(response.content) < 2000, response.content[:300]
    assert response.status_code == 400 and "a model name has at most 512" in response.text
    assert len(fake.requests) == sent
    assert name not in httpx.get(server.url + "/v1/scillm/calls", params={"limit": 1000}, headers=AUTH).text


# -- query integers ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["²", "9" * 5000, "-1", "0", "1001", "1e3", " 5"])
def test_calls_limit_that_is_not_a_plain_integer_in_range_is_400(server, value):
    response = httpx.get(server.url + "/v1/scillm/calls", params={"limit": value}, headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["param"] == "query.limit", response.text[:200]


# -- what errors carry ---------------------------------------------------------------------------------------------

def test_error_responses_say_how_many_upstream_attempts_were_made(server, fake):
    fake.script(Reply.fail(400, "the model refuses this input"))
    response = post(server, "/v1/chat/completions", {"model": MODEL, "messages": USER})
    assert response.status_code == 400 and response.headers["x-scillm-attempts"] == "1"
    not_configured = post(server, "/v1/chat/completions", {"model": "glm/glm-5.1", "messages": USER})
    assert not_configured.status_code == 400 and not_configured.headers["x-scillm-attempts"] == "0"


class Boom:
    """A plugin whose route fails with an unexpected exception (a bug)."""

    @hookimpl
    def scillm_register_surfaces(self, surfaces, runtime):
        async def boom(request):
            raise RuntimeError("a plugin bug")

        surfaces.route("/v1/boom", boom, ["GET"], plugin="boom")


def test_an_unexpected_error_is_one_500_and_one_traceback(tmp_path, caplog):
    app = make_app(data_dir=tmp_path, plugins=[("boom", Boom())], only=("auth", "ops"))
    server = ServerThread(app)
    uvicorn_log = logging.getLogger("uvicorn")  # `scillm serve` sends uvicorn's records to the root handler too
    uvicorn_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.ERROR), server:
            response = httpx.get(server.url + "/v1/boom", headers=AUTH)
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    tracebacks = [r for r in caplog.records if r.exc_info or r.exc_text]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]
    assert "a plugin bug" in caplog.text


LONG_ID = "z" * 5000
ID_ROUTES = [("GET", "/v1/files/{}"), ("DELETE", "/v1/files/{}"), ("GET", "/v1/files/{}/content"),
             ("GET", "/v1/batches/{}"), ("POST", "/v1/batches/{}/cancel"), ("GET", "/v1/scillm/batch/{}"),
             ("GET", "/v1/scillm/keys/{}"), ("DELETE", "/v1/scillm/keys/{}"), ("GET", "/v1/scillm/exec/{}"),
             ("POST", "/v1/scillm/exec/{}/cancel"), ("GET", "/v1/scillm/opencode/runs/{}"),
             ("GET", "/v1/scillm/opencode/transport/runs/{}"), ("GET", "/v1/scillm/agents/{}/status"),
             ("GET", "/v1/scillm/ui/calls/{}"), ("GET", "/v1/models/{}"), ("GET", "/v1/no-such-route/{}"),
             ("PUT", "/v1/chat/completions/{}")]


@pytest.mark.parametrize(("method", "path"), ID_ROUTES)
def test_a_5000_character_id_is_never_echoed_whole(server, method, path):
    response = httpx.request(method, server.url + path.format(LONG_ID), headers={**AUTH, "x-caller-skill": "t"},
                             timeout=30)
    assert 400 <= response.status_code < 500, response.text[:300]
    assert "z" * 129 not in response.text and len(response.content) < 2000, response.text[:300]


def test_a_5000_character_input_file_id_is_not_echoed_whole(server):
    response = post(server, "/v1/batches", {"input_file_id": LONG_ID, "endpoint": "/v1/chat/completions",
                                            "completion_window": "24h"})
    assert response.status_code == 404 and "z" * 65 not in response.text


@pytest.fixture(scope="module")
def every_provider(fake, tmp_path_factory):
    """Every bundled provider configured (all pointing at the fake: each must refuse before calling it)."""
    env = {name: "sk-hostile-provider-0123456789" for name in ("DEEPSEEK_API_KEY", "OPENAI_API_KEY",
                                                                 "ANTHROPIC_API_KEY", "GEMINI_API_KEY")}
    env.update({f"{name}_API_BASE": fake.base_url for name in ("DEEPSEEK", "OPENAI", "GEMINI", "OLLAMA")})
    env["ANTHROPIC_API_BASE"] = fake.url
    app = make_app(env=env, data_dir=tmp_path_factory.mktemp("p"), config={"resilience": {"max_retries": 0}})
    with ServerThread(app) as server:
        yield server


BAD_FORMATS = [({"type": "json_schema", "json_schema": 5}, "$.response_format.json_schema"),
               ({"type": "json_schema", "json_schema": None}, "$.response_format.json_schema"),
               ({"type": "json_schema", "json_schema": [{"name": "x"}]}, "$.response_format.json_schema"),
               ({"type": "json_schema", "json_schema": "schema"}, "$.response_format.json_schema"),
               ({"type": "json_schema"}, "$.response_format.json_schema"),
               ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
                "$.response_format.json_schema.name"),
               ({"type": "json_schema", "json_schema": {"name": "x", "schema": 5}},
                "$.response_format.json_schema.schema"),
               ({"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}},
                "$.response_format.json_schema.schema"),
               ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
                "$.response_format.json_schema.strict"),
               ({"json_schema": {"name": "x", "schema": {}}}, "$.response_format.type"),
               (5, "$.response_format")]
PROVIDER_MODELS = ["deepseek/deepseek-chat", "openai/gpt-4o-mini", "anthropic/claude-haiku-4-5",
                   "gemini/gemini-2.5-flash", "ollama/llama3"]


@pytest.mark.parametrize("model", PROVIDER_MODELS)
@pytest.mark.parametrize(("response_format", "param"), BAD_FORMATS)
def test_a_malformed_response_format_is_a_400_naming_it_before_any_upstream_call(every_provider, fake, model,
                                                                                  response_format, param):
    calls = len(fake.requests)
    client = openai.OpenAI(base_url=every_provider.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model, messages=USER, response_format=response_format)
    assert raised.value.status_code == 400 and raised.value.body["param"] == param, raised.value.body
    assert param in raised.value.body["message"]
    assert len(fake.requests) == calls


def test_a_malformed_text_format_on_responses_is_a_400_naming_it(server, fake):
    calls = len(fake.requests)
    for fmt, param in (({"type": "json_schema", "name": "x", "schema": 5}, "$.text.format.schema"),
                       ({"type": "json_schema", "name": 5, "schema": {}}, "$.text.format.name")):
        response = post(server, "/v1/responses", {"model": MODEL, "input": "x", "text": {"format": fmt}})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert len(fake.requests) == calls


def test_a_well_formed_json_schema_still_reaches_the_upstream_as_sent(every_provider, fake):
    fake.script(Reply.say('{"a": 1}'))
    client = openai.OpenAI(base_url=every_provider.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=30)
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True}}
    answer = client.chat.completions.create(model=MODEL, messages=USER, response_format=fmt)
    assert answer.choices[0].message.content == '{"a": 1}' and fake.last.json["response_format"] == fmt


# -- reasoning carried back ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("block", "field"), [
    ({"type": "thinking", "thinking": deep(100), "signature": "sig"}, "thinking"),
    ({"type": "thinking", "thinking": [1] * 100_000, "signature": "sig"}, "thinking"),
    ({"type": "thinking", "thinking": 7, "signature": "sig"}, "thinking"),
    ({"type": "thinking", "thinking": "fine", "signature": {"a": 1}}, "signature"),
    ({"type": "redacted_thinking", "data": True}, "data")])
def test_a_messages_thinking_block_of_the_wrong_type_is_a_400_naming_it_not_reasoning_sent_on(server, fake, block,
                                                                                            field):
    """A thinking block's text goes back to DeepSeek (Kimi, GLM) as the turn's reasoning_content: an object, an
    array or a number there was sent on as its Python repr (a 100,000-item array as 300 kB of "[1, 1, ..."); a 400
    naming the field, before any upstream call."""
    sent = len(fake.requests)
    response = post(server, "/v1/messages", {"model": MODEL, "max_tokens": 100, "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [block, {"type": "text", "text": "Sunny."}]},
        {"role": "user", "content": "Thanks"}]})
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["message"].endswith(f"@ $.messages[1].content[0].{field}") and len(response.content) < 2000, error
    assert len(fake.requests) == sent


@pytest.mark.parametrize(("item", "where"), [
    ({"type": "reasoning", "summary": "thought"}, "summary"),
    ({"type": "reasoning", "summary": [{"type": "summary_text", "text": deep(100)}]}, "summary[0].text"),
    ({"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "a"}, 5]}, "content[1]"),
    ({"type": "reasoning", "summary": [{"type": "summary_text", "text": [1] * 100_000}]}, "summary[0].text"),
    ({"type": "reasoning", "summary": [], "encrypted_content": {"scillm": 1}}, "encrypted_content")])
def test_a_responses_reasoning_item_of_the_wrong_shape_is_a_400_naming_it_not_skipped(server, fake, item, where):
    """A reasoning item's text goes back to DeepSeek (Kimi, GLM) as the next turn's reasoning_content: one of the
    wrong shape was skipped silently, so the turn went on without the reasoning it came with; a 400 naming it."""
    sent = len(fake.requests)
    response = post(server, "/v1/responses", {"model": MODEL, "input": [
        {"role": "user", "content": "Weather?"}, item,
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]})
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["param"] == f"$.input[1].{where}" and len(response.content) < 2000, error
    assert len(fake.requests) == sent
