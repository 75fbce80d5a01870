"""The Claude login: refresh before expiry (once, also under 20 concurrent requests), atomic write-back, clear
errors when a human must log in again, and ``GET /v1/scillm/auth`` showing the state without any token."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from scillm_anthropic_helpers import HTTP, ISOLATED, OAuthFake, write_credentials

from scillm_core.testing import DEV_KEY, Reply, ServerThread, make_app
from scillm_core.testing.fake_anthropic import FakeAnthropic

MODEL = "claude-oauth/claude-sonnet-4-5"
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fake() -> Iterator[OAuthFake]:
    with OAuthFake() as server:
        yield server  # type: ignore[misc]


def serve(fake: FakeAnthropic, creds: Path, tmp_path: Path, **extra: str) -> ServerThread:
    env = {"ANTHROPIC_API_BASE": fake.url, "SCILLM_CLAUDE_CREDENTIALS": str(creds),
           "SCILLM_CLAUDE_TOKEN_URL": f"{fake.url}/v1/oauth/token", **extra}
    app = make_app(env=env, data_dir=tmp_path / "data", only=ISOLATED)
    server = ServerThread(app).start()
    server.app = app  # type: ignore[attr-defined]  # for tests that read the runtime
    return server


def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)


def auth_state(server: ServerThread) -> tuple[dict[str, Any], str]:
    response = HTTP.get(server.url + "/v1/scillm/auth", headers={"authorization": f"Bearer {DEV_KEY}"})
    assert response.status_code == 200
    return response.json()["logins"]["claude-oauth"], response.text


def test_expired_token_is_refreshed_once_under_20_concurrent_requests(fake: OAuthFake, tmp_path: Path) -> None:
    entry = fake.issue_login(expired=True)
    creds = write_credentials(tmp_path / "claude" / ".credentials.json", entry, mcpOAuth={"keep": "me"})
    inode = creds.stat().st_ino
    fake.token_delay_s = 0.3  # keep the refresh in flight while the other requests arrive
    server = serve(fake, creds, tmp_path)
    try:
        state, _ = auth_state(server)
        assert state["status"] == "expired" and state["expires_in_s"] < 0
        sdk = client(server)

        def ask(i: int) -> str:
            answer = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}])
            return answer.choices[0].message.content or ""

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(ask, range(20)))
        assert answers == ["Hello from the fake."] * 20
        assert len(fake.token_requests) == 1  # single flight
        recorded = orjson.loads((FIXTURES / "oauth_claude_code.json").read_bytes())["refresh_request"]["body"]
        assert fake.token_requests[0] == {**recorded, "refresh_token": entry["refreshToken"]}  # no scope
        saved = orjson.loads(creds.read_bytes())
        new = saved["claudeAiOauth"]
        assert new["accessToken"] != entry["accessToken"] and new["accessToken"] in fake.access_tokens
        assert new["refreshToken"] != entry["refreshToken"] and new["refreshToken"] in fake.refresh_tokens
        assert new["expiresAt"] > time.time() * 1000 + 7 * 3600 * 1000
        assert new["subscriptionType"] == "max" and saved["mcpOAuth"] == {"keep": "me"}  # nothing else lost
        assert creds.stat().st_ino != inode  # replaced by rename, not rewritten in place
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
        assert os.listdir(creds.parent) == [".credentials.json"]  # no temp file left behind
        used = {r.headers["authorization"] for r in fake.requests if r.path == "/v1/messages"}
        assert used == {f"Bearer {new['accessToken']}"}
        state, text = auth_state(server)
        assert state["status"] == "valid" and state["expires_in_s"] > 7 * 3600
        assert state["source"] == str(creds)
        assert new["accessToken"] not in text and new["refreshToken"] not in text and "sk-ant-o" not in text
    finally:
        server.stop()


def test_valid_token_is_used_without_refresh(fake: OAuthFake, tmp_path: Path) -> None:
    entry = fake.issue_login()
    creds = write_credentials(tmp_path / ".credentials.json", entry)
    server = serve(fake, creds, tmp_path)
    try:
        chunks = list(client(server).chat.completions.create(model=MODEL, stream=True,
                                                             messages=[{"role": "user", "content": "hi"}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the fake."
        assert fake.token_requests == []
        assert fake.last.headers["authorization"] == f"Bearer {entry['accessToken']}"
        recorded = orjson.loads((FIXTURES / "oauth_claude_code.json").read_bytes())
        for name, value in recorded["messages_request_headers"].items():  # what Claude Code sends
            if name.lower() not in ("authorization", "user-agent"):
                assert fake.last.headers[name.lower()] == value, name
        assert fake.last.body["system"][0] == recorded["required_system_first_block"]
        assert fake.last.query == recorded["messages_url"].split("?")[1]
    finally:
        server.stop()


def test_refresh_refused_is_a_401_naming_the_fix(fake: OAuthFake, tmp_path: Path) -> None:
    entry = fake.issue_login(expired=True)
    creds = write_credentials(tmp_path / ".credentials.json", entry)
    fake.refresh_failure = Reply.fail(400, "Refresh token not found or invalid")
    server = serve(fake, creds, tmp_path)
    try:
        with pytest.raises(openai.AuthenticationError) as caught:
            client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        message = caught.value.message
        assert "claude-oauth" in message and "/login" in message and "ANTHROPIC_API_KEY" in message
        assert caught.value.body["code"] == "claude_login_required"
        text = caught.value.response.text
        assert entry["accessToken"] not in text and entry["refreshToken"] not in text
        assert not [r for r in fake.requests if r.path == "/v1/messages"]  # never sent a stale token
        state, text = auth_state(server)
        assert state["status"] == "needs_login" and "/login" in state["fix"]
        assert entry["refreshToken"] not in text
        assert orjson.loads(creds.read_bytes())["claudeAiOauth"] == entry  # the file is left alone
    finally:
        server.stop()


def test_missing_refresh_token_needs_a_human(fake: OAuthFake, tmp_path: Path) -> None:
    creds = write_credentials(tmp_path / ".credentials.json", fake.issue_login(expired=True, refresh=False))
    server = serve(fake, creds, tmp_path)
    try:
        state, _ = auth_state(server)
        assert state["status"] == "needs_login"
        response = HTTP.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {DEV_KEY}"},
                              json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 401
        assert "no refresh token" in response.json()["error"]["message"]
        assert fake.token_requests == []
    finally:
        server.stop()


def test_token_endpoint_down_is_a_503(fake: OAuthFake, tmp_path: Path) -> None:
    creds = write_credentials(tmp_path / ".credentials.json", fake.issue_login(expired=True))
    fake.refresh_failure = Reply.fail(503, "unavailable")
    server = serve(fake, creds, tmp_path)
    try:
        response = HTTP.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {DEV_KEY}"},
                              json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 503 and "retry later" in response.json()["error"]["message"]
    finally:
        server.stop()


def test_upstream_401_forces_a_refresh_on_the_next_call(fake: OAuthFake, tmp_path: Path) -> None:
    entry = fake.issue_login(valid_access=False)  # not expired by the clock, but revoked upstream
    creds = write_credentials(tmp_path / ".credentials.json", entry)
    server = serve(fake, creds, tmp_path)
    try:
        sdk = client(server)
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert entry["accessToken"] not in caught.value.response.text
        answer = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "again"}])
        assert answer.choices[0].message.content == "Hello from the fake."
        assert len(fake.token_requests) == 1
    finally:
        server.stop()


def test_auth_endpoint_states(tmp_path: Path) -> None:
    server = ServerThread(make_app(env={"SCILLM_CLAUDE_CREDENTIALS": str(tmp_path / "none.json")},
                                   data_dir=tmp_path / "data", only=ISOLATED)).start()
    try:
        state, _ = auth_state(server)
        assert state == {"status": "not_configured", "source": str(tmp_path / "none.json"), "expires_in_s": None}
    finally:
        server.stop()


def test_api_key_wins_over_login_for_bare_claude_names(tmp_path: Path) -> None:
    with FakeAnthropic() as either:  # accepts both auth forms
        creds = write_credentials(tmp_path / ".credentials.json", either.issue_login())
        both = serve(either, creds, tmp_path, ANTHROPIC_API_KEY="sk-ant-api03-key")
        only_login = serve(either, creds, tmp_path)
        try:
            raw = client(both).chat.completions.with_raw_response.create(
                model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}])
            assert raw.headers["x-scillm-provider"] == "anthropic"
            assert either.last.headers["x-api-key"] == "sk-ant-api03-key"
            raw = client(only_login).chat.completions.with_raw_response.create(
                model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}])
            assert raw.headers["x-scillm-provider"] == "claude-oauth"
            assert either.last.headers["authorization"].startswith("Bearer sk-ant-oat01-")
        finally:
            both.stop()
            only_login.stop()


def test_doctor_and_ops_output_hold_no_secrets(fake: FakeAnthropic, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    entry = fake.issue_login(expired=True)
    creds = write_credentials(tmp_path / ".credentials.json", entry)
    fake.refresh_failure = Reply.fail(401, "invalid_grant")
    server = serve(fake, creds, tmp_path, ANTHROPIC_API_KEY="sk-ant-api03-doctor-secret")
    try:
        HTTP.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {DEV_KEY}"},
                  json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        runtime = server.app.runtime  # type: ignore[attr-defined]
        checks = runtime.hooks.doctor(runtime)
        providers = HTTP.get(server.url + "/v1/scillm/providers", headers={"authorization": f"Bearer {DEV_KEY}"})
        assert providers.status_code == 200
        outputs = [providers.text, str(checks), caplog.text, auth_state(server)[1]]
        for secret in (entry["accessToken"], entry["refreshToken"], "sk-ant-api03-doctor-secret"):
            assert all(secret not in out for out in outputs)
        claude = next(c for c in checks if c["check"] == "claude login")
        assert claude["ok"] is False and "/login" in claude["detail"]
    finally:
        server.stop()
