"""Exec runs across instances: two scillm apps with their own data dirs on one real Redis. A run started through one
is read, tailed and cancelled through the other; a run whose instance died is reported interrupted."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from scillm_exec_helpers import MASTER_KEY, PROVIDER_SECRET, FakeRunner

from scillm_core.state.redis import RedisStore
from scillm_core.testing import FakeOpenAI, ServerThread, make_app

HEADERS = {"authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": "exec-shared-tests"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, redis_server: Any) -> Iterator[dict[str, Any]]:
    import uuid

    root = tmp_path_factory.mktemp("root")
    state = {"backend": "redis", "redis_url": redis_server.url, "key_prefix": f"exec-shared-{uuid.uuid4().hex[:8]}:"}
    with FakeOpenAI() as fake:
        threads = []
        for name in ("a", "b"):
            app = make_app(env={"OPENAI_API_KEY": PROVIDER_SECRET, "OPENAI_API_BASE": fake.url + "/v1",
                                "SCILLM_MASTER_KEY": MASTER_KEY}, data_dir=tmp_path_factory.mktemp(f"data-{name}"),
                           config={"exec": {"allowed_roots": [str(root)], "kill_grace_s": 0.5, "heartbeat_s": 0.3},
                                   "state": state},
                           plugins=[("fake-runner", FakeRunner())], only=["exec", "agent-runners", "auth"])
            threads.append(ServerThread(app).__enter__())
        try:
            yield {"a": threads[0].url, "b": threads[1].url, "root": root, "state": state}
        finally:
            for thread in threads:
                thread.__exit__(None, None, None)


def sse(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    kind = "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            yield kind, orjson.loads(line[6:])
            kind = "message"


def test_a_run_started_through_one_instance_is_read_tailed_and_cancelled_through_the_other(pair: dict[str, Any]
                                                                                            ) -> None:
    started = httpx.post(pair["a"] + "/v1/scillm/exec", headers=HEADERS, timeout=30, json={
        "profile": "fake", "prompt": '{"mode": "sleep"}', "cwd": str(pair["root"]), "wait": False,
        "sandbox": "workspace-write"})
    assert started.status_code == 202, started.text
    run_id = started.json()["run_id"]

    shown = httpx.get(f"{pair['b']}/v1/scillm/exec/{run_id}", headers=HEADERS, timeout=30)
    assert shown.status_code == 200 and shown.json()["status"] in ("queued", "running"), shown.text

    seen: list[dict[str, Any]] = []
    end: dict[str, Any] | None = None
    with httpx.stream("GET", f"{pair['b']}/v1/scillm/exec/{run_id}/events", headers=HEADERS, timeout=30) as tail:
        assert tail.status_code == 200
        for kind, data in sse(tail):
            if kind == "end":
                end = data
                break
            seen.append(data)
            if sum(1 for e in seen if e.get("type") == "tick") == 2:  # A's CLI is working: cancel it through B
                cancelled = httpx.post(f"{pair['b']}/v1/scillm/exec/{run_id}/cancel", headers=HEADERS, timeout=60)
                assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))  # every event, in order, once
    assert seen[0]["type"] == "process.start" and seen[-1]["type"] == "process.end"
    assert end == {"type": "run.end", "run_id": run_id, "status": "cancelled", "exit_code": None}

    again = httpx.get(f"{pair['a']}/v1/scillm/exec/{run_id}", headers=HEADERS, timeout=30).json()
    assert again["status"] == "cancelled"
    with httpx.stream("GET", f"{pair['b']}/v1/scillm/exec/{run_id}/events?after=2", headers=HEADERS,
                      timeout=30) as tail:
        resumed = list(sse(tail))
    assert [d["seq"] for k, d in resumed if k == "message"] == [e["seq"] for e in seen[2:]]
    assert resumed[-1] == ("end", end)


def test_a_stored_run_whose_instance_died_is_reported_interrupted_from_anywhere(pair: dict[str, Any]) -> None:
    import asyncio

    run_id = "run_" + "d" * 32
    doc = {"run_id": run_id, "status": "running", "profile": "fake", "caller": "exec-shared-tests",
           "created_at": time.time(), "instance": "gone-host-1-abcdef"}

    async def store_it() -> None:
        store = RedisStore(pair["state"]["redis_url"], prefix=pair["state"]["key_prefix"])
        await store.put("exec.runs", run_id, doc)
        await store.close()

    asyncio.run(store_it())
    shown = httpx.get(f"{pair['b']}/v1/scillm/exec/{run_id}", headers=HEADERS, timeout=30).json()
    assert shown["status"] == "failed" and "gone-host-1-abcdef" in shown["error"] and "interrupted" in shown["error"]
    with httpx.stream("GET", f"{pair['a']}/v1/scillm/exec/{run_id}/events", headers=HEADERS, timeout=30) as tail:
        assert list(sse(tail)) == [("end", {"type": "run.end", "run_id": run_id, "status": "failed",
                                            "exit_code": None})]


def test_an_event_too_big_for_the_store_reaches_the_other_instance_as_a_stub_naming_its_size(pair: dict[str, Any]
                                                                                           ) -> None:
    done = httpx.post(pair["a"] + "/v1/scillm/exec", headers=HEADERS, timeout=60, json={
        "profile": "fake", "prompt": '{"mode": "huge", "mb": 2}', "cwd": str(pair["root"]), "wait": True})
    assert done.status_code == 200 and done.json()["status"] == "completed", done.text
    with httpx.stream("GET", f"{pair['b']}/v1/scillm/exec/{done.json()['run_id']}/events", headers=HEADERS,
                      timeout=30) as tail:
        frames = list(sse(tail))
    events = [data for kind, data in frames if kind == "message"]
    blob = next(e for e in events if e["type"] == "blob")
    assert blob["bytes"] > 2 * 1024 * 1024 and "event" not in blob and blob["stored"].startswith("run dir only")
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)) and events[-1]["type"] == "process.end"
    assert frames[-1][0] == "end" and frames[-1][1]["status"] == "completed"


def test_a_finished_runs_event_log_in_the_store_expires_after_the_retention(pair: dict[str, Any]) -> None:
    """Retention: once the run's end record is copied, its stream in Redis expires [state] finished_logs_days
    (7 by default) later; until then it is readable from the other instance."""
    import asyncio

    done = httpx.post(pair["a"] + "/v1/scillm/exec", headers=HEADERS, timeout=60, json={
        "profile": "fake", "prompt": '{"mode": "ok", "text": "done"}', "cwd": str(pair["root"]), "wait": True})
    assert done.status_code == 200 and done.json()["status"] == "completed", done.text
    run_id = done.json()["run_id"]

    async def ttl_ms() -> int:
        store = RedisStore(pair["state"]["redis_url"], prefix=pair["state"]["key_prefix"])
        try:
            return int(await store.redis.pttl(store._log(f"run-events:exec:{run_id}")))
        finally:
            await store.close()

    deadline = time.monotonic() + 30
    while (left := asyncio.run(ttl_ms())) < 0:  # -1 while the copy is still under way (no expiry yet)
        assert left == -1 and time.monotonic() < deadline, f"no expiry on the run's log: {left}"
        time.sleep(0.05)
    assert 6.9 * 86400 * 1000 < left <= 7 * 86400 * 1000
    with httpx.stream("GET", f"{pair['b']}/v1/scillm/exec/{run_id}/events", headers=HEADERS, timeout=30) as tail:
        assert list(sse(tail))[-1][0] == "end"  # still there for a week


@pytest.mark.anyio
async def test_shutdown_with_the_store_down_leaves_no_copy_of_a_runs_events_pending(tmp_path: Path) -> None:
    """A run that ended while Redis is down: the copy of its events keeps retrying; at shutdown it is given the
    store's timeout, then cancelled and awaited, so no task outlives the app (the loop would destroy it pending)."""
    import asyncio

    from scillm_exec import EventLog, SharedRuns

    from scillm_core.testing.services import free_port

    app = make_app(data_dir=tmp_path / "data", only=["exec"], config={"state": {
        "backend": "redis", "redis_url": f"redis://127.0.0.1:{free_port()}/0", "timeout_s": 0.2}})
    shared = SharedRuns(app.runtime, "exec")
    before = asyncio.all_tasks()
    events = EventLog(tmp_path / "events.jsonl")
    shared.drive("run-1", events, lambda: {"type": "run.end"}, lambda reason: None)
    events.append("process.end", code=0)
    events.close()
    shared.release("run-1")
    assert shared.watcher is not None
    await shared.watcher  # nothing left to cancel: the watcher ended; the copy still waits for the store
    assert shared.mirrors
    await shared.stop()
    assert {t for t in asyncio.all_tasks() - before if not t.done()} == set()
    await app.runtime.store.close()
