"""Batch: every item exactly once, 429s absorbed by lane shifting, durable resume, validation."""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any

import httpx
import orjson
import pytest

from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, make_app

AUTH = {"authorization": f"Bearer {DEV_KEY}"}
PLUGINS = ("chat", "auth", "ops", "openai-compat", "batch")  # the batch engine's own behaviour, no middleware


class RateLimitedFor(FakeOpenAI):
    """Answers 429 (retry-after-ms) to its first ``limit`` requests, fails items whose prompt says POISON.

    ``recovered`` is set once it has served a success. With ``hold_after`` and ``gate``, requests past the first
    ``hold_after`` wait for ``gate`` before answering: the test orders events instead of racing the clock.
    """

    def __init__(self, limit: int, delay_s: float, *, hold_after: int | None = None,
                 gate: threading.Event | None = None) -> None:
        super().__init__()
        self.limit, self.delay_s = limit, delay_s
        self.hold_after, self.gate = hold_after, gate
        self.recovered = threading.Event()
        self.counter = 0
        self.lock = threading.Lock()

    def responder(self, request):  # type: ignore[override]
        if "POISON" in str(request.body):
            return Reply.fail(400, "this input is rejected by the model", code="invalid_prompt")
        with self.lock:
            self.counter += 1
            limited = self.counter <= self.limit
        if limited:
            return Reply.fail(429, "Rate limit reached", code="rate_limit_exceeded",
                              headers={"retry-after-ms": "150"})
        self.recovered.set()
        return Reply.say("fine", delay_s=self.delay_s)

    async def pause(self, reply: Reply) -> None:
        await super().pause(reply)
        if self.gate is not None and self.hold_after is not None and self.counter > self.hold_after:
            for _ in range(6000):  # up to a minute; the gate opens as soon as the other lane serves again
                if self.gate.is_set():
                    break
                await asyncio.sleep(0.01)


@pytest.fixture
def two_lanes(tmp_path):
    # steady serves 200 items, then holds its answers until flaky serves again: whatever the machine's speed,
    # items are left for flaky once its 429s stop
    with RateLimitedFor(limit=40, delay_s=0.01) as flaky, \
            RateLimitedFor(limit=0, delay_s=0.01, hold_after=200, gate=flaky.recovered) as steady:
        env = {"DEEPSEEK_API_KEY": "k1", "DEEPSEEK_API_BASE": flaky.base_url,
               "GLM_API_KEY": "k2", "GLM_API_BASE": steady.base_url}
        config = {"pools": {"mixed": {"lanes": [
            {"name": "flaky", "model": "deepseek/deepseek-chat", "weight": 1, "max_concurrency": 16},
            {"name": "steady", "model": "glm/glm-5.1", "weight": 1, "max_concurrency": 16}]}}}
        with ServerThread(make_app(env=env, config=config, data_dir=tmp_path, only=PLUGINS)) as server:
            yield server, flaky, steady


def test_500_items_two_lanes_429s_absorbed_every_item_exactly_once(two_lanes):
    server, flaky, steady = two_lanes
    items = [{"item_id": f"q{i}", "prompt": f"question {i}"} for i in range(499)]
    items.append({"item_id": "poison", "prompt": "POISON pill"})
    response = httpx.post(server.url + "/v1/scillm/batch/completions", headers=AUTH, timeout=120,
                          json={"model_pool": "mixed", "batch_id": "five-hundred", "items": items,
                                "temperature": 0.2, "scillm_metadata": {"run": "t"}})
    assert response.status_code == 200, response.text
    body = response.json()
    ids = [r["item_id"] for r in body["results"]]
    assert sorted(ids) == sorted(i["item_id"] for i in items) and len(ids) == 500  # exactly once each
    assert body["total"] == 500 and body["completed"] == 499 and body["failed"] == 1
    assert body["completed"] + body["failed"] == body["total"]
    poison = next(r for r in body["results"] if r["item_id"] == "poison")
    assert poison["ok"] is False and "rejected by the model" in poison["error"] and poison["status_code"] == 400
    lanes = body["lanes"]
    assert lanes["flaky"]["rate_limited"] > 0
    assert lanes["steady"]["served"] > lanes["flaky"]["served"]  # work shifted while the 429s lasted
    assert lanes["flaky"]["served"] > 0  # and came back once they stopped
    ok = next(r for r in body["results"] if r["ok"])
    assert ok["content"] == "fine" and ok["provider"] in ("deepseek", "glm") and ok["latency_s"] >= 0
    sent = (flaky.requests + steady.requests)[-1].body
    assert sent["temperature"] == 0.2 and "scillm_metadata" not in sent  # shared params go to every item


