"""The ``[opencode]`` table of scillm.toml (OpenCode serve runs, the transport and the managed ``opencode serve``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrs import field, frozen

if TYPE_CHECKING:
    from scillm_core import Runtime

__all__ = ["OpenCodeConfig", "enabled", "opencode_config", "skill_roots"]

DEBUGGER_SKILLS = ("debugger", "memory", "scillm")


@frozen(kw_only=True)
class OpenCodeConfig:
    #: Switches the surfaces on. Default off; ``SCILLM_OPENCODE_SERVE_ENABLED=1`` also switches them on.
    enabled: bool = False
    #: An existing server to use instead of starting one (default ``OPENCODE_SERVER_URL``); its password comes from
    #: ``OPENCODE_SERVER_PASSWORD`` (user ``OPENCODE_SERVER_USERNAME``, default ``opencode``).
    server_url: str | None = None
    #: The scillm model sessions use when a request names none (default ``SCILLM_OPENCODE_SERVE_DEFAULT_MODEL``,
    #: else ``agent_runners.default_model``). The managed server's only provider is this scillm.
    model: str | None = None
    #: Further scillm models a request may pick with ``model`` (the managed server lists exactly these).
    models: tuple[str, ...] = ()
    default_timeout_s: float = 600.0
    max_timeout_s: float = 3600.0
    #: OpenCode sessions running at once (serve runs and transport nodes together); more wait for a slot.
    max_concurrency: int = 4
    #: Keep each run's git worktree (``<data_dir>/opencode/worktrees/<run_id>``) for inspection (default: removed;
    #: diff.patch stays).
    keep_worktrees: bool = False
    #: Where requested skills are looked up (``<root>/<name>/SKILL.md``). Empty: ``SCILLM_OPENCODE_SKILL_ROOTS``
    #: (os.pathsep-separated), else ``~/.config/opencode/skills``, ``~/.claude/skills``, ``~/.agents/skills``.
    skill_roots: tuple[str, ...] = ()
    #: Overrides of the managed server's permission table (never ``ask`` unless a client answers permissions).
    permission: dict[str, Any] = field(factory=dict)
    #: Seconds to wait for ``opencode serve`` to say it listens.
    start_timeout_s: float = 60.0
    #: SSE heartbeats; default ``server.heartbeat_s``.
    heartbeat_s: float | None = None
    #: How long a monitor link (a read-only key for one run) stays valid.
    monitor_ttl_s: float = 24 * 3600.0
    #: The debugger flow: its OpenCode agent (defined in the managed server) and default skills.
    debugger_agent: str = "scillm-debugger"
    debugger_skills: tuple[str, ...] = DEBUGGER_SKILLS


def opencode_config(runtime: Runtime) -> OpenCodeConfig:
    try:
        return runtime.config.section("opencode")  # type: ignore[no-any-return]
    except KeyError:
        return OpenCodeConfig()


def enabled(runtime: Runtime) -> bool:
    flag = (runtime.env.get("SCILLM_OPENCODE_SERVE_ENABLED") or "").strip().lower()
    return opencode_config(runtime).enabled or flag in ("1", "true", "yes", "on")


def skill_roots(runtime: Runtime) -> list[Path]:
    raw = list(opencode_config(runtime).skill_roots)
    if not raw:
        raw = [p for p in (runtime.env.get("SCILLM_OPENCODE_SKILL_ROOTS") or "").split(os.pathsep) if p]
    if not raw:
        home = Path.home()
        raw = [str(home / ".config" / "opencode" / "skills"), str(home / ".claude" / "skills"),
               str(home / ".agents" / "skills")]
    return [Path(p).expanduser() for p in raw]
