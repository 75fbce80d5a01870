"""The cache through the official ``openai`` client against a real scillm server and the OpenAI-format fake."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from scillm_core.config import ConfigError
from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, make_app
from scillm_core.testing.contract import WEATHER_TOOL
from scillm_core.testing.services import free_port

MODEL = "gpt-4o-mini"
KEY = "sk-cache-test-secret-0123456789"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake  # type: ignore[misc]


def env_for(fake: FakeOpenAI, **extra: str) -> dict[str, str]:
    return {"OPENAI_API_KEY": KEY, "OPENAI_API_BASE": fake.base_url, **extra}


@pytest.fixture
def serve(fake: FakeOpenAI, tmp_path: Any) -> Iterator[Any]:
    servers: list[ServerThread] = []

    def start(cache: dict[str, Any] | None = None, env: dict[str, str] | None = None,
              config: dict[str, Any] | None = None) -> ServerThread:
        config = {**(config or {}), "cache": {"enabled": True, **(cache or {})}}
        app = make_app(env=env or env_for(fake), config=config, data_dir=tmp_path / f"d{len(servers)}")
        server = ServerThread(app).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def client(server: ServerThread) -> openai.OpenAI:
    cached = getattr(server, "_openai", None)
    if cached is None:
        cached = server._openai = openai.OpenAI(  # type: ignore[attr-defined]
            base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)
    return cached


def ask(server: ServerThread, **kw: Any) -> tuple[Any, Any]:
    """(parsed completion, raw response headers)."""
    kw.setdefault("model", MODEL)
    kw.setdefault("messages", MESSAGES)
    raw = client(server).chat.completions.with_raw_response.create(**kw)
    return raw.parse(), raw.headers


def test_hit_never_reaches_the_provider(fake: FakeOpenAI, serve: Any) -> None:
    server = serve()
    fake.script(Reply.say("Paris."), Reply.say("Lyon?"))
    first, h1 = ask(server, temperature=0.2)
    second, h2 = ask(server, temperature=0.2, extra_body={"scillm_metadata": {"run": 2}})  # metadata: not in key
    assert len(fake.requests) == 1
    assert first.choices[0].message.content == second.choices[0].message.content == "Paris."
    assert (h1["x-scillm-cache"], h2["x-scillm-cache"]) == ("miss", "hit")
    assert h2["x-scillm-provider"] == "openai" and h2["x-scillm-served-model"] == MODEL
    assert second.usage is not None and second.usage.total_tokens == first.usage.total_tokens


def test_anything_that_changes_the_answer_is_a_miss(fake: FakeOpenAI, serve: Any) -> None:
    server = serve()
    variants: list[dict[str, Any]] = [
        {"temperature": 0.2}, {"temperature": 0.9}, {"temperature": 0.2, "tools": [WEATHER_TOOL]},
        {"temperature": 0.2, "seed": 7}, {"temperature": 0.2, "response_format": {"type": "json_object"},
                                          "messages": [{"role": "user", "content": "json please"}]},
        {"temperature": 0.2, "messages": [{"role": "user", "content": "What is the capital of Italy?"}]},
        {"temperature": 0.2, "extra_body": {"top_k": 3}},  # extra upstream params count too
    ]
    fake.default = Reply.say('{"ok": true}')
    for kw in variants:
        _, headers = ask(server, **kw)
        assert headers["x-scillm-cache"] == "miss", kw
    assert len(fake.requests) == len(variants)
    for kw in variants:  # and each of them is now cached separately
        _, headers = ask(server, **kw)
        assert headers["x-scillm-cache"] == "hit", kw
    assert len(fake.requests) == len(variants)


def test_identical_concurrent_requests_share_one_upstream_call(fake: FakeOpenAI, serve: Any) -> None:
    server = serve()
    fake.default = Reply.say("shared answer", delay_s=0.5)
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: ask(server, temperature=0.1), range(10)))
    assert len(fake.requests) == 1
    assert {r.choices[0].message.content for r, _ in results} == {"shared answer"}
    assert all(h["x-scillm-provider"] == "openai" for _, h in results)


def test_errors_are_shared_not_cached(fake: FakeOpenAI, serve: Any) -> None:
    server = serve()
    fake.script(Reply.fail(400, "bad things", type="invalid_request_error"), Reply.say("fine now"))
    with pytest.raises(openai.BadRequestError):
        ask(server)
    answer, headers = ask(server)
    assert answer.choices[0].message.content == "fine now"
    assert headers["x-scillm-cache"] == "miss"
    assert len(fake.requests) == 2


def test_no_cache_header_and_body_opt_out_bypass(fake: FakeOpenAI, serve: Any) -> None:
    server = serve()
    fake.script(Reply.say("one"), Reply.say("two"), Reply.say("three"))
    ask(server)
    fresh, h = ask(server, extra_headers={"Cache-Control": "no-cache"})
    assert (fresh.choices[0].message.content, h["x-scillm-cache"]) == ("two", "bypass")
    opted, h = ask(server, extra_body={"cache": False})
    assert (opted.choices[0].message.content, h["x-scillm-cache"]) == ("three", "bypass")
    assert "cache" not in fake.last.body  # scillm's own field never goes upstream
    cached, h = ask(server)  # no-cache refreshed the entry; cache:false did not store
    assert (cached.choices[0].message.content, h["x-scillm-cache"]) == ("two", "hit")
    assert len(fake.requests) == 3


def test_stream_hit_is_replayed_and_stream_miss_passes_through(fake: FakeOpenAI, serve: Any) -> None:
    server = serve()
    fake.script(Reply.say("Paris is the capital."), Reply.say("streamed live"))
    ask(server)
    stream = client(server).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                                    stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Paris is the capital."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 18
    assert len(fake.requests) == 1
    other = [{"role": "user", "content": "stream me"}]
    live = client(server).chat.completions.create(model=MODEL, messages=other, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in live if c.choices) == "streamed live"
    assert len(fake.requests) == 2


def test_ttl_and_health(fake: FakeOpenAI, serve: Any) -> None:
    server = serve({"ttl_s": 1.5, "max_entries": 5})  # room for a stall on a busy machine between the two asks
    ask(server)
    assert ask(server)[1]["x-scillm-cache"] == "hit"
    time.sleep(1.6)
    assert ask(server)[1]["x-scillm-cache"] == "miss"
    health = httpx.get(server.url + "/v1/scillm/health", headers={"authorization": f"Bearer {DEV_KEY}"}).json()
    cache = health["middleware"]["cache"]
    assert cache["enabled"] is True and cache["fails"] == "open" and cache["backend"] == "memory"
    assert cache["counts"]["hit"] == 1 and cache["counts"]["miss"] == 2 and cache["max_entries"] == 5


def test_memory_backend_is_a_bounded_lru() -> None:
    import asyncio

    from scillm_cache import MemoryBackend

    async def scenario() -> list[bytes | None]:
        backend = MemoryBackend(2)
        await backend.set("a", b"1", 60)
        await backend.set("b", b"2", 60)
        await backend.get("a")            # a is now the most recent
        await backend.set("c", b"3", 60)  # evicts b
        return [await backend.get(k) for k in "abc"]

    assert asyncio.run(scenario()) == [b"1", None, b"3"]


def test_disabled_by_default(fake: FakeOpenAI, tmp_path: Any) -> None:
    with ServerThread(make_app(env=env_for(fake), data_dir=tmp_path)) as server:
        ask(server)
        _, headers = ask(server)
    assert "x-scillm-cache" not in headers
    assert len(fake.requests) == 2


# -- the state store (Redis) ---------------------------------------------------------------------------------------

def test_redis_state_shares_hits_and_in_flight_calls_between_instances(fake: FakeOpenAI, serve: Any,
                                                                       redis_state: dict[str, Any]) -> None:
    one = serve(config={"state": redis_state})  # backend "auto": the state store, since it is Redis
    two = serve({"backend": "store"}, config={"state": redis_state})
    fake.script(Reply.say("from instance one"))
    messages = [{"role": "user", "content": f"shared across instances {time.time()}"}]
    assert ask(one, messages=messages)[1]["x-scillm-cache"] == "miss"
    answer, headers = ask(two, messages=messages)
    assert (answer.choices[0].message.content, headers["x-scillm-cache"]) == ("from instance one", "hit")
    assert len(fake.requests) == 1
    health = httpx.get(two.url + "/v1/scillm/health", headers={"authorization": f"Bearer {DEV_KEY}"}).json()
    assert health["middleware"]["cache"]["backend"] == "store"

    fake.default = Reply.say("slow and shared", delay_s=0.5)
    messages = [{"role": "user", "content": f"asked at once {time.time()}"}]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda server: ask(server, messages=messages)[0].choices[0].message.content,
                                [one, two] * 3))
    assert answers == ["slow and shared"] * 6
    assert len(fake.requests) == 2  # one upstream call for six identical requests on two instances


def test_redis_down_fails_open(fake: FakeOpenAI, serve: Any) -> None:
    state = {"backend": "redis", "redis_url": f"redis://:hunter2secret@127.0.0.1:{free_port()}/0"}
    server = serve(config={"state": state})
    for _ in range(2):
        answer, headers = ask(server)
        assert answer.choices[0].message.content == "Hello from the fake."
        assert headers["x-scillm-cache"] == "miss"
    assert len(fake.requests) == 2
    health = httpx.get(server.url + "/v1/scillm/health", headers={"authorization": f"Bearer {DEV_KEY}"}).text
    assert "backend_errors" in health and "hunter2secret" not in health


def test_a_redis_url_in_the_cache_table_says_where_it_moved(fake: FakeOpenAI, serve: Any) -> None:
    with pytest.raises(ConfigError, match=r"\[state\]"):
        serve({"redis_url": "redis://127.0.0.1:6379/0"})


@pytest.mark.parametrize("scope", ["key", "team", "shared"])
def test_a_hit_is_only_ever_an_answer_the_scope_may_see(fake: FakeOpenAI, serve: Any, scope: str) -> None:
    master = "sk-master-cache-0123456789"
    server = serve(cache={"scope": scope}, env=env_for(fake, SCILLM_MASTER_KEY=master))
    admin = httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {master}"})
    alice, bob, carol = (admin.post("/v1/scillm/keys", json={"name": n, **t}).json()["key"]
                         for n, t in (("alice", {"team": "ml"}), ("bob", {"team": "ml"}), ("carol", {})))

    def ask_as(token: str) -> str:
        raw = openai.OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0).chat.completions \
            .with_raw_response.create(model=MODEL, messages=MESSAGES)
        return raw.headers["x-scillm-cache"]

    seen = [ask_as(t) for t in (alice, alice, bob, carol, master)]
    expected = {"key": ["miss", "hit", "miss", "miss", "miss"],
                "team": ["miss", "hit", "hit", "miss", "miss"],
                "shared": ["miss", "hit", "hit", "hit", "hit"]}[scope]
    assert seen == expected
    assert len(fake.requests) == expected.count("miss")


def test_an_unknown_scope_stops_startup(fake: FakeOpenAI, serve: Any) -> None:
    with pytest.raises(ConfigError, match="scope must be one of key, team, shared"):
        serve(cache={"scope": "global"})


def test_an_answer_that_lands_between_a_miss_and_taking_the_flight_is_the_answer(tmp_path: Any) -> None:
    """Another process holds the flight, this one misses; that process then stores its answer and lands just before
    this one takes the flight. This one must answer from the store, not call the upstream a second time."""
    import asyncio
    from types import SimpleNamespace

    from scillm_cache import FLIGHTS, CacheConfig, CacheState, StoreBackend, _other_flight, _store

    from scillm_core import ChatResponse, Choice, Message
    from scillm_core.registry import Route
    from scillm_core.state.sqlite import SQLiteStore

    async def scenario() -> Any:
        store = SQLiteStore(tmp_path / "state.db")
        state = CacheState(config=CacheConfig(enabled=True, backend="store"),
                           backend=StoreBackend(SimpleNamespace(store=store, instance_id="this")))  # type: ignore[arg-type]
        answer = ChatResponse(id="c1", model="m", choices=(Choice(message=Message(role="assistant", content="hi")),))
        await store.compare_and_set(FLIGHTS, "k", None, {"owner": "other", "at": 0.0})  # the other process's flight
        take = store.compare_and_set
        tries = 0

        async def other_lands_first(*args: Any, **kwargs: Any) -> bool:
            nonlocal tries
            tries += 1
            if tries == 2:  # after this process's first miss: the other stores its answer, then lands
                await _store(state, "k", answer, Route(provider="p", model="m", requested="m"))
                await store.delete(FLIGHTS, "k")
            return await take(*args, **kwargs)

        store.compare_and_set = other_lands_first  # type: ignore[method-assign]
        try:
            found = await _other_flight(state, "k", ChatResponse)
            return found, await store.get(FLIGHTS, "k"), tries
        finally:
            await store.close()

    found, flight, tries = asyncio.run(scenario())
    assert tries == 2 and found is not None and found[0].choices[0].message.content == "hi"
    assert flight is None  # the flight taken to look once more is given back
