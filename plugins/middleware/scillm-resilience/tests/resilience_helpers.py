"""What the fault tests share: keys, fast retry settings, clients and the health view."""

from __future__ import annotations

from typing import Any

import httpx
import openai

from scillm_core.testing import DEV_KEY, FakeUpstream, ServerThread

OPENAI_KEY = "sk-resilience-openai-secret-0123456789"
DEEPSEEK_KEY = "sk-resilience-deepseek-secret-9876543210"
ANTHROPIC_KEY = "sk-ant-resilience-secret-0123456789abcdef"

#: fast, deterministic-enough defaults for tests; each test overrides what it checks
FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.02, "max_retries": 1}

HI = [{"role": "user", "content": "hi"}]
GROUP = {"g": {"models": ["openai/gpt-a", "deepseek/deepseek-chat"]}}


def reset(fake: FakeUpstream) -> FakeUpstream:
    """A module-wide fake, fresh for one test."""
    fake.requests.clear()
    fake._script.clear()
    fake.default = type(fake).default
    fake.responder = None
    fake.max_in_flight = fake.in_flight
    return fake


def client_for(server: ServerThread, **kw: Any) -> openai.OpenAI:
    kw.setdefault("timeout", 20)
    return openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, **kw)


def health(server: ServerThread) -> dict[str, Any]:
    response = httpx.get(server.url + "/v1/scillm/health", headers={"authorization": f"Bearer {DEV_KEY}"})
    assert response.status_code == 200
    return response.json()["middleware"]["resilience"]  # type: ignore[no-any-return]