def test_streaming_form_sends_events_in_completion_order(two_lanes):
    server, _, _ = two_lanes
    items = [{"item_id": f"s{i}", "messages": [{"role": "user", "content": f"m{i}"}]} for i in range(5)]
    with httpx.stream("POST", server.url + "/v1/scillm/batch/completions/stream", headers=AUTH, timeout=60,
                      json={"model": "glm/glm-5.1", "items": items}) as response:
        text = response.read().decode()
    events = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("event: ")]
    assert events[0] == "batch_started" and events[-1] == "batch_done"
    assert collections.Counter(events)["item_completed"] == 5


def expiry(tmp_path):
    """The batch's event log's expiry in the embedded store (None: kept)."""
    import sqlite3

    with sqlite3.connect(tmp_path / "scillm.sqlite3") as db:
        row = db.execute("SELECT expires FROM log_expiry WHERE ns = 'batch-events:resume-me'").fetchone()
    return row[0] if row else None


def test_resubmitting_returns_stored_successes_and_reruns_only_failures(tmp_path):
    import time

    seen_while_running = []

    def answer(request):
        if "flaky-once" in str(request.body) and not fake.flag:
            return Reply.fail(503, "busy")
        if fake.flag:
            seen_while_running.append(expiry(tmp_path))
        return None

    with FakeOpenAI() as fake:
        fake.responder = answer
        fake.flag = False
        env = {"DEEPSEEK_API_KEY": "k", "DEEPSEEK_API_BASE": fake.base_url}
        with ServerThread(make_app(env=env, data_dir=tmp_path, only=PLUGINS)) as server:
            items = [{"item_id": "a", "prompt": "one"}, {"item_id": "b", "prompt": "flaky-once"}]
            body = {"model": "deepseek/deepseek-chat", "batch_id": "resume-me", "items": items, "timeout": 3}
            first = httpx.post(server.url + "/v1/scillm/batch/completions", json=body, headers=AUTH, timeout=30)
            assert first.json()["completed"] == 1 and first.json()["failed"] == 1
            # retention: the finished run's event log goes [state] finished_logs_days (7) after it ended
            assert time.time() + 7 * 86400 - 60 < expiry(tmp_path) <= time.time() + 7 * 86400
            calls = len(fake.requests)
            fake.flag = True
            second = httpx.post(server.url + "/v1/scillm/batch/completions", json=body, headers=AUTH, timeout=30)
            assert second.json()["completed"] == 2 and second.json()["failed"] == 0
            assert len(fake.requests) == calls + 1  # only the failed item went upstream again
            assert seen_while_running == [None]  # running again: its log was kept, and expires again after
            assert time.time() + 7 * 86400 - 60 < expiry(tmp_path) <= time.time() + 7 * 86400
            reused = next(r for r in second.json()["results"] if r["item_id"] == "a")
            assert reused["resumed"] is True
            progress = httpx.get(server.url + "/v1/scillm/batch/resume-me", headers=AUTH).json()
            assert progress["done"] is True and progress["completed"] == 2 and progress["pending"] == 0
            changed = httpx.post(server.url + "/v1/scillm/batch/completions", headers=AUTH, timeout=30,
                                 json={**body, "items": [{"item_id": "a", "prompt": "something else"}]})
            assert changed.status_code == 409


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "deepseek/deepseek-chat", "items": []}, "$.items"),
    ({"model": "deepseek/deepseek-chat", "items": "x"}, "$.items"),
    ({"model": "deepseek/deepseek-chat", "items": [1]}, "$.items[0]"),
    ({"model": "deepseek/deepseek-chat", "items": [{"item_id": "a", "prompt": "x"}, {"item_id": "a", "prompt": "y"}]},
     "$.items[1].item_id"),
    ({"model_pool": "nope", "items": [{"prompt": "x"}]}, "$.model_pool"),
    ({"items": [{"prompt": "x"}]}, "$.model_pool"),
    ({"model": "deepseek/deepseek-chat", "items": [{"prompt": "x"}], "concurrency": 0}, "$.concurrency"),
    # scillm's own item fields are checked at submission, naming the item
    ({"model": "deepseek/deepseek-chat", "items": [{"prompt": "x"}, {"prompt": "y", "timeout": "5"}]},
     "$.items[1].timeout"),
    ({"model": "deepseek/deepseek-chat", "items": [{"prompt": "x", "timeout": -1}]}, "$.items[0].timeout"),
    ({"model": "deepseek/deepseek-chat", "items": [{"prompt": "x", "scillm_metadata": [1]}]},
     "$.items[0].scillm_metadata"),
    ({"model": "deepseek/deepseek-chat", "items": [{"prompt": "x"}], "timeout": "5"}, "$.timeout"),
    # ids name stored records and appear in URLs: a clear charset, bounded, no "/"
    ({"model": "deepseek/deepseek-chat", "batch_id": "a/b", "items": [{"prompt": "x"}]}, "$.batch_id"),
    ({"model": "deepseek/deepseek-chat", "batch_id": "x'; DROP TABLE docs; --", "items": [{"prompt": "x"}]},
     "$.batch_id"),
    ({"model": "deepseek/deepseek-chat", "batch_id": "b" * 129, "items": [{"prompt": "x"}]}, "$.batch_id"),
    ({"model": "deepseek/deepseek-chat", "items": [{"item_id": "../x", "prompt": "x"}]}, "$.items[0].item_id"),
    ({"model": "deepseek/deepseek-chat", "items": [{"id": "", "prompt": "x"}]}, "$.items[0].id"),
    # wrong types were 500s (a dict is not hashable, a number has no length)
    ({"model_pool": {"a": 1}, "items": [{"prompt": "x"}]}, "$.model_pool"),
    ({"model_pool": ["a"], "items": [{"prompt": "x"}]}, "$.model_pool"),
    ({"model": 5, "items": [{"prompt": "x"}]}, "$.model"),
    ({"model": ["deepseek/deepseek-chat"], "items": [{"prompt": "x"}]}, "$.model"),
])
def test_bad_batches_are_400_naming_the_path(tmp_path, body, param):
    with ServerThread(make_app(env={"DEEPSEEK_API_KEY": "k"}, data_dir=tmp_path, only=PLUGINS)) as server:
        response = httpx.post(server.url + "/v1/scillm/batch/completions", json=body, headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_unknown_batch_is_404(tmp_path):
    with ServerThread(make_app(data_dir=tmp_path, only=PLUGINS)) as server:
        assert httpx.get(server.url + "/v1/scillm/batch/nothing", headers=AUTH).status_code == 404


def sse_events(server, path: str, **params: str) -> httpx.Response:
    with httpx.stream("GET", server.url + path, params=params, headers=AUTH, timeout=30) as response:
        response.read()
    return response


def test_a_resume_cursor_the_store_never_gave_out_is_a_400_not_a_cut_stream(tmp_path):
    with FakeOpenAI() as fake:
        env = {"DEEPSEEK_API_KEY": "k", "DEEPSEEK_API_BASE": fake.base_url}
        with ServerThread(make_app(env=env, data_dir=tmp_path, only=PLUGINS)) as server:
            body = {"model": "deepseek/deepseek-chat", "batch_id": "cursors", "items": [{"prompt": "x"}] * 2}
            assert httpx.post(server.url + "/v1/scillm/batch/completions", json=body, headers=AUTH,
                              timeout=30).status_code == 200
            for after in ("abc", "99999999999999999999999", "../x", "²", "-5", "1e400", "7" * 10_000):
                bad = sse_events(server, "/v1/scillm/batch/cursors/events", after=after)
                assert bad.status_code == 400, (after[:30], bad.text[:300])
                assert bad.json()["error"]["param"] == "query.after"
            whole = sse_events(server, "/v1/scillm/batch/cursors/events").text  # a good cursor still resumes
            cursor = orjson.loads(whole.split("data: ", 1)[1].split("\n", 1)[0])["cursor"]
            resumed = sse_events(server, "/v1/scillm/batch/cursors/events", after=cursor).text
    assert whole.count("event: item_completed") == 2 and resumed.count("event: item_completed") == 1
    assert resumed.rstrip().splitlines()[-2] == "event: batch_done"


def test_store_keys_are_parameters_not_query_text(tmp_path):
    """A hostile key is stored and found as data (the store binds parameters)."""
    import asyncio

    from scillm_core.state.sqlite import SQLiteStore

    async def roundtrip():
        store = SQLiteStore(tmp_path / "s.sqlite3")
        hostile = "x'; DROP TABLE docs; --"
        await store.put("batch-items:" + hostile, "1' OR '1'='1", {"ok": True})
        found = await store.scan("batch-items:" + hostile)
        await store.close()
        return found

    assert asyncio.run(roundtrip()) == [("1' OR '1'='1", {"ok": True})]


def test_default_body_limit_refuses_a_huge_batch_before_parsing_it(tmp_path):
    with ServerThread(make_app(env={"DEEPSEEK_API_KEY": "k"}, data_dir=tmp_path, only=PLUGINS)) as server:
        item = {"prompt": "x" * 4000}
        body = orjson.dumps({"model": "deepseek/deepseek-chat", "items": [item] * 8500})  # ~34 MB
        response = httpx.post(server.url + "/v1/scillm/batch/completions", content=body, timeout=60,
                              headers={**AUTH, "content-type": "application/json"})
        assert response.status_code == 413, response.text[:200]
        assert response.json()["error"]["code"] == "payload_too_large"
        assert httpx.get(server.url + "/v1/scillm/batch/none", headers=AUTH).status_code == 404  # still serving


def test_item_ids_are_kept_as_given_including_zero(tmp_path):
    with FakeOpenAI() as fake:
        env = {"DEEPSEEK_API_KEY": "k", "DEEPSEEK_API_BASE": fake.base_url}
        with ServerThread(make_app(env=env, data_dir=tmp_path, only=PLUGINS)) as server:
            items = [{"prompt": "a"}, {"item_id": 0, "prompt": "b"}, {"id": "q-7", "prompt": "c"}]
            body = httpx.post(server.url + "/v1/scillm/batch/completions", headers=AUTH, timeout=30,
                              json={"model": "deepseek/deepseek-chat", "items": items}).json()
    assert sorted(r["item_id"] for r in body["results"]) == ["0", "item-0", "q-7"]


def deep(levels: int) -> dict:
    value: dict = {"bottom": True}
    for _ in range(levels):
        value = {"a": value}
    return value


def test_an_answer_nested_300_deep_is_stored_as_a_failure_not_lost(tmp_path):
    import json

    with FakeOpenAI() as fake:
        answer = fake.completion(Reply.say("fine"), "chatcmpl-deep", "deepseek-chat")
        answer["choices"][0]["message"]["detail"] = deep(300)
        fake.responder = lambda r: Reply(raw=json.dumps(answer).encode()) if "DEEP" in str(r.body) else None
        env = {"DEEPSEEK_API_KEY": "k", "DEEPSEEK_API_BASE": fake.base_url}
        with ServerThread(make_app(env=env, data_dir=tmp_path, only=PLUGINS)) as server:
            body = {"model": "deepseek/deepseek-chat", "batch_id": "deep-one",
                    "items": [{"item_id": "ok", "prompt": "x"}, {"item_id": "deep", "prompt": "DEEP"}]}
            response = httpx.post(server.url + "/v1/scillm/batch/completions", json=body, headers=AUTH, timeout=60)
            assert response.status_code == 200, response.text
            assert response.json()["completed"] == 1 and response.json()["failed"] == 1
            stored = httpx.get(server.url + "/v1/scillm/batch/deep-one", headers=AUTH).json()
    assert stored["done"] is True and stored["pending"] == 0
    failed = next(r for r in stored["results"] if r["item_id"] == "deep")
    assert failed["ok"] is False and "nested deeper" in failed["error"]


def test_batch_schemas_go_through_the_schema_gate_before_any_call(tmp_path):
    from scillm_core.testing import SilentListener

    with FakeOpenAI() as fake, SilentListener() as listener:
        env = {"DEEPSEEK_API_KEY": "k", "DEEPSEEK_API_BASE": fake.base_url}
        with ServerThread(make_app(env=env, data_dir=tmp_path, only=(*PLUGINS, "json"))) as server:
            remote = {"properties": {"a": {"$ref": listener.url + "/x"}}}
            for body, param in (
                    ({"items": [{"prompt": "x"}, {"prompt": "y", "json_schema": remote}]},
                     "$.items[1].json_schema.properties.a.$ref"),
                    ({"items": [{"prompt": "x"}], "json_schema": {"$ref": "#"}}, "$.json_schema")):
                response = httpx.post(server.url + "/v1/scillm/batch/completions", headers=AUTH, timeout=30,
                                      json={"model": "deepseek/deepseek-chat", **body})
                assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
            assert fake.requests == [] and listener.connections == 0
            fake.script(Reply.say('{"n": "not a number"}'), Reply.say('{"n": 3}'))
            schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
            done = httpx.post(server.url + "/v1/scillm/batch/completions", headers=AUTH, timeout=30, json={
                "model": "deepseek/deepseek-chat", "items": [{"prompt": "x", "json_schema": schema}]}).json()
    assert done["completed"] == 1 and done["results"][0]["content"] == '{"n": 3}'  # the item's schema applied
    assert "json_schema" not in fake.requests[0].body  # scillm's own field, never sent upstream


def test_a_streaming_client_that_leaves_cancels_the_run(tmp_path):
    """The SSE form runs the batch for its caller: when the client goes away the response's disconnect watcher
    closes the stream, the run is marked cancelled, and this process starts none of its queued items (other
    processes let them go within a second: ``CANCEL_CHECK_S``)."""
    import sqlite3
    import time

    with FakeOpenAI() as fake:
        fake.default = Reply.say("slow", delay_s=0.3)
        env = {"DEEPSEEK_API_KEY": "k", "DEEPSEEK_API_BASE": fake.base_url}
        with ServerThread(make_app(env=env, data_dir=tmp_path, only=PLUGINS)) as server:
            body = {"model": "deepseek/deepseek-chat", "batch_id": "left", "concurrency": 2, "stream": True,
                    "items": [{"item_id": f"i{n}", "prompt": f"item {n}"} for n in range(40)]}
            with httpx.stream("POST", server.url + "/v1/scillm/batch/completions", json=body, headers=AUTH,
                              timeout=30) as response:
                for line in response.iter_lines():
                    if line.startswith("event: item_completed"):
                        break  # and the client leaves

            def cancelled_run():
                with sqlite3.connect(tmp_path / "scillm.sqlite3") as db:
                    row = db.execute("SELECT value FROM docs WHERE ns = 'batches' AND key = 'left'").fetchone()
                return orjson.loads(row[0]).get("cancelled_run", 0)

            deadline = time.monotonic() + 30
            while cancelled_run() != 1:
                assert time.monotonic() < deadline, "the run was not cancelled when its client left"
                time.sleep(0.05)
            sent = len(fake.requests)
            time.sleep(1.5)  # five items' time at concurrency 2: before, queued items kept starting for ~7.5 s
            assert len(fake.requests) <= sent + 2  # at most what was being started as the cancel landed
            assert len(fake.requests) < 40


class Held(FakeOpenAI):
    """Answers nothing until ``gate`` opens."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    async def pause(self, reply: Reply) -> None:
        await super().pause(reply)
        while not self.gate.is_set():
            await asyncio.sleep(0.01)


def prompts(batch: str, n: int) -> list[dict]:
    return [{"item_id": f"{batch}{i}", "messages": [{"role": "user", "content": f"{batch} {i}"}]} for i in range(n)]


async def depth(store: Any, **wanted: int) -> None:
    """Wait until the batch work queue has ``wanted`` (waiting, claimed) entries."""
    for _ in range(3000):
        found = await store.queue_depth("batch-work")
        if all(found[k] == v for k, v in wanted.items()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the work queue never reached {wanted}: {found}")


def test_a_small_batch_is_not_held_up_by_a_big_one_submitted_before_it(tmp_path):
    """The worker holds 4 items at a time. 40 items of a big batch wait behind 4 held ones when a 2-item batch
    arrives; the small batch's items go upstream within the next two rounds of takes (batches take turns in the
    work queue), not after the big batch's 40."""
    from scillm_core.state.sqlite import SQLiteStore

    gate = threading.Event()

    with Held(gate) as fake:
        env = {"OPENAI_API_KEY": "k", "OPENAI_API_BASE": fake.base_url}
        app = make_app(env=env, config={"batch": {"worker_capacity": 4}}, data_dir=tmp_path, only=PLUGINS)
        with ServerThread(app) as server:
            async def run() -> tuple[httpx.Response, httpx.Response]:
                store = SQLiteStore(next(tmp_path.rglob("*.sqlite3")))
                async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as http:
                    big = asyncio.ensure_future(http.post("/v1/scillm/batch/completions", json={
                        "model": "openai/gpt-a", "batch_id": "big", "concurrency": 4, "items": prompts("big", 40)}))
                    await depth(store, waiting=36, claimed=4)
                    small = asyncio.ensure_future(http.post("/v1/scillm/batch/completions", json={
                        "model": "openai/gpt-a", "batch_id": "small", "items": prompts("small", 2)}))
                    await depth(store, waiting=38)
                    gate.set()
                    answers = await big, await small
                await store.close()
                return answers

            big, small = asyncio.run(run())
    assert big.json()["completed"] == 40 and small.json()["completed"] == 2
    order = [r.body["messages"][0]["content"].split()[0] for r in fake.requests]
    assert len(order) == 42 and order.index("small") <= 8 and order.count("small") == 2, order
    assert max(i for i, name in enumerate(order) if name == "small") <= 9, order


