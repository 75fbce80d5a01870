"""Real services for tests, on loopback ports with their own temporary config: ``redis-server``, ``nginx`` as a
load balancer, and ``scillm serve`` processes. Each can be stopped, killed (SIGKILL) and started again on its port.

They are Debian's binaries, installed by ``./scripts/install --test``; a missing one fails the test that needs it
with the install command, never a skip.

Nothing started here outlives the test run: ``stop`` sends SIGTERM and, when the process has not gone within
``GRACE_S``, SIGKILL (a scillm server's whole process group, workers and children included); a service that does
not become ready is killed before ``start`` fails; and whatever is still running when the interpreter exits (a test
or fixture failed before its finalizer stopped it) is killed by :func:`reap_all`, run at exit and by the pytest
plugin's session finalizer.
"""

from __future__ import annotations

import atexit
import contextlib
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

__all__ = ["GRACE_S", "Nginx", "RedisServer", "ScillmProcess", "free_port", "nginx_example", "reap_all", "to_toml"]

GRACE_S = 10.0  # how long a stopped service may take to exit before it is killed
_running: set[_Service] = set()  # every service started and not yet reaped


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


def reap_all() -> None:
    """Kill every service still running (SIGKILL, process groups included): nothing a test started is left behind."""
    for service in list(_running):
        service.kill()


atexit.register(reap_all)


class _Service:
    process: subprocess.Popen[bytes] | None = None
    group = False  # started in a session of its own: signals go to its whole process group (its children too)

    def start(self) -> Any:
        raise NotImplementedError

    def _launch(self, process: subprocess.Popen[bytes], ready: Any, what: str) -> None:
        """Track ``process`` and wait until ``ready()``; one that does not get there is killed before this fails."""
        self.process = process
        _running.add(self)
        try:
            _wait(ready, process, what)
        except BaseException:
            self.kill()
            raise

    def _signal(self, sig: int) -> None:
        assert self.process is not None
        if self.group:
            os.killpg(self.process.pid, sig)
        else:
            self.process.send_signal(sig)

    def kill(self, sig: int = signal.SIGKILL, grace_s: float = GRACE_S) -> None:
        """Send ``sig`` and wait until it is gone; a process still there after ``grace_s`` is killed (SIGKILL)."""
        process = self.process
        if process is not None:
            try:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        self._signal(sig)
                try:
                    process.wait(timeout=grace_s if sig != signal.SIGKILL else 30)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        self._signal(signal.SIGKILL)
                    process.wait(timeout=30)
                self._after_exit()
            finally:
                self.process = None
                _running.discard(self)

    def _after_exit(self) -> None:
        """Members of its group that outlived it (nginx workers, scillm workers, a child it started) are killed."""
        assert self.process is not None
        if self.group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def stop(self) -> None:
        """Graceful (SIGTERM), then SIGKILL after ``GRACE_S``."""
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
        self._launch(subprocess.Popen(
            [_binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.persist else "no", "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), self.ping, "redis-server")
        return self


class Nginx(_Service):
    """``nginx`` in the foreground with ``http_block`` (the ``upstream`` and ``server`` blocks) inside a minimal
    main config whose files all live in ``workdir``; ``port`` is where it listens."""

    group = True
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
        process = subprocess.Popen([_binary("nginx"), "-p", str(self.workdir), "-c", str(conf), "-g", "daemon off;"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

        def listening() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        try:
            self._launch(process, listening, "nginx")
        except AssertionError:
            log = (self.workdir / "error.log").read_text() if (self.workdir / "error.log").exists() else ""
            raise AssertionError(f"nginx did not start: {log[-2000:]}") from None
        return self


def nginx_example(markdown: str, ports: Sequence[int], listen: int) -> str:
    """The first ```` ```nginx ```` block of ``markdown`` (docs/deployment.md's load balancer), with its ``server``
    lines replaced by loopback ``ports`` and its ``listen`` by ``listen``: tests and the bench run the documented
    config itself."""
    import re

    found = re.search(r"```nginx\n(.*?)```", markdown, re.S)
    assert found, "no ```nginx block"
    servers = "".join(f"    server 127.0.0.1:{port} max_fails=1 fail_timeout=5s;\n" for port in ports)
    block = re.sub(r"(    server [0-9.]+:4001 [^\n]*\n)+", servers, found.group(1))
    return re.sub(r"listen \d+;", f"listen 127.0.0.1:{listen};", block)


class ScillmProcess(_Service):
    """``scillm serve`` as a real process: ``config`` is written to a ``scillm.toml`` in ``workdir``, ``env`` is the
    whole environment it sees (plus ``SCILLM_DATA_DIR`` in ``workdir`` unless given)."""

    group = True
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
            process = subprocess.Popen(command, env=self.env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        try:
            self._launch(process, self.ready, "scillm serve")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {self.log.read_text()[-3000:]}") from None
        return self



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
