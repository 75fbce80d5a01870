"""The OpenCode transport end to end: DAGs of real OpenCode sessions (the pinned opencode serve that scillm starts),
one normalised SSE stream per run, steering, permission answers, abort, failed nodes; against a scripted fake model
inside a loopback-only network namespace (one fake, one scillm, one opencode serve for the module)."""

from __future__ import annotations

import json
import time
from typing import Any

from opencode_helpers import FINAL, Stack, scan_for_secrets
from selenium.webdriver.support.ui import WebDriverWait

T = "/v1/scillm/opencode/transport"
TERMINAL = ("completed", "failed", "aborted", "timeout", "error")


def start(stack: Stack, nodes: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    response = stack.client.post(f"{T}/runs", json={"workspace": str(stack.repo()), "nodes": nodes, **extra})
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def finish(stack: Stack, run_id: str) -> dict[str, Any]:
    return stack.wait_status(f"{T}/runs/{run_id}", TERMINAL)


def pending_permissions(stack: Stack, run_id: str) -> list[str]:
    """Until the run's first node has a permission request waiting for an answer."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        pending = stack.client.get(f"{T}/runs/{run_id}").json()["nodes"][0]["pending_permissions"]
        if pending:
            return pending  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError("no permission request arrived")


def test_two_node_dag_streams_both_nodes_in_order_and_resumes(stack: Stack) -> None:
    run = start(stack, [{"id": "a", "prompt": "[edit] change hello", "agent": "build"},
                        {"id": "b", "prompt": "[read] what does hello.txt say now?", "depends_on": ["a"],
                         "mode": "propose-only"}])
    run_id = run["run_id"]
    assert run["status"] == "running" and run["events_stream"].endswith("/events/stream")
    events, frames = stack.events(f"{T}/runs/{run_id}/events/stream")
    assert frames[-1].startswith("event: end")
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert all({"seq", "node", "ts", "type"} <= set(e) for e in events)
    kinds = [(e["type"], e["node"]) for e in events]
    order = [kinds.index(k) for k in [("run_started", None), ("node_started", "a"), ("node_completed", "a"),
                                      ("node_started", "b"), ("node_completed", "b"), ("run_completed", None)]]
    assert order == sorted(order) and order[-1] == len(events) - 1
    assert ("transcript_delta", "a") in kinds and ("transcript_delta", "b") in kinds
    assert ("tool_call", "a") in kinds and ("tool_call", "b") in kinds
    doc = stack.client.get(f"{T}/runs/{run_id}").json()
    assert doc["status"] == "completed", doc
    nodes = {n["id"]: n for n in doc["nodes"]}
    assert nodes["a"]["assistant_text"] == FINAL
    assert "goodbye world" in nodes["b"]["assistant_text"]  # b ran after a, in the same worktree
    assert doc["changed_paths"] == ["hello.txt"] and "+goodbye world" in doc["diff"]
    # resume after a seq: only what came later
    cut = events[len(events) // 2]["seq"]
    later, _ = stack.events(f"{T}/runs/{run_id}/events/stream", after=cut)
    assert [e["seq"] for e in later] == [e["seq"] for e in events if e["seq"] > cut]
    resumed = stack.client.get(f"{T}/runs/{run_id}/events/stream", headers={"last-event-id": str(cut)})
    assert f"id: {cut + 1}\n" in resumed.text and f"id: {cut}\n" not in resumed.text
    # reported as a graph of units (the dashboard's Runs tab, traces): the run, its nodes inside it, and each
    # node's model calls made for that node
    graph = stack.reported_for(f"graph:opencode/{run_id}")
    assert graph["start"]["attrs"]["events_url"] == f"{T}/runs/{run_id}/events/stream"
    assert graph["end"]["status"] == "completed"
    for node in ("a", "b"):
        unit = stack.reported_for(f"run:opencode/{run_id}/{node}")
        assert unit["start"]["parent"] == f"graph:opencode/{run_id}" and unit["end"]["status"] == "completed"
        assert unit["calls"] and unit["start"]["attrs"]["events_url"].startswith(f"{T}/runs/{run_id}/events/")


def test_steer_reaches_the_next_model_request_and_the_node_completes(stack: Stack) -> None:
    run_id = start(stack, [{"id": "a", "prompt": "[steer] read hello"}])["run_id"]
    assert stack.fake.arrival("steer").wait(60)  # node a's first model call is being answered now
    steer = stack.client.post(f"{T}/runs/{run_id}/steer", json={"node": "a", "message": "STEER-NOW: be brief"})
    assert steer.status_code == 200 and steer.json()["delivered"] is True, steer.text
    stack.fake.gate("steer").set()
    doc = finish(stack, run_id)
    assert doc["status"] == "completed", doc
    assert doc["nodes"][0]["assistant_text"] == "STEERED"
    later = [r for r in stack.fake.chat_requests() if "STEER-NOW" in json.dumps(r.body["messages"])]
    assert later and later[0].body["messages"][-1]["role"] == "user"  # after the tool step, as a user message
    events, _ = stack.events(f"{T}/runs/{run_id}/events/stream")
    assert any(e["type"] == "steer" and e["node"] == "a" for e in events)
    assert any(e["type"] == "user_message" and "STEER-NOW" in e["text"] for e in events)
    late = stack.client.post(f"{T}/runs/{run_id}/steer", json={"node": "a", "message": "too late"})
    assert late.status_code == 409


def test_permission_request_is_answered_through_the_endpoint(stack: Stack) -> None:
    run_id = start(stack, [{"id": "a", "prompt": "[edit]",
                            "permission": [{"permission": "edit", "pattern": "*", "action": "ask"}]}])["run_id"]
    pending = pending_permissions(stack, run_id)
    wrong = stack.client.post(f"{T}/runs/{run_id}/permission", json={"permission_id": "per_nope", "reply": "once"})
    assert wrong.status_code == 404
    bad = stack.client.post(f"{T}/runs/{run_id}/permission", json={"permission_id": pending[0], "reply": "maybe"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "$.reply"
    answer = stack.client.post(f"{T}/runs/{run_id}/permission", json={"permission_id": pending[0], "reply": "once"})
    assert answer.status_code == 200, answer.text
    doc = finish(stack, run_id)
    assert doc["status"] == "completed" and doc["changed_paths"] == ["hello.txt"], doc
    events, _ = stack.events(f"{T}/runs/{run_id}/events/stream")
    asked = [e for e in events if e["type"] == "permission_requested"]
    assert asked and asked[0]["permission_id"] == pending[0] and asked[0]["permission"] == "edit"
    assert any(e["type"] == "permission_replied" and e["reply"] == "once" for e in events)


def test_abort_stays_final_when_late_events_arrive(stack: Stack) -> None:
    run_id = start(stack, [{"id": "a", "prompt": "[gate:tabort]"}, {"id": "b", "prompt": "[read]",
                                                                     "depends_on": ["a"]}])["run_id"]
    assert stack.fake.arrival("tabort").wait(60)
    aborted = stack.client.post(f"{T}/runs/{run_id}/abort")
    assert aborted.status_code == 200 and aborted.json()["status"] == "aborted", aborted.text
    stack.fake.gate("tabort").set()  # the held model answer comes back after the abort
    time.sleep(1)
    doc = stack.client.get(f"{T}/runs/{run_id}").json()
    assert doc["status"] == "aborted"
    assert {n["id"]: n["status"] for n in doc["nodes"]} == {"a": "aborted", "b": "skipped"}
    events, _ = stack.events(f"{T}/runs/{run_id}/events/stream")
    assert events[-1]["type"] == "run_completed" and events[-1]["status"] == "aborted"
    assert not [e for e in events if e["type"] in ("node_completed", "node_failed")]
    assert [e["type"] for e in events].count("run_completed") == 1


def test_failed_node_skips_its_dependant(stack: Stack) -> None:
    run_id = start(stack, [{"id": "a", "prompt": "[fail]"}, {"id": "b", "prompt": "[read]", "depends_on": ["a"]},
                           {"id": "c", "prompt": "[read]"}])["run_id"]
    doc = finish(stack, run_id)
    nodes = {n["id"]: n for n in doc["nodes"]}
    assert doc["status"] == "failed"
    assert nodes["a"]["status"] == "failed" and nodes["a"]["error"]
    assert nodes["b"]["status"] == "skipped" and "'a'" in nodes["b"]["error"]
    assert nodes["c"]["status"] == "completed"
    events, _ = stack.events(f"{T}/runs/{run_id}/events/stream")
    assert ("node_failed", "a") in [(e["type"], e["node"]) for e in events]
    assert ("node_skipped", "b") in [(e["type"], e["node"]) for e in events]
    assert not any(e["node"] == "b" and e["type"] == "node_started" for e in events)


def test_a_propose_only_node_that_wrote_fails(stack: Stack) -> None:
    run_id = start(stack, [{"id": "p", "prompt": "[edit]", "mode": "propose-only",
                            "permission": [{"permission": "edit", "pattern": "*", "action": "ask"}]}])["run_id"]
    pending = pending_permissions(stack, run_id)
    stack.client.post(f"{T}/runs/{run_id}/permission", json={"permission_id": pending[0], "reply": "once"})
    doc = finish(stack, run_id)
    assert doc["status"] == "failed" and doc["nodes"][0]["status"] == "failed"
    assert "propose-only" in doc["nodes"][0]["error"] and "edit" in doc["nodes"][0]["error"]


def test_transport_bad_requests_and_capabilities(stack: Stack) -> None:
    repo = str(stack.repo())
    post = lambda body: stack.client.post(f"{T}/runs", json=body)  # noqa: E731
    cases = {
        "$.nodes": {"workspace": repo, "nodes": [{"id": "a", "prompt": "x", "depends_on": ["b"]},
                                                 {"id": "b", "prompt": "x", "depends_on": ["a"]}]},
        "$.nodes[0].depends_on[0]": {"workspace": repo, "nodes": [{"id": "a", "prompt": "x", "depends_on": ["z"]}]},
        "$.nodes[1].id": {"workspace": repo, "nodes": [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}]},
        "$.nodes[0].agent": {"workspace": repo, "nodes": [{"id": "a", "prompt": "x",
                                                           "agent": "opencode-go/kimi-k2.6"}]},
        "$.nodes[0].mode": {"workspace": repo, "nodes": [{"id": "a", "prompt": "x", "mode": "yolo"}]},
        "$.nodes[0].permission[0].action": {"workspace": repo, "nodes": [{"id": "a", "prompt": "x", "permission": [
            {"permission": "edit", "pattern": "*", "action": "sure"}]}]},
        "$.workspace": {"workspace": "/", "nodes": [{"id": "a", "prompt": "x"}]},
    }
    for param, body in cases.items():
        response = post(body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (param, response.text)
    assert "chat model" in post(cases["$.nodes[0].agent"]).json()["error"]["message"]
    no_caller = stack.client.post(f"{T}/runs", json=cases["$.workspace"], headers={"x-caller-skill": ""})
    assert no_caller.json()["error"]["code"] == "caller_skill_required"
    caps = stack.client.get(f"{T}/capabilities").json()
    assert {"node_started", "transcript_delta", "reasoning_delta", "tool_call", "permission_requested",
            "node_completed", "node_failed", "run_completed"} <= set(caps["event_types"])
    assert caps["opencode"]["version"] and "build" in caps["agents"]
    assert stack.client.get(f"{T}/runs/otr-unknown").status_code == 404
    assert stack.client.post(f"{T}/runs/otr-unknown/steer", json={"message": "x"}).status_code == 404
    index = stack.client.get(f"{T}/runs").json()["runs"]
    assert index and all(r["status"] in TERMINAL for r in index)
    assert scan_for_secrets(stack) == []


def test_monitor_page_in_a_real_browser(stack: Stack) -> None:
    """Debian's headless Chromium (Selenium over chromedriver, inside the same loopback-only namespace) opens the
    monitor link: it shows the live transcript, tool calls, a pending permission and the diff, renders hostile text
    as text, and leaks nothing."""
    from opencode_helpers import browser, secrets_of

    hostile = '<img src=x onerror="document.title=1"><b>bold</b>'
    created = start(stack, [{"id": "a", "prompt": f"[edit] {hostile}",
                             "permission": [{"permission": "edit", "pattern": "*", "action": "ask"}]}])
    run_id, url = created["run_id"], created["monitor_url"]
    token = url.split("#token=", 1)[1]
    assert token.startswith("sk-scillm-view-") and "?" not in url  # the key rides in the fragment only
    with browser() as page:
        page.get(url)
        text = lambda element: page.execute_script(f"return document.getElementById('{element}').textContent")  # noqa
        until = lambda check: WebDriverWait(page, 90, 0.1).until(lambda _: check())  # noqa: E731
        # live: the prompt and the pending permission show while the node waits for the answer
        until(lambda: "bold</b>" in text("transcript"))
        until(lambda: "edit hello.txt" in text("permissions"))
        assert page.execute_script("return document.querySelectorAll('#transcript img, #transcript b').length") == 0
        assert page.current_url.endswith(f"/runs/{run_id}/monitor")  # the token left the address bar
        permission_id = text("permissions").split("(")[1].split(")")[0]
        assert stack.client.post(f"{T}/runs/{run_id}/permission",
                                 json={"permission_id": permission_id, "reply": "once"}).status_code == 200
        until(lambda: text("status") == "completed")
        until(lambda: "+goodbye world" in text("diff-text"))
        assert FINAL in text("transcript")
        tools = text("tools")
        assert "read" in tools and "edit" in tools and "completed" in tools
        assert text("permissions") == "none"
        assert text("node-rows").startswith("acompleted")
        assert page.title == "scillm run monitor"  # the hostile onerror never ran
        assert [e for e in page.get_log("browser") if e["level"] == "SEVERE"] == []  # no script error, no CSP block
        html = page.page_source
        for secret in [*secrets_of(stack), token]:
            assert secret not in html
    # the page itself is public and static, with a strict policy; its key reads this run only, and only reads
    page = stack.client.get(f"{T}/runs/{run_id}/monitor", headers={"authorization": ""})
    assert page.status_code == 200 and "script-src 'sha256-" in page.headers["content-security-policy"]
    view = {"authorization": f"Bearer {token}"}
    assert stack.client.get(f"{T}/runs/{run_id}", headers=view).status_code == 200
    assert stack.client.get(f"{T}/runs/{run_id}/diff", headers=view).status_code == 200
    assert stack.client.post(f"{T}/runs/{run_id}/abort", headers=view).status_code == 403
    assert stack.client.get(f"{T}/runs", headers=view).status_code == 403
    other = stack.client.get(f"{T}/runs", headers={}).json()["runs"][-1]["run_id"]
    assert other == run_id or stack.client.get(f"{T}/runs/{other}", headers=view).status_code == 403
    assert stack.client.post("/v1/chat/completions", headers=view, json={}).status_code == 403
    assert scan_for_secrets(stack, [token]) == []


def test_a_run_with_max_cost_usd_is_stopped_at_its_ceiling(stack: Stack) -> None:
    """A transport run's ``max_cost_usd`` covers every node's session: a refused call stops the run (failed, saying
    why), its running node is aborted and the next one never starts."""
    before = len(stack.fake.chat_requests())
    run_id = start(stack, [{"id": "a", "prompt": "[read] CEILING-DAG-9 hello"},
                           {"id": "b", "prompt": "[read] after", "depends_on": ["a"]}], max_cost_usd=1e-9)["run_id"]
    doc = finish(stack, run_id)
    assert doc["status"] == "failed" and doc["error"].startswith("stopped: budget exceeded"), doc
    assert "max_cost_usd" in doc["error"] and doc["max_cost_usd"] == 1e-9 and doc["cost_usd"] == 0
    nodes = {n["id"]: n["status"] for n in doc["nodes"]}
    assert nodes == {"a": "aborted", "b": "skipped"}, doc["nodes"]
    assert not [r for r in stack.fake.chat_requests()[before:] if "CEILING-DAG-9" in json.dumps(r.body)]
    bad = stack.client.post(f"{T}/runs", json={"workspace": str(stack.repo()), "nodes": [{"id": "a", "prompt": "x"}],
                                               "max_cost_usd": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "$.max_cost_usd"


def test_a_finished_transport_run_is_not_kept_in_memory(stack: Stack) -> None:
    """A finished transport run (its nodes, prompts and answers) is dropped from the book and read back from its
    run dir: the run, its event stream (resumable) and its diff."""
    run = start(stack, [{"id": "only", "prompt": "[edit] change hello", "agent": "build"}])
    done = finish(stack, run["run_id"])
    assert done["status"] == "completed", done
    deadline = time.monotonic() + 30
    while run["run_id"] in stack.opencode.transport.runs:  # its waiter is woken right after it is dropped
        assert time.monotonic() < deadline
        time.sleep(0.05)
    base = f"{T}/runs/{run['run_id']}"
    assert stack.client.get(base).json()["nodes"][0]["assistant_text"] == FINAL
    events, frames = stack.events(f"{base}/events/stream")
    assert events[-1]["type"] == "run_completed" and events[-1]["nodes"] == {"only": "completed"}
    end = json.loads(frames[-1].split("data: ", 1)[1])
    assert frames[-1].startswith("event: end") and (end["status"], end["seq"]) == ("completed", events[-1]["seq"])
    later, _ = stack.events(f"{base}/events/stream", after=events[1]["seq"])
    assert later == events[2:]
    assert stack.client.get(f"{base}/diff").json()["changed_paths"] == ["hello.txt"]


def test_a_run_cancelled_again_while_its_node_cleans_up_ends_only_after_the_node(stack: Stack) -> None:
    """However often the run's task is cancelled (shutdown does it once: the run stops its nodes and waits for them;
    here again while it waits, which cancels the node, and a third time while the node deletes its session), the run
    ends only once its node has: the node's clean-up is not cut short, and nothing of the run is left running."""
    import asyncio

    run_id = start(stack, [{"id": "a", "prompt": "[gate:again]"}])["run_id"]
    assert stack.fake.arrival("again").wait(60)
    live = stack.opencode.transport.runs[run_id]
    client = live.server.client

    async def cancel_again_and_again() -> list[str]:
        order: list[str] = []
        deleting, release = asyncio.Event(), asyncio.Event()
        delete_session = client.delete_session

        async def held_delete(directory: str, session_id: str) -> None:
            order.append("node: deleting its session")
            deleting.set()
            try:
                await release.wait()
                await delete_session(directory, session_id)
            except asyncio.CancelledError:
                order.append("node: deletion cut short")
                raise
            order.append("node: session deleted")

        node = next(t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "Transport._node"
                    and t.get_coro().cr_frame.f_locals.get("run") is live)
        client.delete_session = held_delete
        try:
            live.task.cancel()  # as shutdown does
            await live.stop.wait()  # the run stopped its nodes and waits for them
            live.task.cancel()
            await deleting.wait()
            live.task.cancel()
            for _ in range(20):  # whatever the run does now with its node, it does without any I/O
                await asyncio.sleep(0)
            order.append("deletion released")
            release.set()
            await asyncio.gather(live.task, return_exceptions=True)
            order.append("run ended; its node " + ("ended" if node.done() else "still running"))
        finally:
            del client.delete_session  # the class's method again
        return order

    try:
        order = asyncio.run_coroutine_threadsafe(cancel_again_and_again(), stack.server.loop).result(120)
    finally:
        stack.fake.gate("again").set()
    assert order == ["node: deleting its session", "deletion released", "node: session deleted",
                     "run ended; its node ended"]
    doc = stack.client.get(f"{T}/runs/{run_id}").json()
    assert doc["status"] == "error" and doc["nodes"][0]["status"] == "aborted", doc
