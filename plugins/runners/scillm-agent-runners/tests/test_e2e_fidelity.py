"""End to end, nothing lost in translation: real Claude Code and real Codex (pinned in tools/agent-clis) run through
scillm exec to an upstream of their own dialect (an Anthropic-wire fake; the Codex backend fake with a ChatGPT
login), inside a loopback-only network namespace. The upstream must get each request byte for byte as the CLI sent
it (cache markers included), the CLI must get the upstream's cache usage, and scillm must know the CLI's session."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
from scillm_agent_runners.base import REPO_TOOLS

from scillm_core import hookimpl
from scillm_core.testing import Reply, ServerThread, ToolCallSpec, make_app
from scillm_core.testing.fake_anthropic import FakeAnthropic
from scillm_core.testing.fake_codex import FakeCodex
from scillm_core.testing.fakes import RecordedRequest
from scillm_core.testing.netns import links, loopback_only

MASTER_KEY = "sk-master-SECRET-fidelity-9876543210"
PROVIDER_SECRET = "sk-ant-api03-SECRET-fidelity-0123456789"
FINAL = "DONE: edited the file"
MODEL = {"claude-print": "claude-sonnet-4-5", "codex-exec": "gpt-5.5"}
BINARY = {"claude-print": "claude", "codex-exec": "codex"}


class RecordBodies:
    """ASGI middleware that keeps what clients send to the dialect routes: path, headers and the body's bytes."""

    def __init__(self, app: Any, log: list[dict[str, Any]]) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in ("/v1/messages", "/v1/responses"):
            return await self.app(scope, receive, send)
        entry: dict[str, Any] = {"path": scope["path"], "raw": b"",
                                 "headers": {k.decode(): v.decode() for k, v in scope["headers"]}}
        self.log.append(entry)

        async def recording() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                entry["raw"] += message.get("body", b"")
            return message

        return await self.app(scope, recording, send)


class Recorder:
    def __init__(self) -> None:
        self.log: list[dict[str, Any]] = []

    @hookimpl
    def scillm_register_middleware(self, middleware: Any, runtime: Any) -> None:
        middleware.add(lambda app: RecordBodies(app, self.log), order=1, name="record-bodies")


def claude_answer(target: Path) -> Any:
    """Read, then Edit, then the final text; the n-th answer reports 1000*n cache reads and 10*n cache writes."""
    turn = [0]

    def answer(request: RecordedRequest) -> Reply | None:
        body = request.body if isinstance(request.body, dict) else {}
        turn[0] += 1
        usage = {"prompt_tokens": 20 + turn[0], "cached_tokens": 1000 * turn[0], "cache_write_tokens": 10 * turn[0]}
        if not body.get("tools"):
            return Reply(text='{"title": "edit hello"}', **usage)
        results = sum(1 for m in body.get("messages") or [] if isinstance(m.get("content"), list)
                      for b in m["content"] if b.get("type") == "tool_result")
        call_id = f"toolu_{uuid.uuid4().hex[:20]}"  # claude refuses a repeated tool_use id
        if results == 0:
            return Reply(tool_calls=(ToolCallSpec("Read", {"file_path": str(target)}, call_id),), **usage)
        if results == 1:
            return Reply(tool_calls=(ToolCallSpec("Edit", {"file_path": str(target), "old_string": "hello world",
                                                           "new_string": "goodbye world"}, call_id),), **usage)
        return Reply(text=FINAL, **usage)

    return answer


def codex_answer() -> Any:
    """Its shell tool reads, then edits with sed, then the final text; the n-th answer reports 4000+n cache reads."""
    turn = [0]

    def answer(request: RecordedRequest) -> Reply | None:
        body = request.body if isinstance(request.body, dict) else {}
        turn[0] += 1
        usage = {"prompt_tokens": 5000 + turn[0], "cached_tokens": 4000 + turn[0]}
        outputs = sum(1 for item in body.get("input") or [] if isinstance(item, dict)
                      and item.get("type") in ("function_call_output", "custom_tool_call_output"))
        shell = next(t for t in body.get("tools") or [] if t.get("name") in ("exec_command", "shell_command"))
        key = "cmd" if "cmd" in (shell.get("parameters") or {}).get("properties", {}) else "command"
        call_id = f"call_{uuid.uuid4().hex[:12]}"
        if outputs == 0:
            return Reply(tool_calls=(ToolCallSpec(shell["name"], {key: "cat hello.txt"}, call_id),), **usage)
        if outputs == 1:
            return Reply(tool_calls=(ToolCallSpec(shell["name"], {
                key: "sed -i 's/hello world/goodbye world/' hello.txt"}, call_id),), **usage)
        return Reply(text=FINAL, **usage)

    return answer


