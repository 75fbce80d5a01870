"""Nothing lost in translation: same-dialect pass-through byte for byte, prompt-cache markers and cache usage across
translation, and what happens when a request cannot go as sent (fallback to another dialect, a middleware change).

The byte tests use a replay upstream that records the bytes it receives and answers with recorded upstream bytes
(``shared/fixtures``): the upstream must get the client's bytes with only the model value changed, and the client
must get the upstream's bytes unchanged."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from scillm_core import ChatRequest, structure, unstructure
from scillm_core.models import CACHE_CONTROL, REASONING_CONTENT, THINKING_BLOCKS, without_carried
from scillm_core.testing import DEV_KEY, FakeOpenAI, FakeUpstream, Reply, ServerThread, ToolCallSpec, make_app
from scillm_core.testing.fake_anthropic import FakeAnthropic
from scillm_core.testing.fake_codex import FakeOpenAIResponses

FIXTURES = Path("/work/shared/fixtures")
if not FIXTURES.is_dir():
    FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
AUTH = {"authorization": f"Bearer {DEV_KEY}"}
ONLY = ("chat", "messages", "responses", "auth", "ops", "anthropic", "openai-compat", "codex", "resilience",
        "metrics", "files", "json", "affinity", "cache")
PNG = base64.b64encode(base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")).decode()


def serve(env: dict[str, str], data_dir: Path, config: dict[str, Any] | None = None) -> ServerThread:
    """scillm with the dialect surfaces, their providers and the usual middleware, for ``with``."""
    return ServerThread(make_app(env=env, config=config, data_dir=data_dir, only=ONLY))


class Replay(FakeUpstream):
    """Records the bytes it gets on the three dialect routes and answers with ``answer`` bytes as they are, a
    stream in uneven pieces (so scillm has to reassemble events)."""

    def __init__(self) -> None:
        super().__init__()
        self.answer: tuple[bytes, str] = (b"{}", "application/json")

    def routes(self) -> list[Route]:
        return [Route(path, self.serve, methods=["POST"])
                for path in ("/v1/messages", "/v1/chat/completions", "/v1/responses")]

    async def serve(self, request: Request) -> Response:
        await self.record(request)
        body, media = self.answer
        if media.startswith("text/event-stream"):
            async def pieces() -> Any:
                for i in range(0, len(body), 97):
                    yield body[i:i + 97]

            return StreamingResponse(pieces(), media_type=media)
        return Response(body, media_type=media)


@pytest.fixture(scope="module")
def replay() -> Iterator[Replay]:
    with Replay() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture(scope="module")
def server(replay: Replay, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    env = {"ANTHROPIC_API_KEY": "sk-ant-fidelity-secret", "ANTHROPIC_API_BASE": replay.url,
           "OPENAI_API_KEY": "sk-openai-fidelity-secret", "OPENAI_API_BASE": replay.url + "/v1",
           "OPENAI_API_RESPONSES": "1"}
    with serve(env, tmp_path_factory.mktemp("d")) as srv:
        yield srv


def fixture_json(path: str) -> Any:
    return json.loads((FIXTURES / path).read_text())


def pretty(value: Any) -> bytes:
    """JSON the way no serialiser scillm uses would write it: a re-encoded body would not match."""
    return json.dumps(value, indent=1, ensure_ascii=True).encode()


# Client bodies written by hand: odd spacing, ``\u`` escapes, floats orjson would write differently, a string that
# holds the text "model", fields no chat model knows; only the model value may change on the way upstream.
CHAT_BODY = (b'{"messages" : [{"role": "user", "content": [{"type": "text", "text": "caf\\u00e9 \\"model\\": '
             b'\\"x\\"", "cache_control": {"type": "ephemeral"}}]}],\n  "model":  "openai/gpt-fid", '
             b'"temperature": 1.0, "logit_bias": {"42": -1e2}, "x_future": {"a": [1, 2.50]}, "stream": %s}')
MESSAGES_BODY = (b'{"max_tokens": 2048, "model": "anthropic/claude-fid", "system": [{"type": "text", "text": '
                 b'"Be brief.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}], "messages": [{"role": '
                 b'"user", "content": [{"type": "search_result", "source": "https://x.test", "title": "t", '
                 b'"content": [{"type": "text", "text": "caf\\u00e9"}], "citations": {"enabled": true}}, '
                 b'{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}], "tools": [{"name": '
                 b'"Read", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}, {"type": '
                 b'"web_search_20250305", "name": "web_search", "max_uses": 2}], "thinking": {"type": "enabled", '
                 b'"budget_tokens": 1024}, "context_management": {"edits": []}, "top_k": 5, "stream": %s}')
RESPONSES_BODY = (b'{"model": "openai/gpt-fid", "input": [{"role": "user", "content": [{"type": "input_text", '
                  b'"text": "caf\\u00e9"}]}], "tools": [{"type": "custom", "name": "apply_patch", "format": '
                  b'{"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}], "include": '
                  b'["reasoning.encrypted_content"], "prompt_cache_key": "pck-1", "store": false, '
                  b'"client_metadata": {"k": "v"}, "temperature": 1.0e0, "stream": %s}')

ROUTES = {
    # route: (path, body, model as sent, model upstream, stream answer, JSON answer)
    "chat": ("/v1/chat/completions", CHAT_BODY, b'"openai/gpt-fid"', b'"gpt-fid"',
             (FIXTURES / "openai/chat_stream_text_with_usage.sse").read_bytes(),
             pretty(fixture_json("openai/chat_completion_text.json"))),
    "messages": ("/v1/messages", MESSAGES_BODY, b'"anthropic/claude-fid"', b'"claude-fid"',
                 (FIXTURES / "anthropic/messages_stream_thinking_tool_use.sse").read_bytes(),
                 pretty(fixture_json("anthropic/messages_image_base64.json")["response"]["body"])),
    "responses": ("/v1/responses", RESPONSES_BODY, b'"openai/gpt-fid"', b'"gpt-fid"',
                  (FIXTURES / "responses_codex/responses_stream_text.sse").read_bytes(),
                  pretty(fixture_json("responses_codex/responses_nonstream_text.json"))),
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_same_dialect_goes_as_sent_and_comes_back_as_answered(server: ServerThread, replay: Replay, route: str,
                                                              stream: bool) -> None:
    path, template, sent_model, upstream_model, sse, answer = ROUTES[route]
    body = template % (b"true" if stream else b"false")
    replay.answer = (sse, "text/event-stream") if stream else (answer, "application/json")
    headers = {**AUTH, "content-type": "application/json", "anthropic-version": "2023-06-01",
               "anthropic-beta": "prompt-caching-scope-2026-01-05,context-management-2025-06-27"}
    got = httpx.post(server.url + path, content=body, headers=headers, timeout=30)
    assert got.status_code == 200, got.text
    assert got.headers["x-scillm-dialect"] == {"chat": "openai-chat", "messages": "anthropic-messages",
                                               "responses": "openai-responses"}[route]
    # upstream: the client's bytes, only the model value changed
    assert replay.last.raw == body.replace(sent_model, upstream_model, 1)
    if route == "messages":  # the client's dialect headers went with it
        assert replay.last.headers["anthropic-beta"] == headers["anthropic-beta"]
        assert replay.last.headers["x-api-key"] == "sk-ant-fidelity-secret"
    # client: the upstream's bytes (chat streams end with scillm's own, identical, [DONE])
    assert got.content == (sse if stream else answer)


def test_a_json_answer_keeps_scillm_metadata(server: ServerThread, replay: Replay) -> None:
    """The one change to a same-dialect JSON answer: the chat surface echoes ``scillm_metadata`` (and takes it,
    scillm's own field, out of what goes upstream)."""
    replay.answer = (pretty(fixture_json("openai/chat_completion_text.json")), "application/json")
    got = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=30, json={
        "model": "openai/gpt-fid", "messages": [{"role": "user", "content": "x"}],
        "scillm_metadata": {"item": 7}, "timeout": 30})
    assert got.json()["scillm_metadata"] == {"item": 7}
    assert got.json()["choices"] == fixture_json("openai/chat_completion_text.json")["choices"]
    assert orjson.loads(replay.last.raw) == {"model": "gpt-fid", "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize("header", ["anthropic-beta", "anthropic-version"])
def test_a_dialect_header_that_cannot_go_upstream_is_a_400_naming_it(server: ServerThread, replay: Replay,
                                                                     header: str) -> None:
    """The client's dialect headers go upstream as sent, and an HTTP client sends visible ASCII only: anything else
    (bytes past ASCII, which HTTP's parser lets through as obs-text) is the client's 400 naming the header, before
    any upstream call, not an internal error."""
    sent = len(replay.requests)
    for value in (b"\xff\xfe", "caf\u00e9-2026".encode()):
        got = httpx.post(server.url + "/v1/messages", content=MESSAGES_BODY % b"false", timeout=30,
                         headers={**AUTH, "content-type": "application/json", header: value})
        assert got.status_code == 400, got.text
        assert got.json()["error"]["type"] == "invalid_request_error" and header in got.json()["error"]["message"]
    assert len(replay.requests) == sent


# -- the official anthropic SDK, every kind of content, through a validating fake ----------------------------------

@pytest.fixture(scope="module")
def claude() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture(scope="module")
def claude_server(claude: FakeAnthropic, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    env = {"ANTHROPIC_API_KEY": "sk-ant-sdk-secret", "ANTHROPIC_API_BASE": claude.url,
           "OPENAI_API_KEY": "sk-openai-sdk-secret", "OPENAI_API_BASE": claude.url + "/nowhere"}
    with serve(env, tmp_path_factory.mktemp("d")) as srv:
        yield srv


def sdk(server: ServerThread) -> tuple[anthropic.Anthropic, list[bytes]]:
    """An anthropic client and the bodies it sends, as bytes."""
    import httpx2  # the anthropic SDK's own HTTP client

    sent: list[bytes] = []

    def capture(request: Any) -> None:
        sent.append(request.read())

    http = httpx2.Client(event_hooks={"request": [capture]}, timeout=30)
    return anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0, http_client=http), sent


def pdf() -> str:
    """A one-page PDF (pypdf, which the files middleware checks PDFs with), base64."""
    import io

    import pypdf

    writer = pypdf.PdfWriter()
    writer.add_blank_page(width=72, height=72)
    out = io.BytesIO()
    writer.write(out)
    return base64.b64encode(out.getvalue()).decode()


CONTENT = [
    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG},
     "cache_control": {"type": "ephemeral"}},
    {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": pdf()},
     "title": "report.pdf"},
    {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "The sky is blue."},
     "title": "facts", "citations": {"enabled": True}, "context": "a note"},
    {"type": "text", "text": "What colour is the sky?", "cache_control": {"type": "ephemeral"}},
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_anthropic_sdk_system_tools_images_documents_thinking_as_sent(claude_server: ServerThread,
                                                                       claude: FakeAnthropic, stream: bool) -> None:
    client, sent = sdk(claude_server)
    claude.script(Reply(text="Blue.", reasoning="The document says so.", prompt_tokens=12, cached_tokens=3000,
                        cache_write_tokens=250))
    kwargs: dict[str, Any] = dict(
        model="anthropic/claude-sonnet-4-5", max_tokens=4096,
        system=[{"type": "text", "text": "You answer from documents."},
                {"type": "text", "text": "Cite them.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        tools=[{"name": "lookup", "description": "Look a fact up", "input_schema": {"type": "object"},
                "cache_control": {"type": "ephemeral"}}],
        thinking={"type": "enabled", "budget_tokens": 2048}, messages=[{"role": "user", "content": CONTENT}],
        extra_headers={"anthropic-beta": "extended-cache-ttl-2025-04-11"})
    if stream:
        with client.messages.stream(**kwargs) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**kwargs)
    upstream = claude.last
    assert upstream.raw == sent[-1].replace(b'"anthropic/claude-sonnet-4-5"', b'"claude-sonnet-4-5"')
    assert upstream.headers["anthropic-beta"] == "extended-cache-ttl-2025-04-11"
    # every marker exactly where the client put it
    assert upstream.body["system"][1]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert [b.get("cache_control") for b in upstream.body["messages"][0]["content"]] == \
        [{"type": "ephemeral"}, None, None, {"type": "ephemeral"}]
    assert upstream.body["tools"][0]["cache_control"] == {"type": "ephemeral"}
    # the answer as Anthropic gave it: thinking with its signature, and the cache usage
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].signature == FakeAnthropic.signature(Reply(reasoning="The document says so."))
    assert message.usage.cache_read_input_tokens == 3000 and message.usage.cache_creation_input_tokens == 250
    assert message.usage.input_tokens == 12


