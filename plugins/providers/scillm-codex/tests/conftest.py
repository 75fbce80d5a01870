from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from scillm_core.testing import DEV_KEY, ServerThread, make_app
from scillm_core.testing.fake_codex import FakeCodex

#: the provider in isolation (no middleware from other plugins: no retries)
ONLY = ("chat", "auth", "ops", "codex", "openai-compat")


def write_auth(path: Path, login: dict[str, str], **extra: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps({**FakeCodex.auth_json(login), **extra}))
    return path


@pytest.fixture
def codex() -> Iterator[FakeCodex]:
    with FakeCodex() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture
def codex_env(codex: FakeCodex, tmp_path: Path) -> Callable[..., dict[str, str]]:
    """``codex_env(login=None, expires_in=3600, **more)`` -> env with a written auth.json for ``codex``."""

    def build(login: dict[str, str] | None = None, *, expires_in: float = 3600.0, **more: str) -> dict[str, str]:
        login = login or codex.login(expires_in=expires_in)
        auth = write_auth(tmp_path / "codex-home" / "auth.json", login)
        return {"SCILLM_CODEX_AUTH": str(auth), "CODEX_API_BASE": codex.base_url,
                "SCILLM_CODEX_TOKEN_URL": codex.token_url, **more}

    return build


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    servers: list[ServerThread] = []

    def start(env: dict[str, str], only: tuple[str, ...] | None = ONLY) -> ServerThread:
        server = ServerThread(make_app(env=env, data_dir=tmp_path / f"data{len(servers)}", only=only)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def openai_client(server: ServerThread) -> Any:
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)
