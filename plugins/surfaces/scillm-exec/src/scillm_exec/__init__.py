"""scillm-exec: bounded headless runs of agent CLIs (``POST /v1/scillm/exec``, ``scillm exec``) and graphs of
runs. Runners (``run_session`` implementations) live in other plugins and use :func:`run_cli` from here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scillm_core import CommandRegistry, MiddlewareRegistry, Runtime, SurfaceRegistry, hookimpl
from scillm_exec.auth import RUN_KEY_PREFIX, VIEW_KEY_PREFIX, RunKeys, add_run_key_middleware, run_keys
from scillm_exec.config import ExecConfig, exec_config
from scillm_exec.events import EventLog, resume_after, sse_tail
from scillm_exec.manager import ID, ExecManager, check_cwd, check_fields, find_cycle, parse_final_json
from scillm_exec.process import CliOutcome, end_leftover_group, group_members, kill_group, run_cli, sandboxed
from scillm_exec.routes import base_url_of, manager_for, routes
from scillm_exec.service import ManagedProcess
from scillm_exec.shared import SharedRuns, sse_follow
from scillm_exec.worktree import GitError, Worktree, create_worktree, remove_worktree, reset_worktree, worktree_diff

__all__ = ["ID", "RUN_KEY_PREFIX", "VIEW_KEY_PREFIX", "CliOutcome", "EventLog", "ExecConfig", "ExecManager", "GitError",
           "ManagedProcess", "RunKeys", "Worktree", "add_run_key_middleware", "base_child_env", "base_url_of",
           "check_cwd", "check_fields", "create_worktree", "end_leftover_group", "exec_config", "find_cycle",
           "group_members", "kill_group",
           "manager_for", "parse_final_json", "remove_worktree", "reset_worktree", "run_cli", "run_keys", "sandboxed",
           "resume_after", "schema_instructions", "SharedRuns", "sse_follow", "sse_tail", "worktree_diff"]


def base_child_env(home: str, *, path: str | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a CLI child starts from: nothing inherited but a minimal PATH, locale and its own HOME."""
    env = {"PATH": path or "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
           "TERM": "dumb", "NO_COLOR": "1", "TMPDIR": home, "USER": "scillm", "LOGNAME": "scillm",
           "XDG_CONFIG_HOME": f"{home}/.config", "XDG_DATA_HOME": f"{home}/.local/share",
           "XDG_CACHE_HOME": f"{home}/.cache", "XDG_STATE_HOME": f"{home}/.local/state"}
    env.update(extra or {})
    return env


def schema_instructions(schema: Mapping[str, Any] | None) -> str:
    if schema is None:
        return ""
    import json

    return ("\n\nAnswer with a single JSON value (no prose, no code fence) that matches this JSON Schema:\n"
            + json.dumps(schema, indent=None))


@hookimpl
def scillm_config_sections() -> dict[str, type]:
    return {"exec": ExecConfig}


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    manager = manager_for(runtime)
    for path, endpoint, methods in routes():
        surfaces.route(path, endpoint, methods, plugin="exec")
    surfaces.on_startup(manager.recover)
    surfaces.on_shutdown(manager.shutdown)


@hookimpl
def scillm_register_middleware(middleware: MiddlewareRegistry, runtime: Runtime) -> None:
    add_run_key_middleware(middleware, runtime)


@hookimpl
def scillm_register_commands(commands: CommandRegistry) -> None:
    from scillm_exec.command import configure, run

    commands.add("exec", "run one agent CLI profile headless and bounded (against a running scillm)",
                 configure, run)


@hookimpl
def scillm_health(runtime: Runtime) -> dict[str, Any]:
    manager = manager_for(runtime)
    live = sum(1 for r in manager.runs.values() if r.status in ("queued", "running"))
    return {"exec": {"live_runs": live, "max_concurrency": exec_config(runtime).max_concurrency,
                     "profiles": runtime.hooks.session_profiles(runtime)}}
