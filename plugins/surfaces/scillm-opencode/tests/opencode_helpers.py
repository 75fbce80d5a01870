"""The shared end-to-end stack for a test module: inside one loopback-only network namespace, a scripted fake
model, one scillm (with the OpenCode surfaces on) and the one ``opencode serve`` it starts on first use."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from scillm_agent_runners.base import REPO_TOOLS
from scillm_exec import group_members

from scillm_core.testing import FakeOpenAI, Reply, ServerThread, make_app
from scillm_core.testing.fakes import RecordedRequest
from scillm_core.testing.netns import links, loopback_only

PROVIDER_SECRET = "sk-provider-SECRET-opencode-0123456789"
MASTER_KEY = "sk-master-SECRET-opencode-9876543210"
MODEL = "openai/fake-model"
FINAL = "DONE: edited the file"
ONLY = ["opencode", "exec", "agent-runners", "auth", "keys", "budgets", "chat", "openai-compat", "ops", "metrics",
        "ui"]
PRICING = {MODEL: {"input": 1.0, "output": 2.0}}  # dollars per million tokens, so runs have a cost


class ScriptedModel(FakeOpenAI):
    """Answers OpenCode by what the conversation holds (never by hidden turn counters), so it survives steers and
    retries. The first user message names the script:

    ``[edit]``            read hello.txt, edit it, finish with FINAL
    ``[read]``            read hello.txt, finish with what it saw
    ``[skill:NAME]``      load skill NAME with the skill tool, finish with the tool's answer
    ``[gate:NAME]``       like ``[edit]``, but the first model call waits until the test opens gate NAME
    ``[steer]``           like ``[gate:steer]`` (read first); finishes "STEERED" if a steer message came back
    ``[hang]``            the model never answers (until the module ends)
    ``[fail]``            the model answers HTTP 400 (a failed node)
    """

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, threading.Event] = {}
        self.arrived: dict[str, threading.Event] = {}
        self.hang = threading.Event()
        self._held: dict[int, threading.Event] = {}
        self.responder = self.respond

    def gate(self, name: str) -> threading.Event:
        return self.gates.setdefault(name, threading.Event())

    def arrival(self, name: str) -> threading.Event:
        return self.arrived.setdefault(name, threading.Event())

    def release_all(self) -> None:
        self.hang.set()
        for gate in self.gates.values():
            gate.set()

    async def pause(self, reply: Reply) -> None:
        held = self._held.pop(id(reply), None)
        if held is not None:
            await asyncio.to_thread(held.wait, 120)
        await super().pause(reply)

    def _hold(self, reply: Reply, gate: threading.Event) -> Reply:
        self._held[id(reply)] = gate
        return reply

    def respond(self, request: RecordedRequest) -> Reply | None:
        body = request.body if isinstance(request.body, dict) else {}
        tools = {t.get("function", {}).get("name") for t in body.get("tools") or []}
        messages = body.get("messages") or []
        if not tools:
            return Reply.say("a title")
        first = next((m for m in messages if m.get("role") == "user"), {})
        script = json.dumps(first.get("content"))
        done = sum(1 for m in messages if m.get("role") == "tool")
        call = lambda name, args: Reply.call(name, args, id=f"call_{uuid.uuid4().hex[:12]}")  # noqa: E731
        if "[hang]" in script:
            return self._hold(Reply.say("too late"), self.hang)
        if "[fail]" in script:
            return Reply.fail(400, "the fake refuses this node")
        if "[skill:" in script:
            name = script.split("[skill:", 1)[1].split("]", 1)[0]
            if done == 0:
                return call("skill", {"name": name})
            return Reply.say("SKILL SAID: " + str(messages[-1].get("content"))[:200])
        if "[steer]" in script:
            if done == 0:
                self.arrival("steer").set()
                return self._hold(call("read", {"filePath": "hello.txt"}), self.gate("steer"))
            steered = any(m.get("role") == "user" and "STEER-NOW" in json.dumps(m.get("content"))
                          for m in messages)
            return Reply.say("STEERED" if steered else "NOT STEERED")
        if "[gate:" in script and done == 0:
            name = script.split("[gate:", 1)[1].split("]", 1)[0]
            self.arrival(name).set()
            return self._hold(call("read", {"filePath": "hello.txt"}), self.gate(name))
        if "[read]" in script:
            if done == 0:
                return call("read", {"filePath": "hello.txt"})
            return Reply.say("READ: " + str(messages[-1].get("content"))[:200])
        if done == 0:
            return call("read", {"filePath": "hello.txt"})
        if done == 1:
            return call("edit", {"filePath": "hello.txt", "oldString": "hello world", "newString": "goodbye world"})
        return Reply.say(FINAL)

    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == "/v1/chat/completions"]


def make_repo(root: Path, name: str | None = None) -> Path:
    """A git repository under ``root`` (the allowed root) holding hello.txt ("hello world")."""
    path = root / (name or f"repo-{uuid.uuid4().hex[:8]}")
    path.mkdir()
    (path / "hello.txt").write_text("hello world\n")
    git = lambda *a: subprocess.run(["git", *a], cwd=path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q", "-b", "main")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return path


class Records(logging.Handler):
    """Every log record of the module that reaches the root logger."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Stack:
    def __init__(self, server: ServerThread, fake: ScriptedModel, root: Path, data_dir: Path, skills: Path,
                 logs: Records) -> None:
        self.server, self.fake, self.root, self.data_dir, self.skills = server, fake, root, data_dir, skills
        self.logs = logs
        self.url = server.url
        self.client = httpx.Client(base_url=self.url, timeout=180, headers={
            "authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": "opencode-tests"})
        self.reported: list[Any] = []  # units of work and model calls, as runtime.events reports them
        server.app.runtime.events.subscribe(self.reported.append, kinds=[
            "run.start", "run.end", "graph.start", "graph.end", "request.start"])

    def reported_for(self, unit: str) -> dict[str, Any]:
        """The start and end events of ``unit``, and the parents of the model calls made for it."""
        events = [e for e in self.reported if e.kind != "request.start" and e["unit"] == unit]
        return {"start": next((e for e in events if e.kind.endswith(".start")), None),
                "end": next((e for e in events if e.kind.endswith(".end")), None),
                "calls": [e for e in self.reported if e.kind == "request.start" and e.ctx.parent == unit]}

    @property
    def opencode(self) -> Any:
        from scillm_opencode import opencode_of

        return opencode_of(self.server.app.runtime)

    def repo(self, name: str | None = None) -> Path:
        return make_repo(self.root, name)

    def events(self, path: str, after: int = 0, *, token: str | None = None,
               on_frame: Callable[[str], None] | None = None, client: httpx.Client | None = None
               ) -> tuple[list[dict[str, Any]], list[str]]:
        """Read an SSE stream to its end (through ``client``, default this stack's): (data events, raw frames);
        ``on_frame`` sees each frame as it comes."""
        headers = {"authorization": f"Bearer {token}"} if token else {}
        frames: list[str] = []
        with (client or self.client).stream("GET", path, params={"after": after}, headers=headers,
                                            timeout=180) as response:
            assert response.status_code == 200, response.read()
            buf = ""
            for chunk in response.iter_text():
                buf += chunk
                while "\n\n" in buf:
                    frame, buf = buf.split("\n\n", 1)
                    frames.append(frame)
                    if on_frame is not None:
                        on_frame(frame)
        data = [json.loads(f.split("data: ", 1)[1]) for f in frames if f.startswith("id: ")]
        return data, frames

    def wait_status(self, path: str, statuses: tuple[str, ...], timeout_s: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            doc = self.client.get(path).json()
            if doc.get("status") in statuses or time.monotonic() > deadline:
                return doc  # type: ignore[no-any-return]
            time.sleep(0.1)


@contextlib.contextmanager
def browser() -> Iterator[Any]:
    """Debian's headless Chromium through Selenium and chromedriver (``scripts/install --test``), a fresh profile,
    the browser console kept (CSP violations and script errors land there)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="scillm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")
                                                               or "/usr/bin/chromedriver"))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def secrets_of(stack: Stack) -> list[str]:
    serve = stack.opencode.serve
    return [PROVIDER_SECRET, MASTER_KEY, *serve.secrets()]


def scan_for_secrets(stack: Stack, extra: list[str] = ()) -> list[str]:  # type: ignore[assignment]
    """Every file under the data dir, every log record of the module, and the ops endpoints: which secrets appear
    where."""
    found = []
    wanted = [s for s in [*secrets_of(stack), *extra] if s]
    for path in stack.data_dir.rglob("*"):  # run dirs, the store, serve.log, and OpenCode's own home
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s[:12]}..." for s in wanted if s.encode() in data]
    for record in stack.logs.records:
        message = record.getMessage()
        found += [f"log {record.name}: {s[:12]}..." for s in wanted if s in message]
    for route in ("/v1/scillm/health", "/metrics", "/v1/scillm/opencode/serve", "/v1/scillm/opencode/runs",
                  "/v1/scillm/opencode/transport/capabilities", "/v1/scillm/opencode/transport/runs",
                  "/v1/scillm/calls"):
        text = stack.client.get(route).text
        found += [f"{route}: {s[:12]}..." for s in wanted if s in text]
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with open_stack(tmp_path_factory) as built:
        yield built


@contextlib.contextmanager
def open_stack(tmp_path_factory: pytest.TempPathFactory,
               services: Callable[[], dict[str, Any]] | None = None) -> Iterator[Stack]:
    """The stack; ``services`` starts what else it needs inside its network namespace (a Redis) and answers the
    config the app needs for it."""
    opencode = REPO_TOOLS / "node_modules" / ".bin" / "opencode"
    assert opencode.exists(), f"{opencode} missing: run scripts/install --test"
    root = tmp_path_factory.mktemp("work")
    data_dir = tmp_path_factory.mktemp("data")
    skills = tmp_path_factory.mktemp("skills")
    logs = Records()
    root_logger, scillm_logger = logging.getLogger(), logging.getLogger("scillm")
    level = scillm_logger.level
    root_logger.addHandler(logs)
    scillm_logger.setLevel(logging.DEBUG)  # everything scillm logs, at every level, is scanned
    with loopback_only():
        assert links() == ["lo"]
        extra = services() if services is not None else {}
        fake = ScriptedModel()
        fake.start()
        app = make_app(env={"OPENAI_API_KEY": PROVIDER_SECRET, "OPENAI_API_BASE": fake.url + "/v1",
                            "SCILLM_MASTER_KEY": MASTER_KEY, "SCILLM_OPENCODE_SERVE_ENABLED": "1"},
                       data_dir=data_dir,
                       config={"exec": {"allowed_roots": [str(root)]}, "pricing": PRICING,
                               "opencode": {"model": MODEL, "skill_roots": [str(skills)], "heartbeat_s": 0.5,
                                            "default_timeout_s": 120}, **extra},
                       only=ONLY)
        try:
            with ServerThread(app) as server:
                built = Stack(server, fake, root, data_dir, skills, logs)
                yield built
                fake.release_all()
                process = built.opencode.serve.process
            # opencode serve stops with scillm: nothing of its process group is left
            assert process is None or group_members(process.pid) == []
        finally:
            fake.release_all()
            fake.stop()
            root_logger.removeHandler(logs)
            scillm_logger.setLevel(level)
