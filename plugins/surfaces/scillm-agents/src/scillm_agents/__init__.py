"""scillm-agents: standing Codex workers (``/v1/scillm/agents/*``). Each worker declared as ``[agents.<name>]`` is
a long-lived ``codex app-server`` in its own git worktree that a project agent leases, hands goals to, runs turns
on, steers and interrupts, and reads results and diffs from; leases, handoffs, threads and results live in the
state store."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scillm_agent_runners.base import cli_path

from scillm_agents.config import NAME, StandingAgentsConfig, WorkerConfig, workers
from scillm_agents.routes import routes
from scillm_agents.service import Agents, agents_of
from scillm_core import Runtime, SurfaceRegistry, hookimpl

__all__ = ["Agents", "StandingAgentsConfig", "WorkerConfig", "agents_of"]


@hookimpl
def scillm_config_sections() -> dict[str, Any]:
    return {"agents": Mapping[str, WorkerConfig], "standing_agents": StandingAgentsConfig}


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    for name in workers(runtime):
        if not NAME.match(name):
            raise ValueError(f"[agents.{name}]: a worker name is 1-64 letters, digits or ._- (it is a URL segment "
                             "and a directory name)")
    if workers(runtime) and not any(p.name == "exec" and p.status == "loaded" for p in runtime.plugins):
        raise ValueError("standing agents need the exec plugin (its run keys let a worker's codex call scillm); "
                         "it is disabled or not installed")
    agents = agents_of(runtime)
    for path, endpoint, methods in routes():
        surfaces.route(path, endpoint, methods, plugin="agents")
    surfaces.on_shutdown(agents.shutdown)


@hookimpl
def scillm_health(runtime: Runtime) -> dict[str, Any]:
    return {"agents": agents_of(runtime).health()}


@hookimpl
def scillm_doctor(runtime: Runtime) -> list[dict[str, Any]]:
    declared = workers(runtime)
    if not declared:
        return []
    codex = cli_path(runtime, "codex")
    checks = [{"check": "standing agents: codex CLI", "ok": codex is not None,
               "detail": codex or "missing: run scripts/install-agent-clis"}]
    for name, cfg in declared.items():
        repo = Path(cfg.repository).expanduser()
        ok = repo.is_absolute() and repo.is_dir()
        checks.append({"check": f"standing agent {name}", "ok": ok,
                       "detail": f"{cfg.repository} ({cfg.sandbox}, model {cfg.model})" if ok else
                       f"agents.{name}.repository {cfg.repository!r} is not an existing absolute directory"})
    return checks
