"""A run going when scillm is killed (SIGKILL) is settled by the scillm started next on the same data dir: failed
(interrupted) with its result.json, an end frame for a follower resuming with Last-Event-ID, its key's run slot
free again, and the CLI's process group (which outlived the killed scillm: it has its own) ended."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from scillm_exec import group_members

from scillm_core.testing import DEV_KEY, FakeOpenAI, install_fake_cli
from scillm_core.testing.services import RedisServer, ScillmProcess

AUTH = {"authorization": f"Bearer {DEV_KEY}", "x-caller-skill": "restart-test"}


def until(check: Any, what: str) -> Any:
    for _ in range(600):
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"never: {what}")


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:].split()[0] != b"Z"


@pytest.fixture(autouse=True)
def no_cli_left(tmp_path: Path) -> Iterator[None]:
    """Whatever a test found, the fake CLI it started (which outlives a killed scillm by design) ends with it."""
    yield
    noted = tmp_path / "root" / "pids.json"
    if noted.is_file():
        for pid in group_members(json.loads(noted.read_text())["pgid"]):
            with contextlib.suppress(OSError):
                if str(tmp_path).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


def test_a_run_going_when_scillm_is_killed_is_settled_by_the_next_scillm(tmp_path: Path) -> None:
    bin_dir, root = tmp_path / "bin", tmp_path / "root"
    bin_dir.mkdir()
    root.mkdir()
    install_fake_cli(bin_dir)
    with FakeOpenAI() as upstream:
        env = {"OPENAI_API_KEY": "sk-restart-test-0123456789", "OPENAI_API_BASE": upstream.base_url}
        config = {"exec": {"allowed_roots": [str(root)], "max_runs_per_key": 1, "kill_grace_s": 0.5,
                           "heartbeat_s": 0.2},
                  "agent_runners": {"bin_dir": str(bin_dir), "default_model": "openai/fake-model"}}

        def run(server: ScillmProcess, prompt: dict[str, Any], wait: bool) -> httpx.Response:
            return httpx.post(server.url + "/v1/scillm/exec", headers=AUTH, timeout=60, json={
                "profile": "claude-print", "prompt": json.dumps(prompt), "cwd": str(root), "wait": wait,
                "sandbox": "workspace-write"})  # the fake CLI notes its pids in cwd

        first = ScillmProcess(tmp_path / "w", env=env, config=config).start()
        try:
            started = run(first, {"mode": "idle"}, wait=False)  # works quietly until killed (ignores SIGTERM)
            assert started.status_code == 202, started.text
            run_id = started.json()["run_id"]
            pids = until(lambda: (root / "pids.json").is_file() and json.loads((root / "pids.json").read_text()),
                         "the CLI started")
            events = Path(first.workdir / "data" / "runs" / run_id / "events.jsonl")
            seen = until(lambda: [json.loads(line) for line in events.read_text().splitlines()], "an event")[-1]["seq"]
            first.kill(signal.SIGKILL)
        finally:
            first.kill(signal.SIGKILL)
        group = [pids["pid"], *pids["children"]]
        assert all(alive(pid) for pid in group) and group_members(pids["pgid"])  # outlived its scillm

        second = ScillmProcess(tmp_path / "w", env=env, config=config).start()  # the same data dir
        try:
            doc = httpx.get(f"{second.url}/v1/scillm/exec/{run_id}", headers=AUTH, timeout=30).json()
            assert doc["status"] == "failed" and doc["error"].startswith("interrupted"), doc
            result = json.loads(Path(doc["artifacts"]["result"]).read_text())
            assert result["status"] == "failed" and result["error"] == doc["error"]
            assert not any(alive(pid) for pid in group) and not group_members(pids["pgid"])
            with httpx.stream("GET", f"{second.url}/v1/scillm/exec/{run_id}/events", timeout=30,
                              headers={**AUTH, "last-event-id": str(seen)}) as stream:
                body = stream.read().decode()  # ends: no heartbeats forever
            frames = [frame for frame in body.split("\n\n") if frame.strip()]
            assert frames[-1].startswith("event: end") and json.loads(frames[-1].split("data: ", 1)[1]) == {
                "type": "run.end", "run_id": run_id, "status": "failed", "exit_code": None}
            interrupted = [f for f in frames if '"run.interrupted"' in f]
            assert len(interrupted) == 1 and interrupted[0].startswith(f"id: {seen + 1}\n")
            again = run(second, {"mode": "ok", "text": "after the restart"}, wait=True)  # its key's one run slot
            assert again.status_code == 200 and again.json()["status"] == "completed", again.text
        finally:
            second.stop()


def test_a_dead_run_read_while_redis_is_down_answers_its_run_dir_and_is_settled_when_redis_answers(
        tmp_path: Path) -> None:
    """The run dir is the durable copy: a run whose scillm was killed, read first while the state store is down (the
    next scillm started without it), answers what its status.json says (marked degraded, as health marks the store)
    instead of the store's 503, and is not settled then (that is a compare-and-set on the store's record); once Redis
    answers again the start-up recovery goes again and settles it without anyone reading it (before: it stayed
    running until its first read)."""
    bin_dir, root = tmp_path / "bin", tmp_path / "root"
    bin_dir.mkdir()
    root.mkdir()
    install_fake_cli(bin_dir)
    redis = RedisServer(tmp_path / "redis", persist=True).start()
    try:
        with FakeOpenAI() as upstream:
            env = {"OPENAI_API_KEY": "sk-restart-test-0123456789", "OPENAI_API_BASE": upstream.base_url}
            config = {"exec": {"allowed_roots": [str(root)], "kill_grace_s": 0.5, "heartbeat_s": 0.2},
                      "agent_runners": {"bin_dir": str(bin_dir), "default_model": "openai/fake-model"},
                      "state": {"backend": "redis", "redis_url": redis.url, "timeout_s": 0.5}}
            first = ScillmProcess(tmp_path / "w", env=env, config=config).start()
            try:
                started = httpx.post(first.url + "/v1/scillm/exec", headers=AUTH, timeout=60, json={
                    "profile": "claude-print", "prompt": json.dumps({"mode": "idle"}), "cwd": str(root),
                    "wait": False, "sandbox": "workspace-write"})
                assert started.status_code == 202, started.text
                run_id = started.json()["run_id"]
                pids = until(lambda: (root / "pids.json").is_file() and json.loads((root / "pids.json").read_text()),
                             "the CLI started")
            finally:
                first.kill(signal.SIGKILL)
            redis.kill(signal.SIGKILL)

            second = ScillmProcess(tmp_path / "w", env=env, config=config).start()  # the same data dir, no store
            try:
                url = f"{second.url}/v1/scillm/exec/{run_id}"
                down = httpx.get(url, headers=AUTH, timeout=30)
                assert down.status_code == 200, down.text
                assert down.json()["status"] == "running" and "state store" in down.json()["degraded"]
                run_dir = second.workdir / "data" / "runs" / run_id
                assert not (run_dir / "result.json").exists() and group_members(pids["pgid"])  # nothing settled

                redis.start()  # the same port and data: the run's record is there again
                until(lambda: (run_dir / "result.json").exists(), "settled once a presence beat reaches the store")
                doc = httpx.get(url, headers=AUTH, timeout=30).json()
                assert doc["status"] == "failed" and doc["error"].startswith("interrupted"), doc
                assert "degraded" not in doc and json.loads((run_dir / "result.json").read_text())["status"] == \
                    "failed"
                assert not group_members(pids["pgid"])  # the CLI that outlived its scillm was ended by the settle
            finally:
                second.stop()
    finally:
        redis.kill()


def test_a_group_noted_in_another_pid_space_is_never_killed(tmp_path: Path) -> None:
    """A data dir shared by containers (or read after a reboot): a note's pids name other processes here, so a dead
    scillm's note from another pid namespace is left alone even when a live group here has that very id."""
    import asyncio
    import subprocess

    from scillm_exec.process import PID_SPACE, end_leftover_group, remember_group

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        note = tmp_path / "process.json"
        remember_group(note, child.pid)
        noted = json.loads(note.read_text())
        assert noted["pid_space"] == PID_SPACE
        dead = {**noted, "by": 2 ** 22 + 4321, "by_started": 1}  # the scillm that noted it is gone
        note.write_text(json.dumps({**dead, "pid_space": "another-container"}))
        assert asyncio.run(end_leftover_group(note, 0.5)) is None
        assert alive(child.pid) and note.exists()
        note.write_text(json.dumps(dead))  # the same note from this pid space: that group is the leftover
        assert asyncio.run(end_leftover_group(note, 0.5)) == child.pid
        child.wait(10)
        assert not note.exists()
    finally:
        child.kill()
        child.wait()


