"""Who is calling, and for what: the identity authentication resolved and the batch or run a call belongs to.

Authentication middleware puts an :class:`Identity` in the ASGI scope (``scope["scillm.identity"]``); surfaces
read it with :func:`identity_of` and carry it on the :class:`~scillm_core.CallContext`, so middleware (budgets,
limits) and the call log see it on every call, whichever surface started it. Anything a caller creates (batches,
runs, sessions) records ``identity.owner``; reading or controlling it later goes through :func:`require_visible`,
which answers 404 to every other virtual key, as if it did not exist, while the master key sees everything.

A :class:`Job` is the batch or agent run a call is made for: spend is attributed to it and capped by its
``max_cost_usd``. Batches set it on their calls' contexts; agent runs carry it (and their owner's identity)
through their run keys, so the model calls a CLI child makes are charged to the key that started the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Literal

from attrs import define, field, frozen

from scillm_core import errors

if TYPE_CHECKING:
    from starlette.requests import Request

    from scillm_core.context import Runtime

__all__ = ["MASTER", "MASTER_OWNER", "Identity", "Job", "identity_of", "job_of", "max_cost_of", "owner_identity",
           "require_visible"]

MASTER_OWNER = "master"


@frozen(kw_only=True)
class Identity:
    """The caller a key resolved to. ``owner`` is what records carry: ``"master"`` for the master (and dev) key,
    else the virtual key's id (never its secret). ``models`` limits which models and groups it may call
    (``None``: any); ``limits`` is the auth plugin's per-key limit object, which limit middleware reads;
    ``version`` lets the auth plugin tell a stale cached identity from the stored key."""

    owner: str = MASTER_OWNER
    name: str = MASTER_OWNER
    team: str | None = None
    models: tuple[str, ...] | None = None
    limits: Any = None
    version: int = 0

    @property
    def master(self) -> bool:
        return self.owner == MASTER_OWNER

    def may_call(self, *names: str | None) -> bool:
        """Whether one of ``names`` (a requested model, or the group or model it routes to) is among the models
        this key may call (``fnmatch`` patterns; any name when the key is not restricted)."""
        if self.models is None:
            return True
        return any(fnmatchcase(name, pattern) for name in names if name for pattern in self.models)

    def can_see(self, owner: str | None) -> bool:
        """Whether this caller may read or control something recorded with ``owner`` (records from before
        ownership existed have none: the master key's alone)."""
        return self.master or (owner is not None and owner == self.owner)

    def public(self) -> dict[str, Any]:
        """What may be shown about this identity (never a secret)."""
        return {"key_id": None if self.master else self.owner, "name": self.name, "team": self.team}


MASTER = Identity()


@define(kw_only=True)
class Job:
    """The batch or agent run calls are made for. ``max_cost_usd`` caps what its calls may spend in total (budget
    middleware refuses a call whose reservation would pass it); ``spent_usd`` and ``unpriced_calls`` accumulate
    what its calls cost in this process, for its result. ``on_exceeded`` is called once, with the reason, when a
    call is refused for the ceiling (an exec run stops itself)."""

    kind: Literal["batch", "run"]
    id: str
    owner: str = MASTER_OWNER
    max_cost_usd: float | None = None
    spent_usd: float = 0.0
    unpriced_calls: int = 0
    exceeded: str | None = None
    on_exceeded: Callable[[str], None] | None = field(default=None, repr=False)

    @property
    def cost_usd(self) -> float | None:
        """What its calls cost, or ``None`` when one of them had no known price."""
        return None if self.unpriced_calls else round(self.spent_usd, 9)

    def add_cost(self, usd: float | None) -> None:
        if usd is None:
            self.unpriced_calls += 1
        else:
            self.spent_usd += usd

    def exceed(self, reason: str) -> None:
        if self.exceeded is None:
            self.exceeded = reason
            if self.on_exceeded is not None:
                self.on_exceeded(reason)


def max_cost_of(value: Any, param: str) -> float | None:
    """A request's ``max_cost_usd`` (a batch's or agent run's ceiling): ``None`` when absent, else a positive number
    of dollars; a 400 naming ``param`` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
        raise errors.InvalidRequest(f"max_cost_usd must be a positive number of dollars @ {param}", param=param)
    return float(value)


def identity_of(request: Request | Mapping[str, Any]) -> Identity:
    """The caller's identity (from a Starlette request or an ASGI scope); the master identity when no
    authentication plugin set one (auth switched off: the server is open)."""
    scope = request if isinstance(request, Mapping) else request.scope
    identity = scope.get("scillm.identity")
    return identity if isinstance(identity, Identity) else MASTER


def job_of(request: Request | Mapping[str, Any]) -> Job | None:
    """The job a request's calls belong to (set from an agent run's key), or ``None``."""
    scope = request if isinstance(request, Mapping) else request.scope
    job = scope.get("scillm.job")
    return job if isinstance(job, Job) else None


def require_visible(identity: Identity, owner: str | None, what: str) -> None:
    """Raise 404 ``no <what>`` unless ``identity`` may see something owned by ``owner``: the same answer as for
    something that does not exist, so one key cannot even learn that another key's batch or run exists."""
    if not identity.can_see(owner):
        raise errors.NotFound(f"no {what}")


async def owner_identity(runtime: Runtime, owner: str | None, known: Identity | None = None) -> Identity:
    """The identity of ``owner`` as it is now, for work a key started that runs later or in another process (a
    batch item another instance takes, a run recovered after a restart): the key plugin's current view of that key
    (``runtime.plugin_state["keys"]``; a 401 :class:`~scillm_core.errors.ScillmError` once it was revoked or
    expired), the master identity for the master key's work. With ``known`` (the identity the work started with),
    an unchanged key costs one version read instead of a document read."""
    if not owner or owner == MASTER_OWNER:
        return MASTER
    keys = runtime.plugin_state.get("keys")
    if keys is None:
        return Identity(owner=owner, name=owner)
    if known is not None and known.owner == owner:
        return await keys.verify(known)  # type: ignore[no-any-return]
    return await keys.identity(owner)  # type: ignore[no-any-return]
