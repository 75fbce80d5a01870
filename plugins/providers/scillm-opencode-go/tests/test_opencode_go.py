"""OpenCode Go: chat models over OpenAI chat completions, MiniMax/Qwen over the Anthropic-style /messages, both
behind opencode-go/<model>, both passing the provider contract; the models listing says which is which."""

from __future__ import annotations

from typing import Any

import httpx
from scillm_anthropic import DEFAULT_MAX_TOKENS

from scillm_core.testing import DEV_KEY, FakeOpenAI, ServerThread, make_app
from scillm_core.testing.contract import TINY_PNG_B64, ProviderContract
from scillm_core.testing.fake_anthropic import FakeAnthropic

AUTH = {"authorization": f"Bearer {DEV_KEY}"}
ISOLATED = ("chat", "auth", "ops", "openai-compat", "anthropic", "opencode-go")


class GoContract(ProviderContract):
    plugin = "opencode-go"
    provider = "opencode-go"
    key_env, base_env = "OPENCODE_GO_API_KEY", "OPENCODE_GO_API_BASE"
    SURFACES = ("chat", "embeddings", "auth", "ops", "openai-compat", "anthropic")


class TestChatModels(GoContract):
    model, upstream_model = "opencode-go/kimi-k2.6", "kimi-k2.6"
    fake_class = FakeOpenAI

    def check_upstream(self, request: Any, *, stream: bool) -> None:
        super().check_upstream(request, stream=stream)
        assert request.path == "/v1/chat/completions"
        assert request.headers["x-opencode-session"].startswith("scillm-")


class TestMessagesModels(GoContract):
    model, upstream_model = "opencode-go/minimax-m2.7", "minimax-m2.7"
    fake_class = FakeAnthropic

    def base_url(self, fake: Any) -> str:
        return f"{fake.url}/v1"  # Go's base ends in /v1; its Anthropic-style endpoint is {base}/messages

    def check_upstream(self, request: Any, *, stream: bool) -> None:
        assert request.path == "/v1/messages"
        assert request.headers["authorization"] == f"Bearer {self.key}"
        assert request.headers["x-api-key"] == self.key
        assert request.headers["anthropic-version"]
        assert request.headers["x-opencode-session"].startswith("scillm-")
        assert request.body["model"] == self.upstream_model
        assert request.body["max_tokens"] == DEFAULT_MAX_TOKENS

    def check_image(self, request: Any) -> None:
        image = request.body["messages"][0]["content"][1]
        assert image["source"] == {"type": "base64", "media_type": "image/png", "data": TINY_PNG_B64}


def test_one_conversation_keeps_one_session_id(tmp_path):
    with FakeOpenAI() as fake:
        env = {"OPENCODE_GO_API_KEY": "k", "OPENCODE_GO_API_BASE": fake.base_url}
        with ServerThread(make_app(env=env, data_dir=tmp_path, only=ISOLATED)) as s:
            turn = {"model": "opencode-go/glm-5.1", "messages": [{"role": "user", "content": "plan the refactor"}]}
            httpx.post(s.url + "/v1/chat/completions", json=turn, headers=AUTH)
            later = {**turn, "messages": [*turn["messages"], {"role": "assistant", "content": "ok"},
                                          {"role": "user", "content": "next step"}]}
            httpx.post(s.url + "/v1/chat/completions", json=later, headers=AUTH)
            pinned = {**turn, "scillm_metadata": {"session_id": "my-session"}}
            httpx.post(s.url + "/v1/chat/completions", json=pinned, headers=AUTH)
    sessions = [r.headers["x-opencode-session"] for r in fake.requests]
    assert sessions[0] == sessions[1] and sessions[2] == "my-session"


def test_models_listing_names_each_endpoint(tmp_path):
    class Listing(FakeOpenAI):
        def routes(self):  # GET /v1/models answers the Go catalogue
            from starlette.responses import JSONResponse
            from starlette.routing import Route

            async def models(request):
                self.requests.append(request.headers.get("authorization"))
                return JSONResponse({"object": "list", "data": [{"id": "glm-5.1"}, {"id": "minimax-m2.7"},
                                                                {"id": "qwen3.6-plus"}]})
            return [Route("/v1/models", models)]

    with Listing() as fake:
        env = {"OPENCODE_GO_API_KEY": "sk-go-secret-123456789", "OPENCODE_GO_API_BASE": fake.base_url}
        config = {"opencode_go": {"messages_models": ["minimax-*"]}}
        app = make_app(env=env, config=config, data_dir=tmp_path, only=ISOLATED)
        with ServerThread(app) as server:
            first = httpx.get(server.url + "/v1/scillm/opencode-go/models", headers=AUTH).json()
            cached = httpx.get(server.url + "/v1/scillm/opencode-go/models", headers=AUTH).json()
            refreshed = httpx.get(server.url + "/v1/scillm/opencode-go/models?refresh=true", headers=AUTH)
    assert first["source"] == "upstream" and first["model_count"] == 3
    types = {m["id"]: m["endpoint_type"] for m in first["models"]}
    assert types == {"glm-5.1": "chat", "minimax-m2.7": "messages", "qwen3.6-plus": "chat"}
    assert cached == first and len(fake.requests) == 2  # cached once, refreshed once
    assert "sk-go-secret" not in refreshed.text
    assert fake.requests[0] == "Bearer sk-go-secret-123456789"


def test_models_listing_without_a_key_is_the_static_catalogue(tmp_path):
    with ServerThread(make_app(data_dir=tmp_path, only=ISOLATED)) as server:
        listing = httpx.get(server.url + "/v1/scillm/opencode-go/models", headers=AUTH).json()
    assert listing["source"] == "static" and listing["key_configured"] is False
    assert {"minimax-m2.7", "kimi-k2.6"} <= {m["id"] for m in listing["models"]}
