"""The ``[exec]`` table of scillm.toml."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from attrs import field, frozen, validators

if TYPE_CHECKING:
    from scillm_core import Runtime

__all__ = ["ExecConfig", "allowed_roots", "exec_config"]


@frozen(kw_only=True)
class ExecConfig:
    #: Directories a run's ``cwd`` must lie in (after resolving symlinks). Empty: ``SCILLM_EXEC_ROOTS``
    #: (os.pathsep-separated), else the server's working directory.
    allowed_roots: tuple[str, ...] = ()
    #: Runs at once (further runs queue); graph nodes also obey the graph's own ``max_concurrency``.
    max_concurrency: int = 4
    #: Runs one key may have queued or running at once (a graph counts its own ``max_concurrency``, capped by
    #: this); more is a 429. ``None``: no limit. Slots go round-robin between keys whatever this is.
    max_runs_per_key: int | None = field(default=32, validator=validators.optional(validators.ge(1)))
    max_timeout_s: float = 3600.0
    default_timeout_s: float = 600.0
    #: SIGTERM -> SIGKILL grace when a run's process group is killed.
    kill_grace_s: float = 2.0
    #: The URL a CLI child uses to reach this scillm; default: the address the request came in on.
    base_url: str | None = None
    heartbeat_s: float | None = None
    #: Enforce ``sandbox`` with a read-only mount namespace around the CLI (Linux; root, or unprivileged user
    #: namespaces). ``false`` leaves it to the CLI's own flag, for hosts where namespaces are unavailable.
    enforce_sandbox: bool = True


def exec_config(runtime: Runtime) -> ExecConfig:
    try:
        return runtime.config.section("exec")  # type: ignore[no-any-return]
    except KeyError:
        return ExecConfig()


def allowed_roots(runtime: Runtime) -> list[Path]:
    cfg = exec_config(runtime)
    raw = list(cfg.allowed_roots)
    if not raw:
        env = runtime.env.get("SCILLM_EXEC_ROOTS") or ""
        raw = [p for p in env.split(os.pathsep) if p]
    if not raw:
        raw = [os.getcwd()]
    return [Path(p).expanduser().resolve() for p in raw]
