"""scillm against a broken or hostile OpenCode server (an external ``OPENCODE_SERVER_URL`` that is a fake speaking
OpenCode's HTTP API and event stream, see :mod:`fake_opencode`): answers of the wrong shape, non-JSON, stalls, deep
or oversized events. A run ends with a status and a message that says what the server did wrong; a request that
cannot start gets a 502; nothing answers 500, logs a traceback or shows the server's password."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_opencode import PASSWORD, Bad, FakeOpenCode, frame
from opencode_helpers import Records, make_repo

from scillm_core.testing import ServerThread, make_app

KEY = "sk-master-hostile-0123456789"
ONLY = ["opencode", "exec", "agent-runners", "auth", "chat", "openai-compat"]
RUNS = "/v1/scillm/opencode/runs"


class Hostile:
    def __init__(self, fake: FakeOpenCode, server: ServerThread, root: Path, logs: Records) -> None:
        self.fake, self.server, self.root, self.logs = fake, server, root, logs
        self.client = httpx.Client(base_url=server.url, timeout=120,
                                   headers={"authorization": f"Bearer {KEY}", "x-caller-skill": "hostile-tests"})

    def run(self, **extra: Any) -> httpx.Response:
        return self.client.post(RUNS, json={"prompt": "hi", "cwd": str(make_repo(self.root)), **extra})

    def events(self, run_id: str, *, transport: bool = False) -> list[dict[str, Any]]:
        from scillm_opencode import opencode_of

        oc = opencode_of(self.server.app.runtime)
        path = (oc.transport if transport else oc.runs).records.run_dir(run_id) / "events.jsonl"
        import json

        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def transport_events(self, run_id: str) -> list[dict[str, Any]]:
        return self.events(run_id, transport=True)


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Hostile]:
    logs = Records()
    logging.getLogger().addHandler(logs)
    fake = FakeOpenCode()
    fake.start()
    root = tmp_path / "work"
    root.mkdir()
    app = make_app(env={"SCILLM_MASTER_KEY": KEY, "SCILLM_OPENCODE_SERVE_ENABLED": "1",
                        "OPENCODE_SERVER_URL": fake.url, "OPENCODE_SERVER_PASSWORD": PASSWORD},
                   data_dir=tmp_path / "data", config={"exec": {"allowed_roots": [str(root)]}}, only=ONLY)
    try:
        with ServerThread(app) as server:
            yield Hostile(fake, server, root, logs)
        # nothing logged a traceback, and the server's password is nowhere
        assert [r.getMessage() for r in logs.records if r.exc_info] == []
        assert [r.getMessage() for r in logs.records if PASSWORD in r.getMessage()] == []
        for path in (tmp_path / "data").rglob("*"):
            assert not path.is_file() or PASSWORD.encode() not in path.read_bytes(), path
    finally:
        fake.stop()
        logging.getLogger().removeHandler(logs)


def test_the_fake_answers_a_normal_run(hostile: Hostile) -> None:
    response = hostile.run()
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "completed" and response.json()["assistant_text"] == "DONE"


def test_health_of_the_wrong_shape_is_a_502_naming_it(hostile: Hostile) -> None:
    """Before: ``(health or {}).get`` on a number, an AttributeError answered as a 500."""
    hostile.fake.answers["health"] = Bad(42)
    response = hostile.run()
    assert response.status_code == 502, response.text
    assert "GET /global/health answered integer where object was expected" in response.json()["error"]["message"]


def test_an_error_page_echoing_the_password_is_redacted(hostile: Hostile) -> None:
    hostile.fake.answers["health"] = Bad(b"<h1>denied for opencode:" + PASSWORD.encode() + b"</h1>", 500, raw=True)
    response = hostile.run()
    assert response.status_code == 502 and PASSWORD not in response.text
    assert "answered HTTP 500: <h1>denied for opencode:[redacted]</h1>" in response.json()["error"]["message"]


def test_an_external_server_failing_its_health_check_has_its_client_closed(hostile: Hostile) -> None:
    """The next run connects a new client; before, the one of the server that failed its check was dropped with its
    connection pool open."""
    from scillm_opencode import opencode_of

    serve = opencode_of(hostile.server.app.runtime).serve
    assert hostile.run().json()["status"] == "completed"
    first = serve.server
    assert first is not None and not first.client.http.is_closed
    hostile.fake.answers["health"] = Bad({"down": True}, 500)
    assert hostile.run().status_code == 502
    assert first.died.is_set() and first.client.http.is_closed
    del hostile.fake.answers["health"]
    assert hostile.run().json()["status"] == "completed" and serve.server is not first


@pytest.mark.parametrize("body,shape", [({"slug": "no-id"}, "null"), ({"id": {"x": 1}}, "object"),
                                        ({"id": "../../global/dispose"}, "string")])
def test_a_session_without_a_usable_id_fails_the_run_saying_so(hostile: Hostile, body: Any, shape: str) -> None:
    """Before: ``KeyError: 'id'``, or an id used as it came in the next calls' paths."""
    hostile.fake.answers["create"] = Bad(body)
    doc = hostile.run().json()
    assert doc["status"] == "error"
    assert doc["error"] == f"opencode serve: POST /session answered without a usable session id ({shape})"
    assert not [r for r in hostile.fake.requests if "prompt_async" in r.path]


