"""Budgets, limits and spend with the official SDKs: the reservation bound under 50 concurrent requests, per-key
concurrency caps, rate windows, team budgets, spend surviving a restart, cache-read pricing, streams, unknown
prices, batch and run ceilings, runs charged to the key that started them, and hostile spend queries."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from starlette.requests import Request
from starlette.responses import Response

from scillm_core import CallContext, ChatRequest, structure
from scillm_core.state.sqlite import SQLiteStore
from scillm_core.testing import FakeOpenAI, Reply, ServerThread, install_fake_cli, make_app
from scillm_core.testing.fake_anthropic import FakeAnthropic

MASTER = "sk-master-budgets-SECRET-0123456789"
PROVIDER = "sk-provider-budgets-SECRET-987654"
PRICEY = "openai/pricey"  # $10 in / $100 out per million tokens (configured below)
PRICING = {"openai/pricey": {"input": 10.0, "output": 100.0, "cache_read": 1.0},
           "openai/embed-pricey": {"input": 1000.0, "output": 0.0}}
# a call to PRICEY with the fake's default usage (11 prompt, 7 completion tokens) costs exactly this:
CALL_USD = (11 * 10 + 7 * 100) / 1e6
# and reserves this with max_tokens=10 ("hi" estimates to 9 prompt tokens):
RESERVE_USD = (9 * 10 + 10 * 100) / 1e6


class CountingFake(FakeOpenAI):
    """The fake OpenAI upstream, also counting calls in flight per requested model."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight_by_model: dict[str, int] = {}
        self.max_in_flight_by_model: dict[str, int] = {}

    async def chat(self, request: Request) -> Response:
        model = json.loads(await request.body()).get("model", "?")
        now = self.in_flight_by_model[model] = self.in_flight_by_model.get(model, 0) + 1
        self.max_in_flight_by_model[model] = max(self.max_in_flight_by_model.get(model, 0), now)
        try:
            return await super().chat(request)
        finally:
            self.in_flight_by_model[model] -= 1

    def calls(self, model: str) -> int:
        return sum(1 for r in self.requests if isinstance(r.body, dict) and r.body.get("model") == model)


class Server:
    def __init__(self, thread: ServerThread, fake: CountingFake, claude: FakeAnthropic, data_dir: Path,
                 root: Path) -> None:
        self.thread, self.url, self.fake, self.claude, self.data_dir, self.root = (
            thread, thread.url, fake, claude, data_dir, root)
        self.admin = httpx.Client(base_url=self.url, timeout=60, headers={"authorization": f"Bearer {MASTER}",
                                                                          "x-caller-skill": "budget-tests"})

    @property
    def runtime(self) -> Any:
        return self.thread.app.runtime

    def key(self, **body: Any) -> tuple[str, str]:
        response = self.admin.post("/v1/scillm/keys", json={"name": "k", **body})
        assert response.status_code == 201, response.text
        return response.json()["id"], response.json()["key"]

    def client(self, token: str, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=token, **{"max_retries": 0, **kw})

    def as_key(self, token: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, headers={"authorization": f"Bearer {token}",
                                                                     "x-caller-skill": "budget-tests"})


def start(fake: CountingFake, claude: FakeAnthropic, data_dir: Path, root: Path, bin_dir: Path,
          **env: str) -> ServerThread:
    app = make_app(env={"SCILLM_MASTER_KEY": MASTER, "OPENAI_API_KEY": PROVIDER, "OPENAI_API_BASE": fake.base_url,
                        "ANTHROPIC_API_KEY": PROVIDER, "ANTHROPIC_API_BASE": claude.url, **env},
                   data_dir=data_dir,
                   config={"pricing": PRICING, "budgets": {"teams": {"ml": {"daily_usd": 0.002}}},
                           "exec": {"allowed_roots": [str(root)], "kill_grace_s": 0.5},
                           "agent_runners": {"bin_dir": str(bin_dir), "default_model": PRICEY}})
    return ServerThread(app).start()


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[CountingFake, FakeAnthropic]]:
    with CountingFake() as fake, FakeAnthropic() as claude:
        yield fake, claude  # type: ignore[misc]


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The harness's fake CLI installed as ``claude``: its model calls come back through its run key."""
    directory = tmp_path_factory.mktemp("bin")
    install_fake_cli(directory)
    return directory


