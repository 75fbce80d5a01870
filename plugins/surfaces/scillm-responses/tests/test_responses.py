"""``POST /v1/responses`` through the official openai client (``client.responses.create``, streaming and not,
tool calls both ways), routed to OpenAI-compatible upstreams and to the Codex backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, ToolCallSpec, make_app
from scillm_core.testing.contract import TINY_PNG_URL
from scillm_core.testing.fake_codex import FakeCodex

ONLY = ("chat", "auth", "ops", "responses", "openai-compat", "codex")
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture(scope="module")
def server(upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    data = tmp_path_factory.mktemp("responses")
    env = {"OPENAI_API_KEY": "sk-test-openai-0123456789abcdef", "OPENAI_API_BASE": upstream.base_url,
           "DEEPSEEK_API": "sk-test-deepseek-0123456789abcdef", "DEEPSEEK_API_BASE": upstream.base_url,
           "SCILLM_CODEX_AUTH": str(data / "no-codex-login.json")}
    with ServerThread(make_app(env=env, data_dir=data, only=ONLY)) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Any:
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)


def test_non_streaming_text(client: Any, upstream: FakeOpenAI) -> None:
    upstream.script(Reply.say("Olá! Tudo bem?"))
    raw = client.responses.with_raw_response.create(model="gpt-4o-mini", instructions="Answer in Portuguese.",
                                                    input="Say hi", max_output_tokens=200, temperature=0.3,
                                                    metadata={"run": "r1"})
    response = raw.parse()
    assert response.object == "response" and response.status == "completed" and response.id.startswith("resp_")
    assert response.output_text == "Olá! Tudo bem?"
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    assert response.usage.input_tokens == 11 and response.usage.output_tokens == 7 and response.usage.total_tokens == 18
    assert response.instructions == "Answer in Portuguese." and response.metadata == {"run": "r1"}
    assert raw.headers["x-scillm-provider"] == "openai"
    body = upstream.last.body
    assert body["messages"] == [{"role": "system", "content": "Answer in Portuguese."},
                                {"role": "user", "content": "Say hi"}]
    assert body["temperature"] == 0.3 and body["max_tokens"] == 200 and body["stream"] is False


def test_streaming_text_event_sequence(client: Any, upstream: FakeOpenAI) -> None:
    upstream.script(Reply.say("Streaming through scillm.", chunk_size=5, model="gpt-4o-mini-2024-07-18"))
    events = list(client.responses.create(model="gpt-4o-mini", input=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Stream please"}]}], stream=True))
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert {e.response.model for e in events if hasattr(e, "response")} == {"gpt-4o-mini-2024-07-18"}  # served
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Streaming through scillm."
    final = events[-1].response
    assert final.status == "completed" and final.output_text == "Streaming through scillm."
    assert final.usage is not None and final.usage.total_tokens == 18  # usage was asked upstream for the client
    assert upstream.last.body["stream_options"] == {"include_usage": True}
    assert upstream.last.body["messages"][0] == {"role": "system", "content": "Be brief."}


def test_tool_call_round_trip(client: Any, upstream: FakeOpenAI) -> None:
    upstream.script(Reply.call("get_weather", {"city": "Paris"}, id="call_paris"), Reply.say("Sunny in Paris."))
    first = client.responses.create(model="gpt-4o-mini", input="Weather in Paris?", tools=[WEATHER],
                                    tool_choice="auto")
    call = first.output[0]
    assert call.type == "function_call" and call.call_id == "call_paris" and call.name == "get_weather"
    assert orjson.loads(call.arguments) == {"city": "Paris"}
    assert upstream.last.body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city", "parameters": WEATHER["parameters"]}}]
    second = client.responses.create(model="gpt-4o-mini", tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Paris?"},
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"type": "function_call_output", "call_id": "call_paris", "output": '{"sky": "sunny"}'}])
    assert second.output_text == "Sunny in Paris."
    messages = upstream.last.body["messages"]
    assert messages[1]["role"] == "assistant" and messages[1]["tool_calls"][0]["id"] == "call_paris"
    assert messages[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert messages[2] == {"role": "tool", "tool_call_id": "call_paris", "content": '{"sky": "sunny"}'}


def test_streaming_tool_calls_with_the_sdk_stream_helper(client: Any, upstream: FakeOpenAI) -> None:
    upstream.script(Reply(tool_calls=(ToolCallSpec("get_weather", {"city": "Oslo"}, "call_o"),
                                      ToolCallSpec("get_weather", {"city": "Rome"}, "call_r"))))
    with client.responses.stream(model="gpt-4o-mini", input="Oslo and Rome?", tools=[WEATHER]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds.count("response.output_item.added") == 2 and kinds.count("response.function_call_arguments.done") == 2
    done = [e.arguments for e in events if e.type == "response.function_call_arguments.done"]
    assert [orjson.loads(a) for a in done] == [{"city": "Oslo"}, {"city": "Rome"}]
    assert [(o.type, o.call_id, o.name) for o in final.output] == [("function_call", "call_o", "get_weather"),
                                                                    ("function_call", "call_r", "get_weather")]
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    assert added == [0, 1]


def test_reasoning_from_deepseek_becomes_a_reasoning_item(client: Any, upstream: FakeOpenAI) -> None:
    upstream.script(Reply(text="4", reasoning="2 plus 2 is 4."), Reply(text="4", reasoning="Simple sum."))
    response = client.responses.create(model="deepseek/deepseek-reasoner", input="2+2?")
    assert [o.type for o in response.output] == ["reasoning", "message"]
    assert response.output[0].summary[0].text == "2 plus 2 is 4." and response.output_text == "4"
    events = list(client.responses.create(model="deepseek/deepseek-reasoner", input="2+2?", stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta") == "Simple sum."
    assert [o.type for o in events[-1].response.output] == ["reasoning", "message"]


def test_json_schema_and_reasoning_effort_are_translated(client: Any, upstream: FakeOpenAI) -> None:
    upstream.script(Reply.say('{"ok": true}'))
    client.responses.create(model="gpt-5", input="JSON please", reasoning={"effort": "low"},
                            text={"format": {"type": "json_schema", "name": "ok", "strict": True,
                                             "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}}}})
    body = upstream.last.body
    assert body["reasoning_effort"] == "low"
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "ok", "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}}, "strict": True}}


def test_errors_are_clear_4xx_naming_the_path(client: Any, upstream: FakeOpenAI) -> None:
    import openai

    sent = len(upstream.requests)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="gpt-4o-mini", input="again", previous_response_id="resp_123")
    assert caught.value.body["param"] == "$.previous_response_id" and "keeps no response state" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="gpt-4o-mini", input=[{"role": "robot", "content": "x"}])
    assert caught.value.body["param"] == "$.input[0].role"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="gpt-4o-mini", input=[{"type": "function_call_output", "output": "x"}])
    assert caught.value.body["param"] == "$.input[0].call_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model-xyz", input="hi")
    assert len(upstream.requests) == sent


def test_item_references_name_the_output_items_scillm_kept(client: Any, upstream: FakeOpenAI) -> None:
    """A translated answer's output items are kept (unless the request said ``store: false``), so a client that
    sends ``item_reference`` for them next (the Vercel AI SDK's OpenAI provider does by default) is understood:
    the upstream gets the items themselves. The streamed answer's items are kept before its last event."""
    import openai

    upstream.script(Reply.say("Bonjour."), Reply.call("get_weather", {"city": "Paris"}, id="call_paris"),
                    Reply.say("Sunny."), Reply.say("Not kept."))
    said = client.responses.create(model="gpt-4o-mini", input="hi")
    assert said.store is True
    events = list(client.responses.create(model="gpt-4o-mini", input="Weather?", tools=[WEATHER], stream=True))
    called = events[-1].response
    assert called.store is True and called.output[0].type == "function_call"
    client.responses.create(model="gpt-4o-mini", tools=[WEATHER], input=[
        {"role": "user", "content": "hi"}, {"type": "item_reference", "id": said.output[0].id},
        {"role": "user", "content": "Weather?"}, {"type": "item_reference", "id": called.output[0].id},
        {"type": "function_call_output", "call_id": "call_paris", "output": "sunny"}])
    assert upstream.last.body["messages"] == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Bonjour."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_paris", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_paris", "content": "sunny"}]
    unkept = client.responses.create(model="gpt-4o-mini", input="hi", store=False)
    assert unkept.store is False
    sent = len(upstream.requests)
    for reference in (unkept.output[0].id, "msg_never_made", 7):
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(model="gpt-4o-mini", input=[
                {"role": "user", "content": "hi"}, {"type": "item_reference", "id": reference}])
        assert caught.value.body["param"] == ("$.input[1].id" if reference == 7 else "$.input[1]")
    assert "no such item kept" in caught.value.message or "needs the id" in caught.value.message
    assert len(upstream.requests) == sent


@pytest.mark.anyio
async def test_kept_items_are_each_keys_own() -> None:
    """Items are kept under the caller's owner: another key's reference to them is a 400, as for unknown ones."""
    from scillm_responses import _resolve_references
    from scillm_responses.items import KeptItems

    from scillm_core import errors

    class Store:
        def __init__(self) -> None:
            self.documents: dict[str, Any] = {}

        async def put_many(self, namespace: str, documents: Any, *, ttl_s: float | None = None) -> None:
            assert ttl_s is not None and ttl_s > 0
            self.documents.update({f"{namespace}:{key}": value for key, value in documents})

        async def get_many(self, namespace: str, keys: Any) -> list[Any]:
            return [self.documents.get(f"{namespace}:{key}") for key in keys]

    runtime: Any = type("Runtime", (), {"store": Store()})()
    item = {"id": "msg_1", "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "x"}]}
    kept = KeptItems(runtime)
    kept.keep("key-a", [item])
    assert kept.task is not None
    await kept.task
    body = {"input": [{"type": "item_reference", "id": "msg_1"}]}
    assert (await _resolve_references(body, kept, "key-a"))["input"] == [item]
    with pytest.raises(errors.InvalidRequest, match="no such item kept"):
        await _resolve_references(body, kept, "key-b")


def test_errors_about_the_translated_request_name_the_clients_paths(client: Any, upstream: FakeOpenAI) -> None:
    """The instructions, joined function calls and hosted tools move things in the chat request scillm translates
    to; an error about that request (the model's checks, a provider's) names where the client's body has it."""
    import openai

    sent = len(upstream.requests)
    cases = [({"input": "hi", "max_output_tokens": "many"}, "$.max_output_tokens"),
             ({"input": "hi", "tools": [{"type": "web_search"}, {**WEATHER, "parameters": 5}]}, "$.tools[1]"),
             ({"instructions": "Be brief.", "input": [
                 {"role": "user", "content": "Weather?"},
                 {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                 {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                 {"role": "user", "content": [{"type": "input_text", "text": "And this?"},
                                              {"type": "input_image", "image_url": TINY_PNG_URL}]}]},
              "$.input[3].content[1]")]  # chat's $.messages[4].content[1], which a text-only upstream refuses
    for body, where in cases:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as caught:
                client.responses.create(model="deepseek/deepseek-chat", stream=stream, **body)
            assert caught.value.body["param"] == where, (body, caught.value.body)
            assert f"@ {where}" in caught.value.body["message"] and "$.messages" not in caught.value.body["message"]
    assert len(upstream.requests) == sent


def test_upstream_failures(client: Any, upstream: FakeOpenAI) -> None:
    import openai

    upstream.script(Reply.fail(429, "Rate limit reached", type="rate_limit_error", code="rate_limit_exceeded",
                               headers={"retry-after": "3"}))
    with pytest.raises(openai.RateLimitError) as caught:
        list(client.responses.create(model="gpt-4o-mini", input="hi", stream=True))
    assert caught.value.response.headers["retry-after"] == "3" and "openai" in caught.value.message
    upstream.script(Reply(text="This will break off midway", chunk_size=4, error_after=4))
    events = list(client.responses.create(model="gpt-4o-mini", input="hi", stream=True))
    assert events[-1].type == "response.failed" and events[-1].response.status == "failed"
    assert events[-1].response.error.message and "openai" in events[-1].response.error.message
    assert "response.completed" not in [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_raw_stream_wire_format(server: ServerThread, upstream: FakeOpenAI) -> None:
    """``event:`` line matching the data's ``type`` on every event, no ``[DONE]`` (what Codex CLI parses)."""
    upstream.script(Reply.say("Hi"))
    raw = httpx.post(server.url + "/v1/responses", headers={"authorization": f"Bearer {DEV_KEY}"},
                     json={"model": "gpt-4o-mini", "input": "hi", "stream": True}).text
    blocks = [b for b in raw.split("\n\n") if b.strip()]
    for block in blocks:
        event, data = block.split("\n")
        assert event == "event: " + orjson.loads(data.removeprefix("data: "))["type"]
    assert "[DONE]" not in raw


def test_codex_backend_serves_the_responses_surface(tmp_path: Path) -> None:
    """The Codex CLI path: a Responses client -> scillm -> the ChatGPT/Codex backend, with a tool round."""
    import openai

    with FakeCodex() as codex:
        auth = tmp_path / "auth.json"
        login = codex.login()
        auth.write_bytes(orjson.dumps(FakeCodex.auth_json(login)))
        env = {"SCILLM_CODEX_AUTH": str(auth), "CODEX_API_BASE": codex.base_url,
               "SCILLM_CODEX_TOKEN_URL": codex.token_url}
        with ServerThread(make_app(env=env, data_dir=tmp_path / "data", only=ONLY)) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)
            codex.script(Reply(reasoning="Need the shell.", tool_calls=(ToolCallSpec("shell", {"command": ["ls"]},
                                                                                     "call_ls"),)),
                         Reply.say("Two files."))
            events = list(client.responses.create(model="gpt-5-codex", instructions="You are Codex.", stream=True,
                                                  input="list files", tools=[{"type": "function", "name": "shell",
                                                                              "parameters": {"type": "object"}}]))
            final = events[-1].response
            assert [o.type for o in final.output] == ["reasoning", "function_call"]
            call = final.output[1]
            assert call.call_id == "call_ls" and orjson.loads(call.arguments) == {"command": ["ls"]}
            assert codex.last.body["instructions"] == "You are Codex."
            answer = client.responses.create(model="gpt-5-codex", instructions="You are Codex.", input=[
                {"role": "user", "content": "list files"}, call.model_dump(exclude_none=True),
                {"type": "function_call_output", "call_id": "call_ls", "output": "a.txt\nb.txt"}])
            assert answer.output_text == "Two files."
            items = codex.last.body["input"]  # same dialect: the client's own items, as it sent them
            assert items[1] == call.model_dump(exclude_none=True)
            assert items[2] == {"type": "function_call_output", "call_id": "call_ls", "output": "a.txt\nb.txt"}


def test_a_codex_answer_whose_completed_event_is_sparse_still_reaches_a_non_streaming_client_whole(
        tmp_path: Path) -> None:
    """The backend only streams; a non-streaming client gets the final Response object. When the terminal event
    carries only id and usage (as Codex's own mock server sends it), its output comes from the stream's items."""
    import openai

    with FakeCodex() as codex:
        auth = tmp_path / "auth.json"
        auth.write_bytes(orjson.dumps(FakeCodex.auth_json(codex.login())))
        env = {"SCILLM_CODEX_AUTH": str(auth), "CODEX_API_BASE": codex.base_url,
               "SCILLM_CODEX_TOKEN_URL": codex.token_url}
        with ServerThread(make_app(env=env, data_dir=tmp_path / "data", only=ONLY)) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)
            codex.script(Reply(reasoning="Think.", text="Two files.", sparse_final=True))
            answer = client.responses.create(model="gpt-5-codex", instructions="You are Codex.", input="list files")
    assert answer.output_text == "Two files."
    assert [o.type for o in answer.output] == ["reasoning", "message"]
    assert answer.object == "response" and answer.status == "completed" and answer.model == "gpt-5-codex"
    assert answer.id.startswith("resp_fake") and answer.usage is not None


def test_an_empty_answer_cut_by_the_output_limit_is_a_502(client: Any, upstream: FakeOpenAI) -> None:
    import openai

    upstream.script(Reply(text="", finish_reason="length"))
    with pytest.raises(openai.APIStatusError) as caught:
        client.responses.create(model="gpt-4o-mini", input="Say hi", max_output_tokens=16)
    assert caught.value.status_code == 502 and caught.value.body["code"] == "thinking_budget_exhausted"
    assert "max_output_tokens" in caught.value.body["message"]


def test_kept_items_are_found_while_queued_and_by_another_process_once_written(tmp_path: Any) -> None:
    """Keeping costs the answer a queue insert: the same process finds the items while they wait for the background
    write, and another process sharing the store finds them once written; another key finds nothing."""
    import asyncio

    from scillm_responses.items import KeptItems

    from scillm_core.state.sqlite import SQLiteStore

    async def run() -> tuple[list[Any], list[Any], list[Any], dict[str, int]]:
        stores = [SQLiteStore(tmp_path / "state.sqlite3") for _ in range(2)]
        here, there = (KeptItems(type("Runtime", (), {"store": store})()) for store in stores)  # type: ignore[arg-type]
        item = {"id": "msg_1", "type": "message", "role": "assistant", "content": []}
        here.keep("key_a", [item, {"type": "no id: not kept"}])
        queued = await here.find("key_a", ["msg_1"])
        assert here.task is not None
        await here.task
        written = await there.find("key_a", ["msg_1"])
        other_key = await there.find("key_b", ["msg_1"])
        for store in stores:
            await store.close()
        return queued, written, other_key, here.counts

    queued, written, other_key, counts = asyncio.run(run())
    assert queued == written == [{"id": "msg_1", "type": "message", "role": "assistant", "content": []}]
    assert other_key == [None] and counts == {"kept": 1, "dropped": 0, "write_errors": 0}