def test_claude_login_gets_the_body_with_its_identity_block_first(tmp_path: Path) -> None:
    """The Claude login only takes requests that start with Claude Code's identity: the one change made."""
    with FakeAnthropic() as fake:
        fake.require = "oauth"  # type: ignore[misc]
        credentials = tmp_path / "credentials.json"
        credentials.write_bytes(orjson.dumps({"claudeAiOauth": fake.issue_login()}))
        env = {"SCILLM_CLAUDE_CREDENTIALS": str(credentials), "SCILLM_CLAUDE_API_BASE": fake.url,
               "SCILLM_CLAUDE_TOKEN_URL": fake.url + "/v1/oauth/token"}
        with serve(env, tmp_path / "d") as srv:
            client, sent = sdk(srv)
            client.messages.create(model="claude-oauth/claude-sonnet-4-5", max_tokens=64,
                                   system=[{"type": "text", "text": "Be brief.",
                                            "cache_control": {"type": "ephemeral"}}],
                                   messages=[{"role": "user", "content": "hi"}], extra_body={"top_k": 3},
                                   extra_headers={"anthropic-beta": "context-management-2025-06-27"})
        upstream = fake.last
        client_body = orjson.loads(sent[-1])
        assert upstream.body["system"][0]["text"] == "You are Claude Code, Anthropic's official CLI for Claude."
        assert upstream.body == {**client_body, "model": "claude-sonnet-4-5",
                                 "system": [upstream.body["system"][0], *client_body["system"]]}
        betas = upstream.headers["anthropic-beta"].split(",")
        assert "oauth-2025-04-20" in betas and "context-management-2025-06-27" in betas


