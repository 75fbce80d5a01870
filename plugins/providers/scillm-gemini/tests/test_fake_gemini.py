"""FakeGemini is faithful: its bytes have the structure of the recorded fixtures, and the official ``google-genai``
SDK parses them (text, stream, function calls with thought signatures, thoughts, errors)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from scillm_core.testing import Reply
from scillm_core.testing.fake_gemini import FakeGemini

FIXTURES = Path("/work/shared/fixtures/gemini")
if not FIXTURES.is_dir():  # the shared folder sits next to the checkout
    FIXTURES = Path(__file__).resolve().parents[4].parent / "shared" / "fixtures" / "gemini"

HEADERS = {"x-goog-api-key": "test-key"}
BODY = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


def fixture_events(name: str) -> list[dict[str, Any]]:
    raw = (FIXTURES / name).read_bytes()
    assert raw.endswith(b"\r\n\r\n")
    return [json.loads(block.removeprefix(b"data: ")) for block in raw.split(b"\r\n\r\n") if block]


def keys(tree: Any) -> Any:
    """The key structure of a JSON value (lists reduced to their first element's structure)."""
    if isinstance(tree, dict):
        return {k: keys(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [keys(tree[0])] if tree else []
    return type(tree).__name__


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGemini]:
    with FakeGemini() as fake:
        yield fake  # type: ignore[misc]


def post(fake: FakeGemini, path: str, body: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(fake.url + path, json=BODY if body is None else body,
                      headers=HEADERS if headers is None else headers, timeout=10)


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    assert raw.endswith(b"\r\n\r\n") and b"\n\n" not in raw.replace(b"\r\n\r\n", b"")
    blocks = [b for b in raw.split(b"\r\n\r\n") if b]
    assert all(b.startswith(b"data: ") and b"\nevent:" not in b for b in blocks)
    assert b"[DONE]" not in raw
    return [json.loads(b[6:]) for b in blocks]


# -- structure against the recordings ------------------------------------------------------------------------------

def test_simple_stream_matches_the_recording(fake: FakeGemini) -> None:
    fake.script(Reply.say("Olá!", chunk_size=100))
    response = post(fake, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    ours = sse_events(response.content)
    recorded = fixture_events("streamGenerateContent_simple.sse")
    assert len(ours) == 1
    mine, theirs = keys(ours[0]), keys(recorded[0])
    theirs["usageMetadata"].pop("thoughtsTokenCount")  # no reasoning scripted
    assert mine == theirs
    assert ours[0]["candidates"][0]["finishReason"] == "STOP"
    # Google's own separators, non-ASCII unescaped, like the recording
    assert response.content.startswith(b'data: {"candidates": [{"content": {"parts": [{"text": "Ol\xc3\xa1!"}]')


def test_streamed_text_has_cumulative_usage_and_finish_only_last(fake: FakeGemini) -> None:
    fake.script(Reply.say("The weather in Florence is 40 C.", chunk_size=16, completion_tokens=12))
    events = sse_events(post(fake, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse").content)
    recorded = fixture_events("streamGenerateContent_after_function_response.sse")
    assert [keys(e) for e in events[:1]] == [keys(recorded[0])]
    assert keys(events[-1]) == keys(recorded[-1])
    counts = [e["usageMetadata"]["candidatesTokenCount"] for e in events]
    assert counts == sorted(counts) and counts[-1] == 12
    assert all(e["usageMetadata"]["promptTokenCount"] == 11 for e in events)
    assert ["finishReason" in e["candidates"][0] for e in events] == [False] * (len(events) - 1) + [True]
    assert len({e["responseId"] for e in events}) == 1


def test_function_call_event_matches_the_recording(fake: FakeGemini) -> None:
    fake.script(Reply.call("weather", {"location": "Florence,Italy"}, reasoning="**Determining the Weather**"))
    events = sse_events(post(fake, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse").content)
    recorded = fixture_events("streamGenerateContent_thinking_include_thoughts.sse")
    assert [keys(e) for e in events] == [keys(e) for e in recorded]
    thought, call = events
    assert thought["candidates"][0]["content"]["parts"][0]["thought"] is True
    assert "candidatesTokenCount" not in thought["usageMetadata"]  # as recorded: thoughts come first
    part = call["candidates"][0]["content"]["parts"][0]
    assert "id" not in part["functionCall"] and part["thoughtSignature"] in fake.issued_signatures
    assert call["candidates"][0]["finishMessage"] == "Model generated function call(s)."


def test_non_streaming_matches_the_recording(fake: FakeGemini) -> None:
    recorded = json.loads((FIXTURES / "generateContent_tool_roundtrip.json").read_text())
    fake.script(Reply.call("weather", {"location": "Florence,Italy"}, reasoning="thinking"),
                Reply.say("The weather in Florence, Italy is 40 C."))
    first = post(fake, "/v1beta/models/gemini-2.5-flash:generateContent")
    assert first.headers["content-type"] == "application/json; charset=UTF-8"
    body = first.json()
    expected = recorded[0]["response"]["body"]
    # the recorded answer did not include thoughts in its parts; ours has one thought part before the call
    assert [keys(p) for p in body["candidates"][0]["content"]["parts"][1:]] == \
        [keys(p) for p in expected["candidates"][0]["content"]["parts"]]
    assert keys({**body, "candidates": []}) == keys({**expected, "candidates": []})
    second = post(fake, "/v1beta/models/gemini-2.5-flash:generateContent").json()
    assert keys(second) == keys(recorded[1]["response"]["body"])


def test_array_stream_without_alt_sse(fake: FakeGemini) -> None:
    fake.script(Reply.say("Scoop", reasoning="Considering", chunk_size=100))
    raw = post(fake, "/v1beta/models/gemini-2.5-flash:streamGenerateContent").content
    recorded = (FIXTURES / "streamGenerateContent_no_alt_json_array.txt").read_bytes()
    assert raw[:2] == recorded[:2] == b"[{" and raw[-2:] == recorded[-2:] == b"\n]"
    for body in (raw, recorded):  # elements joined by "\n,\r\n", as recorded
        assert body.count(b"\n,\r\n") == len(json.loads(body)) - 1
    assert keys(json.loads(raw)[0]["candidates"]) == keys(json.loads(recorded)[0]["candidates"])


def test_errors_match_the_recordings(fake: FakeGemini) -> None:
    limit = json.loads((FIXTURES / "error_429_resource_exhausted_retryinfo.json").read_text())
    fake.script(Reply.fail(429, "You exceeded your current quota", headers={"retry-after": "47"}))
    response = post(fake, "/v1beta/models/gemini-2.5-flash:generateContent")
    assert response.status_code == 429 and "retry-after" not in response.headers
    body = response.json()
    assert keys(body)["error"].keys() == keys(limit["body"])["error"].keys()
    assert [d["@type"] for d in body["error"]["details"]] == [d["@type"] for d in limit["body"]["error"]["details"]]
    assert body["error"]["details"][-1] == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "47s"}

    invalid = json.loads((FIXTURES / "error_400_api_key_invalid.json").read_text())
    fake.script(Reply.fail(401, "API key not valid. Please pass a valid API key."))
    response = post(fake, "/v1beta/models/gemini-2.5-flash:streamGenerateContent")  # no alt=sse: array-wrapped
    assert response.status_code == 400 and response.json() == invalid["body"]


def test_auth_and_signature_checks(fake: FakeGemini) -> None:
    assert post(fake, "/v1beta/models/gemini-2.5-flash:generateContent", headers={}).status_code == 403
    assert post(fake, "/v1beta/models/gemini-2.5-flash:generateContent?key=abc", headers={}).status_code == 200
    history = {"contents": [
        {"role": "user", "parts": [{"text": "weather?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "weather", "args": {}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "weather", "response": {"result": "40 C"}}}]}]}
    assert post(fake, "/v1beta/models/gemini-2.5-flash:generateContent", history).status_code == 200
    missing = post(fake, "/v1beta/models/gemini-3-flash-preview:generateContent", history)
    assert missing.status_code == 400 and "thought_signature" in missing.json()["error"]["message"]
    history["contents"][1]["parts"][0]["thoughtSignature"] = "Q29ycnVwdA=="
    corrupted = post(fake, "/v1beta/models/gemini-2.5-flash:generateContent", history)
    assert corrupted.json()["error"]["message"] == "Corrupted thought signature."


# -- the official SDK parses the fake ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def genai_client(fake: FakeGemini) -> Any:
    from google import genai
    from google.genai import types

    return genai.Client(api_key="dummy-key", http_options=types.HttpOptions(
        base_url=fake.url, retry_options=types.HttpRetryOptions(attempts=1)))


def test_sdk_generate_content(fake: FakeGemini, genai_client: Any) -> None:
    fake.script(Reply.say("Hello from Gemini.", reasoning="Let me think.", prompt_tokens=5, completion_tokens=4))
    response = genai_client.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert response.text == "Hello from Gemini."
    assert response.candidates[0].finish_reason.name == "STOP"
    assert response.candidates[0].content.parts[0].thought is True
    assert response.usage_metadata.prompt_token_count == 5 and response.usage_metadata.candidates_token_count == 4
    assert fake.last.headers["x-goog-api-key"] == "dummy-key"


def test_sdk_stream_with_function_call(fake: FakeGemini, genai_client: Any) -> None:
    import base64

    fake.script(Reply.call("get_weather", {"city": "Paris"}))
    chunks = list(genai_client.models.generate_content_stream(model="gemini-2.5-flash", contents="weather?"))
    calls = [c for chunk in chunks for c in (chunk.function_calls or [])]
    assert [(c.name, c.args) for c in calls] == [("get_weather", {"city": "Paris"})]
    signature = chunks[-1].candidates[0].content.parts[0].thought_signature
    assert base64.b64encode(signature).decode() in fake.issued_signatures
    assert fake.last.query == "alt=sse"


def test_sdk_stream_text(fake: FakeGemini, genai_client: Any) -> None:
    fake.script(Reply.say("Streaming works fine.", chunk_size=5))
    chunks = list(genai_client.models.generate_content_stream(model="gemini-2.5-flash", contents="hi"))
    assert "".join(c.text or "" for c in chunks) == "Streaming works fine."
    assert chunks[-1].usage_metadata.candidates_token_count == 7


def test_sdk_reads_google_search_grounding(fake: FakeGemini, genai_client: Any) -> None:
    """A cited answer to a request with the googleSearch tool carries groundingMetadata on its last event, which
    google-genai parses; each segment's bytes in the part it names are its text (documented, not recorded)."""
    from google.genai import types

    url = "https://vertexaisearch.cloud.google.com/grounding-api-redirect/AUZIYQ"
    reply = Reply.cite(("Grüße — ", ()), ("Spain won Euro 2024", ({"url": url, "title": "uefa.com"},)), (".", ()),
                       reasoning="Searching.")
    search = types.GenerateContentConfig(tools=[types.Tool(google_search=types.GoogleSearch())])
    fake.script(reply)
    response = genai_client.models.generate_content(model="gemini-2.5-flash", contents="who won?", config=search)
    assert fake.last.body["tools"] == [{"googleSearch": {}}]
    metadata = response.candidates[0].grounding_metadata
    assert [(c.web.uri, c.web.title) for c in metadata.grounding_chunks] == [(url, "uefa.com")]
    [support] = metadata.grounding_supports
    segment, parts = support.segment, response.candidates[0].content.parts
    assert support.grounding_chunk_indices == [0] and segment.part_index == 1 and not parts[1].thought
    assert parts[1].text.encode()[segment.start_index:segment.end_index].decode() == segment.text == \
        "Spain won Euro 2024"
    assert metadata.web_search_queries and metadata.search_entry_point.rendered_content
    fake.script(reply)
    chunks = list(genai_client.models.generate_content_stream(model="gemini-2.5-flash", contents="who won?",
                                                              config=search))
    assert [c.candidates[0].grounding_metadata is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    fake.script(reply)
    plain = genai_client.models.generate_content(model="gemini-2.5-flash", contents="who won?")
    assert plain.candidates[0].grounding_metadata is None and plain.text == reply.text


def test_sdk_sees_errors(fake: FakeGemini, genai_client: Any) -> None:
    from google.genai import errors

    fake.script(Reply.fail(429, "Resource exhausted", headers={"retry-after": "3"}))
    with pytest.raises(errors.ClientError) as caught:
        genai_client.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert caught.value.code == 429 and caught.value.status == "RESOURCE_EXHAUSTED"
    fake.script(Reply.fail(500, "Internal error encountered."))
    with pytest.raises(errors.ServerError) as server:
        genai_client.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert server.value.code == 500 and server.value.status == "INTERNAL"


# -- embeddings: the request google-genai builds is what the fake checks, and the SDK parses the answer -------------

def test_sdk_embed_content(fake: FakeGemini, genai_client: Any) -> None:
    from google.genai import types

    from scillm_core.testing import fake_vector

    result = genai_client.models.embed_content(
        model="gemini-embedding-001", contents=["first text", "second text"],
        config=types.EmbedContentConfig(task_type="RETRIEVAL_DOCUMENT", output_dimensionality=4))
    assert [e.values for e in result.embeddings] == [fake_vector("first text", 4), fake_vector("second text", 4)]
    assert result.usage_metadata.prompt_token_count == 4
    sent = fake.last
    assert sent.path.endswith("/models/gemini-embedding-001:batchEmbedContents")  # the SDK's API version
    assert sent.body["requests"][1] == {"model": "models/gemini-embedding-001", "taskType": "RETRIEVAL_DOCUMENT",
                                         "outputDimensionality": 4,
                                         "content": {"parts": [{"text": "second text"}], "role": "user"}}


def test_embed_content_validation_is_the_apis(fake: FakeGemini) -> None:
    url = "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    mismatch = post(fake, url, {"requests": [{"model": "models/other", "content": {"parts": [{"text": "x"}]}}]})
    assert mismatch.status_code == 400 and "does not match" in mismatch.json()["error"]["message"]
    too_many = post(fake, url, {"requests": [{"model": "models/gemini-embedding-001",
                                              "content": {"parts": [{"text": "x"}]}}] * 101})
    assert too_many.status_code == 400 and "at most 100" in too_many.json()["error"]["message"]
    single = post(fake, "/v1beta/models/gemini-embedding-001:embedContent", {"content": {"parts": [{"text": "x"}]}})
    assert set(single.json()) == {"embedding"}
