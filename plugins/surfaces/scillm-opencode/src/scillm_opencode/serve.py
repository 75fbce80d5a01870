"""The OpenCode server runs and transport sessions use: either one ``opencode serve`` scillm starts (loopback, a
generated password, an isolated HOME/XDG whose only provider is this scillm reached with a per-session-attributed
run key) or an existing server at ``OPENCODE_SERVER_URL``.

A managed server is started on first use (it must know the address scillm is reached at), watched through its
process (no polling: its ``exited`` event), restarted with a backoff when it dies, and stopped with scillm. Each
start is a new :class:`Server` generation; its ``died`` event tells the runs on it to end ``error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import shutil
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scillm_agent_runners.base import cli_path, runner_config
from scillm_agent_runners.clis import opencode_config as opencode_file_config
from scillm_agent_runners.clis import opencode_env, opencode_permission
from scillm_exec import ManagedProcess, exec_config, run_keys, sandboxed

from scillm_core import errors
from scillm_opencode.client import OpenCodeClient, ServeError
from scillm_opencode.config import opencode_config
from scillm_opencode.normalise import obj, one
from scillm_opencode.profiles import AGENT

if TYPE_CHECKING:
    from scillm_core import Runtime

__all__ = ["DEBUGGER_PROMPT", "ServeManager", "Server"]

log = logging.getLogger("scillm.opencode")

LISTENING = re.compile(rb"listening on (http://[0-9.:\[\]a-z]+)")
USERNAME = "opencode"
HIDDEN_AGENTS = ("compaction", "summary", "title")  # OpenCode's internal agents: never a run's profile
DEBUGGER_PROMPT = (Path(__file__).with_name("debugger.md")).read_text(encoding="utf-8")


def _version(health: dict[str, Any]) -> str | None:
    version = one(health.get("version"), 64)
    return str(version) if version is not None else None


class Server:
    """One reachable OpenCode server (a managed generation, or the external one)."""

    def __init__(self, client: OpenCodeClient, *, managed: bool, generation: int, version: str | None) -> None:
        self.client = client
        self.managed = managed
        self.generation = generation
        self.version = version
        self.died = asyncio.Event()
        self.death: str | None = None
        self._agents: list[dict[str, Any]] | None = None
        self._providers: dict[str, Any] | None = None

    @property
    def url(self) -> str:
        return self.client.url

    def mark_dead(self, reason: str) -> None:
        if not self.died.is_set():
            self.death = reason
            self.died.set()

    async def agents(self, *, refresh: bool = False) -> list[dict[str, Any]]:
        """The server's agents (one ``GET /agent`` per server start, again only on a miss: never polled)."""
        if self._agents is None or refresh:
            self._agents = [a for a in await self.client.agents() if isinstance(a, dict)]
        return self._agents

    async def profiles(self, *, refresh: bool = False) -> list[str]:
        """The names a run may ask for (what is not a valid profile name is not one)."""
        return [a["name"] for a in await self.agents(refresh=refresh)
                if isinstance(a.get("name"), str) and AGENT.match(a["name"]) and not a.get("hidden")
                and a["name"] not in HIDDEN_AGENTS]

    async def models(self) -> dict[str, list[str]]:
        """``{providerID: [modelID, ...]}`` of the server's configured providers."""
        if self._providers is None:
            self._providers = await self.client.providers()
        out: dict[str, list[str]] = {}
        providers = self._providers.get("providers")
        for provider in providers if isinstance(providers, list) else []:
            if isinstance(provider, dict) and isinstance(provider.get("id"), str) and provider["id"]:
                out[provider["id"]] = sorted(str(m) for m in obj(provider.get("models")))
        return out


