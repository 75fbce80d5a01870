"""One runner per CLI: argv, isolated config, sandbox mapping, opt-outs, final-answer extraction."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scillm_exec import run_cli, schema_instructions

from scillm_agent_runners.base import child_env, kill_grace, read_outcome, require, temp_home
from scillm_core.sessions import SessionContext, SessionResult, SessionSpec

__all__ = ["CODEX_OPT_OUTS", "OPENCODE_ENV", "codex_config", "codex_env", "opencode_config", "opencode_env",
           "opencode_permission", "run_claude", "run_codex", "run_opencode", "run_pi"]


def _toml(value: str) -> str:
    # A JSON string is a TOML basic string once it keeps non-ASCII as UTF-8 (TOML has no surrogate-pair escapes)
    # and escapes DEL (JSON leaves it bare; TOML forbids it bare).
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


# -- codex exec ----------------------------------------------------------------------------------------------------

CODEX_OPT_OUTS = ("--disable", "plugins", "--disable", "apps", "--disable", "goals", "--disable", "multi_agent",
                  "--disable", "shell_snapshot",  # it writes the shell's environment, run key included, to disk
                  "-c", "skills.include_instructions=false", "-c", "skills.bundled.enabled=false")


def codex_config(model: str, base_url: str, sandbox: str) -> str:
    """``$CODEX_HOME/config.toml`` for a codex child (``codex exec``, ``codex app-server``) whose model provider is
    this scillm: the run key comes in ``SCILLM_API_KEY`` (and is kept from the commands the agent runs), retries are
    scillm's, telemetry, update checks, web search and the history file are off."""
    return "\n".join([
        f"model = {_toml(model)}",
        'model_provider = "scillm"',
        'approval_policy = "never"',
        f"sandbox_mode = {_toml(sandbox)}",
        "check_for_update_on_startup = false",
        'web_search = "disabled"',
        "[analytics]",
        "enabled = false",
        "[feedback]",
        "enabled = false",
        "[history]",
        'persistence = "none"',
        "[sandbox_workspace_write]",
        "exclude_slash_tmp = true",  # scillm's exec sandbox keeps /tmp read-only; the run's TMPDIR is its own
        "[shell_environment_policy]",
        'exclude = ["SCILLM_API_KEY"]',
        "[model_providers.scillm]",
        'name = "scillm"',
        f"base_url = {_toml(base_url.rstrip('/') + '/v1')}",
        'env_key = "SCILLM_API_KEY"',
        'wire_api = "responses"',
        "request_max_retries = 0",
        "stream_max_retries = 0",
        "",
    ])


def codex_env(cli: str, home: Path, codex_home: Path, api_key: str) -> dict[str, str]:
    """The whole environment of a codex child: :func:`child_env` plus its CODEX_HOME and run key."""
    return child_env(cli, home, {"CODEX_HOME": str(codex_home), "SCILLM_API_KEY": api_key,
                                 "CODEX_DISABLE_TELEMETRY": "1", "OTEL_SDK_DISABLED": "true"})


async def run_codex(spec: SessionSpec, ctx: SessionContext) -> SessionResult:
    cli, model = require(spec, ctx, "codex")
    with temp_home(ctx.run_id) as home:
        codex_home = home / ".codex"
        codex_home.mkdir()
        (codex_home / "config.toml").write_text(codex_config(model, ctx.base_url or "", spec.sandbox))
        argv = [cli, "exec", "--json", "--skip-git-repo-check", "--ephemeral", "--ignore-rules",
                "-s", spec.sandbox, "-C", str(spec.cwd), "-m", model, *CODEX_OPT_OUTS]
        if spec.output_schema is not None:
            schema_file = home / "output_schema.json"
            schema_file.write_text(json.dumps(spec.output_schema))
            argv += ["--output-schema", str(schema_file)]
        argv.append("-")  # the prompt comes on stdin
        env = codex_env(cli, home, codex_home, ctx.api_key or "")
        outcome = await run_cli(argv, spec=spec, ctx=ctx, env=env, cwd=spec.cwd, stdin=spec.prompt.encode(),
                                kill_grace_s=kill_grace(ctx), redact=[ctx.api_key or ""])
    return read_outcome(ctx, outcome, "codex", _read_codex)


def _read_codex(events: list[dict[str, Any]]) -> tuple[str, str | None]:
    text, failure = "", None
    for event in events:
        kind = event.get("type")
        item = event.get("item") if isinstance(event.get("item"), dict) else {}
        if kind == "item.completed" and item.get("type") == "agent_message":
            text = str(item.get("text") or "")
        elif kind == "turn.failed":
            failure = str((event.get("error") or {}).get("message") or "turn failed")
        elif kind == "error" and "Reconnecting" not in str(event.get("message")):
            failure = str(event.get("message"))
    if not any(e.get("type") == "turn.completed" for e in events) and failure is None:
        failure = "codex ended without turn.completed"
    return text, failure