def test_a_long_lived_child_ends_what_every_dead_worker_left_running(tmp_path: Path) -> None:
    """Under ``--workers`` each worker may run its own ``opencode serve``: each notes its child's group under its own
    name, so a start after two workers died ends both leftovers, and a live worker's child is never touched."""
    import asyncio
    import os
    import subprocess

    from scillm_exec.process import process_start, remember_group
    from scillm_exec.service import ManagedProcess

    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    log = tmp_path / "serve.log"
    children = [subprocess.Popen(sleep, start_new_session=True) for _ in range(3)]
    worker = subprocess.Popen(sleep)  # stands in for a live worker
    try:
        for n, child in enumerate(children):
            note = tmp_path / f"serve.group.{1000 + n}.json"
            remember_group(note, child.pid)
            by = (2 ** 22 + n, 1) if n < 2 else (worker.pid, process_start(worker.pid))  # two workers died
            note.write_text(json.dumps({**json.loads(note.read_text()), "by": by[0], "by_started": by[1]}))
        live_note = tmp_path / "serve.group.1002.json"

        async def start_and_stop() -> None:
            managed = ManagedProcess("serve", sleep, env=dict(os.environ), cwd=tmp_path, log_path=log)
            await managed.start()
            await managed.stop()

        asyncio.run(start_and_stop())
        for child in children[:2]:
            child.wait(10)
        assert alive(children[2].pid) and live_note.exists()
        assert sorted(p.name for p in tmp_path.glob("serve.group*.json")) == ["serve.group.1002.json"]
        assert log.read_text().count("left running by a scillm that stopped") == 2
    finally:
        for child in [*children, worker]:
            child.kill()
            child.wait()
