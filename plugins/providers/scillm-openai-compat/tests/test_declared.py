"""Servers of your own (vLLM, SGLang, llama.cpp, LM Studio, a company proxy) declared in ``[providers.NAME]`` with
``kind = "openai-compatible"``: they pass the provider contract (chat, streaming, tools, embeddings, errors), route
by their prefix and model list ahead of the built-in name rules, and carry their own limits."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from typing import Any, ClassVar

import httpx
import openai
import pytest

from scillm_core.testing import DEV_KEY, FakeOpenAI, RecordedRequest, Reply, ServerThread, fake_vector, make_app
from scillm_core.testing.contract import ProviderContract

AUTH = {"authorization": f"Bearer {DEV_KEY}"}
BASE = "DECLARED_TEST_BASE"  # not a scillm variable: these tests' app() moves it into the table's base_url


class DeclaredContract(ProviderContract):
    plugin = "openai-compat"
    provider = "local-vllm"
    base_env = BASE
    table: ClassVar[dict[str, Any]] = {}

    def app(self, env: dict[str, str], data_dir: Any) -> Any:
        table = {"kind": "openai-compatible", "base_url": env.get(BASE, "http://127.0.0.1:9/v1"), **self.table}
        return make_app(env=env, data_dir=data_dir, config={"providers": {self.provider: table}},
                        only=(*self.SURFACES, self.plugin))


class TestDeclaredWithKey(DeclaredContract):
    """A company proxy: a key variable of its own, reached by its prefix."""

    model, upstream_model = "local-vllm/Qwen/Qwen3-8B", "Qwen/Qwen3-8B"
    embeddings_model, embeddings_upstream_model = "local-vllm/BAAI/bge-m3", "BAAI/bge-m3"
    key_env = "LOCAL_VLLM_KEY"
    table: ClassVar[dict[str, Any]] = {"key_env": "LOCAL_VLLM_KEY"}


class TestDeclaredWithoutKey(DeclaredContract):
    """A local vLLM: no key, bare names from its model list (which beat Chutes' Org/Model rule)."""

    model = upstream_model = "Qwen/Qwen3-8B"
    embeddings_model = embeddings_upstream_model = "BAAI/bge-m3"
    key_env = None
    table: ClassVar[dict[str, Any]] = {"models": ["Qwen/Qwen3-8B", "BAAI/bge-m3"]}

    def check_upstream(self, request: RecordedRequest, *, stream: bool) -> None:
        assert "authorization" not in request.headers  # nothing to send, and never "Bearer None"
        assert request.body["model"] == self.upstream_model

    def check_embeddings_upstream(self, request: RecordedRequest, texts: list[str]) -> None:
        assert "authorization" not in request.headers
        assert request.path == "/v1/embeddings" and request.body["model"] == self.embeddings_upstream_model
        assert request.body["input"] in (texts, texts[0])


# -- routing, limits and inventory with every plugin loaded -------------------------------------------------------

@pytest.fixture(scope="module")
def vllm() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture(scope="module")
def server(vllm: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    config = {"providers": {
        "vllm": {"kind": "openai-compatible", "base_url": vllm.base_url, "models": ["Qwen/Qwen3-8B"],
                 "max_concurrency": 2, "max_queue": 100, "timeout_s": 60},
        "lmstudio": {"kind": "openai-compatible", "base_url": "http://127.0.0.1:9/v1", "prefix": "lms",
                     "embeddings": False}}}
    env = {"CHUTES_API_KEY": "chutes-key", "CHUTES_API_BASE": "http://127.0.0.1:9/v1"}
    with ServerThread(make_app(env=env, config=config, data_dir=tmp_path_factory.mktemp("declared"))) as server:
        yield server


def test_its_model_list_beats_the_built_in_name_rules(server: ServerThread, vllm: FakeOpenAI) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0)
    vllm.script(Reply.say("served locally"))
    raw = client.chat.completions.with_raw_response.create(
        model="Qwen/Qwen3-8B", messages=[{"role": "user", "content": "hi"}])  # Org/Model: Chutes' rule otherwise
    assert raw.parse().choices[0].message.content == "served locally"
    assert raw.headers["x-scillm-provider"] == "vllm" and vllm.last.body["model"] == "Qwen/Qwen3-8B"
    embedded = client.embeddings.create(model="vllm/intfloat/e5-small", input=["a", "b"])
    assert [d.embedding for d in embedded.data] == [fake_vector("a"), fake_vector("b")]
    assert vllm.last.body["model"] == "intfloat/e5-small"


def test_a_provider_without_embeddings_refuses_them(server: ServerThread) -> None:
    answer = httpx.post(server.url + "/v1/embeddings", headers=AUTH, json={"model": "lms/nomic", "input": "x"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "embeddings_not_supported"


def test_its_limits_hold(server: ServerThread, vllm: FakeOpenAI) -> None:
    vllm.max_in_flight = 0
    vllm.script(*[Reply.say("ok", delay_s=0.3)] * 6)  # long enough that six callers would overlap without it

    def call(i: int) -> int:
        return httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=30, json={
            "model": "Qwen/Qwen3-8B", "messages": [{"role": "user", "content": f"q{i}"}]}).status_code

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        assert list(pool.map(call, range(6))) == [200] * 6
    assert 1 <= vllm.max_in_flight <= 2  # max_concurrency = 2 in [providers.vllm]
    health = httpx.get(server.url + "/v1/scillm/health", headers=AUTH).json()
    limit = health["middleware"]["resilience"]["concurrency"]["providers"]["vllm"]
    assert limit["limit"] == 2 and limit["max_queue"] == 100


def test_it_is_listed_without_secrets(server: ServerThread) -> None:
    rows = {p["name"]: p for p in httpx.get(server.url + "/v1/scillm/providers", headers=AUTH).json()["providers"]}
    assert rows["vllm"]["declared"] is True and rows["vllm"]["configured"] is True
    assert rows["vllm"]["prefixes"] == ["vllm/"] and rows["vllm"]["key_env"] == []
    assert "embeddings" in rows["vllm"]["capabilities"] and "embeddings" not in rows["lmstudio"]["capabilities"]
    assert rows["lmstudio"]["prefixes"] == ["lms/"]
    models = {m["id"]: m for m in httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"]}
    assert models["Qwen/Qwen3-8B"]["owned_by"] == "vllm"
