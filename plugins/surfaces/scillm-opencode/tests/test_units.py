"""The OpenCode surfaces without a server: restart recovery, the disabled switch, event normalisation, skills."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest
from scillm_exec.process import PID_SPACE
from scillm_opencode.normalise import SessionEvents
from scillm_opencode.session import assistant_text
from scillm_opencode.skills import MAX_SKILL_BYTES, check_skill_names, materialise, skill_rules

from scillm_core import errors
from scillm_core.state.presence import INSTANCES
from scillm_core.testing import ServerThread, make_app

KEY = "sk-master-units-123456"
ONLY = ["opencode", "exec", "agent-runners", "auth", "chat", "openai-compat"]


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30, headers={"authorization": f"Bearer {KEY}", "x-caller-skill": "t"})


def test_disabled_surface_answers_404_saying_how_to_enable(tmp_path: Path) -> None:
    app = make_app(env={"SCILLM_MASTER_KEY": KEY}, data_dir=tmp_path, only=ONLY)
    with ServerThread(app) as server:
        response = client(server.url).post("/v1/scillm/opencode/runs", json={"prompt": "x"})
        assert response.status_code == 404 and response.json()["error"]["code"] == "opencode_serve_disabled"
        assert "SCILLM_OPENCODE_SERVE_ENABLED" in response.json()["error"]["message"]
        health = client(server.url).get("/v1/scillm/opencode/transport/capabilities")
        assert health.status_code == 404
        # the monitor page is not served either
        assert client(server.url).get("/v1/scillm/opencode/runs/oc-x/monitor").status_code in (404, 405)


@pytest.mark.parametrize("namespace,dirname,route", [
    ("opencode.runs", "runs", "/v1/scillm/opencode/runs"),
    ("opencode.transport", "transport", "/v1/scillm/opencode/transport/runs")])
def test_runs_in_flight_when_scillm_stopped_are_finalised_as_interrupted(tmp_path: Path, namespace: str,
                                                                        dirname: str, route: str) -> None:
    """A record left ``running`` by a process that is gone (here: a pid that cannot be alive) is finalised
    ``error: interrupted`` at start-up, with a terminal event, instead of staying ``running`` forever."""
    import asyncio
    import subprocess

    from scillm_core.state.sqlite import SQLiteStore

    run_id = "oc-crashed-1"
    run_dir = tmp_path / "opencode" / dirname / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "events.jsonl").write_text(json.dumps({"seq": 1, "ts": 1.0, "type": "run_started", "node": None})
                                          + "\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True, text=True)  # noqa
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init")
    worktree = tmp_path / "opencode" / "worktrees" / run_id
    git("worktree", "add", "-q", "--detach", str(worktree))
    doc = {"run_id": run_id, "status": "running", "created_at": time.time(), "caller": "t", "owner": "master",
           "worktree": str(worktree), "repo": str(repo),
           "instance": "gone", "driver": {"pid_space": PID_SPACE, "pid": 2 ** 22 + 12345, "started": 1}}
    live = dict(doc, run_id="oc-live-elsewhere", instance="elsewhere",
                driver={"pid_space": "another-host", "pid": 1, "started": 1})

    async def seed() -> None:
        store = SQLiteStore(tmp_path / "scillm.sqlite3")
        await store.put(namespace, run_id, doc)
        await store.put(namespace, live["run_id"], live)
        await store.put(INSTANCES, "elsewhere", {"instance_id": "elsewhere"}, ttl_s=3600)  # that instance lives
        await store.close()

    asyncio.run(seed())
    app = make_app(env={"SCILLM_MASTER_KEY": KEY, "SCILLM_OPENCODE_SERVE_ENABLED": "1"}, data_dir=tmp_path, only=ONLY)
    with ServerThread(app) as server:
        c = client(server.url)
        got = c.get(f"{route}/{run_id}").json()
        assert got["status"] == "error" and got["error"].startswith("interrupted"), got
        events = c.get(f"{route}/{run_id}/{'events/stream' if 'transport' in route else 'events'}").text
        assert '"type":"run_completed"' in events and '"status":"error"' in events and "event: end" in events
        index = {r["run_id"]: r["status"] for r in c.get(route).json()["runs"]}
        assert index == {run_id: "error", "oc-live-elsewhere": "running"}  # another host's run is left alone
        assert json.loads((run_dir / "result.json").read_text())["status"] == "error"
        # its worktree is gone too, from disk and from the caller's repository
        assert not worktree.exists() and len(git("worktree", "list").stdout.splitlines()) == 1


@pytest.mark.parametrize("namespace,dirname,route", [
    ("opencode.runs", "runs", "/v1/scillm/opencode/runs"),
    ("opencode.transport", "transport", "/v1/scillm/opencode/transport/runs")])
def test_a_dead_run_read_while_redis_is_down_answers_its_run_dir_and_is_settled_when_redis_answers(
        tmp_path: Path, namespace: str, dirname: str, route: str) -> None:
    """As exec's runs: a run whose scillm died, read while the state store is down (scillm started without it),
    answers its run dir's copy of the record (status.json, as the driver wrote it with the store's) marked degraded
    instead of the store's 503, and so does the index (what this machine's run dirs hold); nothing is finalised then
    (no result.json, its worktree kept). Once Redis answers, the start-up recovery goes again and finalises it
    without anyone reading it (before: the index was a 503, and the run stayed running until its first read)."""
    import asyncio
    import signal
    import subprocess

    from scillm_core.state.redis import RedisStore
    from scillm_core.testing.services import RedisServer

    run_id = "oc-dead-1"
    run_dir = tmp_path / "opencode" / dirname / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "events.jsonl").write_text(json.dumps({"seq": 1, "ts": 1.0, "type": "run_started", "node": None})
                                          + "\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True, text=True)  # noqa
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init")
    worktree = tmp_path / "opencode" / "worktrees" / run_id
    git("worktree", "add", "-q", "--detach", str(worktree))
    doc = {"run_id": run_id, "status": "running", "created_at": time.time(), "caller": "t", "owner": "master",
           "worktree": str(worktree), "repo": str(repo),
           "instance": "gone", "driver": {"pid_space": PID_SPACE, "pid": 2 ** 22 + 12345, "started": 1}}
    (run_dir / "status.json").write_text(json.dumps(doc))
    redis = RedisServer(tmp_path / "redis", persist=True).start()
    try:
        state = {"backend": "redis", "redis_url": redis.url, "timeout_s": 0.5}

        async def seed() -> None:
            store = RedisStore(redis.url)
            await store.put(namespace, run_id, doc)
            await store.close()

        asyncio.run(seed())
        redis.kill(signal.SIGKILL)
        app = make_app(env={"SCILLM_MASTER_KEY": KEY, "SCILLM_OPENCODE_SERVE_ENABLED": "1"}, data_dir=tmp_path,
                       only=ONLY, config={"state": state})
        with ServerThread(app) as server:
            c = client(server.url)
            down = c.get(f"{route}/{run_id}")
            assert down.status_code == 200, down.text
            assert down.json()["status"] == "running" and "state store" in down.json()["degraded"], down.json()
            index = c.get(route)
            assert index.status_code == 200, index.text
            assert [(r["run_id"], r["status"]) for r in index.json()["runs"]] == [(run_id, "running")]
            assert "state store" in index.json()["degraded"] and "run dirs" in index.json()["degraded"]
            assert not (run_dir / "result.json").exists() and worktree.exists()  # nothing finalised

            redis.start()  # the same port and data: the run's record is there again
            for _ in range(600):  # settled by the recovery, once a presence beat reaches the store: no read
                if (run_dir / "result.json").exists():
                    break
                time.sleep(0.1)
            assert json.loads((run_dir / "result.json").read_text())["status"] == "error"
            got = c.get(f"{route}/{run_id}").json()
            assert got["status"] == "error" and got["error"].startswith("interrupted") and "degraded" not in got
            assert json.loads((run_dir / "result.json").read_text())["status"] == "error" and not worktree.exists()
            events = c.get(f"{route}/{run_id}/{'events/stream' if 'transport' in route else 'events'}").text
            assert '"type":"run_completed"' in events and "event: end" in events
    finally:
        redis.kill()


def test_normaliser_turns_bus_events_into_run_events() -> None:
    events = SessionEvents("ses_1")
    feed = lambda kind, **props: events.feed({"type": kind, "properties": {"sessionID": "ses_1", **props}})  # noqa
    assert feed("message.updated", info={"id": "m_user", "role": "user"}) == []
    assert feed("message.part.updated", part={"id": "p0", "messageID": "m_user", "type": "text", "text": "hi"}) == [
        ("user_message", {"message_id": "m_user", "text": "hi"})]
    feed("message.updated", info={"id": "m1", "role": "assistant"})
    feed("message.part.updated", part={"id": "p1", "messageID": "m1", "type": "reasoning", "text": ""})
    assert feed("message.part.delta", messageID="m1", partID="p1", field="text", delta="think")[0][0] == \
        "reasoning_delta"
    feed("message.part.updated", part={"id": "p2", "messageID": "m1", "type": "text", "text": ""})
    assert feed("message.part.delta", messageID="m1", partID="p2", field="text", delta="Hel")[0][1]["delta"] == "Hel"
    # the final part update carries the whole text: only what the deltas did not send goes out
    assert feed("message.part.updated", part={"id": "p2", "messageID": "m1", "type": "text", "text": "Hello"}) == [
        ("transcript_delta", {"message_id": "m1", "part_id": "p2", "delta": "lo"})]
    tool = {"id": "p3", "messageID": "m1", "type": "tool", "tool": "read", "callID": "c1"}
    assert feed("message.part.updated", part={**tool, "state": {"status": "pending"}})[0][1]["status"] == "pending"
    assert feed("message.part.updated", part={**tool, "state": {"status": "pending"}}) == []  # no change, no event
    done = feed("message.part.updated", part={**tool, "state": {"status": "completed", "input": {"filePath": "a"},
                                                                "output": "x" * 5000}})
    assert done[0][1]["input"] == {"filePath": "a"} and len(done[0][1]["output"]) < 2100
    asked = feed("permission.asked", id="per_1", permission="edit", patterns=["a"], metadata={"filepath": "/a"})
    assert asked == [("permission_requested", {"permission_id": "per_1", "permission": "edit", "patterns": ["a"],
                                               "filepath": "/a", "diff": None})]


def test_assistant_text_and_pending_user_messages() -> None:
    user = lambda i: {"info": {"id": i, "role": "user"}, "parts": [{"type": "text", "text": "q"}]}  # noqa: E731
    bot = lambda i, t: {"info": {"id": i, "role": "assistant"}, "parts": [{"type": "text", "text": t}]}  # noqa
    assert assistant_text([user("u1"), bot("a1", ""), bot("a2", "done")]) == ("done", False)
    # a steer that arrived after the last model call: the session will take another turn
    assert assistant_text([user("u1"), bot("a1", "first"), user("u2")]) == ("first", True)
    assert assistant_text([user("u1"), bot("a1", "x"), user("u2"), bot("a2", "y")]) == ("x\n\ny", False)


def test_skills_are_checked_copied_without_symlinks_and_bounded(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidRequest) as bad:
        check_skill_names(["ok", "../etc"], "$.skills")
    assert bad.value.param == "$.skills[1]"
    assert check_skill_names(["a", "a", "b-c"], "$.skills") == ["a", "b-c"]
    root = tmp_path / "roots"
    (root / "good").mkdir(parents=True)
    (root / "good" / "SKILL.md").write_text("---\nname: good\n---\nbody\n")
    (root / "good" / "secret-link").symlink_to("/etc/passwd")
    (root / "big").mkdir()
    (root / "big" / "SKILL.md").write_text("x")
    (root / "big" / "blob").write_bytes(b"0" * (MAX_SKILL_BYTES + 1))
    os.symlink(root / "good", root / "linked")  # a skill directory that is a symlink is not taken either
    target = tmp_path / "serve-skills"
    done, missing = materialise(["good", "big", "linked", "absent"], [root], target)
    assert done == ["good"] and sorted(missing) == ["absent", "big", "linked"]
    assert sorted(p.name for p in (target / "good").iterdir()) == ["SKILL.md"]
    assert not (target / "big").exists()
    # an external server: only what it already has
    assert materialise(["good", "x"], [root], None, available=["x"]) == (["x"], {"good": "not on the OpenCode server"})
    assert skill_rules(["good"])[-1] == {"permission": "skill", "pattern": "good", "action": "allow"}


def test_doctor_reports_whether_opencode_serve_can_start(tmp_path: Path) -> None:
    """``scillm doctor`` starts a throwaway opencode serve (here in a loopback-only namespace) and asks its health."""
    import subprocess
    import sys

    scillm = str(Path(sys.executable).with_name("scillm"))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "SCILLM_DATA_DIR": str(tmp_path / "data"),
           "SCILLM_OPENCODE_SERVE_ENABLED": "1", "OPENCODE_SERVER_PASSWORD": "sk-not-used-password-42",
           "SCILLM_DISABLE_PLUGINS": "agent-runners"}  # its own checks run every CLI; not what this test is about
    proc = subprocess.run(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" doctor --json', scillm],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    checks = {c["check"]: c for c in json.loads(proc.stdout)}  # (exit 1: no model provider is configured here)
    assert checks["opencode serve can start"]["ok"] is True, checks["opencode serve can start"]
    assert "opencode 1.18.33 answered" in checks["opencode serve can start"]["detail"]
    assert checks["ripgrep for OpenCode skills"]["ok"] is True  # scripts/install --test installs ripgrep
    assert checks["opencode serve surface"]["detail"] == "enabled"
    assert checks["opencode serve can start"]["required"] is True  # switched on, a server that cannot start FAILs
    assert "sk-not-used-password-42" not in proc.stdout
    assert not any(c.get("required") and not c["ok"] for c in checks.values() if "opencode" in c["check"])


def test_readme_config_example_is_valid() -> None:
    import re
    import tomllib

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = tomllib.loads(re.search(r"```toml\n(\[opencode\].*?)```", readme, re.S)[1])  # type: ignore[index]
    app = make_app(config=example, only=ONLY)
    cfg = app.runtime.config.section("opencode")
    assert cfg.enabled is True and cfg.models == ("glm/glm-5.1",) and cfg.permission == {"bash": "deny"}
    with pytest.raises(Exception, match=r"opencode\.bogus"):
        make_app(config={"opencode": {"bogus": 1}}, only=ONLY)


def test_a_directory_the_file_system_cannot_take_is_400_naming_it(tmp_path: Path) -> None:
    """``cwd`` / ``workspace`` with a NUL, a name too long for the file system or a symlink loop: a 400 naming the
    field (it was a 500), before any server is started."""
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    app = make_app(env={"SCILLM_MASTER_KEY": KEY, "SCILLM_OPENCODE_SERVE_ENABLED": "1"}, data_dir=tmp_path,
                   only=ONLY, config={"exec": {"allowed_roots": [str(tmp_path)]}})
    with ServerThread(app) as server:
        c = client(server.url)
        for bad in (f"{tmp_path}/x\x00y", str(tmp_path / "a"), str(tmp_path / ("n" * 300))):
            run = c.post("/v1/scillm/opencode/runs", json={"prompt": "x", "cwd": bad})
            assert run.status_code == 400 and run.json()["error"]["param"] == "$.cwd", run.text
            transport = c.post("/v1/scillm/opencode/transport/runs",
                               json={"workspace": bad, "nodes": [{"id": "n", "prompt": "x"}]})
            assert transport.status_code == 400 and transport.json()["error"]["param"] == "$.workspace", transport.text
