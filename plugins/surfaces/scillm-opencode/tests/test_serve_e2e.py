"""OpenCode serve runs end to end: the real pinned opencode serve, started by scillm, against a scripted fake model
inside a loopback-only network namespace (one fake, one scillm, one opencode serve for the whole module)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import httpx
from opencode_helpers import FINAL, MASTER_KEY, PROVIDER_SECRET, Stack, scan_for_secrets

RUNS = "/v1/scillm/opencode/runs"


def test_run_edits_its_worktree_and_returns_the_diff(stack: Stack) -> None:
    repo = stack.repo()
    status_before = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True).stdout
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    response = stack.client.post(RUNS, json={"prompt": "[edit] change hello to goodbye", "agent": "build",
                                             "cwd": str(repo), "scillm_metadata": {"ticket": "T-1"}},
                                 headers={"traceparent": traceparent})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["status"] == "completed", result
    assert result["assistant_text"] == FINAL
    assert result["changed_paths"] == ["hello.txt"]
    assert "-hello world\n+goodbye world" in result["diff"]
    assert result["session_id"].startswith("ses_") and result["scillm_metadata"] == {"ticket": "T-1"}
    # the caller's tree, index and branch are untouched
    assert (repo / "hello.txt").read_text() == "hello world\n"
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True).stdout == status_before
    listing = subprocess.run(["git", "worktree", "list"], cwd=repo, capture_output=True, text=True).stdout
    assert len(listing.splitlines()) == 1  # the run's worktree is gone again
    # artifacts
    artifacts = result["artifacts"]
    assert Path(artifacts["diff_patch"]).read_text() == result["diff"]
    events = [json.loads(line) for line in Path(artifacts["events_jsonl"]).read_text().splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    types = [e["type"] for e in events]
    assert types[0] == "run_started" and types[-1] == "run_completed" and events[-1]["status"] == "completed"
    assert "user_message" in types and "transcript_delta" in types
    tools = [(e["tool"], e["status"]) for e in events if e["type"] == "tool_call"]
    assert ("read", "completed") in tools and ("edit", "completed") in tools
    # every model call came through scillm, attributed to the run, with scillm's provider key upstream
    calls = stack.fake.chat_requests()
    assert calls and all(c.headers["authorization"] == f"Bearer {PROVIDER_SECRET}" for c in calls)
    # the stored record reads back the same
    again = stack.client.get(f"{RUNS}/{result['run_id']}").json()
    assert again["status"] == "completed" and again["diff"] == result["diff"]
    assert scan_for_secrets(stack) == []
    # the managed server is sandboxed like exec's CLIs: the whole tree read-only but its home and the worktrees
    serve = stack.opencode.serve
    mounts = {line.split()[4]: line.split()[5] for line in Path(f"/proc/{serve.process.pid}/mountinfo").open()}
    assert mounts["/"].startswith("ro,")
    assert mounts[str(serve.home)].startswith("rw,") and mounts[str(serve.worktrees)].startswith("rw,")
    assert str(repo) not in mounts  # the caller's repository stays read-only to it
    # the call log attributes each model call to the caller and the run
    calls_logged = stack.client.get("/v1/scillm/calls").json()["data"]
    assert {c["caller"] for c in calls_logged} >= {f"opencode-tests/{result['run_id']}"}
    # reported as a unit of work (the dashboard's Runs tab, a span continuing the caller's trace) with its event
    # stream, and every model call of its session was made for it
    unit = stack.reported_for(f"run:opencode/{result['run_id']}")
    assert unit["start"]["trace"] == {"traceparent": traceparent} and unit["start"]["name"] == "opencode run"
    assert unit["start"]["attrs"]["events_url"] == f"{RUNS}/{result['run_id']}/events"
    assert unit["start"]["attrs"]["caller"] == "opencode-tests" and unit["end"]["status"] == "completed"
    assert len(unit["calls"]) == len(calls)
    # the dashboard lists it, and its event stream (what the page follows, with the same key) is the run's log
    listed = {r["unit"]: r for r in stack.client.get("/v1/scillm/ui/runs").json()["data"]}
    row = listed[f"run:opencode/{result['run_id']}"]
    assert (row["name"], row["status"], row["attrs"]["caller"]) == ("opencode run", "completed", "opencode-tests")
    tail = stack.client.get(row["attrs"]["events_url"])
    assert tail.status_code == 200 and '"run_completed"' in tail.text


def test_bad_requests_are_400s_naming_the_field(stack: Stack) -> None:
    repo = stack.repo()
    post = lambda body, **kw: stack.client.post(RUNS, json=body, **kw)  # noqa: E731
    chat_model = post({"prompt": "x", "agent": "opencode-go/kimi-k2.6", "cwd": str(repo)})
    assert chat_model.status_code == 400
    error = chat_model.json()["error"]
    assert error["param"] == "$.agent" and "chat model" in error["message"] and "model" in error["message"]
    routable = post({"prompt": "x", "agent": "gpt-5.5", "cwd": str(repo)})  # a model name without a slash
    assert routable.status_code == 400 and "chat model" in routable.json()["error"]["message"]
    unknown = post({"prompt": "x", "agent": "no-such-agent", "cwd": str(repo)})
    assert unknown.status_code == 400 and "build" in unknown.json()["error"]["message"]
    cases = {"$.prompt": {"agent": "build", "cwd": str(repo)},
             "$.cwd": {"prompt": "x", "cwd": "/etc"},
             "$.timeout_s": {"prompt": "x", "cwd": str(repo), "timeout_s": -1},
             "$.skills[0]": {"prompt": "x", "cwd": str(repo), "skills": ["Bad Name"]},
             "$.model": {"prompt": "x", "cwd": str(repo), "model": "nope/never"},
             "$.wait": {"prompt": "x", "cwd": str(repo), "wait": "yes"},
             "$.bogus": {"prompt": "x", "cwd": str(repo), "bogus": 1}}
    for param, body in cases.items():
        response = post(body)
        assert response.status_code == 400, (param, response.text)
        assert response.json()["error"]["param"] == param, response.text
    plain = stack.root / "not-a-repo"
    plain.mkdir()
    not_git = post({"prompt": "x", "cwd": str(plain)})
    assert not_git.status_code == 400 and "git" in not_git.json()["error"]["message"]
    no_caller = stack.client.post(RUNS, json={"prompt": "x", "cwd": str(repo)}, headers={"x-caller-skill": ""})
    assert no_caller.status_code == 400 and no_caller.json()["error"]["code"] == "caller_skill_required"
    assert stack.client.get(f"{RUNS}/oc-nope").status_code == 404
    for path, param in ((f"{RUNS}/oc-nope/events?after=x", "query.after"), (f"{RUNS}?limit=0", "query.limit"),
                        (f"{RUNS}?limit=99999", "query.limit")):
        response = stack.client.get(path)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    bad_resume = stack.client.get(f"{RUNS}/oc-nope/events", headers={"last-event-id": "abc"})
    assert bad_resume.status_code == 400 and bad_resume.json()["error"]["param"] == "Last-Event-ID"


def test_requested_skill_reaches_the_session_and_a_missing_one_is_reported(stack: Stack) -> None:
    skill = stack.skills / "notes"
    skill.mkdir()
    (skill / "SKILL.md").write_text("---\nname: notes\ndescription: how to take notes\n---\nSKILL-BODY-7731\n")
    other = stack.skills / "other"
    other.mkdir()
    (other / "SKILL.md").write_text("---\nname: other\ndescription: not requested\n---\nOTHER-BODY\n")
    before = len(stack.fake.chat_requests())
    result = stack.client.post(RUNS, json={"prompt": "[skill:notes] use it", "cwd": str(stack.repo()),
                                           "skills": ["notes", "absent-skill"]}).json()
    assert result["status"] == "completed", result
    assert result["skills_materialized"] == ["notes"] and result["skills_missing"] == ["absent-skill"]
    assert "SKILL-BODY-7731" in result["assistant_text"]
    requests = stack.fake.chat_requests()[before:]
    system = requests[0].body["messages"][0]["content"]
    assert "<name>notes</name>" in system and "<name>other</name>" not in system  # only what the run asked for
    tool_results = [m for r in requests for m in r.body["messages"] if m["role"] == "tool"]
    assert any("SKILL-BODY-7731" in json.dumps(m) for m in tool_results)


def test_stalled_model_times_out_and_leaves_no_busy_session(stack: Stack) -> None:
    result = stack.client.post(RUNS, json={"prompt": "[hang]", "cwd": str(stack.repo()), "timeout_s": 3}).json()
    assert result["status"] == "timeout", result
    assert "timeout_s=3" in result["error"]
    assert result["finished_at"] - result["started_at"] < 3 + 15  # the abort grace is bounded
    server = stack.opencode.serve.server

    async def busy() -> dict:
        return await server.client.status(None)

    import asyncio

    status = asyncio.run_coroutine_threadsafe(server.client.call("GET", "/session/status"),
                                              stack.server.loop).result(30)
    assert result["session_id"] not in (status or {})
    events, _ = stack.events(f"{RUNS}/{result['run_id']}/events")
    assert events[-1]["type"] == "run_completed" and events[-1]["status"] == "timeout"


def test_an_abort_body_is_read_bounded(stack: Stack) -> None:
    """A body that says 10 GB is a 413 before any of it is read (it was read whole, then bounded)."""
    import socket

    host, port = stack.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.settimeout(60)  # the failure was a wait for the rest of the body: this only bounds that wait
        sock.sendall(f"POST {RUNS}/run-none/abort HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {MASTER_KEY}\r\n"
                     "x-caller-skill: t\r\ncontent-type: application/json\r\ncontent-length: 10000000000\r\n\r\n"
                     '{"reason": "'.encode())
        head = sock.recv(65536).split(b"\r\n", 1)[0]
    assert head == b"HTTP/1.1 413 Request Entity Too Large", head


def test_abort_ends_the_run_and_is_final(stack: Stack) -> None:
    gate, arrived = stack.fake.gate("abort"), stack.fake.arrival("abort")
    receipt = stack.client.post(RUNS, json={"prompt": "[gate:abort]", "cwd": str(stack.repo()), "wait": False})
    assert receipt.status_code == 200 and receipt.json()["status"] == "running"
    run_id = receipt.json()["run_id"]
    assert arrived.wait(60)
    aborted = stack.client.post(f"{RUNS}/{run_id}/abort", json={"reason": "operator said stop"}).json()
    assert aborted["status"] == "aborted" and aborted["error"] == "operator said stop"
    gate.set()  # the model's late answer and OpenCode's own abort events arrive now
    events, frames = stack.events(f"{RUNS}/{run_id}/events")
    assert frames[-1].startswith("event: end")
    assert [e["type"] for e in events if e["type"] == "run_completed"] == ["run_completed"]
    assert events[-1]["type"] == "run_completed" and events[-1]["status"] == "aborted"
    assert stack.client.get(f"{RUNS}/{run_id}").json()["status"] == "aborted"
    again = stack.client.post(f"{RUNS}/{run_id}/abort")
    assert again.status_code == 200 and again.json()["status"] == "aborted"
    # the receipt's monitor link: a read-only key for this run's GET routes, in the URL fragment only
    url = receipt.json()["monitor_url"]
    assert url.startswith(stack.url + f"{RUNS}/{run_id}/monitor#token=sk-scillm-view-")
    view = {"authorization": "Bearer " + url.split("#token=", 1)[1]}
    page = stack.client.get(url.split("#", 1)[0], headers={"authorization": ""})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert stack.client.get(f"{RUNS}/{run_id}", headers=view).json()["status"] == "aborted"
    assert "run_completed" in stack.client.get(f"{RUNS}/{run_id}/events", headers=view).text
    assert stack.client.post(f"{RUNS}/{run_id}/abort", headers=view).status_code == 403
    assert stack.client.get(RUNS, headers=view).status_code == 403
    fresh = stack.client.post(f"{RUNS}/{run_id}/monitor")
    assert fresh.status_code == 200 and fresh.json()["monitor_url"] != url


def test_events_stream_heartbeats_and_ends_after_the_terminal_event(stack: Stack) -> None:
    gate, arrived = stack.fake.gate("sse"), stack.fake.arrival("sse")
    run_id = stack.client.post(RUNS, json={"prompt": "[gate:sse]", "cwd": str(stack.repo()),
                                           "wait": False}).json()["run_id"]
    assert arrived.wait(60)

    def on_frame(frame: str) -> None:
        if frame == ": heartbeat":
            gate.set()  # quiet while the model is held: heartbeats came, now let it finish

    _, frames = stack.events(f"{RUNS}/{run_id}/events", on_frame=on_frame)
    kinds = [json.loads(f.split("data: ", 1)[1])["type"] for f in frames if f.startswith("id: ")]
    assert ": heartbeat" in frames
    assert kinds[-1] == "run_completed" and frames[-1].startswith("event: end")
    ids = [int(f.split("\n", 1)[0][4:]) for f in frames if f.startswith("id: ")]
    later, _ = stack.events(f"{RUNS}/{run_id}/events", after=ids[2])
    assert [e["seq"] for e in later] == ids[3:]  # resumed after a seq: only later events


def test_killing_the_server_mid_run_ends_it_error_and_the_next_run_works(stack: Stack) -> None:
    import os
    import signal

    arrived = stack.fake.arrival("kill")
    run_id = stack.client.post(RUNS, json={"prompt": "[gate:kill]", "cwd": str(stack.repo()),
                                           "wait": False}).json()["run_id"]
    assert arrived.wait(60)
    serve = stack.opencode.serve
    old_pid, generation = serve.process.pid, serve.server.generation
    os.killpg(old_pid, signal.SIGKILL)
    doc = stack.wait_status(f"{RUNS}/{run_id}", ("error", "completed", "timeout", "aborted"))
    assert doc["status"] == "error" and "opencode serve exited" in doc["error"], doc
    stack.fake.gate("kill").set()
    result = stack.client.post(RUNS, json={"prompt": "[edit]", "cwd": str(stack.repo())}).json()
    assert result["status"] == "completed", result
    assert serve.server.generation > generation and serve.process.pid != old_pid


def test_receipt_index_and_debugger_flow(stack: Stack) -> None:
    skill = stack.skills / "debugger"
    skill.mkdir(exist_ok=True)
    (skill / "SKILL.md").write_text("---\nname: debugger\ndescription: debug with evidence\n---\nDEBUG-SKILL\n")
    before = len(stack.fake.chat_requests())
    result = stack.client.post("/v1/scillm/opencode/serve/debugger/run",
                               json={"prompt": "[read] why does hello say hello?", "cwd": str(stack.repo())}).json()
    assert result["status"] == "completed", result
    assert result["agent"] == "scillm-debugger"
    assert result["skills_requested"] == ["debugger", "memory", "scillm"]
    assert result["skills_materialized"] == ["debugger"] and result["skills_missing"] == ["memory", "scillm"]
    system = stack.fake.chat_requests()[before].body["messages"][0]["content"]
    assert "You are the scillm debugger" in system and "<name>debugger</name>" in system
    index = stack.client.get(RUNS).json()["runs"]
    assert index[0]["run_id"] == result["run_id"] and index[0]["status"] == "completed"
    assert scan_for_secrets(stack) == []
    assert MASTER_KEY not in json.dumps(index)


def test_requests_racing_for_one_run_id_get_one_run_and_409s(stack: Stack) -> None:
    """A client retrying with its own run_id while the first request is still making the worktree: the id was
    checked before the claim (an await apart), so the loser's mkdir raised FileExistsError, a 500."""
    from concurrent.futures import ThreadPoolExecutor

    body = {"prompt": "say hi", "cwd": str(stack.repo()), "wait": False, "run_id": "oc-raced-1"}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: stack.client.post(RUNS, json=body), range(4)))
    codes = sorted(a.status_code for a in answers)
    assert codes[0] == 200 and codes[1:] == [409, 409, 409], [a.text for a in answers]
    assert all(a.json()["error"]["param"] == "$.run_id" for a in answers if a.status_code == 409)
    stack.wait_status(f"{RUNS}/oc-raced-1", ("completed", "error", "timeout", "aborted"))


