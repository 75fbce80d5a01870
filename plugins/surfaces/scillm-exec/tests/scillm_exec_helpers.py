from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from scillm_exec import base_child_env, run_cli

import scillm_core.testing
from scillm_core import hookimpl
from scillm_core.sessions import SessionContext, SessionResult, SessionSpec
from scillm_core.testing import FakeOpenAI, ServerThread, make_app

FAKE = Path(scillm_core.testing.__file__).with_name("fake_cli.py")  # the harness's scripted fake CLI
PROVIDER_SECRET = "sk-provider-SECRET-unit-0123456789"
MASTER_KEY = "sk-master-SECRET-unit-9876543210"


class FakeRunner:
    """Profile ``fake``: runs fake_cli.py through run_cli, the way a real runner does."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    @hookimpl
    def scillm_session_profiles(self, runtime: Any) -> list[str]:
        return ["fake"]

    @hookimpl
    def run_session(self, spec: SessionSpec, ctx: SessionContext) -> Any:
        if spec.profile != "fake":
            return None

        async def go() -> SessionResult:
            self.keys.append(ctx.api_key or "")
            home = tempfile.mkdtemp(prefix="fake-home-")
            env = base_child_env(home, extra={"SCILLM_API_KEY": ctx.api_key or ""})
            outcome = await run_cli([sys.executable, str(FAKE)], spec=spec, ctx=ctx, env=env, cwd=spec.cwd,
                                    stdin=spec.prompt.encode(), kill_grace_s=0.5, redact=[ctx.api_key or ""])
            text = next((e["text"] for e in reversed(outcome.events) if e.get("type") == "final"), "")
            return SessionResult(run_id=ctx.run_id, status=outcome.status, exit_code=outcome.exit_code,  # type: ignore[arg-type]
                                 final_text=text, error=outcome.error)

        return go


class Server:
    def __init__(self, url: str, root: Path, runner: FakeRunner, fake: FakeOpenAI, data_dir: Path) -> None:
        self.url, self.root, self.runner, self.fake, self.data_dir = url, root, runner, fake, data_dir
        self.client = httpx.Client(base_url=url, timeout=60, headers={
            "authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": "exec-tests"})

    def run(self, prompt: str, **body: Any) -> httpx.Response:
        payload = {"profile": "fake", "prompt": prompt, "cwd": str(self.root), "wait": True, **body}
        return self.client.post("/v1/scillm/exec", json=payload)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("root")
    data_dir = tmp_path_factory.mktemp("data")
    runner = FakeRunner()
    with FakeOpenAI() as fake:
        app = make_app(env={"OPENAI_API_KEY": PROVIDER_SECRET, "OPENAI_API_BASE": fake.url + "/v1",
                            "SCILLM_MASTER_KEY": MASTER_KEY}, data_dir=data_dir,
                       config={"exec": {"allowed_roots": [str(root)], "kill_grace_s": 0.5, "heartbeat_s": 0.3}},
                       plugins=[("fake-runner", runner)],
                       only=["exec", "agent-runners", "auth", "chat", "responses", "messages", "openai-compat"])
        with ServerThread(app) as thread:
            yield Server(thread.url, root, runner, fake, data_dir)
