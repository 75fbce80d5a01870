"""Runners for ``scillm exec``: ``codex-exec``, ``opencode-run``, ``pi``, ``claude-print`` (real agent CLIs,
pinned in tools/agent-clis) and ``llm-call`` (one model call through scillm's own pipeline)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from scillm_agent_runners.base import AgentRunnersConfig, cli_path, cli_version, runner_config
from scillm_agent_runners.clis import run_claude, run_codex, run_opencode, run_pi
from scillm_core import Runtime, hookimpl, run_chat, structure
from scillm_core.models import ChatRequest
from scillm_core.sessions import SessionContext, SessionResult, SessionSpec, SessionThunk

__all__ = ["CLI_PROFILES", "PROFILES"]

CLI_PROFILES: dict[str, tuple[str, Callable[[SessionSpec, SessionContext], Awaitable[SessionResult]]]] = {
    "codex-exec": ("codex", run_codex),
    "opencode-run": ("opencode", run_opencode),
    "pi": ("pi", run_pi),
    "claude-print": ("claude", run_claude),
}
PROFILES = [*CLI_PROFILES, "llm-call"]


@hookimpl
def scillm_config_sections() -> dict[str, type]:
    return {"agent_runners": AgentRunnersConfig}


@hookimpl
def scillm_session_profiles(runtime: Runtime) -> list[str]:
    return list(PROFILES)


@hookimpl
def run_session(spec: SessionSpec, ctx: SessionContext) -> SessionThunk | None:
    if spec.profile in CLI_PROFILES:
        runner = CLI_PROFILES[spec.profile][1]
        return lambda: runner(spec, ctx)
    if spec.profile == "llm-call":
        return lambda: run_llm_call(spec, ctx)
    return None


@hookimpl
def scillm_doctor(runtime: Runtime) -> list[dict[str, Any]]:
    checks = []
    for profile, (binary, _) in CLI_PROFILES.items():
        path = cli_path(runtime, binary)
        version = cli_version(path) if path else None
        checks.append({"check": f"agent CLI {binary} ({profile})", "ok": bool(version),
                       "detail": f"{version} at {path}" if version else
                       (f"{path} does not run" if path else "not installed: run scripts/install-agent-clis")})
    return checks


async def run_llm_call(spec: SessionSpec, ctx: SessionContext) -> SessionResult:
    """A plain model call as a run (for graph nodes): the prompt as one user message, through ``run_chat``."""
    model = spec.model or runner_config(ctx.runtime).default_model
    if not model:
        return SessionResult(run_id=ctx.run_id, status="failed", error="llm-call needs a model")
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": spec.prompt}]}
    if spec.output_schema is not None:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": dict(spec.output_schema)}}
    request = structure(body, ChatRequest)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    call = ctx.call_context(timeout_s=spec.timeout_s, headers={"x-scillm-exec-run": ctx.run_id})
    events = ctx.run_dir / "events.jsonl"

    def record(seq: int, kind: str, payload: dict[str, Any]) -> None:
        rec = {"seq": seq, "ts": round(time.time(), 3), "source": "llm-call", "type": kind, **payload}
        with open(events, "ab") as fh:
            fh.write(orjson.dumps(rec) + b"\n")
        ctx.emit(rec)

    record(1, "request", {"model": model})
    try:
        response = await run_chat(request, call)
    except Exception as exc:  # the error tree renders its own message; never a traceback into artifacts
        record(2, "error", {"error": str(exc)[:1000]})
        return SessionResult(run_id=ctx.run_id, status="failed", error=str(exc)[:1000])
    text = response.text  # type: ignore[union-attr]
    (ctx.run_dir / "stdout.log").write_text(text)
    record(2, "response", {"text": text[:4096], "model": getattr(response, "model", model)})
    return SessionResult(run_id=ctx.run_id, status="completed", exit_code=0, final_text=text)
