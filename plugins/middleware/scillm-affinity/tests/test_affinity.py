"""Session affinity through real clients: the turns of one session stay on one deployment of a group while it is
healthy; when it fails the session moves, and stays where it moved."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from scillm_affinity import AffinityConfig, Sessions

from scillm_core import session_of
from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, make_app

GROUP = {"pair": {"models": ["openai/model-a", "deepseek/model-b"]}}
ONLY = ("chat", "messages", "responses", "auth", "ops", "openai-compat", "anthropic", "resilience", "affinity",
        "metrics")


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    with FakeOpenAI() as a, FakeOpenAI() as b:
        yield a, b


@pytest.fixture
def app(fakes: tuple[FakeOpenAI, FakeOpenAI], tmp_path: Any) -> Iterator[Any]:
    a, b = fakes
    a.requests.clear()
    b.requests.clear()
    env = {"OPENAI_API_KEY": "sk-a", "OPENAI_API_BASE": a.base_url, "DEEPSEEK_API_KEY": "sk-b",
           "DEEPSEEK_API_BASE": b.base_url}
    # no retries of the failing member: one failure means a fallback; the breaker stays closed (threshold 5)
    config = {"groups": GROUP, "resilience": {"max_retries": 0}}
    yield make_app(env=env, config=config, data_dir=tmp_path, only=ONLY)


def turns(client: openai.OpenAI, n: int, session: str | None) -> list[str]:
    """``n`` turns of one conversation; the deployment that served each (``x-scillm-provider``)."""
    served = []
    headers = {"x-scillm-session": session} if session else {}
    messages: list[dict[str, str]] = [{"role": "user", "content": "start"}]
    for _ in range(n):
        raw = client.chat.completions.with_raw_response.create(model="pair", messages=messages,
                                                               extra_headers=headers)
        served.append(raw.headers["x-scillm-provider"])
        messages += [{"role": "assistant", "content": raw.parse().choices[0].message.content},
                     {"role": "user", "content": "go on"}]
    return served


def test_a_session_stays_on_one_deployment_and_after_a_failover_stays_on_the_other(
        app: Any, fakes: tuple[FakeOpenAI, FakeOpenAI]) -> None:
    a, b = fakes
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)
        assert turns(client, 20, "s-1") == ["openai"] * 20  # healthy: every turn on one deployment
        assert (len(a.requests), len(b.requests)) == (20, 0)

        a.script(Reply.fail(503, "overloaded"))  # the deployment fails once: the session moves
        assert turns(client, 1, "s-1") == ["deepseek"]
        assert turns(client, 20, "s-1") == ["deepseek"] * 20  # ... and stays, though the first is healthy again
        assert len(a.requests) == 21  # the failed call, nothing since

        assert turns(client, 3, "s-2") == ["openai"] * 3  # a new session starts at the group's first model
        assert turns(client, 3, None) == ["openai"] * 3  # no session: the group's order, as always

        b.script(Reply.fail(503, "overloaded"))  # now its deployment fails: it moves back, and stays
        assert turns(client, 5, "s-1") == ["openai"] * 5
        health = httpx.get(server.url + "/v1/scillm/health", headers={"authorization": f"Bearer {DEV_KEY}"}).json()
        affinity = health["middleware"]["affinity"]
        assert affinity["enabled"] is True and affinity["sessions"] == 2 and affinity["moves"] == 2


def test_without_the_plugin_the_session_goes_back_to_the_first_model(fakes: tuple[FakeOpenAI, FakeOpenAI],
                                                                     tmp_path: Any) -> None:
    """What affinity changes: the same script with ``[affinity] enabled = false`` flaps back to the first model."""
    a, b = fakes
    a.requests.clear()
    env = {"OPENAI_API_KEY": "sk-a", "OPENAI_API_BASE": a.base_url, "DEEPSEEK_API_KEY": "sk-b",
           "DEEPSEEK_API_BASE": b.base_url}
    app = make_app(env=env, config={"groups": GROUP, "resilience": {"max_retries": 0},
                                    "affinity": {"enabled": False}}, data_dir=tmp_path, only=ONLY)
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)
        a.script(Reply.fail(503, "overloaded"))
        assert turns(client, 3, "s-1") == ["deepseek", "openai", "openai"]


def test_claude_code_session_header_on_the_messages_surface(app: Any, fakes: tuple[FakeOpenAI, FakeOpenAI]) -> None:
    """The header Claude Code sends names the session on /v1/messages too; the call log records it."""
    a, _ = fakes
    with ServerThread(app) as server:
        client = anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0, timeout=20,
                                     default_headers={"x-claude-code-session-id": "cc-42"})
        a.script(Reply.fail(503, "overloaded"))
        served = [client.messages.with_raw_response.create(model="pair", max_tokens=50, messages=[
            {"role": "user", "content": f"turn {i}"}]).headers["x-scillm-provider"] for i in range(4)]
        assert served == ["deepseek"] * 4
        calls = httpx.get(server.url + "/v1/scillm/calls", headers={"authorization": f"Bearer {DEV_KEY}"}).json()
        assert [c["session"] for c in calls["data"]][-4:] == ["cc-42"] * 4


def test_prompt_cache_key_names_the_session_on_the_responses_surface(app: Any,
                                                                      fakes: tuple[FakeOpenAI, FakeOpenAI]) -> None:
    """A Responses client's ``prompt_cache_key`` keeps its session where it moved, as on chat, and still reaches the
    chat upstream that serves it."""
    a, b = fakes
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)
        a.script(Reply.fail(503, "overloaded"))
        served = [client.responses.with_raw_response.create(model="pair", input=f"turn {i}",
                                                             prompt_cache_key="pck-r").headers["x-scillm-provider"]
                  for i in range(4)]
        assert served == ["deepseek"] * 4
        assert [r.body["prompt_cache_key"] for r in b.requests[-4:]] == ["pck-r"] * 4
        fresh = client.responses.with_raw_response.create(model="pair", input="turn 0", prompt_cache_key="pck-s")
        assert fresh.headers["x-scillm-provider"] == "openai"  # another session starts at the first model


def test_session_names_in_order_of_precedence() -> None:
    body = {"prompt_cache_key": "pck"}
    assert session_of({}, body) == "pck"
    assert session_of({"x-session-id": "oc"}, body) == "oc"
    assert session_of({"x-session-id": "oc", "x-session-affinity": "oc-aff"}, body) == "oc-aff"
    assert session_of({"session-id": "codex", "x-session-id": "oc"}, body) == "codex"
    assert session_of({"x-claude-code-session-id": "cc", "session-id": "codex"}, body) == "cc"
    assert session_of({"x-scillm-session": "mine", "x-claude-code-session-id": "cc"}, body) == "mine"
    assert session_of({}, {"prompt_cache_key": 5}) is None and session_of({}, [1]) is None


def test_sessions_are_bounded_and_forgotten_when_idle() -> None:
    now = [0.0]
    sessions = Sessions(AffinityConfig(max_sessions=2, ttl_s=10.0), clock=lambda: now[0])
    sessions.remember("g", "s1", "p/a")
    sessions.remember("g", "s2", "p/b")
    sessions.remember("g", "s3", "p/a")  # over the bound: the least recently used (s1) goes
    assert sessions.get("g", "s1") is None and sessions.get("g", "s3") == "p/a"
    now[0] = 10.5
    assert sessions.get("g", "s2") is None  # idle past ttl_s
    sessions.remember("g", "s3", "p/b")
    assert sessions.moves == 1 and sessions.get("g", "s3") == "p/b"


def test_sessions_on_a_shared_store_stick_whichever_process_serves_them(tmp_path: Any) -> None:
    """Two processes' sessions on one store (SQLite here; Redis in tests/test_scale.py): a deployment remembered by
    one is what the other routes to; each trusts its copy for shared_cache_s (no store read), then reads once (one
    read for concurrent callers); a move made by one reaches the other; a failing store leaves each its own copy."""
    import asyncio

    from scillm_core.state.sqlite import SQLiteStore

    class Counting:
        def __init__(self, store: SQLiteStore) -> None:
            self.inner, self.reads, self.fail = store, 0, False

        async def get(self, namespace: str, key: str) -> Any:
            self.reads += 1
            if self.fail:
                raise ConnectionError("store down")
            return await self.inner.get(namespace, key)

        async def put(self, namespace: str, key: str, value: Any, *, ttl_s: float | None = None) -> None:
            if self.fail:
                raise ConnectionError("store down")
            await self.inner.put(namespace, key, value, ttl_s=ttl_s)

    async def main() -> None:
        store = Counting(SQLiteStore(tmp_path / "state.sqlite3"))
        now, wall = [100.0], [1_000_000.0]
        config = AffinityConfig(ttl_s=3600.0, shared_cache_s=2.0)
        a, b = (Sessions(config, clock=lambda: now[0], wall=lambda: wall[0], store=lambda: store) for _ in "ab")
        assert not b.fresh("g", "s")
        await b.load("g", "s")
        assert b.get("g", "s") is None and b.fresh("g", "s")  # nothing known yet: remembered for shared_cache_s
        assert a.remember("g", "s", "p/second")  # a new session: the store is told
        await a.publish("g", "s", "p/second")
        assert b.get("g", "s") is None  # b's copy is still trusted
        now[0] += 2.0
        assert not b.fresh("g", "s")
        reads = store.reads
        await asyncio.gather(*(b.load("g", "s") for _ in range(20)))  # concurrent requests of the session
        assert store.reads == reads + 1 and b.get("g", "s") == "p/second" and b.fresh("g", "s")
        assert not b.remember("g", "s", "p/second")  # the same deployment, written a moment ago: no write
        wall[0] += 901.0  # a quarter of ttl_s later the document's expiry is renewed by whoever serves next
        now[0] += 901.0
        assert b.remember("g", "s", "p/second")
        assert b.remember("g", "s", "p/first") and b.moves == 1  # b moved it
        await b.publish("g", "s", "p/first")
        await a.load("g", "s")
        assert a.get("g", "s") == "p/first"  # a follows the move
        store.fail = True
        now[0] += 2.0
        await a.load("g", "s")
        assert a.get("g", "s") == "p/first" and a.counts["store_errors"] == 1  # fails open: its own copy
        assert a.fresh("g", "s")  # and for RETRY_S the store is not asked again (a hung Redis costs one timeout)
        assert a.remember("g", "t", "p/second")
        await a.publish("g", "t", "p/second")  # not written while skipping: the next call of the session tries
        assert a.remember("g", "t", "p/second")
        await store.inner.close()

    asyncio.run(main())
