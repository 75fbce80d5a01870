"""OpenCode runs while the state store (a real Redis, killed and restarted) is down: the run goes on, the instance
driving it still streams and aborts it, another instance on this machine reads it from its run dir, marked
degraded, instead of answering 503, and the store has its final record once Redis answers again. One fake model,
one scillm with its opencode serve, one Redis, inside one loopback-only network namespace."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opencode_helpers import MASTER_KEY, MODEL, ONLY, PROVIDER_SECRET, Stack, open_stack

from scillm_core.testing import ServerThread, make_app
from scillm_core.testing.services import RedisServer

RUNS = "/v1/scillm/opencode/runs"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    redis = RedisServer(tmp_path_factory.mktemp("redis"), persist=True)

    def services() -> dict[str, Any]:
        redis.start()
        return {"state": {"backend": "redis", "redis_url": redis.url, "timeout_s": 0.5}}

    try:
        with open_stack(tmp_path_factory, services) as built:
            built.redis = redis  # type: ignore[attr-defined]
            yield built
    finally:
        redis.kill()


def test_a_run_read_while_redis_is_down_answers_its_run_dir_and_its_driver_streams_and_aborts_it(
        stack: Stack) -> None:
    redis: RedisServer = stack.redis  # type: ignore[attr-defined]
    config = stack.server.app.runtime.config
    other = make_app(env={"OPENAI_API_KEY": PROVIDER_SECRET, "OPENAI_API_BASE": stack.fake.url + "/v1",
                          "SCILLM_MASTER_KEY": MASTER_KEY, "SCILLM_OPENCODE_SERVE_ENABLED": "1"},
                     data_dir=stack.data_dir, only=ONLY, config={
                         "exec": {"allowed_roots": [str(stack.root)]}, "opencode": {"model": MODEL, "heartbeat_s": 0.5},
                         "state": {"backend": "redis", "redis_url": config.state.redis_url, "timeout_s": 0.5}})
    gate, arrived = stack.fake.gate("down"), stack.fake.arrival("down")
    started = stack.client.post(RUNS, json={"prompt": "[gate:down]", "cwd": str(stack.repo()), "wait": False})
    assert started.status_code == 200, started.text
    run_id = started.json()["run_id"]
    run_dir = stack.data_dir / "opencode" / "runs" / run_id
    try:
        with ServerThread(other) as thread:
            b = httpx.Client(base_url=thread.url, timeout=180, headers={
                "authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": "opencode-tests"})
            assert arrived.wait(60)  # the session is working: its record is in the store and in its run dir
            copy = json.loads((run_dir / "status.json").read_text())
            assert copy["run_id"] == run_id and copy["status"] == "running" and copy["session_id"]
            assert b.get(f"{RUNS}/{run_id}").json()["status"] == "running"

            redis.kill(signal.SIGKILL)
            down = b.get(f"{RUNS}/{run_id}")  # B does not drive the run: its run dir's copy, marked
            assert down.status_code == 200, down.text
            assert down.json()["status"] == "running" and "state store" in down.json()["degraded"], down.json()

            frames: list[str] = []
            tail = threading.Thread(target=lambda: stack.events(f"{RUNS}/{run_id}/events", on_frame=frames.append))
            tail.start()  # A drives it: its stream is its own log, the store is not needed
            aborted = stack.client.post(f"{RUNS}/{run_id}/abort", json={"reason": "stopped while Redis is down"})
            assert aborted.status_code == 200 and aborted.json()["status"] == "aborted", aborted.text
            tail.join(120)
            assert not tail.is_alive() and frames[-1].startswith("event: end")
            events = [json.loads(f.split("data: ", 1)[1]) for f in frames if f.startswith("id: ")]
            assert events[-1]["type"] == "run_completed" and events[-1]["status"] == "aborted"

            ended = b.get(f"{RUNS}/{run_id}").json()  # its result.json, the store still down
            assert ended["status"] == "aborted" and "degraded" not in ended

            redis.start()  # the same port and data
            assert b.get(f"{RUNS}/{run_id}").json()["status"] == "aborted"
            deadline = time.monotonic() + 60  # the store's record too, once the driver's copy reaches it
            while True:
                index = b.get(RUNS)
                assert index.status_code == 200, index.text
                if {r["run_id"]: r["status"] for r in index.json()["runs"]}.get(run_id) == "aborted":
                    break
                assert time.monotonic() < deadline, index.json()
                time.sleep(0.1)
    finally:
        gate.set()
        if not redis.ping():
            redis.start()