@pytest.mark.parametrize("permission_id", ["../../session/{SID}/abort", "per_1?directory=/etc", "per 1"])
def test_a_permission_id_that_is_not_an_id_fails_that_permission_and_never_reaches_a_url(
        hostile: Hostile, permission_id: str) -> None:
    """A transport node's permission request whose id is not one of OpenCode's: its event says it cannot be answered,
    and a reply is a 502 naming the server's fault. Before: the id went into the reply's URL as it came, so the
    server chose the path of scillm's next call (here: the session's own abort)."""
    import json

    hostile.fake.events = [frame({"type": "permission.asked", "properties": {
        "id": permission_id, "sessionID": "{SID}", "permission": "edit", "patterns": ["hello.txt"]}})]
    transport = "/v1/scillm/opencode/transport/runs"
    started = hostile.client.post(transport, json={"workspace": str(make_repo(hostile.root)),
                                                   "nodes": [{"id": "a", "prompt": "hi"}]})
    assert started.status_code == 202, started.text
    run_id = started.json()["run_id"]
    while not (asked := [e for e in hostile.transport_events(run_id) if e["type"] == "permission_requested"]):
        time.sleep(0.05)
    sid = next(e for e in hostile.transport_events(run_id) if e["type"] == "node_started")["session_id"]
    sent = permission_id.replace("{SID}", sid)
    assert asked[0]["permission_id"] == sent
    assert asked[0]["error"] == ("opencode serve sent this permission request without a usable id: it cannot be "
                                 "answered (a reply to it is a 502)")
    reply = hostile.client.post(f"{transport}/{run_id}/permission", json={"permission_id": sent, "reply": "once"})
    assert reply.status_code == 502, reply.text
    assert reply.json()["error"]["message"] == ("opencode serve sent a permission request id that cannot be answered "
                                                f"(not an id: {json.dumps(sent)[1:-1]!r})")
    assert not [r for r in hostile.fake.requests if r.path.endswith("/reply") or r.path.endswith("/abort")]
    aborted = hostile.client.post(f"{transport}/{run_id}/abort")
    assert aborted.status_code == 200 and aborted.json()["status"] == "aborted", aborted.text


def test_messages_of_the_wrong_shape_fail_the_run_saying_what_came(hostile: Hostile) -> None:
    """Before: the run ended with the event stream's (healthy) state as its reason: 'lost the OpenCode server'."""
    hostile.fake.answers["messages"] = Bad({"messages": []})
    doc = hostile.run().json()
    assert doc["status"] == "error"
    assert doc["error"].endswith("/message answered object where array was expected"), doc["error"]


def test_messages_with_junk_entries_keep_the_readable_text(hostile: Hostile) -> None:
    """Before: ``AttributeError: 'int' object has no attribute 'get'``."""
    hostile.fake.answers["messages"] = Bad([
        1, None, "s", {"info": 5, "parts": 7}, {"info": {"role": "user"}, "parts": [{"type": "text", "text": "q"}]},
        {"info": {"role": "assistant"}, "parts": [3, {"type": {}}, {"type": "text", "text": {"no": 1}},
                                                  {"type": "text", "text": "ANSWER"}]}])
    doc = hostile.run().json()
    assert (doc["status"], doc["error"], doc["assistant_text"]) == ("completed", None, "ANSWER")


