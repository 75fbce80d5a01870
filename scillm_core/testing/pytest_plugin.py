"""pytest fixtures for plugin authors: ``fake_openai`` and ``scillm_server`` (a factory)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from scillm_core.testing import FakeOpenAI, ServerThread, make_app


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
