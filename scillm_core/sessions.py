"""Agent sessions: what a surface hands to ``run_session`` and what a runner gives back (see SPEC, Exec)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from attrs import define, field, frozen

if TYPE_CHECKING:
    from scillm_core.context import Runtime

__all__ = ["SessionContext", "SessionResult", "SessionSpec", "SessionStatus", "SessionThunk"]

SessionStatus = Literal["completed", "failed", "timeout", "cancelled"]


@frozen(kw_only=True)
class SessionSpec:
    profile: str
    prompt: str
    cwd: str | None = None
    sandbox: Literal["read-only", "workspace-write"] = "read-only"
    model: str | None = None
    timeout_s: float = 600.0
    idle_timeout_s: float | None = None
    output_schema: Mapping[str, Any] | None = None
    metadata: Mapping[str, Any] = field(factory=dict)


@frozen(kw_only=True)
class SessionResult:
    run_id: str
    status: SessionStatus
    exit_code: int | None = None
    final_text: str = ""
    result: Any = None
    artifacts: Mapping[str, str] = field(factory=dict)
    error: str | None = None


@define(kw_only=True)
class SessionContext:
    """Per-run state: where artifacts go and how to publish events while the run is live."""

    runtime: Runtime
    run_id: str
    run_dir: Path
    caller: str | None = None
    emit: Callable[[Mapping[str, Any]], None] = lambda event: None
    #: Where the CLI's own model calls go (this scillm, e.g. ``http://127.0.0.1:4001``) and the short-lived key it
    #: sends there (never the master key or a provider key). ``None`` when the surface has no server to point at.
    base_url: str | None = None
    api_key: str | None = None


SessionThunk: TypeAlias = Callable[[], Awaitable[SessionResult]]