def test_a_stalled_session_create_ends_the_run_at_its_timeout(hostile: Hostile) -> None:
    """Before: the run waited for the HTTP client's own 30 s timeout, then ended ``error`` (a 504)."""
    hostile.fake.answers["create"] = Bad(hang=True)
    doc = hostile.run(timeout_s=1).json()
    assert doc["status"] == "timeout", doc


def test_stalled_messages_end_the_run_at_its_timeout(hostile: Hostile) -> None:
    """The session went idle, but its messages never come. Before: the run waited 30 s for them (the HTTP client's
    timeout), then 30 s more for its answer's text, and ended ``error``."""
    hostile.fake.answers["messages"] = Bad(hang=True)
    doc = hostile.run(timeout_s=1).json()
    assert doc["status"] == "timeout", doc


def test_deeply_nested_event_fields_are_cut_not_fatal(hostile: Hostile) -> None:
    """A tool part whose input and name nest 900 levels deep (orjson reads it): the tool event keeps six levels and
    no name; before, the normaliser recursed without a bound and the event could not be written."""
    deep = b'{"a":' * 900 + b"1" + b"}" * 900
    hostile.fake.events = [
        b'data: {"type":"message.part.updated","properties":{"sessionID":"{SID}","part":{"id":"prt_1","type":"tool",'
        b'"callID":"call_1","tool":' + deep + b',"state":{"status":"running","input":' + deep + b"}}}}\n\n",
        frame({"type": "session.idle", "properties": {"sessionID": "{SID}"}})]
    doc = hostile.run().json()
    assert doc["status"] == "completed", doc
    tool = next(e for e in hostile.events(doc["run_id"]) if e["type"] == "tool_call")
    assert tool["tool"] is None
    assert tool["input"] == {"a": {"a": {"a": {"a": {"a": {"a": "[object nested too deep]"}}}}}}


def test_events_of_the_wrong_shape_are_skipped(hostile: Hostile) -> None:
    """Garbage lines, JSON that is not an object, properties that are numbers, a delta that is a number: none of it
    is an event, and the run completes. Before: ``str(7)`` was streamed as transcript text."""
    hostile.fake.events = [
        b"data: {not json\n\n", b"\xff\xfe garbage\n\n", b"data: 42\n\n", b"data: null\n\n",
        frame({"type": "message.part.updated", "properties": 5}),
        frame({"type": "message.part.delta", "properties": {"sessionID": "{SID}", "field": "text", "partID": {},
                                                             "delta": 7}}),
        frame({"type": "session.idle", "properties": {"sessionID": "{SID}"}})]
    doc = hostile.run().json()
    assert doc["status"] == "completed", doc
    assert [e["type"] for e in hostile.events(doc["run_id"])] == ["run_started", "session_created", "run_completed"]


