"""End to end: the real pinned ``codex app-server`` as standing workers, driven over scillm's HTTP routes, its model
calls going back through scillm (run keys, /v1/responses, the codex provider) to a scripted fake Codex backend, all
inside one loopback-only network namespace shared by the module (one fake model, one scillm)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agents_helpers import (
    CALLER,
    MASTER_KEY,
    PLUGINS,
    client,
    codex_processes,
    events,
    make_repo,
    no_group_left,
    responder,
    run_key_of,
    start_scillm,
    wait_event,
)
from scillm_agent_runners.base import REPO_TOOLS
from scillm_agents import agents_of

from scillm_core.events import Event
from scillm_core.testing import ServerThread, make_app
from scillm_core.testing.fake_codex import FakeCodex
from scillm_core.testing.netns import links, loopback_only

MODEL = "gpt-5.5"  # a bundled codex slug (codex's own tool set); scillm routes it to the codex provider


class Env:
    def __init__(self, tmp: Path, fake: FakeCodex, login: dict[str, str], repo: Path) -> None:
        self.tmp, self.fake, self.login, self.repo = tmp, fake, login, repo
        self.auth = tmp / "codex-auth.json"
        self.auth.write_text(json.dumps(FakeCodex.auth_json(login)))
        self.server_env = {"SCILLM_CODEX_AUTH": str(self.auth), "CODEX_API_BASE": fake.base_url,
                           "SCILLM_CODEX_TOKEN_URL": fake.token_url}
        self.data_dir = tmp / "data"
        self.server: ServerThread | None = None
        self.http: httpx.Client | None = None
        self.pgids: set[int] = set()      # every app-server process group seen
        self.run_keys: set[str] = set()   # every run key seen (read from the live process)
        self.logs: list[str] = []
        self.reported: list[Event] = []   # units of work and model calls, as runtime.events reports them

    def runs(self, kind: str, worker: str) -> list[Event]:
        return [e for e in self.reported if e.kind == kind and e["unit"].startswith(f"run:agents/{worker}/")]

    def worker(self, repo: Path | None = None, **cfg: Any) -> dict[str, Any]:
        return {"repository": str(repo or self.repo), "model": MODEL, "sandbox": "read-only", **cfg}

    def requests_with(self, text: str) -> list[dict[str, Any]]:
        return [r.body for r in self.fake.requests if r.path.endswith("/responses") and text in json.dumps(r.body)]

    def seen(self, http: httpx.Client, worker: str) -> dict[str, Any]:
        """The worker's status; remembers its process group and run key for the cleanup and secret checks."""
        status = http.get(f"/{worker}/status").json()
        pid = status["process"].get("pid")
        if pid:
            self.pgids.add(pid)
            with contextlib.suppress(OSError):  # it may have stopped since (idle workers do)
                self.run_keys.add(run_key_of(pid))
        return status


