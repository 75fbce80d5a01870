"""Auth (master key, loopback dev key) and the ops endpoints, which never show a secret."""

from __future__ import annotations

import httpx
import pytest

from scillm_core.testing import DEV_KEY, ServerThread, make_app

SECRETS = {"DEEPSEEK_API_KEY": "sk-ds-supersecret-0001", "OPENAI_API_KEY": "sk-oa-supersecret-0002",
           "CHUTES_API_KEY": "cpk_chutes_supersecret_0003"}


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory):
    with ServerThread(make_app(env=dict(SECRETS), data_dir=tmp_path_factory.mktemp("d"))) as server:
        yield server


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    env = {**SECRETS, "SCILLM_MASTER_KEY": "sk-master-xyz-987654"}
    with ServerThread(make_app(env=env, data_dir=tmp_path_factory.mktemp("d"))) as server:
        yield server


def test_health_needs_no_auth(dev_server):
    assert httpx.get(dev_server.url + "/health/liveliness").json() == {"status": "ok"}
    assert httpx.get(dev_server.url + "/health/readiness").json()["status"] == "ready"


@pytest.mark.parametrize("path", ["/v1/models", "/v1/scillm/health", "/v1/scillm/providers", "/v1/scillm/plugins",
                                  "/v1/scillm/auth", "/metrics"])
def test_everything_else_needs_the_key(dev_server, path):
    response = httpx.get(dev_server.url + path)
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(dev_server.url + path, headers={"authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(dev_server.url + path, headers={"authorization": f"Bearer {DEV_KEY}"}).status_code == 200
    assert httpx.get(dev_server.url + path, headers={"x-api-key": DEV_KEY}).status_code == 200


def test_master_key_replaces_the_dev_key(keyed_server):
    url = keyed_server.url + "/v1/models"
    assert httpx.get(url, headers={"authorization": f"Bearer {DEV_KEY}"}).status_code == 401
    assert httpx.get(url, headers={"authorization": "Bearer sk-master-xyz-987654"}).status_code == 200
    body = httpx.get(url, headers={"authorization": "Bearer sk-master-xyz-98765"}).text
    assert "sk-master" not in body  # the error never echoes a key


@pytest.mark.parametrize("path", ["/v1/scillm/health", "/v1/scillm/providers", "/v1/scillm/plugins",
                                  "/v1/scillm/auth", "/metrics", "/v1/models"])
def test_ops_endpoints_never_show_a_secret(keyed_server, path):
    text = httpx.get(keyed_server.url + path, headers={"authorization": "Bearer sk-master-xyz-987654"}).text
    for secret in [*SECRETS.values(), "sk-master-xyz-987654"]:
        assert secret not in text


def test_providers_and_plugins_describe_the_system(dev_server):
    headers = {"authorization": f"Bearer {DEV_KEY}"}
    providers = {p["name"]: p for p in httpx.get(dev_server.url + "/v1/scillm/providers", headers=headers)
                 .json()["providers"]}
    assert providers["deepseek"]["configured"] is True
    assert providers["glm"]["configured"] is False and "GLM_API_KEY" in providers["glm"]["missing"]
    plugins = {p["name"]: p for p in httpx.get(dev_server.url + "/v1/scillm/plugins", headers=headers)
               .json()["plugins"]}
    assert "scillm_register_surfaces" in plugins["chat"]["hooks"]
    health = httpx.get(dev_server.url + "/v1/scillm/health", headers=headers).json()
    assert health["middleware"]["auth"]["fails"] == "closed"
    assert "scillm_build_info" in httpx.get(dev_server.url + "/metrics", headers=headers).text


def test_dev_key_is_refused_from_a_non_loopback_peer():
    import asyncio

    from scillm_auth import AuthMiddleware

    seen = []

    async def app(scope, receive, send):
        seen.append(scope["path"])

    async def run(client):
        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "path": "/v1/models", "client": client,
                 "headers": [(b"authorization", f"Bearer {DEV_KEY}".encode())]}
        await AuthMiddleware(app, None)(scope, None, send)
        return sent

    assert asyncio.run(run(("10.1.2.3", 5555)))[0]["status"] == 403
    assert asyncio.run(run(("127.0.0.1", 5555))) == [] and seen == ["/v1/models"]
