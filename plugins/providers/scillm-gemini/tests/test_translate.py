"""OpenAI <-> Gemini translation: request building, recorded responses and streams, errors; and end to end through
the official ``openai`` client (thoughtSignature echo, reasoning, JSON schema, faults)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from scillm_gemini import api_root, decode_call_id, encode_call_id, error_from_body
from scillm_gemini.translate import StreamState, build_body, finish_reason, parse_response, usage_from
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route as HttpRoute

from scillm_core import ChatRequest, errors, structure
from scillm_core.testing import DEV_KEY, Reply, ServerThread, make_app
from scillm_core.testing.contract import TINY_PNG_B64, TINY_PNG_URL, WEATHER_TOOL
from scillm_core.testing.fake_gemini import FakeGemini
from scillm_core.upstream import iter_sse

FIXTURES = Path("/work/shared/fixtures/gemini")
if not FIXTURES.is_dir():
    FIXTURES = Path(__file__).resolve().parents[4].parent / "shared" / "fixtures" / "gemini"
KEY = "AIzaSyTestSecretKey0123456789abcdefgh"
PLUGINS = ("chat", "auth", "ops", "gemini")


def request(**body: Any) -> ChatRequest:
    body.setdefault("model", "gemini-2.5-flash")
    return structure(body, ChatRequest)


async def no_fetch(url: str, where: str) -> tuple[str, str]:
    raise AssertionError(f"unexpected fetch of {url}")


def body_for(model: str = "gemini-2.5-flash", **kw: Any) -> dict[str, Any]:
    return asyncio.run(build_body(request(**kw), model, no_fetch))


# -- request ---------------------------------------------------------------------------------------------------------

def test_system_images_pdf_and_roles() -> None:
    pdf = "data:application/pdf;base64,JVBERi0xLjQK"
    body = body_for(messages=[
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "Describe"},
                                     {"type": "image_url", "image_url": {"url": TINY_PNG_URL}},
                                     {"type": "file", "file": {"file_data": pdf, "filename": "a.pdf"}}]},
        {"role": "assistant", "content": "A pixel."},
        {"role": "user", "content": "Thanks"}])
    assert body["systemInstruction"] == {"parts": [{"text": "You are a helpful assistant"},
                                                   {"text": "Answer briefly."}]}
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "Describe"},
                                   {"inlineData": {"mimeType": "image/png", "data": TINY_PNG_B64}},
                                   {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0xLjQK"}}]},
        {"role": "model", "parts": [{"text": "A pixel."}]},
        {"role": "user", "parts": [{"text": "Thanks"}]}]
    assert "generationConfig" not in body and "tools" not in body


def test_bad_parts_are_400_naming_the_path() -> None:
    with pytest.raises(errors.InvalidRequest) as caught:
        body_for(messages=[{"role": "user", "content": [
            {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "data:image/png,abc"}}]}])
    assert caught.value.param == "$.messages[0].content[1].image_url.url"
    with pytest.raises(errors.InvalidRequest) as caught:
        body_for(messages=[{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}])
    assert "file_data" in caught.value.message and caught.value.param == "$.messages[0].content[0].file"


def test_parameters_json_schema_and_tools() -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"],
              "additionalProperties": False}
    body = body_for(messages=[{"role": "user", "content": "hi"}], max_tokens=4000, temperature=0.2, top_p=0.9,
                    stop=["END"], seed=7, tools=[WEATHER_TOOL], tool_choice={"type": "function",
                                                                            "function": {"name": "get_weather"}},
                    response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    assert body["generationConfig"] == {"maxOutputTokens": 4000, "temperature": 0.2, "topP": 0.9,
                                        "stopSequences": ["END"], "seed": 7, "responseMimeType": "application/json",
                                        "responseJsonSchema": schema}
    assert body["tools"] == [{"functionDeclarations": [{
        "name": "get_weather", "description": "Weather for a city",
        "parametersJsonSchema": WEATHER_TOOL["function"]["parameters"]}]}]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}
    json_mode = body_for(messages=[{"role": "user", "content": "hi"}], response_format={"type": "json_object"},
                         tool_choice="none", tools=[WEATHER_TOOL])
    assert json_mode["generationConfig"] == {"responseMimeType": "application/json"}
    assert json_mode["toolConfig"] == {"functionCallingConfig": {"mode": "NONE"}}


def test_reasoning_effort_maps_to_thinking_config() -> None:
    hi = [{"role": "user", "content": "hi"}]
    assert body_for(messages=hi, reasoning_effort="low")["generationConfig"]["thinkingConfig"] == \
        {"thinkingBudget": 1024, "includeThoughts": True}
    assert body_for(messages=hi, reasoning_effort="none")["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 0}
    assert body_for("gemini-2.5-pro", messages=hi, reasoning_effort="none")["generationConfig"]["thinkingConfig"] == \
        {"thinkingBudget": 128}
    assert body_for("gemini-3-flash-preview", messages=hi, reasoning_effort="high")["generationConfig"][
        "thinkingConfig"] == {"thinkingLevel": "HIGH", "includeThoughts": True}
    with pytest.raises(errors.InvalidRequest) as caught:
        body_for(messages=hi, reasoning_effort="extreme")
    assert caught.value.param == "$.reasoning_effort"


def test_tool_round_trip_request_echoes_the_signature() -> None:
    signature = json.loads((FIXTURES / "streamGenerateContent_tool_call.sse").read_bytes()[6:].split(b"\r\n")[0])[
        "candidates"][0]["content"]["parts"][0]["thoughtSignature"]
    call_id = encode_call_id(signature)
    assert decode_call_id(call_id) == signature and len(call_id) <= len(signature) + 14  # no base64 growth
    assert all(c.isalnum() or c in "_-" for c in call_id)
    plain = encode_call_id(None)
    body = body_for(messages=[
        {"role": "user", "content": "What's the weather in Florence,Italy?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": "weather", "arguments": '{"location":"Florence"}'}},
            {"id": plain, "type": "function", "function": {"name": "time", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "40 C"},
        {"role": "tool", "tool_call_id": plain, "content": '{"hour": 12}'}])
    recorded = json.loads((FIXTURES / "streamGenerateContent_after_function_response.request.json").read_text())
    assert body["contents"][1] == {"role": "model", "parts": [
        {"functionCall": {"name": "weather", "args": {"location": "Florence"}}, "thoughtSignature": signature},
        {"functionCall": {"name": "time", "args": {}}}]}
    # both results in one user turn, strings wrapped as {"result": ...} like the recording, objects kept
    assert body["contents"][2] == {"role": "user", "parts": [
        {"functionResponse": {"name": "weather", "response": {"result": "40 C"}}},
        {"functionResponse": {"name": "time", "response": {"hour": 12}}}]}
    assert recorded["body"]["contents"][2]["parts"][0]["functionResponse"]["response"] == {"result": "40 C"}


def test_foreign_tool_call_ids_get_the_skip_signature_on_gemini_3() -> None:
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "toolu_01", "type": "function",
                                                      "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "toolu_01", "content": "ok"}]
    assert "thoughtSignature" not in body_for(messages=messages)["contents"][1]["parts"][0]
    assert body_for("gemini-3-flash-preview", messages=messages)["contents"][1]["parts"][0]["thoughtSignature"] == \
        "skip_thought_signature_validator"
    with pytest.raises(errors.InvalidRequest) as caught:
        body_for(messages=[{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "x", "content": "1"}])
    assert caught.value.param == "$.messages[1].tool_call_id"


# -- response --------------------------------------------------------------------------------------------------------

def test_recorded_tool_call_response() -> None:
    recorded = json.loads((FIXTURES / "generateContent_tool_roundtrip.json").read_text())
    body = recorded[0]["response"]["body"]
    response = parse_response(body, "gemini-2.5-flash")
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "weather" and json.loads(call.function.arguments) == {"location": "Florence,Italy"}
    assert decode_call_id(call.id) == body["candidates"][0]["content"]["parts"][0]["thoughtSignature"]
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == \
        (54, 15 + 48, 117)
    assert response.usage.extra["completion_tokens_details"] == {"reasoning_tokens": 48}
    text = parse_response(recorded[1]["response"]["body"], "gemini-2.5-flash")
    assert text.choices[0].message.content == "The weather in Florence, Italy is 40 C."
    assert text.choices[0].finish_reason == "stop" and text.model == "gemini-2.5-flash"


def test_finish_reasons_and_usage() -> None:
    assert finish_reason("STOP", False) == "stop"
    assert finish_reason("STOP", True) == "tool_calls"
    assert finish_reason("MAX_TOKENS", False) == "length"
    for reason in ("SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"):
        assert finish_reason(reason, False) == "content_filter"
    assert finish_reason("MALFORMED_FUNCTION_CALL", False) == "stop"
    usage = usage_from({"promptTokenCount": 10, "candidatesTokenCount": 5, "thoughtsTokenCount": 20,
                        "cachedContentTokenCount": 4, "totalTokenCount": 35})
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 25, 35)
    assert usage.extra == {"completion_tokens_details": {"reasoning_tokens": 20},
                           "prompt_tokens_details": {"cached_tokens": 4}}
    blocked = parse_response({"promptFeedback": {"blockReason": "SAFETY"},
                              "usageMetadata": {"promptTokenCount": 3, "totalTokenCount": 3}}, "gemini-2.5-flash")
    assert blocked.choices[0].finish_reason == "content_filter"


# Google Search grounding in the documented shape (no recorded grounded answer in shared/fixtures): byte offsets
# in the part a segment names; partIndex and startIndex left out when 0 (proto3 JSON).
REDIRECT = "https://vertexaisearch.cloud.google.com/grounding-api-redirect/AUZIYQ"
GROUNDED_PARTS = [{"text": "**Suche**", "thought": True},
                  {"text": "Über die Luft: "},                       # 16 characters, 18 bytes
                  {"text": "Spain won Euro 2024 — the fourth title. "},
                  {"functionCall": {"name": "weather", "args": {}}},
                  {"text": "Naïve “fans” cheered."}]


def _seg(part: int, text: str, cited: str, **kw: Any) -> dict[str, Any]:
    start = text.encode().index(cited.encode())
    segment = {"partIndex": part, "startIndex": start, "endIndex": start + len(cited.encode()), "text": cited, **kw}
    return {k: v for k, v in segment.items() if v != 0}


def grounding(*supports: Any) -> dict[str, Any]:
    return {"webSearchQueries": ["euro 2024 winner"],
            "searchEntryPoint": {"renderedContent": "<style>.container {}</style><div class=\"container\"></div>"},
            "groundingChunks": [{"web": {"uri": REDIRECT + "a", "title": "uefa.com"}},
                                {"web": {"uri": REDIRECT + "b", "title": "aljazeera.com"}},
                                {"retrievedContext": {"uri": "gs://bucket/doc", "title": "doc"}},
                                {"web": {"title": "no uri"}}],
            "groundingSupports": list(supports)}


def _cited(message: Any) -> list[tuple[str, str, str]]:
    """(url, title, the content's text at the annotation) of each annotation."""
    return [(n["url_citation"]["url"], n["url_citation"]["title"],
             message.content[n["url_citation"]["start_index"]:n["url_citation"]["end_index"]])
            for n in message.extra.get("annotations", ())]


def test_grounding_becomes_url_citations_located_in_characters_of_the_whole_content() -> None:
    """Byte offsets in a part become character offsets in the concatenated content: non-ASCII before the segment
    (and in it), a later part (its place after the parts before it; thought and call parts are not content),
    several sources of one segment, the same source and span once, startIndex left out when 0."""
    second, third = GROUNDED_PARTS[2]["text"], GROUNDED_PARTS[4]["text"]
    body = {"candidates": [{"content": {"parts": GROUNDED_PARTS, "role": "model"}, "finishReason": "STOP",
                            "index": 0, "groundingMetadata": grounding(
        {"segment": _seg(1, "Über die Luft: ", "Über die Luft"), "groundingChunkIndices": [1]},
        {"segment": _seg(2, second, "Spain won Euro 2024 — the fourth title."), "groundingChunkIndices": [0, 1, 0]},
        {"segment": _seg(4, third, "“fans” cheered"), "groundingChunkIndices": [0]})}],
        "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 30, "totalTokenCount": 39}}
    assert "startIndex" not in body["candidates"][0]["groundingMetadata"]["groundingSupports"][0]["segment"]
    message = parse_response(body, "gemini-2.5-flash").choices[0].message
    assert message.content == "Über die Luft: " + second + third
    assert message.extra["reasoning_content"] == "**Suche**" and message.tool_calls
    assert _cited(message) == [(REDIRECT + "b", "aljazeera.com", "Über die Luft"),
                               (REDIRECT + "a", "uefa.com", "Spain won Euro 2024 — the fourth title."),
                               (REDIRECT + "b", "aljazeera.com", "Spain won Euro 2024 — the fourth title."),
                               (REDIRECT + "a", "uefa.com", "“fans” cheered")]
    notes = message.extra["annotations"]
    assert notes[1] == {"type": "url_citation", "url_citation": {
        "url": REDIRECT + "a", "title": "uefa.com", "start_index": 15, "end_index": 54}}


def test_unusable_grounding_supports_are_skipped_not_a_500() -> None:
    text = GROUNDED_PARTS[1]["text"]
    good = {"segment": _seg(1, text, "die Luft"), "groundingChunkIndices": [0]}
    size = len(text.encode())
    bad = [{"segment": {"partIndex": 1, "endIndex": 5}},                              # no chunk indices
           {"segment": {"partIndex": 1, "endIndex": 5}, "groundingChunkIndices": [2, 3, 9, -1, True, "0", None]},
           {"segment": {"partIndex": 1, "startIndex": 4, "endIndex": size + 1}, "groundingChunkIndices": [0]},
           {"segment": {"partIndex": 1, "startIndex": 5, "endIndex": 5}, "groundingChunkIndices": [0]},
           {"segment": {"partIndex": 1, "startIndex": -2, "endIndex": 5}, "groundingChunkIndices": [0]},
           {"segment": {"partIndex": 1, "startIndex": 1, "endIndex": 5}, "groundingChunkIndices": [0]},  # inside Ü
           {"segment": {"partIndex": 0, "endIndex": 5}, "groundingChunkIndices": [0]},   # the thought part
           {"segment": {"partIndex": 3, "endIndex": 5}, "groundingChunkIndices": [0]},   # the function call
           {"segment": {"partIndex": 7, "endIndex": 5}, "groundingChunkIndices": [0]},
           {"segment": {"partIndex": "1", "endIndex": 5}, "groundingChunkIndices": [0]},
           {"segment": {"partIndex": 1, "endIndex": 5.0}, "groundingChunkIndices": [0]},
           {"segment": {"partIndex": 1}, "groundingChunkIndices": [0]},
           {"segment": "0-5", "groundingChunkIndices": [0]}, {"groundingChunkIndices": [0]}, None, "support"]
    parts = GROUNDED_PARTS[:4]

    def notes(metadata: Any) -> list[tuple[str, str, str]]:
        body = {"candidates": [{"content": {"parts": parts}, "finishReason": "STOP", "groundingMetadata": metadata}]}
        return _cited(parse_response(body, "gemini-2.5-flash").choices[0].message)

    assert notes(grounding(*bad, good)) == [(REDIRECT + "a", "uefa.com", "die Luft")]
    for metadata in (None, "grounded", [], {}, {"groundingChunks": "x", "groundingSupports": [good]},
                     {"groundingChunks": [{"web": "x"}, {"web": {"uri": 7}}], "groundingSupports": [good]},
                     {"groundingChunks": [], "groundingSupports": [good]}, {**grounding(), "groundingSupports": None},
                     {**grounding(good), "groundingChunks": None}):
        assert notes(metadata) == []
    web = grounding(good)
    web["groundingChunks"][0]["web"].pop("title")
    assert notes(web) == [(REDIRECT + "a", "", "die Luft")]


def _feed(state: StreamState, *events: dict[str, Any]) -> list[Any]:
    return [chunk for event in events for chunk in state.feed(event)]


def test_streamed_grounding_is_one_annotations_chunk_before_the_finish() -> None:
    """Stream events split the parts anywhere; the metadata (on the finishing event, or earlier) locates segments
    in the parts put together. Metadata after the finish is not read; a finish without metadata adds nothing."""
    thought, answer = "Suche läuft", "Über die Luft: Spain won Euro 2024 — the fourth title!"
    metadata = grounding({"segment": _seg(1, answer, "Spain won Euro 2024"), "groundingChunkIndices": [0, 1]})

    def event(part: dict[str, Any], **candidate: Any) -> dict[str, Any]:
        return {"candidates": [{"content": {"parts": [part], "role": "model"}, "index": 0, **candidate}],
                "modelVersion": "gemini-2.5-flash", "responseId": "r1"}

    def pieces() -> list[dict[str, Any]]:  # all but the last piece of the answer
        return [event({"text": thought[:5], "thought": True}), event({"text": thought[5:], "thought": True}),
                *(event({"text": answer[i:min(i + 5, len(answer) - 7)]}) for i in range(0, len(answer) - 7, 5))]

    for early in (False, True):
        events = [*pieces(), event({"text": answer[-7:]}, finishReason="STOP",
                                   **({} if early else {"groundingMetadata": metadata}))]
        if early:
            events[3]["candidates"][0]["groundingMetadata"] = metadata
        chunks = _feed(StreamState("gemini-2.5-flash", False), *events)
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        [(at, notes)] = [(i, c.choices[0].delta.extra["annotations"]) for i, c in enumerate(chunks)
                         if "annotations" in c.choices[0].delta.extra]
        assert at == len(chunks) - 2 and chunks[-1].choices[0].finish_reason == "stop"
        assert [(n["url_citation"]["url"], content[n["url_citation"]["start_index"]:n["url_citation"]["end_index"]])
                for n in notes] == [(REDIRECT + "a", "Spain won Euro 2024"), (REDIRECT + "b", "Spain won Euro 2024")]
    state = StreamState("gemini-2.5-flash", False)
    chunks = _feed(state, *pieces(), event({"text": answer[-7:]}, finishReason="STOP"),
                   {"candidates": [{"content": {"parts": [], "role": "model"}, "index": 0,
                                    "groundingMetadata": metadata}]})
    assert not any("annotations" in c.choices[0].delta.extra for c in chunks if c.choices)


async def _replay(name: str, include_usage: bool = True) -> list[Any]:
    async def chunks() -> AsyncIterator[bytes]:
        raw = (FIXTURES / name).read_bytes()
        for i in range(0, len(raw), 37):  # arbitrary splits, including inside "\r\n"
            yield raw[i:i + 37]

    state = StreamState("gemini-2.5-flash", include_usage)
    out = [c for event in [e async for e in iter_sse(chunks())] for c in state.feed(event.json())]
    assert state.complete
    return [*out, state.usage_chunk()]


def test_recorded_streams_translate() -> None:
    chunks = asyncio.run(_replay("streamGenerateContent_thinking_include_thoughts.sse"))
    reasoning = "".join(c.choices[0].delta.extra.get("reasoning_content", "") for c in chunks if c.choices)
    assert reasoning.startswith("**Determining the Weather Inquiry**")
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or ())]
    assert len(calls) == 1 and calls[0].function.name == "weather" and calls[0].index == 0
    assert decode_call_id(calls[0].id).startswith("CiQBvj72+y6VX8BA4jMLQJOJvw")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens == 14 + 62 and chunks[-1].choices == ()
    text = asyncio.run(_replay("streamGenerateContent_after_function_response.sse", include_usage=False))
    assert text[-1] is None  # no usage chunk unless asked
    assert "".join(c.choices[0].delta.content or "" for c in text[:-1]) == "The weather in Florence,Italy is 40 C."