# -- translated requests: markers where the upstream has them, cache usage in every dialect -------------------------

def test_chat_cache_markers_reach_anthropic_and_its_cache_usage_comes_back(claude_server: ServerThread,
                                                                           claude: FakeAnthropic) -> None:
    claude.script(Reply(text="ok", prompt_tokens=10, cached_tokens=900, cache_write_tokens=40))
    client = openai.OpenAI(base_url=claude_server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=30)
    raw = client.chat.completions.with_raw_response.create(model="anthropic/claude-sonnet-4-5", messages=[
        {"role": "system", "content": [{"type": "text", "text": "Long policy.", "cache_control": {"type": "ephemeral"}},
                                       {"type": "text", "text": "Short note."}]},
        {"role": "user", "content": [{"type": "text", "text": "q", "cache_control": {"type": "ephemeral"}}]}],
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}},
                "cache_control": {"type": "ephemeral"}}])  # type: ignore[list-item]
    assert raw.headers["x-scillm-dialect"] == "openai-chat -> anthropic"
    body = claude.last.body
    assert body["system"] == [{"type": "text", "text": "Long policy.", "cache_control": {"type": "ephemeral"}},
                              {"type": "text", "text": "Short note."}]
    assert body["messages"][0]["content"] == [{"type": "text", "text": "q", "cache_control": {"type": "ephemeral"}}]
    assert body["tools"][0]["cache_control"] == {"type": "ephemeral"}
    usage = raw.parse().usage
    assert usage.prompt_tokens == 950 and usage.prompt_tokens_details.cached_tokens == 900
    assert usage.model_extra["cache_creation_input_tokens"] == 40


