"""Request parameters on translated routes (``scillm_core.models.params``): what a client asks for in the answer
is delivered or refused with a 400 ``unsupported_parameter`` before any upstream call, never silently dropped;
hints are accepted; OpenAI-compatible upstreams get every parameter as sent. Through the official ``openai`` and
``anthropic`` SDKs against the fake upstreams, in every dialect, across fallbacks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest

from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, make_app
from scillm_core.testing.fake_anthropic import FakeAnthropic
from scillm_core.testing.fake_codex import FakeCodex
from scillm_core.testing.fake_gemini import FakeGemini
from scillm_core.testing.fake_ollama import FakeOllama

CLAUDE = "anthropic/claude-sonnet-4-5"
GPT = "openai/gpt-4o-mini"
GROUPS = {"claude-then-gpt": {"models": [CLAUDE, GPT]},
          "gpt-then-claude": {"models": [GPT, CLAUDE]},
          "claude-then-gemini": {"models": [CLAUDE, "gemini/gemini-2.5-flash"]},
          "claude-then-deepseek": {"models": [CLAUDE, "deepseek/deepseek-chat"]},
          "deepseek-then-claude": {"models": ["deepseek/deepseek-chat", CLAUDE]},
          "gemini-then-claude": {"models": ["gemini/gemini-2.5-flash", CLAUDE]}}
HI = [{"role": "user", "content": "hi"}]
#: a model of each translated provider (none of them delivers audio; Ollama delivers logprobs)
TRANSLATED = [CLAUDE, "gemini/gemini-2.5-flash", "qwen3:8b", "opencode-go/minimax-m2.7", "codex/gpt-5.1"]
#: what a translated provider delivers: left out of the refusals
DELIVERED = {("gemini/gemini-2.5-flash", "n"), ("qwen3:8b", "logprobs"), ("qwen3:8b", "top_logprobs"),
             (CLAUDE, "web_search_options"), ("gemini/gemini-2.5-flash", "web_search_options")}
#: parameter -> value that asks for something in the answer
ASKING: dict[str, Any] = {"logprobs": True, "top_logprobs": 2, "modalities": ["text", "audio"],
                          "audio": {"voice": "alloy", "format": "wav"}, "web_search_options": {},
                          "functions": [{"name": "f", "parameters": {"type": "object"}}], "n": 2}
#: hints and values that ask for nothing: accepted, and dropped by translations that have no counterpart
HINTS: dict[str, Any] = {"prediction": {"type": "content", "content": "hi"}, "logprobs": False, "top_logprobs": 0,
                         "modalities": ["text"], "n": 1}


class Fakes:
    def __init__(self, claude: FakeAnthropic, openai_: FakeOpenAI, gemini: FakeGemini, ollama: FakeOllama,
                 codex: FakeCodex) -> None:
        self.claude, self.openai, self.gemini, self.ollama, self.codex = claude, openai_, gemini, ollama, codex
        self.all = (claude, openai_, gemini, ollama, codex)

    def reset(self) -> None:
        for fake in self.all:
            fake.requests.clear()
            fake._script.clear()

    def received(self) -> int:
        return sum(len([r for r in fake.requests if r.method == "POST"]) for fake in self.all)


@pytest.fixture(scope="module")
def fakes_() -> Iterator[Fakes]:
    with FakeAnthropic() as claude, FakeOpenAI() as openai_, FakeGemini() as gemini, FakeOllama() as ollama, \
            FakeCodex() as codex:
        yield Fakes(claude, openai_, gemini, ollama, codex)  # type: ignore[arg-type]


@pytest.fixture
def fakes(fakes_: Fakes) -> Fakes:
    fakes_.reset()
    return fakes_


@pytest.fixture(scope="module")
def server(fakes_: Fakes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    data: Path = tmp_path_factory.mktemp("params")
    auth = data / "codex-auth.json"
    auth.write_bytes(orjson.dumps(FakeCodex.auth_json(fakes_.codex.login(expires_in=3600))))
    env = {"ANTHROPIC_API_KEY": "sk-ant-params-0123456789abcdef", "ANTHROPIC_API_BASE": fakes_.claude.base_url,
           "OPENAI_API_KEY": "sk-params-openai-0123456789", "OPENAI_API_BASE": fakes_.openai.base_url,
           "DEEPSEEK_API_KEY": "sk-params-deepseek-0123456789", "DEEPSEEK_API_BASE": fakes_.openai.base_url,
           "GEMINI_API_KEY": "AIzaParamsSecret0123456789abcdefghijkl", "GEMINI_API_BASE": fakes_.gemini.base_url,
           "OLLAMA_API_BASE": fakes_.ollama.base_url,
           "OPENCODE_GO_API_KEY": "sk-params-go-0123456789", "OPENCODE_GO_API_BASE": fakes_.openai.base_url,
           "SCILLM_CODEX_AUTH": str(auth), "CODEX_API_BASE": fakes_.codex.base_url,
           "SCILLM_CODEX_TOKEN_URL": fakes_.codex.token_url}
    config = {"groups": GROUPS, "plugins": {"disable": ["cache"]},
              "resilience": {"backoff_base_s": 0.01, "backoff_max_s": 0.02, "max_retries": 0}}
    with ServerThread(make_app(env=env, config=config, data_dir=data)) as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)


@pytest.fixture
def claude_client(server: ServerThread) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0, timeout=20)


def _refused(exc: openai.BadRequestError, param: str, provider: str) -> None:
    error = exc.body if isinstance(exc.body, dict) and "code" in exc.body else (exc.body or {}).get("error", {})
    assert exc.status_code == 400
    assert error["code"] == "unsupported_parameter" and error["param"] == f"$.{param}", error
    assert f"provider {provider!r}" in error["message"] and error["details"]["provider"] == provider


# -- chat completions ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("model", "param"), [(model, param) for model in TRANSLATED for param in sorted(ASKING)
                                               if (model, param) not in DELIVERED])
def test_asking_for_what_a_translated_route_cannot_deliver_is_a_400_before_any_upstream_call(
        client: openai.OpenAI, fakes: Fakes, model: str, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=HI, extra_body={param: ASKING[param]})
    _refused(caught.value, param, model.split("/")[0] if "/" in model else "ollama")
    assert fakes.received() == 0


def test_a_stream_is_refused_before_it_starts(client: openai.OpenAI, fakes: Fakes) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CLAUDE, messages=HI, stream=True, logprobs=True, top_logprobs=3)
    _refused(caught.value, "logprobs", "anthropic")
    assert fakes.received() == 0


@pytest.mark.parametrize("model", [CLAUDE, "gemini/gemini-2.5-flash", "qwen3:8b"])
def test_hints_are_accepted(client: openai.OpenAI, fakes: Fakes, model: str) -> None:
    reply = client.chat.completions.create(model=model, messages=HI, extra_body=HINTS)
    assert reply.choices[0].message.content
    sent = [r for fake in fakes.all for r in fake.requests if r.method == "POST"]
    assert len(sent) == 1
    assert not set(HINTS) & set(sent[0].body), sent[0].body  # a translation has no counterpart: dropped


def test_gemini_delivers_n(client: openai.OpenAI, fakes: Fakes) -> None:
    reply = client.chat.completions.create(model="gemini/gemini-2.5-flash", messages=HI, n=2)
    assert reply.choices
    assert fakes.gemini.last.body["generationConfig"]["candidateCount"] == 2


@pytest.mark.parametrize("model", ["deepseek/deepseek-chat", GPT, "opencode-go/glm-5.1"])
def test_openai_compatible_upstreams_get_every_parameter_as_sent(client: openai.OpenAI, fakes: Fakes,
                                                                 model: str) -> None:
    client.chat.completions.create(model=model, messages=HI, logprobs=True, top_logprobs=3, n=2,
                                   extra_body={"web_search_options": {}, "prediction": HINTS["prediction"]})
    body = fakes.openai.last.body
    assert body["logprobs"] is True and body["top_logprobs"] == 3 and body["n"] == 2
    assert body["web_search_options"] == {} and body["prediction"] == HINTS["prediction"]


def test_openai_compatible_translation_forwards_them_too(server: ServerThread, fakes: Fakes) -> None:
    """A request a middleware changed is translated, not sent as sent: the parameters still go."""
    from scillm_core.models import ChatRequest
    from scillm_core.models.params import check_asks

    request = ChatRequest(model="deepseek/deepseek-chat", messages=(), n=2,
                          extra={"logprobs": True, "top_logprobs": 3, "modalities": ["audio"]})
    runtime = server.app.runtime
    for name in ("deepseek", "openai", "glm", "moonshot", "chutes"):
        check_asks(request, runtime.providers[name].capabilities, name, "m")  # raises if it would refuse


# -- fallbacks: the check applies to the deployment each attempt calls -----------------------------------------------

def test_a_group_skips_a_member_that_cannot_deliver(client: openai.OpenAI, fakes: Fakes) -> None:
    raw = client.chat.completions.with_raw_response.create(model="claude-then-gpt", messages=HI, logprobs=True)
    assert raw.headers["x-scillm-provider"] == "openai"
    assert fakes.claude.requests == [] and fakes.openai.last.body["logprobs"] is True


def test_a_fallback_that_cannot_deliver_is_not_called_and_the_real_failure_is_answered(
        client: openai.OpenAI, fakes: Fakes) -> None:
    fakes.openai.script(Reply.fail(503, "overloaded"))
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="gpt-then-claude", messages=HI, logprobs=True)
    assert caught.value.status_code == 503
    tried = caught.value.body["details"]["tried"] if "details" in (caught.value.body or {}) else \
        caught.value.body["error"]["details"]["tried"]
    assert [t["error"] for t in tried] == [tried[0]["error"], "unsupported_parameter"]
    assert fakes.claude.requests == []
    fakes.openai.script(Reply.fail(503, "overloaded"))  # without the parameter the same group falls back
    raw = client.chat.completions.with_raw_response.create(model="gpt-then-claude", messages=HI)
    assert raw.headers["x-scillm-provider"] == "anthropic"


def test_a_group_where_no_member_can_deliver_names_the_first(client: openai.OpenAI, fakes: Fakes) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="claude-then-gemini", messages=HI,
                                       extra_body={"audio": ASKING["audio"], "modalities": ["text", "audio"]})
    _refused(caught.value, "audio", "anthropic")
    assert fakes.received() == 0


# -- /v1/responses -> chat upstreams ---------------------------------------------------------------------------------

IDS = {"prompt_cache_key": "pck-session-7", "safety_identifier": "hashed-user-42", "user": "legacy-user-9"}


def test_responses_carries_cache_key_and_user_ids_to_a_chat_upstream(client: openai.OpenAI, fakes: Fakes) -> None:
    response = client.responses.create(model="deepseek/deepseek-chat", input="hi", **IDS)
    body = fakes.openai.last.body
    assert fakes.openai.last.path.endswith("/chat/completions")
    assert {key: body.get(key) for key in IDS} == IDS
    assert response.prompt_cache_key == IDS["prompt_cache_key"]
    assert response.safety_identifier == IDS["safety_identifier"]


def test_responses_maps_the_user_id_for_anthropic(client: openai.OpenAI, fakes: Fakes) -> None:
    client.responses.create(model=CLAUDE, input="hi", **IDS)
    body = fakes.claude.last.body
    assert body["metadata"] == {"user_id": IDS["safety_identifier"]}  # the newer id, meant for abuse detection
    assert not set(IDS) & set(body)
    client.responses.create(model=CLAUDE, input="hi", user="legacy-user-9")
    assert fakes.claude.last.body["metadata"] == {"user_id": "legacy-user-9"}


def test_responses_cache_key_is_codex_s_cache_key(client: openai.OpenAI, fakes: Fakes) -> None:
    with client.responses.stream(model="codex/gpt-5.1", input="hi", prompt_cache_key="pck-codex-1") as stream:
        stream.get_final_response()
    sent = [r for r in fakes.codex.requests if r.method == "POST" and r.path.endswith("/responses")][-1]
    assert sent.body["prompt_cache_key"] == "pck-codex-1"
    assert sent.headers["session_id"] == "pck-codex-1"  # the session it names, as for affinity


TOKENS = [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105],
           "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},
                            {"token": "Hello", "logprob": -2.5, "bytes": [72, 101, 108, 108, 111]}]}]


def test_responses_logprobs_are_delivered_by_a_chat_upstream(client: openai.OpenAI, fakes: Fakes) -> None:
    completion = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "deepseek-chat",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop",
                               "logprobs": {"content": TOKENS, "refusal": None}}],
                  "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
    fakes.openai.script(Reply(raw=orjson.dumps(completion)))
    response = client.responses.create(model="deepseek/deepseek-chat", input="hi", top_logprobs=2,
                                       include=["message.output_text.logprobs"])
    assert fakes.openai.last.body["logprobs"] is True and fakes.openai.last.body["top_logprobs"] == 2
    logprobs = response.output[0].content[0].logprobs
    assert [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in logprobs] == [("Hi", -0.1,
                                                                                             ["Hi", "Hello"])]


def test_responses_logprobs_are_delivered_by_ollama(client: openai.OpenAI, fakes: Fakes) -> None:
    fakes.ollama.script(Reply.say("Hi there", chunk_size=3))
    response = client.responses.create(model="qwen3:8b", input="hi", top_logprobs=2)
    assert (fakes.ollama.last.body["logprobs"], fakes.ollama.last.body["top_logprobs"]) == (True, 2)
    logprobs = response.output[0].content[0].logprobs
    assert [(t.token, [a.token for a in t.top_logprobs]) for t in logprobs] == [
        ("Hi ", ["Hi ", "alt1"]), ("the", ["the", "alt1"]), ("re", ["re", "alt1"])]


def test_responses_stream_carries_logprobs_onto_its_events() -> None:
    from scillm_responses import EventStream

    from scillm_core.models import ChatChunk, ChunkChoice, Delta

    stream = EventStream("deepseek-chat", {})
    chunk = ChatChunk(id="c1", model="deepseek-chat",
                      choices=(ChunkChoice(delta=Delta(content="Hi"), logprobs={"content": TOKENS}),))
    raw = b"".join([*stream.start(), *stream.feed(chunk), *stream.complete()])
    events = {e["type"]: e for e in (orjson.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: "))}
    assert events["response.output_text.delta"]["logprobs"] == TOKENS
    assert events["response.output_text.done"]["logprobs"] == TOKENS
    assert events["response.completed"]["response"]["output"][0]["content"][0]["logprobs"] == TOKENS


@pytest.mark.parametrize(("ask", "param"), [({"top_logprobs": 3}, "top_logprobs"),
                                            ({"include": ["reasoning.encrypted_content",
                                                          "message.output_text.logprobs"]}, "include[1]")])
def test_responses_logprobs_are_refused_where_the_route_has_none(client: openai.OpenAI, fakes: Fakes,
                                                                 ask: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="claude-then-gemini", input="hi", **ask)
    _refused(caught.value, param, "anthropic")
    assert fakes.received() == 0
    client.responses.create(model=CLAUDE, input="hi", top_logprobs=0, include=["reasoning.encrypted_content"])
    assert "logprobs" not in fakes.claude.last.body  # asks for nothing: accepted


# -- /v1/responses hosted tools ------------------------------------------------------------------------------------

FUNCTION = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}
WEB_SEARCH = {"type": "web_search", "search_context_size": "low", "filters": {"allowed_domains": ["example.org"]},
              "user_location": {"type": "approximate", "city": "Paris", "country": "FR", "timezone": "Europe/Paris"}}
#: hosted tools only a Responses upstream runs
HOSTED: list[dict[str, Any]] = [
    {"type": "file_search", "vector_store_ids": ["vs_1"]},
    {"type": "code_interpreter", "container": {"type": "auto"}},
    {"type": "mcp", "server_label": "docs", "server_url": "https://mcp.example.com/sse", "require_approval": "never"},
    {"type": "image_generation"},
    {"type": "computer_use_preview", "display_width": 1024, "display_height": 768, "environment": "browser"},
    {"type": "local_shell"}]


def test_responses_web_search_is_chat_s_web_search_options(client: openai.OpenAI, fakes: Fakes) -> None:
    client.responses.create(model=GPT, input="news?", tools=[FUNCTION, WEB_SEARCH])  # type: ignore[list-item]
    sent = fakes.openai.last
    assert sent.path.endswith("/chat/completions")
    assert sent.body["web_search_options"] == {
        "search_context_size": "low", "filters": {"allowed_domains": ["example.org"]},
        "user_location": {"type": "approximate", "approximate": {"city": "Paris", "country": "FR",
                                                                 "timezone": "Europe/Paris"}}}
    assert [tool["function"]["name"] for tool in sent.body["tools"]] == ["get_time"]


def test_responses_web_search_is_anthropic_s_web_search_tool(client: openai.OpenAI, fakes: Fakes) -> None:
    response = client.responses.create(model=CLAUDE, input="news?",
                                       tools=[FUNCTION, {"type": "web_search_preview"}])  # type: ignore[list-item]
    assert response.output_text
    assert fakes.claude.last.body["tools"][1] == {"type": "web_search_20250305", "name": "web_search"}
    client.responses.create(model=CLAUDE, input="news?", tools=[WEB_SEARCH])  # type: ignore[list-item]
    assert fakes.claude.last.body["tools"] == [{
        "type": "web_search_20250305", "name": "web_search", "allowed_domains": ["example.org"],
        "user_location": {"type": "approximate", "city": "Paris", "country": "FR", "timezone": "Europe/Paris"}}]


def test_responses_max_tool_calls_is_anthropic_s_max_uses(client: openai.OpenAI, fakes: Fakes) -> None:
    """``max_tool_calls`` caps the hosted tools' calls: Anthropic's web search ``max_uses``; a chat upstream has no
    such cap (nothing the client reads is missing, so it goes without); not a count, a 400."""
    client.responses.create(model=CLAUDE, input="news?", tools=[{"type": "web_search"}], max_tool_calls=2)
    assert fakes.claude.last.body["tools"] == [{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}]
    client.responses.create(model=GPT, input="news?", tools=[{"type": "web_search"}], max_tool_calls=2)
    assert "max_tool_calls" not in fakes.openai.last.body and fakes.openai.last.body["web_search_options"] == {}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=CLAUDE, input="news?", max_tool_calls="2")  # type: ignore[arg-type]
    assert "$.max_tool_calls" in caught.value.message


def test_verbosity_is_codex_s_text_verbosity(client: openai.OpenAI, fakes: Fakes) -> None:
    """The Codex backend takes the Responses ``text.verbosity`` (Codex sends it): chat's ``verbosity`` becomes it,
    and a Responses client's goes as sent."""
    def sent() -> Any:
        return [r for r in fakes.codex.requests if r.method == "POST" and r.path.endswith("/responses")][-1].body

    completion = client.chat.completions.create(model="codex/gpt-5.1", messages=HI, verbosity="low")
    assert completion.choices[0].message.content and sent()["text"] == {"verbosity": "low"}
    fakes.codex.script(Reply.say('{"ok": true}'))
    client.chat.completions.create(model="codex/gpt-5.1", messages=HI, verbosity="high",
                                   response_format={"type": "json_object"})
    assert sent()["text"] == {"format": {"type": "json_object"}, "verbosity": "high"}
    with client.responses.stream(model="codex/gpt-5.1", input="hi", text={"verbosity": "low"}) as stream:
        assert stream.get_final_response().output_text
    assert sent()["text"] == {"verbosity": "low"}