# -- errors ----------------------------------------------------------------------------------------------------------

def test_error_mapping_from_recorded_bodies() -> None:
    invalid = json.loads((FIXTURES / "error_400_api_key_invalid.json").read_text())
    error = error_from_body(400, orjson.dumps(invalid["body"]), provider="gemini", model="m")  # array-wrapped
    assert isinstance(error, errors.UpstreamAuthError) and error.status == 401
    assert "API key not valid" in error.message and "GEMINI_API_KEY" in error.message

    limited = json.loads((FIXTURES / "error_429_resource_exhausted_retryinfo.json").read_text())
    error = error_from_body(429, orjson.dumps(limited["body"]), provider="gemini", model="m")
    assert isinstance(error, errors.UpstreamRateLimited)  # "quota" in the text, but a per-minute quota
    assert error.retry_after_s == 47 and error.headers["retry-after"] == "47"

    per_day = json.loads(json.dumps(limited["body"]).replace("PerModelPerMinute", "PerModelPerDay"))
    per_day["error"]["details"][2]["retryDelay"] = "45.837906927s"
    error = error_from_body(429, orjson.dumps(per_day), provider="gemini", model="m")
    assert isinstance(error, errors.UpstreamQuotaExceeded) and error.retry_after_s == pytest.approx(45.837906927)

    error = error_from_body(400, b'{"error": {"code": 400, "message": "Invalid JSON payload with ' + KEY.encode() +
                            b'", "status": "INVALID_ARGUMENT"}}', provider="gemini", model="m", secrets=(KEY,))
    assert isinstance(error, errors.UpstreamBadRequest) and error.code == "INVALID_ARGUMENT"
    assert KEY not in error.message
    error = error_from_body(404, b'{"error": {"code": 404, "message": "models/x is not found", "status": "NOT_FOUND"}}',
                            provider="gemini", model="x")
    assert error.status == 404 and error.code == "model_not_found"
    error = error_from_body(503, b'{"error": {"code": 503, "message": "The model is overloaded.", '
                            b'"status": "UNAVAILABLE"}}', provider="gemini", model="m")
    assert isinstance(error, errors.UpstreamUnavailable) and error.retryable


