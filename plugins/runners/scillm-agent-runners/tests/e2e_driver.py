"""Run one real agent CLI through scillm against a scripted fake model; meant to run inside a loopback-only
network namespace (``unshare -n``; it brings ``lo`` up itself). Writes a JSON report for the test to assert on.

usage: e2e_driver.py PROFILE WORKDIR REPORT_JSON [SANDBOX]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

from scillm_core.testing import FakeOpenAI, ServerThread, make_app
from scillm_core.testing import Reply as _Reply
from scillm_core.testing.fakes import RecordedRequest

PROVIDER_SECRET = "sk-provider-SECRET-e2e-0123456789"
MASTER_KEY = "sk-master-SECRET-e2e-9876543210"
MODEL = "openai/fake-model"
FINAL = "DONE: edited the file"


def tool_names(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for tool in body.get("tools") or []:
        fn = tool.get("function") or {}
        out[fn.get("name")] = fn.get("parameters") or {}
    return out


def responder(workdir: Path):
    target = workdir / "hello.txt"

    class Reply(_Reply):  # unique tool-call ids: claude refuses a repeated tool_use id
        @classmethod
        def call(cls, name: str, arguments: dict[str, Any], **kw: Any) -> _Reply:  # type: ignore[override]
            return _Reply.call(name, arguments, id=f"call_{uuid.uuid4().hex[:12]}", **kw)

    def answer(request: RecordedRequest) -> Reply | None:
        body = request.body if isinstance(request.body, dict) else {}
        tools = tool_names(body)
        if not tools:
            return _Reply.say('{"title": "edit hello"}')
        done = sum(1 for m in body.get("messages") or [] if m.get("role") == "tool")
        if done >= 2:
            return _Reply.say(FINAL)
        if "Read" in tools:  # claude: absolute paths, Read before Edit
            return (Reply.call("Read", {"file_path": str(target)}) if done == 0 else
                    Reply.call("Edit", {"file_path": str(target), "old_string": "hello world",
                                        "new_string": "goodbye world"}))
        shell = next((n for n in ("exec_command", "shell_command", "shell") if n in tools), None)
        if shell is not None:  # codex with an unknown slug: its shell tool
            key = "cmd" if "cmd" in (tools[shell].get("properties") or {}) else "command"
            cmd = "cat hello.txt" if done == 0 else "sed -i 's/hello world/goodbye world/' hello.txt"
            return Reply.call(shell, {key: cmd if key == "cmd" else ["bash", "-lc", cmd]})
        props = (tools.get("read") or {}).get("properties") or {}
        if "filePath" in props:  # opencode
            return (Reply.call("read", {"filePath": "hello.txt"}) if done == 0 else
                    Reply.call("edit", {"filePath": "hello.txt", "oldString": "hello world",
                                        "newString": "goodbye world"}))
        # pi
        return (Reply.call("read", {"path": "hello.txt"}) if done == 0 else
                Reply.call("edit", {"path": "hello.txt",
                                    "edits": [{"oldText": "hello world", "newText": "goodbye world"}]}))

    return answer


def main() -> int:
    profile, workdir, report = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    sandbox = sys.argv[4] if len(sys.argv) > 4 else "workspace-write"
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    fake = FakeOpenAI()
    fake.responder = responder(workdir)
    fake.start()
    env = {"OPENAI_API_KEY": PROVIDER_SECRET, "OPENAI_API_BASE": fake.url + "/v1", "SCILLM_MASTER_KEY": MASTER_KEY}
    if os.environ.get("SCILLM_AGENT_CLIS_BIN"):
        env["SCILLM_AGENT_CLIS_BIN"] = os.environ["SCILLM_AGENT_CLIS_BIN"]
    app = make_app(env=env, data_dir=workdir.parent / "data",
                   config={"exec": {"allowed_roots": [str(workdir)], "kill_grace_s": 1.0}},
                   only=["exec", "agent-runners", "auth", "chat", "responses", "messages", "openai-compat"])
    with ServerThread(app) as server:
        response = httpx.post(server.url + "/v1/scillm/exec", timeout=180, headers={
            "authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": "e2e-test"}, json={
            "profile": profile, "prompt": "Change 'hello world' to 'goodbye world' in hello.txt.",
            "cwd": str(workdir), "sandbox": sandbox, "model": MODEL, "timeout_s": 120,
            "idle_timeout_s": 60, "wait": True})
    fake.stop()
    report.write_text(json.dumps({
        "http_status": response.status_code, "result": response.json(), "links": links,
        "file": (workdir / "hello.txt").read_text(),
        "requests": [{"path": r.path, "authorization": r.headers.get("authorization"),
                      "caller": r.headers.get("x-caller-skill"), "body": r.body} for r in fake.requests]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
