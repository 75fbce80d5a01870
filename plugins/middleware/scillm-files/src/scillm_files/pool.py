"""The file workers: a small pool of processes, started on first use, where PDF, ZIP and large-image work runs.

A task gets a worker of its own, bounded by a CPU budget (the worker's CPU time, read from /proc while it works)
and by its caller's deadline (the caller's ``asyncio.timeout``). A task past its budget, past the deadline, or
whose caller left (cancellation) has its worker killed at once; a fresh one starts for a later task. The event loop
only writes tasks and reads answers, and nothing else runs in these processes: file work never shares a pool with
storage or with other callers' requests beyond waiting its turn for a worker (FIFO).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import sys
from typing import Any

__all__ = ["CpuBudgetExceeded", "FilePool", "WorkerCrashed"]

HEADER = 8
POLL_S = 0.05  # how often a busy worker's CPU time is read
_TICK = os.sysconf("SC_CLK_TCK")
_PROC = os.path.exists("/proc/self/stat")


class CpuBudgetExceeded(Exception):
    pass


class WorkerCrashed(Exception):
    pass


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, memory_mb: float) -> _Worker:
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "TMPDIR")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "scillm_fileparse.worker", "--memory-mb", str(memory_mb),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env)  # no provider key in there
        return cls(proc)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def cpu_s(self) -> float:
        """User + system CPU seconds the worker has used (``inf`` once it is gone; 0 without /proc, where only
        the deadline bounds a task)."""
        if not _PROC:
            return 0.0
        try:
            with open(f"/proc/{self.proc.pid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            return float("inf")
        return (int(fields[11]) + int(fields[12])) / _TICK

    async def run(self, payload: bytes, cpu_budget_s: float) -> Any:
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        started = self.cpu_s()
        try:
            stdin.write(len(payload).to_bytes(HEADER, "big"))
            stdin.write(payload)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise WorkerCrashed() from None
        del payload
        answer = asyncio.ensure_future(self._answer(stdout))
        try:
            while True:
                done, _ = await asyncio.wait({answer}, timeout=POLL_S)
                if done:
                    return answer.result()
                if self.cpu_s() - started > cpu_budget_s:
                    raise CpuBudgetExceeded()
        finally:
            if not answer.done():
                answer.cancel()

    @staticmethod
    async def _answer(stdout: asyncio.StreamReader) -> Any:
        try:
            size = int.from_bytes(await stdout.readexactly(HEADER), "big")
            return pickle.loads(await stdout.readexactly(size))
        except asyncio.IncompleteReadError:
            raise WorkerCrashed() from None

    def kill(self) -> asyncio.Future[int]:
        """SIGKILL; the returned future reaps it (no zombie left behind)."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        return asyncio.ensure_future(self.proc.wait())


class FilePool:
    def __init__(self, size: int, memory_mb: float) -> None:
        self.size = size
        self.memory_mb = memory_mb
        self.slots = asyncio.Semaphore(size)  # FIFO: tasks take workers in the order they asked
        self.idle: list[_Worker] = []
        self.busy = 0
        self.queued = 0
        self.started = 0
        self.killed = 0
        self.cpu_s = 0.0  # CPU the workers spent on finished tasks (killed ones included)
        self.reaping: set[asyncio.Future[int]] = set()

    @property
    def live(self) -> int:
        return self.busy + len(self.idle)

    async def run(self, task: tuple[Any, ...], cpu_budget_s: float) -> Any:
        """Run ``task`` in a worker; raises :class:`CpuBudgetExceeded` or :class:`WorkerCrashed`; cancellation
        (a deadline, a caller that left) kills the worker."""
        self.queued += 1
        try:
            await self.slots.acquire()
        finally:
            self.queued -= 1
        try:
            worker = await self._take()
            self.busy += 1
            kept = False
            before = worker.cpu_s()
            try:
                answer = await worker.run(pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL), cpu_budget_s)
                kept = True
                return answer
            finally:
                self.busy -= 1
                used = worker.cpu_s() - before
                if used < float("inf"):
                    self.cpu_s += used
                if kept:
                    self.idle.append(worker)
                else:
                    self._reap(worker)
                    self.killed += 1
        finally:
            self.slots.release()

    async def _take(self) -> _Worker:
        while self.idle:
            worker = self.idle.pop()
            if worker.alive:
                return worker
        worker = await _Worker.start(self.memory_mb)
        self.started += 1
        return worker

    def _reap(self, worker: _Worker) -> None:
        reap = worker.kill()
        self.reaping.add(reap)
        reap.add_done_callback(self.reaping.discard)

    async def close(self) -> None:
        """Kill every worker and wait until they are gone."""
        for worker in self.idle:
            self._reap(worker)
        self.idle.clear()
        if self.reaping:
            await asyncio.wait(self.reaping, timeout=5)

    def snapshot(self) -> dict[str, Any]:
        return {"size": self.size, "live": self.live, "busy": self.busy, "queued": self.queued,
                "started": self.started, "killed": self.killed, "cpu_s": round(self.cpu_s, 3)}
