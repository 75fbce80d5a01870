"""POST /v1/embeddings through the whole middleware stack, with the official ``openai`` SDK as the client.

The per-family wire (OpenAI-compatible, Gemini, Ollama) is checked by each provider's contract tests; here: the
fake's fidelity, the pipeline around the call (groups and fallback, retries, limits, cache, metrics and the call
log), and hostile input.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, fake_vector, make_app
from scillm_core.testing.fake_gemini import FakeGemini

AUTH = {"authorization": f"Bearer {DEV_KEY}"}
SECRET = "sk-embeddings-secret-0123456789abcdef"


def test_fake_openai_speaks_the_embeddings_wire_the_sdk_reads() -> None:
    with FakeOpenAI() as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="k", max_retries=0)
        single = client.embeddings.create(model="text-embedding-3-small", input="hello world")
        assert fake.last.body["encoding_format"] == "base64"  # the SDK's default, decoded by the SDK
        assert single.data[0].embedding == fake_vector("hello world")
        assert single.usage.prompt_tokens == 2
        several = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"], dimensions=3,
                                           encoding_format="float")
        assert [d.embedding for d in several.data] == [fake_vector("a", 3), fake_vector("b", 3)]
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="text-embedding-3-small", input="")


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeOpenAI, FakeGemini]]:
    with FakeOpenAI() as oai, FakeGemini() as gemini:
        yield oai, gemini  # type: ignore[misc]


@pytest.fixture(scope="module")
def server(upstreams: tuple[FakeOpenAI, FakeGemini], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Every bundled plugin: cache on, retries without backoff, a one-at-a-time limit on OpenAI."""
    oai, gemini = upstreams
    env = {"OPENAI_API_KEY": SECRET, "OPENAI_API_BASE": oai.base_url, "GEMINI_API_KEY": "AIza-test-key-0123456789",
           "GEMINI_API_BASE": gemini.url, "DEEPSEEK_API_KEY": "k", "DEEPSEEK_API_BASE": oai.base_url}
    config = {"groups": {"embedders": {"models": ["openai/text-embedding-3-small", "gemini/gemini-embedding-001"]}},
              "cache": {"enabled": True},
              "resilience": {"backoff_base_s": 0.0, "breaker": False,
                             "limits": {"openai": {"max_concurrency": 1, "max_queue": 64}}}}
    with ServerThread(make_app(env=env, config=config, data_dir=tmp_path_factory.mktemp("emb"))) as server:
        yield server


@pytest.fixture
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=30)


def post(server: Any, body: Any, **headers: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/embeddings", json=body, headers={**AUTH, **headers}, timeout=30)


def test_group_fails_over_to_another_family(server: Any, client: openai.OpenAI,
                                            upstreams: tuple[FakeOpenAI, FakeGemini]) -> None:
    oai, gemini = upstreams
    oai.script(*[Reply.fail(503, "overloaded")] * 3)  # the first attempt and both retries
    sent_oai, sent_gemini = len(oai.requests), len(gemini.requests)
    raw = client.embeddings.with_raw_response.create(model="embedders", input=["alpha", "beta"],
                                                     extra_body={"cache": False})
    result = raw.parse()
    assert [d.embedding for d in result.data] == [fake_vector("alpha"), fake_vector("beta")]
    assert raw.headers["x-scillm-provider"] == "gemini" and raw.headers["x-scillm-attempts"] == "4"
    assert len(oai.requests) - sent_oai == 3 and len(gemini.requests) - sent_gemini == 1
    assert gemini.last.body["requests"][0]["content"] == {"parts": [{"text": "alpha"}]}


def test_a_transient_failure_is_retried(client: openai.OpenAI, upstreams: tuple[FakeOpenAI, FakeGemini]) -> None:
    oai, _ = upstreams
    oai.script(Reply.fail(500, "try again"))
    sent = len(oai.requests)
    result = client.embeddings.create(model="text-embedding-3-small", input="retry me", extra_body={"cache": False})
    assert result.data[0].embedding == fake_vector("retry me")
    assert len(oai.requests) - sent == 2


def test_the_provider_limit_holds_for_embeddings(server: Any, upstreams: tuple[FakeOpenAI, FakeGemini]) -> None:
    oai, _ = upstreams
    oai.max_in_flight = 0
    oai.script(*[Reply(delay_s=0.3)] * 6)  # long enough that six callers would overlap without the limit
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: post(server, {"model": "text-embedding-3-small", "input": f"text {i}",
                                                        "cache": False}), range(6)))
    assert [a.status_code for a in answers] == [200] * 6
    assert oai.max_in_flight == 1  # [resilience.limits.openai] max_concurrency = 1