# -- claude -p -----------------------------------------------------------------------------------------------------

async def run_claude(spec: SessionSpec, ctx: SessionContext) -> SessionResult:
    cli, model = require(spec, ctx, "claude")
    tools = "Read,Grep,Glob" if spec.sandbox == "read-only" else "Read,Grep,Glob,Edit,Write"
    mode = "default" if spec.sandbox == "read-only" else "acceptEdits"
    with temp_home(ctx.run_id) as home:
        argv = [cli, "-p", "--bare", "--output-format", "stream-json", "--verbose", "--model", model,
                "--tools", tools, "--permission-mode", mode, "--no-session-persistence",
                "--disable-slash-commands", "--strict-mcp-config"]
        env = child_env(cli, home, {
            "ANTHROPIC_BASE_URL": ctx.base_url or "", "ANTHROPIC_API_KEY": ctx.api_key or "",
            "CLAUDE_CONFIG_DIR": str(home / ".claude"), "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1",
            "DISABLE_BUG_COMMAND": "1", "CLAUDE_CODE_ENABLE_TELEMETRY": "0"})
        prompt = spec.prompt + schema_instructions(spec.output_schema)
        outcome = await run_cli(argv, spec=spec, ctx=ctx, env=env, cwd=spec.cwd, stdin=prompt.encode(),
                                kill_grace_s=kill_grace(ctx), redact=[ctx.api_key or ""])
    return read_outcome(ctx, outcome, "claude", _read_claude)


def _read_claude(events: list[dict[str, Any]]) -> tuple[str, str | None]:
    final = next((e for e in reversed(events) if e.get("type") == "result"), None)
    if final is None:
        return "", "claude ended without a result record"
    failure = None
    if final.get("is_error") or final.get("subtype") != "success":
        failure = f"claude result {final.get('subtype')}: {str(final.get('result') or '')[:300]}"
    return str(final.get("result") or ""), failure


# -- opencode run --------------------------------------------------------------------------------------------------

#: opt-outs every opencode child gets (``opencode run`` and ``opencode serve``): nothing fetched or updated from the
#: internet, no default or external plugins, skills only from its own config dir, and no project config (a
#: repository's opencode.json must not widen permissions or repoint the provider)
OPENCODE_ENV = {"OPENCODE_DISABLE_MODELS_FETCH": "1", "OPENCODE_DISABLE_AUTOUPDATE": "1",
                "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1", "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
                "OPENCODE_DISABLE_EXTERNAL_SKILLS": "1", "OPENCODE_DISABLE_CLAUDE_CODE_SKILLS": "1",
                "OPENCODE_DISABLE_PROJECT_CONFIG": "1", "OPENCODE_PURE": "1"}


def opencode_permission(*, edit: bool, skill: bool = False) -> dict[str, str]:
    """A permission table that never says "ask" (a headless run would block): no shell, no web, nothing outside
    the session directory, no questions or subagents; edits and skills as asked."""
    return {"read": "allow", "glob": "allow", "grep": "allow", "list": "allow", "edit": "allow" if edit else "deny",
            "bash": "deny", "webfetch": "deny", "websearch": "deny", "external_directory": "deny", "task": "deny",
            "question": "deny", "skill": "allow" if skill else "deny", "todowrite": "allow", "doom_loop": "deny",
            "lsp": "deny"}


