"""Short-lived keys that stand in for the server's key: a CLI child talks back to scillm with a ``sk-scillm-run-…``
key that is valid only while its run is live and only on model routes; a person's browser reads one run with a
``sk-scillm-view-…`` key valid only on that run's read routes. This middleware (ahead of the key and auth layers)
checks the key's grant and authenticates the request as the identity of the key that started the run
(``scope["scillm.identity"]``) with the run as the calls' job (``scope["scillm.job"]``): a run's model calls are
charged to, limited as and logged under that key, it sees only what that key sees, and the master key never leaves
the server process.

A long-lived child that serves many runs (``opencode serve``) gets one key whose calls are attributed per
session: each run binds its session id, and a call is accepted only when its ``x-session-id`` (or
``x-parent-session-id``, for a subagent) belongs to a live run; the call is then attributed to that run, its
caller and the identity that started it.

Every call made with a key names the unit of work it is made for (``scillm_core.events.PARENT_SCOPE_KEY``), so that
events, the dashboard and traces put it under that unit: ``run:<run_id>`` unless the grant (or the session binding)
names another unit, and a key's unit can change while it lives (a standing worker's current turn, :meth:`set_unit`).

Keys and grants live in ``runtime.plugin_state["run-keys"]`` (one table per app, shared by every agent surface);
:func:`add_run_key_middleware` installs the middleware once whichever surfaces ask for it.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from attrs import define, field
from starlette.types import ASGIApp, Receive, Scope, Send

from scillm_core import MASTER, Identity, Job, errors, send_error
from scillm_core.events import PARENT_SCOPE_KEY

if TYPE_CHECKING:
    from scillm_core import MiddlewareRegistry, Runtime

__all__ = ["Grant", "KEY_PREFIXES", "MODEL_ROUTES", "RUN_KEY_PREFIX", "RunKeyMiddleware", "RunKeys", "VIEW_KEY_PREFIX",
           "add_run_key_middleware", "model_routes_only", "run_keys"]

RUN_KEY_PREFIX = "sk-scillm-run-"     # model calls of a run's child
VIEW_KEY_PREFIX = "sk-scillm-view-"   # read-only access to one run (the monitor page)
KEY_PREFIXES = (RUN_KEY_PREFIX, VIEW_KEY_PREFIX)  # what this table mints (other sk-scillm- keys pass through)
#: the only routes a run key opens (exact paths: a suffix match let it reach /v1/scillm/opencode-go/models)
MODEL_ROUTES = frozenset({"/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
                          "/v1/models"})
SESSION_HEADERS = (b"x-session-id", b"x-parent-session-id")  # what opencode sends with every model call
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def model_routes_only(method: str, path: str) -> bool:
    return path.rstrip("/") in MODEL_ROUTES


#: what a call made with a key is attributed to: ``(run_id, caller, identity, job, unit)``
Attribution = tuple[str, str | None, Identity, Job | None, str | None]


@define
class Grant:
    """What one key may do and to whom its calls are attributed."""

    run_id: str
    caller: str | None
    #: ``allow(method, path)``: may this key call that route
    allow: Callable[[str, str], bool] = model_routes_only
    #: what a refused route is told
    refusal: str = "a run key may call model routes only"
    expires_at: float | None = None
    #: the identity that started the run: its calls are authenticated, isolated, limited and charged as that key
    identity: Identity = MASTER
    #: the run as the job its calls are made for (spend, ``max_cost_usd``), if the surface tracks one
    job: Job | None = None
    #: ``None``: every call is the grant's run. A dict: calls are attributed by session id to
    #: ``(run_id, caller, identity, job, unit)``
    sessions: dict[str, Attribution] | None = None
    #: the unit of work the key's calls are made for (events, traces); ``None``: ``run:<run_id>``
    unit: str | None = None
    children: dict[str, str] = field(factory=dict)  # subagent session -> the bound session it belongs to


class RunKeys:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._live: dict[str, Grant] = {}
        self.clock = clock

    def mint(self, run_id: str, caller: str | None, *, prefix: str = RUN_KEY_PREFIX,
             allow: Callable[[str, str], bool] = model_routes_only, refusal: str | None = None,
             ttl_s: float | None = None, identity: Identity = MASTER, job: Job | None = None,
             per_session: bool = False, unit: str | None = None) -> str:
        """A new key for ``run_id``; valid until :meth:`revoke` (or ``ttl_s`` seconds)."""
        if prefix not in KEY_PREFIXES:
            raise ValueError(f"key prefix must be one of {KEY_PREFIXES}")
        key = prefix + secrets.token_urlsafe(24)
        grant = Grant(run_id=run_id, caller=caller, allow=allow, identity=identity, job=job,
                      expires_at=None if ttl_s is None else self.clock() + ttl_s,
                      sessions={} if per_session else None, unit=unit)
        if refusal:
            grant.refusal = refusal
        self._live[key] = grant
        return key

    def assign(self, key: str | None, *, run_id: str, caller: str | None, identity: Identity = MASTER,
               job: Job | None = None) -> None:
        """Attribute a live key's calls from now on to another run (a standing worker's process serves one turn at
        a time, each for the key that asked for it)."""
        grant = self._live.get(key) if key else None
        if grant is not None:
            grant.run_id, grant.caller, grant.identity, grant.job = run_id, caller, identity, job

    def revoke(self, key: str | None) -> None:
        if key:
            self._live.pop(key, None)

    def lookup(self, key: str) -> Grant | None:
        grant = self._live.get(key)
        if grant is not None and grant.expires_at is not None and self.clock() >= grant.expires_at:
            self._live.pop(key, None)
            return None
        return grant

    def set_unit(self, key: str | None, unit: str | None) -> None:
        """From now on, the calls made with ``key`` are made for ``unit`` (a standing worker's current turn)."""
        grant = self._live.get(key) if key else None
        if grant is not None:
            grant.unit = unit

    def bind_session(self, key: str, session_id: str, run_id: str, caller: str | None,
                     identity: Identity = MASTER, job: Job | None = None, unit: str | None = None) -> None:
        """Attribute the calls a per-session key makes for ``session_id`` to ``run_id``, its caller, the identity
        that started it, the run as their job and the unit of work they are made for (until unbound)."""
        grant = self._live.get(key)
        if grant is None or grant.sessions is None:
            raise KeyError("not a live per-session key")
        grant.sessions[session_id] = (run_id, caller, identity, job, unit)

    def bind_child(self, key: str, child_id: str, parent_id: str) -> None:
        """A subagent session (``child_id``) belongs to the run of its bound parent session."""
        grant = self._live.get(key)
        if grant is not None and grant.sessions is not None:
            grant.children[child_id] = parent_id

    def unbind_session(self, key: str, session_id: str) -> None:
        grant = self._live.get(key)
        if grant is not None and grant.sessions is not None:
            grant.sessions.pop(session_id, None)
            for child in [c for c, p in grant.children.items() if p == session_id or c == session_id]:
                grant.children.pop(child, None)

    def attribute(self, grant: Grant, headers: list[tuple[bytes, bytes]]) -> Attribution | None:
        """``(run_id, caller, identity, job, unit)`` of the run a call made with ``grant`` belongs to; ``None`` when
        a per-session key names no live session."""
        if grant.sessions is None:
            return grant.run_id, grant.caller, grant.identity, grant.job, grant.unit
        for name in SESSION_HEADERS:
            for key, value in headers:
                if key != name:
                    continue
                session = value.decode("latin-1")
                session = grant.children.get(session, session)
                if _SESSION_ID.match(session) and session in grant.sessions:
                    return grant.sessions[session]
        return None


def run_keys(runtime: Runtime) -> RunKeys:
    """The app's live keys, one table for every agent surface (exec runs, standing workers, OpenCode runs, ...): the
    single :class:`RunKeyMiddleware` accepts exactly these."""
    keys = runtime.plugin_state.get("run-keys")
    if keys is None:
        keys = runtime.plugin_state["run-keys"] = RunKeys()
    return keys  # type: ignore[no-any-return]


def add_run_key_middleware(middleware: MiddlewareRegistry, runtime: Runtime) -> None:
    """Install :class:`RunKeyMiddleware` for this app, once, whichever agent surfaces call it."""
    if runtime.plugin_state.get("run-keys-middleware"):
        return
    runtime.plugin_state["run-keys-middleware"] = True
    keys = run_keys(runtime)
    middleware.add(lambda app: RunKeyMiddleware(app, keys), order=5, name="run-keys")


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
    def __init__(self, app: ASGIApp, keys: RunKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = _token(scope["headers"])
        if token is None or not token.startswith(KEY_PREFIXES):
            await self.app(scope, receive, send)
            return
        grant = self.keys.lookup(token)
        if grant is None:
            await send_error(send, errors.AuthenticationError("this key is unknown, expired, or its run has ended"))
            return
        if not grant.allow(scope["method"], scope["path"]):
            await send_error(send, errors.PermissionDenied(grant.refusal))
            return
        found = self.keys.attribute(grant, scope["headers"])
        if found is None:
            await send_error(send, errors.PermissionDenied("no live run owns this session (x-session-id)"))
            return
        run_id, caller, identity, job, unit = found
        headers: list[tuple[bytes, bytes]] = [
            (k, v) for k, v in scope["headers"] if k not in (b"authorization", b"x-api-key", b"x-scillm-exec-run")]
        headers.append((b"x-scillm-exec-run", run_id.encode()))
        if not any(k == b"x-caller-skill" for k, _ in headers):
            headers.append((b"x-caller-skill", f"{caller or 'exec'}/{run_id}".encode()))
        inner: dict[str, Any] = dict(scope)
        inner["headers"] = headers
        inner[PARENT_SCOPE_KEY] = unit or f"run:{run_id}"  # the unit the call is made for (events, traces)
        inner["scillm.identity"] = identity
        if job is not None:
            inner["scillm.job"] = job
        await self.app(inner, receive, send)