@pytest.fixture(scope="module")
def chat_upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeOpenAI, ServerThread]]:
    with FakeOpenAI() as fake:
        env = {"DEEPSEEK_API_KEY": "sk-ds-secret", "DEEPSEEK_API_BASE": fake.base_url}
        with serve(env, tmp_path_factory.mktemp("d")) as srv:
            yield fake, srv


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_messages_to_a_chat_upstream_drop_markers_and_report_its_cache_reads(
        chat_upstreams: tuple[FakeOpenAI, ServerThread], stream: bool) -> None:
    fake, srv = chat_upstreams
    fake.script(Reply(text="ok", prompt_tokens=1000, cached_tokens=800))
    client = anthropic.Anthropic(base_url=srv.url, api_key=DEV_KEY, max_retries=0, timeout=30)
    kwargs: dict[str, Any] = dict(model="deepseek/deepseek-chat", max_tokens=64, system=[
        {"type": "text", "text": "A.", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "B."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "q", "cache_control": {"type": "ephemeral"}}]}])
    if stream:
        with client.messages.stream(**kwargs) as events:
            usage = events.get_final_message().usage
    else:
        usage = client.messages.create(**kwargs).usage
    assert fake.last.body["messages"] == [{"role": "system", "content": "A.\n\nB."}, {"role": "user", "content": "q"}]
    assert "cache_control" not in fake.last.raw.decode()
    assert (usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (200, 800, 0)


def test_responses_from_a_translated_upstream_report_cache_reads(chat_upstreams: tuple[FakeOpenAI, ServerThread]
                                                                 ) -> None:
    fake, srv = chat_upstreams
    fake.script(Reply(text="ok", prompt_tokens=1000, cached_tokens=640))
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=30)
    raw = client.responses.with_raw_response.create(model="deepseek/deepseek-chat", input="q")
    assert raw.headers["x-scillm-dialect"] == "openai-responses -> deepseek"
    usage = raw.parse().usage
    assert usage.input_tokens == 1000 and usage.input_tokens_details.cached_tokens == 640


