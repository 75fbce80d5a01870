"""The codex provider passes the provider contract (chat completions through the official openai client) against
the Codex-backend fake."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import orjson
import pytest

from scillm_core.testing import DEV_KEY, RecordedRequest, Reply, ServerThread
from scillm_core.testing.contract import TINY_PNG_URL, ProviderContract
from scillm_core.testing.fake_codex import FakeCodex

AUTH_DIR = Path(tempfile.mkdtemp(prefix="scillm-codex-contract-"))


class TestCodex(ProviderContract):
    plugin, provider, model, upstream_model = "codex", "codex", "codex/gpt-5-codex", "gpt-5-codex"
    key_env, base_env = None, "CODEX_API_BASE"
    fake_class = FakeCodex
    extra_env: ClassVar[dict[str, str]] = {"SCILLM_CODEX_AUTH": str(AUTH_DIR / "auth.json")}
    login: ClassVar[dict[str, str]] = {}

    @pytest.fixture(scope="class")
    @classmethod
    def fake(cls) -> Iterator[Any]:
        with FakeCodex() as fake:
            cls.login = fake.login()
            cls.key = cls.login["access_token"]
            (AUTH_DIR / "auth.json").write_bytes(orjson.dumps(FakeCodex.auth_json(cls.login)))
            yield fake

    def env(self, fake: Any) -> dict[str, str]:
        return {**super().env(fake), "SCILLM_CODEX_TOKEN_URL": fake.token_url}

    def check_upstream(self, request: RecordedRequest, *, stream: bool) -> None:
        current = orjson.loads((AUTH_DIR / "auth.json").read_bytes())["tokens"]
        assert request.path == "/backend-api/codex/responses"
        assert request.headers["authorization"] == f"Bearer {current['access_token']}"
        assert request.headers["chatgpt-account-id"] == self.login["account_id"]
        body = request.body
        assert body["model"] == self.upstream_model
        assert body["store"] is False and body["stream"] is True  # always, even for non-streaming clients
        assert body["instructions"].strip()
        assert not {"temperature", "top_p", "max_output_tokens", "max_tokens"} & set(body)
        assert body["input"][0]["type"] == "message" and body["input"][0]["role"] == "user"

    def check_image(self, request: RecordedRequest) -> None:
        parts = request.body["input"][-1]["content"]
        assert {"type": "input_image", "image_url": TINY_PNG_URL, "detail": "auto"} in parts
        assert parts[0] == {"type": "input_text", "text": "What is in this image?"}

    def test_upstream_auth_failure_never_leaks_the_key(self, client: Any, fake: Any) -> None:
        """A 401 refreshes the login once and retries; a second 401 is a clear error naming `codex login`."""
        import openai

        refreshes = fake.refresh_count
        token = orjson.loads((AUTH_DIR / "auth.json").read_bytes())["tokens"]["access_token"]
        refused = Reply.fail(401, f"Invalid token: {token}", code="invalid_api_key")
        fake.script(refused, refused)
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": "hi"}])
        assert token not in caught.value.response.text
        assert "codex" in caught.value.message and "codex login" in caught.value.message
        assert fake.refresh_count == refreshes + 1
        rotated = orjson.loads((AUTH_DIR / "auth.json").read_bytes())["tokens"]
        assert rotated["access_token"] != token  # the refreshed login was written back and is used from now on
        assert fake.last.headers["authorization"] == f"Bearer {rotated['access_token']}"

    def test_unconfigured_provider_names_the_variable(self, fake: Any, tmp_path: Any) -> None:
        env = {**self.env(fake), "SCILLM_CODEX_AUTH": str(tmp_path / "nowhere" / "auth.json")}
        with ServerThread(self.app(env, tmp_path)) as server:
            response = httpx.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {DEV_KEY}"},
                                  json={"model": self.model, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 400
        message = response.json()["error"]["message"]
        assert "codex login" in message and "SCILLM_CODEX_AUTH" in message

    def test_unreachable_upstream_is_502(self, tmp_path: Any) -> None:
        with FakeCodex() as other:
            auth = tmp_path / "auth.json"
            auth.write_bytes(orjson.dumps(FakeCodex.auth_json(other.login())))
        env = {"SCILLM_CODEX_AUTH": str(auth), self.base_env: "http://127.0.0.1:9/backend-api/codex"}
        with ServerThread(self.app(env, tmp_path)) as server:
            response = httpx.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {DEV_KEY}"},
                                  json={"model": self.model, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "connection_error"