@pytest.fixture(scope="module")
def server(fakes: tuple[CountingFake, FakeAnthropic], bin_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir, root = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("root")
    thread = start(*fakes, data_dir, root, bin_dir)
    try:
        yield Server(thread, *fakes, data_dir, root)
    finally:
        thread.stop()


def hi(client: openai.OpenAI, model: str = PRICEY, max_tokens: int = 10, **kw: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens, **kw)


def budget(server: Server, token: str) -> dict[str, Any]:
    response = server.as_key(token).get("/v1/budget")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


# -- the reservation bound ----------------------------------------------------------------------------------------

def test_fifty_concurrent_requests_stop_within_one_reservation_and_refused_ones_never_reach_the_provider(
        server: Server) -> None:
    limit = 0.01
    _, token = server.key(name="nearly-spent", limits={"daily_usd": limit})
    server.fake.default = Reply(text="Hello from the fake.", delay_s=0.2)  # all 50 are in flight together
    before = server.fake.calls("pricey")

    async def burst() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0)

        async def one() -> Any:
            try:
                return await client.chat.completions.create(
                    model=PRICEY, messages=[{"role": "user", "content": "hi"}], max_tokens=10)
            except openai.RateLimitError as exc:
                return exc

        return await asyncio.gather(*(one() for _ in range(50)))

    ok = 0
    first_burst_ok = None
    refusals: list[openai.RateLimitError] = []
    try:
        for _ in range(10):  # bursts until the budget refuses every request of one
            results = asyncio.run(burst())
            admitted = sum(not isinstance(r, Exception) for r in results)
            first_burst_ok = admitted if first_burst_ok is None else first_burst_ok
            ok += admitted
            refusals += [r for r in results if isinstance(r, Exception)]
            if admitted == 0:
                break
    finally:
        server.fake.default = Reply(text="Hello from the fake.")
    assert first_burst_ok == math.floor(limit / RESERVE_USD)  # 50 at once: only what the reservations allow
    assert server.fake.calls("pricey") - before == ok  # the upstream's own count: no refused request reached it
    spent = budget(server, token)["spent"]
    assert spent == pytest.approx(ok * CALL_USD)
    assert limit - RESERVE_USD <= spent <= limit  # stopped within one reservation of the budget, never past it
    assert all(r.status_code == 429 and r.body["code"] == "budget_exceeded" for r in refusals)  # type: ignore[index]
    last = refusals[-1].response
    assert int(last.headers["retry-after"]) > 60  # the budget itself is spent: retry after the daily reset
    assert 1 <= int(refusals[0].response.headers["retry-after"]) <= 1  # calls in flight held the room


def test_a_concurrency_cap_of_two_holds_under_forty_requests_while_another_key_flows(server: Server) -> None:
    _, capped = server.key(name="capped", limits={"max_concurrency": 2})
    _, free = server.key(name="free")
    server.fake.default = Reply(text="slow", delay_s=0.3)

    async def many(token: str, model: str, n: int) -> list[Any]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0)

        async def one() -> Any:
            try:
                return await client.chat.completions.with_raw_response.create(
                    model=model, messages=[{"role": "user", "content": "hi"}])
            except openai.RateLimitError as exc:
                return exc

        return await asyncio.gather(*(one() for _ in range(n)))

    async def both() -> tuple[list[Any], list[Any]]:
        return await asyncio.gather(many(capped, "gpt-4o-mini", 40), many(free, "gpt-4o", 12))

    before = server.fake.calls("gpt-4o-mini")
    try:
        capped_results, free_results = asyncio.run(both())
    finally:
        server.fake.default = Reply(text="Hello from the fake.")
    served = [r for r in capped_results if not isinstance(r, Exception)]
    refused = [r for r in capped_results if isinstance(r, Exception)]
    assert server.fake.max_in_flight_by_model["gpt-4o-mini"] <= 2
    assert server.fake.calls("gpt-4o-mini") - before == len(served) >= 2
    assert refused and all(r.status_code == 429 and r.body["code"] == "rate_limited"  # type: ignore[index]
                           and r.response.headers["retry-after"] == "1" for r in refused)
    assert all(not isinstance(r, Exception) for r in free_results)  # the other key was never held back
    assert server.fake.max_in_flight_by_model["gpt-4o"] > 2


