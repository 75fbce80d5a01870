"""The ChatGPT login that ``codex login`` leaves in ``~/.codex/auth.json``: read it, refresh it, write it back.

- The access token is a JWT; its ``exp`` claim says when it expires and its ``https://api.openai.com/auth`` claim
  holds ``chatgpt_account_id`` (sent as the ``chatgpt-account-id`` header).
- Refresh is single-flight: concurrent calls that find the token expiring wait on one lock; the first refreshes,
  the rest reuse its result. Before refreshing, the file is re-read, since the Codex CLI may have refreshed it.
- The refresh token rotates: the new one is written back atomically (temp file in the same directory, fsync,
  ``os.replace``, mode 0600), other keys of the file are kept.
- A refresh the token endpoint refuses for good (401, ``refresh_token_expired|reused|invalidated``) fails with a
  message that names the fix (``codex login``) and keeps failing fast until the file changes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import orjson
from attrs import frozen

from scillm_core import errors
from scillm_core.redact import redact
from scillm_core.upstream import translate_transport

__all__ = ["CLIENT_ID", "DEFAULT_TOKEN_URL", "CodexAuth", "Login", "jwt_claims"]

CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"
DEFAULT_TOKEN_URL = "https://auth.openai.com/oauth/token"
AUTH_CLAIM = "https://api.openai.com/auth"
PERMANENT_CODES = ("refresh_token_expired", "refresh_token_reused", "refresh_token_invalidated", "invalid_grant")
REFRESH_INTERVAL_S = 8 * 24 * 3600  # Codex refreshes a login older than 8 days when the token has no exp


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT (not verified: the backend verifies it; we only read ``exp`` and the account)."""
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, orjson.JSONDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


