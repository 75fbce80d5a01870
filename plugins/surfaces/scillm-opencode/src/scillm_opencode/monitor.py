"""The human monitor: a static page per run (``GET .../runs/{id}/monitor``) that reads the run, its live diff and
its event stream with a read-only key, and renders everything as text (never HTML from the run).

How it authenticates without the master key in a URL: creating a run (or ``POST .../runs/{id}/monitor``) returns
``monitor_url`` = ``.../monitor#token=sk-scillm-view-…``. The key is in the URL *fragment*, which browsers never
send to a server (so it is in no access log or Referer); the page takes it out of the address bar, keeps it in
memory and sends it as ``Authorization: Bearer`` on its ``fetch`` calls. The key is valid for that one run's GET
routes only (run, events, diff), expires after ``opencode.monitor_ttl_s``, and is not stored anywhere but the
server's memory (after a restart, mint a new link). Without a token the page asks for a key and keeps it in memory.
The page itself holds no run data, so it is served without authentication; a strict Content-Security-Policy
allows only its own inline script and style and connections to this server.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["MonitorPage", "PAGE", "view_routes"]

PAGE = Path(__file__).with_name("monitor.html").read_bytes()
MONITOR_PATH = re.compile(r"^/v1/scillm/opencode/(transport/)?runs/[A-Za-z0-9][A-Za-z0-9._-]{0,79}/monitor$")


def _hash(tag: bytes) -> str:
    body = PAGE.split(b"<" + tag + b">", 1)[1].split(b"</" + tag + b">", 1)[0]
    return "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'"


CSP = (f"default-src 'none'; script-src {_hash(b'script')}; style-src {_hash(b'style')}; connect-src 'self'; "
       "img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = [(b"content-type", b"text/html; charset=utf-8"), (b"content-security-policy", CSP.encode()),
           (b"referrer-policy", b"no-referrer"), (b"x-content-type-options", b"nosniff"),
           (b"cache-control", b"no-store"), (b"x-frame-options", b"DENY")]


def view_routes(base: str, *, transport: bool) -> Callable[[str, str], bool]:
    """What a run's monitor key may call: GET on the run, its diff and its event stream."""
    allowed = {base, base + "/diff", base + ("/events/stream" if transport else "/events")}
    return lambda method, path: method == "GET" and path.rstrip("/") in allowed


class MonitorPage:
    """Serves the monitor page ahead of authentication (it is a static shell; its data calls authenticate)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and MONITOR_PATH.match(scope["path"]):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [*HEADERS, (b"content-length", str(len(PAGE)).encode())]})
            await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else PAGE})
            return
        await self.app(scope, receive, send)
