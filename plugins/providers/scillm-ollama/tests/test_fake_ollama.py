"""FakeOllama is faithful: its NDJSON and JSON have the structure of the recorded fixtures, and the official
``ollama`` Python client parses them (chat, stream, tools, thinking, tags, errors)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from scillm_core.testing import Reply
from scillm_core.testing.fake_ollama import FakeOllama

FIXTURES = Path("/work/shared/fixtures/ollama")
if not FIXTURES.is_dir():
    FIXTURES = Path(__file__).resolve().parents[4].parent / "shared" / "fixtures" / "ollama"

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "why is the sky blue?"}]}


def ndjson(raw: bytes) -> list[dict[str, Any]]:
    assert raw.endswith(b"\n")
    return [json.loads(line) for line in raw.split(b"\n") if line]


def keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [keys(value[0])] if value else []
    return type(value).__name__


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllama() as fake:
        yield fake  # type: ignore[misc]


def test_text_stream_matches_the_recording(fake: FakeOllama) -> None:
    fake.script(Reply.say("The sky", chunk_size=4))
    response = httpx.post(fake.url + "/api/chat", json=CHAT)  # no "stream": Ollama streams by default
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = ndjson(response.content)
    recorded = ndjson((FIXTURES / "chat_stream_text.ndjson").read_bytes())
    first = {**recorded[0], "message": {"role": "assistant", "content": "The"}}  # the recording has images: null
    assert [list(line) for line in lines[:-1]] == [list(first)] * (len(lines) - 1)
    assert list(lines[0]["message"]) == ["role", "content"]
    final = recorded[-1]
    assert set(lines[-1]) == set(final) | {"done_reason"}  # this doc example predates done_reason
    assert all(isinstance(lines[-1][k], int) for k in final if k.endswith(("duration", "count")))
    assert "".join(line["message"]["content"] for line in lines) == "The sky"
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"


@pytest.mark.parametrize(("ids", "fixture"), [(True, "chat_stream_tool_call_with_id.ndjson"),
                                              (False, "chat_stream_tool_call.ndjson")])
def test_tool_call_stream_matches_the_recording(fake: FakeOllama, ids: bool, fixture: str) -> None:
    fake.tool_call_ids = ids
    try:
        fake.script(Reply.call("get_weather", {"city": "Tokyo"}))
        lines = ndjson(httpx.post(fake.url + "/api/chat", json={**CHAT, "stream": True}).content)
    finally:
        fake.tool_call_ids = True
    recorded = ndjson((FIXTURES / fixture).read_bytes())
    assert [keys(line) for line in lines] == [keys(line) for line in recorded]
    assert set(lines[-1]) == set(recorded[-1])
    call = lines[0]["message"]["tool_calls"][0]
    assert call["function"]["arguments"] == {"city": "Tokyo"}
    if ids:
        assert call["id"].startswith("call_") and len(call["id"]) == 13


def test_non_streaming_matches_the_recording(fake: FakeOllama) -> None:
    recorded = json.loads((FIXTURES / "chat_nonstream_tool_call.json").read_text())["response"]
    fake.tool_call_ids = False
    try:
        fake.script(Reply.call("get_weather", {"city": "Tokyo"}))
        body = httpx.post(fake.url + "/api/chat", json={**CHAT, "stream": False}).json()
    finally:
        fake.tool_call_ids = True
    assert list(body) == list(recorded)  # same keys in the same order (done_reason before done)
    assert keys(body) == keys(recorded)
    text = json.loads((FIXTURES / "chat_tool_result_roundtrip.json").read_text())["response"]
    fake.script(Reply.say("The current temperature in Toronto is 11°C."))
    assert keys(httpx.post(fake.url + "/api/chat", json={**CHAT, "stream": False}).json()) == keys(text)


def test_thinking_stream_matches_the_recording(fake: FakeOllama) -> None:
    fake.script(Reply.say("391", reasoning="17 \u00d7 23 = 391", chunk_size=8))
    lines = ndjson(httpx.post(fake.url + "/api/chat", json=CHAT).content)
    recorded = ndjson((FIXTURES / "chat_stream_thinking.ndjson").read_bytes())
    assert keys(lines[0]) == keys(recorded[0]) and keys(lines[-2]) == keys(recorded[-2])
    assert keys(lines[-1]) == keys(recorded[-1])
    assert "".join(line["message"].get("thinking", "") for line in lines) == "17 \u00d7 23 = 391"


def test_errors_match_the_recordings(fake: FakeOllama) -> None:
    fake.models = ("llama3.2",)
    try:
        response = httpx.post(fake.url + "/api/chat", json={**CHAT, "model": "llama9"})
    finally:
        fake.models = None
    recorded = json.loads((FIXTURES / "error_404_model_not_found.json").read_text())["examples"]
    assert (response.status_code, response.json()) == (recorded[0]["status"], recorded[0]["body"])
    response = httpx.post(fake.url + "/api/chat", json={"messages": []})
    assert (response.status_code, response.json()) == (recorded[1]["status"], recorded[1]["body"])
    failed = json.loads((FIXTURES / "error_body.json").read_text())
    fake.script(Reply.fail(500, failed["body"]["error"]))
    response = httpx.post(fake.url + "/api/chat", json=CHAT)
    assert (response.status_code, response.json()) == (500, failed["body"])
    fake.script(Reply.say("Yes. I can", chunk_size=3, error_after=2))
    lines = ndjson(httpx.post(fake.url + "/api/chat", json=CHAT).content)
    recorded_lines = ndjson((FIXTURES / "generate_stream_midstream_error.ndjson").read_bytes())
    assert lines[-1] == recorded_lines[-1] and len(lines) == 3


def test_tags(fake: FakeOllama) -> None:
    body = httpx.get(fake.url + "/api/tags").json()
    assert [m["name"] for m in body["models"]] == list(fake.tags)
    assert set(body["models"][0]) == {"name", "model", "modified_at", "size", "digest", "details"}


# -- the official client -------------------------------------------------------------------------------------------

def test_sdk_chat_and_stream(fake: FakeOllama) -> None:
    import ollama

    client = ollama.Client(host=fake.url)
    fake.script(Reply.say("Hello there", reasoning="hmm", prompt_tokens=26, completion_tokens=3))
    response = client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=False)
    assert response.message.content == "Hello there" and response.message.thinking == "hmm"
    assert (response.done_reason, response.prompt_eval_count, response.eval_count) == ("stop", 26, 3)
    fake.script(Reply.say("Streaming works.", chunk_size=5))
    parts = list(client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(p.message.content for p in parts) == "Streaming works." and parts[-1].done
    fake.script(Reply.call("get_weather", {"city": "Paris"}))
    calls = [c for p in client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True)
             for c in (p.message.tool_calls or [])]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert [m.model for m in client.list().models] == list(fake.tags)


def test_sdk_reads_logprobs(fake: FakeOllama) -> None:
    """Asked for, each generated line carries its tokens' logprobs at the top level; the final body all of them."""
    import ollama

    client = ollama.Client(host=fake.url)
    ask = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}
    fake.script(Reply.say("Hello there", chunk_size=6, reasoning="hm"))
    parts = list(client.chat(**ask, top_logprobs=2, stream=True))
    per_line = [[(e.token, e.logprob, [t.token for t in e.top_logprobs or ()]) for e in p.logprobs or ()]
                for p in parts]
    assert per_line == [[("hm", -0.125, ["hm", "alt1"])], [("Hello ", -0.25, ["Hello ", "alt1"])],
                        [("there", -0.375, ["there", "alt1"])], []]
    fake.script(Reply.say("Hello there", chunk_size=6))
    response = client.chat(**ask, stream=False)
    assert [(e.token, e.top_logprobs) for e in response.logprobs or ()] == [("Hello ", None), ("there", None)]
    fake.script(Reply.say("Hi"))  # the UTF-8 bytes the Python client leaves out (Go's api.TokenLogprob has them)
    raw = httpx.post(fake.url + "/api/chat", json={**CHAT, "stream": False, "logprobs": True}).json()
    assert list(raw)[:6] == ["model", "created_at", "message", "done_reason", "done", "logprobs"]
    assert raw["logprobs"] == [{"token": "Hi", "logprob": -0.125, "bytes": [72, 105]}]
    fake.script(Reply.say("unasked"))
    raw = httpx.post(fake.url + "/api/chat", json={**CHAT, "stream": False}).json()
    assert "logprobs" not in raw  # only when asked, as Ollama (omitempty)
    refused = httpx.post(fake.url + "/api/chat", json={**CHAT, "logprobs": True, "top_logprobs": 21})
    assert refused.status_code == 400 and refused.json() == {"error": "top_logprobs must be between 0 and 20"}