def test_responses_verbosity_is_chat_s_verbosity(client: openai.OpenAI, fakes: Fakes) -> None:
    """``text.verbosity`` is chat's ``verbosity``: an OpenAI-compatible upstream gets it; a hint the other
    translations have no field for."""
    client.responses.create(model=GPT, input="hi", text={"verbosity": "low"})
    assert fakes.openai.last.body["verbosity"] == "low"
    response = client.responses.create(model=CLAUDE, input="hi", text={"verbosity": "low"})
    assert response.output_text and response.text.verbosity == "low"
    assert "verbosity" not in fakes.claude.last.body


def test_chat_web_search_options_are_anthropic_s_web_search_tool(client: openai.OpenAI, fakes: Fakes) -> None:
    client.chat.completions.create(model=CLAUDE, messages=HI, extra_body={"web_search_options": {}})
    assert fakes.claude.last.body["tools"] == [{"type": "web_search_20250305", "name": "web_search"}]


def test_responses_web_search_is_refused_where_the_route_has_none(client: openai.OpenAI, fakes: Fakes) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="qwen3:8b", input="news?", tools=[FUNCTION, WEB_SEARCH])  # type: ignore
    _refused(caught.value, "tools[1]", "ollama")
    assert "a web search" in caught.value.message
    assert fakes.received() == 0


