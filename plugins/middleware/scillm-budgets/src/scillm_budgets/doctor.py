"""``scillm doctor`` checks: models of configured providers without a price, and keys or teams near a budget."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scillm_keys import keys_of
from scillm_keys.store import identity_from

from scillm_budgets.limiter import windows
from scillm_budgets.pricing import NANO
from scillm_core import Runtime
from scillm_core.state import Count

if TYPE_CHECKING:
    from scillm_budgets import BudgetsState

__all__ = ["checks"]


async def checks(runtime: Runtime, state: BudgetsState) -> list[dict[str, Any]]:
    return [*_pricing(runtime, state), await _budgets(runtime, state)]


def _pricing(runtime: Runtime, state: BudgetsState) -> list[dict[str, Any]]:
    out = []
    for provider in runtime.providers.values():
        if provider.missing_config() is not None:
            continue
        unpriced = []
        for name in provider.known_models():
            if state.prices.lookup(provider.name, provider.upstream_model(name)) is None:
                unpriced.append(name)
        detail = (f"no price for {', '.join(unpriced)}: their calls cost null and a dollar budget refuses them "
                  f'unless [budgets] unpriced = "allow"; set [pricing."{provider.name}/<model>"] in scillm.toml'
                  if unpriced else "every known model has a price")
        out.append({"check": f"pricing {provider.name}", "ok": not unpriced, "detail": detail})
    return out


async def _budgets(runtime: Runtime, state: BudgetsState) -> dict[str, Any]:
    """Keys (and teams) whose spend today or this month passed ``near_limit`` of their budget."""
    keys = keys_of(runtime)
    scopes: list[tuple[str, str, str, Any]] = []
    if keys is not None:
        for doc in await keys.list():
            if not doc.get("revoked_at"):
                identity = identity_from(doc)
                scopes.append(("key", identity.owner, identity.name, identity.limits))
    scopes += [("team", team, team, limits) for team, limits in state.config.teams.items()]
    now = state.clock()
    reads, looked = [], []
    for scope, ident, who, limits in scopes:
        for window in windows(now):
            limit = getattr(limits, f"{window.label}_usd", None)
            if limit is not None:
                reads.append(Count(f"{scope}:{ident}:{window.stem}:spent"))
                looked.append((scope, who, window.label, limit))
    if not reads:
        return {"check": "budgets", "ok": True, "detail": "no key or team has a dollar budget"}
    state.leases.give_back_all()
    values = (await state.counters.count(reads)).values  # after the settlements and returns still queued
    near = [f"{scope} {who}: ${spent / NANO:.2f} of ${limit:.2f} {label} ({spent / NANO / limit:.0%})"
            for (scope, who, label, limit), spent in zip(looked, values, strict=True)
            if spent / NANO >= state.config.near_limit * limit]
    if near:
        return {"check": "budgets", "ok": False, "detail": "near or past their limit: " + "; ".join(near)}
    return {"check": "budgets", "ok": True,
            "detail": f"{len(looked)} budget(s) below {state.config.near_limit:.0%} of their limit"}