def test_responses_sdk_through_an_openai_responses_upstream(tmp_path: Path) -> None:
    """The official client's ``responses.create`` against an OpenAI Responses upstream: as sent, as answered."""
    with FakeOpenAIResponses() as fake:
        env = {"OPENAI_API_KEY": "sk-openai-secret", "OPENAI_API_BASE": fake.base_url, "OPENAI_API_RESPONSES": "1"}
        with serve(env, tmp_path) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=30)
            fake.script(Reply(text="Hi there.", cached_tokens=300, prompt_tokens=400),
                        Reply(tool_calls=(ToolCallSpec("apply_patch", {"input": "x"}, "call_1"),)))
            answer = client.responses.create(model="gpt-5", input="hi", prompt_cache_key="s-1",
                                             max_output_tokens=99)
            assert answer.output_text == "Hi there." and answer.usage.input_tokens_details.cached_tokens == 300
            assert fake.last.body == {"model": "gpt-5", "input": "hi", "prompt_cache_key": "s-1",
                                      "max_output_tokens": 99}
            events = list(client.responses.create(model="gpt-5", input="patch", stream=True))
            assert events[-1].type == "response.completed"
            assert [o.type for o in events[-1].response.output] == ["function_call"]
            assert fake.last.headers["authorization"] == "Bearer sk-openai-secret"


# -- when a request cannot go as sent ---------------------------------------------------------------------------------

