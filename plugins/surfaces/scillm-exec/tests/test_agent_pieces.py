"""The pieces every agent surface shares: git worktrees, the run event log and its SSE tail, long-lived children."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from scillm_exec import (
    EventLog,
    GitError,
    ManagedProcess,
    create_worktree,
    group_members,
    remove_worktree,
    reset_worktree,
    sse_tail,
    worktree_diff,
)

pytestmark = pytest.mark.anyio


def _repo(path: Path) -> Path:
    path.mkdir()
    run = lambda *a: subprocess.run(["git", *a], cwd=path, check=True, capture_output=True)  # noqa: E731
    run("init", "-q", "-b", "main")
    (path / "sub").mkdir()
    (path / "sub" / "a.txt").write_text("one\n")
    run("add", ".")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    # a hostile hook that must never run when scillm makes a worktree
    (path / ".git" / "hooks" / "post-checkout").write_text("#!/bin/sh\ntouch \"$GIT_DIR/../HOOK_RAN\"\n")
    (path / ".git" / "hooks" / "post-checkout").chmod(0o755)
    return path


async def test_worktree_isolates_the_callers_tree_and_diffs_against_base(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "repo")
    (repo / "sub" / "a.txt").write_text("uncommitted\n")  # the caller's own edit stays theirs
    status_before = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True).stdout
    wt = await create_worktree(repo / "sub", tmp_path / "run" / "worktree")
    assert wt.workdir == wt.path / "sub" and (wt.workdir / "a.txt").read_text() == "one\n"
    (wt.workdir / "a.txt").write_text("two\n")
    (wt.workdir / "new.bin").write_bytes(b"\x00\x01")
    patch, paths = await worktree_diff(wt)
    assert sorted(paths) == ["sub/a.txt", "sub/new.bin"]
    assert "-one\n+two" in patch and "GIT binary patch" in patch
    assert (repo / "sub" / "a.txt").read_text() == "uncommitted\n"
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True).stdout == status_before
    assert not list(tmp_path.rglob("HOOK_RAN"))
    await remove_worktree(wt)
    assert not wt.path.exists()
    listing = subprocess.run(["git", "worktree", "list", "--porcelain"], cwd=repo, capture_output=True).stdout
    assert listing.count(b"worktree ") == 1  # only the caller's own


async def test_reset_worktree_returns_to_the_base_commit(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "repo")
    wt = await create_worktree(repo, tmp_path / "run" / "worktree")
    (wt.path / "sub" / "a.txt").write_text("changed\n")
    (wt.path / "untracked.txt").write_text("x")
    (wt.path / ".gitignore").write_text("ignored.log\n")
    (wt.path / "ignored.log").write_text("y")
    await reset_worktree(wt)
    assert await worktree_diff(wt) == ("", [])
    assert (wt.path / "sub" / "a.txt").read_text() == "one\n" and not (wt.path / "ignored.log").exists()
    await remove_worktree(wt)


async def test_worktree_refuses_what_is_not_a_repository_or_an_option(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(GitError, match="not inside a git repository"):
        await create_worktree(tmp_path / "plain", tmp_path / "wt")
    repo = _repo(tmp_path / "repo")
    with pytest.raises(GitError, match="must not start with"):
        await create_worktree(repo, tmp_path / "wt", ref="--upload-pack=x")
    with pytest.raises(GitError):
        await create_worktree(repo, tmp_path / "wt", ref="no-such-ref")


async def test_event_log_follow_resumes_and_wakes_without_polling(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl", redact=["sk-secret-123456"])
    log.append("a", node="n1")
    log.append("b", text="key sk-secret-123456")
    got: list[dict] = []

    async def follower() -> None:
        async for event in log.follow(after=1):
            if event is not None:
                got.append(event)

    task = asyncio.ensure_future(follower())
    await asyncio.sleep(0)
    log.append("c")
    log.close()
    await asyncio.wait_for(task, 5)
    assert [e["type"] for e in got] == ["b", "c"] and [e["seq"] for e in got] == [2, 3]
    assert "sk-secret" not in (tmp_path / "events.jsonl").read_text()
    # reopened after a restart: numbering continues, and a closed log replays and ends
    again = EventLog(tmp_path / "events.jsonl")
    assert again.seq == 3
    again.close()
    frames = [f async for f in sse_tail(again, 2, heartbeat_s=1.0)]
    assert frames[0].startswith(b"id: 3\ndata: ") and frames[-1].startswith(b"event: end")


async def test_event_log_heartbeats_while_quiet(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    stream = sse_tail(log, 0, heartbeat_s=0.01)
    assert await anext(stream) == b": heartbeat\n\n"
    log.append("x")
    frame = await anext(stream)
    assert orjson.loads(frame.split(b"data: ", 1)[1])["type"] == "x"
    log.close()
    assert (await anext(stream)).startswith(b"event: end")


async def test_managed_process_lines_stdin_death_and_group_kill(tmp_path: Path) -> None:
    script = ("import subprocess, sys\n"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"  # a grandchild in the group
              "print('ready', flush=True)\n"
              "for line in sys.stdin:\n"
              "    print('echo ' + line.strip(), flush=True)\n"
              "    sys.stderr.write('token sk-live-secret-999\\n'); sys.stderr.flush()\n")
    lines: list[bytes] = []
    child = ManagedProcess("echo", [sys.executable, "-c", script], env={"PATH": os.environ["PATH"]}, cwd=tmp_path,
                           log_path=tmp_path / "child.log", on_stdout=lines.append, stdin=True,
                           redact=["sk-live-secret-999"], kill_grace_s=0.5)
    await child.start()
    await child.write(b"hi\n")
    while b"echo hi" not in lines:
        await asyncio.sleep(0.02)
    assert lines[0] == b"ready" and child.alive
    pgid = child.pid
    assert pgid is not None and len(group_members(pgid)) == 2
    await child.stop()
    assert not child.alive and child.exited.is_set() and group_members(pgid) == []
    log = (tmp_path / "child.log").read_text()
    assert "sk-live-secret-999" not in log and "[redacted]" in log
    # it can be started again after it died (the owner's restart)
    await child.start()
    assert child.alive and child.pid != pgid
    os.killpg(child.pid, 9)
    await asyncio.wait_for(child.exited.wait(), 10)
    assert not child.alive


async def test_run_keys_per_session_attribution_view_keys_and_expiry() -> None:
    """One key for a long-lived child (opencode serve): a call counts only for a session a live run bound, and is
    attributed to that run and the unit of work it is for; a view key reads one run's GET routes only, until it
    expires."""
    import httpx
    from scillm_exec import VIEW_KEY_PREFIX, RunKeys
    from scillm_exec.auth import RunKeyMiddleware
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from scillm_core import Identity, Job, identity_of
    from scillm_core.events import PARENT_SCOPE_KEY

    async def echo(request):  # what the app behind the middleware sees
        return JSONResponse({"auth": request.headers.get("authorization"), "run": request.headers.get(
            "x-scillm-exec-run"), "caller": request.headers.get("x-caller-skill"),
            "owner": identity_of(request.scope).owner, "job": getattr(request.scope.get("scillm.job"), "id", None),
            "unit": request.scope.get(PARENT_SCOPE_KEY)})

    now = [1000.0]
    keys = RunKeys(clock=lambda: now[0])
    app = RunKeyMiddleware(Starlette(routes=[Route("/{p:path}", echo, methods=["GET", "POST"])]), keys)
    serve = keys.mint("opencode-serve", None, per_session=True)
    alice = Identity(owner="key-alice", name="alice")
    keys.bind_session(serve, "ses_a", "oc-1", "proj", identity=alice, job=Job(kind="run", id="oc-1", owner=alice.owner),
                      unit="run:opencode/oc-1")
    keys.bind_child(serve, "ses_child", "ses_a")
    worker = keys.mint("agent-w", "agents", unit="run:agents/w/s1")
    view = keys.mint("oc-1", "proj", prefix=VIEW_KEY_PREFIX, ttl_s=60,
                     allow=lambda method, path: method == "GET" and path == "/v1/runs/oc-1", identity=alice)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        auth = {"authorization": f"Bearer {serve}"}
        ok = (await c.post("/v1/chat/completions", headers={**auth, "x-session-id": "ses_a"})).json()
        # authenticated as the key that started the run (its budgets, its isolation); no key goes further in
        assert ok == {"auth": None, "run": "oc-1", "caller": "proj/oc-1", "owner": "key-alice", "job": "oc-1",
                      "unit": "run:opencode/oc-1"}
        child = await c.post("/v1/chat/completions", headers={**auth, "x-session-id": "ses_child"})
        assert child.json()["run"] == "oc-1"  # a subagent's calls belong to its parent's run
        assert child.json()["unit"] == "run:opencode/oc-1"
        # a key's calls are for its unit, which may change while it lives (a standing worker's turns)
        w = {"authorization": f"Bearer {worker}"}
        assert (await c.post("/v1/responses", headers=w)).json()["unit"] == "run:agents/w/s1"
        keys.set_unit(worker, "run:agents/w/t1")
        assert (await c.post("/v1/responses", headers=w)).json()["unit"] == "run:agents/w/t1"
        plain = keys.mint("run_x", "proj")
        assert (await c.post("/v1/responses", headers={"authorization": f"Bearer {plain}"})).json()["unit"] == \
            "run:run_x"
        for headers in ({**auth}, {**auth, "x-session-id": "ses_other"}):
            assert (await c.post("/v1/chat/completions", headers=headers)).status_code == 403
        assert (await c.get("/v1/scillm/opencode/runs", headers={**auth, "x-session-id": "ses_a"})).status_code \
            == 403  # model routes only
        keys.unbind_session(serve, "ses_a")
        assert (await c.post("/v1/chat/completions", headers={**auth, "x-session-id": "ses_a"})).status_code == 403
        assert (await c.post("/v1/chat/completions", headers={**auth, "x-session-id": "ses_child"})).status_code \
            == 403
        v = {"authorization": f"Bearer {view}"}
        assert (await c.get("/v1/runs/oc-1", headers=v)).json()["owner"] == "key-alice"  # reads as alice
        assert (await c.get("/v1/runs/oc-2", headers=v)).status_code == 403
        assert (await c.post("/v1/runs/oc-1", headers=v)).status_code == 403
        now[0] += 61
        assert (await c.get("/v1/runs/oc-1", headers=v)).status_code == 401
        # keys of other schemes that merely share the sk-scillm- prefix are not this table's business
        other = (await c.get("/v1/runs/oc-1", headers={"authorization": "Bearer sk-scillm-vk-abc"})).json()
        assert other["auth"] == "Bearer sk-scillm-vk-abc"


async def test_worktree_diff_waits_out_a_briefly_held_index_lock(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "repo")
    wt = await create_worktree(repo, tmp_path / "wt")
    (wt.path / "new.txt").write_text("x\n")
    gitdir = Path((wt.path / ".git").read_text().split(":", 1)[1].strip())
    lock = gitdir / "index.lock"
    lock.write_text("")  # an agent's own git command holds the index
    asyncio.get_running_loop().call_later(0.3, lock.unlink)
    _, paths = await worktree_diff(wt)
    assert paths == ["new.txt"]