def test_base_url_composition() -> None:
    assert api_root("https://generativelanguage.googleapis.com") == "https://generativelanguage.googleapis.com/v1beta"
    assert api_root("https://generativelanguage.googleapis.com/v1beta/") == \
        "https://generativelanguage.googleapis.com/v1beta"
    assert api_root("https://generativelanguage.googleapis.com/v1beta/openai") == \
        "https://generativelanguage.googleapis.com/v1beta"
    assert api_root("http://proxy.local/gemini/v1") == "http://proxy.local/gemini/v1"
    assert api_root("http://proxy.local/gemini") == "http://proxy.local/gemini/v1beta"


# -- end to end through the openai client ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGemini]:
    with FakeGemini() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture(scope="module")
def server(fake: FakeGemini, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    app = make_app(env={"GEMINI_API_KEY": KEY, "GEMINI_API_BASE": fake.url}, only=PLUGINS,
                   data_dir=tmp_path_factory.mktemp("gemini"))
    with ServerThread(app) as server:
        yield server


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)


def test_gemini_3_tool_round_trip_with_signature(client: openai.OpenAI, fake: FakeGemini) -> None:
    """Gemini 3 rejects a replayed call without its signature: the id carries it back, streaming or not."""
    for stream in (False, True):
        fake.script(Reply.call("get_weather", {"city": "Paris"}), Reply.say("Sunny."))
        messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
        if stream:
            chunks = list(client.chat.completions.create(model="gemini-3-flash-preview", tools=[WEATHER_TOOL],
                                                         messages=messages, stream=True))
            delta = next(tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or []))
            call = {"id": delta.id, "type": "function",
                    "function": {"name": delta.function.name, "arguments": delta.function.arguments}}
        else:
            first = client.chat.completions.create(model="gemini-3-flash-preview", tools=[WEATHER_TOOL],
                                                   messages=messages)
            call = first.choices[0].message.tool_calls[0].model_dump()
        issued = fake.issued_signatures.copy()
        second = client.chat.completions.create(model="gemini-3-flash-preview", tools=[WEATHER_TOOL], messages=[
            *messages, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}])
        assert second.choices[0].message.content == "Sunny."
        replayed = fake.last.body["contents"][1]["parts"][0]
        assert replayed["thoughtSignature"] in issued
        assert fake.last.body["contents"][2]["parts"][0]["functionResponse"] == {
            "name": "get_weather", "response": {"result": "sunny"}}