def test_requests_per_minute_are_refused_until_the_next_minute(server: Server) -> None:
    state = server.runtime.plugin_state["budgets"]
    state.clock = lambda: 1_800_000_030.0  # pinned: 30 s into a minute
    try:
        _, token = server.key(name="rpm", limits={"rpm": 3})
        client = server.client(token)
        for _ in range(3):
            hi(client)
        with pytest.raises(openai.RateLimitError) as refused:
            hi(client)
        assert refused.value.body["code"] == "rate_limited"  # type: ignore[index]
        assert refused.value.response.headers["retry-after"] == "30"
        state.clock = lambda: 1_800_000_061.0  # the next minute
        hi(client)
    finally:
        state.clock = __import__("time").time


def test_a_team_budget_is_shared_by_its_keys(server: Server) -> None:
    _, a = server.key(name="ml-a", team="ml")
    _, b = server.key(name="ml-b", team="ml")
    hi(server.client(a))  # $0.00081 of the team's $0.002
    hi(server.client(b))
    with pytest.raises(openai.RateLimitError) as refused:
        hi(server.client(a))
    assert refused.value.body["code"] == "budget_exceeded" and "team 'ml'" in refused.value.message  # type: ignore
    team = next(b for b in budget(server, b)["budgets"] if b["scope"] == "team")
    assert team["spent_usd"] == pytest.approx(2 * CALL_USD) and team["limit_usd"] == 0.002


# -- spend ----------------------------------------------------------------------------------------------------------

def test_spend_survives_a_restart(fakes: tuple[CountingFake, FakeAnthropic], bin_dir: Path, tmp_path: Path) -> None:
    data_dir, root = tmp_path / "data", tmp_path / "root"
    root.mkdir()
    thread = start(*fakes, data_dir, root, bin_dir)
    server = Server(thread, *fakes, data_dir, root)
    key_id, token = server.key(name="durable", limits={"daily_usd": 0.003})
    try:
        hi(server.client(token))
        hi(server.client(token))
    finally:
        thread.stop()
    thread = start(*fakes, data_dir, root, bin_dir)
    server = Server(thread, *fakes, data_dir, root)
    try:
        assert budget(server, token)["spent"] == pytest.approx(2 * CALL_USD)
        hi(server.client(token))  # $0.00057 of room... no: $0.00138 left, a call reserves $0.00109
        with pytest.raises(openai.RateLimitError) as refused:
            hi(server.client(token))
        assert refused.value.body["code"] == "budget_exceeded"  # type: ignore[index]
        spend = server.admin.get("/v1/scillm/spend", params={"key": key_id}).json()
        assert spend["calls"] == 3 and spend["cost_usd"] == pytest.approx(3 * CALL_USD)
    finally:
        thread.stop()


def test_spend_sums_the_ledgers_per_second_records_and_records_of_one_call_from_before(server: Server) -> None:
    """The ledger holds one record per second and group; records written one per call before that (a store from an
    earlier version) still count, each as one call, and a window selects records by the second they are about."""
    key_id, token = server.key(name="upgraded")
    client = server.client(token)
    for _ in range(5):
        hi(client)
    now = time.time()
    one_call = {"request_id": "req-old", "owner": key_id, "key_name": "upgraded", "team": None,
                "caller": "budget-tests", "model": PRICEY, "provider": "openai", "served_model": "pricey",
                "batch": None, "run": None, "charged_usd": 0.5, "stream": False}

    async def written_before() -> list[dict[str, Any]]:  # another process on the same store: the old version
        store = SQLiteStore(server.data_dir / "scillm.sqlite3")
        await store.append_many("spend", [
            {**one_call, "ts": now - 2 * 86400, "cost_usd": 0.5, "tokens": {"input": 1000, "output": 10}},
            {**one_call, "ts": now - 60, "cost_usd": None, "tokens": None}])
        server.admin.get("/v1/scillm/spend", params={"key": key_id})  # flushes the server's sums
        records = await store.tail("spend", 100, match={"owner": key_id})
        await store.close()
        return records

    records = asyncio.run(written_before())
    summed = [r for r in records if "calls" in r]
    assert sum(r["calls"] for r in summed) == 5 and len(summed) < 5  # five calls, summed per second
    assert {r["cost_nano"] for r in summed} <= {n * round(CALL_USD * 1e9) for n in range(1, 6)}
    day = server.as_key(token).get("/v1/scillm/spend", params={"window": "24h"}).json()
    assert (day["calls"], day["unpriced_calls"]) == (6, 1) and day["cost_usd"] == pytest.approx(5 * CALL_USD)
    assert day["tokens"] == {"input": 5 * 11, "output": 5 * 7, "cache_read": 0, "cache_write": 0}
    days = server.as_key(token).get("/v1/scillm/spend", params={"window": "3d", "group_by": "day"}).json()
    assert days["calls"] == 7 and days["cost_usd"] == pytest.approx(0.5 + 5 * CALL_USD)
    assert days["tokens"]["input"] == 1000 + 5 * 11
    by_day = {g["day"]: g["calls"] for g in days["groups"]}
    assert by_day.pop(time.strftime("%Y-%m-%d", time.gmtime(now - 2 * 86400))) == 1 and sum(by_day.values()) == 6