def test_an_oversized_event_breaks_the_stream_and_says_so(hostile: Hostile,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """One line of data with no end: before, buffered without a bound until the server stopped sending."""
    import scillm_opencode.client as client

    monkeypatch.setattr(client, "MAX_EVENT", 1 << 16)
    hostile.fake.events = [b"data: " + b"z" * (1 << 17)]
    doc = hostile.run().json()
    assert (doc["status"], doc["error"]) == ("error", "opencode serve sent a bus event of more than 0 MB")


def test_a_retry_status_of_the_wrong_shape_is_reported_without_it(hostile: Hostile) -> None:
    hostile.fake.events = [
        frame({"type": "session.status", "properties": {"sessionID": "{SID}", "status": {
            "type": "retry", "attempt": {"n": 1}, "message": ["rate", "limited"]}}}),
        frame({"type": "session.idle", "properties": {"sessionID": "{SID}"}})]
    doc = hostile.run().json()
    retry = next(e for e in hostile.events(doc["run_id"]) if e["type"] == "retry")
    assert (retry["attempt"], retry["message"]) == (None, None)


def test_a_session_error_of_the_wrong_shape_still_fails_the_run(hostile: Hostile) -> None:
    hostile.fake.events = [frame({"type": "session.error", "properties": {"sessionID": "{SID}", "error": {
        "name": {"deep": [1]}, "data": {"message": ["not", "a", "string"]}}}})]
    doc = hostile.run().json()
    assert (doc["status"], doc["error"]) == ("error", "Error: session error")


# -- waiting leaves nothing behind ---------------------------------------------------------------------------------

def test_first_of_awaits_the_waiters_it_cancels() -> None:
    """SessionDriver.wait, Bus.open and Sessions.slot race events through ``first_of``: once it returns, the waiters
    that lost are over, not merely asked to stop (before: still pending tasks)."""
    from scillm_opencode.session import first_of

    async def scenario() -> list[bool]:
        won, never = asyncio.Event(), asyncio.Event()
        won.set()
        waiters = [asyncio.ensure_future(won.wait()), asyncio.ensure_future(never.wait())]
        await first_of(waiters, None)
        return [w.done() for w in waiters]

    assert asyncio.run(scenario()) == [True, True]


def test_shutdown_awaits_the_abort_a_cancelled_run_left_going(hostile: Hostile,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A run in flight when scillm stops gets 3 s for its session's abort; an abort that takes longer (here: the
    server's answer stalls, and the session's idle never comes) goes on, and shutdown awaits it instead of leaving
    it to the closing loop."""
    import scillm_opencode.client as client
    from scillm_opencode import opencode_of

    monkeypatch.setattr(client, "CLEANUP_S", 4.0)  # longer than the 3 s a cancelled run waits for its abort
    hostile.fake.events = []          # the session never goes idle
    hostile.fake.on_abort = []
    hostile.fake.answers["abort"] = Bad(hang=True)
    response = hostile.run(wait=False)
    assert response.status_code == 200, response.text
    runs = opencode_of(hostile.server.app.runtime).runs
    while not any("prompt_async" in r.path for r in hostile.fake.requests):
        time.sleep(0.05)
    hostile.server.stop()
    assert any(r.path.endswith("/abort") for r in hostile.fake.requests)
    assert runs.cleanups == set()


def _started(hostile: Hostile) -> str:
    """A run whose session is working (its prompt sent) and never goes idle by itself."""
    hostile.fake.events = []
    response = hostile.run(wait=False)
    assert response.status_code == 200, response.text
    while not any("prompt_async" in r.path for r in hostile.fake.requests):
        time.sleep(0.05)
    return str(response.json()["run_id"])


def test_an_abort_the_server_answers_true_ends_the_run_without_waiting_for_its_idle(hostile: Hostile) -> None:
    """``opencode serve`` answers the abort once it has stopped the session and set it idle: that answer is the
    confirmation. Before: the run then waited up to 10 s for the session's idle on the bus and asked for its status
    (here the idle never comes and the status stalls: the abort was reported unconfirmed, 15 s later)."""
    run_id = _started(hostile)
    hostile.fake.on_abort = []                      # its idle does not come on the bus
    hostile.fake.answers["status"] = Bad(hang=True)
    aborted = hostile.client.post(f"{RUNS}/{run_id}/abort", json={"reason": "stop"})
    assert aborted.status_code == 200, aborted.text
    assert (aborted.json()["status"], aborted.json()["error"]) == ("aborted", "stop")
    assert not [r for r in hostile.fake.requests if r.path == "/session/status"]
    events = hostile.events(run_id)
    assert events[-1]["type"] == "run_completed" and events[-1]["status"] == "aborted"


def test_the_sessions_idle_ends_the_abort_before_the_server_answers_it(hostile: Hostile) -> None:
    """The session says it is idle on the bus while the abort's answer has not come (it stalls): the run ends on
    the idle and the stalled call is given up. Before: the run waited for the answer (5 s, then a timeout) and
    reported the abort unconfirmed."""
    run_id = _started(hostile)
    hostile.fake.on_abort = [frame({"type": "session.idle", "properties": {"sessionID": "{SID}"}})]
    hostile.fake.answers["abort"] = Bad(hang=True)
    aborted = hostile.client.post(f"{RUNS}/{run_id}/abort", json={"reason": "stop"})
    assert aborted.status_code == 200, aborted.text
    assert (aborted.json()["status"], aborted.json()["error"]) == ("aborted", "stop")
    assert not [r for r in hostile.fake.requests if r.path == "/session/status"]
