"""Model name -> Route: alias, then configured group, then explicit provider prefix, then provider name rules."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from scillm_core import errors
from scillm_core.registry import Route

if TYPE_CHECKING:
    from scillm_core.context import Runtime

__all__ = ["known_model_names", "resolve"]


def resolve(model: str, runtime: Runtime, *, requested: str | None = None, depth: int = 0) -> Route:
    requested = requested or model
    if depth > 8:
        raise errors.InvalidRequest(f"alias loop while resolving model {requested!r}", param="model")
    config = runtime.config
    if model in config.aliases:
        return resolve(config.aliases[model], runtime, requested=requested, depth=depth + 1)
    group = config.groups.get(model)
    if group is not None:
        routes = [resolve(m, runtime, requested=requested, depth=depth + 1) for m in group.models]
        first = routes[0]
        return Route(provider=first.provider, model=first.model, requested=requested, group=model,
                     fallbacks=tuple(r for r in routes[1:]), timeout_s=group.timeout_s or first.timeout_s)
    providers = runtime.providers
    for provider in providers.values():
        if model in provider.aliases:
            return _route(provider.name, provider.aliases[model], requested, runtime)
    prefixed = [(prefix, p) for p in providers.values() for prefix in p.prefixes if model.startswith(prefix)]
    if prefixed:
        _, provider = max(prefixed, key=lambda item: len(item[0]))
        return _route(provider.name, provider.upstream_model(model), requested, runtime)
    claimants = [p for p in providers.by_rule_order() if p.claims(model)]
    if claimants:
        chosen = next((p for p in claimants if p.missing_config() is None), claimants[0])
        return _route(chosen.name, chosen.upstream_model(model), requested, runtime)
    raise _not_found(requested, runtime)


def _route(provider: str, model: str, requested: str, runtime: Runtime) -> Route:
    timeout = runtime.config.provider_settings(provider).timeout_s
    return Route(provider=provider, model=model, requested=requested, timeout_s=timeout)


def known_model_names(runtime: Runtime) -> list[str]:
    names = set(runtime.config.aliases) | set(runtime.config.groups)
    for provider in runtime.providers.values():
        names |= set(provider.aliases) | set(provider.known_models())
    return sorted(names)


def _not_found(model: str, runtime: Runtime) -> errors.ModelNotFound:
    close = difflib.get_close_matches(model, known_model_names(runtime), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    prefixes = sorted({prefix for p in runtime.providers.values() for prefix in p.prefixes})
    return errors.ModelNotFound(
        f"model {model!r} is not routable: no alias, group, provider prefix or name rule matches it.{hint} "
        f"Known prefixes: {', '.join(prefixes) or 'none'}; see GET /v1/models.", param="model")
