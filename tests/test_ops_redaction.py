"""Ops output never shows a secret, also where it prints names a client or the configuration chose: a model
``llama3:sk-live-...`` (a request's and a group member's), an alias target, an ``x-caller-skill``. Requests go
through the official openai SDK with a master key, a provider key and a virtual key planted; then every ops
endpoint's answer (``/metrics``, health, providers, plugins, auth, the call log, the dashboard's data) is scanned
for any 12 characters of each secret's random part."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from scillm_core.testing import FakeOpenAI, Reply, ServerThread, make_app
from scillm_core.testing.fake_ollama import FakeOllama

PROVIDER_KEY = "dsk." + secrets.token_hex(16)                # not shaped like a key: redacted by value
MASTER_KEY = "master." + secrets.token_hex(16)
MODEL_TOKEN = "sk-live-" + secrets.token_hex(16)             # a client's model name carries it
CONFIG_TOKEN = "sk-conf-" + secrets.token_hex(16)            # a group member and an alias target carry it
CALLER_TOKEN = "sk-call-" + secrets.token_hex(16)            # a client's x-caller-skill carries it
OPS = ("/metrics", "/v1/scillm/health", "/v1/scillm/providers", "/v1/scillm/plugins", "/v1/scillm/auth",
       "/v1/scillm/calls", "/v1/scillm/ui/summary", "/v1/scillm/ui/calls", "/v1/scillm/ui/batches",
       "/v1/scillm/ui/runs", "/v1/scillm/ui/series?by=model", "/v1/scillm/ui/series?by=caller")


def fragments(value: str, width: int = 12) -> set[str]:
    tail = value.split("-", 2)[2] if value.startswith("sk-") else value  # "sk-live-" is not the secret
    return {tail[i:i + width] for i in range(len(tail) - width + 1)}


@pytest.fixture(scope="module")
def server() -> Iterator[dict[str, Any]]:
    with FakeOpenAI() as deepseek, FakeOllama() as ollama:
        env = {"DEEPSEEK_API_KEY": PROVIDER_KEY, "DEEPSEEK_API_BASE": deepseek.base_url,
               "OLLAMA_API_BASE": ollama.base_url, "SCILLM_MASTER_KEY": MASTER_KEY}
        config = {"resilience": {"max_retries": 0, "breaker_threshold": 1},
                  "groups": {"g": {"models": [f"llama3:{CONFIG_TOKEN}", "deepseek/deepseek-chat"]}},
                  "aliases": {"fast": f"deepseek/{CONFIG_TOKEN}"}}
        with ServerThread(make_app(env=env, config=config)) as server:
            yield {"server": server, "deepseek": deepseek, "ollama": ollama}


@pytest.fixture(scope="module")
def traffic(server: dict[str, Any]) -> dict[str, str]:
    """Calls that put each planted value where ops output can pick it up; the virtual key's value."""
    url = server["server"].url
    virtual = httpx.post(url + "/v1/scillm/keys", headers={"authorization": f"Bearer {MASTER_KEY}"},
                         json={"name": "scanned"}).json()["key"]
    master = openai.OpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0,
                           default_headers={"x-caller-skill": f"team-{CALLER_TOKEN}"})
    server["ollama"].script(Reply.fail(500, "down"), Reply.fail(500, "down"))
    with pytest.raises(openai.APIStatusError):  # fails: the breaker opens on the deployment named after the model
        master.chat.completions.create(model=f"llama3:{MODEL_TOKEN}", messages=[{"role": "user", "content": "hi"}])
    server["deepseek"].script(Reply.say("one"), Reply.say("two"), Reply.say("three"))
    answer = master.chat.completions.create(model="g", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "one"  # the group's first member failed over to deepseek
    assert master.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}]
                                          ).choices[0].message.content == "two"
    assert server["deepseek"].last.json["model"] == CONFIG_TOKEN  # the upstream still gets the name as configured
    mine = openai.OpenAI(base_url=url + "/v1", api_key=virtual, max_retries=0)
    assert mine.chat.completions.create(model="deepseek/deepseek-chat", messages=[{"role": "user", "content": "hi"}]
                                        ).choices[0].message.content == "three"
    return {"provider key": PROVIDER_KEY, "master key": MASTER_KEY,
            "virtual key": virtual.split(".", 1)[1],  # after its public id (sk-scillm-key_<id>.<secret>)
            "model name token": MODEL_TOKEN, "configured name token": CONFIG_TOKEN, "caller token": CALLER_TOKEN}


def test_no_ops_endpoint_shows_a_planted_secret(server: dict[str, Any], traffic: dict[str, str]) -> None:
    url = server["server"].url
    seen = {}
    for path in OPS:
        response = httpx.get(url + path, headers={"authorization": f"Bearer {MASTER_KEY}"})
        assert response.status_code == 200, (path, response.text)
        seen[path] = response.text
    ui_calls = httpx.get(url + "/v1/scillm/ui/calls", headers={"authorization": f"Bearer {MASTER_KEY}"}).json()
    for call in ui_calls["data"]:  # each call's detail page
        path = f"/v1/scillm/ui/calls/{call['id']}"
        seen[path] = httpx.get(url + path, headers={"authorization": f"Bearer {MASTER_KEY}"}).text
    # the names are there, redacted: the scan looks where they would be
    assert "llama3:[redacted]" in seen["/v1/scillm/health"] and "deepseek/[redacted]" in seen["/v1/scillm/health"]
    assert 'model="llama3:[redacted]"' in seen["/metrics"] and 'caller="team-[redacted]"' in seen["/metrics"]
    assert "team-[redacted]" in seen["/v1/scillm/ui/series?by=caller"]
    leaked = {path: [name for name, value in traffic.items() if any(f in text for f in fragments(value))]
              for path, text in seen.items()}
    assert not any(leaked.values()), leaked


def test_series_whose_labels_become_the_same_are_added_up(server: dict[str, Any], traffic: dict[str, str]) -> None:
    master = openai.OpenAI(base_url=server["server"].url + "/v1", api_key=MASTER_KEY, max_retries=0)
    server["ollama"].script(Reply.say("a"), Reply.say("b"))
    for token in ("sk-live-" + secrets.token_hex(16), "sk-live-" + secrets.token_hex(16)):
        master.chat.completions.create(model=f"llama3:{token}", messages=[{"role": "user", "content": "hi"}])
    text = httpx.get(server["server"].url + "/metrics", headers={"authorization": f"Bearer {MASTER_KEY}"}).text
    lines = [line for line in text.splitlines() if line.startswith("scillm_requests_total{")
             and 'model="llama3:[redacted]"' in line and 'status="2xx"' in line]
    assert len(lines) == 1 and float(lines[0].rsplit(" ", 1)[1]) == 2.0  # one series, both calls, valid exposition