def test_a_calls_thunk_called_again_while_its_stream_is_open_charges_each_call(server: Server) -> None:
    """A provider call's thunk (the budgets plugin's admission, call and settlement) may be called again before the
    stream of its first call ended: each call is charged and settled on its own."""
    runtime = server.runtime
    request = structure({"model": PRICEY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10,
                         "stream": True, "stream_options": {"include_usage": True}}, ChatRequest)

    async def go() -> Any:  # on the server's event loop, as a surface's call would run
        ctx = CallContext(runtime=runtime, caller="thunk-twice")
        thunk = runtime.hooks.call_provider(request, runtime.hooks.route_model(request, runtime), ctx)
        first = await thunk()
        second = await thunk()  # the first stream is still open
        for stream in (first, second):
            async for _ in stream:
                pass
        return ctx.notes["cost_usd"]

    assert server.thread.loop is not None
    cost = asyncio.run_coroutine_threadsafe(go(), server.thread.loop).result(timeout=60)
    assert cost == pytest.approx(2 * CALL_USD)
    spend = server.admin.get("/v1/scillm/spend", params={"caller": "thunk-twice"}).json()
    assert spend["calls"] == 2 and spend["cost_usd"] == pytest.approx(2 * CALL_USD)


def test_cache_reads_and_writes_are_priced_at_their_own_rates(server: Server) -> None:
    _, token = server.key(name="cached")
    server.fake.script(Reply.say("cached", prompt_tokens=1000, cached_tokens=800, completion_tokens=100))
    raw = hi(server.client(token), "gpt-4o-mini")
    # gpt-4o-mini: $0.15 in, $0.075 cache read, $0.60 out per million
    expected = (200 * 0.15 + 800 * 0.075 + 100 * 0.60) / 1e6
    assert float(raw.headers["x-scillm-cost-usd"]) == pytest.approx(expected, abs=1e-12)
    assert float(raw.headers["x-scillm-cost-usd"]) != pytest.approx(1000 * 0.15 / 1e6 + 100 * 0.6 / 1e6)
    # Anthropic reports cache reads and writes besides input_tokens (2,000 prompt tokens in all)
    server.claude.script(Reply.say("from claude", prompt_tokens=300, cached_tokens=1200, cache_write_tokens=500,
                                   completion_tokens=100))
    claude = anthropic.Anthropic(base_url=server.url, api_key=token, max_retries=0)
    answer = claude.messages.with_raw_response.create(model="claude-haiku-4-5", max_tokens=100,
                                                      messages=[{"role": "user", "content": "hi"}])
    # claude-haiku-4-5: $1 in, $0.10 cache read, $1.25 cache write, $5 out per million
    expected = (300 * 1 + 1200 * 0.10 + 500 * 1.25 + 100 * 5) / 1e6
    assert float(answer.headers["x-scillm-cost-usd"]) == pytest.approx(expected, abs=1e-12)
    rows = server.as_key(token).get("/v1/scillm/spend", params={"group_by": "model"}).json()["groups"]
    by_model = {r["model"]: r for r in rows}
    assert by_model["claude-haiku-4-5"]["tokens"] == {"input": 300, "output": 100, "cache_read": 1200,
                                                       "cache_write": 500}


def test_costs_show_in_the_response_the_call_log_and_the_ledger(server: Server) -> None:
    key_id, token = server.key(name="visible")
    raw = hi(server.client(token), user="x", extra_headers={"x-caller-skill": "reporting"})
    assert float(raw.headers["x-scillm-cost-usd"]) == pytest.approx(CALL_USD)
    responses = server.as_key(token).post("/v1/responses", json={"model": PRICEY, "input": "hi",
                                                                 "max_output_tokens": 10})
    assert float(responses.headers["x-scillm-cost-usd"]) == pytest.approx(CALL_USD)
    calls = server.as_key(token).get("/v1/scillm/calls").json()["data"]
    assert [c["cost_usd"] for c in calls] == [pytest.approx(CALL_USD)] * 2
    by_caller = server.as_key(token).get("/v1/scillm/spend", params={"group_by": "caller"}).json()
    assert {g["caller"]: g["calls"] for g in by_caller["groups"]} == {"reporting": 1, "budget-tests": 1}
    assert by_caller["filters"] == {} and by_caller["cost_usd"] == pytest.approx(2 * CALL_USD)
    metrics = server.admin.get("/metrics").text
    assert f'scillm_spend_usd_total{{key="{key_id}",team=""}}' in metrics