def test_an_existing_server_at_opencode_server_url(stack: Stack, tmp_path: Path) -> None:
    """With OPENCODE_SERVER_URL scillm starts nothing: it uses that server (Basic auth with
    OPENCODE_SERVER_PASSWORD), its agents, models and skills, and leaves it running when scillm stops."""
    import os
    import re
    import signal

    from opencode_helpers import ONLY
    from scillm_agent_runners.base import REPO_TOOLS
    from scillm_agent_runners.clis import opencode_env

    from scillm_core.testing import ServerThread, make_app

    password = "sk-ext-password-SECRET-31337"
    config = {"autoupdate": False, "share": "disabled", "model": "theirs/fake-model", "enabled_providers": ["theirs"],
              "provider": {"theirs": {"npm": "@ai-sdk/openai-compatible", "name": "theirs",
                                      "options": {"baseURL": stack.fake.url + "/v1", "apiKey": "sk-theirs"},
                                      "models": {"fake-model": {"name": "fake-model", "tool_call": True}}}},
              "permission": {"edit": "allow", "bash": "deny", "question": "deny", "webfetch": "deny"}}
    cli = str(REPO_TOOLS / "node_modules" / ".bin" / "opencode")
    (tmp_path / "home").mkdir()
    env = opencode_env(cli, tmp_path / "home", "unused", config, extra={"OPENCODE_SERVER_PASSWORD": password})
    theirs = subprocess.Popen([cli, "serve", "--hostname", "127.0.0.1", "--port", "0"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert theirs.stdout is not None
        line = b""
        while b"listening on" not in line:
            line = theirs.stdout.readline()
            assert line, "their opencode serve did not start"
        url = re.search(rb"(http://\S+)", line).group(1).decode()  # type: ignore[union-attr]
        app = make_app(env={"SCILLM_MASTER_KEY": MASTER_KEY, "SCILLM_OPENCODE_SERVE_ENABLED": "1",
                            "OPENCODE_SERVER_URL": url, "OPENCODE_SERVER_PASSWORD": password},
                       data_dir=tmp_path / "data", config={"exec": {"allowed_roots": [str(stack.root)]}}, only=ONLY)
        with ServerThread(app) as server:
            client = stack.client.__class__(base_url=server.url, timeout=120, headers=dict(stack.client.headers))
            result = client.post(RUNS, json={"prompt": "[edit]", "cwd": str(stack.repo()),
                                             "model": "theirs/fake-model", "skills": ["notes"]}).json()
            assert result["status"] == "completed", result
            assert result["changed_paths"] == ["hello.txt"] and result["model"] == {"providerID": "theirs",
                                                                                   "modelID": "fake-model"}
            assert result["skills_missing"] == ["notes"]  # its own skills only; scillm copies none into it
            status = client.get("/v1/scillm/opencode/serve").json()["serve"]
            assert status["mode"] == "external" and status["pid"] is None
            wrong_model = client.post(RUNS, json={"prompt": "x", "cwd": str(stack.repo()), "model": "scillm/x"})
            assert wrong_model.status_code == 400 and "theirs/fake-model" in wrong_model.json()["error"]["message"]
        assert theirs.poll() is None  # scillm stopped; their server did not
        assert password not in (tmp_path / "data" / "opencode" / "runs" / result["run_id"] / "events.jsonl").read_text()
    finally:
        os.killpg(theirs.pid, signal.SIGKILL)
        theirs.wait(timeout=10)


def test_a_run_driven_by_one_instance_is_read_tailed_and_aborted_through_another(stack: Stack) -> None:
    """A second scillm on the same state store (the SQLite of this machine, as ``--workers`` share it) that never
    started the run: it reads the record, tails the events as the driving instance copies them into the store, and
    its abort reaches the run."""
    from opencode_helpers import MODEL, ONLY

    from scillm_core.testing import ServerThread, make_app

    other = make_app(env={"OPENAI_API_KEY": PROVIDER_SECRET, "OPENAI_API_BASE": stack.fake.url + "/v1",
                          "SCILLM_MASTER_KEY": MASTER_KEY, "SCILLM_OPENCODE_SERVE_ENABLED": "1"},
                     data_dir=stack.data_dir, config={"exec": {"allowed_roots": [str(stack.root)]},
                                                      "opencode": {"model": MODEL, "heartbeat_s": 0.5}}, only=ONLY)
    gate, arrived = stack.fake.gate("elsewhere"), stack.fake.arrival("elsewhere")
    run_id = stack.client.post(RUNS, json={"prompt": "[gate:elsewhere]", "cwd": str(stack.repo()),
                                           "wait": False}).json()["run_id"]
    with ServerThread(other) as thread:
        b = httpx.Client(base_url=thread.url, timeout=180, headers={
            "authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": "opencode-tests"})
        assert arrived.wait(60)
        assert b.get(f"{RUNS}/{run_id}").json()["status"] == "running"
        frames: list[str] = []

        def tail() -> None:  # B follows the run while it is live (through the store: B does not drive it)
            stack.events(f"{RUNS}/{run_id}/events", client=b, on_frame=frames.append)

        follower = threading.Thread(target=tail)
        follower.start()
        deadline = time.monotonic() + 60
        while not any(f.startswith("id: ") for f in frames):  # the first events reached B
            assert time.monotonic() < deadline, frames
            time.sleep(0.05)
        assert b.post(f"{RUNS}/{run_id}/abort", json={"reason": "stopped elsewhere"}).json()["status"] == "aborted"
        assert stack.client.get(f"{RUNS}/{run_id}").json()["error"] == "stopped elsewhere"
        gate.set()
        follower.join(120)
        mine, _ = stack.events(f"{RUNS}/{run_id}/events")
        theirs = [json.loads(f.split("data: ", 1)[1]) for f in frames if f.startswith("id: ")]
        assert theirs == mine and theirs[-1]["type"] == "run_completed" and theirs[-1]["status"] == "aborted"
        end = json.loads(frames[-1].split("data: ", 1)[1])
        assert frames[-1].startswith("event: end") and end["status"] == "aborted" and end["seq"] == mine[-1]["seq"]


def test_a_virtual_keys_run_is_its_own_and_its_model_calls_are_charged_to_it(stack: Stack) -> None:
    """Two virtual keys: a run started with one is invisible to the other (404 on every run route, absent from its
    index) and its model calls (made by opencode serve with its per-session key) are charged to the key that
    started it, in its spend and its budget; the master key sees everything."""
    made = [stack.client.post("/v1/scillm/keys", json={"name": name, "limits": {"daily_usd": 5}}).json()
            for name in ("a", "b")]
    alice, bob = (httpx.Client(base_url=stack.url, timeout=180, headers={
        "authorization": f"Bearer {m['key']}", "x-caller-skill": "teams"}) for m in made)
    result = alice.post(RUNS, json={"prompt": "[read] what does hello say?", "agent": "build",
                                    "cwd": str(stack.repo())}).json()
    assert result["status"] == "completed", result
    run_id = result["run_id"]
    assert result["owner"] == made[0]["id"] and result["cost_usd"] > 0
    for method, path in (("GET", f"{RUNS}/{run_id}"), ("GET", f"{RUNS}/{run_id}/events"),
                         ("GET", f"{RUNS}/{run_id}/diff"), ("POST", f"{RUNS}/{run_id}/abort"),
                         ("POST", f"{RUNS}/{run_id}/monitor")):
        refused = bob.request(method, path)
        assert refused.status_code == 404, (method, path, refused.text)
        assert refused.json()["error"]["message"] == f"no run {run_id!r}"
    assert run_id not in [r["run_id"] for r in bob.get(RUNS).json()["runs"]]
    assert run_id in [r["run_id"] for r in alice.get(RUNS).json()["runs"]]
    assert alice.get(f"{RUNS}/{run_id}/diff").status_code == 200
    assert stack.client.get(f"{RUNS}/{run_id}").json()["owner"] == made[0]["id"]  # the master key sees it
    # the session's model calls were alice's: her spend by run, her budget; nothing of it is bob's or the master's
    spend = alice.get("/v1/scillm/spend", params={"group_by": "run"}).json()
    mine = next(g for g in spend["groups"] if g["run"] == run_id)
    assert mine["calls"] >= 2 and mine["cost_usd"] == result["cost_usd"]
    assert alice.get("/v1/budget").json()["spent"] >= mine["cost_usd"] > 0
    assert bob.get("/v1/scillm/spend", params={"group_by": "run"}).json()["calls"] == 0
    master = stack.client.get("/v1/scillm/spend", params={"group_by": "run", "key": "master"}).json()
    assert run_id not in [g["run"] for g in master["groups"]]
    calls = [c for c in stack.client.get("/v1/scillm/calls").json()["data"] if c.get("run") == run_id]
    assert calls and {c["owner"] for c in calls} == {made[0]["id"]}
    # the server's address and process are the master key's to see; live runs are each key's own
    assert set(bob.get("/v1/scillm/opencode/serve").json()["serve"]) == {"mode", "state", "version"}
    assert set(bob.get("/v1/scillm/opencode/transport/capabilities").json()["opencode"]) == {"mode", "state",
                                                                                            "version"}
    assert stack.client.get("/v1/scillm/opencode/serve").json()["serve"]["url"]
    assert scan_for_secrets(stack, [m["key"] for m in made]) == []


def test_a_run_with_max_cost_usd_is_stopped_at_its_ceiling(stack: Stack) -> None:
    """``max_cost_usd`` caps what a run's session may spend (the budgets middleware's job ceiling, as for exec runs):
    a ceiling too low for the first call refuses it with 429 budget_exceeded before it reaches the model, and the
    run ends failed saying why; a run within its ceiling completes with its cost."""
    repo = stack.repo()
    bad = stack.client.post(RUNS, json={"prompt": "x", "cwd": str(repo), "max_cost_usd": "a lot"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "$.max_cost_usd"
    before = len(stack.fake.chat_requests())
    stopped = stack.client.post(RUNS, json={"prompt": "[read] CEILING-RUN-5 what does hello say?", "cwd": str(repo),
                                            "max_cost_usd": 1e-9}).json()
    assert stopped["status"] == "failed" and stopped["error"].startswith("stopped: budget exceeded"), stopped
    assert "max_cost_usd" in stopped["error"] and stopped["max_cost_usd"] == 1e-9 and stopped["cost_usd"] == 0
    assert not [r for r in stack.fake.chat_requests()[before:] if "CEILING-RUN-5" in json.dumps(r.body)]
    refused = [c for c in stack.client.get("/v1/scillm/calls").json()["data"] if c.get("run") == stopped["run_id"]]
    assert refused and all((c["status"], c["error_code"]) == (429, "budget_exceeded") for c in refused)
    assert stack.client.get(f"{RUNS}/{stopped['run_id']}").json()["status"] == "failed"
    roomy = stack.client.post(RUNS, json={"prompt": "[read] what does hello say?", "cwd": str(repo),
                                          "max_cost_usd": 5}).json()
    assert roomy["status"] == "completed" and roomy["max_cost_usd"] == 5 and 0 < roomy["cost_usd"] <= 5, roomy


def _frames(response: httpx.Response) -> tuple[list[dict[str, object]], dict[str, object]]:
    """A finished run's SSE answer: its data events and its end frame's data."""
    assert response.status_code == 200, response.text
    frames = response.text.strip().split("\n\n")
    assert frames[-1].startswith("event: end\n")
    data = [json.loads(f.split("data: ", 1)[1]) for f in frames if f.startswith("id: ")]
    return data, json.loads(frames[-1].split("data: ", 1)[1])


def test_finished_runs_are_not_kept_in_memory_and_read_back_from_their_run_dirs(stack: Stack) -> None:
    """Every run (its prompt, up to 4 MiB, its diff and answer) stayed in the book's memory for the life of the
    server; a finished one is dropped (nothing in scillm keeps the run object) and read back from its run dir by
    every route, here and in a restarted scillm on the same data dir."""
    import gc
    import weakref

    from opencode_helpers import MODEL, ONLY

    from scillm_core.testing import ServerThread, make_app

    book = stack.opencode.runs
    ids = [stack.client.post(RUNS, json={"prompt": f"[edit] run {i}", "cwd": str(stack.repo()), "wait": False}
                             ).json()["run_id"] for i in range(3)]
    objects = [weakref.ref(book.runs[run_id]) for run_id in ids]
    finished = [stack.wait_status(f"{RUNS}/{run_id}", ("completed", "error", "timeout", "aborted")) for run_id in ids]
    assert [r["status"] for r in finished] == ["completed"] * 3, finished
    deadline = time.monotonic() + 30
    while set(ids) & set(book.runs) or any(ref() is not None for ref in objects):
        assert time.monotonic() < deadline, [ref() for ref in objects]
        stack.reported.clear()  # this module's own record of events (their calls' jobs name the runs)
        gc.collect()
        time.sleep(0.05)
    for result in finished:
        assert result["assistant_text"] == FINAL and result["changed_paths"] == ["hello.txt"]
        assert "-hello world\n+goodbye world" in result["diff"]

    def read_back(client: httpx.Client) -> None:
        for result in finished:
            run_id = result["run_id"]
            shown = client.get(f"{RUNS}/{run_id}").json()
            for key in ("status", "assistant_text", "diff", "changed_paths", "session_id", "owner", "artifacts"):
                assert shown[key] == result[key], key
            events, end = _frames(client.get(f"{RUNS}/{run_id}/events"))
            assert events[-1]["type"] == "run_completed" and events[-1]["status"] == "completed"
            assert end == {"type": "end", "run_id": run_id, "status": "completed", "seq": events[-1]["seq"]}
            resumed, end = _frames(client.get(f"{RUNS}/{run_id}/events", headers={"last-event-id": "2"}))
            assert resumed == events[2:] and end["status"] == "completed"  # an EventSource reconnecting
            diff = client.get(f"{RUNS}/{run_id}/diff").json()
            assert (diff["diff"], diff["changed_paths"], diff["live"]) == (result["diff"], ["hello.txt"], False)
            assert Path(result["artifacts"]["diff_patch"]).read_text() == result["diff"]
            assert client.post(f"{RUNS}/{run_id}/abort").json()["status"] == "completed"  # over: changes nothing

    read_back(stack.client)
    restarted = make_app(env={"OPENAI_API_KEY": PROVIDER_SECRET, "OPENAI_API_BASE": stack.fake.url + "/v1",
                              "SCILLM_MASTER_KEY": MASTER_KEY, "SCILLM_OPENCODE_SERVE_ENABLED": "1"},
                         data_dir=stack.data_dir, config={"exec": {"allowed_roots": [str(stack.root)]},
                                                          "opencode": {"model": MODEL}}, only=ONLY)
    with ServerThread(restarted) as thread:
        read_back(httpx.Client(base_url=thread.url, timeout=60, headers={
            "authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": "opencode-tests"}))
