"""``POST /v1/responses`` routed to the Gemini provider (native wire, Gemini-format fake): the openai client's
``responses.create`` works unchanged, streaming and a tool round trip included."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from scillm_core.testing import DEV_KEY, Reply, ServerThread, make_app
from scillm_core.testing.fake_gemini import FakeGemini

KEY = "AIzaResponsesSecret0123456789abcdefghij"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGemini]:
    with FakeGemini() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture(scope="module")
def client(fake: FakeGemini, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import openai

    app = make_app(env={"GEMINI_API_KEY": KEY, "GEMINI_API_BASE": fake.url}, only=("auth", "gemini", "responses"),
                   data_dir=tmp_path_factory.mktemp("responses-gemini"))
    with ServerThread(app) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)


def test_text(client: Any, fake: FakeGemini) -> None:
    fake.script(Reply.say("Bonjour !"))
    response = client.responses.create(model="gemini-2.5-flash", instructions="Answer in French.", input="Say hi")
    assert response.output_text == "Bonjour !" and response.status == "completed"
    sent = fake.last
    assert sent.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert sent.headers["x-goog-api-key"] == KEY
    assert sent.body["systemInstruction"]["parts"] == [{"text": "Answer in French."}]


def test_streaming(client: Any, fake: FakeGemini) -> None:
    fake.script(Reply.say("Streaming from Gemini works."))
    with client.responses.stream(model="gemini-2.5-flash", input="Stream please") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Streaming from Gemini works." == final.output_text
    assert fake.last.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent"


def test_tool_round_trip(client: Any, fake: FakeGemini) -> None:
    fake.script(Reply.call("get_weather", {"city": "Lyon"}), Reply.say("Sunny in Lyon."))
    first = client.responses.create(model="gemini-2.5-flash", input="Weather in Lyon?", tools=[WEATHER])
    call = next(item for item in first.output if item.type == "function_call")
    assert call.name == "get_weather" and call.arguments.replace(" ", "") == '{"city":"Lyon"}'
    second = client.responses.create(model="gemini-2.5-flash", tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Lyon?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'}])
    assert second.output_text == "Sunny in Lyon."
    parts = [p for c in fake.last.body["contents"] for p in c["parts"]]
    response = next(p["functionResponse"] for p in parts if "functionResponse" in p)
    assert response["name"] == "get_weather" and "sunny" in str(response["response"])