class ServeManager:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.cfg = opencode_config(runtime)
        self.keys = run_keys(runtime)
        self.key: str | None = None           # the managed server's per-session-attributed run key
        self.server: Server | None = None
        self.process: ManagedProcess | None = None
        self.base_url: str | None = None
        self.restarts = 0
        self.starting: asyncio.Task[Server] | None = None
        self.stopping = False
        self._generation = 0
        self._password: str | None = None
        self._url_seen: asyncio.Future[str] | None = None
        self._stdout: deque[str] = deque(maxlen=20)
        self._watch: asyncio.Task[None] | None = None
        self._deaths: deque[float] = deque(maxlen=5)

    # -- where --------------------------------------------------------------------------------------------------

    @property
    def external_url(self) -> str | None:
        return self.cfg.server_url or self.runtime.env.get("OPENCODE_SERVER_URL") or None

    @property
    def managed(self) -> bool:
        return self.external_url is None

    @property
    def root(self) -> Path:
        return self.runtime.config.data_dir / "opencode" / "serve"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def worktrees(self) -> Path:
        """Where every run's worktree is made: with the home, the only place the managed server may write."""
        return self.runtime.config.data_dir / "opencode" / "worktrees"

    @property
    def skills_dir(self) -> Path | None:
        """Where skills are materialised for the server to discover (its global skills directory); ``None`` for an
        external server (whose own skills are used as they are)."""
        return self.home / ".config" / "opencode" / "skills" if self.managed else None

    def default_model(self) -> str | None:
        return (self.cfg.model or self.runtime.env.get("SCILLM_OPENCODE_SERVE_DEFAULT_MODEL")
                or runner_config(self.runtime).default_model or (self.cfg.models[0] if self.cfg.models else None))

    def secrets(self) -> list[str]:
        """Values that must never reach an artifact, event, page or log (for redaction and for tests)."""
        return [s for s in (self._password, self.key, self.runtime.env.get("OPENCODE_SERVER_PASSWORD")) if s]

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def ensure(self, base_url: str | None) -> Server:
        """A healthy server: the running one (after a cheap ``/global/health``), else a new start."""
        if self.stopping:
            raise ServeError("scillm is shutting down", status=503)
        if self.managed and base_url and self.base_url is None:
            self.base_url = base_url
        server = self.server
        if server is not None and not server.died.is_set():
            try:
                await server.client.health()
                return server
            except ServeError as exc:
                if self.managed and self.process is not None and self.process.alive:
                    raise
                server.mark_dead(exc.message)
                if not server.managed:  # the next start connects a new client: this one's connections go now
                    await server.client.aclose()
        if self.starting is None or self.starting.done():
            self.starting = asyncio.ensure_future(self._start())
        return await asyncio.shield(self.starting)

    async def _start(self) -> Server:
        if not self.managed:
            return await self._connect_external()
        if self.base_url is None:
            raise ServeError("opencode serve needs the address scillm is reached at (set exec.base_url)", status=503)
        cli = cli_path(self.runtime, "opencode")
        if cli is None:
            raise ServeError("opencode is not installed (scripts/install-agent-clis; see `scillm doctor`)", status=503)
        model = self.default_model()
        if not model:
            raise errors.InvalidRequest("no model for OpenCode sessions: set opencode.model (or "
                                        "SCILLM_OPENCODE_SERVE_DEFAULT_MODEL)", param="$.model")
        await self._stop_process()
        shutil.rmtree(self.home, ignore_errors=True)  # each start begins from an empty home: no state build-up
        self.home.mkdir(parents=True, mode=0o700)
        self._password = secrets.token_urlsafe(24)
        if self.key is None:
            self.key = self.keys.mint("opencode-serve", None, per_session=True,
                                      refusal="the opencode serve key may call model routes only")
        permission = {**opencode_permission(edit=True, skill=True), **self.cfg.permission}
        agents = {"scillm-debugger": {"mode": "primary", "description": "scillm debugger: evidence before a patch",
                                      "prompt": DEBUGGER_PROMPT}}
        config = opencode_file_config(self.base_url, model, permission=permission, models=self.cfg.models,
                                      agents=agents)
        env = opencode_env(cli, self.home, self.key, config,
                           extra={"OPENCODE_SERVER_PASSWORD": self._password, "OPENCODE_SERVER_USERNAME": USERNAME})
        loop = asyncio.get_running_loop()
        self._url_seen = loop.create_future()
        self._stdout.clear()
        argv = [cli, "serve", "--hostname", "127.0.0.1", "--port", "0", "--pure"]
        if exec_config(self.runtime).enforce_sandbox:  # it may write its home and the runs' worktrees, nothing else
            self.worktrees.mkdir(parents=True, exist_ok=True)
            argv = sandboxed(argv, "workspace-write", env, self.worktrees)
        self.process = ManagedProcess("opencode serve", argv, env=env, cwd=self.home, log_path=self.root / "serve.log",
                                      on_stdout=self._on_stdout, redact=self.secrets())
        await self.process.start()
        exited = asyncio.ensure_future(self.process.exited.wait())
        try:
            done, _ = await asyncio.wait({self._url_seen, exited}, timeout=self.cfg.start_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if self._url_seen not in done:
            tail = " | ".join(self._stdout)[-500:]
            await self._stop_process()
            why = f"exited with {self.process.returncode}" if self.process.exited.is_set() else \
                f"did not listen within {self.cfg.start_timeout_s:g}s"
            raise ServeError(f"opencode serve {why} (log: {self.root / 'serve.log'}){': ' + tail if tail else ''}",
                             status=503)
        url = self._url_seen.result()
        client = OpenCodeClient(url, USERNAME, self._password)
        try:
            health = await client.health()
        except ServeError:
            await client.aclose()
            await self._stop_process()
            raise
        self._generation += 1
        server = Server(client, managed=True, generation=self._generation, version=_version(health))
        self.server = server
        self._watch = asyncio.ensure_future(self._watch_process(self.process, server))
        log.info("opencode serve %s started at %s (generation %d)", server.version, url, server.generation)
        return server

    async def _connect_external(self) -> Server:
        url = self.external_url or ""
        password = self.runtime.env.get("OPENCODE_SERVER_PASSWORD") or ""
        client = OpenCodeClient(url, self.runtime.env.get("OPENCODE_SERVER_USERNAME") or USERNAME, password)
        try:
            health = await client.health()
        except ServeError:
            await client.aclose()
            raise
        self._generation += 1
        self.server = Server(client, managed=False, generation=self._generation,
                             version=_version(health))
        return self.server

    def _on_stdout(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        for secret in self.secrets():
            text = text.replace(secret, "[redacted]")
        self._stdout.append(text[:300])
        found = LISTENING.search(line)
        if found and self._url_seen is not None and not self._url_seen.done():
            self._url_seen.set_result(found.group(1).decode())

    async def _watch_process(self, process: ManagedProcess, server: Server) -> None:
        await process.exited.wait()
        reason = f"opencode serve exited with {process.returncode}"
        server.mark_dead(reason)
        await server.client.aclose()
        if self.stopping or process is not self.process:
            return
        log.warning("%s; restarting it", reason)
        now = time.monotonic()
        self._deaths.append(now)
        recent = sum(1 for t in self._deaths if now - t < 60)
        await asyncio.sleep(min(30.0, 0.5 * 2 ** (recent - 1)) if recent > 1 else 0)  # backoff when it keeps dying
        if self.stopping or self.server is not server:
            return
        self.restarts += 1
        if self.starting is None or self.starting.done():
            self.starting = asyncio.ensure_future(self._start())
        with contextlib.suppress(Exception):
            await asyncio.shield(self.starting)

    async def _stop_process(self) -> None:
        if self.process is not None and self.process.alive:
            await self.process.stop()

    async def stop(self) -> None:
        self.stopping = True
        if self.starting is not None and not self.starting.done():
            self.starting.cancel()
            with contextlib.suppress(BaseException):
                await self.starting
        if self.server is not None:
            self.server.mark_dead("scillm is shutting down")
            await self.server.client.aclose()
        await self._stop_process()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(BaseException):
                await self._watch
        self.keys.revoke(self.key)
        self.key = None

    def describe(self) -> dict[str, Any]:
        server = self.server
        state = "stopped"
        if self.starting is not None and not self.starting.done():
            state = "starting"
        elif server is not None:
            state = "dead" if server.died.is_set() else "running"
        return {"mode": "managed" if self.managed else "external", "state": state,
                "url": server.url if server else None, "version": server.version if server else None,
                "generation": server.generation if server else 0, "restarts": self.restarts,
                "pid": self.process.pid if self.process is not None and self.process.alive else None}
