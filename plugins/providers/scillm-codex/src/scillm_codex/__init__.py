"""Codex provider: GPT models through the ChatGPT login that ``codex login`` stores in ``~/.codex/auth.json``.

Routes: ``codex/<model>``; bare ``codex*`` names; ``gpt-*`` and ``o1``/``o3``/``o4`` names only while a login exists
(``rule_order`` 25, ahead of the openai provider). Environment: ``SCILLM_CODEX_AUTH`` (auth file),
``CODEX_API_BASE`` (default https://chatgpt.com/backend-api/codex), ``SCILLM_CODEX_TOKEN_URL`` (OAuth refresh).
"""

from __future__ import annotations

from scillm_codex.auth import CodexAuth, Login
from scillm_codex.provider import DEFAULT_BASE, CodexProvider, auth_path
from scillm_core import ProviderRegistry, Runtime, hookimpl

__all__ = ["DEFAULT_BASE", "CodexAuth", "CodexProvider", "Login", "auth_path"]


@hookimpl
def scillm_register_providers(providers: ProviderRegistry, runtime: Runtime) -> None:
    providers.add(CodexProvider(runtime.env, runtime.config.provider_settings("codex")))


@hookimpl
def scillm_doctor(runtime: Runtime) -> list[dict[str, object]]:
    provider = runtime.providers.get("codex")
    if not isinstance(provider, CodexProvider):
        return []
    status = provider.auth_status()
    ok = status["status"] in ("ok", "expiring", "expired")
    detail = f"{status['status']} ({status['source']})"
    if status.get("expires_in_s") is not None:
        detail += f", access token expires in {status['expires_in_s']}s"
    if not ok:
        detail += "; run `codex login`"
    return [{"check": "codex login", "ok": ok, "required": status["status"] == "login_required", "detail": detail}]
