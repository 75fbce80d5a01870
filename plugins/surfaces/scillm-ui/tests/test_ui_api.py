"""The dashboard's data endpoints: what they report, filters and grouping (keys included), bad parameters, and
that no secret reaches any of them."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

import httpx
import openai
import pytest

from scillm_core import hookimpl
from scillm_core.testing import FakeOpenAI, Reply, ServerThread, make_app

MASTER_KEY = "sk-uiapi-master-key-0123456789"
OPENAI_KEY = "sk-uiapi-openai-secret-0123456789"
AUTH = {"authorization": f"Bearer {MASTER_KEY}"}


class KeyNames:
    """Stands in for a virtual-key plugin: names the key a call was made with (never the key itself)."""

    @hookimpl(wrapper=True, tryfirst=True)
    def preprocess_files(self, request: Any, ctx: Any) -> Generator[None, Any, Any]:
        ctx.notes["key"] = "team-a" if ctx.caller == "svc-a" else "team-b"
        return (yield)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture
def server(upstream: FakeOpenAI, tmp_path: Any) -> Iterator[ServerThread]:
    upstream._script.clear()
    env = {"SCILLM_MASTER_KEY": MASTER_KEY, "OPENAI_API_KEY": OPENAI_KEY, "OPENAI_API_BASE": upstream.url + "/v1"}
    with ServerThread(make_app(env=env, data_dir=tmp_path, plugins=[("keynames", KeyNames())],
                               config={"ui": {"max_calls": 5}})) as server:
        yield server


def _get(server: ServerThread, path: str, **params: str) -> Any:
    answer = httpx.get(server.url + path, params=params, headers=AUTH)
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    return answer.json()


def _chat(server: ServerThread, caller: str, content: str = "hi", **kw: Any) -> Any:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=MASTER_KEY, max_retries=0)
    return client.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": content}],
                                          extra_headers={"x-caller-skill": caller}, **kw)


def test_calls_filters_detail_and_series_by_key(server: ServerThread, upstream: FakeOpenAI) -> None:
    _chat(server, "svc-a", "first")
    _chat(server, "svc-b", "second", extra_body={"scillm_metadata": {"job": 7}})
    upstream.script(Reply.fail(400, "bad things"))
    with pytest.raises(openai.BadRequestError):
        _chat(server, "svc-a", "third")
    every = _get(server, "/v1/scillm/ui/calls")["data"]
    assert [c["caller"] for c in every] == ["svc-a", "svc-b", "svc-a"]  # newest first
    assert [c["key"] for c in every] == ["team-a", "team-b", "team-a"]
    assert [c["id"] for c in _get(server, "/v1/scillm/ui/calls", key="team-a")["data"]] == [every[0]["id"],
                                                                                            every[2]["id"]]
    failed = _get(server, "/v1/scillm/ui/calls", status="error")["data"]
    assert [(c["http_status"], c["error_code"]) for c in failed] == [(400, every[0]["error_code"])]
    assert _get(server, "/v1/scillm/ui/calls", model="gpt-4o", caller="svc-b")["count"] == 1
    detail = _get(server, f"/v1/scillm/ui/calls/{every[1]['id']}")
    assert detail["prompt"] == "second" and detail["answer"] == "Hello from the fake."
    assert detail["metadata"] == '{"job":7}' and detail["attempts"][0]["outcome"] == "ok"
    assert detail["tokens_in"] == 11 and detail["served_model"] == "gpt-4o-mini"
    series = _get(server, "/v1/scillm/ui/series", by="key")
    assert sum(series["series"]["team-a"]["requests"]) == 2 and sum(series["series"]["team-a"]["errors"]) == 1
    assert sum(series["series"]["team-b"]["tokens"]) == 18
    assert len(series["minutes"]) == 60
    # bounded: the newest [ui] max_calls are kept
    for n in range(5):
        _chat(server, "svc-a", f"more {n}")
    assert _get(server, "/v1/scillm/ui/calls")["kept"] == 5
    missing = httpx.get(f"{server.url}/v1/scillm/ui/calls/{every[2]['id']}", headers=AUTH)
    assert missing.status_code == 404 and "max_calls" in missing.json()["error"]["message"]


def test_bad_parameters_are_4xx_naming_them(server: ServerThread) -> None:
    for path, params, name in (("calls", {"limit": "0"}, "limit"), ("calls", {"limit": "x"}, "limit"),
                               ("calls", {"limit": "²"}, "limit"), ("calls", {"limit": "9" * 5000}, "limit"),
                               ("series", {"by": "team"}, "by"), ("calls", {"model": "m" * 300}, "model")):
        answer = httpx.get(f"{server.url}/v1/scillm/ui/{path}", params=params, headers=AUTH)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == f"query.{name}"


def test_no_secret_reaches_any_dashboard_endpoint(server: ServerThread, upstream: FakeOpenAI) -> None:
    upstream.script(Reply.fail(401, f"Incorrect API key provided: {OPENAI_KEY}"))
    with pytest.raises(openai.AuthenticationError):
        _chat(server, "svc-a", f"my master key is {MASTER_KEY}")
    _chat(server, "svc-a", f"and the provider's is {OPENAI_KEY}",
          extra_body={"scillm_metadata": {"token": OPENAI_KEY}})
    calls = _get(server, "/v1/scillm/ui/calls")["data"]
    bodies = [httpx.get(f"{server.url}{path}", headers=AUTH).text for path in (
        "/v1/scillm/ui/summary", "/v1/scillm/ui/calls", "/v1/scillm/ui/batches", "/v1/scillm/ui/runs",
        "/v1/scillm/ui/series?by=caller", *(f"/v1/scillm/ui/calls/{c['id']}" for c in calls))]
    assert any("[redacted]" in body for body in bodies)  # the previews were kept, with the secrets taken out
    for body in bodies:
        assert MASTER_KEY not in body and OPENAI_KEY not in body


def test_off_means_no_routes_and_no_observer(upstream: FakeOpenAI, tmp_path: Any) -> None:
    app = make_app(env={"SCILLM_MASTER_KEY": MASTER_KEY}, data_dir=tmp_path,
                   config={"ui": {"enabled": False}, "metrics": {"enabled": False}})  # metrics observes too
    with ServerThread(app) as server:
        assert httpx.get(server.url + "/ui").status_code == 401  # not a public route when off
        assert httpx.get(server.url + "/v1/scillm/ui/summary", headers=AUTH).status_code == 404
        assert not server.app.runtime.events.wants("request.end")


def test_a_virtual_key_sees_only_its_own_calls_batches_and_series(upstream: FakeOpenAI, tmp_path: Any) -> None:
    """With the keys plugin: every dashboard endpoint answers a virtual key about its own work only (another key's
    call is a 404 like one that was never kept; counts, series and batches are its own), the master key all."""
    env = {"SCILLM_MASTER_KEY": MASTER_KEY, "OPENAI_API_KEY": OPENAI_KEY, "OPENAI_API_BASE": upstream.url + "/v1"}
    with ServerThread(make_app(env=env, data_dir=tmp_path)) as server:
        made = [httpx.post(f"{server.url}/v1/scillm/keys", json={"name": name}, headers=AUTH).json()
                for name in ("alice", "bob")]
        keys = {m["name"]: m["key"] for m in made}

        def chat(who: str, content: str) -> None:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=keys[who], max_retries=0)
            client.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": content}],
                                           extra_headers={"x-caller-skill": f"svc-{who}"})

        def get(who: str, path: str, **params: str) -> httpx.Response:
            return httpx.get(f"{server.url}/v1/scillm/ui/{path}", params=params,
                             headers={"authorization": f"Bearer {keys[who]}"})

        chat("alice", "ALICE-PRIVATE-PROMPT")
        chat("bob", "bob's question")
        batch = httpx.post(f"{server.url}/v1/scillm/batch/completions", headers={
            "authorization": f"Bearer {keys['alice']}"}, json={
            "model": "openai/gpt-4o-mini", "batch_id": "alice-nightly", "items": [{"item_id": "q0", "prompt": "hi"}]})
        assert batch.status_code == 200, batch.text
        every = _get(server, "/v1/scillm/ui/calls")["data"]
        alices = [c for c in every if c["caller"] == "svc-alice"]
        bobs = [c for c in every if c["caller"] == "svc-bob"]
        assert len(alices) == 1 and len(bobs) == 1 and len(every) == 3  # and the batch item's call, alice's
        # each call is named by the key it was made with (its name, never its secret): filters and charts by key
        assert sorted(c["key"] for c in every) == ["alice", "alice", "bob"]
        assert [c["id"] for c in _get(server, "/v1/scillm/ui/calls", key="bob")["data"]] == [bobs[0]["id"]]
        by_key = _get(server, "/v1/scillm/ui/series", by="key")["series"]
        assert {name: sum(s["requests"]) for name, s in by_key.items()} == {"alice": 2, "bob": 1}
        assert list(get("bob", "series", by="key").json()["series"]) == ["bob"]
        assert len(get("alice", "calls").json()["data"]) == 2
        assert [c["id"] for c in get("bob", "calls").json()["data"]] == [bobs[0]["id"]]
        assert get("bob", "calls").json()["kept"] == 1
        hidden, unknown = get("bob", f"calls/{alices[0]['id']}"), get("bob", "calls/c999999")
        assert hidden.status_code == unknown.status_code == 404
        assert hidden.json()["error"]["message"].replace(alices[0]["id"], "?") == \
            unknown.json()["error"]["message"].replace("c999999", "?")
        assert get("alice", f"calls/{alices[0]['id']}").json()["prompt"] == "ALICE-PRIVATE-PROMPT"
        series = get("bob", "series", by="caller").json()["series"]
        assert list(series) == ["svc-bob"] and sum(series["svc-bob"]["requests"]) == 1
        assert {"svc-alice", "svc-bob"} <= set(_get(server, "/v1/scillm/ui/series", by="caller")["series"])
        assert [b["attrs"]["batch_id"] for b in get("alice", "batches").json()["data"]] == ["alice-nightly"]
        assert get("bob", "batches").json()["data"] == []
        assert [b["attrs"]["batch_id"] for b in _get(server, "/v1/scillm/ui/batches")["data"]] == ["alice-nightly"]
        summary = get("bob", "summary").json()
        assert summary["calls_kept"] == 1 and summary["live_calls"] == 0
        assert sum(p["recent_calls"] for p in summary["providers"]) == 1
        for path in ("summary", "calls", "batches", "runs", "series?by=caller", "series?by=key"):
            assert "ALICE-PRIVATE-PROMPT" not in get("bob", path).text and "svc-alice" not in get("bob", path).text