def test_cache_serves_a_repeat_without_the_upstream(server: Any, upstreams: tuple[FakeOpenAI, FakeGemini]) -> None:
    oai, _ = upstreams
    body = {"model": "text-embedding-3-small", "input": ["cache me", "and me"], "encoding_format": "float"}
    sent = len(oai.requests)
    first, second = post(server, body), post(server, body)
    assert first.headers["x-scillm-cache"] == "miss" and second.headers["x-scillm-cache"] == "hit"
    assert first.json()["data"] == second.json()["data"]
    assert second.headers["x-scillm-provider"] == "openai"
    assert len(oai.requests) - sent == 1
    other = post(server, {**body, "dimensions": 4})  # another request, another key
    assert other.headers["x-scillm-cache"] == "miss" and len(other.json()["data"][0]["embedding"]) == 4


def test_metrics_and_the_call_log_see_embeddings(server: Any) -> None:
    answer = post(server, {"model": "text-embedding-3-small", "input": "count my tokens please",
                           "scillm_metadata": {"job": "metrics-check"}, "cache": False},
                  **{"x-caller-skill": "embed-test"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["scillm_metadata"] == {"job": "metrics-check"}
    assert answer.json()["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    metrics = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert ('scillm_upstream_tokens_total{caller="embed-test",kind="prompt",model="text-embedding-3-small",'
            'provider="openai"} 4.0') in metrics
    assert 'scillm_requests_total{caller="embed-test",code="ok",model="text-embedding-3-small",status="2xx"} 1.0' \
        in metrics
    calls = httpx.get(server.url + "/v1/scillm/calls", params={"limit": "20"}, headers=AUTH).json()["data"]
    record = next(c for c in calls if (c.get("scillm_metadata") or {}).get("job") == "metrics-check")
    assert record["provider"] == "openai" and record["status"] == 200 and record["tokens"]["prompt"] == 4
    assert record["caller"] == "embed-test" and record["stream"] is False


def test_scillm_fields_never_go_upstream(server: Any, upstreams: tuple[FakeOpenAI, FakeGemini]) -> None:
    oai, _ = upstreams
    answer = post(server, {"model": "text-embedding-3-small", "input": "x", "user": "u-1", "timeout": 20,
                           "scillm_metadata": {"a": 1}, "cache": False})
    assert answer.status_code == 200
    assert oai.last.body == {"model": "text-embedding-3-small", "input": "x", "user": "u-1"}
    assert oai.last.headers["authorization"] == f"Bearer {SECRET}"


@pytest.mark.parametrize(("body", "status", "where"), [
    ({"model": "text-embedding-3-small", "input": ""}, 400, "$.input"),
    ({"model": "text-embedding-3-small", "input": []}, 400, "$.input"),
    ({"model": "text-embedding-3-small", "input": ["ok", 7]}, 400, "$.input"),
    ({"model": "text-embedding-3-small"}, 400, "$.input"),
    ({"input": "x"}, 400, "$.model"),
    ({"model": "text-embedding-3-small", "input": "x", "encoding_format": "b64"}, 400, "$.encoding_format"),
    ({"model": "text-embedding-3-small", "input": "x", "dimensions": "4"}, 400, "$.dimensions"),
    ({"model": "text-embedding-3-small", "input": "x", "json_schema": {}}, 400, "$.json_schema"),
    ({"model": "text-embedding-3-small", "input": "x", "stream": True}, 400, "$.stream"),
    ({"model": "text-embedding-3-small", "input": "x", "timeout": -1}, 400, "$.timeout"),
    ({"model": "gemini-embedding-001", "input": [1, 2, 3]}, 400, "$.input"),
    ({"model": "gemini-embedding-001", "input": [[1, 2, 3]]}, 400, "$.input[0]"),
    ({"model": "gemini-embedding-001", "input": ["text", [1, 2]]}, 400, "$.input[1]"),
    ({"model": "deepseek/deepseek-chat", "input": "x"}, 400, "model"),
    ({"model": "no-such-embedder", "input": "x"}, 404, "model"),
    ([1, 2], 400, "$"),
])
def test_bad_input_is_a_4xx_naming_where(server: Any, upstreams: tuple[FakeOpenAI, FakeGemini], body: Any,
                                         status: int, where: str) -> None:
    oai, gemini = upstreams
    sent = len(oai.requests) + len(gemini.requests)
    answer = post(server, body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == where and (where in error["message"] or where in ("model", "$"))
    assert len(oai.requests) + len(gemini.requests) == sent  # refused before any upstream call


def test_oversized_body_is_413(server: Any) -> None:
    big = "x" * (65 * 1024 * 1024)
    answer = httpx.post(server.url + "/v1/embeddings", content=b'{"model": "m", "input": "' + big.encode() + b'"}',
                        headers={**AUTH, "content-type": "application/json"}, timeout=60)
    assert answer.status_code == 413


def test_upstream_auth_failure_never_leaks_the_key(client: openai.OpenAI,
                                                   upstreams: tuple[FakeOpenAI, FakeGemini]) -> None:
    oai, _ = upstreams
    oai.script(Reply.fail(401, f"Incorrect API key provided: {SECRET}", code="invalid_api_key"))
    with pytest.raises(openai.AuthenticationError) as caught:
        client.embeddings.create(model="text-embedding-3-small", input="x", extra_body={"cache": False})
    assert SECRET not in caught.value.response.text and "openai" in caught.value.message