def test_a_lost_signature_is_a_clear_upstream_400(client: openai.OpenAI, fake: FakeGemini) -> None:
    fake.strict_signatures = True
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="gemini-2.5-flash", messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                      "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "ok"}])
    finally:
        fake.strict_signatures = None
    assert "thought_signature" in caught.value.message and "gemini" in caught.value.message


def test_reasoning_and_json_schema_end_to_end(client: openai.OpenAI, fake: FakeGemini) -> None:
    fake.script(Reply.say('{"age": 30}', reasoning="Thinking about Alice."))
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    completion = client.chat.completions.create(
        model="text-gemini", reasoning_effort="low", messages=[{"role": "user", "content": "Alice is 30"}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    assert json.loads(completion.choices[0].message.content) == {"age": 30}
    assert completion.choices[0].message.model_extra["reasoning_content"] == "Thinking about Alice."
    assert completion.usage.completion_tokens_details.reasoning_tokens > 0
    assert fake.last.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    config = fake.last.body["generationConfig"]
    assert config["responseJsonSchema"] == schema and config["thinkingConfig"]["includeThoughts"] is True

    fake.script(Reply.say("Answer.", reasoning="Step one. Step two."))
    chunks = list(client.chat.completions.create(model="gemini-2.5-flash", stream=True, reasoning_effort="high",
                                                 messages=[{"role": "user", "content": "think"}]))
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content", "") for c in chunks
                        if c.choices)
    assert reasoning == "Step one. Step two."
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Answer."


def test_max_tokens_is_length(client: openai.OpenAI, fake: FakeGemini) -> None:
    fake.script(Reply.say("Partial", finish_reason="length"))
    completion = client.chat.completions.create(model="gemini-2.5-flash", max_tokens=3,
                                                messages=[{"role": "user", "content": "long"}])
    assert completion.choices[0].finish_reason == "length"
    assert fake.last.body["generationConfig"] == {"maxOutputTokens": 3}


def test_rate_limit_retry_info_reaches_the_client(client: openai.OpenAI, fake: FakeGemini) -> None:
    fake.script(Reply.fail(429, "Quota exceeded for metric", headers={"retry-after": "12"}))
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gemini-2.5-flash", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.response.headers["retry-after"] == "12"
    assert caught.value.code == "rate_limit_exceeded"


def test_invalid_key_is_401_without_the_key(client: openai.OpenAI, fake: FakeGemini) -> None:
    fake.script(Reply.fail(401, f"API key not valid: {KEY}"))
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="gemini-2.5-flash", stream=True,
                                       messages=[{"role": "user", "content": "hi"}])
    assert KEY not in caught.value.response.text and caught.value.code == "upstream_auth_failed"