def test_a_key_with_many_batches_gets_one_turn_per_round_not_one_per_batch(tmp_path):
    """Key a's three 12-item batches hold the worker's 4 slots and wait behind them when key b's 2-item batch
    arrives: b's items go upstream in the next round of takes, alternating with a's (keys take turns, then each
    key's batches), not once per round over a's three batches and b's one."""
    from scillm_core.state.sqlite import SQLiteStore

    gate = threading.Event()
    master = "sk-master-batch-turns-0123456789"

    with Held(gate) as fake:
        env = {"OPENAI_API_KEY": "k", "OPENAI_API_BASE": fake.base_url, "SCILLM_MASTER_KEY": master}
        app = make_app(env=env, config={"batch": {"worker_capacity": 4}}, data_dir=tmp_path, only=(*PLUGINS, "keys"))
        with ServerThread(app) as server:
            def key(name: str) -> dict[str, str]:
                made = httpx.post(server.url + "/v1/scillm/keys", json={"name": name}, timeout=30,
                                  headers={"authorization": f"Bearer {master}"})
                assert made.status_code == 201, made.text
                return {"authorization": f"Bearer {made.json()['key']}"}

            a, b = key("a"), key("b")

            async def run() -> list[httpx.Response]:
                store = SQLiteStore(next(tmp_path.rglob("*.sqlite3")))
                async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                    many = [asyncio.ensure_future(http.post("/v1/scillm/batch/completions", headers=a, json={
                        "model": "openai/gpt-a", "batch_id": f"a{n}", "concurrency": 4, "items": prompts(f"a{n}", 12)}))
                        for n in range(3)]
                    await depth(store, waiting=32, claimed=4)
                    one = asyncio.ensure_future(http.post("/v1/scillm/batch/completions", headers=b, json={
                        "model": "openai/gpt-a", "batch_id": "b", "items": prompts("b", 2)}))
                    await depth(store, waiting=34)
                    gate.set()
                    answers = [await done for done in (*many, one)]
                await store.close()
                return answers

            answers = asyncio.run(run())
    assert [r.json()["completed"] for r in answers] == [12, 12, 12, 2]
    order = [r.body["messages"][0]["content"].split()[0] for r in fake.requests]
    assert len(order) == 38 and order.count("b") == 2, order
    assert max(i for i, name in enumerate(order) if name == "b") <= 7, order  # within the round after the 4 held