def test_web_search_is_gemini_s_google_search(client: openai.OpenAI, fakes: Fakes) -> None:
    """Gemini's native API searches with its ``googleSearch`` tool (beside the function declarations), asked by
    chat's ``web_search_options`` or a Responses web search tool; its place and context size are hints it has no
    field for."""
    place = {"type": "approximate", "approximate": {"city": "Paris", "country": "FR"}}
    client.chat.completions.create(model="gemini/gemini-2.5-flash", messages=HI, extra_body={
        "web_search_options": {"search_context_size": "high", "user_location": place}})
    assert fakes.gemini.last.body["tools"] == [{"googleSearch": {}}]
    response = client.responses.create(model="gemini/gemini-2.5-flash", input="news?", tools=[  # type: ignore
        FUNCTION, {"type": "web_search", "user_location": WEB_SEARCH["user_location"]}])
    assert response.output_text
    assert fakes.gemini.last.body["tools"] == [{"functionDeclarations": [{
        "name": "get_time", "parametersJsonSchema": {"type": "object", "properties": {}}}]}, {"googleSearch": {}}]


def test_gemini_refuses_a_web_search_restricted_to_some_domains(client: openai.OpenAI, fakes: Fakes) -> None:
    """Its Google Search takes no domain filter: a 400 naming the client's own field, not an answer from
    anywhere; a group goes on to a member that can (``test_responses_group_skips_...``)."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="gemini/gemini-2.5-flash", input="news?",
                                tools=[FUNCTION, WEB_SEARCH])  # type: ignore[list-item]
    _refused(caught.value, "tools[1].filters.allowed_domains", "gemini")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gemini/gemini-2.5-flash", messages=HI, extra_body={
            "web_search_options": {"filters": {"allowed_domains": ["example.org"]}}})
    _refused(caught.value, "web_search_options.filters.allowed_domains", "gemini")
    assert fakes.received() == 0


@pytest.mark.parametrize("tool", HOSTED, ids=[tool["type"] for tool in HOSTED])
@pytest.mark.parametrize("model", [CLAUDE, GPT, "gemini/gemini-2.5-flash"])
def test_responses_hosted_tools_are_refused_on_translated_routes(client: openai.OpenAI, fakes: Fakes, model: str,
                                                                 tool: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=model, input="hi", tools=[FUNCTION, tool])  # type: ignore[list-item]
    _refused(caught.value, "tools[1]", model.split("/")[0])
    assert f"the hosted tool {tool['type']!r}" in caught.value.message
    assert fakes.received() == 0


APPLY_PATCH = {"type": "custom", "name": "apply_patch", "description": "Edit files",
               "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}


@pytest.mark.parametrize("model", [CLAUDE, "deepseek/deepseek-chat"])
def test_responses_custom_tools_are_refused_on_translated_routes(client: openai.OpenAI, fakes: Fakes,
                                                                 model: str) -> None:
    """A custom tool's call is free-form text (a grammar's), which a chat route's JSON tool calls cannot carry."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=model, input="hi", tools=[FUNCTION, APPLY_PATCH])  # type: ignore[list-item]
    _refused(caught.value, "tools[1]", model.split("/")[0])
    assert "a custom tool" in caught.value.message
    assert fakes.received() == 0