@frozen
class Login:
    access_token: str
    refresh_token: str | None
    account_id: str | None
    expires_at: float | None
    last_refresh: float | None

    @classmethod
    def from_file(cls, data: Mapping[str, Any]) -> Login | None:
        tokens = data.get("tokens")
        if not isinstance(tokens, dict) or not isinstance(tokens.get("access_token"), str) \
                or not tokens["access_token"]:
            return None
        access = tokens["access_token"]
        claims = jwt_claims(access)
        auth = claims.get(AUTH_CLAIM)
        account = (auth.get("chatgpt_account_id") if isinstance(auth, dict) else None) or tokens.get("account_id")
        exp = claims.get("exp")
        refresh = tokens.get("refresh_token")
        return cls(access_token=access, refresh_token=refresh if isinstance(refresh, str) and refresh else None,
                   account_id=str(account) if account else None,
                   expires_at=float(exp) if isinstance(exp, int | float) else None,
                   last_refresh=_parse_time(data.get("last_refresh")))

    def needs_refresh(self, margin_s: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if self.expires_at is not None:
            return self.expires_at - now < margin_s
        return self.last_refresh is not None and now - self.last_refresh > REFRESH_INTERVAL_S


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    with contextlib.suppress(ValueError):
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


class CodexAuth:
    """One auth file. ``provider`` names the provider in errors."""

    def __init__(self, path: Path, token_url: str, *, provider: str = "codex", margin_s: float = 120.0) -> None:
        self.path = path
        self.token_url = token_url
        self.provider = provider
        self.margin_s = margin_s
        self._stamp: tuple[int, int] | None = None
        self._login: Login | None = None
        self._data: dict[str, Any] = {}
        self._problem: str | None = None       # why the file is unusable
        self._dead: str | None = None          # refresh token the endpoint refused for good
        self._dead_reason: str | None = None
        self._lock = asyncio.Lock()
        self.refreshes = 0

    # -- reading --------------------------------------------------------------------------------------------------

    def load(self) -> Login | None:
        """The login in the file, re-read when the file changed (cheap: one ``stat``)."""
        try:
            st = self.path.stat()
        except OSError:
            self._stamp, self._login, self._data = None, None, {}
            self._problem = f"no ChatGPT login at {self.path}"
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return self._login
        self._stamp = stamp
        try:
            data = orjson.loads(self.path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            self._login, self._data = None, {}
            self._problem = f"{self.path} is not readable JSON"
            return None
        self._data = data if isinstance(data, dict) else {}
        self._login = Login.from_file(self._data)
        self._problem = None if self._login else f"{self.path} holds no ChatGPT tokens (auth_mode is not chatgpt)"
        return self._login

    @property
    def logged_in(self) -> bool:
        return self.load() is not None

    def missing(self) -> str | None:
        if self.load() is not None:
            return None
        return (f"{self._problem}; run `codex login` to sign in with ChatGPT, or set SCILLM_CODEX_AUTH to the "
                f"auth.json of a login")

    def status(self) -> dict[str, Any]:
        login = self.load()
        if login is None:
            return {"status": "missing", "source": str(self.path), "expires_in_s": None, "account_id": None,
                    "detail": self._problem}
        now = time.time()
        expires_in = None if login.expires_at is None else int(login.expires_at - now)
        if self._dead is not None and self._dead == login.refresh_token:
            state = "login_required"
        elif expires_in is not None and expires_in <= 0:
            state = "expired" if login.refresh_token else "login_required"
        elif login.needs_refresh(self.margin_s, now):
            state = "expiring"
        else:
            state = "ok"
        account = login.account_id
        out: dict[str, Any] = {"status": state, "source": str(self.path), "expires_in_s": expires_in,
                               "account_id": f"{account[:8]}..." if account else None,
                               "refreshable": login.refresh_token is not None}
        if state == "login_required":
            out["detail"] = "run `codex login` to sign in again"
        return out

    # -- using ----------------------------------------------------------------------------------------------------

    async def token(self, client: httpx.AsyncClient, model: str) -> Login:
        """A usable login, refreshed first when it is about to expire."""
        login = self.load()
        if login is None:
            raise errors.ProviderNotConfigured(f"provider {self.provider!r} is not configured: {self.missing()}",
                                               param="model")
        if not login.needs_refresh(self.margin_s):
            return login
        return await self.refresh(client, model, stale=login.access_token)

    async def refresh(self, client: httpx.AsyncClient, model: str, *, stale: str) -> Login:
        """Refresh once for everyone holding ``stale``: callers queued behind the lock reuse the new token."""
        async with self._lock, _FileLock(self.path.with_name(self.path.name + ".lock")):
            # one refresh per process (asyncio lock) and across scillm workers sharing the file (flock)
            current = self.load()
            if current is None:
                raise errors.UpstreamAuthError(f"ChatGPT login disappeared: {self.missing()}",
                                               provider=self.provider, model=model)
            if current.access_token != stale and not current.needs_refresh(self.margin_s):
                return current  # refreshed meanwhile (by a caller ahead of us, another worker or the Codex CLI)
            try:
                return await self._refresh_locked(client, model, current)
            except errors.UpstreamAuthError:
                rotated = self.load()  # the Codex CLI may have rotated the token under us: take its login
                if rotated is not None and rotated.refresh_token != current.refresh_token \
                        and not rotated.needs_refresh(self.margin_s):
                    return rotated
                raise

    async def _refresh_locked(self, client: httpx.AsyncClient, model: str, login: Login) -> Login:
        hint = f"run `codex login` to sign in again (login file {self.path})"
        if login.refresh_token is None:
            raise errors.UpstreamAuthError(f"the ChatGPT login has expired and has no refresh token; {hint}",
                                           provider=self.provider, model=model)
        if self._dead == login.refresh_token:
            raise errors.UpstreamAuthError(f"the ChatGPT login could not be refreshed ({self._dead_reason}); {hint}",
                                           provider=self.provider, model=model)
        secrets = (login.refresh_token, login.access_token)
        with translate_transport(self.provider, model):
            response = await client.post(self.token_url, headers={"content-type": "application/json"},
                                         content=orjson.dumps({"client_id": CLIENT_ID, "grant_type": "refresh_token",
                                                               "refresh_token": login.refresh_token}),
                                         timeout=httpx.Timeout(30.0, connect=10.0))
        self.refreshes += 1
        if response.status_code >= 400:
            code, message = _refresh_error(response.content)
            reason = redact(code or message or f"HTTP {response.status_code}", secrets)
            if response.status_code in (400, 401, 403) or code in PERMANENT_CODES:
                self._dead, self._dead_reason = login.refresh_token, reason
                raise errors.UpstreamAuthError(f"the ChatGPT login has expired and could not be refreshed "
                                               f"({reason}); {hint}", provider=self.provider, model=model)
            raise errors.UpstreamUnavailable(f"token refresh failed with HTTP {response.status_code} ({reason})",
                                             provider=self.provider, model=model,
                                             upstream_status=response.status_code)
        try:
            fresh = orjson.loads(response.content)
            access = fresh["access_token"]
            assert isinstance(access, str) and access
        except (orjson.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise errors.UpstreamProtocolError("token refresh answered without an access_token",
                                               provider=self.provider, model=model) from None
        self._write_back(fresh)
        new = self.load()
        if new is None:  # pragma: no cover - we just wrote it
            raise errors.UpstreamAuthError(f"could not re-read {self.path} after refresh", provider=self.provider,
                                           model=model)
        return new

    def _write_back(self, fresh: Mapping[str, Any]) -> None:
        data = dict(self._data)
        tokens = dict(data.get("tokens") or {})
        for key in ("access_token", "refresh_token", "id_token"):
            if isinstance(fresh.get(key), str) and fresh[key]:
                tokens[key] = fresh[key]
        auth = jwt_claims(tokens["access_token"]).get(AUTH_CLAIM)
        if isinstance(auth, dict) and auth.get("chatgpt_account_id"):
            tokens["account_id"] = auth["chatgpt_account_id"]
        data["tokens"] = tokens
        data["last_refresh"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        atomic_write(self.path, orjson.dumps(data, option=orjson.OPT_INDENT_2))


class _FileLock:
    """An advisory ``flock`` on a sidecar file, polled so the event loop keeps running."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    async def __aenter__(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: the in-process lock alone
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return  # read-only directory: the in-process lock alone
        while True:  # non-blocking attempts: cancellation-safe, no thread left holding the lock
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            except BaseException:
                os.close(self.fd)
                self.fd = None
                raise
            try:
                await asyncio.sleep(0.05)
            except BaseException:
                os.close(self.fd)
                self.fd = None
                raise

    async def __aexit__(self, *exc: object) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def atomic_write(path: Path, content: bytes) -> None:
    """Write ``content`` so readers see the old file or the new one, never a torn one; mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _refresh_error(raw: bytes) -> tuple[str | None, str | None]:
    """(code, message) from ``{"error": {"code"}}``, ``{"error": "..."}`` or ``{"code": ...}`` bodies."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, raw.decode("utf-8", "replace")[:200]
    if not isinstance(data, dict):
        return None, str(data)[:200]
    error = data.get("error")
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        return (str(code) if code else None), error.get("message")
    if isinstance(error, str):
        return error, data.get("error_description")
    code = data.get("code")
    return (str(code) if code else None), data.get("message")
