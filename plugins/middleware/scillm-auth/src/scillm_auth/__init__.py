"""Client authentication: ``Authorization: Bearer <key>`` (or ``x-api-key``) on every route but health and the
routes surfaces declared public (``runtime.public_paths``: pages that hold no data, such as the dashboard's).

The key is ``SCILLM_MASTER_KEY``. Without it the dev key ``sk-dev-proxy-123`` works, from loopback clients only
(``scillm serve`` also refuses to bind a non-loopback address without a master key). Either resolves to the master
identity (``scope["scillm.identity"]``). A request an earlier layer already authenticated with a credential of its
own (a virtual key, an agent run's key) carries that layer's identity and passes. Fails closed.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from scillm_core import MASTER, Identity, MiddlewareRegistry, Runtime, errors, hookimpl, send_error

DEV_KEY = "sk-dev-proxy-123"
PUBLIC_PREFIXES = ("/health/",)


@hookimpl
def scillm_register_middleware(middleware: MiddlewareRegistry, runtime: Runtime) -> None:
    master_key = runtime.env.get("SCILLM_MASTER_KEY") or None
    public = runtime.public_paths
    middleware.add(lambda app: AuthMiddleware(app, master_key, public), order=10, name="auth")


@hookimpl
def scillm_health(runtime: Runtime) -> dict[str, Any]:
    mode = "master_key" if runtime.env.get("SCILLM_MASTER_KEY") else "dev_key_loopback_only"
    return {"auth": {"enabled": True, "fails": "closed", "mode": mode}}


class AuthMiddleware:
    def __init__(self, app: ASGIApp, master_key: str | None, public: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.key = (master_key or DEV_KEY).encode()
        self.dev = master_key is None
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(PUBLIC_PREFIXES) or scope["path"] in self.public \
                or isinstance(scope.get("scillm.identity"), Identity):
            await self.app(scope, receive, send)
            return
        token = _token(scope)
        if token is None:
            await send_error(send, errors.AuthenticationError(
                "missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')"))
            return
        if not hmac.compare_digest(token, self.key):
            await send_error(send, errors.AuthenticationError("invalid API key"))
            return
        if self.dev and not _loopback(scope):
            await send_error(send, errors.PermissionDenied(
                "the dev key is accepted from loopback clients only; set SCILLM_MASTER_KEY on the server"))
            return
        scope["scillm.identity"] = MASTER
        await self.app(scope, receive, send)


def _token(scope: Scope) -> bytes | None:
    api_key = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credential = value.partition(b" ")
            if scheme.lower() == b"bearer" and credential.strip():
                return credential.strip()
        elif name == b"x-api-key" and value:
            api_key = value
    return api_key


def _loopback(scope: Scope) -> bool:
    client = scope.get("client")
    if not client:
        return True  # in-process transports (tests, internal calls) have no peer address
    if client[0] in ("127.0.0.1", "::1"):
        return True  # the common case, without parsing the address
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False
