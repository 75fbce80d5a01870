"""Agent sessions: what a surface hands to ``run_session`` and what a runner gives back (see SPEC, Exec)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from attrs import define, field, frozen

from scillm_core.identity import MASTER, Identity, Job

if TYPE_CHECKING:
    from scillm_core.context import CallContext, Runtime

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
    #: The most the run's model calls may cost in total (budget middleware refuses calls past it).
    max_cost_usd: float | None = None


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
    """Per-run state: where artifacts go and how to publish events while the run is live. ``identity`` is the key
    that started the run and ``job`` the run itself: every model call the run makes is charged to them (calls
    through ``base_url`` carry them in the run key; in-process calls use :meth:`call_context`)."""

    runtime: Runtime
    run_id: str
    run_dir: Path
    caller: str | None = None
    emit: Callable[[Mapping[str, Any]], None] = lambda event: None
    #: Where the CLI's own model calls go (this scillm, e.g. ``http://127.0.0.1:4001``) and the short-lived key it
    #: sends there (never the master key or a provider key). ``None`` when the surface has no server to point at.
    base_url: str | None = None
    api_key: str | None = None
    identity: Identity = MASTER
    job: Job | None = None

    def call_context(self, *, timeout_s: float | None = None, headers: Mapping[str, str] | None = None) -> CallContext:
        """The context for a model call this run makes in process (``run_chat``), charged to its key and job, made
        for the run (``parent``: events and traces)."""
        from scillm_core.context import CallContext

        return CallContext(runtime=self.runtime, caller=self.caller, identity=self.identity, job=self.job,
                           headers=dict(headers or {}), deadline=time.monotonic() + timeout_s if timeout_s else None,
                           parent=f"run:{self.run_id}")


SessionThunk: TypeAlias = Callable[[], Awaitable[SessionResult]]