def test_sdk_sees_errors(fake: FakeOllama) -> None:
    import ollama

    client = ollama.Client(host=fake.url)
    fake.models = ("other",)
    try:
        with pytest.raises(ollama.ResponseError) as caught:
            client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    finally:
        fake.models = None
    assert caught.value.status_code == 404 and caught.value.error == "model 'llama3.2' not found"
    fake.script(Reply.say("abcdefgh", chunk_size=2, error_after=1))
    with pytest.raises(ollama.ResponseError) as midstream:
        list(client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert midstream.value.error == "an error was encountered while running the model"


def test_sdk_embed(fake: FakeOllama) -> None:
    import ollama

    from scillm_core.testing import fake_vector

    client = ollama.Client(host=fake.url)
    single = client.embed(model="nomic-embed-text", input="why is the sky blue?")
    assert single.embeddings == [fake_vector("why is the sky blue?")]
    assert single.prompt_eval_count == 5
    several = client.embed(model="nomic-embed-text", input=["a", "b"], dimensions=4, truncate=False)
    assert several.embeddings == [fake_vector("a", 4), fake_vector("b", 4)]
    assert fake.last.path == "/api/embed"
    assert fake.last.body == {"model": "nomic-embed-text", "input": ["a", "b"], "truncate": False, "dimensions": 4}
