"""pytest fixtures for plugin authors: ``fake_openai``, ``scillm_server`` (a factory), ``redis_server`` (one real
``redis-server`` per test session) and ``redis_state`` (a ``[state]`` table on it with a key prefix of the test's
own, so tests sharing the server never see each other's keys)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from scillm_core.testing import FakeOpenAI, ServerThread, make_app
from scillm_core.testing.services import RedisServer, reap_all


def pytest_sessionfinish() -> None:
    """Kill whatever real service (redis, nginx, ``scillm serve``) a failed test or fixture left running."""
    reap_all()


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    """A started OpenAI-format fake upstream; script it with ``fake_openai.script(Reply.say(...))``."""
    with FakeOpenAI() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture
def scillm_server(tmp_path: Any) -> Iterator[Callable[..., ServerThread]]:
    """``scillm_server(env={...}, config={...}, plugins=[...])`` -> a started server; stopped after the test."""
    servers: list[ServerThread] = []

    def start(**kwargs: Any) -> ServerThread:
        kwargs.setdefault("data_dir", tmp_path / f"data{len(servers)}")
        server = ServerThread(make_app(**kwargs)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One ``redis-server`` on a loopback port for the whole session (tests that kill Redis start their own)."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_state(redis_server: RedisServer) -> dict[str, Any]:
    """``{"backend": "redis", "redis_url": ..., "key_prefix": <unique>}``: the ``[state]`` table of one test."""
    return {"backend": "redis", "redis_url": redis_server.url, "key_prefix": f"scillm-test:{uuid.uuid4().hex[:10]}:"}