def test_streams_are_priced_and_the_usage_chunk_stays_with_clients_that_asked(server: Server) -> None:
    key_id, token = server.key(name="streamer", limits={"daily_usd": 5})  # a dollar budget: its streams are priced
    client = server.client(token)
    chunks = list(client.chat.completions.create(model=PRICEY, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=10, stream=True))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices
    assert server.fake.last.body["stream_options"] == {"include_usage": True}
    asked = list(client.chat.completions.create(model=PRICEY, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert asked[-1].usage is not None and asked[-1].usage.completion_tokens == 7
    spend = server.admin.get("/v1/scillm/spend", params={"key": key_id}).json()
    assert spend["calls"] == 2 and spend["cost_usd"] == pytest.approx(2 * CALL_USD)
    # each stream's cost is on its call-log row and in the dashboard, as a non-streamed call's is
    for path in ("/v1/scillm/calls", "/v1/scillm/ui/calls"):
        rows = server.as_key(token).get(path).json()["data"]
        assert [(row["stream"], row["cost_usd"]) for row in rows] == [(True, pytest.approx(CALL_USD))] * 2, path


def test_embeddings_are_priced_and_refused_past_a_budget_like_chat(server: Server) -> None:
    key_id, token = server.key(name="embedder", limits={"daily_usd": 0.008})
    client = server.client(token)
    raw = client.embeddings.with_raw_response.create(model="openai/embed-pricey", input=["hello world", "a b c"])
    assert raw.parse().usage.prompt_tokens == 5  # the fake counts words
    assert float(raw.headers["x-scillm-cost-usd"]) == pytest.approx(5 * 1000 / 1e6)
    before = len(server.fake.requests)
    with pytest.raises(openai.RateLimitError) as refused:  # $0.005 spent, the next reserves $0.006 of $0.008
        client.embeddings.create(model="openai/embed-pricey", input=["hello world", "a b c"])
    assert refused.value.body["code"] == "budget_exceeded" and len(server.fake.requests) == before  # type: ignore
    spend = server.admin.get("/v1/scillm/spend", params={"key": key_id, "group_by": "model"}).json()
    assert spend["groups"][0]["model"] == "openai/embed-pricey" and spend["groups"][0]["tokens"]["input"] == 5


def test_an_unknown_price_is_null_never_a_guess(server: Server) -> None:
    key_id, token = server.key(name="unpriced")
    raw = hi(server.client(token), "openai/brand-new-model")
    assert "x-scillm-cost-usd" not in raw.headers
    row = server.as_key(token).get("/v1/scillm/calls").json()["data"][-1]
    assert row["model"] == "openai/brand-new-model" and row["cost_usd"] is None
    spend = server.admin.get("/v1/scillm/spend", params={"key": key_id}).json()
    assert spend["unpriced_calls"] == 1 and spend["cost_usd"] == 0
    _, budgeted = server.key(name="budgeted", limits={"daily_usd": 1})
    before = server.fake.calls("brand-new-model")
    with pytest.raises(openai.PermissionDeniedError) as refused:
        hi(server.client(budgeted), "openai/brand-new-model")
    assert refused.value.body["code"] == "price_unknown"  # type: ignore[index]
    assert 'pricing."openai/brand-new-model"' in refused.value.message
    assert server.fake.calls("brand-new-model") == before


def test_doctor_warns_about_unpriced_models_and_keys_near_their_budget(server: Server,
                                                                      tmp_path: Path) -> None:
    _, token = server.key(name="doctor-me", limits={"daily_usd": 0.001})
    hi(server.client(token), max_tokens=8)  # reserves $0.00089, costs $0.00081: 81% of the budget
    runtime = server.runtime
    checks = {c["check"]: c for c in asyncio.run_coroutine_threadsafe(
        runtime.hooks.doctor_checks(runtime), server.thread.loop).result(30)}  # type: ignore[arg-type]
    assert checks["pricing openai"]["ok"] is True
    assert checks["budgets"]["ok"] is False and "doctor-me" in checks["budgets"]["detail"]
    glm = make_app(env={"GLM_API_KEY": "sk-glm-SECRET-1234567"}, data_dir=tmp_path,
                   only=["budgets", "keys", "metrics", "openai-compat"])
    rows = {c["check"]: c for c in asyncio.run(glm.runtime.hooks.doctor_checks(glm.runtime))}
    assert rows["pricing glm"]["ok"] is False and "glm/glm-5.1" in rows["pricing glm"]["detail"]
    assert "glm/glm-4.6" not in rows["pricing glm"]["detail"]


def test_budget_endpoint_for_the_master_key_and_a_key(server: Server) -> None:
    master = server.admin.get("/v1/budget").json()
    assert master["key"] == {"key_id": None, "name": "master", "team": None} and master["limit"] is None
    _, token = server.key(name="reader", limits={"daily_usd": 1, "monthly_usd": 0.5, "rpm": 100})
    hi(server.client(token))
    mine = budget(server, token)
    assert mine["limit"] == 0.5 and mine["spent"] == pytest.approx(CALL_USD)  # the tightest budget on top
    assert {(b["window"], b["limit_usd"]) for b in mine["budgets"]} == {("daily", 1), ("monthly", 0.5)}
    assert mine["rate_limits"]["key"]["rpm"]["limit"] == 100 and mine["remaining"] == pytest.approx(0.5 - CALL_USD)


# -- batches and runs ---------------------------------------------------------------------------------------------

def test_a_batch_with_max_cost_usd_stops_at_its_ceiling_and_says_which_items_were_not_run(server: Server) -> None:
    ceiling = 0.005
    before = server.fake.calls("pricey")
    body = {"model": PRICEY, "batch_id": "capped-batch", "max_cost_usd": ceiling, "concurrency": 4,
            "max_tokens": 10, "items": [{"item_id": f"i{i}", "prompt": "hi"} for i in range(20)]}
    done = server.admin.post("/v1/scillm/batch/completions", json=body).json()
    results = {r["item_id"]: r for r in done["results"]}
    ran = [r for r in results.values() if r["ok"]]
    not_run = [r for r in results.values() if r.get("not_run")]
    assert len(results) == 20 and len(ran) + len(not_run) == 20  # every item has its result, nothing dropped
    assert server.fake.calls("pricey") - before == len(ran)
    assert all(r["error_code"] == "budget_exceeded" and r["status_code"] == 429 and
               r["error"].startswith("not run: budget exceeded: batch 'capped-batch'") for r in not_run)
    assert done["not_run"] == len(not_run) > 0 and done["cost_usd"] == pytest.approx(len(ran) * CALL_USD)
    assert ceiling - RESERVE_USD <= done["cost_usd"] <= ceiling
    assert all(r["cost_usd"] == pytest.approx(CALL_USD) for r in ran)
    spend = server.admin.get("/v1/scillm/spend", params={"batch": "capped-batch"}).json()
    assert spend["calls"] == len(ran)


def test_a_revoked_keys_batch_items_are_reported_as_not_run(server: Server) -> None:
    """The key that submitted a batch is revoked while its third item is at the upstream: that item finishes, no
    later item reaches the provider, and each of them has a result saying it was not run and why."""
    key_id, token = server.key(name="revoked-mid-batch")
    marker = "REVOKE-MID-BATCH"
    seen: list[int] = []

    def revoke_at_the_third(request: Any) -> None:
        if marker in json.dumps(request.body):
            seen.append(1)
            if len(seen) == 3:
                assert server.admin.delete(f"/v1/scillm/keys/{key_id}").status_code == 200
        return None  # the fake's usual answer

    server.fake.responder = revoke_at_the_third
    try:
        body = {"model": PRICEY, "batch_id": "revoked-batch", "concurrency": 1, "max_tokens": 10,
                "items": [{"item_id": f"r{i}", "prompt": f"{marker} {i}"} for i in range(10)]}
        response = server.as_key(token).post("/v1/scillm/batch/completions", json=body)
    finally:
        server.fake.responder = None
    assert response.status_code == 200, response.text
    done = response.json()
    results = {r["item_id"]: r for r in done["results"]}
    assert len(seen) == 3 and [i for i in sorted(results) if results[i]["ok"]] == ["r0", "r1", "r2"]
    not_run = [results[f"r{i}"] for i in range(3, 10)]
    assert all(r["not_run"] and r["status_code"] == 401 and r["error"] == "not run: this API key was revoked"
               for r in not_run), not_run
    assert done["not_run"] == 7
    assert server.admin.get("/v1/scillm/spend", params={"batch": "revoked-batch"}).json()["calls"] == 3


def test_an_exec_runs_model_calls_are_charged_to_the_key_that_started_it(server: Server) -> None:
    key_id, token = server.key(name="agent-owner", limits={"daily_usd": 1})
    master_before = server.admin.get("/v1/scillm/spend", params={"key": "master"}).json()["calls"]
    prompt = json.dumps({"mode": "call", "model": PRICEY})
    run = server.as_key(token).post("/v1/scillm/exec", json={"profile": "claude-print", "prompt": prompt,
                                                             "cwd": str(server.root), "wait": True}).json()
    assert run["status"] == "completed", run
    assert run["owner"] == key_id and run["cost_usd"] == pytest.approx(CALL_USD)
    local = server.as_key(token).post("/v1/scillm/exec", json={"profile": "llm-call", "prompt": "hi",
                                                               "cwd": str(server.root), "wait": True}).json()
    assert local["status"] == "completed" and local["cost_usd"] is not None and local["cost_usd"] > 0
    spend = server.admin.get("/v1/scillm/spend", params={"run": run["run_id"]}).json()
    assert spend["calls"] == 1 and spend["groups"][0]["key"] == key_id
    assert budget(server, token)["spent"] == pytest.approx(CALL_USD + local["cost_usd"])
    assert server.admin.get("/v1/scillm/spend", params={"key": "master"}).json()["calls"] == master_before
    assert server.admin.get("/v1/budget").json()["spent_today_usd"] is None  # the master key's is in the ledger


def test_a_run_past_its_max_cost_usd_is_stopped_before_its_call(server: Server) -> None:
    before = server.fake.calls("pricey")
    run = server.admin.post("/v1/scillm/exec", json={"profile": "llm-call", "prompt": "hi", "max_cost_usd": 0.0001,
                                                     "cwd": str(server.root), "wait": True}).json()
    assert run["status"] == "failed" and "max_cost_usd" in run["error"] and run["cost_usd"] == 0
    assert server.fake.calls("pricey") == before


# -- hostile spend queries ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("params", "param"), [
    ({"group_by": "owner'; DROP TABLE logs;--"}, "group_by"),
    ({"since": "yesterday"}, "since"),
    ({"since": "2026-01-01T00:00:00"}, "since"),
    ({"window": "1y"}, "window"),
    ({"window": "99999999d"}, "window"),
    ({"window": "1h", "since": "0"}, "window"),
    ({"model": "x" * 201}, "model"),
    ({"owner": "master"}, "owner"),
    ({"'; DROP TABLE logs;--": "1"}, "'; DROP TABLE logs;--"),
])
def test_bad_spend_queries_are_400_naming_the_parameter(server: Server, params: dict[str, str], param: str) -> None:
    response = server.admin.get("/v1/scillm/spend", params=params)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_sql_shaped_filters_match_nothing_and_keys_see_only_their_own_spend(server: Server) -> None:
    a_id, a = server.key(name="ledger-a")
    b_id, b = server.key(name="ledger-b")
    hi(server.client(a))
    for value in ("' OR '1'='1", "x'); DELETE FROM logs;--", "%", "*"):
        response = server.admin.get("/v1/scillm/spend", params={"model": value})
        assert response.status_code == 200 and response.json()["calls"] == 0
    mine = server.as_key(a).get("/v1/scillm/spend", params={"group_by": "key", "window": "30d"}).json()
    assert [g["key"] for g in mine["groups"]] == [a_id]
    theirs = server.as_key(b).get("/v1/scillm/spend", params={"key": a_id}).json()
    assert theirs["calls"] == 0 and theirs["groups"] == []  # another key's spend: as if there were none
    everyone = server.admin.get("/v1/scillm/spend", params={"group_by": "key"}).json()
    assert a_id in {g["key"] for g in everyone["groups"]} and b_id not in {g["key"] for g in everyone["groups"]}


