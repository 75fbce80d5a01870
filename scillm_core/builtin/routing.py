"""Model name -> Route, in the order SPEC.md fixes: alias (``[aliases]`` in scillm.toml, then the providers' built-in
aliases such as ``text-deepseek``) -> configured group -> explicit provider prefix (longest wins) -> provider name
rules by ``rule_order``. A group named like an alias is never reached (``shadowed_groups``; ``scillm doctor`` says
so): point an alias at the group instead (``[aliases] text-deepseek = "my-group"``)."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

import attrs

from scillm_core import errors
from scillm_core.registry import Route
from scillm_core.timeouts import Timeouts

if TYPE_CHECKING:
    from scillm_core.context import Runtime

__all__ = ["known_model_names", "model_catalog", "provider_timeouts", "resolve", "shadowed_groups", "timeouts_of"]


def resolve(model: str, runtime: Runtime, *, requested: str | None = None, depth: int = 0) -> Route:
    requested = requested or model
    if depth > 8:
        raise errors.InvalidRequest(f"alias loop while resolving model {requested!r}", param="model")
    config = runtime.config
    providers = runtime.providers
    if model in config.aliases:  # 1. aliases: scillm.toml's, then the providers' built-in ones
        return resolve(config.aliases[model], runtime, requested=requested, depth=depth + 1)
    for provider in providers.values():
        if model in provider.aliases:
            return _route(provider.name, provider.aliases[model], requested, runtime)
    group = config.groups.get(model)  # 2. configured groups: the config fixes their routes, made once
    if group is not None:
        made: dict[tuple[str, str, int], Route] = runtime.plugin_state.setdefault("core.group_routes", {})
        route = made.get((model, requested, depth))
        if route is None:
            where = f"[groups.{model}]"
            routes = [attrs.evolve(r, timeouts=timeouts_of(r, runtime).over(group, where))
                      for m in group.models for r in (resolve(m, runtime, requested=requested, depth=depth + 1),)]
            route = made[(model, requested, depth)] = attrs.evolve(routes[0], requested=requested, group=model,
                                                                   fallbacks=tuple(routes[1:]))
        return route
    prefixed = [(prefix, p) for p in providers.values() for prefix in p.prefixes if model.startswith(prefix)]
    if prefixed:
        _, provider = max(prefixed, key=lambda item: len(item[0]))
        return _route(provider.name, provider.upstream_model(model), requested, runtime)
    claimants = [p for p in providers.by_rule_order() if p.claims(model)]
    if claimants:
        chosen = next((p for p in claimants if p.missing_config() is None), claimants[0])
        return _route(chosen.name, chosen.upstream_model(model), requested, runtime)
    raise _not_found(requested, runtime)


def shadowed_groups(runtime: Runtime) -> dict[str, str]:
    """Configured groups that an alias of the same name hides: ``{group: "alias -> target"}``."""
    shadowed: dict[str, str] = {}
    for name in runtime.config.groups:
        if name in runtime.config.aliases:
            shadowed[name] = f"[aliases] {name} -> {runtime.config.aliases[name]}"
            continue
        owner = next((p for p in runtime.providers.values() if name in p.aliases), None)
        if owner is not None:
            shadowed[name] = f"built-in alias of {owner.name} -> {owner.aliases[name]}"
    return shadowed


def _route(provider: str, model: str, requested: str, runtime: Runtime) -> Route:
    return Route(provider=provider, model=model, requested=requested,
                 timeouts=provider_timeouts(runtime, provider))


def provider_timeouts(runtime: Runtime, name: str) -> Timeouts:
    """The provider's own timeouts with what ``[providers.NAME]`` sets."""
    return runtime.providers[name].timeouts.over(runtime.config.provider_settings(name), f"[providers.{name}]")


def timeouts_of(route: Route, runtime: Runtime) -> Timeouts:
    """``route.timeouts``, or the provider's when a route was built without them."""
    return route.timeouts if route.timeouts is not None else provider_timeouts(runtime, route.provider)


def known_model_names(runtime: Runtime) -> list[str]:
    names = set(runtime.config.aliases) | set(runtime.config.groups)
    for provider in runtime.providers.values():
        names |= set(provider.aliases) | set(provider.known_models())
    return sorted(names)


def model_catalog(runtime: Runtime) -> list[dict[str, Any]]:
    """Every name scillm knows, as ``{"id", "owned_by", "usable", "missing", "reaches"}``: ``usable`` when it
    routes (through the ``route_model`` hook, as a call would) to a configured provider (for a group: any member),
    else ``missing`` says what to set; ``reaches`` is what a key's model list is matched against
    (:attr:`Route.reaches`). ``GET /v1/models`` and ``scillm models`` both show this list, so they agree."""
    providers = runtime.providers
    owners = {name: f"alias:{target}" for name, target in runtime.config.aliases.items()}
    for name in runtime.config.groups:
        owners.setdefault(name, "group")
    for provider in providers.values():
        for name in (*provider.known_models(), *provider.aliases):
            owners.setdefault(name, provider.name)
    catalog = []
    for name in sorted(owners):
        try:
            route = runtime.route(name)
        except errors.ScillmError as exc:
            catalog.append({"id": name, "owned_by": owners[name], "usable": False, "missing": exc.message,
                            "reaches": ()})
            continue
        missing = [providers[r.provider].missing_config() for r in (route, *route.fallbacks)]
        usable = any(m is None for m in missing)
        catalog.append({"id": name, "owned_by": owners[name], "usable": usable,
                        "missing": None if usable else next(m for m in missing if m), "reaches": route.reaches})
    return catalog


def _not_found(model: str, runtime: Runtime) -> errors.ModelNotFound:
    close = difflib.get_close_matches(model, known_model_names(runtime), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    prefixes = sorted({prefix for p in runtime.providers.values() for prefix in p.prefixes})
    return errors.ModelNotFound(
        f"model {model!r} is not routable: no alias, group, provider prefix or name rule matches it.{hint} "
        f"Known prefixes: {', '.join(prefixes) or 'none'}; GET /v1/models (or `scillm models`) lists every name, "
        f"and which ones need a key first.", param="model")