def opencode_config(base_url: str, model: str, *, permission: Mapping[str, Any], models: Sequence[str] = (),
                    agents: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """OpenCode config whose only provider, ``scillm``, is this scillm (``{base_url}/v1``, key from the child's
    ``SCILLM_API_KEY``): ``model`` is the default, ``models`` the others a session may pick."""
    names = list(dict.fromkeys([model, *models]))
    config: dict[str, Any] = {
        "$schema": "https://opencode.ai/config.json",
        "autoupdate": False,
        "share": "disabled",
        "model": f"scillm/{model}",
        "small_model": f"scillm/{model}",
        "enabled_providers": ["scillm"],
        "provider": {"scillm": {
            "npm": "@ai-sdk/openai-compatible",
            "name": "scillm",
            "options": {"baseURL": base_url.rstrip("/") + "/v1", "apiKey": "{env:SCILLM_API_KEY}"},
            "models": {name: {"name": name, "tool_call": True, "limit": {"context": 128000, "output": 8192}}
                       for name in names},
        }},
        "permission": dict(permission),
    }
    if agents:
        config["agent"] = dict(agents)
    return config


def opencode_env(cli: str, home: Path, api_key: str, config: Mapping[str, Any],
                 extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an opencode child: the base child env, the opt-outs, its config and its scillm key."""
    return child_env(cli, home, {**OPENCODE_ENV, "SCILLM_API_KEY": api_key,
                                 "OPENCODE_CONFIG_CONTENT": json.dumps(config), **(extra or {})})


async def run_opencode(spec: SessionSpec, ctx: SessionContext) -> SessionResult:
    cli, model = require(spec, ctx, "opencode")
    with temp_home(ctx.run_id) as home:
        config = opencode_config(ctx.base_url or "", model,
                                 permission=opencode_permission(edit=spec.sandbox == "workspace-write"))
        env = opencode_env(cli, home, ctx.api_key or "", config)
        prompt = spec.prompt + schema_instructions(spec.output_schema)
        argv = [cli, "run", "--format", "json", "--pure", "--model", f"scillm/{model}", "--agent", "build",
                "--title", f"scillm {ctx.run_id}", "--dir", str(spec.cwd)]
        outcome = await run_cli(argv, spec=spec, ctx=ctx, env=env, cwd=spec.cwd, stdin=prompt.encode(),
                                kill_grace_s=kill_grace(ctx), redact=[ctx.api_key or ""])
    return read_outcome(ctx, outcome, "opencode", _read_opencode)


def _read_opencode(events: list[dict[str, Any]]) -> tuple[str, str | None]:
    texts: list[str] = []
    failure = None
    for event in events:
        part = event.get("part") if isinstance(event.get("part"), dict) else {}
        if event.get("type") == "text":
            texts.append(str(part.get("text") or ""))
        elif event.get("type") == "tool_use":
            texts.clear()  # the answer is the text after the last tool step
        elif event.get("type") == "error":
            failure = json.dumps(event.get("error") or event)[:500]
    if not events and failure is None:
        failure = "opencode printed no events"
    return "".join(texts).strip(), failure


# -- pi ------------------------------------------------------------------------------------------------------------

async def run_pi(spec: SessionSpec, ctx: SessionContext) -> SessionResult:
    cli, model = require(spec, ctx, "pi")
    tools = "read,grep,find,ls" if spec.sandbox == "read-only" else "read,grep,find,ls,edit,write"
    with temp_home(ctx.run_id) as home:
        agent_dir = home / ".pi" / "agent"
        agent_dir.mkdir(parents=True)
        (agent_dir / "models.json").write_text(json.dumps({"providers": {"scillm": {
            "baseUrl": (ctx.base_url or "").rstrip("/") + "/v1", "api": "openai-completions",
            "apiKey": "SCILLM_API_KEY",
            "compat": {"supportsDeveloperRole": False, "supportsReasoningEffort": False},
            "models": [{"id": model, "name": model}]}}}))
        (agent_dir / "settings.json").write_text(json.dumps({"enableInstallTelemetry": False}))
        env = child_env(cli, home, {"PI_CODING_AGENT_DIR": str(agent_dir), "SCILLM_API_KEY": ctx.api_key or "",
                                    "PI_OFFLINE": "1", "PI_TELEMETRY": "0", "PI_SKIP_VERSION_CHECK": "1"})
        prompt = spec.prompt + schema_instructions(spec.output_schema)
        argv = [cli, "--mode", "json", "--provider", "scillm", "--model", model, "--no-session", "--no-skills",
                "--no-extensions", "--no-context-files", "--no-prompt-templates", "--tools", tools]
        outcome = await run_cli(argv, spec=spec, ctx=ctx, env=env, cwd=spec.cwd, stdin=prompt.encode(),
                                kill_grace_s=kill_grace(ctx), redact=[ctx.api_key or ""])
    return read_outcome(ctx, outcome, "pi", _read_pi)


def _read_pi(events: list[dict[str, Any]]) -> tuple[str, str | None]:
    end = next((e for e in reversed(events) if e.get("type") == "agent_end"), None)
    if end is None:
        return "", "pi ended without agent_end"
    text, failure = "", None
    for message in reversed(end.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "assistant":
            text = "".join(c.get("text", "") for c in message.get("content") or []
                           if isinstance(c, dict) and c.get("type") == "text")
            if message.get("stopReason") in ("error", "aborted"):
                failure = f"pi stopped: {message.get('errorMessage') or message.get('stopReason')}"
            break
    return text, failure