def test_fallback_to_another_dialect_translates_and_says_so(tmp_path: Path) -> None:
    with FakeAnthropic() as claude, FakeOpenAI() as gpt:
        env = {"ANTHROPIC_API_KEY": "sk-ant", "ANTHROPIC_API_BASE": claude.url, "OPENAI_API_KEY": "sk-oai",
               "OPENAI_API_BASE": gpt.base_url}
        config = {"groups": {"mixed": {"models": ["anthropic/claude-sonnet-4-5", "openai/gpt-4o"]}},
                  "resilience": {"max_retries": 0}}
        with serve(env, tmp_path, config) as srv:
            client = anthropic.Anthropic(base_url=srv.url, api_key=DEV_KEY, max_retries=0, timeout=30)
            claude.script(Reply.fail(529, "Overloaded"))
            gpt.script(Reply(text="From GPT.", prompt_tokens=50, cached_tokens=20))
            raw = client.messages.with_raw_response.create(model="mixed", max_tokens=64, system=[
                {"type": "text", "text": "S", "cache_control": {"type": "ephemeral"}}],
                messages=[{"role": "user", "content": "hi"}])
            assert raw.headers["x-scillm-dialect"] == "anthropic-messages -> openai"
            assert raw.headers["x-scillm-provider"] == "openai"
            message = raw.parse()
            assert message.content[0].text == "From GPT." and message.usage.cache_read_input_tokens == 20
            assert claude.last.body["system"][0]["cache_control"] == {"type": "ephemeral"}  # first try: as sent
            # the fallback has no cache markers: they are dropped, the system prompt one string again (as when the
            # first route takes no markers)
            assert gpt.last.body["messages"][0] == {"role": "system", "content": "S"}
            assert b"cache_control" not in gpt.last.raw


MARKED_SYSTEM = [{"type": "text", "text": "Long policy.", "cache_control": {"type": "ephemeral"}},
                 {"type": "text", "text": "Be brief."}]
MARKED_TURN = {"role": "user", "content": [{"type": "text", "text": "q", "cache_control": {"type": "ephemeral"}}]}


@pytest.mark.parametrize(("order", "surface", "passthrough"), [
    (("anthropic/claude-sonnet-4-5", "opencode-go/minimax-m2.7"), "messages", True),
    (("opencode-go/minimax-m2.7", "anthropic/claude-sonnet-4-5"), "messages", False),
    (("anthropic/claude-sonnet-4-5", "opencode-go/minimax-m2.7"), "chat", True)],
    ids=["claude-then-minimax", "minimax-then-claude-translated", "chat-claude-then-minimax"])
def test_each_member_of_a_group_gets_the_cache_markers_it_takes(tmp_path: Path, order: tuple[str, str],
                                                                surface: str, passthrough: bool) -> None:
    """Cache markers are decided for each attempt by its provider's ``cache_control`` capability (core's
    ``without_carried``), not by the group's first route: MiniMax on OpenCode Go speaks Anthropic's wire without
    the prompt cache and gets none, whichever member it is; Claude gets every marker, also as a translated
    fallback (passthrough off)."""
    with FakeAnthropic() as claude, FakeAnthropic() as minimax:
        env = {"ANTHROPIC_API_KEY": "sk-ant", "ANTHROPIC_API_BASE": claude.url, "OPENCODE_GO_API_KEY": "sk-go",
               "OPENCODE_GO_API_BASE": minimax.url + "/v1"}
        config = {"groups": {"pair": {"models": list(order)}}, "resilience": {"max_retries": 0},
                  "server": {"passthrough": passthrough}}
        first, second = (claude, minimax) if order[0].startswith("anthropic/") else (minimax, claude)
        first.script(Reply.fail(529, "Overloaded"))
        second.script(Reply(text="Answered.", prompt_tokens=50))
        with ServerThread(make_app(env=env, config=config, data_dir=tmp_path, only=(*ONLY, "opencode-go"))) as srv:
            if surface == "messages":
                client = anthropic.Anthropic(base_url=srv.url, api_key=DEV_KEY, max_retries=0, timeout=30)
                message = client.messages.create(model="pair", max_tokens=64, system=MARKED_SYSTEM,  # type: ignore[arg-type]
                                                 messages=[MARKED_TURN],  # type: ignore[list-item]
                                                 tools=[{"name": "Read", "input_schema": {"type": "object"},
                                                         "cache_control": {"type": "ephemeral"}}])
                assert message.content[0].text == "Answered."  # type: ignore[union-attr]
            else:
                chat = openai.OpenAI(base_url=srv.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=30)
                answer = chat.chat.completions.create(model="pair", messages=[  # type: ignore[call-overload]
                    {"role": "system", "content": MARKED_SYSTEM}, MARKED_TURN], tools=[{
                        "type": "function", "function": {"name": "Read", "parameters": {"type": "object"}},
                        "cache_control": {"type": "ephemeral"}}])
                assert answer.choices[0].message.content == "Answered."
        assert len(claude.requests) == len(minimax.requests) == 1
        body = claude.last.body
        assert body["system"][0]["cache_control"] == {"type": "ephemeral"} and "cache_control" not in body["system"][1]
        assert body["messages"][0]["content"][0]["cache_control"] == {"type": "ephemeral"}
        assert body["tools"][0]["cache_control"] == {"type": "ephemeral"}
        assert b"cache_control" not in minimax.last.raw
        assert minimax.last.body["system"] == [{"type": "text", "text": "Long policy.\n\nBe brief."}]
        assert minimax.last.body["messages"][0]["content"] == "q"


