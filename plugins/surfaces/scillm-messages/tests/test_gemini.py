"""``POST /v1/messages`` routed to the Gemini provider (native wire, Gemini-format fake): the Anthropic SDK works
unchanged, streaming and tool loops included (thought signatures survive the round trip through tool_use ids)."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest
import scillm_auth
import scillm_gemini
import scillm_messages

from scillm_core.testing import DEV_KEY, Reply, ServerThread, make_app
from scillm_core.testing.contract import TINY_PNG_B64
from scillm_core.testing.fake_gemini import FakeGemini

KEY = "AIzaMessagesSecret0123456789abcdefghij"
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGemini]:
    with FakeGemini() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture(scope="module")
def client(fake: FakeGemini, tmp_path_factory: pytest.TempPathFactory) -> Iterator[anthropic.Anthropic]:
    app = make_app(env={"GEMINI_API_KEY": KEY, "GEMINI_API_BASE": fake.url}, entry_points=False,
                   plugins=[("auth", scillm_auth), ("gemini", scillm_gemini), ("messages", scillm_messages)],
                   data_dir=tmp_path_factory.mktemp("messages-gemini"))
    with ServerThread(app) as server:
        yield anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0, timeout=20)


def test_text_and_image(client: anthropic.Anthropic, fake: FakeGemini) -> None:
    fake.script(Reply.say("A tiny red square.", prompt_tokens=260, completion_tokens=6))
    message = client.messages.create(model="gemini-2.5-flash", max_tokens=100, system="Be exact.", messages=[
        {"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": TINY_PNG_B64}}]}])
    assert message.content[0].text == "A tiny red square."
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (260, 6)
    sent = fake.last
    assert sent.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert sent.headers["x-goog-api-key"] == KEY
    assert sent.body["contents"][0]["parts"] == [{"text": "What is in this image?"},
                                                 {"inlineData": {"mimeType": "image/png", "data": TINY_PNG_B64}}]
    assert "Be exact." in str(sent.body["systemInstruction"])


def test_streaming_text(client: anthropic.Anthropic, fake: FakeGemini) -> None:
    fake.script(Reply.say("Streaming from Gemini works fine."))
    with client.messages.stream(model="gemini-2.5-flash", max_tokens=100,
                                messages=[{"role": "user", "content": "Hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Streaming from Gemini works fine." == final.content[0].text
    assert final.stop_reason == "end_turn"
    assert fake.last.path.endswith(":streamGenerateContent") and fake.last.query == "alt=sse"


@pytest.mark.parametrize("model", ["gemini-2.5-flash", "gemini-3-flash-preview"])
def test_streaming_tool_round_trip(client: anthropic.Anthropic, fake: FakeGemini, model: str) -> None:
    fake.script(Reply.call("get_weather", {"city": "Paris"}), Reply.say("Sunny in Paris."))
    question = {"role": "user", "content": "Weather in Paris?"}
    with client.messages.stream(model=model, max_tokens=200, tools=[WEATHER], messages=[question]) as stream:
        first = stream.get_final_message()
    assert first.stop_reason == "tool_use"  # Gemini ends a tool-call turn with STOP
    (call,) = [b for b in first.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.input == {"city": "Paris"}

    second = client.messages.create(model=model, max_tokens=200, tools=[WEATHER], messages=[
        question, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21C"}]}])
    assert second.content[0].text == "Sunny in Paris."
    contents = fake.last.body["contents"]
    model_parts = contents[1]["parts"]
    assert any(p.get("functionCall", {}).get("name") == "get_weather" for p in model_parts)
    response_part = next(p for p in contents[2]["parts"] if "functionResponse" in p)
    assert response_part["functionResponse"]["name"] == "get_weather"
    assert "Sunny, 21C" in str(response_part["functionResponse"]["response"])
