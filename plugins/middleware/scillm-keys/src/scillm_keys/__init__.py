"""Virtual keys: one key per person, project or job, each resolved to an :class:`~scillm_core.Identity`.

- Keys live in the state store (namespace ``keys``), secrets as SHA-256 hashes only; the master key manages them
  (``/v1/scillm/keys``, ``scillm keys``). Each has a name, a team tag, an optional expiry, optional allowed models
  or groups, and limits (dollars per day/month, requests and tokens per minute, concurrent calls) that the
  budgets plugin enforces.
- An ASGI layer (order 8, ahead of the master-key check at 10) resolves a presented key and puts its identity in
  the request scope; surfaces carry it on every call's context, and record it as the owner of what they create,
  so one key sees only its own calls, batches and runs (:func:`scillm_core.require_visible`).
- ``postprocess_json`` (``tryfirst``): a key with allowed models gets 403 naming the model for anything else,
  before the cache, routing fallbacks or the provider see the request.

Config ``[keys]``: ``enabled = true``. Fails closed: an unknown, revoked or expired key is a 401.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING, Any

from attrs import frozen

from scillm_core import CommandRegistry, MiddlewareRegistry, Runtime, SurfaceRegistry, errors, hookimpl
from scillm_keys.limits import LIMIT_FIELDS, Limits, parse_limits
from scillm_keys.middleware import KeysMiddleware
from scillm_keys.routes import routes
from scillm_keys.store import KEY_PREFIX, KeyStore

if TYPE_CHECKING:
    from scillm_core import CallContext, ChatRequest

__all__ = ["KEY_PREFIX", "LIMIT_FIELDS", "KeyStore", "KeysConfig", "Limits", "keys_of", "parse_limits"]


@frozen(kw_only=True)
class KeysConfig:
    enabled: bool = True


def _config(runtime: Runtime) -> KeysConfig:
    return runtime.config.sections.get("keys") or KeysConfig()  # type: ignore[no-any-return]


def keys_of(runtime: Runtime) -> KeyStore | None:
    """The app's key store, or ``None`` when virtual keys are switched off."""
    return runtime.plugin_state.get("keys")  # type: ignore[no-any-return]


@hookimpl
def scillm_config_sections() -> Mapping[str, type]:
    return {"keys": KeysConfig}


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    if not _config(runtime).enabled:
        return
    keys = runtime.plugin_state["keys"] = KeyStore(runtime)
    for path, endpoint, methods in routes():
        surfaces.route(path, endpoint, methods, plugin="keys")
    surfaces.on_shutdown(keys.versions.flush)


@hookimpl
def scillm_register_middleware(middleware: MiddlewareRegistry, runtime: Runtime) -> None:
    keys = keys_of(runtime)
    if keys is not None:
        middleware.add(lambda app: KeysMiddleware(app, keys), order=8, name="virtual-keys")


@hookimpl
def scillm_register_commands(commands: CommandRegistry) -> None:
    from scillm_keys.cli import configure, run

    commands.add("keys", "create, list, revoke and rotate virtual keys (against a running scillm)", configure, run)


@hookimpl
def scillm_health(runtime: Runtime) -> dict[str, Any]:
    keys = keys_of(runtime)
    if keys is None:
        return {"keys": {"enabled": False, "fails": "closed"}}
    return {"keys": {"enabled": True, "fails": "closed", **keys.health()}}


@hookimpl(wrapper=True, tryfirst=True)
def postprocess_json(request: ChatRequest, ctx: CallContext) -> Generator[None, Any, Any]:
    """A key restricted to some models or groups may call nothing else (403 naming the model)."""
    call = yield
    allowed = ctx.identity.models
    if allowed is not None and not _allowed(request, ctx):
        raise errors.PermissionDenied(f"this key may not use model {request.model!r} (allowed: "
                                      f"{', '.join(allowed)})", param="model")
    return call


def _allowed(request: ChatRequest, ctx: CallContext) -> bool:
    """Whether the requested name is allowed, or what it routes to: its group (which brings its fallbacks), else
    the one model it reaches (as ``model`` or ``provider/model``)."""
    if ctx.identity.may_call(request.model):
        return True
    route = ctx.runtime.hooks.route_model(request, ctx.runtime)
    return ctx.identity.may_call(*route.reaches)
