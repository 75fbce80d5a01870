"""Fixtures of the fault tests: module-wide fake upstreams (fresh per test) and a scillm factory. The shared
helpers (``resilience_helpers``) are made importable here (the suite runs with --import-mode=importlib)."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from resilience_helpers import ANTHROPIC_KEY, DEEPSEEK_KEY, FAST, OPENAI_KEY, reset

from scillm_core.testing import FakeOpenAI, ServerThread, make_app
from scillm_core.testing.fake_anthropic import FakeAnthropic


@pytest.fixture(scope="module")
def _fakes() -> Iterator[tuple[FakeOpenAI, FakeOpenAI, FakeAnthropic]]:
    with FakeOpenAI() as a, FakeOpenAI() as b, FakeAnthropic() as c:
        yield a, b, c  # type: ignore[misc]


@pytest.fixture
def fake_a(_fakes: tuple[FakeOpenAI, FakeOpenAI, FakeAnthropic]) -> FakeOpenAI:
    """The OpenAI upstream (``openai/...``)."""
    return reset(_fakes[0])  # type: ignore[return-value]


@pytest.fixture
def fake_b(_fakes: tuple[FakeOpenAI, FakeOpenAI, FakeAnthropic]) -> FakeOpenAI:
    """The DeepSeek upstream (``deepseek/...``), an OpenAI-compatible one."""
    return reset(_fakes[1])  # type: ignore[return-value]


@pytest.fixture
def fake_claude(_fakes: tuple[FakeOpenAI, FakeOpenAI, FakeAnthropic]) -> FakeAnthropic:
    """The Anthropic upstream (``anthropic/...``)."""
    return reset(_fakes[2])  # type: ignore[return-value]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed when the block ends: connections are refused


@pytest.fixture
def start(tmp_path: Any) -> Iterator[Callable[..., ServerThread]]:
    """``start(openai_base, deepseek_base=None, anthropic_base=None, resilience={...}, groups={...}, **tables)``
    -> a running scillm."""
    servers: list[ServerThread] = []

    def run(openai_base: str, deepseek_base: str | None = None, anthropic_base: str | None = None, *,
            resilience: dict[str, Any] | None = None, groups: dict[str, Any] | None = None,
            **tables: Any) -> ServerThread:
        env = {"OPENAI_API_KEY": OPENAI_KEY, "OPENAI_API_BASE": openai_base}
        if deepseek_base:
            env |= {"DEEPSEEK_API_KEY": DEEPSEEK_KEY, "DEEPSEEK_API_BASE": deepseek_base}
        if anthropic_base:
            env |= {"ANTHROPIC_API_KEY": ANTHROPIC_KEY, "ANTHROPIC_API_BASE": anthropic_base}
        config: dict[str, Any] = {"plugins": {"disable": ["cache"]}, "resilience": {**FAST, **(resilience or {})},
                                  **tables}
        if groups:
            config["groups"] = groups
        server = ServerThread(make_app(env=env, config=config, data_dir=tmp_path / f"data{len(servers)}")).start()
        servers.append(server)
        return server

    yield run
    for server in servers:
        server.stop()
