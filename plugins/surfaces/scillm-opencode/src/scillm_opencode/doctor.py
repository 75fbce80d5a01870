"""``scillm doctor``: can ``opencode serve`` start (or, with ``OPENCODE_SERVER_URL``, be reached), and is ``rg`` on
PATH (OpenCode's skill tool fails without it). The start check runs a throwaway server in a temporary home with a
generated password, asks ``/global/health`` and kills its process group."""

from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from scillm_agent_runners.base import cli_path
from scillm_agent_runners.clis import opencode_config as opencode_file_config
from scillm_agent_runners.clis import opencode_env, opencode_permission

from scillm_opencode.config import enabled, opencode_config
from scillm_opencode.serve import LISTENING

if TYPE_CHECKING:
    from scillm_core import Runtime

__all__ = ["serve_check"]


def serve_check(runtime: Runtime) -> list[dict[str, Any]]:
    """While the surfaces are off these rows are information (``[--]``); switched on, a failure is ``[FAIL]``."""
    on = enabled(runtime)
    rows: list[dict[str, Any]] = [{
        "check": "opencode serve surface", "ok": on,
        "detail": "enabled" if on else "disabled (set SCILLM_OPENCODE_SERVE_ENABLED=1 to enable it)"}]
    rg = shutil.which("rg")
    rows.append({"check": "ripgrep for OpenCode skills", "ok": rg is not None, "required": on,
                 "detail": rg or "rg not on PATH: OpenCode's skill tool fails without it (apt-get install ripgrep)"})
    external = opencode_config(runtime).server_url or runtime.env.get("OPENCODE_SERVER_URL")
    if external:
        rows.append(_reach(external, runtime) | {"required": on})
    elif on:
        rows.append(_start(runtime) | {"required": True})
    else:
        cli = cli_path(runtime, "opencode")
        rows.append({"check": "opencode serve can start", "ok": False,
                     "detail": f"not tried while the surface is disabled ({cli or 'opencode not installed'})"})
    return rows


def _reach(url: str, runtime: Runtime) -> dict[str, Any]:
    auth = (runtime.env.get("OPENCODE_SERVER_USERNAME") or "opencode", runtime.env.get("OPENCODE_SERVER_PASSWORD")
            or "")
    try:
        response = httpx.get(url.rstrip("/") + "/global/health", auth=auth, timeout=5, trust_env=False)
    except httpx.HTTPError as exc:
        return {"check": "opencode serve reachable", "ok": False, "detail": f"{url} unreachable ({type(exc).__name__})"}
    ok = response.status_code == 200
    detail = f"{url} answered HTTP {response.status_code}" + (
        " (check OPENCODE_SERVER_PASSWORD)" if response.status_code == 401 else "")
    if ok:
        detail += f", version {response.json().get('version')}"
    return {"check": "opencode serve reachable", "ok": ok, "detail": detail}


def _start(runtime: Runtime) -> dict[str, Any]:
    check = "opencode serve can start"
    cli = cli_path(runtime, "opencode")
    if cli is None:
        return {"check": check, "ok": False, "detail": "opencode not installed: run scripts/install-agent-clis"}
    home = Path(tempfile.mkdtemp(prefix="scillm-doctor-opencode-"))
    password = secrets.token_urlsafe(18)
    config = opencode_file_config("http://127.0.0.1:9", "doctor", permission=opencode_permission(edit=False))
    env = opencode_env(cli, home, "unused", config, extra={"OPENCODE_SERVER_PASSWORD": password})
    started = time.monotonic()
    proc = subprocess.Popen([cli, "serve", "--hostname", "127.0.0.1", "--port", "0", "--pure"], cwd=home, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = started + opencode_config(runtime).start_timeout_s
        url = None
        assert proc.stdout is not None
        while url is None and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = proc.stdout.readline()
            if not line:
                break
            found = LISTENING.search(line)
            url = found.group(1).decode() if found else None
        if url is None:
            return {"check": check, "ok": False, "detail": f"{cli} serve did not report a listening address "
                                                             f"(exit {proc.poll()})"}
        response = httpx.get(url + "/global/health", auth=("opencode", password), timeout=10, trust_env=False)
        version = response.json().get("version") if response.status_code == 200 else None
        return {"check": check, "ok": version is not None,
                "detail": f"opencode {version} answered in {time.monotonic() - started:.1f}s" if version else
                f"health answered HTTP {response.status_code}"}
    except (OSError, httpx.HTTPError, ValueError) as exc:
        return {"check": check, "ok": False, "detail": f"{type(exc).__name__} while starting {cli} serve"}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        shutil.rmtree(home, ignore_errors=True)
