"""``[agents.<name>]`` (one table per standing worker) and ``[standing_agents]`` (limits for all of them)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from attrs import field, frozen, validators

if TYPE_CHECKING:
    from scillm_core import Runtime

__all__ = ["NAME", "StandingAgentsConfig", "WorkerConfig", "settings", "workers"]

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # worker names: URL path segments and directory names
_positive = validators.gt(0.0)


@frozen(kw_only=True)
class WorkerConfig:
    #: The git repository (or a directory inside one) the worker works on; it edits a worktree of it, never it.
    repository: str
    #: The scillm model the worker's codex calls (a codex slug such as ``gpt-5.5`` gives codex its tool set).
    model: str
    #: The commit the worker's worktree starts from.
    base_ref: str = "HEAD"
    sandbox: str = field(default="read-only", validator=validators.in_(("read-only", "workspace-write")))
    #: Developer instructions for every turn of the worker's thread.
    instructions: str = ""
    description: str = ""
    #: A turn running longer is interrupted (then its process group killed) and reported as ``timeout``.
    turn_timeout_s: float = field(default=1800.0, validator=_positive)
    #: A worker process without a turn for this long is stopped; its thread resumes on the next turn.
    idle_timeout_s: float = field(default=900.0, validator=_positive)


@frozen(kw_only=True)
class StandingAgentsConfig:
    #: ``codex app-server`` processes alive at once; starting another stops the longest-idle one first.
    max_live: int = field(default=4, validator=validators.ge(1))
    #: Lease TTL when a lease request names none, and the most a lease may ask for.
    lease_ttl_s: float = field(default=600.0, validator=_positive)
    max_lease_ttl_s: float = field(default=86400.0, validator=_positive)
    #: Handoffs one key may keep on one worker (each up to a few hundred KiB); past it a new one is a 409.
    max_handoffs_per_key: int = field(default=1000, validator=validators.ge(1))
    #: A handoff is forgotten this long after it was posted (as if deleted: 404, no longer counted against
    #: ``max_handoffs_per_key``; its turns' results stay); ``0`` keeps handoffs until they are deleted.
    handoff_lifetime_days: float = field(default=7.0, validator=validators.ge(0.0))

    @property
    def handoff_ttl_s(self) -> float | None:
        """The handoffs' lifetime as the state store's document expiry (``None``: none)."""
        return self.handoff_lifetime_days * 86400.0 or None


def workers(runtime: Runtime) -> Mapping[str, WorkerConfig]:
    return runtime.config.sections.get("agents") or {}  # type: ignore[no-any-return]


def settings(runtime: Runtime) -> StandingAgentsConfig:
    return runtime.config.sections.get("standing_agents") or StandingAgentsConfig()  # type: ignore[no-any-return]
