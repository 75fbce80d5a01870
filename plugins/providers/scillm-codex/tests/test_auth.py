"""The ChatGPT login: refresh before expiry (single-flight, written back atomically, rotated), reactive refresh on
401, clear errors naming the fix, and an auth status that never shows a token."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from scillm_core.testing import DEV_KEY
from scillm_core.testing.fake_codex import FakeCodex

from .conftest import openai_client, write_auth

HEADERS = {"authorization": f"Bearer {DEV_KEY}"}


def _tokens(env: dict[str, str]) -> dict[str, Any]:
    return orjson.loads(Path(env["SCILLM_CODEX_AUTH"]).read_bytes())  # type: ignore[no-any-return]


def test_expired_token_is_refreshed_once_under_20_concurrent_requests(codex: FakeCodex, codex_env: Any,
                                                                       serve: Any) -> None:
    codex.refresh_delay_s = 0.3  # keep the refresh in flight while all 20 requests arrive
    old = codex.login(expires_in=-60)  # already expired: the fake refuses it
    env = codex_env(old)
    server = serve(env)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=HEADERS, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json={
                "model": "codex/gpt-5-codex", "messages": [{"role": "user", "content": f"hi {i}"}]})
                for i in range(20)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 20, responses[0].text
    assert codex.refresh_count == 1
    assert codex.refresh_requests[0] == {"client_id": "app_EMoamEEZ73f0CkXaXp7hrann", "grant_type": "refresh_token",
                                         "refresh_token": old["refresh_token"]}
    saved = _tokens(env)
    new = saved["tokens"]
    assert new["access_token"] != old["access_token"] and new["refresh_token"] != old["refresh_token"]
    assert new["access_token"] in codex.access_tokens and new["refresh_token"] in codex.refresh_tokens
    assert saved["auth_mode"] == "chatgpt" and "OPENAI_API_KEY" in saved  # other keys kept
    assert saved["last_refresh"] != "2026-01-01T00:00:00Z"
    assert stat.S_IMODE(Path(env["SCILLM_CODEX_AUTH"]).stat().st_mode) == 0o600
    assert {r.headers["authorization"] for r in codex.requests} == {f"Bearer {new['access_token']}"}
    assert not list(Path(env["SCILLM_CODEX_AUTH"]).parent.glob("*.tmp"))  # no temp files left behind


def test_two_workers_sharing_the_login_refresh_once(codex: FakeCodex, codex_env: Any, serve: Any) -> None:
    """``scillm serve --workers 2``: separate processes share auth.json; a file lock keeps one refresh."""
    codex.refresh_delay_s = 0.3
    env = codex_env(codex.login(expires_in=-60))
    workers = [serve(env), serve(env)]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=HEADERS, timeout=30) as client:
            return await asyncio.gather(*(client.post(workers[i % 2].url + "/v1/chat/completions", json={
                "model": "codex/gpt-5", "messages": [{"role": "user", "content": "hi"}]}) for i in range(6)))

    assert [r.status_code for r in asyncio.run(burst())] == [200] * 6
    assert codex.refresh_count == 1


def test_token_close_to_expiry_is_refreshed_before_use(codex: FakeCodex, codex_env: Any, serve: Any) -> None:
    env = codex_env(expires_in=30)  # valid for 30 s: inside the refresh margin
    client = openai_client(serve(env))
    assert client.chat.completions.create(model="codex/gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert codex.refresh_count == 1
    assert codex.last.headers["authorization"] == f"Bearer {_tokens(env)['tokens']['access_token']}"


def test_refresh_refused_is_a_clear_error_naming_codex_login(codex: FakeCodex, codex_env: Any, serve: Any) -> None:
    import openai

    old = codex.login(expires_in=-60)
    codex.used_refresh_tokens.add(old["refresh_token"])  # the refresh token was already rotated elsewhere
    codex.refresh_tokens.pop(old["refresh_token"])
    env = codex_env(old)
    server = serve(env)
    client = openai_client(server)
    for _ in range(2):
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model="codex/gpt-5", messages=[{"role": "user", "content": "hi"}])
        message = caught.value.message
        assert "codex login" in message and "refresh_token_reused" in message and "codex (gpt-5)" in message
        for secret in (old["access_token"], old["refresh_token"]):
            assert secret not in caught.value.response.text
    assert codex.refresh_count == 1  # the second call failed fast without asking the token endpoint again
    assert codex.requests == []
    status = httpx.get(server.url + "/v1/scillm/auth", headers=HEADERS).json()["logins"]["codex"]
    assert status["status"] == "login_required"
    # a new `codex login` (the file changes) makes it work again without a restart
    write_auth(Path(env["SCILLM_CODEX_AUTH"]), codex.login())
    assert client.chat.completions.create(model="codex/gpt-5", messages=[{"role": "user", "content": "hi"}])


def test_token_endpoint_outage_is_503_not_a_login_error(codex: FakeCodex, codex_env: Any, serve: Any) -> None:
    import openai

    codex.refresh_failures.append((503, {"error": {"message": "temporarily unavailable"}}))
    client = openai_client(serve(codex_env(expires_in=-60)))
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="codex/gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 503 and "codex login" not in caught.value.message
    # the refresh token was not burnt: the next call refreshes and succeeds
    assert client.chat.completions.create(model="codex/gpt-5", messages=[{"role": "user", "content": "hi"}])


def test_revoked_token_gets_one_reactive_refresh(codex: FakeCodex, codex_env: Any, serve: Any) -> None:
    login = codex.login()
    env = codex_env(login)
    client = openai_client(serve(env))
    del codex.access_tokens[login["access_token"]]  # revoked server-side although not expired
    reply = client.chat.completions.create(model="codex/gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    assert codex.refresh_count == 1 and len(codex.requests) == 2


def test_login_refreshed_by_codex_cli_is_picked_up(codex: FakeCodex, codex_env: Any, serve: Any) -> None:
    env = codex_env()
    client = openai_client(serve(env))
    assert client.chat.completions.create(model="codex/gpt-5", messages=[{"role": "user", "content": "a"}])
    newer = codex.login()
    write_auth(Path(env["SCILLM_CODEX_AUTH"]), newer)
    assert client.chat.completions.create(model="codex/gpt-5", messages=[{"role": "user", "content": "b"}])
    assert codex.last.headers["authorization"] == f"Bearer {newer['access_token']}"
    assert codex.refresh_count == 0


def test_auth_status_never_shows_a_token(codex: FakeCodex, codex_env: Any, serve: Any) -> None:
    login = codex.login(account_id="acct-9f8e7d6c-aaaa-bbbb-cccc-ddddeeeeffff")
    env = codex_env(login)
    server = serve(env)
    response = httpx.get(server.url + "/v1/scillm/auth", headers=HEADERS)
    status = response.json()["logins"]["codex"]
    assert status["status"] == "ok" and status["source"] == env["SCILLM_CODEX_AUTH"]
    assert 3500 < status["expires_in_s"] <= 3600
    assert status["account_id"] == "acct-9f8..."
    for secret in (login["access_token"], login["refresh_token"], login["id_token"], login["account_id"]):
        assert secret not in response.text
    providers = httpx.get(server.url + "/v1/scillm/providers", headers=HEADERS).text
    assert login["access_token"] not in providers and login["refresh_token"] not in providers


def test_routing_gpt_names_go_to_codex_only_when_logged_in(codex: FakeCodex, codex_env: Any, serve: Any,
                                                           fake_openai: Any, tmp_path: Path) -> None:
    import openai

    openai_env = {"OPENAI_API_KEY": "sk-test-openai-0123456789", "OPENAI_API_BASE": fake_openai.base_url}
    logged_in = openai_client(serve({**codex_env(), **openai_env}))
    for model in ("gpt-5", "o3", "o4-mini", "codex-mini-latest"):
        raw = logged_in.chat.completions.with_raw_response.create(model=model, messages=[
            {"role": "user", "content": "hi"}])
        assert raw.headers["x-scillm-provider"] == "codex", model
    assert codex.last.body["model"] == "codex-mini-latest"
    assert fake_openai.requests == []

    logged_out = {**openai_env, "SCILLM_CODEX_AUTH": str(tmp_path / "none" / "auth.json"),
                  "CODEX_API_BASE": codex.base_url}
    client = openai_client(serve(logged_out))
    for model in ("gpt-5", "o3"):
        raw = client.chat.completions.with_raw_response.create(model=model, messages=[
            {"role": "user", "content": "hi"}])
        assert raw.headers["x-scillm-provider"] == "openai", model
    with pytest.raises(openai.BadRequestError) as caught:  # a codex name without a login says how to log in
        client.chat.completions.create(model="codex-mini-latest", messages=[{"role": "user", "content": "hi"}])
    assert "codex login" in caught.value.message