class _Collect(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(self.format(record))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    assert (REPO_TOOLS / "node_modules" / ".bin" / "codex").exists(), \
        "codex missing: run scripts/install-agent-clis (scripts/install --test does)"
    tmp = tmp_path_factory.mktemp("agents-e2e")
    with loopback_only():
        assert links() == ["lo"]
        fake = FakeCodex()
        fake.responder = responder
        fake.start()
        e = Env(tmp, fake, fake.login(), make_repo(tmp / "repo"))
        handler = _Collect(e.logs)
        logging.getLogger().addHandler(handler)
        e.server = start_scillm(e.data_dir, {
            "chat": e.worker(description="multi-turn talk"),
            "editor": e.worker(sandbox="workspace-write"),
            "steer": e.worker(),
            "stop": e.worker(),
            "lease": e.worker(),
            "slow": e.worker(turn_timeout_s=2),
            "guard": e.worker(),
            "idle": e.worker(idle_timeout_s=1),
            "teams": e.worker(),
            "shared": e.worker(),
            "handover": e.worker(sandbox="workspace-write"),
            "capped": e.worker(),
            "cross": e.worker(),
        }, e.server_env, max_live=3)
        e.server.app.runtime.events.subscribe(e.reported.append, kinds=["run.start", "run.end", "request.start"])
        e.http = client(e.server)
        try:
            yield e
        finally:
            e.http.close()
            e.server.stop()
            logging.getLogger().removeHandler(handler)
            fake.stop()


def lease(http: httpx.Client, worker: str, owner: str = "project-agent", **body: Any) -> dict[str, Any]:
    response = http.post(f"/{worker}/leases", json={"owner": owner, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_two_turns_on_one_thread_carry_the_context(env: Env) -> None:
    http = env.http
    assert http is not None
    handoff = http.post("/chat/handoffs", json={"handoff_id": "h-chat", "goal": "REMEMBER PINEAPPLE-7",
                                                "validation_expectations": ["say NOTED"]})
    assert handoff.status_code == 201, handoff.text
    held = lease(http, "chat", handoff_id="h-chat")
    assert held["lease_id"] == "h-chat-lease"
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    first = http.post("/chat/turn", json={"lease_id": held["lease_id"], "wait": True},
                      headers={"traceparent": traceparent})
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "completed" and first.json()["final_text"] == "NOTED PINEAPPLE-7"
    # the handoff became the prompt
    assert "Goal: REMEMBER PINEAPPLE-7" in first.json()["input"] and "- say NOTED" in first.json()["input"]
    status = env.seen(http, "chat")
    assert status["process"]["status"] == "running" and status["thread"]["context"] == "new"
    second = http.post("/chat/turn", json={"lease_id": held["lease_id"], "input": "RECALL", "wait": True}).json()
    assert second["status"] == "completed", second
    assert second["thread_id"] == first.json()["thread_id"]
    assert second["final_text"] == "RECALLED: PINEAPPLE-7"
    # the fake model's request for the second turn carried the first turn's prompt and answer
    recall = env.requests_with("RECALL")[-1]
    assert "REMEMBER PINEAPPLE-7" in json.dumps(recall["input"]) and "NOTED PINEAPPLE-7" in json.dumps(recall["input"])
    # results per handoff and for the worker's last turn
    assert http.get("/chat/result", params={"handoff_id": "h-chat"}).json()["turn_id"] == second["turn_id"]
    assert http.get("/chat/result").json()["final_text"] == "RECALLED: PINEAPPLE-7"
    # every model call went through scillm with a run key, attributed to the worker
    calls = env.requests_with("PINEAPPLE-7")
    assert calls and all(r.get("store") is False for r in calls)
    assert env.fake.requests[-1].headers["authorization"] == f"Bearer {env.login['access_token']}"
    # reported as units of work: the process is a run (continuing the first turn's trace), each turn a run in it
    # with the worker's event stream, and every model call was made for its turn
    [process] = [e for e in env.runs("run.start", "chat") if e["parent"] is None]
    assert process["name"] == "agent chat"
    assert process["trace"] == {"traceparent": traceparent}
    assert process["attrs"]["events_url"].startswith("/v1/scillm/agents/chat/events/stream?after=")
    turns = [e for e in env.runs("run.start", "chat") if e["parent"] == process["unit"]]
    assert [t["name"] for t in turns] == ["agent turn chat"] * 2
    assert all(t["attrs"]["caller"] == CALLER and t["attrs"]["events_url"] for t in turns)
    ended = {e["unit"]: e for e in env.runs("run.end", "chat")}
    assert [(ended[t["unit"]]["status"], ended[t["unit"]]["attrs"]["turn_id"]) for t in turns] == [
        ("completed", first.json()["turn_id"]), ("completed", second["turn_id"])]
    parents = [e.ctx.parent for e in env.reported if e.kind == "request.start"]
    assert parents and set(parents) == {t["unit"] for t in turns}
    # the dashboard lists the process and its turns, and a turn's event stream (what the page follows, with the
    # same key) replays that turn's events
    listed = {r["unit"]: r for r in httpx.get(f"{env.server.url}/v1/scillm/ui/runs", headers=http.headers).json()[
        "data"]}
    assert listed[process["unit"]]["name"] == "agent chat" and listed[process["unit"]]["status"] == "running"
    assert [(listed[t["unit"]]["parent"], listed[t["unit"]]["status"]) for t in turns] == [
        (process["unit"], "completed")] * 2
    seen = ""
    with httpx.stream("GET", env.server.url + listed[turns[1]["unit"]]["attrs"]["events_url"], headers=http.headers,
                      timeout=60) as stream:
        for line in stream.iter_lines():
            seen += line + "\n"
            if '"turn.completed"' in line:
                break
    assert f'"turn_id":"{second["turn_id"]}"' in seen.replace(" ", "") and first.json()["turn_id"] not in seen


def test_a_virtual_keys_turn_is_its_own_and_its_model_calls_are_charged_to_it(env: Env) -> None:
    """A worker leased with one virtual key: the turn's model calls (codex, through the worker's run key) are that
    key's (call log, spend by run); another key gets 404 for the lease's turns, steers, interrupts, the result and
    the events; the master key sees them."""
    assert env.server is not None and env.http is not None
    admin = httpx.Client(base_url=env.server.url, timeout=60, headers={"authorization": f"Bearer {MASTER_KEY}"})
    made = [admin.post("/v1/scillm/keys", json={"name": name, "limits": {"rpm": 100}}).json() for name in "ab"]
    alice, bob = (httpx.Client(base_url=env.server.url + "/v1/scillm/agents", timeout=180, headers={
        "authorization": f"Bearer {m['key']}", "x-caller-skill": CALLER}) for m in made)
    held = lease(alice, "teams", owner="alice-agent")
    assert held["identity"] == made[0]["id"]
    turn = alice.post("/teams/turn", json={"lease_id": held["lease_id"], "input": "REMEMBER MANGO", "wait": True})
    assert turn.status_code == 200 and turn.json()["final_text"] == "NOTED MANGO", turn.text
    run = f"agent-teams/{turn.json()['turn_id']}"
    for method, path, body in (("POST", "/teams/turn", {"lease_id": held["lease_id"], "input": "REMEMBER X"}),
                               ("POST", "/teams/steer", {"lease_id": held["lease_id"], "input": "X"}),
                               ("POST", "/teams/interrupt", {"lease_id": held["lease_id"]}),
                               ("GET", "/teams/result", None), ("GET", "/teams/events/stream", None)):
        refused = bob.request(method, path, json=body)
        assert refused.status_code == 404, (path, refused.text)
    assert alice.get("/teams/result").json()["turn_id"] == turn.json()["turn_id"]
    assert env.http.get("/teams/result").json()["identity"] == made[0]["id"]  # the master key sees it
    calls = [c for c in admin.get("/v1/scillm/calls").json()["data"] if c.get("run") == run]
    assert calls and {c["owner"] for c in calls} == {made[0]["id"]}
    spend = admin.get("/v1/scillm/spend", params={"group_by": "run", "key": made[0]["id"]}).json()
    assert run in [g["run"] for g in spend["groups"]]
    assert bob.get(env.server.url + "/v1/scillm/spend", params={"group_by": "run"}).json()["calls"] == 0
    assert env.http.post("/teams/cleanup", json={"lease_id": held["lease_id"]}).status_code == 200
    for each in (admin, alice, bob):
        each.close()


def test_a_worker_shows_each_key_only_its_own_handoffs_lease_turns_thread_and_events(env: Env) -> None:
    """One worker used by two virtual keys in turn: another key's handoff is as if absent (its goal never shown, its
    id the other key's to use too), its lease shows only that the worker is taken and until when (renew, release and
    cleanup: 404), status lists only the caller's own turn and handoffs, the next key's turn starts a thread of its
    own (the model never sees the first key's conversation), and each key's event stream carries its own events
    only; the master key sees everything."""
    assert env.server is not None and env.http is not None
    admin = httpx.Client(base_url=env.server.url, timeout=60, headers={"authorization": f"Bearer {MASTER_KEY}"})
    made = [admin.post("/v1/scillm/keys", json={"name": name}).json() for name in ("shared-a", "shared-b")]
    alice, bob = (httpx.Client(base_url=env.server.url + "/v1/scillm/agents", timeout=180, headers={
        "authorization": f"Bearer {m['key']}", "x-caller-skill": CALLER}) for m in made)
    handoff = {"handoff_id": "h-private", "goal": "REMEMBER PAPAYA"}
    assert alice.post("/shared/handoffs", json=handoff).status_code == 201
    absent = [bob.post("/shared/leases", json={"owner": "bob-agent", "handoff_id": h}) for h in ("h-private", "h-no")]
    assert [r.status_code for r in absent] == [400, 400]
    assert absent[0].json()["error"]["message"].replace("h-private", "?") == \
        absent[1].json()["error"]["message"].replace("h-no", "?")  # the same answer as for no handoff at all
    held = lease(alice, "shared", owner="alice-agent", handoff_id="h-private")
    first = alice.post("/shared/turn", json={"lease_id": held["lease_id"], "wait": True})
    assert first.status_code == 200 and first.json()["final_text"] == "NOTED PAPAYA", first.text

    refused = bob.post("/shared/leases", json={"owner": "bob-agent"})
    assert refused.status_code == 409 and "alice-agent" not in refused.text and held["lease_id"] not in refused.text
    for path, body in (("/shared/leases", {"action": "renew", "lease_id": held["lease_id"]}),
                       ("/shared/leases", {"action": "release", "lease_id": held["lease_id"]}),
                       ("/shared/cleanup", {"lease_id": held["lease_id"]})):
        assert bob.post(path, json=body).status_code == 404, path
    theirs = bob.get("/shared/status").json()
    assert theirs["state"] == "taken" and theirs["lease"] == {"held_by_another_key": True,
                                                              "expires_at": held["expires_at"]}
    assert theirs["last_turn"] is None and theirs["handoffs"] == [] and theirs["thread"]["id"] is None
    # nothing else of alice's use shows: not the process she started, her worktree, nor how far the events went
    assert theirs["process"] is None and theirs["worktree"] is None and theirs["events_seq"] == 0
    listed = {w["name"]: w for w in bob.get("/registry").json()["workers"]}
    assert (listed["shared"]["state"], listed["shared"]["process"], listed["shared"]["running_turn"]) == (
        "taken", None, False)
    for reader, name in ((alice, "h-private"), (env.http, f"{made[0]['id']}/h-private")):  # the master: <owner>/<id>
        own = reader.get("/shared/status").json()
        assert own["state"] == "leased" and own["process"]["status"] == "running"
        assert own["lease"]["lease_id"] == held["lease_id"] and own["handoffs"] == [name]
        assert reader.get("/shared/result", params={"handoff_id": name}).json()["turn_id"] == first.json()["turn_id"]
        assert own["last_turn"]["turn_id"] == first.json()["turn_id"] and own["thread"]["id"]
        assert own["events_seq"] > 0 and own["last_turn"]["cost_usd"] > 0
    master_view = {w["name"]: w for w in env.http.get("/registry").json()["workers"]}["shared"]
    assert (master_view["state"], master_view["process"]) == ("leased", "running")
    # the dashboard lists alice's turn to her and to the master key, not to bob
    turn_unit = next(e["unit"] for e in env.runs("run.start", "shared") if e["name"] == "agent turn shared")
    ui = {who: [r["unit"] for r in httpx.get(f"{env.server.url}/v1/scillm/ui/runs", headers=c.headers).json()["data"]]
          for who, c in (("alice", alice), ("bob", bob), ("master", env.http))}
    assert turn_unit in ui["alice"] and turn_unit in ui["master"] and turn_unit not in ui["bob"]
    assert not [u for u in ui["bob"] if u.startswith("run:agents/shared/")]

    assert alice.post("/shared/leases", json={"action": "release", "lease_id": held["lease_id"]}).status_code == 200
    held_b = lease(bob, "shared", owner="bob-agent")
    second = bob.post("/shared/turn", json={"lease_id": held_b["lease_id"], "input": "RECALL", "wait": True})
    assert second.status_code == 200, second.text
    assert second.json()["final_text"].startswith("RECALLED") and "PAPAYA" not in second.json()["final_text"]
    assert bob.get("/shared/status").json()["thread"]["id"] != own["thread"]["id"]  # a thread of its own
    # each key's last turn and result are its own; the master key's are the worker's last
    assert alice.get("/shared/result").json()["turn_id"] == first.json()["turn_id"]
    assert bob.get("/shared/result").json()["turn_id"] == second.json()["turn_id"]
    assert alice.get("/shared/status").json()["last_turn"]["turn_id"] == first.json()["turn_id"]
    assert env.http.get("/shared/result").json()["turn_id"] == second.json()["turn_id"]

    def done(turn: httpx.Response) -> Any:
        return lambda e: e["type"] == "turn.completed" and e["turn_id"] == turn.json()["turn_id"]

    mine = list(events(bob, "shared", 0, until=done(second)))
    assert mine[-1]["turn_id"] == second.json()["turn_id"]
    assert {e["identity"] for e in mine} == {made[1]["id"]} and "PAPAYA" not in json.dumps(mine)
    hers = list(events(alice, "shared", 0, until=done(first)))  # she ran a turn here: her own events, still
    assert {e["identity"] for e in hers} == {made[0]["id"]} and "RECALL" not in json.dumps(hers)
    stranger = admin.post("/v1/scillm/keys", json={"name": "shared-c"}).json()["key"]
    assert httpx.get(f"{env.server.url}/v1/scillm/agents/shared/events/stream", headers={
        "authorization": f"Bearer {stranger}"}).status_code == 404  # neither a lease nor a turn here
    everything = list(events(env.http, "shared", 0, until=done(second)))
    assert {made[0]["id"], made[1]["id"]} <= {e.get("identity") for e in everything}
    assert "PAPAYA" in json.dumps(everything)
    mine_too = bob.post("/shared/handoffs", json={"handoff_id": "h-private", "goal": "BOB'S OWN"})  # ids per key
    assert mine_too.status_code == 201 and "PAPAYA" not in mine_too.text
    assert bob.get("/shared/status").json()["handoffs"] == ["h-private"]
    assert alice.post("/shared/handoffs", json=handoff).json()["goal"] == "REMEMBER PAPAYA"  # hers, untouched
    assert env.http.post("/shared/cleanup", json={"lease_id": held_b["lease_id"]}).status_code == 200
    for each in (admin, alice, bob):
        each.close()


def test_a_key_sees_only_the_workers_whose_model_it_may_call(env: Env) -> None:
    """A key restricted to other models: no worker in the registry, 404 for every worker route, and the 404 names
    none of the declared workers."""
    assert env.server is not None and env.http is not None
    admin = httpx.Client(base_url=env.server.url, timeout=60, headers={"authorization": f"Bearer {MASTER_KEY}"})
    made = admin.post("/v1/scillm/keys", json={"name": "other-models", "models": ["gpt-4.1"]}).json()
    other = httpx.Client(base_url=env.server.url + "/v1/scillm/agents", timeout=60, headers={
        "authorization": f"Bearer {made['key']}", "x-caller-skill": CALLER})
    assert other.get("/registry").json()["workers"] == []
    for method, path, body in (("GET", "/chat/status", None), ("GET", "/chat/result", None),
                               ("POST", "/chat/leases", {"owner": "x"}), ("POST", "/chat/handoffs", {"goal": "x"}),
                               ("GET", "/chat/events/stream", None)):
        refused = other.request(method, path, json=body)
        assert refused.status_code == 404, (path, refused.text)
        assert "editor" not in refused.text and "shared" not in refused.text
    assert len(env.http.get("/registry").json()["workers"]) >= 10  # the master key sees every worker
    routed = admin.post("/v1/scillm/keys", json={"name": "codex-models", "models": ["codex/*"]}).json()
    listed = httpx.get(f"{env.server.url}/v1/scillm/agents/registry", headers={
        "authorization": f"Bearer {routed['key']}"}).json()["workers"]
    assert "chat" in [w["name"] for w in listed]  # allowed by what the worker's model routes to
    for each in (admin, other):
        each.close()


def test_a_keys_turn_never_sees_the_files_another_keys_turns_left(env: Env) -> None:
    """One workspace-write worker used by two keys in turn: the first key's next turn still sees its own files, the
    second key's turn finds the worktree at its base commit (the first key's new and changed files gone), and its
    result's diff holds only its own change."""
    assert env.server is not None and env.http is not None
    admin = httpx.Client(base_url=env.server.url, timeout=60, headers={"authorization": f"Bearer {MASTER_KEY}"})
    made = [admin.post("/v1/scillm/keys", json={"name": name}).json() for name in ("handover-a", "handover-b")]
    carol, dave = (httpx.Client(base_url=env.server.url + "/v1/scillm/agents", timeout=180, headers={
        "authorization": f"Bearer {m['key']}", "x-caller-skill": CALLER}) for m in made)
    held = lease(carol, "handover", owner="carol-agent")
    wrote = carol.post("/handover/turn", json={"lease_id": held["lease_id"], "wait": True, "input":
                       "RUN echo CAROL-SECRET-41 > carol-notes.txt && sed -i 's/hello world/carol was here/' "
                       "hello.txt && echo written"}).json()
    assert wrote["status"] == "completed" and "written" in wrote["final_text"], wrote
    assert sorted(wrote["changed_paths"]) == ["carol-notes.txt", "hello.txt"]
    again = carol.post("/handover/turn", json={"lease_id": held["lease_id"], "wait": True,
                                               "input": "RUN cat carol-notes.txt hello.txt"}).json()
    assert "CAROL-SECRET-41" in again["final_text"] and "carol was here" in again["final_text"], again
    assert carol.post("/handover/leases", json={"action": "release", "lease_id": held["lease_id"]}).status_code == 200

    held_d = lease(dave, "handover", owner="dave-agent")
    looked = dave.post("/handover/turn", json={"lease_id": held_d["lease_id"], "wait": True, "input":
                       "RUN ls -a; cat hello.txt; cat carol-notes.txt; git status --porcelain; echo mine > d.txt"
                       }).json()
    assert looked["status"] == "completed", looked
    assert "CAROL-SECRET-41" not in json.dumps(looked) and "carol was here" not in json.dumps(looked)
    assert "hello world" in looked["final_text"] and "No such file" in looked["final_text"]
    assert looked["changed_paths"] == ["d.txt"] and "carol" not in looked["diff"]
    assert not [r for r in env.requests_with("cat carol-notes.txt; git status") if "CAROL-SECRET" in json.dumps(r)]
    resets = [e for e in events(dave, "handover", 0, until=lambda e: e["type"] == "worktree.reset")
              if e["type"] == "worktree.reset"]
    assert resets and resets[0]["identity"] == made[1]["id"]
    status = env.seen(env.http, "handover")
    worktree = Path(status["worktree"]["path"])
    assert not (worktree / "carol-notes.txt").exists() and (worktree / "d.txt").read_text() == "mine\n"
    assert env.http.post("/handover/cleanup", json={"lease_id": held_d["lease_id"]}).status_code == 200
    for each in (admin, carol, dave):
        each.close()


def test_a_turn_with_max_cost_usd_is_stopped_at_its_ceiling(env: Env) -> None:
    """``max_cost_usd`` on a turn caps what its model calls may cost (the budgets middleware's job ceiling, as for
    exec runs): a ceiling too low for the first call is a 429 budget_exceeded that never reaches the model, and the
    turn ends failed saying why with its cost; a turn within its ceiling completes with its cost."""
    assert env.server is not None and env.http is not None
    admin = httpx.Client(base_url=env.server.url, timeout=60, headers={"authorization": f"Bearer {MASTER_KEY}"})
    made = admin.post("/v1/scillm/keys", json={"name": "capped"}).json()
    erin = httpx.Client(base_url=env.server.url + "/v1/scillm/agents", timeout=180, headers={
        "authorization": f"Bearer {made['key']}", "x-caller-skill": CALLER})
    held = lease(erin, "capped", owner="erin-agent")
    bad = erin.post("/capped/turn", json={"lease_id": held["lease_id"], "input": "x", "max_cost_usd": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "$.max_cost_usd"
    stopped = erin.post("/capped/turn", json={"lease_id": held["lease_id"], "wait": True, "max_cost_usd": 1e-9,
                                              "input": "REMEMBER CEILING-TURN-77"})
    assert stopped.status_code == 200, stopped.text
    result = stopped.json()
    assert result["status"] == "failed" and "max_cost_usd" in result["error"], result
    assert result["error"].startswith("stopped: budget exceeded") and result["max_cost_usd"] == 1e-9
    assert result["cost_usd"] == 0
    assert env.requests_with("CEILING-TURN-77") == []  # no refused call reached the model
    refused = [c for c in admin.get("/v1/scillm/calls").json()["data"] if c["owner"] == made["id"]]
    assert refused and all(c["status"] == 429 and c["error_code"] == "budget_exceeded" for c in refused)
    fits = erin.post("/capped/turn", json={"lease_id": held["lease_id"], "wait": True, "max_cost_usd": 5,
                                           "input": "REMEMBER ROOMY"}).json()
    assert fits["status"] == "completed" and fits["final_text"] == "NOTED ROOMY", fits
    assert 0 < fits["cost_usd"] <= 5 and fits["max_cost_usd"] == 5
    assert erin.get("/capped/status").json()["last_turn"]["cost_usd"] == fits["cost_usd"]
    assert env.http.post("/capped/cleanup", json={"lease_id": held["lease_id"]}).status_code == 200
    for each in (admin, erin):
        each.close()


def test_a_key_that_takes_a_worker_cannot_steer_or_interrupt_another_keys_turn_still_running(env: Env) -> None:
    """Frank's turn outlives his lease; Grace takes the worker: his running turn is not hers to steer, interrupt or
    see (409 as if no turn ran, 409 turn_running without its id, status ``taken``), and nothing she sends reaches
    his conversation; the master key still can end it."""
    assert env.server is not None and env.http is not None
    admin = httpx.Client(base_url=env.server.url, timeout=60, headers={"authorization": f"Bearer {MASTER_KEY}"})
    made = [admin.post("/v1/scillm/keys", json={"name": name}).json() for name in ("cross-f", "cross-g")]
    frank, grace = (httpx.Client(base_url=env.server.url + "/v1/scillm/agents", timeout=180, headers={
        "authorization": f"Bearer {m['key']}", "x-caller-skill": CALLER}) for m in made)
    short = lease(frank, "cross", owner="frank-agent", ttl_s=1)
    start = frank.post("/cross/turn", json={"lease_id": short["lease_id"], "input": "HANG for frank"})
    assert start.status_code == 202, start.text
    while not env.requests_with("HANG for frank"):
        time.sleep(0.05)
    while (taken := grace.post("/cross/leases", json={"owner": "grace-agent"})).status_code == 409:
        time.sleep(0.1)  # until frank's lease expired
    assert taken.status_code == 200, taken.text
    held = taken.json()["lease_id"]
    for path, body in (("/cross/steer", {"lease_id": held, "input": "GRACE-STEER"}),
                       ("/cross/interrupt", {"lease_id": held})):
        refused = grace.post(path, json=body)
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "no_running_turn", refused.text
    busy = grace.post("/cross/turn", json={"lease_id": held, "input": "REMEMBER G"})
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "turn_running"
    assert start.json()["turn_id"] not in busy.text
    status = grace.get("/cross/status").json()
    assert (status["state"], status["turn"], status["process"]) == ("taken", None, None)
    assert env.requests_with("GRACE-STEER") == []
    ended = env.http.post("/cross/interrupt", json={"lease_id": held})
    assert ended.status_code == 200 and ended.json()["turn_id"] == start.json()["turn_id"]
    assert ended.json()["identity"] == made[0]["id"]
    assert env.http.post("/cross/cleanup", json={"lease_id": held}).status_code == 200
    for each in (admin, frank, grace):
        each.close()


def test_edit_turn_result_holds_the_diff_and_the_callers_tree_is_unchanged(env: Env) -> None:
    http = env.http
    assert http is not None
    held = lease(http, "editor")
    result = http.post("/editor/turn", json={"lease_id": held["lease_id"], "input": "EDIT hello.txt",
                                             "wait": True}).json()
    assert result["status"] == "completed", result
    assert result["final_text"] == "DONE: edited hello.txt"
    assert result["changed_paths"] == ["hello.txt"]
    assert "-hello world\n+goodbye world" in result["diff"]
    assert Path(result["artifacts"]["diff"]).read_text() == result["diff"]
    # the edit happened in the worker's worktree, never in the caller's repository
    status = env.seen(http, "editor")
    worktree = Path(status["worktree"]["path"])
    assert (worktree / "hello.txt").read_text() == "goodbye world\n"
    assert (env.repo / "hello.txt").read_text() == "hello world\n"
    assert subprocess.run(["git", "status", "--porcelain"], cwd=env.repo, capture_output=True).stdout == b""
    # the edit was codex's own tool call, as the event stream shows
    commands = [e for e in events(http, "editor", until=lambda e: e["type"] == "turn.completed")
                if e["type"] == "item.completed" and e["item"]["type"] == "commandExecution"]
    assert commands and "sed -i" in commands[-1]["item"]["command"] and commands[-1]["item"]["exit_code"] == 0


def test_steer_reaches_the_models_next_request(env: Env) -> None:
    http = env.http
    assert http is not None
    held = lease(http, "steer")
    gate = env.tmp / "steer-gate"
    start = http.post("/steer/turn", json={"lease_id": held["lease_id"], "input": f"WAIT {gate}"})
    assert start.status_code == 202, start.text
    turn_id = start.json()["turn_id"]
    env.seen(http, "steer")
    # once codex runs the blocking command, steer the turn, then let the command finish
    wait_event(http, "steer", 0, lambda e: e["type"] == "item.started" and e["item"]["type"] == "commandExecution"
               and e.get("turn_id") == turn_id)
    steered = http.post("/steer/steer", json={"lease_id": held["lease_id"], "input": "STEER: answer in French"})
    assert steered.status_code == 200, steered.text
    assert steered.json()["turn_id"] == turn_id
    gate.touch()
    wait_event(http, "steer", 0, lambda e: e["type"] == "turn.completed" and e.get("turn_id") == turn_id)
    result = http.get("/steer/result").json()
    assert result["status"] == "completed" and result["turn_id"] == turn_id
    assert result["final_text"] == "DONE after wait; later user input: STEER: answer in French"
    # the model's request after the tool output carried the steer as user input
    after = env.requests_with("STEER: answer in French")
    assert after and "function_call_output" in json.dumps(after[0]["input"])
    # steering without a running turn is a 409
    late = http.post("/steer/steer", json={"lease_id": held["lease_id"], "input": "too late"})
    assert late.status_code == 409 and "no running turn" in late.json()["error"]["message"]


def test_interrupt_ends_a_turn_and_the_worker_goes_on(env: Env) -> None:
    http = env.http
    assert http is not None
    held = lease(http, "stop")
    start = http.post("/stop/turn", json={"lease_id": held["lease_id"], "input": "HANG please"})
    assert start.status_code == 202, start.text
    deadline = time.monotonic() + 120
    while not env.requests_with("HANG please") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert env.requests_with("HANG please"), "the model call never reached the fake"
    busy = http.post("/stop/turn", json={"lease_id": held["lease_id"], "input": "REMEMBER X"})
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "turn_running"
    stopped = http.post("/stop/interrupt", json={"lease_id": held["lease_id"]})
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["status"] == "interrupted" and stopped.json()["turn_id"] == start.json()["turn_id"]
    assert http.get("/stop/status").json()["state"] == "leased"
    again = http.post("/stop/turn", json={"lease_id": held["lease_id"], "input": "REMEMBER KIWI", "wait": True})
    assert again.json()["status"] == "completed" and again.json()["final_text"] == "NOTED KIWI"


def test_turn_timeout_interrupts_the_turn(env: Env) -> None:
    http = env.http
    assert http is not None
    held = lease(http, "slow")
    result = http.post("/slow/turn", json={"lease_id": held["lease_id"], "input": "HANG slowly", "wait": True}).json()
    assert result["status"] == "timeout" and "turn timeout 2s" in result["error"]
    assert http.get("/slow/status").json()["state"] == "leased"


def test_read_only_is_enforced_by_codex_and_by_scillm(env: Env) -> None:
    http = env.http
    assert http is not None
    held = lease(http, "guard")
    # codex's own sandbox refuses the write
    tried = http.post("/guard/turn", json={"lease_id": held["lease_id"], "input": "RUN touch blocked.txt",
                                           "wait": True}).json()
    assert tried["status"] == "completed" and tried["changed_paths"] == [] and tried["diff"] == ""
    assert "Read-only file system" in tried["final_text"]
    worktree = Path(env.seen(http, "guard")["worktree"]["path"])
    assert not (worktree / "blocked.txt").exists()
    # a change that got past it anyway fails the turn, and the worktree goes back to its base
    gate = env.tmp / "guard-gate"
    start = http.post("/guard/turn", json={"lease_id": held["lease_id"], "input": f"WAIT {gate}"}).json()
    wait_event(http, "guard", 0, lambda e: e["type"] == "item.started" and e.get("turn_id") == start["turn_id"]
               and e["item"]["type"] == "commandExecution")
    (worktree / "sneaky.txt").write_text("written behind the sandbox's back\n")
    gate.touch()
    wait_event(http, "guard", 0, lambda e: e["type"] == "turn.completed" and e.get("turn_id") == start["turn_id"])
    result = http.get("/guard/result").json()
    assert result["status"] == "failed" and result["error"].startswith("sandbox_violation")
    assert result["changed_paths"] == ["sneaky.txt"] and "+written behind" in result["diff"]
    assert not (worktree / "sneaky.txt").exists()
    http.post("/guard/leases", json={"action": "release", "lease_id": held["lease_id"]})


def test_second_lease_owner_gets_409_then_takes_over_after_the_ttl(env: Env) -> None:
    http = env.http
    assert http is not None
    first = lease(http, "lease", owner="agent-a", ttl_s=1)
    refused = http.post("/lease/leases", json={"owner": "agent-b"})
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert "agent-a" in error["message"] and error["details"]["holder"] == "agent-a"
    assert error["details"]["expires_at"] == first["expires_at"]
    # only the holder runs turns
    stolen = http.post("/lease/turn", json={"lease_id": "not-the-lease", "input": "REMEMBER NOPE"})
    assert stolen.status_code == 409 and "agent-a" in stolen.json()["error"]["message"]
    time.sleep(max(0.0, first["expires_at"] - time.time()) + 0.2)
    second = lease(http, "lease", owner="agent-b", ttl_s=60)
    assert second["owner"] == "agent-b"
    old = http.post("/lease/turn", json={"lease_id": first["lease_id"], "input": "REMEMBER OLD"})
    assert old.status_code == 409 and "agent-b" in old.json()["error"]["message"]
    ran = http.post("/lease/turn", json={"lease_id": second["lease_id"], "input": "REMEMBER NEW", "wait": True})
    assert ran.json()["final_text"] == "NOTED NEW" and ran.json()["owner"] == "agent-b"
    assert ran.json()["caller"] == CALLER and ran.json()["identity"] == "master"
    env.seen(http, "lease")


def test_live_worker_limit_stops_the_longest_idle_first(env: Env) -> None:
    http = env.http
    assert http is not None
    order = ["chat", "editor", "lease", "stop"]
    for worker in order:
        held = http.get(f"/{worker}/status").json()["lease"]
        response = http.post(f"/{worker}/turn", json={"lease_id": held["lease_id"], "input": "REMEMBER LIMIT",
                                                       "wait": True})
        assert response.json()["status"] == "completed", response.text
        env.seen(http, worker)
    health = httpx.get(env.server.url + "/v1/scillm/health", headers={  # type: ignore[union-attr]
        "authorization": f"Bearer {MASTER_KEY}"}).json()
    assert health["middleware"]["agents"]["live"] == 3 and health["middleware"]["agents"]["max_live"] == 3
    chat = http.get("/chat/status").json()
    assert chat["process"]["status"] == "stopped" and "max_live=3" in chat["process"]["reason"]
    assert "the next turn resumes it" in chat["thread"]["note"]
    # and the stopped worker resumes its thread with the conversation on its next turn
    held = chat["lease"]
    recall = http.post("/chat/turn", json={"lease_id": held["lease_id"], "input": "RECALL", "wait": True}).json()
    assert recall["final_text"].startswith("RECALLED: PINEAPPLE-7") and recall["thread_id"] == chat["thread"]["id"]
    assert http.get("/chat/status").json()["thread"]["context"] == "resumed"
    env.seen(http, "chat")


def test_when_every_live_worker_is_busy_another_start_is_refused(env: Env) -> None:
    http = env.http
    assert http is not None
    busy = []
    for worker in ("stop", "guard", "lease"):
        held = http.get(f"/{worker}/status").json()["lease"] or lease(http, worker)
        started = http.post(f"/{worker}/turn", json={"lease_id": held["lease_id"], "input": f"HANG {worker}"})
        assert started.status_code == 202, started.text
        busy.append((worker, held["lease_id"]))
    held = lease(http, "idle")
    refused = http.post("/idle/turn", json={"lease_id": held["lease_id"], "input": "REMEMBER FULL"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_live_workers"
    assert "max_live" in refused.json()["error"]["message"]
    for worker, lease_id in busy:
        assert http.post(f"/{worker}/interrupt", json={"lease_id": lease_id}).json()["status"] == "interrupted"


def test_an_idle_worker_is_stopped_and_resumed(env: Env) -> None:
    http = env.http
    assert http is not None
    held = http.get("/idle/status").json()["lease"]
    first = http.post("/idle/turn", json={"lease_id": held["lease_id"], "input": "REMEMBER SLEEPY", "wait": True})
    assert first.json()["status"] == "completed", first.text
    env.seen(http, "idle")
    stopped = wait_event(http, "idle", 0, lambda e: e["type"] == "worker.stopped")  # its first stop
    assert stopped["reason"] == "idle for idle_timeout_s=1"
    [process] = [e for e in env.runs("run.end", "idle") if "stopped" in e["attrs"]]  # the process's run ended
    assert process["status"] == "completed" and process["attrs"]["stopped"] == "idle for idle_timeout_s=1"
    assert http.get("/idle/status").json()["process"]["reason"] == "idle for idle_timeout_s=1"
    again = http.post("/idle/turn", json={"lease_id": held["lease_id"], "input": "RECALL", "wait": True}).json()
    assert again["final_text"] == "RECALLED: SLEEPY" and again["thread_id"] == first.json()["thread_id"]
    env.seen(http, "idle")


def test_a_dead_worker_is_resumed_and_a_lost_thread_is_reported(env: Env) -> None:
    http = env.http
    assert http is not None
    held = http.get("/chat/status").json()["lease"]
    http.post("/chat/turn", json={"lease_id": held["lease_id"], "input": "REMEMBER ALIVE", "wait": True})
    status = env.seen(http, "chat")
    pid = status["process"]["pid"]
    os.killpg(pid, signal.SIGKILL)
    wait_event(http, "chat", status["events_seq"], lambda e: e["type"] == "worker.stopped")
    dead = http.get("/chat/status").json()
    assert dead["process"]["status"] == "stopped" and "exited" in dead["process"]["reason"]
    died = [e for e in env.runs("run.end", "chat") if "stopped" in e["attrs"]][-1]  # its run failed, saying why
    assert died["status"] == "failed" and "exited" in died["error"]
    held = dead["lease"]
    recall = http.post("/chat/turn", json={"lease_id": held["lease_id"], "input": "RECALL", "wait": True}).json()
    assert "PINEAPPLE-7" in recall["final_text"] and recall["thread_id"] == dead["thread"]["id"]
    # now lose codex's own record of the thread: the next start says so plainly and starts afresh
    http.post("/chat/cleanup", json={"lease_id": held["lease_id"]})
    sessions = env.data_dir / "agents" / "chat" / "home" / ".codex" / "sessions"
    assert sessions.is_dir()
    shutil.rmtree(sessions)
    for path in sessions.parent.glob("*.sqlite*"):
        path.unlink()
    fresh = http.post("/chat/turn", json={"lease_id": held["lease_id"], "input": "RECALL", "wait": True}).json()
    assert fresh["final_text"] == "RECALLED: " and fresh["thread_id"] != dead["thread"]["id"]
    status = env.seen(http, "chat")
    assert status["thread"]["context"] == "lost" and status["thread"]["lost_thread_id"] == dead["thread"]["id"]
    assert "context lost" in status["thread"]["note"]


def test_cleanup_stops_the_process_group_and_can_remove_the_worktree(env: Env) -> None:
    http = env.http
    assert http is not None
    held = http.get("/editor/status").json()["lease"]
    http.post("/editor/turn", json={"lease_id": held["lease_id"], "input": "REMEMBER CLEAN", "wait": True})
    status = env.seen(http, "editor")
    pgid = status["process"]["pid"]
    key = run_key_of(pgid)
    worktree = Path(status["worktree"]["path"])
    refused = http.post("/editor/cleanup", json={"lease_id": "someone-else"})
    assert refused.status_code == 409
    done = http.post("/editor/cleanup", json={"lease_id": held["lease_id"], "remove_worktree": True})
    assert done.status_code == 200, done.text
    assert done.json()["worktree"] == "removed" and done.json()["process"]["status"] == "stopped"
    assert no_group_left([pgid]) and not worktree.exists()
    # the stopped process's run key is dead
    assert env.server is not None
    revoked = httpx.post(env.server.url + "/v1/responses", headers={"authorization": f"Bearer {key}"},
                         json={"model": MODEL, "input": "hi"})
    assert revoked.status_code == 401
    # the caller's repository lists no leftover worktree
    listing = subprocess.run(["git", "worktree", "list", "--porcelain"], cwd=env.repo, capture_output=True).stdout
    assert str(worktree).encode() not in listing


def test_the_agents_commands_do_not_see_the_run_key(env: Env) -> None:
    http = env.http
    assert http is not None
    held = http.get("/lease/status").json()["lease"]
    result = http.post("/lease/turn", json={"lease_id": held["lease_id"], "input": "RUN env", "wait": True}).json()
    assert result["status"] == "completed" and "PATH=" in result["final_text"]
    assert "SCILLM_API_KEY" not in result["final_text"] and "sk-scillm-run-" not in result["final_text"]
    env.seen(http, "lease")


def test_no_secret_in_events_results_artifacts_logs_or_ops(env: Env) -> None:
    http = env.http
    assert http is not None and env.server is not None
    secrets = {MASTER_KEY, env.login["access_token"], env.login["refresh_token"], env.login["id_token"],
               *env.run_keys}
    assert len(env.run_keys) >= 3
    seen: list[tuple[str, bytes]] = []
    for path in env.data_dir.rglob("*"):
        if path.is_file():
            seen.append((str(path), path.read_bytes()))
    ops = httpx.Client(base_url=env.server.url, headers={"authorization": f"Bearer {MASTER_KEY}"}, timeout=60)
    for url in ("/v1/scillm/health", "/v1/scillm/calls", "/v1/scillm/plugins", "/v1/scillm/providers",
                "/v1/scillm/auth", "/metrics", "/v1/scillm/agents/registry"):
        seen.append((url, ops.get(url).content))
    for worker in ("chat", "editor", "steer", "stop", "lease", "slow", "guard", "idle"):
        seen.append((f"{worker}/status", http.get(f"/{worker}/status").content))
        seen.append((f"{worker}/result", http.get(f"/{worker}/result").content))
    for worker in ("steer", "stop", "lease", "slow", "guard", "idle"):  # end their logs so the streams finish
        held = http.get(f"/{worker}/status").json()["lease"]
        http.post(f"/{worker}/cleanup", json={"lease_id": held["lease_id"] if held else None})
        seen.append((f"{worker}/events", b"".join(json.dumps(e).encode() for e in events(http, worker))))
    seen.append(("logs", "\n".join(env.logs).encode()))
    assert any(b"turn.completed" in data for name, data in seen if name.endswith("events.jsonl"))
    for name, data in seen:
        for secret in secrets:
            assert secret.encode() not in data, f"a secret leaked into {name}"


def test_no_codex_process_is_left_after_scillm_stops(env: Env) -> None:
    assert env.server is not None
    assert codex_processes(env.data_dir), "expected live workers before the stop"
    env.server.stop()
    assert codex_processes(env.data_dir) == []
    assert env.pgids and no_group_left(sorted(env.pgids))


def test_restart_on_the_same_data_dir_keeps_lease_handoff_and_thread(env: Env, tmp_path: Path) -> None:
    """Two scillm processes one after the other on one data dir (inside the module's namespace)."""
    data_dir = tmp_path / "restart-data"
    workers = {"keeper": env.worker()}
    first = start_scillm(data_dir, workers, env.server_env)
    with client(first) as http:
        http.post("/keeper/handoffs", json={"handoff_id": "h-keep", "goal": "REMEMBER MANGO-42"})
        held = lease(http, "keeper", owner="durable-agent", handoff_id="h-keep", ttl_s=600)
        turn = http.post("/keeper/turn", json={"lease_id": held["lease_id"], "wait": True}).json()
        assert turn["final_text"] == "NOTED MANGO-42"
        pgid = http.get("/keeper/status").json()["process"]["pid"]
    first.stop()
    assert no_group_left([pgid]) and codex_processes(data_dir) == []
    second = start_scillm(data_dir, workers, env.server_env)
    try:
        with client(second) as http:
            status = http.get("/keeper/status").json()
            assert status["lease"]["owner"] == "durable-agent" and status["lease"]["lease_id"] == held["lease_id"]
            assert status["handoffs"] == ["h-keep"] and status["thread"]["id"] == turn["thread_id"]
            assert status["process"]["status"] == "stopped"
            assert http.get("/keeper/result", params={"handoff_id": "h-keep"}).json()["final_text"] == \
                "NOTED MANGO-42"
            refused = http.post("/keeper/leases", json={"owner": "intruder"})
            assert refused.status_code == 409 and "durable-agent" in refused.json()["error"]["message"]
            recall = http.post("/keeper/turn", json={"lease_id": held["lease_id"], "input": "RECALL",
                                                      "wait": True}).json()
            assert recall["final_text"] == "RECALLED: MANGO-42" and recall["thread_id"] == turn["thread_id"]
            assert http.get("/keeper/status").json()["thread"]["context"] == "resumed"
            pgid = http.get("/keeper/status").json()["process"]["pid"]
    finally:
        second.stop()
    assert no_group_left([pgid]) and codex_processes(data_dir) == []


@pytest.mark.anyio
async def test_a_worker_leaves_no_task_behind(tmp_path: Path) -> None:
    """Every task a worker starts for its codex app-server (its exit and idle watchers, its answers to codex) ends
    with it, whether scillm stopped the process or it died on its own; a watcher left sleeping was destroyed with the
    event loop ("Task was destroyed but it is pending")."""
    app = make_app(config={"agents": {"w": {"repository": str(make_repo(tmp_path / "repo")), "model": MODEL}}},
                   data_dir=tmp_path / "data", only=PLUGINS)
    agents = agents_of(app.runtime)
    worker = agents.worker("w")
    before = asyncio.all_tasks()

    def left() -> set[asyncio.Task[Any]]:
        return {t for t in asyncio.all_tasks() - before if not t.done()}

    with loopback_only():
        await worker.ensure_running("http://127.0.0.1:9")
        assert worker.alive and left()  # its watchers at least
        await worker.stop("stopped by the test")
        assert left() == set()
        await worker.ensure_running("http://127.0.0.1:9")
        process = worker.process
        assert process is not None and process.pid is not None
        os.killpg(process.pid, signal.SIGKILL)  # it dies on its own
        await process.exited.wait()
        while worker.process is not None:  # its exit watcher takes note
            await asyncio.sleep(0.01)
        assert worker.process_status()["reason"] == "codex app-server exited with code -9"
        await agents.shutdown()  # scillm stops
        assert left() == set()

