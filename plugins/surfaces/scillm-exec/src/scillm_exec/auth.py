"""Per-run keys: a CLI child talks back to scillm with a short-lived ``sk-scillm-run-…`` key that is valid only
while its run is live and only on model routes. This middleware (ahead of the auth plugin) swaps it for the
server's own key inside the request scope, so the master key never leaves the server process."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from scillm_core import errors, send_error
from scillm_core.events import PARENT_SCOPE_KEY

__all__ = ["RUN_KEY_PREFIX", "RunKeyMiddleware", "RunKeys", "run_keys"]

RUN_KEY_PREFIX = "sk-scillm-run-"
DEV_KEY = "sk-dev-proxy-123"  # SPEC, Auth: the loopback-only key when SCILLM_MASTER_KEY is unset
#: the only routes a run key opens (exact paths: a suffix match let it reach /v1/scillm/opencode-go/models)
MODEL_ROUTES = frozenset({"/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
                          "/v1/models"})


class RunKeys:
    def __init__(self) -> None:
        self._live: dict[str, tuple[str, str | None]] = {}

    def mint(self, run_id: str, caller: str | None) -> str:
        key = RUN_KEY_PREFIX + secrets.token_urlsafe(24)
        self._live[key] = (run_id, caller)
        return key

    def revoke(self, key: str | None) -> None:
        if key:
            self._live.pop(key, None)

    def lookup(self, key: str) -> tuple[str, str | None] | None:
        return self._live.get(key)


def run_keys(runtime: Any) -> RunKeys:
    """The app's live run keys, one set for every agent surface (exec runs, standing workers, ...): the single
    :class:`RunKeyMiddleware` accepts exactly these."""
    keys = runtime.plugin_state.get("run-keys")
    if keys is None:
        keys = runtime.plugin_state["run-keys"] = RunKeys()
    return keys  # type: ignore[no-any-return]


def _token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credential = value.partition(b" ")
            if scheme.lower() == b"bearer" and credential.strip():
                return credential.strip().decode("latin-1")
        elif name == b"x-api-key" and value:
            return value.decode("latin-1")
    return None


class RunKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: RunKeys, env: Mapping[str, str]) -> None:
        self.app = app
        self.keys = keys
        self.server_key = (env.get("SCILLM_MASTER_KEY") or DEV_KEY).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = _token(scope["headers"])
        if token is None or not token.startswith(RUN_KEY_PREFIX):
            await self.app(scope, receive, send)
            return
        found = self.keys.lookup(token)
        if found is None:
            await send_error(send, errors.AuthenticationError("run key is unknown or its run has ended"))
            return
        if scope["path"].rstrip("/") not in MODEL_ROUTES:
            await send_error(send, errors.PermissionDenied("a run key may call model routes only"))
            return
        run_id, caller = found
        headers: list[tuple[bytes, bytes]] = [
            (k, v) for k, v in scope["headers"] if k not in (b"authorization", b"x-api-key", b"x-scillm-exec-run")]
        headers.append((b"authorization", b"Bearer " + self.server_key))
        headers.append((b"x-scillm-exec-run", run_id.encode()))
        if not any(k == b"x-caller-skill" for k, _ in headers):
            headers.append((b"x-caller-skill", f"{caller or 'exec'}/{run_id}".encode()))
        inner: dict[str, Any] = dict(scope)
        inner["headers"] = headers
        inner[PARENT_SCOPE_KEY] = f"run:{run_id}"  # the call is made for this run (events, traces)
        await self.app(inner, receive, send)
