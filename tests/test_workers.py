"""`scillm serve --workers N` splits connections evenly between its workers (scillm_core/workers.py)."""

from __future__ import annotations

import asyncio
import collections
import http.client
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from scillm_core import workers
from scillm_core.testing import DEV_KEY, FakeOpenAI
from scillm_core.testing.services import ScillmProcess

AUTH = {"Authorization": f"Bearer {DEV_KEY}"}

PEER = """
import sys, time
from scillm_core.workers import WorkerShare
share = WorkerShare(sys.argv[1])
share.publish(int(sys.argv[2]))
print(share.slot, flush=True)
time.sleep(600)
"""


@pytest.fixture
def share(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv(workers.SHARE_ENV, "")
    return str(workers.create_share(tmp_path, 4001))


def start_peer(path: str, open_connections: int) -> subprocess.Popen[str]:
    """Another worker: it claims a slot, says it holds ``open_connections`` and never accepts."""
    peer = subprocess.Popen([sys.executable, "-c", PEER, path, str(open_connections)], stdout=subprocess.PIPE,
                            text=True)
    assert peer.stdout is not None and peer.stdout.readline().strip().isdigit()
    return peer


def test_a_live_peers_count_is_seen_and_a_dead_peers_slot_is_freed(share: str) -> None:
    peer = start_peer(share, 5)
    mine = workers.WorkerShare(share)
    try:
        assert mine.slot is not None and mine.least_of_peers() == 5
    finally:
        peer.kill()
        peer.wait()
    mine.peers_at = float("-inf")  # look again now rather than after ALIVE_TTL_S
    assert mine.least_of_peers() is None  # the kernel released the dead worker's lock
    again = start_peer(share, 1)  # a restarted worker takes the freed slot
    try:
        mine.peers_at = float("-inf")
        assert mine.least_of_peers() == 1
    finally:
        again.kill()
        again.wait()


def test_a_worker_over_its_share_still_accepts_when_its_peer_does_not(share: str) -> None:
    """The peer reports no connections and never accepts (busy or stuck): a connection waiting on the shared socket
    is still served by this worker, which holds more than its share, instead of being stranded."""
    peer = start_peer(share, 0)
    loop = workers.BalancedLoop()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)  # type: ignore[attr-defined]

    async def scenario() -> bytes:
        server = await loop.create_server(Echo, sock=listener, backlog=16)
        assert isinstance(server, workers.BalancedServer)
        server.open = 3  # more than the peer's 0
        reader, writer = await asyncio.open_connection(*listener.getsockname())
        writer.write(b"ping")
        answer = await reader.readexactly(4)
        assert server.open == 4
        writer.close()
        server.close()
        return answer

    try:
        assert loop.run_until_complete(scenario()) == b"ping"
    finally:
        loop.close()
        listener.close()
        peer.kill()
        peer.wait()


def test_two_workers_split_a_burst_of_connections_evenly(tmp_path: Path) -> None:
    """A client opening its whole pool at once (64 keep-alive connections, as wrk or a busy SDK does) gets half on
    each worker. Before, the worker that woke first accepted most of them (24/40, 23/41, 39/25 were seen) and then
    saturated its core while the other idled."""
    with FakeOpenAI() as upstream:
        server = ScillmProcess(tmp_path / "w", workers=2, env={
            "OPENAI_API_KEY": "sk-workers-test-0123456789", "OPENAI_API_BASE": upstream.base_url}).start()
        connections = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=30) for _ in range(64)]
        try:
            seen: set[str] = set()
            deadline = time.monotonic() + 60
            while len(seen) < 2:  # both workers are up (the second may still be starting)
                assert time.monotonic() < deadline, f"only {seen} answered"
                with httpx.Client() as fresh:
                    seen.add(fresh.get(server.url + "/v1/scillm/health", headers=AUTH).json()["instance_id"])
            for conn in connections:  # all connected before any request: they wait in the accept queue together
                conn.connect()
            served = collections.Counter()
            for conn in connections:
                conn.request("GET", "/v1/scillm/health", headers=AUTH)
                response = conn.getresponse()
                assert response.getheader("server") is None  # what serves it is not advertised
                served[json.loads(response.read())["instance_id"]] += 1
            assert len(served) == 2, served
            low, high = sorted(served.values())
            assert high - low <= 8, served
        finally:
            for conn in connections:
                conn.close()
            server.stop()