CHOSEN = [({"type": "web_search_preview"}, "the hosted tool 'web_search_preview'"),
          ({"type": "file_search"}, "the hosted tool 'file_search'"),
          ({"type": "mcp", "server_label": "docs"}, "the hosted tool 'mcp'"),
          ({"type": "custom", "name": "apply_patch"}, "a custom tool"),
          ({"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_time"}]},
           "allowed_tools")]


@pytest.mark.parametrize(("choice", "what"), CHOSEN, ids=[choice["type"] for choice, _ in CHOSEN])
def test_responses_tool_choice_the_chat_model_cannot_say_is_refused(client: openai.OpenAI, fakes: Fakes,
                                                                    choice: dict[str, Any], what: str) -> None:
    """The chat model has no way to force a hosted tool (even where the tool itself is mapped), a custom tool, or
    to restrict the choice to some tools; a Responses upstream gets them as sent."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=GPT, input="hi", tools=[FUNCTION, {"type": "web_search_preview"}],
                                tool_choice=choice)  # type: ignore[arg-type]
    _refused(caught.value, "tool_choice", "openai")
    assert what in caught.value.message
    assert fakes.received() == 0
    with client.responses.stream(model="codex/gpt-5.1", input="hi", tools=[FUNCTION, APPLY_PATCH, *HOSTED],
                                 tool_choice=choice) as stream:  # type: ignore[arg-type]
        stream.get_final_response()
    assert [r for r in fakes.codex.requests if r.method == "POST"][-1].body["tool_choice"] == choice


def test_responses_group_skips_a_member_that_cannot_search_as_asked(client: openai.OpenAI, fakes: Fakes) -> None:
    raw = client.responses.with_raw_response.create(model="gemini-then-claude", input="news?",
                                                    tools=[WEB_SEARCH])  # type: ignore[list-item]
    assert raw.headers["x-scillm-provider"] == "anthropic"
    assert fakes.gemini.requests == []  # its Google Search cannot keep to the allowed domains
    assert fakes.claude.last.body["tools"][0]["type"] == "web_search_20250305"


def test_responses_fallback_that_cannot_search_as_asked_is_not_called(client: openai.OpenAI, fakes: Fakes) -> None:
    fakes.claude.script(Reply.fail(529, "Overloaded", type="overloaded_error"))
    with pytest.raises(openai.APIStatusError) as caught:
        client.responses.create(model="claude-then-gemini", input="news?", tools=[WEB_SEARCH])  # type: ignore
    assert caught.value.status_code == 503 and "anthropic" in caught.value.message  # not Gemini's refusal
    tried = caught.value.body["details"]["tried"] if "details" in (caught.value.body or {}) else \
        caught.value.body["error"]["details"]["tried"]
    assert [t["error"] for t in tried] == [tried[0]["error"], "unsupported_parameter"]
    assert fakes.gemini.requests == []


def test_responses_group_where_no_member_runs_the_hosted_tool_names_the_first(client: openai.OpenAI,
                                                                             fakes: Fakes) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="gpt-then-claude", input="hi", tools=HOSTED[:1])  # type: ignore[arg-type]
    _refused(caught.value, "tools[0]", "openai")
    assert fakes.received() == 0


def test_responses_hosted_tools_reach_a_responses_upstream_as_sent(client: openai.OpenAI, fakes: Fakes) -> None:
    tools = [FUNCTION, WEB_SEARCH, APPLY_PATCH, *HOSTED]
    with client.responses.stream(model="codex/gpt-5.1", input="hi", tools=tools,  # type: ignore[arg-type]
                                 tool_choice={"type": "file_search"}) as stream:
        stream.get_final_response()
    sent = [r for r in fakes.codex.requests if r.method == "POST" and r.path.endswith("/responses")][-1]
    assert sent.body["tools"] == tools and sent.body["tool_choice"] == {"type": "file_search"}
    assert "web_search_options" not in sent.body


# -- /v1/messages -> other providers -------------------------------------------------------------------------------

MESSAGES_ASKS: dict[str, dict[str, Any]] = {
    "mcp_servers": {"mcp_servers": [{"type": "url", "url": "https://mcp.example.com/sse", "name": "ex"}]},
    "container": {"container": "container_011CQ"},
    "tools[0]": {"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]},
}


@pytest.mark.parametrize("param", sorted(MESSAGES_ASKS))
@pytest.mark.parametrize("model", ["deepseek/deepseek-chat", "gemini/gemini-2.5-flash"])
def test_messages_fields_only_anthropic_delivers_are_refused_elsewhere(
        claude_client: anthropic.Anthropic, fakes: Fakes, param: str, model: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude_client.messages.create(model=model, max_tokens=64, messages=HI,
                                      extra_body=MESSAGES_ASKS[param])
    body = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert f"@ $.{param}" in body["error"]["message"]
    assert body["error"]["details"]["error_code"] == "unsupported_parameter"
    assert body["error"]["details"]["provider"] == model.split("/")[0]
    assert fakes.received() == 0


def test_messages_hints_are_accepted_elsewhere(claude_client: anthropic.Anthropic, fakes: Fakes) -> None:
    message = claude_client.messages.create(
        model="deepseek/deepseek-chat", max_tokens=64, messages=HI, metadata={"user_id": "u-1"},
        stop_sequences=["END"], extra_body={"top_k": 5, "service_tier": "auto",
                                            "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}})
    assert message.content[0].text
    body = fakes.openai.last.body
    assert body["stop"] == ["END"]
    assert not {"top_k", "metadata", "service_tier", "context_management"} & set(body)


def test_messages_to_anthropic_keep_them(claude_client: anthropic.Anthropic, fakes: Fakes) -> None:
    asks = {key: value for extra in MESSAGES_ASKS.values() for key, value in extra.items()}
    claude_client.messages.create(model=CLAUDE, max_tokens=64, messages=HI, extra_body=asks)
    body = fakes.claude.last.body
    assert {key: body[key] for key in asks} == asks


def test_messages_fallback_that_cannot_deliver_is_not_called(claude_client: anthropic.Anthropic,
                                                             fakes: Fakes) -> None:
    fakes.claude.script(Reply.fail(529, "Overloaded", type="overloaded_error"))
    with pytest.raises(anthropic.APIStatusError) as caught:
        claude_client.messages.create(model="claude-then-deepseek", max_tokens=64, messages=HI,
                                      extra_body=MESSAGES_ASKS["mcp_servers"])
    assert caught.value.status_code == 529  # Anthropic's own failure, not a 400 about the fallback
    assert fakes.openai.requests == []


THINKING = {"top_k": 5, "thinking": {"type": "enabled", "budget_tokens": 1024}}


def test_messages_fields_of_anthropic_never_reach_a_fallback_of_another_family(
        claude_client: anthropic.Anthropic, fakes: Fakes) -> None:
    fakes.claude.script(Reply.fail(529, "Overloaded", type="overloaded_error"))
    raw = claude_client.messages.with_raw_response.create(model="claude-then-deepseek", max_tokens=2048,
                                                          messages=HI, extra_body=THINKING)
    assert raw.headers["x-scillm-dialect"] == "anthropic-messages -> deepseek"
    body = fakes.openai.last.body
    assert not {"thinking", "top_k"} & set(body), body  # an OpenAI-style upstream would refuse them
    assert body["reasoning_effort"] == "low"  # the thinking budget, as a first-route DeepSeek gets it


def test_messages_fields_reach_an_anthropic_fallback_translated(claude_client: anthropic.Anthropic,
                                                                fakes: Fakes) -> None:
    """DeepSeek cannot deliver the MCP servers and the server tool: skipped, never called; Claude gets the
    client's body as sent."""
    tools = MESSAGES_ASKS["tools[0]"]["tools"] + [{"name": "get_time", "input_schema": {"type": "object"}}]
    raw = claude_client.messages.with_raw_response.create(
        model="deepseek-then-claude", max_tokens=2048, messages=HI, metadata={"user_id": "u-1"},
        extra_body={**THINKING, **MESSAGES_ASKS["mcp_servers"], "tools": tools})
    assert raw.headers["x-scillm-dialect"] == "anthropic-messages"
    assert fakes.openai.requests == []
    body = fakes.claude.last.body
    assert body["thinking"] == THINKING["thinking"] and body["top_k"] == 5
    assert body["metadata"] == {"user_id": "u-1"} and body["mcp_servers"] == MESSAGES_ASKS["mcp_servers"]["mcp_servers"]
    assert sorted(t["name"] for t in body["tools"]) == ["get_time", "web_search"]