def test_a_hostile_caller_is_stored_as_text_bounded_and_found_literally(server: Server) -> None:
    _, token = server.key(name="hostile-caller")
    client = server.client(token)
    for caller in ("x'); DELETE FROM logs;--", "y" * 5000):
        hi(client, extra_headers={"x-caller-skill": caller})
    spend = server.as_key(token).get("/v1/scillm/spend", params={"group_by": "caller"}).json()
    assert sorted(g["caller"] for g in spend["groups"]) == ["x'); DELETE FROM logs;--", "y" * 200]
    found = server.as_key(token).get("/v1/scillm/spend", params={"caller": "x'); DELETE FROM logs;--"}).json()
    assert found["calls"] == 1


def test_a_store_that_cannot_count_fails_closed_with_503(server: Server) -> None:
    import sqlite3

    from scillm_budgets import state_of

    _, token = server.key(name="store-down", limits={"daily_usd": 1})
    hi(server.client(token))
    state = state_of(server.runtime)
    assert state is not None
    leases = state.leases
    deadline = time.monotonic() + 10
    while leases.free and time.monotonic() < deadline:  # room this process took ahead goes back after its linger;
        time.sleep(0.02)                                  # from then on every call must be counted in the store
    assert not leases.free
    store = server.runtime.store
    original = store.count
    broken: set[str] = set()

    async def count(namespace: str, groups: Any) -> Any:
        if namespace in broken:
            raise sqlite3.OperationalError("database is locked")
        return await original(namespace, groups)

    def peek(namespace: str, key: str) -> float | None:  # a busy reader: the read goes to count(), which fails
        return None if namespace in broken else original_peek(namespace, key)

    original_peek = store.peek
    store.count = count
    store.peek = peek
    before = server.fake.calls("pricey")
    errors_before = server.admin.get("/v1/scillm/health").json()["middleware"]["budgets"]["counter_errors"]
    try:
        for namespace in ("budgets", "keys"):
            broken.add(namespace)
            response = server.as_key(token).post("/v1/chat/completions", json={
                "model": PRICEY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10})
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "state_store_unavailable"
            broken.clear()
    finally:
        store.count = original
        store.peek = original_peek
    assert server.fake.calls("pricey") == before
    health = server.admin.get("/v1/scillm/health").json()["middleware"]["budgets"]
    assert health["counter_errors"] > errors_before  # the failed round trips are counted where operators look
    hi(server.client(token))


