"""Run one CLI child bounded: argv only, its own process group, the run's sandbox enforced by a mount namespace
(:mod:`scillm_exec.sandbox`), chunked reads, wall-clock and byte-idle timeouts, process-group kill (SIGTERM, then
SIGKILL) on timeout, cancel and exit. Artifacts go to the run directory.

The child leads its own process group, so a scillm that is killed (SIGKILL, a crash) takes none of it along: the
group runs on, orphaned. While a group lives, a note in the run directory (``process.json``: the leader's pid and
when it started) lets the next scillm end it (:func:`end_leftover_group`); the note goes once the group is gone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from attrs import define, field

from scillm_core.jsonio import loads
from scillm_core.redact import StreamRedactor
from scillm_core.sessions import SessionContext, SessionSpec
from scillm_exec import sandbox
from scillm_exec.config import exec_config

__all__ = ["PID_SPACE", "CliOutcome", "end_leftover_group", "forget_group", "group_members", "kill_group",
           "process_start", "remember_group", "run_cli", "sandboxed"]

CHUNK = 64 * 1024
MAX_EVENT_LINE = 32 * 1024 * 1024   # a line longer than this is split (stdout.log still keeps every byte)
TEXT_PREVIEW = 4096                 # non-JSON lines are kept in events.jsonl up to this many characters


@define(kw_only=True)
class CliOutcome:
    """What :func:`run_cli` saw. ``status`` is ``completed`` (exit 0), ``failed``, ``timeout`` (wall clock or idle)."""

    status: str
    exit_code: int | None
    events: list[dict[str, Any]] = field(factory=list)   # the CLI's JSON events, as parsed
    stdout_tail: str = ""
    stderr_tail: str = ""
    error: str | None = None
    pgid: int | None = None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``, from /proc (no psutil)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2:].split()
        if len(rest) >= 3 and rest[0] != b"Z" and int(rest[2]) == pgid:
            members.append(int(entry.name))
    return members


async def kill_group(pgid: int, grace_s: float = 2.0) -> None:
    """SIGTERM the whole group, wait up to ``grace_s`` for it to go, then SIGKILL and wait until it is gone."""
    if not group_members(pgid):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return
        await asyncio.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while group_members(pgid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def _pid_space() -> str:
    """Where a recorded pid names the same process: this boot of this machine, in this pid namespace (two containers
    on one host, or one machine before and after a reboot, number their processes apart). Unknown: a value nothing
    else has, so no pid recorded elsewhere is ever checked here."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return f"{fh.read().strip()}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return f"unknown/{os.urandom(8).hex()}"


PID_SPACE = _pid_space()


