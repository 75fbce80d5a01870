"""The standing-agents surface without a codex process: config, bad input, leases on a shared store, the JSON-RPC
client, and the answers a worker gives to codex's requests (checked against codex 0.169's own JSON Schemas)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import orjson
import pytest
from agents_helpers import MASTER_KEY, PLUGINS, make_repo, start_scillm
from scillm_agents import agents_of
from scillm_agents.rpc import RpcClient, RpcError
from scillm_exec import Worktree

from scillm_core import Route, hookimpl
from scillm_core.config import ConfigError
from scillm_core.testing import ServerThread, make_app

SCHEMAS = Path(__file__).parent / "fixtures" / "codex-app-server"


def schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{name}.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tmp_path_factory.mktemp("agents-unit") / "repo")


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    data = tmp_path_factory.mktemp("agents-unit-data")
    workers = {"alpha": {"repository": str(repo), "model": "gpt-5.5"},
               "broken": {"repository": str(repo.parent), "model": "gpt-5.5"}}  # not a git repository
    server = start_scillm(data, workers, {})
    yield server
    server.stop()


@pytest.fixture
def http(server: ServerThread) -> Any:
    with httpx.Client(base_url=server.url + "/v1/scillm/agents", timeout=60, headers={
            "authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": "unit"}) as client:
        yield client


# -- config ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("table", "message"), [
    ({"w": {"repository": "/r", "model": "m", "sandox": "read-only"}}, "unknown key 'sandox'"),
    ({"w": {"repository": "/r", "model": "m", "sandbox": "full"}}, "agents.w"),
    ({"w": {"repository": "/r", "model": "m", "turn_timeout_s": 0}}, "agents.w"),
    ({"w": {"model": "m"}}, "agents.w"),
])
def test_bad_worker_tables_stop_startup_naming_the_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_app(config={"agents": table}, only=PLUGINS)


@pytest.mark.parametrize("doc", ["plugins/surfaces/scillm-agents/README.md", "docs/config.md"])
def test_documented_examples_are_valid_config(doc: str) -> None:
    import re
    import tomllib

    text = (Path(__file__).resolve().parents[4] / doc).read_text()
    blocks = [tomllib.loads(b) for b in re.findall(r"```toml\n(.*?)```", text, re.S) if "[agents." in b]
    assert blocks
    for block in blocks:
        app = make_app(config={k: v for k, v in block.items() if k in ("agents", "standing_agents", "exec")},
                       only=PLUGINS)
        assert list(agents_of(app.runtime).workers) == list(block["agents"])


def test_doctor_checks_the_codex_cli_and_each_repository(repo: Path) -> None:
    app = make_app(config={"agents": {"good": {"repository": str(repo), "model": "m"},
                                      "bad": {"repository": "relative/path", "model": "m"}}}, only=PLUGINS)
    checks = {c["check"]: c for c in app.runtime.hooks.doctor(app.runtime)}
    assert checks["standing agents: codex CLI"]["ok"] is True
    assert checks["standing agent good"]["ok"] is True
    bad = checks["standing agent bad"]
    assert bad["ok"] is False and "agents.bad.repository" in bad["detail"]


def test_workers_need_the_exec_plugins_run_keys(repo: Path) -> None:
    with pytest.raises(ValueError, match="need the exec plugin"):
        make_app(config={"agents": {"w": {"repository": str(repo), "model": "m"}}}, only=["agents", "responses"])


def test_bad_worker_names_stop_startup() -> None:
    with pytest.raises(ValueError, match=r"\[agents.a b\]"):
        make_app(config={"agents": {"a b": {"repository": "/r", "model": "m"}}}, only=PLUGINS)


# -- routes ---------------------------------------------------------------------------------------------------------

def test_registry_and_unknown_workers(http: httpx.Client) -> None:
    registry = http.get("/registry").json()
    assert registry["status"] == "configured"
    assert [w["name"] for w in registry["workers"]] == ["alpha", "broken"]
    assert registry["workers"][0]["process"] == "stopped" and registry["workers"][0]["sandbox"] == "read-only"
    for method, path in (("GET", "/nope/status"), ("POST", "/nope/turn"), ("GET", "/nope/events/stream")):
        response = http.request(method, path, json={})
        assert response.status_code == 404
        assert "no standing worker 'nope' (declared: alpha, broken)" in response.json()["error"]["message"]


def test_mutating_routes_need_the_caller_header(http: httpx.Client) -> None:
    for path in ("handoffs", "leases", "turn", "steer", "interrupt", "cleanup"):
        response = http.post(f"/alpha/{path}", json={}, headers={"x-caller-skill": ""})
        assert response.status_code == 400 and response.json()["error"]["code"] == "caller_skill_required", path


@pytest.mark.parametrize(("path", "body", "param"), [
    ("handoffs", {}, "$.goal"),
    ("handoffs", {"goal": "g", "handoff_id": "../x"}, "$.handoff_id"),
    ("handoffs", {"goal": "g", "validation_expectations": "x"}, "$.validation_expectations"),
    ("handoffs", {"goal": "g", "memory_context": [{"key": 1}]}, "$.memory_context[0]"),
    ("handoffs", {"goal": "g", "extra": 1}, "$.extra"),
    ("leases", {}, "$.owner"),
    ("leases", {"owner": "o", "ttl_s": -1}, "$.ttl_s"),
    ("leases", {"owner": "o", "ttl_s": 10 ** 9}, "$.ttl_s"),
    ("leases", {"owner": "o", "action": "steal"}, "$.action"),
    ("leases", {"action": "renew"}, "$.lease_id"),
    ("leases", {"owner": "o", "handoff_id": "missing"}, "$.handoff_id"),
    ("turn", {}, "$.lease_id"),
    ("turn", {"lease_id": "l", "wait": "yes"}, "$.wait"),
    ("turn", {"lease_id": "l", "input": ""}, "$.input"),
    ("turn", {"lease_id": "l", "timeout_s": 10 ** 6}, "$.timeout_s"),
    ("steer", {"lease_id": "l"}, "$.input"),
    ("cleanup", {"remove_worktree": "yes"}, "$.remove_worktree"),
    ("turn", [], "$"),
])
def test_bad_input_is_a_400_naming_the_field(http: httpx.Client, path: str, body: Any, param: str) -> None:
    response = http.post(f"/alpha/{path}", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_huge_unknown_field_name_is_not_echoed_whole(http: httpx.Client) -> None:
    response = http.post("/alpha/handoffs", json={"goal": "g", "x" * 500_000: 1})
    assert response.status_code == 400 and len(response.content) < 2000
    assert response.json()["error"]["param"] == "$." + "x" * 64


def test_bad_queries_are_400s(http: httpx.Client) -> None:
    assert http.get("/alpha/events/stream", params={"after": "-1"}).json()["error"]["param"] == "query.after"
    assert http.get("/alpha/result", params={"handoff_id": "a/b/c"}).json()["error"]["param"] == "query.handoff_id"
    assert http.get("/alpha/result").status_code == 404


def test_turns_steers_and_interrupts_need_the_lease(http: httpx.Client) -> None:
    for path, body in (("turn", {"lease_id": "l", "input": "hi"}), ("steer", {"lease_id": "l", "input": "hi"}),
                       ("interrupt", {"lease_id": "l"})):
        response = http.post(f"/alpha/{path}", json=body)
        assert response.status_code == 409 and response.json()["error"]["code"] == "lease_required", path
    held = http.post("/alpha/leases", json={"owner": "me", "ttl_s": 60}).json()
    try:
        wrong = http.post("/alpha/turn", json={"lease_id": "other", "input": "hi"})
        assert wrong.status_code == 409 and wrong.json()["error"]["details"]["holder"] == "me"
        idle = http.post("/alpha/interrupt", json={"lease_id": held["lease_id"]})
        assert idle.status_code == 409 and idle.json()["error"]["code"] == "no_running_turn"
        unknown = http.post("/alpha/turn", json={"lease_id": held["lease_id"], "handoff_id": "nope"})
        assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "$.handoff_id"
        nothing = http.post("/alpha/turn", json={"lease_id": held["lease_id"]})
        assert nothing.status_code == 400 and nothing.json()["error"]["param"] == "$.input"
    finally:
        http.post("/alpha/leases", json={"action": "release", "lease_id": held["lease_id"]})


def test_lease_renew_release_and_idempotent_acquire(http: httpx.Client) -> None:
    first = http.post("/alpha/leases", json={"owner": "me", "lease_id": "L1", "ttl_s": 30}).json()
    again = http.post("/alpha/leases", json={"owner": "me", "lease_id": "L1", "ttl_s": 300}).json()
    assert again["lease_id"] == "L1" and again["expires_at"] > first["expires_at"]
    renewed = http.post("/alpha/leases", json={"action": "renew", "lease_id": "L1", "ttl_s": 600})
    assert renewed.status_code == 200 and renewed.json()["ttl_s"] == 600
    assert http.post("/alpha/leases", json={"action": "renew", "lease_id": "L2"}).status_code == 409
    assert http.post("/alpha/leases", json={"action": "release", "lease_id": "L2"}).status_code == 409
    status = http.get("/alpha/status").json()
    assert status["state"] == "leased" and status["lease"]["owner"] == "me" and status["lease"]["caller"] == "unit"
    released = http.post("/alpha/leases", json={"action": "release", "lease_id": "L1"})
    assert released.status_code == 200 and released.json()["released"] is True
    assert http.get("/alpha/status").json()["lease"] is None


def test_event_stream_resumes_after_a_seq_and_sends_heartbeats(http: httpx.Client) -> None:
    before = http.get("/alpha/status").json()["events_seq"]
    held = http.post("/alpha/leases", json={"owner": "streamer", "ttl_s": 60}).json()
    http.post("/alpha/leases", json={"action": "release", "lease_id": held["lease_id"]})
    lines = []
    with http.stream("GET", "/alpha/events/stream", params={"after": before}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            lines.append(line)
            if line == ": heartbeat":
                break
    frames = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert [(f["seq"], f["type"]) for f in frames] == [(before + 1, "lease.acquired"), (before + 2, "lease.released")]
    assert f"id: {before + 1}" in lines and frames[0]["owner"] == "streamer"
    # an EventSource that reconnects sends the id of the last frame it got: it gets only what came after
    lines = []
    with http.stream("GET", "/alpha/events/stream", headers={"last-event-id": str(before + 1)}) as response:
        for line in response.iter_lines():
            lines.append(line)
            if line == ": heartbeat":
                break
    assert [json.loads(line[6:])["seq"] for line in lines if line.startswith("data: ")] == [before + 2]
    bad = http.get("/alpha/events/stream", headers={"last-event-id": "1e9"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"


def test_handoffs_are_stored_once(http: httpx.Client) -> None:
    body = {"handoff_id": "h1", "goal": "fix the bug", "memory_context": [{"key": "k", "summary": "s"}],
            "validation_expectations": ["tests pass"], "metadata": {"phase": 1}}
    created = http.post("/alpha/handoffs", json=body)
    assert created.status_code == 201
    assert created.json()["context"] == [{"key": "k", "summary": "s"}] and created.json()["caller"] == "unit"
    retry = http.post("/alpha/handoffs", json=body)
    assert retry.status_code == 200 and retry.json()["created_at"] == created.json()["created_at"]
    clash = http.post("/alpha/handoffs", json={**body, "goal": "something else"})
    assert clash.status_code == 409 and clash.json()["error"]["code"] == "handoff_exists"
    assert "h1" in http.get("/alpha/status").json()["handoffs"]
    generated = http.post("/alpha/handoffs", json={"goal": "another"}).json()
    assert generated["handoff_id"].startswith("handoff-")


def test_a_worker_that_cannot_start_says_why(http: httpx.Client) -> None:
    held = http.post("/broken/leases", json={"owner": "me", "ttl_s": 60}).json()
    response = http.post("/broken/turn", json={"lease_id": held["lease_id"], "input": "hi", "wait": True})
    assert response.status_code == 503 and response.json()["error"]["code"] == "worker_unavailable"
    assert "not inside a git repository" in response.json()["error"]["message"]
    assert "agents.broken" in response.json()["error"]["message"]
    # the worker is free again
    assert http.get("/broken/status").json()["state"] == "leased"


def test_two_scillm_processes_on_one_store_never_both_hold_a_lease(repo: Path, tmp_path: Path) -> None:
    workers = {"shared": {"repository": str(repo), "model": "gpt-5.5"}}
    servers = [start_scillm(tmp_path / "data", workers, {}) for _ in range(2)]
    try:
        def take(n: int) -> httpx.Response:
            return httpx.post(f"{servers[n % 2].url}/v1/scillm/agents/shared/leases", json={"owner": f"agent-{n}"},
                              headers={"authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": "unit"}, timeout=60)

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(take, range(16)))
        winners = [r.json()["owner"] for r in responses if r.status_code == 200]
        assert len(winners) == 1
        losers = [r.json()["error"] for r in responses if r.status_code != 200]
        assert len(losers) == 15 and all(e["details"]["holder"] == winners[0] for e in losers)
        # both processes see the one holder
        for server in servers:
            status = httpx.get(f"{server.url}/v1/scillm/agents/shared/status", timeout=60,
                               headers={"authorization": f"Bearer {MASTER_KEY}"}).json()
            assert status["lease"]["owner"] == winners[0]
    finally:
        for server in servers:
            server.stop()


# -- JSON-RPC -------------------------------------------------------------------------------------------------------

class Wire:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.notes: list[tuple[str, Any]] = []

    async def write(self, data: bytes) -> None:
        assert data.endswith(b"\n") and data.count(b"\n") == 1
        self.sent.append(orjson.loads(data))


@pytest.mark.anyio
async def test_rpc_matches_responses_and_answers_every_server_request() -> None:
    wire = Wire()

    async def handle(method: str, params: Any) -> Any:
        if method == "boom":
            raise KeyError("bug")
        if method == "refuse":
            raise RpcError(-32601, "not here")
        return {"echo": params}

    rpc = RpcClient(wire.write, on_notification=lambda m, p: wire.notes.append((m, p)), on_request=handle)
    one = asyncio.ensure_future(rpc.request("a", {"x": 1}))
    two = asyncio.ensure_future(rpc.request("b"))
    await asyncio.sleep(0)
    ids = [m["id"] for m in wire.sent]
    rpc.feed(orjson.dumps({"jsonrpc": "2.0", "id": ids[1], "error": {"code": -1, "message": "nope"}}))
    rpc.feed(orjson.dumps({"jsonrpc": "2.0", "id": ids[0], "result": {"ok": True}}))
    assert await one == {"ok": True}
    with pytest.raises(RpcError, match="nope"):
        await two
    rpc.feed(b'{"jsonrpc":"2.0","method":"turn/started","params":{"turnId":"t"}}')
    rpc.feed(b"not json at all")
    for n, method in enumerate(("ok", "boom", "refuse")):
        rpc.feed(orjson.dumps({"jsonrpc": "2.0", "id": f"s{n}", "method": method, "params": {"n": n}}))
    for _ in range(10):
        await asyncio.sleep(0)
    answers = {m["id"]: m for m in wire.sent if isinstance(m.get("id"), str)}
    assert answers["s0"]["result"] == {"echo": {"n": 0}}
    assert answers["s1"]["error"]["code"] == -32603 and "boom" in answers["s1"]["error"]["message"]
    assert answers["s2"]["error"] == {"code": -32601, "message": "not here"}
    for answer in answers.values():
        jsonschema.validate(answer, schema("JSONRPCResponse" if "result" in answer else "JSONRPCError"))
    assert wire.notes == [("turn/started", {"turnId": "t"})]
    pending = asyncio.ensure_future(rpc.request("c"))
    await asyncio.sleep(0)
    rpc.close("the child exited")
    with pytest.raises(ConnectionResetError, match="exited"):
        await pending
    with pytest.raises(ConnectionResetError):
        await rpc.request("d")


@pytest.mark.anyio
@pytest.mark.parametrize("sandbox", ["read-only", "workspace-write"])
async def test_worker_answers_codex_requests_by_its_sandbox(repo: Path, tmp_path: Path, sandbox: str) -> None:
    app = make_app(config={"agents": {"w": {"repository": str(repo), "model": "gpt-5.5", "sandbox": sandbox}}},
                   data_dir=tmp_path / "data", only=PLUGINS)
    worker = agents_of(app.runtime).worker("w")
    root = tmp_path / "wt"
    worker.worktree = Worktree(path=root, workdir=root, repo=repo, base="0" * 40)
    writable = sandbox == "workspace-write"
    cases = [
        ("item/commandExecution/requestApproval", {"cwd": str(root / "src"), "command": "make"},
         "CommandExecutionRequestApprovalResponse", "accept" if writable else "decline"),
        ("item/commandExecution/requestApproval", {"cwd": "/etc", "command": "rm x"},
         "CommandExecutionRequestApprovalResponse", "decline"),
        ("item/commandExecution/requestApproval", {"cwd": str(root), "networkApprovalContext": {"host": "x"}},
         "CommandExecutionRequestApprovalResponse", "decline"),
        ("item/fileChange/requestApproval", {"grantRoot": None}, "FileChangeRequestApprovalResponse",
         "accept" if writable else "decline"),
        ("item/fileChange/requestApproval", {"grantRoot": "/"}, "FileChangeRequestApprovalResponse", "decline"),
        ("applyPatchApproval", {"grantRoot": None, "fileChanges": {}}, "ApplyPatchApprovalResponse",
         "approved" if writable else "denied"),
        ("execCommandApproval", {"cwd": str(root), "command": ["ls"]}, "ExecCommandApprovalResponse",
         "approved" if writable else "denied"),
        ("execCommandApproval", {"cwd": "/", "command": ["ls"]}, "ExecCommandApprovalResponse", "denied"),
    ]
    for method, params, response_schema, decision in cases:
        answer = await worker._on_request(method, params)
        jsonschema.validate(answer, schema(response_schema))
        got = answer["decision"]
        assert (got if isinstance(got, str) else next(iter(got))) == decision, (method, params)
    granted = await worker._on_request("item/permissions/requestApproval", {"permissions": {"network": {}}})
    jsonschema.validate(granted, schema("PermissionsRequestApprovalResponse"))
    assert granted["permissions"] == {}
    elicitation = await worker._on_request("mcpServer/elicitation/request", {})
    jsonschema.validate(elicitation, schema("McpServerElicitationRequestResponse"))
    for method in ("item/tool/requestUserInput", "item/tool/call", "account/chatgptAuthTokens/refresh",
                   "attestation/generate", "something/new"):
        with pytest.raises(RpcError) as refused:
            await worker._on_request(method, {})
        assert refused.value.message
    log = [json.loads(line) for line in worker.events.path.read_text().splitlines()]
    assert [e["decision"] for e in log if e["type"] == "approval"][:1] == ["accept" if writable else "decline"]


def test_a_keys_handoffs_are_capped_listed_on_their_own_and_deletable(repo: Path, tmp_path: Path) -> None:
    """Any key could store any number of handoffs (a few hundred KiB each, kept for good), and status listed the
    worker's first 1,000 before keeping the caller's, so one key's flood pushed another's out of its list. Now a
    key keeps at most ``max_handoffs_per_key`` per worker (409 past it), lists its own from an index of its own, and
    can delete one to make room; another key's is as if absent."""
    app = make_app(env={"SCILLM_MASTER_KEY": MASTER_KEY}, data_dir=tmp_path, only=PLUGINS,
                   config={"agents": {"alpha": {"repository": str(repo), "model": "gpt-5.5"}},
                           "standing_agents": {"max_handoffs_per_key": 3}})
    with ServerThread(app) as server:
        def as_key(key: str) -> httpx.Client:
            return httpx.Client(base_url=server.url + "/v1/scillm/agents", timeout=60, headers={
                "authorization": f"Bearer {key}", "x-caller-skill": "unit"})

        with as_key(MASTER_KEY) as master:
            keys = [master.post(server.url + "/v1/scillm/keys", json={"name": n}).json()["key"] for n in "fq"]
        with as_key(keys[0]) as flood, as_key(keys[1]) as quiet:
            assert quiet.post("/alpha/handoffs", json={"handoff_id": "zz-mine", "goal": "g"}).status_code == 201
            for i in range(3):
                assert flood.post("/alpha/handoffs", json={"handoff_id": f"aa-{i}", "goal": "g"}).status_code == 201
            over = flood.post("/alpha/handoffs", json={"handoff_id": "aa-3", "goal": "g"})
            assert over.status_code == 409 and over.json()["error"]["code"] == "too_many_handoffs"
            assert flood.post("/alpha/handoffs", json={"handoff_id": "aa-0", "goal": "g"}).status_code == 200  # retry
            assert quiet.get("/alpha/status").json()["handoffs"] == ["zz-mine"]
            assert flood.get("/alpha/status").json()["handoffs"] == ["aa-0", "aa-1", "aa-2"]
            assert quiet.delete("/alpha/handoffs/aa-0").status_code == 404  # another key's: as if absent
            assert flood.delete("/alpha/handoffs/aa-0").json() == {"worker": "alpha", "handoff_id": "aa-0",
                                                                   "deleted": True}
            assert flood.delete("/alpha/handoffs/aa-0").status_code == 404
            assert flood.post("/alpha/handoffs", json={"handoff_id": "aa-3", "goal": "g"}).status_code == 201
            assert flood.get("/alpha/status").json()["handoffs"] == ["aa-1", "aa-2", "aa-3"]
            assert quiet.post("/alpha/handoffs", json={"handoff_id": "aa-1", "goal": "g"}).status_code == 201  # its own


