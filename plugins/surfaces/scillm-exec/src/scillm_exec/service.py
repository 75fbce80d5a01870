"""A long-lived child process owned by a surface (an ``opencode serve``, a ``codex app-server``): the same argv,
environment and process-group rules as a bounded run (:func:`scillm_exec.run_cli`), but it stays up across runs.

The owner starts it, reads its stdout line by line through a callback, writes to its stdin, learns when it died
(``exited``, whatever the cause, so in-flight work can be failed and the child restarted) and stops it by killing
its whole process group. stderr (and stdout unless the owner consumes it) goes to a log file, secrets scrubbed.
While the child lives its group is noted beside the log, one note per scillm process (under ``--workers`` each
worker may run its own), so a start after a scillm that died ends every group such a scillm left running first
(:func:`scillm_exec.process.end_leftover_group`; a note of a process that still lives is left alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from scillm_exec.process import CHUNK, LineSplitter, end_leftover_group, forget_group, kill_group, remember_group

__all__ = ["ManagedProcess"]


class ManagedProcess:
    def __init__(self, name: str, argv: Sequence[str], *, env: Mapping[str, str], cwd: str | Path,
                 log_path: Path, on_stdout: Callable[[bytes], None] | None = None, stdin: bool = False,
                 redact: Sequence[str] = (), kill_grace_s: float = 2.0) -> None:
        if isinstance(argv, (str, bytes)) or not argv:
            raise TypeError("argv must be a non-empty list of arguments, never a shell string")
        self.name, self.argv, self.env, self.cwd = name, list(argv), dict(env), Path(cwd)
        self.log_path, self.on_stdout, self.use_stdin = log_path, on_stdout, stdin
        self.secrets = [s.encode() for s in redact if s]
        self.kill_grace_s = kill_grace_s
        self.proc: asyncio.subprocess.Process | None = None
        self.exited = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def group_note(self) -> Path:
        return self.log_path.with_suffix(f".group.{os.getpid()}.json")

    def group_notes(self) -> list[Path]:
        """Every process's note of this child's group (and the one name all processes once shared)."""
        return sorted(self.log_path.parent.glob(glob.escape(self.log_path.stem) + ".group*.json"))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    async def start(self) -> None:
        """Start the child (again, if it had exited); a no-op while it runs."""
        if self.alive:
            return
        self.exited = asyncio.Event()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for note in self.group_notes():
            left = await end_leftover_group(note, self.kill_grace_s)
            if left is not None:
                self._log(f"[scillm] ended process group {left}, left running by a scillm that stopped\n".encode())
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, cwd=str(self.cwd), env=self.env, start_new_session=True, limit=CHUNK,
            stdin=asyncio.subprocess.PIPE if self.use_stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        remember_group(self.group_note, self.proc.pid)
        self._log(f"[scillm] started {os.path.basename(self.argv[0])} pid {self.proc.pid}\n".encode())
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._tasks = [asyncio.ensure_future(self._pump(self.proc.stdout, self.on_stdout)),
                       asyncio.ensure_future(self._pump(self.proc.stderr, None)),
                       asyncio.ensure_future(self._watch(self.proc))]

    async def write(self, data: bytes) -> None:
        """Write to the child's stdin (``stdin=True``); ``ConnectionError`` when it is gone."""
        if self.proc is None or self.proc.stdin is None or not self.alive:
            raise ConnectionResetError(f"{self.name} is not running")
        self.proc.stdin.write(data)
        await self.proc.stdin.drain()

    async def stop(self) -> None:
        """Kill the whole process group (SIGTERM, then SIGKILL after the grace) and wait until it is gone."""
        proc = self.proc
        if proc is None:
            return
        await kill_group(proc.pid, self.kill_grace_s)
        with contextlib.suppress(ProcessLookupError):
            if proc.returncode is None:
                proc.kill()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.exited.wait(), 10)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task

    def _log(self, data: bytes) -> None:
        for secret in self.secrets:
            data = data.replace(secret, b"[redacted]")
        with open(self.log_path, "ab") as fh:
            fh.write(data)

    async def _pump(self, stream: asyncio.StreamReader, on_line: Callable[[bytes], None] | None) -> None:
        def handle(line: bytes) -> None:
            if on_line is None:
                self._log(line + b"\n")
                return
            try:
                on_line(line)
            except Exception as exc:  # an owner's parsing bug must not stop the pump (the child would block)
                self._log(f"[scillm] {self.name}: stdout handler failed: {type(exc).__name__}\n".encode())

        lines = LineSplitter(handle)
        while chunk := await stream.read(CHUNK):
            lines.feed(chunk)
        lines.close()

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        # the leader is gone: let the pumps drain what it wrote, then end anything it left in its group
        await asyncio.wait(self._tasks[:2], timeout=1.0)
        await kill_group(proc.pid, self.kill_grace_s)
        if proc is self.proc:
            forget_group(self.group_note)
        self._log(f"[scillm] {os.path.basename(self.argv[0])} pid {proc.pid} exited with {code}\n".encode())
        self.exited.set()