@pytest.mark.parametrize("fault", [{"error_after": 1}, {"cut_after": 1}])
def test_stream_faults_surface_as_errors(client: openai.OpenAI, fake: FakeGemini, fault: dict[str, int]) -> None:
    fake.script(Reply.say("one two three four", chunk_size=5, **fault))
    with pytest.raises(openai.APIError) as caught:
        list(client.chat.completions.create(model="gemini-2.5-flash", stream=True,
                                            messages=[{"role": "user", "content": "hi"}]))
    assert "gemini" in str(caught.value.message)


def test_https_image_is_fetched_and_inlined(client: openai.OpenAI, fake: FakeGemini) -> None:
    png = base64.b64decode(TINY_PNG_B64)

    async def image(request: Any) -> Response:
        name = request.path_params["name"]
        if name == "big.png":
            return Response(b"\0" * (21 * 1024 * 1024), media_type="image/png")
        if name == "page.html":
            return Response(b"<html></html>", media_type="text/html")
        return Response(png, media_type="image/png")

    with ServerThread(Starlette(routes=[HttpRoute("/{name}", image)])) as host:
        fake.script(Reply.say("A pixel."))
        completion = client.chat.completions.create(model="gemini-2.5-flash", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": host.url + "/pixel.png"}}]}])
        assert completion.choices[0].message.content == "A pixel."
        assert fake.last.body["contents"][0]["parts"] == [{"inlineData": {"mimeType": "image/png",
                                                                          "data": TINY_PNG_B64}}]
        sent = len(fake.requests)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="gemini-2.5-flash", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": host.url + "/page.html"}}]}])
        assert "$.messages[0].content[0].image_url.url" in caught.value.message
        with pytest.raises(openai.APIStatusError) as large:
            client.chat.completions.create(model="gemini-2.5-flash", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": host.url + "/big.png"}}]}])
        assert large.value.status_code == 413
        assert len(fake.requests) == sent


def test_routing_names_and_models_listing(server: ServerThread) -> None:
    headers = {"authorization": f"Bearer {DEV_KEY}"}
    models = httpx.get(server.url + "/v1/models", headers=headers).json()
    ids = {m["id"] for m in models["data"]}
    assert {"text-gemini", "gemini-2.5-flash"} <= ids
    providers = httpx.get(server.url + "/v1/scillm/providers", headers=headers).text
    assert KEY not in providers and "gemini" in providers


def test_a_finish_event_of_the_wrong_shape_does_not_leave_the_stream_looking_complete() -> None:
    """The provider skips an event whose translation raises (``Malformed.read``); the candidate must not be marked
    finished by it first, or the stream would end as complete without its finish chunk (and without an error)."""
    state = StreamState("gemini-2.5-flash", False)
    state.feed({"candidates": [{"content": {"parts": [{"text": "Hel"}], "role": "model"}}]})
    with pytest.raises(TypeError):
        state.feed({"candidates": [{"content": {"parts": [{"text": "lo"}]}, "finishReason": ["STOP"]}]})
    assert not state.complete  # the provider then says "stream ended before a finishReason"
