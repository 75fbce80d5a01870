"""Both Anthropic providers pass the provider contract against the Anthropic fake, which speaks the Messages wire
format and checks auth (x-api-key + anthropic-version, or Bearer + OAuth beta + the Claude Code system block)."""

from __future__ import annotations

from typing import Any

import httpx
from scillm_anthropic import CLAUDE_CODE_SYSTEM, DEFAULT_MAX_TOKENS
from scillm_anthropic_helpers import CONTRACT_ACCESS, ApiKeyFake, OAuthFake, contract_credentials

from scillm_core.testing import DEV_KEY, ServerThread
from scillm_core.testing.contract import TINY_PNG_B64, ProviderContract


class MessagesContract(ProviderContract):
    plugin = "anthropic"

    def base_url(self, fake: Any) -> str:
        return str(fake.url)  # the SDK form: the provider appends /v1/messages

    def check_upstream(self, request: Any, *, stream: bool) -> None:
        assert request.method == "POST" and request.path == "/v1/messages"
        assert request.headers["anthropic-version"] == "2023-06-01"
        body = request.body
        assert body["model"] == self.upstream_model
        assert body["max_tokens"] == DEFAULT_MAX_TOKENS
        assert body.get("stream") is (True if stream else None)
        assert [m["role"] for m in body["messages"]] == ["user"]
        assert "stream_options" not in body and "scillm_metadata" not in body

    def check_image(self, request: Any) -> None:
        blocks = request.body["messages"][0]["content"]
        assert blocks == [{"type": "text", "text": "What is in this image?"},
                          {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                       "data": TINY_PNG_B64}}]


class TestAnthropic(MessagesContract):
    provider, model, upstream_model = "anthropic", "claude-haiku-4-5", "claude-haiku-4-5"
    key_env, base_env = "ANTHROPIC_API_KEY", "ANTHROPIC_API_BASE"
    fake_class = ApiKeyFake
    extra_env = {"SCILLM_CLAUDE_CREDENTIALS": "/nonexistent/scillm/.credentials.json"}

    def check_upstream(self, request: Any, *, stream: bool) -> None:
        super().check_upstream(request, stream=stream)
        assert request.headers["x-api-key"] == self.key
        assert "authorization" not in request.headers
        assert "system" not in request.body


class TestClaudeOAuth(MessagesContract):
    provider, model, upstream_model = "claude-oauth", "claude-oauth/claude-sonnet-4-5", "claude-sonnet-4-5"
    key_env, base_env = None, "ANTHROPIC_API_BASE"
    key = CONTRACT_ACCESS
    fake_class = OAuthFake
    extra_env = {"SCILLM_CLAUDE_CREDENTIALS": str(contract_credentials())}

    def env(self, fake: Any) -> dict[str, str]:
        return {**super().env(fake), "SCILLM_CLAUDE_TOKEN_URL": f"{fake.url}/v1/oauth/token"}

    def check_upstream(self, request: Any, *, stream: bool) -> None:
        super().check_upstream(request, stream=stream)
        assert request.query == "beta=true"
        assert request.headers["authorization"].startswith("Bearer sk-ant-oat01-")
        assert "x-api-key" not in request.headers
        assert "oauth-2025-04-20" in request.headers["anthropic-beta"].split(",")
        assert request.body["system"][0] == {"type": "text", "text": CLAUDE_CODE_SYSTEM}

    def test_unconfigured_provider_names_the_variable(self, fake: Any, tmp_path: Any) -> None:
        env = {self.base_env: self.base_url(fake)}  # no HOME, no SCILLM_CLAUDE_CREDENTIALS: no login
        with ServerThread(self.app(env, tmp_path)) as server:
            response = httpx.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {DEV_KEY}"},
                                  json={"model": self.model, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 400
        message = response.json()["error"]["message"]
        assert "SCILLM_CLAUDE_CREDENTIALS" in message and "/login" in message
