"""``scillm serve --workers N``: what the worker processes share, and how they split connections evenly.

Every worker accepts on the one listening socket the supervisor bound. Left to the event loop, the worker that wakes
first accepts every connection waiting (libuv accepts until the queue is empty), so a client that opens its pool at
once (64 keep-alive connections) lands mostly on one worker, which saturates its core while the other idles. Here a
worker accepts only while it holds no more open connections than the least loaded live worker. The counts sit in a
small file the supervisor creates (one slot per worker, memory-mapped), and a worker claims its slot with a lock the
kernel releases when the worker dies. A worker held back accepts anyway after ``HOLD_MAX_S``, so a peer that is busy
or stuck never strands a connection.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import mmap
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

log = logging.getLogger("scillm.workers")

SHARE_ENV = "SCILLM_WORKER_SHARE"  # set by the supervisor for its workers; internal
SLOTS = 64  # workers (restarted ones reuse a dead worker's slot)
HOLD_S = 0.001  # a worker over its share looks again after this long
HOLD_MAX_S = 0.02  # and accepts anyway once a connection has waited this long for a less loaded peer
ERROR_HOLD_S = 0.1  # after a failed accept (out of file descriptors and the like)
ALIVE_TTL_S = 1.0  # how long a worker trusts its list of live peers


def workers_notice(runtime: Any, workers: int) -> str:
    """What ``--workers N`` shares between its processes and what each keeps for itself (said at start-up)."""
    state = runtime.config.state
    if state.backend == "redis":
        from scillm_core.state.redis import safe_url

        return (f"scillm: {workers} workers share everything through Redis at {safe_url(state.url(runtime.env) or '')}"
                ": limits and their queue, AIMD, circuit breakers, 429 pauses, the cache, session affinity, batches, "
                "runs, leases and the call log")
    return (f"scillm: {workers} workers on the embedded SQLite store share batches (every worker takes their items), "
            "runs, leases, handoffs, keys, spend, session affinity and the call log. Per worker (each applies the "
            "full configured value): concurrency limits and their queue, AIMD, circuit breakers, 429 pauses, the "
            "memory cache and in-flight de-duplication. Set [state] backend = \"redis\" to share these too "
            "(docs/deployment.md).")


def worker_app() -> Any:
    """The app factory of each ``--workers`` process."""
    from scillm_core.app import create_app
    from scillm_core.cli import tune_gc

    app = create_app(own_listener=True)  # its children call back to this process, not whichever worker accepts
    tune_gc()
    return app


def create_share(directory: Path, port: int) -> Path:
    """The supervisor's side: a zeroed file of worker slots, named to the workers through the environment. One name
    per port in the data directory, so a supervisor that was killed leaves nothing that piles up."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"workers-{port}.slots"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, SLOTS * 16)
    finally:
        os.close(fd)
    os.environ[SHARE_ENV] = str(path)
    return path


class WorkerShare:
    """This worker's slot (its pid and open connections) among its peers' in the supervisor's file."""

    def __init__(self, path: str | Path) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.view = memoryview(mmap.mmap(self.fd, SLOTS * 16)).cast("q")  # [pid, open connections] per slot
        self.slot = self._claim()  # None when every slot is taken: the worker then accepts as the loop does
        self.peers: list[int] = []
        self.peers_at = -ALIVE_TTL_S

    @classmethod
    def from_env(cls) -> WorkerShare | None:
        path = os.environ.get(SHARE_ENV)
        try:
            share = cls(path) if path else None
        except (OSError, ValueError) as exc:
            log.warning("workers: no shared connection counts (%s); this worker accepts as the loop does", exc)
            return None
        return share if share is not None and share.slot is not None else None

    def _claim(self) -> int | None:
        for slot in range(SLOTS):
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
            except OSError:
                continue
            self.view[2 * slot], self.view[2 * slot + 1] = os.getpid(), 0
            return slot
        return None

    def publish(self, open_connections: int) -> None:
        assert self.slot is not None
        self.view[2 * self.slot + 1] = open_connections

    def least_of_peers(self) -> int | None:
        """The fewest open connections a live peer holds (None when this worker is alone)."""
        now = time.monotonic()
        if now - self.peers_at > ALIVE_TTL_S:
            self.peers, self.peers_at = [slot for slot in range(SLOTS) if slot != self.slot and self._alive(slot)], now
        return min((self.view[2 * slot + 1] for slot in self.peers), default=None)

    def _alive(self, slot: int) -> bool:
        if not self.view[2 * slot]:
            return False
        try:  # a live worker holds its slot's lock; taking it means its holder is gone
            fcntl.lockf(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, slot)
        except OSError:
            return True
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, slot)
        self.view[2 * slot] = 0
        return False

    def leave(self) -> None:
        assert self.slot is not None
        self.view[2 * self.slot], self.view[2 * self.slot + 1] = 0, 0
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self.slot)


class BalancedServer:
    """Accepts on a shared listening socket while this worker is the least loaded (what ``create_server`` returns
    to uvicorn: it only closes it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol_factory: Callable[[], Any],
                 share: WorkerShare, backlog: int) -> None:
        self.loop, self.sock, self.protocol_factory, self.share = loop, sock, protocol_factory, share
        self.open = 0
        self.held_since: float | None = None
        self.starting: set[asyncio.Task[None]] = set()  # connections being handed to the protocol
        self.serving = True
        sock.listen(backlog)  # the supervisor only binds it
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        while self.serving:
            least = self.share.least_of_peers()
            if least is not None and self.open > least:
                now = time.monotonic()
                self.held_since = self.held_since or now
                if now - self.held_since < HOLD_MAX_S:
                    self._hold()
                    return
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                self.held_since = None
                return
            except OSError as exc:  # out of file descriptors and the like: look again a little later
                log.warning("workers: accept failed: %s", exc)
                self._hold(ERROR_HOLD_S)
                return
            self.held_since = None
            self._count(+1)
            task = self.loop.create_task(self._serve(conn))
            self.starting.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self.starting.discard)

    def _hold(self, seconds: float = HOLD_S) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.loop.call_later(seconds, self._resume)

    def _resume(self) -> None:
        if self.serving:
            self.loop.add_reader(self.sock.fileno(), self._ready)

    def _count(self, delta: int) -> None:
        self.open += delta
        self.share.publish(self.open)

    async def _serve(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def counted() -> Any:
            protocol = self.protocol_factory()
            lost = protocol.connection_lost

            def connection_lost(exc: Exception | None) -> None:
                self._count(-1)
                lost(exc)

            protocol.connection_lost = connection_lost
            return protocol

        try:
            await self.loop.connect_accepted_socket(counted, conn)
        except OSError:
            self._count(-1)
            conn.close()

    def close(self) -> None:
        if self.serving:
            self.serving = False
            self.loop.remove_reader(self.sock.fileno())
            self.share.leave()

    async def wait_closed(self) -> None:  # for a uvicorn that awaits it after close()
        return None


class BalancedLoop(uvloop.Loop):  # type: ignore[misc]
    """uvloop, except that serving on a socket the supervisor shares splits its connections evenly (above)."""

    async def create_server(self, protocol_factory: Any, host: Any = None, port: Any = None, *,
                            sock: socket.socket | None = None, **kwargs: Any) -> Any:
        share = WorkerShare.from_env() if sock is not None and kwargs.get("ssl") is None else None
        if sock is None or share is None:
            return await super().create_server(protocol_factory, host, port, sock=sock, **kwargs)
        return BalancedServer(self, sock, protocol_factory, share, kwargs.get("backlog") or 2048)