def test_without_carried_drops_markers_only_where_they_are_not_taken() -> None:
    """The markers of parts, tools and messages (and the text-only content they split) for a provider without the
    ``cache_control`` capability; the request itself when it has none, when the provider takes them, or when the
    provider sends the client's own body (which keeps them)."""
    marker = {"type": "ephemeral"}
    request = structure({"model": "m", "messages": [
        {"role": "system", "content": [{"type": "text", "text": "A.", "cache_control": marker},
                                       {"type": "text", "text": "B."}]},
        {"role": "user", "content": "q", "cache_control": marker},
        {"role": "user", "content": [{"type": "text", "text": "see", "cache_control": marker},
                                     {"type": "image_url", "image_url": {"url": "https://x/i.png"}}]}],
        "tools": [{"type": "function", "function": {"name": "f"}, "cache_control": marker}]}, ChatRequest)
    plain = without_carried(request, frozenset({"tools"}))
    assert unstructure(plain)["messages"] == [
        {"role": "system", "content": "A.\n\nB."}, {"role": "user", "content": "q"},
        {"role": "user", "content": [{"type": "text", "text": "see"},
                                     {"type": "image_url", "image_url": {"url": "https://x/i.png"}}]}]
    assert plain.tools is not None and plain.tools[0].cache_control is None
    assert without_carried(request, frozenset({CACHE_CONTROL, THINKING_BLOCKS, REASONING_CONTENT})) is request
    assert without_carried(request, frozenset({"tools"}), as_sent=True) is request
    assert without_carried(plain, frozenset({"tools"})) is plain


def test_a_request_a_middleware_changed_is_translated_with_the_change(claude_server: ServerThread,
                                                                      claude: FakeAnthropic) -> None:
    """The files middleware corrects an image's declared type: the change must reach the upstream, so the body
    goes translated (markers kept), not as the client sent it."""
    client = anthropic.Anthropic(base_url=claude_server.url, api_key=DEV_KEY, max_retries=0, timeout=30)
    raw = client.messages.with_raw_response.create(model="anthropic/claude-sonnet-4-5", max_tokens=64, messages=[
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": PNG}},
            {"type": "text", "text": "what is it?", "cache_control": {"type": "ephemeral"}}]}])
    assert raw.headers["x-scillm-dialect"] == "anthropic-messages -> anthropic"
    content = claude.last.body["messages"][0]["content"]
    assert content[0]["source"]["media_type"] == "image/png"
    assert content[1] == {"type": "text", "text": "what is it?", "cache_control": {"type": "ephemeral"}}


