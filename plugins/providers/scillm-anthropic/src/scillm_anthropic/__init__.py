"""Anthropic Messages providers: ``anthropic`` (API key) and ``claude-oauth`` (Claude Pro/Max login), plus the
OpenAI <-> Messages translation other plugins may reuse (everything in ``__all__`` is public API)."""

from __future__ import annotations

from scillm_anthropic.oauth import CLAUDE_CODE_SYSTEM, OAUTH_BETAS, ClaudeLogin, ClaudeOAuthProvider, credentials_path
from scillm_anthropic.provider import ANTHROPIC_VERSION, AnthropicProvider, normalise_base
from scillm_anthropic.translate import (
    ANSWER_TOOL,
    DEFAULT_MAX_TOKENS,
    EFFORTS,
    FEATURES_FROM,
    FINISH_REASONS,
    THINKING_BUDGETS,
    StreamTranslator,
    answer_tool,
    claude_version,
    effort_for,
    error_from_event,
    error_from_status,
    from_messages_response,
    parse_error_body,
    predates,
    sanitize_tool_call_id,
    takes,
    to_messages_body,
    usage_from_anthropic,
)
from scillm_core import ProviderRegistry, Runtime, hookimpl

__all__ = ["ANSWER_TOOL", "ANTHROPIC_VERSION", "CLAUDE_CODE_SYSTEM", "DEFAULT_MAX_TOKENS", "EFFORTS", "FEATURES_FROM",
           "FINISH_REASONS", "OAUTH_BETAS", "THINKING_BUDGETS", "AnthropicProvider", "ClaudeLogin",
           "ClaudeOAuthProvider", "StreamTranslator", "answer_tool", "claude_version", "credentials_path",
           "effort_for", "error_from_event", "error_from_status", "from_messages_response", "normalise_base",
           "parse_error_body", "predates", "sanitize_tool_call_id", "takes", "to_messages_body",
           "usage_from_anthropic"]


@hookimpl
def scillm_register_providers(providers: ProviderRegistry, runtime: Runtime) -> None:
    providers.add(AnthropicProvider(runtime.env, runtime.config.provider_settings("anthropic")))
    providers.add(ClaudeOAuthProvider(runtime.env, runtime.config.provider_settings("claude-oauth")))


@hookimpl
def scillm_doctor(runtime: Runtime) -> list[dict[str, object]]:
    """The Claude login's health (no login is fine: it is optional next to ANTHROPIC_API_KEY)."""
    provider = runtime.providers.get("claude-oauth")
    if not isinstance(provider, ClaudeOAuthProvider):
        return []
    status = provider.login.status()
    ok = status["status"] in ("valid", "expired")  # expired: refreshed on the next request
    detail = f"{status['status']} ({status['source'] or 'HOME not set'})"
    if status.get("expires_in_s") is not None:
        detail += f", access token expires in {status['expires_in_s']}s"
    if status["status"] == "needs_login":
        detail += f"; {status.get('fix', 'run `claude`, then `/login`')}"
    # no login is fine (optional next to ANTHROPIC_API_KEY): not ok, not a failure; a broken one is a failure
    return [{"check": "claude login", "ok": ok, "required": status["status"] == "needs_login", "detail": detail}]