def test_messages_translated_for_anthropic_keep_the_client_s_fields(fakes: Fakes, tmp_path: Path) -> None:
    """``[server] passthrough = false``: translated through the chat model, and still nothing lost."""
    env = {"ANTHROPIC_API_KEY": "sk-ant-params-0123456789abcdef", "ANTHROPIC_API_BASE": fakes.claude.base_url}
    app = make_app(env=env, config={"server": {"passthrough": False}}, data_dir=tmp_path,
                   only=("auth", "messages", "anthropic"))
    tools = MESSAGES_ASKS["tools[0]"]["tools"] + [{"name": "get_time", "input_schema": {"type": "object"}}]
    with ServerThread(app) as server:
        client = anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0, timeout=20)
        raw = client.messages.with_raw_response.create(
            model=CLAUDE, max_tokens=2048, messages=HI, metadata={"user_id": "u-1"},
            extra_body={**THINKING, **MESSAGES_ASKS["mcp_servers"], **MESSAGES_ASKS["container"], "tools": tools})
    assert raw.headers["x-scillm-dialect"] == "anthropic-messages -> anthropic"
    body = fakes.claude.last.body
    assert body["thinking"] == THINKING["thinking"] and body["top_k"] == 5 and body["metadata"] == {"user_id": "u-1"}
    assert body["mcp_servers"] == MESSAGES_ASKS["mcp_servers"]["mcp_servers"] and body["container"] == "container_011CQ"
    assert sorted(t["name"] for t in body["tools"]) == ["get_time", "web_search"]


# -- Anthropic citations -------------------------------------------------------------------------------------------

DOCUMENT = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "The grass is green."},
            "title": "Garden facts", "citations": {"enabled": True}}
CITATION = {"type": "char_location", "cited_text": "The grass is green.", "document_index": 0,
            "document_title": "Garden facts", "start_char_index": 0, "end_char_index": 19, "file_id": None}
CITED = Reply.cite(("According to the document, ", ()), ("the grass is green", (CITATION,)), (".", ()))
ASKED_DOCUMENT = [{"role": "user", "content": [DOCUMENT, {"type": "text", "text": "What color is the grass?"}]}]
#: a conversation whose history carries an earlier answer's citations
CITED_HISTORY = [{"role": "user", "content": "What color is the grass?"},
                 {"role": "assistant", "content": [{"type": "text", "text": "the grass is green",
                                                    "citations": [CITATION]}]},
                 {"role": "user", "content": "And the sky?"}]


@pytest.mark.parametrize(("messages", "param"), [(ASKED_DOCUMENT, "messages[0].content[0].citations"),
                                                 (CITED_HISTORY, "messages[1].content[0].citations")])
