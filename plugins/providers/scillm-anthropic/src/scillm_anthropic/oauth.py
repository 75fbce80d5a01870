"""The Claude login (Claude Pro/Max OAuth, as Claude Code stores it) and the ``claude-oauth`` provider.

Credentials live in ``~/.claude/.credentials.json`` (``SCILLM_CLAUDE_CREDENTIALS`` overrides the path) as
``{"claudeAiOauth": {"accessToken", "refreshToken", "expiresAt": <epoch ms>, ...}}``. A token that expires within
:data:`REFRESH_MARGIN_S` is refreshed first against ``SCILLM_CLAUDE_TOKEN_URL``; concurrent requests share one
refresh (single flight), and the rotated tokens are written back atomically (temp file + rename, mode 0600) so
Claude Code and scillm keep using the same login. When only a human can fix it (no refresh token, refresh
refused), the error says what to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import orjson

from scillm_anthropic.provider import ANTHROPIC_VERSION, DEFAULT_BASE, AnthropicProvider, normalise_base
from scillm_anthropic.translate import to_messages_body
from scillm_core import CallContext, ChatRequest, Route, errors
from scillm_core.config import ProviderSettings
from scillm_core.upstream import retry_after_seconds

__all__ = ["CLAUDE_CODE_SYSTEM", "CLIENT_ID", "DEFAULT_TOKEN_URL", "OAUTH_BETAS", "ClaudeLogin",
           "ClaudeOAuthProvider"]

CLAUDE_CODE_SYSTEM = "You are Claude Code, Anthropic's official CLI for Claude."
OAUTH_BETAS = ("claude-code-20250219,oauth-2025-04-20,interleaved-thinking-2025-05-14,"
               "fine-grained-tool-streaming-2025-05-14")
DEFAULT_TOKEN_URL = "https://platform.claude.com/v1/oauth/token"
CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
REFRESH_MARGIN_S = 300.0
LOGIN_FIX = ("log in again with Claude Code (run `claude`, then `/login`) to renew {path}, or set ANTHROPIC_API_KEY "
             "to use an API key instead")


def credentials_path(env: Mapping[str, str]) -> Path | None:
    override = env.get("SCILLM_CLAUDE_CREDENTIALS")
    if override:
        return Path(override).expanduser()
    home = env.get("HOME") or env.get("USERPROFILE")
    return Path(home) / ".claude" / ".credentials.json" if home else None


class ClaudeLogin:
    """One credentials file: read (cached by mtime), refresh (single flight), write back (atomic)."""

    def __init__(self, path: Path | None, *, token_url: str = DEFAULT_TOKEN_URL, client_id: str = CLIENT_ID,
                 margin_s: float = REFRESH_MARGIN_S) -> None:
        self.path = path
        self.token_url = token_url
        self.client_id = client_id
        self.margin_s = margin_s
        self.refreshes = 0
        self._lock = asyncio.Lock()
        self._cache: tuple[tuple[int, int], dict[str, Any] | None] | None = None
        self._rejected: str | None = None          # an access token the upstream refused (refresh it next time)
        self._needs_login: tuple[str, tuple[int, int]] | None = None  # reason, file state when refresh failed

    # -- file ---------------------------------------------------------------------------------------------------

    def _stat(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def document(self) -> dict[str, Any] | None:
        """The whole file (``None`` if missing or not a JSON object)."""
        state = self._stat()
        if state is None:
            return None
        if self._cache is not None and self._cache[0] == state:
            return self._cache[1]
        try:
            data = orjson.loads(self.path.read_bytes())  # type: ignore[union-attr]
        except (OSError, orjson.JSONDecodeError):
            data = None
        doc = data if isinstance(data, dict) else None
        self._cache = (state, doc)
        return doc

    def oauth(self) -> dict[str, Any] | None:
        doc = self.document()
        entry = doc.get("claudeAiOauth") if doc else None
        return entry if isinstance(entry, dict) else None

    def _write(self, doc: dict[str, Any]) -> None:
        assert self.path is not None
        fd, tmp = tempfile.mkstemp(prefix=".credentials.", suffix=".tmp", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._cache = None

    # -- state --------------------------------------------------------------------------------------------------

    def secrets(self) -> tuple[str | None, ...]:
        entry = self.oauth() or {}
        return (entry.get("accessToken"), entry.get("refreshToken"), self._rejected)

    def _expires_in(self, entry: Mapping[str, Any]) -> float | None:
        expires = entry.get("expiresAt")
        if isinstance(expires, bool) or not isinstance(expires, int | float):
            return None
        return expires / 1000.0 - time.time()

    def _fresh(self, entry: Mapping[str, Any] | None) -> str | None:
        """The access token if it is usable without a refresh."""
        if not entry or not isinstance(entry.get("accessToken"), str) or not entry["accessToken"]:
            return None
        if entry["accessToken"] == self._rejected:
            return None
        left = self._expires_in(entry)
        return entry["accessToken"] if left is None or left > self.margin_s else None

    def status(self) -> dict[str, Any]:
        source = str(self.path) if self.path else None
        if self._stat() is None:
            return {"status": "not_configured", "source": source, "expires_in_s": None}
        entry = self.oauth()
        out: dict[str, Any] = {"source": source, "expires_in_s": None}
        if not entry or not entry.get("accessToken"):
            return {**out, "status": "needs_login", "detail": "the file holds no Claude login (claudeAiOauth)",
                    "fix": LOGIN_FIX.format(path=source)}
        left = self._expires_in(entry)
        out["expires_in_s"] = None if left is None else int(left)
        if entry.get("subscriptionType"):
            out["subscription"] = entry["subscriptionType"]
        if self._needs_login is not None and self._needs_login[1] == self._stat():
            return {**out, "status": "needs_login", "detail": self._needs_login[0],
                    "fix": LOGIN_FIX.format(path=source)}
        if left is not None and left <= 0:
            if not entry.get("refreshToken"):
                return {**out, "status": "needs_login", "detail": "expired and no refresh token",
                        "fix": LOGIN_FIX.format(path=source)}
            return {**out, "status": "expired", "detail": "will be refreshed on the next request"}
        return {**out, "status": "valid"}

    # -- tokens -------------------------------------------------------------------------------------------------

    def reject(self, token: str) -> None:
        self._rejected = token

    async def access_token(self, client: httpx.AsyncClient, *, provider: str, model: str) -> str:
        token = self._fresh(self.oauth())
        if token:
            return token
        async with self._lock:  # single flight: waiters find the refreshed token when they get the lock
            entry = self.oauth()
            token = self._fresh(entry)
            if token:
                return token
            return await self._refresh(client, entry, provider=provider, model=model)

    def _login_needed(self, reason: str, *, provider: str, model: str) -> errors.UpstreamAuthError:
        state = self._stat()
        if state is not None:
            self._needs_login = (reason, state)
        return errors.UpstreamAuthError(f"the Claude login needs a human: {reason}; "
                                        + LOGIN_FIX.format(path=self.path), provider=provider, model=model,
                                        code="claude_login_required", upstream_status=401)

    async def _refresh(self, client: httpx.AsyncClient, entry: dict[str, Any] | None, *, provider: str,
                       model: str) -> str:
        if not entry or not entry.get("accessToken"):
            raise self._login_needed(f"{self.path} holds no Claude login", provider=provider, model=model)
        refresh_token = entry.get("refreshToken")
        if not isinstance(refresh_token, str) or not refresh_token:
            raise self._login_needed("the access token expired and there is no refresh token", provider=provider,
                                     model=model)
        body = {"grant_type": "refresh_token", "client_id": self.client_id, "refresh_token": refresh_token}
        try:
            response = await client.post(self.token_url, content=orjson.dumps(body),
                                         headers={"content-type": "application/json",
                                                  "accept": "application/json"},
                                         timeout=httpx.Timeout(30.0, connect=10.0))
        except httpx.HTTPError as exc:
            raise errors.UpstreamUnavailable(f"could not refresh the Claude login ({type(exc).__name__} from the "
                                             f"token endpoint); retry later", provider=provider,
                                             model=model) from None
        self.refreshes += 1
        if response.status_code >= 400:
            reason = _oauth_error(response.content)
            current = self.oauth()  # Claude Code may have rotated the token meanwhile: use its result
            token = self._fresh(current) if current and current.get("refreshToken") != refresh_token else None
            if token:
                return token
            if response.status_code in (400, 401, 403):
                raise self._login_needed(f"the token endpoint refused the refresh (HTTP {response.status_code}"
                                         f"{': ' + reason if reason else ''})", provider=provider, model=model)
            if response.status_code == 429:
                raise errors.UpstreamRateLimited(
                    "the Claude token endpoint is rate limiting refreshes; retry later", provider=provider,
                    model=model, upstream_status=429, retry_after_s=retry_after_seconds(response.headers))
            raise errors.UpstreamUnavailable(f"could not refresh the Claude login (token endpoint HTTP "
                                             f"{response.status_code}); retry later", provider=provider,
                                             model=model, upstream_status=response.status_code)
        try:
            data = orjson.loads(response.content)
            access = data["access_token"]
            expires_in = float(data.get("expires_in") or 3600)
            assert isinstance(access, str) and access
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AssertionError):
            raise errors.UpstreamProtocolError("the Claude token endpoint answered without an access_token",
                                               provider=provider, model=model) from None
        doc = dict(self.document() or {})
        updated = {**entry, "accessToken": access, "expiresAt": int((time.time() + expires_in) * 1000)}
        if isinstance(data.get("refresh_token"), str) and data["refresh_token"]:
            updated["refreshToken"] = data["refresh_token"]
        doc["claudeAiOauth"] = updated
        self._write(doc)
        self._rejected = None
        self._needs_login = None
        return access


def _oauth_error(raw: bytes) -> str:
    """The OAuth error code/description only (never echo a body that could hold tokens)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(data, dict):
        return ""
    error = data.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or "")[:200]
    parts = [str(x) for x in (error, data.get("error_description")) if isinstance(x, str)]
    return " - ".join(parts)[:200]


