"""scillm is the one retry layer: once it retried (or failed over) for a call, its failure says
``x-should-retry: false``, so the official openai and anthropic SDKs (which retry a 5xx twice by default) do not run
scillm's whole retry sequence again; after a single attempt they retry as before. Counted at the fake upstream."""

from __future__ import annotations

from collections.abc import Callable

import anthropic
import httpx
import openai
import pytest
from resilience_helpers import GROUP, HI

from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread

UNAVAILABLE = Reply.fail(503, "overloaded, try again", headers={"retry-after": "0"})
#: no circuit opens during these tests: every failure is the upstream's
STEADY = {"breaker_threshold": 100}


def chat(server: ServerThread, model: str) -> None:
    openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, timeout=20).chat.completions.create(
        model=model, messages=HI)  # type: ignore[arg-type]


def chat_stream(server: ServerThread, model: str) -> None:
    stream = openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, timeout=20).chat.completions.create(
        model=model, messages=HI, stream=True)  # type: ignore[arg-type]
    list(stream)


def messages(server: ServerThread, model: str) -> None:
    anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, timeout=20).messages.create(
        model=model, max_tokens=16, messages=[{"role": "user", "content": "hi"}])


def responses(server: ServerThread, model: str) -> None:
    openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, timeout=20).responses.create(model=model, input="hi")


def embeddings(server: ServerThread, model: str) -> None:
    openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, timeout=20).embeddings.create(model=model, input="hi")


DIALECTS = {"chat": chat, "chat stream": chat_stream, "messages": messages, "responses": responses,
            "embeddings": embeddings}
SDK_ERRORS = (openai.APIStatusError, anthropic.APIStatusError)


def refused(call: Callable[[ServerThread, str], None], server: ServerThread, model: str) -> httpx.Response:
    """What the SDK raised for the call: the response it gave up on."""
    with pytest.raises(SDK_ERRORS) as caught:
        call(server, model)
    return caught.value.response


@pytest.mark.parametrize("dialect", DIALECTS)
def test_after_scillm_retried_the_sdk_does_not_retry(start: Callable[..., ServerThread], fake_a: FakeOpenAI,
                                                     dialect: str) -> None:
    model = "openai/text-embedding-3-small" if dialect == "embeddings" else "openai/gpt-a"
    fake_a.default = UNAVAILABLE
    server = start(fake_a.base_url, resilience={"max_retries": 2, **STEADY})
    response = refused(DIALECTS[dialect], server, model)
    assert len(fake_a.requests) == 3  # scillm's 1 + 2 retries; the SDK's own 2 retries would have made it 9
    assert response.status_code in (503, 529) and response.headers["x-should-retry"] == "false"  # 529: Anthropic's
    assert response.headers["x-scillm-attempts"] == "3" and "retry-after" in response.headers  # kept


def test_after_scillm_failed_over_the_sdk_does_not_retry(start: Callable[..., ServerThread], fake_a: FakeOpenAI,
                                                         fake_b: FakeOpenAI) -> None:
    fake_a.default = fake_b.default = UNAVAILABLE
    server = start(fake_a.base_url, fake_b.base_url, groups=GROUP, resilience={"max_retries": 0, **STEADY})
    response = refused(chat, server, "g")
    assert (len(fake_a.requests), len(fake_b.requests)) == (1, 1)
    assert response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize("dialect", ["chat", "messages"])
def test_after_a_single_attempt_the_sdk_retries_as_before(start: Callable[..., ServerThread], fake_a: FakeOpenAI,
                                                          dialect: str) -> None:
    fake_a.default = UNAVAILABLE
    server = start(fake_a.base_url, resilience={"max_retries": 0, **STEADY})
    response = refused(DIALECTS[dialect], server, "openai/gpt-a")
    assert len(fake_a.requests) == 3  # the SDK's 1 + 2 retries, one upstream call each
    assert response.status_code in (503, 529) and "x-should-retry" not in response.headers