def _keys(server: ServerThread, *names: str) -> list[httpx.Client]:
    """A client of the agents surface for each new virtual key (its id as the client's ``owner`` attribute)."""
    with httpx.Client(base_url=server.url, timeout=60, headers={"authorization": f"Bearer {MASTER_KEY}"}) as master:
        made = [master.post("/v1/scillm/keys", json={"name": name}).json() for name in names]
    clients = []
    for key in made:
        client = httpx.Client(base_url=server.url + "/v1/scillm/agents", timeout=60, headers={
            "authorization": f"Bearer {key['key']}", "x-caller-skill": "unit"})
        client.owner = key["id"]  # type: ignore[attr-defined]
        clients.append(client)
    return clients


def test_handoff_ids_are_each_keys_own(repo: Path, tmp_path: Path) -> None:
    """Handoff ids were one namespace per worker: a second key posting ``h1`` got a 409 that showed nothing, and
    could never use the id. Each key now has ids of its own: both store ``h1``, each reads back its own, and another
    key's id is as absent as one nobody used (404), never a 409."""
    with ServerThread(make_app(env={"SCILLM_MASTER_KEY": MASTER_KEY}, data_dir=tmp_path, only=PLUGINS, config={
            "agents": {"alpha": {"repository": str(repo), "model": "gpt-5.5"}}})) as server:
        alice, bob, carol = _keys(server, "alice", "bob", "carol")
        mine, theirs = {"handoff_id": "h1", "goal": "ALICE GOAL"}, {"handoff_id": "h1", "goal": "BOB GOAL"}
        assert alice.post("/alpha/handoffs", json=mine).status_code == 201
        second = bob.post("/alpha/handoffs", json=theirs)
        assert second.status_code == 201 and second.json()["goal"] == "BOB GOAL", second.text
        again = [c.post("/alpha/handoffs", json=b) for c, b in ((alice, mine), (bob, theirs))]  # read back by id
        assert [(a.status_code, a.json()["goal"], a.json()["identity"]) for a in again] == [
            (200, "ALICE GOAL", alice.owner), (200, "BOB GOAL", bob.owner)]  # type: ignore[attr-defined]
        clash = bob.post("/alpha/handoffs", json={**theirs, "goal": "other"})  # its own id, other content
        assert clash.status_code == 409 and clash.json()["error"]["code"] == "handoff_exists"
        assert "ALICE" not in clash.text
        for client in (alice, bob):
            assert client.get("/alpha/status").json()["handoffs"] == ["h1"]
        assert carol.get("/alpha/status").json()["handoffs"] == []
        unknown = carol.get("/alpha/result", params={"handoff_id": "h1"})
        never = carol.get("/alpha/result", params={"handoff_id": "h-nobody"})
        assert unknown.status_code == never.status_code == 404
        assert unknown.json()["error"]["message"].replace("h1", "?") == \
            never.json()["error"]["message"].replace("h-nobody", "?")
        assert carol.delete("/alpha/handoffs/h1").status_code == 404
        lease = carol.post("/alpha/leases", json={"owner": "carol", "handoff_id": "h1"})
        assert lease.status_code == 400 and lease.json()["error"]["param"] == "$.handoff_id"
        assert alice.get("/alpha/result", params={"handoff_id": "h1"}).json()["error"]["message"].endswith(
            "has no finished turn yet")  # found: its own
        assert alice.delete("/alpha/handoffs/h1").status_code == 200
        assert alice.delete("/alpha/handoffs/h1").status_code == 404
        assert bob.post("/alpha/handoffs", json=theirs).status_code == 200  # bob's is still there
        with httpx.Client(base_url=server.url + "/v1/scillm/agents", timeout=60, headers={
                "authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": "unit"}) as master:
            assert master.get("/alpha/status").json()["handoffs"] == [f"{bob.owner}/h1"]  # type: ignore[attr-defined]
            assert master.post("/alpha/handoffs", json=mine).status_code == 201  # its own namespace too