def test_the_cache_keys_on_the_native_body_and_replays_the_upstream_bytes(tmp_path: Path) -> None:
    with FakeAnthropic() as claude:
        env = {"ANTHROPIC_API_KEY": "sk-ant", "ANTHROPIC_API_BASE": claude.url}
        with serve(env, tmp_path, {"cache": {"enabled": True}}) as srv:
            body = {"model": "anthropic/claude-sonnet-4-5", "max_tokens": 64, "top_k": 3,
                    "messages": [{"role": "user", "content": "hi"}]}
            first = httpx.post(srv.url + "/v1/messages", headers=AUTH, json=body, timeout=30)
            again = httpx.post(srv.url + "/v1/messages", headers=AUTH, json=body, timeout=30)
            assert (first.headers["x-scillm-cache"], again.headers["x-scillm-cache"]) == ("miss", "hit")
            assert again.content == first.content and len(claude.requests) == 1
            # differs only in what the chat model does not hold: a different request
            beta = httpx.post(srv.url + "/v1/messages", json=body, timeout=30,
                              headers={**AUTH, "anthropic-beta": "context-1m-2025-08-07"})
            other = httpx.post(srv.url + "/v1/messages", headers=AUTH, json={**body, "top_k": 4}, timeout=30)
            assert (beta.headers["x-scillm-cache"], other.headers["x-scillm-cache"]) == ("miss", "miss")
            assert len(claude.requests) == 3


def test_passthrough_switched_off_translates_every_request(tmp_path: Path) -> None:
    """``[server] passthrough = false``: the escape hatch (and the benchmark's baseline) translates as before."""
    with FakeAnthropic() as claude:
        env = {"ANTHROPIC_API_KEY": "sk-ant", "ANTHROPIC_API_BASE": claude.url}
        with serve(env, tmp_path, {"server": {"passthrough": False}}) as srv:
            body = b'{"model": "anthropic/claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", ' \
                   b'"content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}]}'
            got = httpx.post(srv.url + "/v1/messages", content=body, headers=AUTH, timeout=30)
    assert got.headers["x-scillm-dialect"] == "anthropic-messages -> anthropic"
    assert claude.last.raw != body.replace(b'"anthropic/claude-sonnet-4-5"', b'"claude-sonnet-4-5"')
    assert claude.last.body["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}]  # translated, marker carried
    assert got.json()["type"] == "message" and got.json()["model"] == "claude-sonnet-4-5"  # as Anthropic named it


def test_a_slow_same_dialect_stream_is_kept_alive_with_comments(tmp_path: Path) -> None:
    """Before an upstream's own stream starts, the messages surface sends SSE comments (no message_start of its
    own, which would come before the upstream's); the SDK skips them."""
    with FakeAnthropic() as claude:
        env = {"ANTHROPIC_API_KEY": "sk-ant", "ANTHROPIC_API_BASE": claude.url}
        with serve(env, tmp_path, {"server": {"heartbeat_s": 0.1}}) as srv:
            claude.script(Reply(text="late", first_chunk_delay_s=1.0))
            with httpx.stream("POST", srv.url + "/v1/messages", headers=AUTH, timeout=30, json={
                    "model": "anthropic/claude-sonnet-4-5", "max_tokens": 64, "stream": True,
                    "messages": [{"role": "user", "content": "hi"}]}) as r:
                raw = r.read()
            claude.script(Reply(text="late", first_chunk_delay_s=1.0))
            client = anthropic.Anthropic(base_url=srv.url, api_key=DEV_KEY, max_retries=0, timeout=30)
            with client.messages.stream(model="anthropic/claude-sonnet-4-5", max_tokens=64,
                                        messages=[{"role": "user", "content": "hi"}]) as events:
                text = events.get_final_text()
    assert raw.startswith(b": keep-alive\n\n") and raw.count(b"event: message_start") == 1
    assert raw.rstrip().rsplit(b"\n\n", 1)[-1].startswith(b"event: message_stop")
    assert text == "late"
