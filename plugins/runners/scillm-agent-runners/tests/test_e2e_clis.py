"""End to end: each real agent CLI (pinned in tools/agent-clis) runs through scillm exec against a scripted fake
model, inside a loopback-only network namespace, reads hello.txt and edits it with its own tools."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from scillm_agent_runners.base import REPO_TOOLS

DRIVER = Path(__file__).with_name("e2e_driver.py")
PROVIDER_SECRET = "sk-provider-SECRET-e2e-0123456789"
MASTER_KEY = "sk-master-SECRET-e2e-9876543210"
TERMINAL_EVENT = {"codex-exec": "turn.completed", "claude-print": "result.success", "pi": "agent_end",
                  "opencode-run": "text"}
BINARY = {"codex-exec": "codex", "claude-print": "claude", "pi": "pi", "opencode-run": "opencode"}


@pytest.mark.parametrize("profile", ["pi", "opencode-run", "codex-exec", "claude-print"])
def test_real_cli_reads_and_edits_through_scillm(profile: str, tmp_path: Path) -> None:
    binary = REPO_TOOLS / "node_modules" / ".bin" / BINARY[profile]
    assert binary.exists(), f"{binary} missing: run scripts/install-agent-clis (scripts/install --test does)"
    work = tmp_path / "work"
    work.mkdir()
    (work / "hello.txt").write_text("hello world\n")
    report_path = tmp_path / "report.json"
    proc = subprocess.run(["unshare", "-n", sys.executable, str(DRIVER), profile, str(work), str(report_path)],
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    # the namespace had loopback only
    assert [line.split(":")[1].strip() for line in report["links"].splitlines()] == ["lo"]
    result = report["result"]
    assert report["http_status"] == 200
    assert result["status"] == "completed", result
    assert result["exit_code"] == 0
    assert result["final_text"] == "DONE: edited the file"
    # the real edit, made by the CLI's own tool
    assert (work / "hello.txt").read_text() == "goodbye world\n"
    assert report["file"] == "goodbye world\n"
    # every model call came through scillm: the fake saw scillm's provider key, which the CLI never had
    requests = [r for r in report["requests"] if r["path"] == "/v1/chat/completions"]
    assert len(requests) >= 3
    # the prompt went in on the CLI's stdin and reached the model
    assert "Change 'hello world' to 'goodbye world' in hello.txt." in json.dumps(requests[-1]["body"]["messages"])
    assert all(r["authorization"] == f"Bearer {PROVIDER_SECRET}" for r in requests)
    last = requests[-1]["body"]["messages"]
    tool_results = [m for m in last if m["role"] == "tool"]
    assert len(tool_results) >= 2 and "hello world" in json.dumps(tool_results[0])
    # artifacts: the CLI's own event stream, normalised, and the logs
    artifacts = result["artifacts"]
    events = [json.loads(line) for line in Path(artifacts["events_jsonl"]).read_text().splitlines()]
    types = [e["type"] for e in events]
    assert types[0] == "process.start" and types[-1] == "process.end"
    assert TERMINAL_EVENT[profile] in types
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert json.loads(Path(artifacts["result"]).read_text())["status"] == "completed"
    assert json.loads(Path(artifacts["status"]).read_text())["status"] == "completed"
    for path in Path(artifacts["run_dir"]).iterdir():
        data = path.read_bytes()
        assert PROVIDER_SECRET.encode() not in data and MASTER_KEY.encode() not in data, path


@pytest.mark.parametrize("profile", ["pi", "opencode-run", "codex-exec", "claude-print"])
def test_read_only_sandbox_blocks_the_edit(profile: str, tmp_path: Path) -> None:
    """The same script in read-only mode: the CLI's own permission system refuses the edit."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "hello.txt").write_text("hello world\n")
    report_path = tmp_path / "report.json"
    proc = subprocess.run(["unshare", "-n", sys.executable, str(DRIVER), profile, str(work), str(report_path),
                           "read-only"], capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["result"]["status"] in ("completed", "failed"), report["result"]
    assert (work / "hello.txt").read_text() == "hello world\n"
    requests = [r for r in report["requests"] if r["path"] == "/v1/chat/completions"]
    assert requests and "hello world" in json.dumps(requests[-1]["body"]["messages"])  # the read worked