def test_handoffs_stored_before_ids_were_per_key_stay_readable_by_id(repo: Path, tmp_path: Path) -> None:
    """Handoffs the previous version stored (``agents.handoffs`` under ``<worker>/<id>``, with or without its
    per-key index entry) are still the same key's by id: listed, used by a lease, deleted, and answered as
    a retry; another key neither sees them nor is kept from using the id."""
    from scillm_agents.service import HANDOFFS, HANDOFFS_BY_KEY

    with ServerThread(make_app(env={"SCILLM_MASTER_KEY": MASTER_KEY}, data_dir=tmp_path, only=PLUGINS, config={
            "agents": {"alpha": {"repository": str(repo), "model": "gpt-5.5"}}})) as server:
        alice, bob = _keys(server, "alice", "bob")
        store = agents_of(server.app.runtime).store
        old = {"worker": "alpha", "handoff_id": "old-a", "phase_id": None, "goal": "OLD GOAL", "context": None,
               "validation_expectations": [], "metadata": {}, "created_at": 1.0, "caller": "unit",
               "identity": alice.owner}  # type: ignore[attr-defined]
        older = {**old, "handoff_id": "older", "identity": None}  # from before handoffs had an owner: the master's

        async def seed() -> None:
            await store.put(HANDOFFS, "alpha/old-a", old)
            await store.put(HANDOFFS_BY_KEY, f"alpha/{alice.owner}/old-a", {})  # type: ignore[attr-defined]
            await store.put(HANDOFFS, "alpha/older", older)

        assert server.loop is not None
        asyncio.run_coroutine_threadsafe(seed(), server.loop).result(30)
        assert alice.get("/alpha/status").json()["handoffs"] == ["old-a"]
        retry = alice.post("/alpha/handoffs", json={"handoff_id": "old-a", "goal": "OLD GOAL"})
        assert retry.status_code == 200 and retry.json()["created_at"] == 1.0
        assert alice.post("/alpha/handoffs", json={"handoff_id": "old-a", "goal": "new"}).status_code == 409
        held = alice.post("/alpha/leases", json={"owner": "alice", "handoff_id": "old-a"})
        assert held.status_code == 200, held.text
        assert alice.post("/alpha/leases", json={"action": "release", "lease_id": held.json()["lease_id"]}
                          ).status_code == 200
        assert bob.delete("/alpha/handoffs/old-a").status_code == 404
        assert bob.get("/alpha/result", params={"handoff_id": "old-a"}).status_code == 404
        assert bob.post("/alpha/handoffs", json={"handoff_id": "old-a", "goal": "BOB"}).status_code == 201
        with httpx.Client(base_url=server.url + "/v1/scillm/agents", timeout=60, headers={
                "authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": "unit"}) as master:
            assert master.get("/alpha/status").json()["handoffs"] == sorted([  # another key's as <owner>/<id>
                f"{alice.owner}/old-a", f"{bob.owner}/old-a", "older"])  # type: ignore[attr-defined]
            opened = master.post("/alpha/leases", json={"owner": "admin", "handoff_id": f"{alice.owner}/old-a"})
            assert opened.status_code == 200 and opened.json()["lease_id"] == "old-a-lease"  # alice's, from before
            released = master.post("/alpha/leases", json={"action": "release", "lease_id": "old-a-lease"})
            assert released.status_code == 200
            assert master.get("/alpha/result", params={"handoff_id": "older"}).json()["error"]["message"].endswith(
                "has no finished turn yet")
        assert alice.delete("/alpha/handoffs/old-a").status_code == 200
        assert alice.get("/alpha/status").json()["handoffs"] == []
        assert bob.post("/alpha/handoffs", json={"handoff_id": "old-a", "goal": "BOB"}).status_code == 200
        assert alice.post("/alpha/handoffs", json={"handoff_id": "old-a", "goal": "again"}).status_code == 201


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_posts_racing_at_the_cap_store_exactly_the_cap(repo: Path, tmp_path: Path, backend: str,
                                                       request: pytest.FixtureRequest) -> None:
    """The cap was checked, then written: posts racing at it passed it by a few. Two scillm processes on one state
    store (one SQLite file; one Redis) take 40 posts of one key at once: exactly the cap is stored, the rest are
    409 ``too_many_handoffs``."""
    cap, posts = 5, 40
    state = request.getfixturevalue("redis_state") if backend == "redis" else {}
    config = {"agents": {"alpha": {"repository": str(repo), "model": "gpt-5.5"}},
              "standing_agents": {"max_handoffs_per_key": cap}, **({"state": state} if state else {})}
    servers = [ServerThread(make_app(env={"SCILLM_MASTER_KEY": MASTER_KEY}, data_dir=tmp_path, only=PLUGINS,
                                     config=config)).start() for _ in range(2)]
    try:
        clients = [httpx.Client(base_url=s.url + "/v1/scillm/agents", timeout=60, headers={
            "authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": "unit"}) for s in servers]
        with ThreadPoolExecutor(posts) as pool:
            answers = list(pool.map(lambda i: clients[i % 2].post("/alpha/handoffs", json={
                "handoff_id": f"race-{i:02d}", "goal": "g"}), range(posts)))
        codes = sorted(a.status_code for a in answers)
        assert codes == [201] * cap + [409] * (posts - cap), [a.text for a in answers if a.status_code != 201]
        assert {a.json()["error"]["code"] for a in answers if a.status_code == 409} == {"too_many_handoffs"}
        stored = sorted(a.json()["handoff_id"] for a in answers if a.status_code == 201)
        for client in clients:
            assert client.get("/alpha/status").json()["handoffs"] == stored
    finally:
        for server in servers:
            server.stop()