def test_the_sdk_does_not_retry_a_refusal_that_waiting_cannot_lift(server: Server) -> None:
    """The openai SDK retries a 429 twice by default unless told not to: a spent budget (resets in hours) and a call
    larger than the budget are refused once, not three times; a refusal that lifts within a minute is still retried."""
    def refusals() -> int:
        return int(server.admin.get("/v1/scillm/health").json()["middleware"]["budgets"]["refused"])

    state = server.runtime.plugin_state["budgets"]
    state.clock = lambda: 1_800_000_030.0  # pinned: 08:00:30 UTC, hours before the day ends
    try:
        _, too_small = server.key(name="never-fits", limits={"daily_usd": 0.0001})
        _, daily = server.key(name="spends-today", limits={"daily_usd": 0.002})
        hi(server.client(daily))  # $0.00081 each; a third call's reservation no longer fits today
        hi(server.client(daily))
        for token in (too_small, daily):
            before = refusals()
            with pytest.raises(openai.RateLimitError) as refused:
                hi(server.client(token, max_retries=2))
            assert refused.value.response.headers["x-should-retry"] == "false"
            assert refusals() - before == 1
        _, per_minute = server.key(name="rpm-1", limits={"rpm": 1})
        hi(server.client(per_minute))
        with pytest.raises(openai.RateLimitError) as refused:
            hi(server.client(per_minute))  # 30 s to the next minute: the SDK may wait it out
        assert refused.value.response.headers["retry-after"] == "30"
        assert "x-should-retry" not in refused.value.response.headers
    finally:
        state.clock = __import__("time").time


def test_health_reports_the_budget_backend(server: Server) -> None:
    _, token = server.key(name="too-small", limits={"daily_usd": 0.0001})  # less than one call's reservation
    with pytest.raises(openai.RateLimitError) as refused:
        hi(server.client(token))
    assert "retry-after" not in refused.value.response.headers  # waiting will not make it fit
    health = server.admin.get("/v1/scillm/health").json()["middleware"]["budgets"]
    assert health["enabled"] is True and health["fails"] == "closed" and health["backend"] == "sqlite"
    assert health["teams"] == ["ml"] and health["refused"] > 0 and health["admitted"] > 0
