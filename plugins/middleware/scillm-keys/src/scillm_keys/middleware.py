"""ASGI layer ahead of the master-key check: a virtual key becomes the request's identity.

- ``Authorization: Bearer sk-scillm-key_…`` (or ``x-api-key``): resolved through the key store (401 when unknown,
  revoked or expired), then ``scope["scillm.identity"]`` is the key's identity and the auth plugin lets it pass.
- An identity an earlier layer set (an agent run's key carries the identity of the key that started the run) is
  checked again here, so revoking a key also stops the model calls of its running agents.
- Master-only routes (key administration, ``/metrics``) answer 403 to virtual keys.
- Anything else (the master key, the dev key, a wrong key) goes on to the auth plugin unchanged.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from scillm_core import Identity, errors, send_error
from scillm_keys.store import KEY_PREFIX, KeyStore

__all__ = ["KeysMiddleware", "MASTER_ONLY"]

PUBLIC_PREFIXES = ("/health/",)
# the operator's views: key administration, and what the whole gateway is doing (other keys' batches, teams,
# logins, the state store's path, breaker errors); a virtual key reads its own through /v1/budget, spend, calls
MASTER_ONLY = ("/v1/scillm/keys", "/metrics", "/v1/scillm/health", "/v1/scillm/providers", "/v1/scillm/plugins",
               "/v1/scillm/auth")
_MASTER_ONLY_TREES = tuple(p + "/" for p in MASTER_ONLY)
_PREFIX = KEY_PREFIX.encode() + b"key_"


class KeysMiddleware:
    def __init__(self, app: ASGIApp, keys: KeyStore) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
            return
        carried = scope.get("scillm.identity")
        if isinstance(carried, Identity):
            if carried.master:
                await self.app(scope, receive, send)
                return
            check = self.keys.verify(carried)
        else:
            token = _token(scope)
            if token is None:
                await self.app(scope, receive, send)
                return
            check = self.keys.resolve(token)
        try:
            identity = await check
        except errors.AuthenticationError as exc:
            await send_error(send, exc)
            return
        except Exception as exc:  # fails closed: a key that cannot be checked is not accepted
            await send_error(send, errors.ScillmError(
                f"the key could not be checked (state store: {type(exc).__name__}); try again", status=503,
                code="state_store_unavailable"))
            return
        path = scope["path"]
        if path.startswith(MASTER_ONLY) and (path in MASTER_ONLY or path.startswith(_MASTER_ONLY_TREES)):
            await send_error(send, errors.PermissionDenied(f"{path} needs the master key"))
            return
        scope["scillm.identity"] = identity
        await self.app(scope, receive, send)


def _token(scope: Scope) -> str | None:
    """A presented virtual key (``Authorization: Bearer`` or ``x-api-key``), else ``None``."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credential = value.partition(b" ")
            credential = credential.strip()
            if scheme.lower() == b"bearer" and credential.startswith(_PREFIX):
                return credential.decode("latin-1")
        elif name == b"x-api-key" and value.startswith(_PREFIX):
            return value.decode("latin-1")
    return None