class HouseRouting:
    """A third-party routing plugin: ``house-coder`` is its own name for Codex's gpt-5.5 (core knows no such
    model)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    @hookimpl(tryfirst=True)
    def route_model(self, request: Any, runtime: Any) -> Route | None:
        self.asked.append(request.model)
        if request.model != "house-coder":
            return None
        return Route(provider="codex", model="gpt-5.5", requested=request.model)


def test_the_workers_a_key_may_use_follow_a_routing_plugin(repo: Path, tmp_path: Path) -> None:
    """Which workers a restricted key may use was decided by core's routing directly, so a ``route_model`` plugin
    was ignored there: a worker whose model only the plugin routes was hidden from a key allowed what it routes to.
    The surface now asks the hook, as every call does."""
    routing = HouseRouting()
    app = make_app(env={"SCILLM_MASTER_KEY": MASTER_KEY}, data_dir=tmp_path, only=PLUGINS,
                   plugins=[("house-routing", routing)],
                   config={"agents": {"house": {"repository": str(repo), "model": "house-coder"},
                                      "other": {"repository": str(repo), "model": "deepseek/deepseek-chat"}}})
    with ServerThread(app) as server:
        with httpx.Client(base_url=server.url, timeout=60, headers={"authorization": f"Bearer {MASTER_KEY}"}) as m:
            codex, deepseek = (m.post("/v1/scillm/keys", json={"name": n, "models": [p]}).json()["key"]
                               for n, p in (("codex-only", "codex/*"), ("deepseek-only", "deepseek/*")))
        for key, visible in ((codex, ["house"]), (deepseek, ["other"]), (MASTER_KEY, ["house", "other"])):
            with httpx.Client(base_url=server.url + "/v1/scillm/agents", timeout=60, headers={
                    "authorization": f"Bearer {key}", "x-caller-skill": "unit"}) as client:
                assert [w["name"] for w in client.get("/registry").json()["workers"]] == visible
                status = client.get("/house/status")
                assert status.status_code == (200 if "house" in visible else 404)
    assert "house-coder" in routing.asked



DAY = 86400.0


class Lifetimes:
    """One scillm on ``backend`` whose handoffs live ``days``. On SQLite the store's clock is injected (``now``):
    tests move it, no sleep. redis-server's expiry runs on its own clock, which no test can move: there a test
    checks the expiry Redis holds for a handoff and then sets it to a past instant (``PEXPIREAT``), which is what
    the end of its lifetime does."""

    def __init__(self, server: ServerThread, backend: str) -> None:
        self.server, self.backend = server, backend
        self.store = agents_of(server.app.runtime).store
        self.now = [time.time()]
        if backend == "sqlite":
            self.store.clock = lambda: self.now[0]  # type: ignore[attr-defined]

    def _redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.store.url)  # type: ignore[attr-defined]

    def _key(self, owner: str, handoff_id: str) -> str:
        from scillm_agents.service import HANDOFFS_BY_KEY

        return f"alpha/{owner}/{handoff_id}" if self.backend == "sqlite" else \
            self.store._doc(HANDOFFS_BY_KEY, f"alpha/{owner}/{handoff_id}")  # type: ignore[attr-defined]

    def ttl_s(self, owner: str, handoff_id: str) -> float:
        """How long the store keeps the handoff from now (-1: for good)."""
        if self.backend == "sqlite":
            with self.store._lock:  # type: ignore[attr-defined]
                (expires,) = self.store._db.execute(  # type: ignore[attr-defined]
                    "SELECT expires FROM docs WHERE ns = 'agents.handoffs_by_key' AND key = ?",
                    (self._key(owner, handoff_id),)).fetchone()
            return -1.0 if expires is None else float(expires) - self.now[0]
        with self._redis() as client:
            ms = client.pttl(self._key(owner, handoff_id))
        return -1.0 if ms == -1 else ms / 1000.0

    def end_on_redis(self, owner: str, handoff_id: str) -> None:
        with self._redis() as client:
            assert client.pexpireat(self._key(owner, handoff_id), 1)


@pytest.fixture(params=["sqlite", "redis"])
def lifetimes(request: pytest.FixtureRequest, repo: Path, tmp_path: Path) -> Iterator[Callable[[float], Lifetimes]]:
    """``start(days)``: a scillm on the backend (SQLite, or the suite's redis-server) whose handoffs live ``days``,
    at most 2 per key."""
    state = {"state": request.getfixturevalue("redis_state")} if request.param == "redis" else {}
    servers: list[ServerThread] = []

    def start(days: float) -> Lifetimes:
        app = make_app(env={"SCILLM_MASTER_KEY": MASTER_KEY}, data_dir=tmp_path, only=PLUGINS, config={
            "agents": {"alpha": {"repository": str(repo), "model": "gpt-5.5"}}, **state,
            "standing_agents": {"max_handoffs_per_key": 2, "handoff_lifetime_days": days}})
        servers.append(ServerThread(app).start())
        return Lifetimes(servers[-1], request.param)

    yield start
    for server in servers:
        server.stop()


def test_a_handoff_expires_after_its_lifetime(lifetimes: Callable[[float], Lifetimes]) -> None:
    """Handoffs stayed until their key deleted them. Now one lives ``handoff_lifetime_days`` (7 by default) as the
    state store's expiry of its document: after that it answers 404 like one never posted, is not listed, and no
    longer counts against ``max_handoffs_per_key``; its id is free again."""
    store = lifetimes(7)
    (alice,) = _keys(store.server, "alice")
    owner = alice.owner  # type: ignore[attr-defined]
    first = alice.post("/alpha/handoffs", json={"handoff_id": "h1", "goal": "first"}).json()
    assert first["expires_at"] == pytest.approx(first["created_at"] + 7 * DAY)
    assert 7 * DAY - 60 < store.ttl_s(owner, "h1") <= 7 * DAY
    store.now[0] += DAY  # (SQLite) the second is posted a day later: it outlives the first by a day
    assert alice.post("/alpha/handoffs", json={"handoff_id": "h2", "goal": "second"}).status_code == 201
    assert 7 * DAY - 60 < store.ttl_s(owner, "h2") <= 7 * DAY
    full = alice.post("/alpha/handoffs", json={"handoff_id": "h3", "goal": "third"})
    assert full.status_code == 409 and full.json()["error"]["code"] == "too_many_handoffs"
    if store.backend == "sqlite":
        store.now[0] += 6 * DAY - 1  # a second before the first one's end: both still there
        assert alice.get("/alpha/status").json()["handoffs"] == ["h1", "h2"]
        store.now[0] += 1
    else:
        store.end_on_redis(owner, "h1")

    assert alice.get("/alpha/status").json()["handoffs"] == ["h2"]
    gone, never = (alice.get("/alpha/result", params={"handoff_id": h}) for h in ("h1", "h-never"))
    assert gone.status_code == never.status_code == 404
    assert gone.json()["error"]["message"].replace("h1", "?") == \
        never.json()["error"]["message"].replace("h-never", "?")
    assert alice.delete("/alpha/handoffs/h1").status_code == 404
    lease = alice.post("/alpha/leases", json={"owner": "alice", "handoff_id": "h1"})
    assert lease.status_code == 400 and lease.json()["error"]["param"] == "$.handoff_id"
    # its place under the cap is free again, and so is its id
    assert alice.post("/alpha/handoffs", json={"handoff_id": "h3", "goal": "third"}).status_code == 201
    assert alice.post("/alpha/handoffs", json={"handoff_id": "h4", "goal": "fourth"}).status_code == 409
    assert alice.delete("/alpha/handoffs/h3").status_code == 200
    again = alice.post("/alpha/handoffs", json={"handoff_id": "h1", "goal": "first, again"})
    assert again.status_code == 201 and again.json()["goal"] == "first, again"
    assert alice.get("/alpha/status").json()["handoffs"] == ["h1", "h2"]


def test_a_lifetime_of_zero_keeps_handoffs_until_deleted(lifetimes: Callable[[float], Lifetimes]) -> None:
    store = lifetimes(0)
    (alice,) = _keys(store.server, "alice")
    made = alice.post("/alpha/handoffs", json={"handoff_id": "h1", "goal": "kept"}).json()
    assert made["expires_at"] is None
    assert store.ttl_s(alice.owner, "h1") == -1  # type: ignore[attr-defined]
    store.now[0] += 3650 * DAY  # (SQLite) ten years on
    assert alice.get("/alpha/status").json()["handoffs"] == ["h1"]
    assert alice.post("/alpha/handoffs", json={"handoff_id": "h1", "goal": "kept"}).status_code == 200


def test_the_master_key_opens_any_listed_handoff_by_its_owner_and_id(repo: Path, tmp_path: Path) -> None:
    """The master key's status listed every key's handoff ids, but it could open only its own: another key's ``h1``
    was a 404 to it, and two keys' ``h1`` were listed as one. It now lists another key's as ``<owner>/<id>`` and
    opens, leases, reads the result of and deletes it by that name; a virtual key naming another key's handoff so
    gets what it gets for one that does not exist (404, never 409)."""
    from scillm_agents.service import RESULTS, TURNS

    with ServerThread(make_app(env={"SCILLM_MASTER_KEY": MASTER_KEY}, data_dir=tmp_path, only=PLUGINS, config={
            "agents": {"alpha": {"repository": str(repo), "model": "gpt-5.5"}}})) as server:
        alice, bob = _keys(server, "alice", "bob")
        a, b = alice.owner, bob.owner  # type: ignore[attr-defined]
        master = httpx.Client(base_url=server.url + "/v1/scillm/agents", timeout=60, headers={
            "authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": "unit"})
        for client, goal in ((alice, "ALICE"), (bob, "BOB"), (master, "MASTER")):
            assert client.post("/alpha/handoffs", json={"handoff_id": "h1", "goal": goal}).status_code == 201
        listed = master.get("/alpha/status").json()["handoffs"]
        assert listed == sorted(["h1", f"{a}/h1", f"{b}/h1"])
        store = agents_of(server.app.runtime).store

        async def alices_turn() -> None:  # a finished turn of alice's on her h1
            await store.put(TURNS, "alpha/t-alice", {"turn_id": "t-alice", "handoff_id": "h1", "identity": a,
                                                      "status": "completed", "started_at": 2.0})
            await store.put(RESULTS, f"alpha/{a}/h1", {"turn_id": "t-alice"})

        assert server.loop is not None
        asyncio.run_coroutine_threadsafe(alices_turn(), server.loop).result(30)
        assert master.get("/alpha/result", params={"handoff_id": f"{a}/h1"}).json()["turn_id"] == "t-alice"
        assert alice.get("/alpha/result", params={"handoff_id": "h1"}).json()["turn_id"] == "t-alice"
        assert alice.get("/alpha/result", params={"handoff_id": f"{a}/h1"}).json()["turn_id"] == "t-alice"  # so too
        assert master.get("/alpha/result", params={"handoff_id": f"{b}/h1"}).json()["error"]["message"].endswith(
            "has no finished turn yet")  # found: bob's
        assert master.get("/alpha/result", params={"handoff_id": "key_nobody/h1"}).status_code == 404
        for name in listed:  # every listed handoff can be leased (used) by the master key by its listed name
            lease = master.post("/alpha/leases", json={"owner": "admin", "handoff_id": name})
            assert lease.status_code == 200 and lease.json()["handoff_id"] == name and \
                lease.json()["lease_id"] == "h1-lease", lease.text
            assert master.post("/alpha/leases", json={"action": "release", "lease_id": "h1-lease"}).status_code == 200

        # another virtual key: alice's handoff is as if absent, by any name
        unknown = bob.get("/alpha/result", params={"handoff_id": "h-never"}).json()["error"]["message"]
        theirs = bob.get("/alpha/result", params={"handoff_id": f"{a}/h1"})
        assert theirs.status_code == 404
        assert theirs.json()["error"]["message"].replace(f"{a}/h1", "?") == unknown.replace("h-never", "?")
        assert bob.delete(f"/alpha/handoffs/{a}/h1").status_code == 404
        lease = bob.post("/alpha/leases", json={"owner": "bob", "handoff_id": f"{a}/h1"})
        assert lease.status_code == 400 and lease.json()["error"]["param"] == "$.handoff_id"
        assert bob.get("/alpha/result", params={"handoff_id": f"{b}/h1"}).json()["error"]["message"].endswith(
            "has no finished turn yet")  # its own, named in full
        bad = master.get("/alpha/result", params={"handoff_id": "a/b/c"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "query.handoff_id"

        deleted = master.delete(f"/alpha/handoffs/{a}/h1")
        assert deleted.json() == {"worker": "alpha", "handoff_id": f"{a}/h1", "deleted": True}
        assert alice.get("/alpha/status").json()["handoffs"] == []
        assert master.get("/alpha/status").json()["handoffs"] == sorted(["h1", f"{b}/h1"])
        assert bob.post("/alpha/handoffs", json={"handoff_id": "h1", "goal": "BOB"}).status_code == 200  # untouched
        master.close()
