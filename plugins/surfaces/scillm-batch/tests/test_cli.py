"""`scillm batch` against a real `scillm serve`: progress, summary, and resume after the server is killed."""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson

from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply

SCILLM = str(Path(sys.executable).with_name("scillm"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    process = subprocess.Popen([SCILLM, "serve", "--port", str(port)], env=env, cwd=cwd,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/readiness").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and process.poll() is None, "scillm serve did not start"
        time.sleep(0.05)


def stored_successes(database: Path, batch_id: str) -> set[str]:
    """Items whose success the (killed) server had stored, read from its SQLite file."""
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT key, value FROM docs WHERE ns = ?", ("batch-items:" + batch_id,)).fetchall()
    return {key for key, value in rows if orjson.loads(value)["ok"]}


def test_cli_resumes_after_the_server_is_killed(tmp_path):
    with FakeOpenAI() as fake:
        fake.default = Reply.say("done", delay_s=0.1)
        port = free_port()
        config = tmp_path / "scillm.toml"
        config.write_text("[state]\nclaim_timeout_s = 2\n")  # work held by the killed process is taken over soon
        env = {**os.environ, "SCILLM_DATA_DIR": str(tmp_path / "data"), "DEEPSEEK_API_KEY": "sk-batch-test",
               "DEEPSEEK_API_BASE": fake.base_url, "SCILLM_DISABLE_PLUGINS": "resilience,cache",
               "SCILLM_CONFIG": str(config)}
        items = [{"item_id": f"n{i}", "prompt": f"number {i}"} for i in range(60)]
        source = tmp_path / "in.jsonl"
        source.write_bytes(b"".join(orjson.dumps(item) + b"\n" for item in items))
        out = tmp_path / "out.jsonl"
        command = [SCILLM, "batch", str(source), "-o", str(out), "--model", "deepseek/deepseek-chat",
                   "--concurrency", "4", "--batch-id", "resume-test", "--url", f"http://127.0.0.1:{port}"]

        server = start_server(port, env, tmp_path)
        cli = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while len(fake.requests) < 20:
            assert cli.poll() is None, cli.communicate()
            time.sleep(0.02)
        server.send_signal(signal.SIGKILL)  # no graceful shutdown: the process just dies
        server.wait()
        _, interrupted = cli.communicate(timeout=30)
        assert cli.returncode != 0 and "run the same command again to resume" in interrupted.lower()
        finished_before = stored_successes(tmp_path / "data" / "scillm.sqlite3", "resume-test")  # at the kill
        assert 10 <= len(finished_before) < 60

        server = start_server(port, env, tmp_path)
        try:
            progress = httpx.get(f"http://127.0.0.1:{port}/v1/scillm/batch/resume-test",
                                 headers={"authorization": f"Bearer {DEV_KEY}"}).json()
            assert finished_before <= {r["item_id"] for r in progress["results"] if r["ok"]}
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        finally:
            server.terminate()
            server.wait(timeout=15)

    assert result.returncode == 0, result.stderr
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert sorted(r["item_id"] for r in lines) == sorted(i["item_id"] for i in items)
    assert all(r["ok"] for r in lines)
    sent = collections.Counter(r.body["messages"][-1]["content"] for r in fake.requests)
    for item_id in finished_before:
        assert sent[f"number {item_id[1:]}"] == 1, f"{item_id} was sent upstream again after it was stored"
    # the restarted server went on with the queued items by itself; the rerun reports what was stored as reused
    reused = int(re.search(r"\((\d+) reused", result.stderr).group(1))  # type: ignore[union-attr]
    assert len(finished_before) <= reused <= 60
    assert "60 ok, 0 failed of 60" in result.stderr
    assert "60/60" in result.stderr  # the progress line


def test_client_helper_as_completed(tmp_path):
    import asyncio

    from scillm_batch.client import complete_all

    from scillm_core.testing import ServerThread, make_app

    with FakeOpenAI() as fake:
        fake.responder = lambda r: Reply.say("slow", delay_s=0.3) if "first" in str(r.body) else Reply.say("fast")
        env = {"DEEPSEEK_API_KEY": "k", "DEEPSEEK_API_BASE": fake.base_url}
        with ServerThread(make_app(env=env, data_dir=tmp_path, only=("chat", "auth", "openai-compat"))) as server:
            async def collect():
                items = [{"item_id": "first", "prompt": "first"}, {"item_id": "second", "prompt": "second"},
                         {"item_id": "bad", "messages": "not a list"}]
                return [r async for r in complete_all(items, model="deepseek/deepseek-chat",
                                                      base_url=server.url + "/v1", batch_id="cb")]

            results = asyncio.run(collect())
    assert [r["item_id"] for r in results][-1] == "first"  # completion order, not input order
    bad = next(r for r in results if r["item_id"] == "bad")
    assert bad["ok"] is False and bad["status_code"] == 400
    assert fake.requests[0].body.get("scillm_metadata") is None  # never sent upstream