def process_start(pid: int) -> int | None:
    """When live process ``pid`` started (clock ticks after boot, from /proc), else ``None``: with the pid this names
    one process, never a later one that was given the same pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    rest = stat[stat.rfind(b")") + 2:].split()
    return int(rest[19]) if len(rest) > 19 and rest[0] != b"Z" else None


def remember_group(note: Path, pgid: int) -> None:
    """Note the process group a child leads (its leader's pid and start) and which process started it (this one),
    for :func:`end_leftover_group`."""
    me = os.getpid()
    note.write_bytes(orjson.dumps({"pgid": pgid, "started": process_start(pgid), "by": me,
                                   "by_started": process_start(me), "pid_space": PID_SPACE}))


def forget_group(note: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        note.unlink()


async def end_leftover_group(note: Path, grace_s: float = 2.0) -> int | None:
    """Kill the process group ``note`` names, left running by a scillm that died, and remove the note; the group's
    id when there was one. Nothing while the process that noted it lives (another scillm process on this data dir:
    its child is live). Only that very group: its leader is the process noted (same pid, same start), or it is
    gone and members remain (the kernel gives no new process a pid still in use as a group id); a pid reused by
    another process is left alone, and so is a note from another pid namespace or boot (:data:`PID_SPACE`: its pids
    name other processes here)."""
    try:
        noted = orjson.loads(note.read_bytes())
        pgid, started = int(noted["pgid"]), noted.get("started")
        by = int(noted["by"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if noted.get("pid_space") != PID_SPACE:
        return None
    if by != os.getpid() and process_start(by) == noted.get("by_started"):
        return None
    now = process_start(pgid)
    ours = (now is not None and now == started) or (now is None and bool(group_members(pgid)))
    if ours:
        await kill_group(pgid, grace_s)
    forget_group(note)
    return pgid if ours else None


def _event_type(obj: Any) -> str:
    if isinstance(obj, dict):
        kind = obj.get("type")
        if isinstance(kind, str):
            sub = obj.get("subtype")
            return f"{kind}.{sub}" if isinstance(sub, str) else kind
    return "json"


class _Lines:
    """Split a byte stream into lines without a line-length limit (oversized lines are cut into pieces)."""

    def __init__(self, handle: Callable[[bytes], None]) -> None:
        self.buf = bytearray()
        self.handle = handle

    def feed(self, chunk: bytes) -> None:
        self.buf += chunk
        start = 0
        while True:
            i = self.buf.find(b"\n", start)
            if i < 0:
                break
            self.handle(bytes(self.buf[start:i]))
            start = i + 1
        del self.buf[:start]
        while len(self.buf) > MAX_EVENT_LINE:
            self.handle(bytes(self.buf[:MAX_EVENT_LINE]))
            del self.buf[:MAX_EVENT_LINE]

    def close(self) -> None:
        if self.buf:
            self.handle(bytes(self.buf))
            self.buf.clear()


LineSplitter = _Lines  # shared with service.py (long-lived children)


def sandboxed(argv: Sequence[str], sandbox_mode: str, env: Mapping[str, str], cwd: str | Path | None) -> list[str]:
    """``argv`` started through the sandbox launcher: everything read-only but the run's HOME and TMPDIR, and
    ``cwd`` for ``workspace-write``."""
    writable = [p for p in dict.fromkeys((env.get("HOME"), env.get("TMPDIR"))) if p and os.path.isdir(p)]
    if sandbox_mode == "workspace-write" and cwd is not None:
        writable.append(str(cwd))
    return [sys.executable, "-I", sandbox.__file__, *(x for path in writable for x in ("--writable", path)), "--",
            *argv]


async def run_cli(argv: Sequence[str], *, spec: SessionSpec, ctx: SessionContext, env: Mapping[str, str],
                  cwd: str | Path | None = None, stdin: bytes | None = None, kill_grace_s: float = 2.0,
                  source: str | None = None, redact: Sequence[str] = ()) -> CliOutcome:
    """Run ``argv`` (a list, never a shell string) with exactly ``env``; write ``stdout.log``, ``stderr.log`` and
    ``events.jsonl`` (one normalised record per output line) under ``ctx.run_dir``; publish each record with
    ``ctx.emit``. Enforces ``spec.sandbox`` (unless ``[exec] enforce_sandbox = false``), ``spec.timeout_s`` and
    ``spec.idle_timeout_s`` (no bytes on stdout or stderr). On cancellation the process group is killed before
    ``CancelledError`` propagates."""
    if isinstance(argv, (str, bytes)) or not argv:
        raise TypeError("argv must be a non-empty list of arguments, never a shell string")
    enforced = exec_config(ctx.runtime).enforce_sandbox
    launch = sandboxed(argv, spec.sandbox, env, cwd) if enforced else list(argv)
    run_dir = ctx.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    source = source or spec.profile
    # one redactor per stream: each holds back a tail, so a secret split across two reads is still redacted
    redactors = {"stdout": StreamRedactor(redact), "stderr": StreamRedactor(redact)}
    scrub = redactors["stdout"].scrub
    events: list[dict[str, Any]] = []
    seq = 0
    tails = {"stdout": bytearray(), "stderr": bytearray()}
    last_activity = time.monotonic()

    with open(run_dir / "stdout.log", "wb") as out_f, open(run_dir / "stderr.log", "wb") as err_f, \
            open(run_dir / "events.jsonl", "ab") as ev_f:

        def record(kind: str, payload: dict[str, Any]) -> None:
            nonlocal seq
            seq += 1
            rec = {"seq": seq, "ts": round(time.time(), 3), "source": source, "type": kind, **payload}
            ev_f.write(scrub(orjson.dumps(rec)) + b"\n")
            ev_f.flush()
            with contextlib.suppress(Exception):
                ctx.emit(rec)

        def on_line(line: bytes) -> None:
            line = line.rstrip(b"\r")
            if not line.strip():
                return
            try:
                obj = loads(line)
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                events.append(obj)
                record(_event_type(obj), {"event": obj})
            else:
                text = line.decode("utf-8", "replace")
                record("output", {"text": text[:TEXT_PREVIEW], "bytes": len(line),
                                  "truncated": len(text) > TEXT_PREVIEW})

        lines = _Lines(on_line)
        record("process.start", {"argv0": os.path.basename(argv[0]), "cwd": str(cwd) if cwd else None,
                                 "sandbox": spec.sandbox, "sandbox_enforced": enforced})
        proc = await asyncio.create_subprocess_exec(
            *launch, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(cwd) if cwd else None,
            env=dict(env), start_new_session=True, limit=CHUNK)
        pgid = proc.pid
        note = run_dir / "process.json"
        remember_group(note, pgid)

        def write(name: str, sink: BinaryIO, data: bytes) -> None:
            """Already redacted ``data`` to the log, the tail and (stdout) the event lines."""
            if not data:
                return
            sink.write(data)
            sink.flush()
            tail = tails[name]
            tail += data
            if len(tail) > 8192:
                del tail[:-8192]
            if name == "stdout":
                lines.feed(data)

        async def pump(stream: asyncio.StreamReader, sink: BinaryIO, name: str) -> None:
            nonlocal last_activity
            try:
                while True:
                    chunk = await stream.read(CHUNK)
                    if not chunk:
                        break
                    last_activity = time.monotonic()
                    write(name, sink, redactors[name].feed(chunk))
            finally:
                write(name, sink, redactors[name].flush())

        async def feed() -> None:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(stdin or b"")
                await proc.stdin.drain()
            with contextlib.suppress(Exception):
                proc.stdin.close()

        assert proc.stdout is not None and proc.stderr is not None
        pumps = [asyncio.ensure_future(pump(proc.stdout, out_f, "stdout")),
                 asyncio.ensure_future(pump(proc.stderr, err_f, "stderr"))]
        feeder = asyncio.ensure_future(feed()) if stdin is not None else None
        waiter = asyncio.ensure_future(proc.wait())
        started = time.monotonic()
        deadline = started + spec.timeout_s
        status: str | None = None
        error: str | None = None

        async def finish_pumps(wait_s: float) -> None:
            _, pending = await asyncio.wait(pumps, timeout=wait_s)
            for task in pending:
                task.cancel()
            for task in [*pumps, *([feeder] if feeder else [])]:
                with contextlib.suppress(BaseException):
                    await task

        try:
            while True:
                now = time.monotonic()
                left = deadline - now
                idle_left = (last_activity + spec.idle_timeout_s - now) if spec.idle_timeout_s else float("inf")
                if left <= 0:
                    status, error = "timeout", f"run exceeded timeout_s={spec.timeout_s:g}"
                    break
                if idle_left <= 0:
                    status, error = "timeout", f"no output for idle_timeout_s={spec.idle_timeout_s:g}"
                    break
                done, _ = await asyncio.wait({waiter}, timeout=min(left, idle_left, 0.25))
                if waiter in done:
                    break
        except asyncio.CancelledError:
            await kill_group(pgid, kill_grace_s)
            waiter.cancel()
            await finish_pumps(1.0)
            forget_group(note)
            lines.close()
            record("process.end", {"status": "cancelled", "exit_code": proc.returncode})
            raise
        if status == "timeout":
            record("process.timeout", {"error": error})
            await kill_group(pgid, kill_grace_s)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(waiter, 5)
            await finish_pumps(1.0)
        else:
            # the main process exited: let buffered output drain, then end whatever it left in its group
            await asyncio.wait(pumps, timeout=1.0)
            await kill_group(pgid, kill_grace_s)
            await finish_pumps(2.0)
        forget_group(note)
        lines.close()
        exit_code = proc.returncode
        if status is None:
            status = "completed" if exit_code == 0 else "failed"
            if exit_code != 0:
                error = f"{os.path.basename(argv[0])} exited with code {exit_code}"
            lines_of_err = bytes(tails["stderr"]).decode("utf-8", "replace").strip().splitlines()
            if enforced and exit_code == sandbox.SANDBOX_FAILED and lines_of_err and \
                    lines_of_err[-1].startswith("scillm sandbox:"):
                error = lines_of_err[-1]
        record("process.end", {"status": status, "exit_code": exit_code,
                               "duration_s": round(time.monotonic() - started, 3)})
    return CliOutcome(status=status, exit_code=exit_code, events=events, pgid=pgid, error=error,
                      stdout_tail=bytes(tails["stdout"]).decode("utf-8", "replace"),
                      stderr_tail=bytes(tails["stderr"]).decode("utf-8", "replace"))