@pytest.mark.parametrize("model", ["deepseek/deepseek-chat", "gemini/gemini-2.5-flash", "qwen3:8b"])
def test_messages_citations_are_refused_where_the_route_cannot_cite(
        claude_client: anthropic.Anthropic, fakes: Fakes, model: str, messages: list[Any], param: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude_client.messages.create(model=model, max_tokens=64, messages=messages)
    body = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert f"@ $.{param}" in body["error"]["message"] and "citations" in body["error"]["message"]
    assert body["error"]["details"]["error_code"] == "unsupported_parameter"
    assert fakes.received() == 0


def _tool_turns(*content: dict[str, Any], is_error: bool | None = None) -> list[dict[str, Any]]:
    """A conversation whose last turn answers a tool call with ``content`` (a tool_result's blocks)."""
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": "toolu_1", "content": list(content)}
    if is_error is not None:
        result["is_error"] = is_error
    return [{"role": "user", "content": "What color is the grass?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}]},
            {"role": "user", "content": [result]}]


CITED_TEXT = {"type": "text", "text": "the grass is green", "citations": [CITATION]}
LOOKUP = [{"name": "lookup", "input_schema": {"type": "object"}}]


@pytest.mark.parametrize(("messages", "param"), [
    (_tool_turns({"type": "text", "text": "found:"}, CITED_TEXT), "messages[2].content[0].content[1].citations"),
    (_tool_turns(DOCUMENT), "messages[2].content[0].content[0].citations")])
@pytest.mark.parametrize("model", ["deepseek/deepseek-chat", "gemini/gemini-2.5-flash", "qwen3:8b"])
def test_messages_citations_inside_tool_results_are_refused_where_the_route_cannot_cite(
        claude_client: anthropic.Anthropic, fakes: Fakes, model: str, messages: list[Any], param: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude_client.messages.create(model=model, max_tokens=64, messages=messages,  # type: ignore[arg-type]
                                      tools=LOOKUP)  # type: ignore[list-item]
    body = caught.value.body
    assert f"@ $.{param}" in body["error"]["message"] and "citations" in body["error"]["message"]
    assert body["error"]["details"]["error_code"] == "unsupported_parameter"
    assert fakes.received() == 0


def test_messages_tool_result_without_citations_still_goes_everywhere(claude_client: anthropic.Anthropic,
                                                                      fakes: Fakes) -> None:
    claude_client.messages.create(model="deepseek/deepseek-chat", max_tokens=64, tools=LOOKUP,  # type: ignore
                                  messages=_tool_turns({"type": "text", "text": "green"},  # type: ignore[arg-type]
                                                       {"type": "text", "text": "short", "citations": []}))
    assert fakes.openai.last.body["messages"][-1] == {"role": "tool", "tool_call_id": "toolu_1",
                                                      "content": "green\n\nshort"}


def test_messages_citations_inside_tool_results_make_a_group_skip_a_member(claude_client: anthropic.Anthropic,
                                                                           fakes: Fakes) -> None:
    messages = _tool_turns({"type": "text", "text": "found:"}, CITED_TEXT)
    raw = claude_client.messages.with_raw_response.create(model="deepseek-then-claude", max_tokens=64,
                                                          messages=messages, tools=LOOKUP)  # type: ignore
    assert raw.headers["x-scillm-dialect"] == "anthropic-messages" and fakes.openai.requests == []
    assert fakes.claude.last.body["messages"] == messages


SEARCH_RESULT = {"type": "search_result", "source": "https://example.org/grass", "title": "Grass",
                 "content": [{"type": "text", "text": "The grass is green."}], "citations": {"enabled": True}}


@pytest.mark.parametrize(("messages", "param"), [
    (_tool_turns(SEARCH_RESULT), "messages[2].content[0].content[0].citations"),
    ([{"role": "user", "content": [SEARCH_RESULT, {"type": "text", "text": "Color?"}]}],
     "messages[0].content[0].citations")])
def test_messages_search_results_asking_for_citations_never_reach_a_fallback_that_cannot_cite(
        claude_client: anthropic.Anthropic, fakes: Fakes, messages: list[Any], param: str) -> None:
    """A block the chat model does not know goes to Anthropic as sent (the first route); a fallback that cannot
    cite is not called, so the client gets Anthropic's own failure, not an answer made without the results."""
    fakes.claude.script(Reply.fail(529, "Overloaded", type="overloaded_error"))
    with pytest.raises(anthropic.APIStatusError) as caught:
        claude_client.messages.create(model="claude-then-deepseek", max_tokens=64, messages=messages,  # type: ignore
                                      tools=LOOKUP)  # type: ignore[list-item]
    assert caught.value.status_code == 529
    tried = caught.value.body["error"]["details"]["tried"]
    assert tried[-1]["error"] == "unsupported_parameter", tried
    assert fakes.openai.requests == [] and fakes.claude.last.body["messages"] == messages
    from scillm_messages.translate import parse_messages_request  # the path the refusal names

    body = {"model": "claude-then-deepseek", "max_tokens": 64, "messages": messages}
    assert parse_messages_request(body, lenient=True).scillm["asks"] == {f"$.{param}": "citations"}


def test_messages_citations_inside_tool_results_translated_for_anthropic(fakes: Fakes, tmp_path: Path) -> None:
    """``[server] passthrough = false``: the tool result reaches Anthropic with its cited text block as the client
    sent it, beside its plain text, and ``is_error`` as sent."""
    env = {"ANTHROPIC_API_KEY": "sk-ant-params-0123456789abcdef", "ANTHROPIC_API_BASE": fakes.claude.base_url}
    app = make_app(env=env, config={"server": {"passthrough": False}}, data_dir=tmp_path,
                   only=("auth", "messages", "anthropic"))
    messages = _tool_turns({"type": "text", "text": "found:"}, CITED_TEXT, is_error=True)
    with ServerThread(app) as server:
        client = anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0, timeout=20)
        fakes.claude.script(CITED)
        raw = client.messages.with_raw_response.create(model=CLAUDE, max_tokens=64, messages=messages,  # type: ignore
                                                       tools=LOOKUP)  # type: ignore[list-item]
    assert raw.headers["x-scillm-dialect"] == "anthropic-messages -> anthropic"
    result = fakes.claude.last.body["messages"][2]["content"][0]
    assert result == {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                      "content": [{"type": "text", "text": "found:"}, CITED_TEXT]}
    assert _cited_blocks(raw.parse().content) == EXPECTED_BLOCKS


def test_messages_citations_turned_off_ask_for_nothing(claude_client: anthropic.Anthropic, fakes: Fakes) -> None:
    document = {**DOCUMENT, "citations": {"enabled": False}}
    claude_client.messages.create(model="deepseek/deepseek-chat", max_tokens=64,
                                  messages=[{"role": "user", "content": [document, {"type": "text", "text": "?"}]}])
    assert "The grass is green." in fakes.openai.last.body["messages"][0]["content"]


def _cited_blocks(content: list[Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    return [(block.text, [c.model_dump() for c in block.citations or ()]) for block in content]


EXPECTED_BLOCKS = [("According to the document, ", []), ("the grass is green", [CITATION]), (".", [])]


@pytest.mark.parametrize("model", [CLAUDE, "deepseek-then-claude"])
def test_messages_citations_reach_anthropic_as_sent(claude_client: anthropic.Anthropic, fakes: Fakes,
                                                    model: str) -> None:
    fakes.claude.script(CITED)
    raw = claude_client.messages.with_raw_response.create(model=model, max_tokens=64, messages=ASKED_DOCUMENT)
    assert raw.headers["x-scillm-dialect"] == "anthropic-messages" and fakes.openai.requests == []
    assert fakes.claude.last.body["messages"] == ASKED_DOCUMENT
    assert _cited_blocks(raw.parse().content) == EXPECTED_BLOCKS
    fakes.claude.script(CITED)
    with claude_client.messages.stream(model=model, max_tokens=64, messages=ASKED_DOCUMENT) as stream:
        assert _cited_blocks(stream.get_final_message().content) == EXPECTED_BLOCKS


def test_messages_citations_translated_for_anthropic(fakes: Fakes, tmp_path: Path) -> None:
    """``[server] passthrough = false``: the document and the history's citations reach Anthropic as the client
    sent them, and the answer's citations come back on its text blocks, streamed or not."""
    env = {"ANTHROPIC_API_KEY": "sk-ant-params-0123456789abcdef", "ANTHROPIC_API_BASE": fakes.claude.base_url}
    app = make_app(env=env, config={"server": {"passthrough": False}}, data_dir=tmp_path,
                   only=("auth", "messages", "anthropic"))
    history = [*CITED_HISTORY[:2], {"role": "user", "content": [DOCUMENT, {"type": "text", "text": "And now?"}]}]
    with ServerThread(app) as server:
        client = anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0, timeout=20)
        fakes.claude.script(CITED)
        raw = client.messages.with_raw_response.create(model=CLAUDE, max_tokens=64, messages=history)
        assert raw.headers["x-scillm-dialect"] == "anthropic-messages -> anthropic"
        sent = fakes.claude.last.body["messages"]
        assert sent[1]["content"] == history[1]["content"] and sent[2]["content"][0] == DOCUMENT
        assert _cited_blocks(raw.parse().content) == EXPECTED_BLOCKS
        fakes.claude.script(CITED)
        with client.messages.stream(model=CLAUDE, max_tokens=64, messages=ASKED_DOCUMENT) as stream:
            final = stream.get_final_message()
    assert "".join(block.text for block in final.content) == CITED.text
    assert [c.model_dump() for block in final.content for c in block.citations or ()] == [CITATION]


ANNOTATION = {**CITATION, "start_index": 27, "end_index": 45}


def test_chat_to_anthropic_returns_citations_as_annotations(client: openai.OpenAI, fakes: Fakes) -> None:
    """A chat client may send Anthropic's document block as it is; the answer's citations come back as the
    message's ``annotations`` (Anthropic's citation, located in the content), streamed or not."""
    messages = [{"role": "user", "content": [DOCUMENT, {"type": "text", "text": "What color is the grass?"}]}]
    fakes.claude.script(CITED)
    completion = client.chat.completions.create(model=CLAUDE, messages=messages)  # type: ignore[arg-type]
    assert fakes.claude.last.body["messages"][0]["content"][0] == DOCUMENT
    message = completion.choices[0].message
    assert message.content == CITED.text
    notes = [note.model_dump(exclude_unset=True) for note in message.annotations or ()]
    assert notes == [ANNOTATION]
    assert message.content[27:45] == "the grass is green"
    fakes.claude.script(CITED)
    chunks = list(client.chat.completions.create(model=CLAUDE, messages=messages, stream=True))  # type: ignore
    streamed = [note for c in chunks if c.choices for note in (c.choices[0].delta.model_extra or {}).get(
        "annotations", ())]
    assert streamed == [ANNOTATION]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == CITED.text


def test_responses_carry_annotations_onto_output_text() -> None:
    """No Responses input asks for citations (its input parts have no such block), but an answer that has them
    keeps them: ``output_text.annotations``, and an ``annotation.added`` event when streamed."""
    from scillm_responses import EventStream
    from scillm_responses.translate import response_object

    from scillm_core.models import ChatChunk, ChatResponse, Choice, ChunkChoice, Delta, Message

    result = ChatResponse(id="c1", model="claude", choices=(Choice(message=Message(
        role="assistant", content=CITED.text, extra={"annotations": [ANNOTATION]}), finish_reason="stop"),))
    assert response_object(result, {})["output"][0]["content"][0]["annotations"] == [ANNOTATION]
    stream = EventStream("claude", {})
    chunks = [ChatChunk(id="c1", model="claude", choices=(ChunkChoice(delta=Delta(content=CITED.text)),)),
              ChatChunk(id="c1", model="claude", choices=(ChunkChoice(delta=Delta(extra={"annotations": [
                  ANNOTATION]})),))]
    raw = b"".join([*stream.start(), *(e for c in chunks for e in stream.feed(c)), *stream.complete()])
    events = {e["type"]: e for e in (orjson.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: "))}
    added = events["response.output_text.annotation.added"]
    assert (added["annotation_index"], added["annotation"]) == (0, ANNOTATION)
    assert events["response.completed"]["response"]["output"][0]["content"][0]["annotations"] == [ANNOTATION]


# -- web search citations ------------------------------------------------------------------------------------------

WEB_CITATION = {"type": "web_search_result_location", "url": "https://example.org/sky",
                "title": "Why is the sky blue?", "cited_text": "Sunlight is scattered by the air, blue light most.",
                "encrypted_index": "Eo8BCioIAhgBIiQy"}
SEARCHED = Reply.cite(("In short, ", ()), ("the air scatters blue light most", (WEB_CITATION,)), (".", ()))
#: OpenAI's url_citation of the cited span (Anthropic's cited_text and encrypted_index beside its fields)
URL_CITATION = {"url": "https://example.org/sky", "title": "Why is the sky blue?", "start_index": 10,
                "end_index": 42, "cited_text": WEB_CITATION["cited_text"], "encrypted_index": "Eo8BCioIAhgBIiQy"}


def test_chat_web_search_on_anthropic_answers_url_citations(client: openai.OpenAI, fakes: Fakes) -> None:
    """Anthropic's web search citations come back as OpenAI's ``url_citation`` annotations locating the cited text
    in the content (streamed: a ``delta.annotations`` chunk when the cited text ends); the server tool's own blocks
    are not part of a chat answer."""
    fakes.claude.script(SEARCHED)
    completion = client.chat.completions.create(model=CLAUDE, messages=HI, extra_body={"web_search_options": {}})
    assert fakes.claude.last.body["tools"] == [{"type": "web_search_20250305", "name": "web_search"}]
    message = completion.choices[0].message
    assert message.content == SEARCHED.text
    [note] = message.annotations or ()
    assert note.type == "url_citation"
    assert note.url_citation.model_dump() == URL_CITATION
    assert message.content[note.url_citation.start_index:note.url_citation.end_index] == \
        "the air scatters blue light most"
    fakes.claude.script(SEARCHED)
    chunks = list(client.chat.completions.create(model=CLAUDE, messages=HI, stream=True,
                                                 extra_body={"web_search_options": {}}))
    streamed = [note for c in chunks if c.choices for note in (c.choices[0].delta.model_extra or {}).get(
        "annotations", ())]
    assert streamed == [{"type": "url_citation", "url_citation": URL_CITATION}]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == SEARCHED.text


def test_responses_web_search_on_anthropic_answers_url_citations(client: openai.OpenAI, fakes: Fakes) -> None:
    """On ``/v1/responses`` a url_citation is flat (``output_text.annotations``; streamed, an
    ``annotation.added`` event)."""
    fakes.claude.script(SEARCHED)
    response = client.responses.create(model=CLAUDE, input="Why is the sky blue?", tools=[{"type": "web_search"}])
    [note] = response.output[0].content[0].annotations  # type: ignore[union-attr]
    assert note.type == "url_citation"
    assert (note.url, note.title, note.start_index, note.end_index) == (  # type: ignore[union-attr]
        URL_CITATION["url"], URL_CITATION["title"], 10, 42)
    fakes.claude.script(SEARCHED)
    events = list(client.responses.create(model=CLAUDE, input="Why is the sky blue?", stream=True,
                                          tools=[{"type": "web_search"}]))
    [added] = [e for e in events if e.type == "response.output_text.annotation.added"]
    assert added.annotation.model_dump() == {"type": "url_citation", **URL_CITATION}  # type: ignore[union-attr]
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output[0].content[0].annotations[0].model_dump() == {"type": "url_citation", **URL_CITATION}


def test_messages_web_search_citations_translated_for_anthropic(fakes: Fakes, tmp_path: Path) -> None:
    """``[server] passthrough = false``: a ``/v1/messages`` client's web search answer keeps Anthropic's citations
    on its text blocks, streamed or not (the url_citation in between loses nothing)."""
    env = {"ANTHROPIC_API_KEY": "sk-ant-params-0123456789abcdef", "ANTHROPIC_API_BASE": fakes.claude.base_url}
    app = make_app(env=env, config={"server": {"passthrough": False}}, data_dir=tmp_path,
                   only=("auth", "messages", "anthropic"))
    tools = [{"type": "web_search_20250305", "name": "web_search"}]
    expected = [("In short, ", []), ("the air scatters blue light most", [WEB_CITATION]), (".", [])]
    with ServerThread(app) as server:
        client = anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0, timeout=20)
        fakes.claude.script(SEARCHED)
        raw = client.messages.with_raw_response.create(model=CLAUDE, max_tokens=64, messages=HI,
                                                       tools=tools)  # type: ignore[arg-type]
        assert raw.headers["x-scillm-dialect"] == "anthropic-messages -> anthropic"
        assert _cited_blocks(raw.parse().content) == expected
        fakes.claude.script(SEARCHED)
        with client.messages.stream(model=CLAUDE, max_tokens=64, messages=HI,
                                    tools=tools) as stream:  # type: ignore[arg-type]
            final = stream.get_final_message()
    assert [c.model_dump() for block in final.content for c in block.citations or ()] == [WEB_CITATION]


#: Gemini's Google Search answer: its sources located in bytes of the text (non-ASCII before and in the segment)
GROUND_URL = "https://vertexaisearch.cloud.google.com/grounding-api-redirect/AUZIYQHnRslbELPz0Kvy"
GROUNDED = Reply.cite(("Kurz — über die Luft: ", ()), ("sie streut blaues Licht am stärksten", (
    {"url": GROUND_URL, "title": "example.org"},)), (".", ()))
GROUND_CITATION = {"url": GROUND_URL, "title": "example.org", "start_index": 22, "end_index": 58}


def test_chat_web_search_on_gemini_answers_url_citations(client: openai.OpenAI, fakes: Fakes) -> None:
    """Gemini's grounding metadata comes back as ``url_citation`` annotations whose offsets are characters of the
    content (Gemini's are UTF-8 bytes); streamed, as one ``delta.annotations`` chunk before the finish. Without a
    search, no grounding and no annotations."""
    model, search = "gemini/gemini-2.5-flash", {"web_search_options": {}}
    fakes.gemini.script(GROUNDED)
    message = client.chat.completions.create(model=model, messages=HI, extra_body=search).choices[0].message
    assert fakes.gemini.last.body["tools"] == [{"googleSearch": {}}]
    assert message.content == GROUNDED.text
    [note] = message.annotations or ()
    assert note.type == "url_citation" and note.url_citation.model_dump() == GROUND_CITATION
    assert message.content[22:58] == "sie streut blaues Licht am stärksten"
    fakes.gemini.script(GROUNDED)
    chunks = [c for c in client.chat.completions.create(model=model, messages=HI, stream=True, extra_body=search)
              if c.choices]
    notes = [(i, note) for i, c in enumerate(chunks) for note in (c.choices[0].delta.model_extra or {}).get(
        "annotations", ())]
    assert [note for _, note in notes] == [{"type": "url_citation", "url_citation": GROUND_CITATION}]
    [finish] = [i for i, c in enumerate(chunks) if c.choices[0].finish_reason]
    assert notes[0][0] < finish
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == GROUNDED.text
    fakes.gemini.script(GROUNDED)
    plain = client.chat.completions.create(model=model, messages=HI).choices[0].message
    assert "tools" not in fakes.gemini.last.body and plain.content == GROUNDED.text and not plain.annotations


def test_responses_web_search_on_gemini_answers_url_citations(client: openai.OpenAI, fakes: Fakes) -> None:
    fakes.gemini.script(GROUNDED)
    response = client.responses.create(model="gemini/gemini-2.5-flash", input="Why is the sky blue?",
                                       tools=[{"type": "web_search"}])
    [note] = response.output[0].content[0].annotations  # type: ignore[union-attr]
    assert note.model_dump() == {"type": "url_citation", **GROUND_CITATION}
    fakes.gemini.script(GROUNDED)
    events = list(client.responses.create(model="gemini/gemini-2.5-flash", input="Why is the sky blue?",
                                          stream=True, tools=[{"type": "web_search"}]))
    [added] = [e for e in events if e.type == "response.output_text.annotation.added"]
    assert added.annotation.model_dump() == {"type": "url_citation", **GROUND_CITATION}  # type: ignore[union-attr]
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == GROUNDED.text
    assert final.output[0].content[0].annotations[0].model_dump() == {"type": "url_citation", **GROUND_CITATION}


def test_origins_name_the_clients_paths_for_the_translated_request() -> None:
    """``errors.Origins``: chat's message, part and tool paths go to the recorded ones (the chat-shaped rest below
    them dropped); a renamed field keeps what follows it unless a deeper path was recorded; the rest is unchanged."""
    from scillm_core import errors

    origins = errors.Origins()
    origins.message("$.system")
    origins.message("$.messages[0]", ["$.messages[0].content[2]"], None)
    origins.message("$.messages[1]", None, ["$.messages[1].content[0]", "$.messages[1].content[3]"])
    origins.message("$.input[4]", "$.input[4].content")  # parts that kept their places
    origins.tools.append("$.tools[2]")
    origins.fields.update({"stop": "$.stop_sequences", "response_format": "$.output_format",
                           "response_format.json_schema.schema": "$.output_format.schema",
                           "web_search_options": "$.tools[0]"})
    for chat, native in [("$.messages[0]", "$.system"),
                         ("$.messages[1].content[0].image_url.url", "$.messages[0].content[2]"),
                         ("$.messages[2].tool_calls[1].function.arguments", "$.messages[1].content[3]"),
                         ("$.messages[1].content", "$.messages[0]"), ("$.tools[0].function.parameters", "$.tools[2]"),
                         ("$.stop[1]", "$.stop_sequences[1]"), ("$.response_format.type", "$.output_format.type"),
                         ("$.response_format.json_schema.schema.properties", "$.output_format.schema.properties"),
                         ("$.web_search_options.filters.allowed_domains", "$.tools[0].filters.allowed_domains"),
                         ("$.messages[3].content[5].text", "$.input[4].content[5]"),
                         ("$.temperature", "$.temperature"), ("$.messages[9].content[0]", "$.messages[9].content[0]")]:
        assert origins.native(chat) == native, chat
    moved = origins.relocate(errors.InvalidRequest("no @ $.stop[1]", param="$.stop[1]"))
    assert (moved.param, moved.message) == ("$.stop_sequences[1]", "no @ $.stop_sequences[1]")
    origins.asks = {"$.messages[0]": "citations"}  # a path the surface named itself is the client's already
    named = errors.InvalidRequest("x @ $.messages[0]", param="$.messages[0]")
    assert origins.relocate(named) is named
