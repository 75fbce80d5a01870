"""Runs per key: ``[exec] max_runs_per_key`` holds under a burst, and run slots go round-robin between keys, so one
key's queue of runs never holds back another key's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from scillm_exec_helpers import MASTER_KEY, PROVIDER_SECRET, FakeRunner

from scillm_core.testing import FakeOpenAI, ServerThread, make_app


class World:
    def __init__(self, url: str, root: Path) -> None:
        self.url, self.root = url, root
        self.admin = self.client(MASTER_KEY)
        self.dirs = 0

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"authorization": f"Bearer {key}", "x-caller-skill": "per-key"})

    def key(self, name: str) -> httpx.Client:
        return self.client(self.admin.post("/v1/scillm/keys", json={"name": name}).json()["key"])

    def sleeper(self, client: httpx.Client) -> httpx.Response:
        """A run that holds its slot until cancelled."""
        self.dirs += 1
        cwd = self.root / f"d{self.dirs}"
        cwd.mkdir()
        return client.post("/v1/scillm/exec", json={"profile": "fake", "prompt": '{"mode": "sleep"}', "cwd": str(cwd),
                                                     "sandbox": "workspace-write", "timeout_s": 600})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root, data = tmp_path_factory.mktemp("root"), tmp_path_factory.mktemp("data")
    with FakeOpenAI() as fake:
        app = make_app(env={"OPENAI_API_KEY": PROVIDER_SECRET, "OPENAI_API_BASE": fake.url + "/v1",
                            "SCILLM_MASTER_KEY": MASTER_KEY}, data_dir=data,
                       config={"exec": {"allowed_roots": [str(root)], "kill_grace_s": 0.2, "max_concurrency": 1,
                                        "max_runs_per_key": 3}},
                       plugins=[("fake-runner", FakeRunner())],
                       only=["exec", "agent-runners", "auth", "keys", "chat", "openai-compat"])
        with ServerThread(app) as thread:
            yield World(thread.url, root)


def test_a_burst_gets_exactly_the_keys_runs_and_another_key_is_next(world: World) -> None:
    a, b = world.key("burst-a"), world.key("patient-b")
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: world.sleeper(a), range(10)))
    accepted = [r.json()["run_id"] for r in answers if r.status_code == 202]
    refused = [r for r in answers if r.status_code != 202]
    assert len(accepted) == 3 and len(refused) == 7
    assert all(r.status_code == 429 and r.json()["error"]["code"] == "rate_limited" and "max_runs_per_key" in
               r.json()["error"]["message"] and r.headers["retry-after"] == "1" for r in refused)
    graph = a.post("/v1/scillm/exec/graph", json={"nodes": [{"id": "n", "profile": "fake", "prompt": "{}",
                                                             "cwd": str(world.root)}]})
    assert graph.status_code == 429  # a graph counts too
    # one of a's runs holds the only slot, two wait; b's run queues after them
    docs = {run_id: a.get(f"/v1/scillm/exec/{run_id}").json() for run_id in accepted}
    while not any(d["status"] == "running" for d in docs.values()):
        docs = {run_id: a.get(f"/v1/scillm/exec/{run_id}").json() for run_id in accepted}
    first = next(run_id for run_id, d in docs.items() if d["status"] == "running")
    mine = world.sleeper(b)
    assert mine.status_code == 202
    assert a.post(f"/v1/scillm/exec/{first}/cancel").json()["status"] == "cancelled"
    # the freed slot goes to b (a had the last one), not to a's runs that queued before b's
    queued = [run_id for run_id in accepted if run_id != first]
    while True:
        running = [run_id for run_id in [mine.json()["run_id"], *queued]
                   if world.admin.get(f"/v1/scillm/exec/{run_id}").json()["status"] == "running"]
        if running:
            break
    assert running == [mine.json()["run_id"]]
    assert b.post(f"/v1/scillm/exec/{running[0]}/cancel").json()["status"] == "cancelled"
    # a's count comes back as its runs end (queued ones included): it may start runs again
    for run_id in accepted:
        a.post(f"/v1/scillm/exec/{run_id}/cancel")
    again = a.post("/v1/scillm/exec", json={"profile": "fake", "prompt": '{"mode": "ok"}', "cwd": str(world.root),
                                            "wait": True})
    assert again.status_code == 200 and again.json()["status"] == "completed"


def test_a_graph_runs_within_the_keys_runs(world: World) -> None:
    """A 40-node graph asking for 40 at once runs as many at once as the key may have (3): its result says so,
    and its runs are not all created up front."""
    c = world.key("grapher")
    nodes = [{"id": f"n{i}", "profile": "fake", "prompt": json.dumps({"mode": "ok", "text": str(i)}),
              "cwd": str(world.root)} for i in range(40)]
    graph = c.post("/v1/scillm/exec/graph", json={"nodes": nodes, "max_concurrency": 40})
    assert graph.status_code == 200, graph.text
    assert graph.json()["status"] == "completed" and graph.json()["max_concurrency"] == 3
    assert [n["final_text"] for n in graph.json()["nodes"]] == [str(i) for i in range(40)]
