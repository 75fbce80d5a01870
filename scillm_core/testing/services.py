"""Real services for tests, on loopback ports with their own temporary config: ``redis-server``, ``nginx`` as a
load balancer, and ``scillm serve`` processes. Each can be stopped, killed (SIGKILL) and started again on its port.

They are Debian's binaries, installed by ``./scripts/install --test``; a missing one fails the test that needs it
with the install command, never a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["Nginx", "RedisServer", "ScillmProcess", "free_port", "to_toml"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _binary(name: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)),
                                       None)
    assert found, f"{name} is not installed: run ./scripts/install --test (apt-get install {name})"
    return found


def _wait(ready: Any, process: subprocess.Popen[bytes], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert process.poll() is None, f"{what} exited with {process.returncode}"
        assert time.monotonic() < deadline, f"{what} did not become ready in {timeout_s:.0f}s"
        time.sleep(0.02)


class _Service:
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Any:
        raise NotImplementedError

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop it the hard way (no graceful shutdown) and wait until it is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


class RedisServer(_Service):
    """``redis-server`` on a loopback port; ``persist``: an append-only file synced on every write, so a kill loses
    nothing (as production should run it), else no persistence at all."""

    def __init__(self, workdir: Path, port: int | None = None, *, persist: bool = False) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.persist = persist

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [_binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.persist else "no", "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(self.ping, self.process, "redis-server")
        return self


class Nginx(_Service):
    """``nginx`` in the foreground with ``http_block`` (the ``upstream`` and ``server`` blocks) inside a minimal
    main config whose files all live in ``workdir``; ``port`` is where it listens."""

    def __init__(self, workdir: Path, http_block: str, port: int) -> None:
        self.workdir = workdir
        self.http_block = http_block
        self.port = port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Nginx:
        self.workdir.mkdir(parents=True, exist_ok=True)
        temp = self.workdir / "temp"
        temp.mkdir(exist_ok=True)
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = self.workdir / "nginx.conf"
        conf.write_text(
            f"{user}worker_processes 1;\npid {self.workdir}/nginx.pid;\nerror_log {self.workdir}/error.log warn;\n"
            f"events {{ worker_connections 4096; }}\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {temp}/body;\n  proxy_temp_path {temp}/proxy;\n"
            f"  fastcgi_temp_path {temp}/fastcgi;\n  uwsgi_temp_path {temp}/uwsgi;\n  scgi_temp_path {temp}/scgi;\n"
            f"{self.http_block}\n}}\n")
        self.process = subprocess.Popen([_binary("nginx"), "-p", str(self.workdir), "-c", str(conf), "-g",
                                         "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def listening() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        try:
            _wait(listening, self.process, "nginx")
        except AssertionError:
            log = (self.workdir / "error.log").read_text() if (self.workdir / "error.log").exists() else ""
            raise AssertionError(f"nginx did not start: {log[-2000:]}") from None
        return self


class ScillmProcess(_Service):
    """``scillm serve`` as a real process: ``config`` is written to a ``scillm.toml`` in ``workdir``, ``env`` is the
    whole environment it sees (plus ``SCILLM_DATA_DIR`` in ``workdir`` unless given)."""

    def __init__(self, workdir: Path, *, env: Mapping[str, str], config: Mapping[str, Any] | None = None,
                 port: int | None = None, workers: int = 1, args: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.env = {"PATH": os.environ.get("PATH", ""), "SCILLM_DATA_DIR": str(workdir / "data"), **env}
        self.config = dict(config or {})
        self.port = port or free_port()
        self.workers = workers
        self.args = list(args)
        self.log = workdir / "scillm.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        import httpx

        try:
            return httpx.get(self.url + "/health/readiness", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self) -> ScillmProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "scillm.toml"
        config.write_text(to_toml(self.config))
        scillm = str(Path(sys.executable).with_name("scillm"))
        command = [scillm, "serve", "--port", str(self.port), "--config", str(config), "--log-level", "warning",
                   "--workers", str(self.workers), *self.args]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, env=self.env, cwd=self.workdir, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait(self.ready, self.process, "scillm serve")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.log.read_text()[-3000:]}") from None
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (``--workers`` children too) and wait for the server to go."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)
        self.process = None


def to_toml(tables: Mapping[str, Any]) -> str:
    """Just enough TOML for test configs: nested tables of strings, numbers, booleans and lists of those or of
    inline tables."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {type(v).__name__} as TOML")

    lines: list[str] = []

    def table(path: list[str], body: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, Mapping)}
        if path and (scalars or not body):
            lines.append(f"[{'.'.join(path)}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in body.items():
            if isinstance(v, Mapping):
                table([*path, k], v)

    table([], tables)
    return "\n".join(lines) + "\n"