def run(profile: str, tmp_path: Path) -> dict[str, Any]:
    """One real CLI run through scillm exec to the fake of its dialect, in a loopback-only namespace."""
    binary = REPO_TOOLS / "node_modules" / ".bin" / BINARY[profile]
    assert binary.exists(), f"{binary} missing: run scripts/install-agent-clis (scripts/install --test does)"
    work = tmp_path / "work"
    work.mkdir()
    (work / "hello.txt").write_text("hello world\n")
    env = {"SCILLM_MASTER_KEY": MASTER_KEY}
    recorder = Recorder()
    with loopback_only():
        assert links() == ["lo"]
        if profile == "claude-print":
            fake: Any = FakeAnthropic()
            fake.api_key = PROVIDER_SECRET
            fake.responder = claude_answer(work / "hello.txt")
            fake.start()
            env |= {"ANTHROPIC_API_KEY": PROVIDER_SECRET, "ANTHROPIC_API_BASE": fake.url}
        else:
            fake = FakeCodex()
            fake.responder = codex_answer()
            fake.start()
            auth = tmp_path / "codex-auth.json"
            auth.write_bytes(orjson.dumps(FakeCodex.auth_json(fake.login())))
            env |= {"SCILLM_CODEX_AUTH": str(auth), "CODEX_API_BASE": fake.base_url,
                    "SCILLM_CODEX_TOKEN_URL": fake.token_url}
        app = make_app(env=env, data_dir=tmp_path / "data", plugins=[("record-bodies", recorder)],
                       config={"exec": {"allowed_roots": [str(work)], "kill_grace_s": 1.0}},
                       only=["exec", "agent-runners", "auth", "chat", "responses", "messages", "anthropic", "codex",
                             "resilience", "metrics", "files", "json", "affinity"])
        headers = {"authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": "e2e-fidelity"}
        try:
            with ServerThread(app) as server:
                response = httpx.post(server.url + "/v1/scillm/exec", timeout=180, headers=headers, json={
                    "profile": profile, "prompt": "Change 'hello world' to 'goodbye world' in hello.txt.",
                    "cwd": str(work), "sandbox": "workspace-write", "model": MODEL[profile], "timeout_s": 120,
                    "idle_timeout_s": 60, "wait": True})
                calls = httpx.get(server.url + "/v1/scillm/calls", headers=headers, timeout=30).json()["data"]
        finally:
            fake.stop()
    result = response.json()
    assert response.status_code == 200 and result["status"] == "completed", result
    assert result["final_text"] == FINAL
    assert (work / "hello.txt").read_text() == "goodbye world\n"  # the CLI's own tools did the work
    assert "SECRET" not in json.dumps(calls)  # the call log holds no key
    events = [json.loads(line).get("event") or {}
              for line in Path(result["artifacts"]["events_jsonl"]).read_text().splitlines()]
    return {"client": recorder.log, "upstream": fake.requests, "calls": calls, "events": events}


def test_claude_code_cache_markers_reach_anthropic_as_sent_and_its_cache_usage_comes_back(tmp_path: Path) -> None:
    report = run("claude-print", tmp_path)
    client, upstream = report["client"], report["upstream"]
    assert len(client) == len(upstream) >= 3
    for sent, got in zip(client, upstream, strict=True):
        assert got.raw == sent["raw"]  # byte for byte: same model name, nothing taken out or added
        assert sent["raw"].count(b'"cache_control"') >= 2  # Claude Code marks its system prompt and last turn
        assert got.headers["anthropic-beta"] == sent["headers"]["anthropic-beta"]
        assert got.headers["anthropic-version"] == sent["headers"]["anthropic-version"]
        assert got.headers["x-api-key"] == PROVIDER_SECRET != sent["headers"]["x-api-key"]  # scillm's key upstream
    # the fake reported 1000*n cache reads and 10*n cache writes on its n-th answer: Claude Code saw all of them
    result = next(e for e in report["events"] if e.get("type") == "result")
    turns = range(1, len(upstream) + 1)
    assert result["usage"]["cache_read_input_tokens"] == sum(1000 * n for n in turns)
    assert result["usage"]["cache_creation_input_tokens"] == sum(10 * n for n in turns)
    # scillm knew the session from Claude Code's own header; every call went as sent
    assert all(sent["headers"]["x-claude-code-session-id"] == result["session_id"] for sent in client)
    assert {c["session"] for c in report["calls"]} == {result["session_id"]}
    assert {c["dialect"] for c in report["calls"]} == {"anthropic-messages"}


def test_codex_body_reaches_the_responses_backend_unchanged(tmp_path: Path) -> None:
    report = run("codex-exec", tmp_path)
    client, upstream = report["client"], report["upstream"]
    assert len(client) == len(upstream) >= 3
    for sent, got in zip(client, upstream, strict=True):
        assert got.raw == sent["raw"]  # byte for byte (the model name is the same here)
        body = json.loads(sent["raw"])
        # what a translation would lose: Codex's custom apply_patch tool with its grammar, its prompt cache key
        assert any(t.get("type") == "custom" and t.get("name") == "apply_patch" for t in body["tools"])
        assert body["prompt_cache_key"] == sent["headers"]["session-id"] == got.headers["session_id"]
        assert got.headers["authorization"].startswith("Bearer ey")  # the ChatGPT login, not the run key
    thread = next(e for e in report["events"] if e.get("type") == "thread.started")["thread_id"]
    assert {c["session"] for c in report["calls"]} == {thread}
    assert {c["dialect"] for c in report["calls"]} == {"openai-responses"}
    usage = next(e for e in report["events"] if e.get("type") == "turn.completed")["usage"]
    assert usage["cached_input_tokens"] == sum(4000 + n for n in range(1, len(upstream) + 1))