class ClaudeOAuthProvider(AnthropicProvider):
    """Claude models through a Claude Pro/Max login. Claims ``claude-*`` after the API key (rule_order 21), so the
    key wins when both are set; ``claude-oauth/<model>`` forces this provider."""

    name = "claude-oauth"
    prefixes = ("claude-oauth/",)
    rule_order = 21
    key_env = "SCILLM_CLAUDE_CREDENTIALS"
    base_env = "SCILLM_CLAUDE_API_BASE"

    def __init__(self, env: Mapping[str, str], settings: ProviderSettings | None = None) -> None:
        settings = settings or ProviderSettings()
        self.login = ClaudeLogin(credentials_path(env),
                                 token_url=env.get("SCILLM_CLAUDE_TOKEN_URL") or DEFAULT_TOKEN_URL,
                                 client_id=env.get("SCILLM_CLAUDE_CLIENT_ID") or CLIENT_ID)
        self._key = None
        self.base_url = normalise_base(settings.base_url or env.get(self.base_env) or env.get("ANTHROPIC_API_BASE")
                                       or DEFAULT_BASE)
        self.user_agent = env.get("SCILLM_CLAUDE_USER_AGENT") or None

    def missing_config(self) -> str | None:
        entry = self.login.oauth()
        if entry and entry.get("accessToken"):
            return None
        where = self.login.path or "~/.claude/.credentials.json (HOME is not set)"
        return (f"log in with Claude Code (run `claude`, then `/login`) to create {where}, or set "
                f"SCILLM_CLAUDE_CREDENTIALS to a Claude credentials file")

    def auth_status(self) -> dict[str, Any] | None:
        return self.login.status()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "key_env": [], "credentials": str(self.login.path) if self.login.path else None,
                "token_url": self.login.token_url, "base_env": self.base_env}

    @property
    def messages_url(self) -> str:
        return f"{self.base_url}/v1/messages?beta=true"

    def secrets(self) -> tuple[str | None, ...]:
        return self.login.secrets()

    async def headers(self, route: Route, ctx: CallContext) -> dict[str, str]:
        token = await self.login.access_token(ctx.runtime.client(), provider=self.name, model=route.model)
        headers = {"authorization": f"Bearer {token}", "anthropic-version": ANTHROPIC_VERSION,
                   "anthropic-beta": OAUTH_BETAS, "x-app": "cli", "anthropic-dangerous-direct-browser-access": "true",
                   "content-type": "application/json"}
        if self.user_agent:
            headers["user-agent"] = self.user_agent
        ctx.notes["claude-oauth.token"] = token
        return headers

    def body(self, request: ChatRequest, route: Route) -> dict[str, Any]:
        body = to_messages_body(request, route.model, system_prefix=[{"type": "text", "text": CLAUDE_CODE_SYSTEM}],
                                native_fields=self.native_fields)
        system = body["system"]
        if len(system) > 1 and system[1].get("text") == CLAUDE_CODE_SYSTEM:  # the caller already sent it
            del system[1]
        return body

    def native_body(self, request: ChatRequest, route: Route) -> bytes:
        """The client's body, with Claude Code's identity block put first in ``system`` when the client did not
        send it there (the login is only accepted with it)."""
        assert request.native is not None
        system = request.native.body.get("system")
        blocks = [{"type": "text", "text": system}] if isinstance(system, str) and system else \
            list(system) if isinstance(system, list) else []
        first = blocks[0] if blocks else None
        if isinstance(first, dict) and first.get("text") == CLAUDE_CODE_SYSTEM:
            return request.native.upstream_body(route.model)
        return request.native.upstream_body(route.model,
                                            system=[{"type": "text", "text": CLAUDE_CODE_SYSTEM}, *blocks])

    async def _send(self, request: ChatRequest, route: Route, ctx: CallContext, *, stream: bool,
                    native: bool = False) -> httpx.Response:
        try:
            return await super()._send(request, route, ctx, stream=stream, native=native)
        except errors.UpstreamAuthError:
            token = ctx.notes.get("claude-oauth.token")
            if isinstance(token, str):
                self.login.reject(token)  # refresh before the next call instead of failing until expiry
            raise
