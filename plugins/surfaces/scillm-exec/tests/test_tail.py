"""An exec run's live event stream is the shared tail (``EventLog.follow``): its follower is woken by what the runner
appends and reads each new byte once; while the run writes nothing, it reads nothing (it re-read events.jsonl every
0.1 s)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from scillm_exec_helpers import MASTER_KEY

from scillm_core import hookimpl
from scillm_core.sessions import SessionContext, SessionResult, SessionSpec
from scillm_core.testing import ServerThread, make_app

BATCH = 5000  # events before the quiet period, and again after it


class GatedRunner:
    """Profile ``gated``: appends ``BATCH`` events to events.jsonl (each published with ``ctx.emit``, as ``run_cli``
    does), writes nothing until the test opens ``gate``, then appends ``BATCH`` more and completes."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    @hookimpl
    def scillm_session_profiles(self, runtime: Any) -> list[str]:
        return ["gated"]

    @hookimpl
    def run_session(self, spec: SessionSpec, ctx: SessionContext) -> Any:
        if spec.profile != "gated":
            return None

        async def go() -> SessionResult:
            with open(ctx.run_dir / "events.jsonl", "ab") as fh:
                for seq in range(1, 2 * BATCH + 1):
                    event = {"seq": seq, "ts": time.time(), "source": "gated", "type": "tick", "n": seq}
                    fh.write(orjson.dumps(event) + b"\n")
                    fh.flush()
                    ctx.emit(event)
                    if seq == BATCH:
                        await asyncio.to_thread(self.gate.wait, 60)
            return SessionResult(run_id=ctx.run_id, status="completed", exit_code=0, final_text="done")

        return go


def sse(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    kind = "message"
    for line in lines:
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            yield kind, orjson.loads(line[6:])
            kind = "message"


def test_a_live_run_is_followed_by_wakes_reading_each_byte_once_and_nothing_while_quiet(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import scillm_exec.events

    reads: list[int] = []  # the bytes each read of the follower took from events.jsonl
    real = scillm_exec.events.read_new

    def counted(path: Path, offset: int, buf: bytearray) -> tuple[int, list[dict[str, Any]]]:
        new_offset, events = real(path, offset, buf)
        reads.append(new_offset - offset)
        return new_offset, events

    monkeypatch.setattr(scillm_exec.events, "read_new", counted)  # what EventLog.follow reads with
    runner = GatedRunner()
    app = make_app(env={"SCILLM_MASTER_KEY": MASTER_KEY}, data_dir=tmp_path / "data",
                   config={"exec": {"allowed_roots": [str(tmp_path)], "heartbeat_s": 3600}},
                   plugins=[("gated-runner", runner)], only=["exec", "auth"])
    with ServerThread(app) as thread, httpx.Client(base_url=thread.url, timeout=60, headers={
            "authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": "exec-tail-tests"}) as client:
        started = client.post("/v1/scillm/exec", json={"profile": "gated", "prompt": "go", "cwd": str(tmp_path)})
        assert started.status_code == 202, started.text
        run_id = started.json()["run_id"]
        seqs: list[int] = []
        quiet: list[int] = []
        end: dict[str, Any] | None = None
        with client.stream("GET", f"/v1/scillm/exec/{run_id}/events") as stream:
            for kind, data in sse(stream.iter_lines()):
                if kind == "end":
                    end = data
                    break
                seqs.append(data["seq"])
                if data["seq"] == BATCH:  # the run now writes nothing until the gate opens
                    before = len(reads)
                    time.sleep(0.5)
                    quiet = reads[before:]
                    runner.gate.set()
        size = (tmp_path / "data" / "runs" / run_id / "events.jsonl").stat().st_size
    assert seqs == list(range(1, 2 * BATCH + 1)) and end == {
        "type": "run.end", "run_id": run_id, "status": "completed", "exit_code": 0}
    assert sum(reads) == size  # every byte read once: never from the start again
    assert sum(quiet) == 0 and len(quiet) <= 1  # at most a wake that came during the last read; no polling
