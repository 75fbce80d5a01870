"""Recorded upstream bytes replayed through ``/v1/messages`` and parsed by the official ``anthropic`` SDK.

``fixtures/`` holds verbatim copies from ``shared/fixtures`` (provenance in its README):
``zai_glm_stream_reasoning_tool_call.sse`` (Z.ai GLM: 65 ``reasoning_content`` deltas, text, one whole tool call,
usage inside the finish chunk with cached tokens) and ``chat_completion_refusal.json`` (OpenAI ``refusal``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import orjson
import pytest
import scillm_auth
import scillm_messages
import scillm_openai_compat
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from scillm_core.testing import DEV_KEY, ServerThread, make_app

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[anthropic.Anthropic]:
    seen: list[dict] = []

    async def chat(request: Request) -> Response:
        body = orjson.loads(await request.body())
        seen.append(body)
        if body.get("stream"):
            return Response((FIXTURES / "zai_glm_stream_reasoning_tool_call.sse").read_bytes(),
                            media_type="text/event-stream")
        return Response((FIXTURES / "chat_completion_refusal.json").read_bytes(), media_type="application/json")

    with ServerThread(Starlette(routes=[Route("/v4/chat/completions", chat, methods=["POST"])])) as upstream:
        app = make_app(env={"GLM_API_KEY": "glm-secret", "GLM_API_BASE": upstream.url + "/v4"}, entry_points=False,
                       plugins=[("auth", scillm_auth), ("openai-compat", scillm_openai_compat),
                                ("messages", scillm_messages)], data_dir=tmp_path_factory.mktemp("recorded"))
        with ServerThread(app) as server:
            yield anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0, timeout=20)


def test_recorded_glm_reasoning_and_tool_call_stream(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="glm/glm-4.7-flash", max_tokens=4000, system="You are a helpful assistant",
                                messages=[{"role": "user", "content": "What's the weather in Florence,Italy?"}],
                                tools=[{"name": "weather", "description": "Get weather information for a location",
                                        "input_schema": {"type": "object", "properties": {
                                            "location": {"type": "string"}}}}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert [block.type for block in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[0].thinking.startswith("The user is asking for the weather")
    assert final.content[1].text == "I'll get the current weather information for Florence, Italy for you."
    tool = final.content[2]
    assert (tool.id, tool.name, tool.input) == ("call_3532c842716b4c72a7dd7498", "weather",
                                                {"location": "Florence,Italy"})
    assert final.stop_reason == "tool_use"
    # usage came inside GLM's finish chunk: 173 prompt tokens of which 172 were cache reads
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens, final.usage.output_tokens) == (1, 172, 93)
    assert kinds.count("thinking") == 65 and "input_json" in kinds


def test_recorded_openai_refusal(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model="glm/glm-4.7-flash", max_tokens=100,
                                     messages=[{"role": "user", "content": "Something harmful"}])
    assert [(b.type, b.text) for b in message.content] == [("text", "I'm very sorry, but I can't assist with that.")]
    assert message.stop_reason == "refusal"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (79, 12)
