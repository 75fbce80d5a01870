"""The plugin manager: one per app (and per test), loading the ``scillm`` entry-point group by policy.

Policy: entry points load sorted by name; two distributions claiming one name is an error; names in
``SCILLM_DISABLE_PLUGINS`` (or ``[plugins] disable``) are skipped; a plugin whose *dependency* is missing is
skipped with the reason logged; any other load error stops startup naming the distribution and how to disable
it. ``async def`` hook implementations are rejected at registration.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any, Literal

import pluggy
from attrs import define, field

from scillm_core import hookspecs

__all__ = ["PluginInfo", "PluginLoadError", "ScillmPluginManager", "build_plugin_manager"]

log = logging.getLogger("scillm.plugins")
ENTRY_POINT_GROUP = "scillm"


class PluginLoadError(Exception):
    """A plugin could not be loaded and startup must stop."""


@define
class PluginInfo:
    name: str
    distribution: str | None = None
    version: str | None = None
    status: Literal["loaded", "disabled", "skipped", "builtin"] = "loaded"
    reason: str | None = None
    hooks: list[str] = field(factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "distribution": self.distribution, "version": self.version,
                "status": self.status, "reason": self.reason, "hooks": self.hooks}


class ScillmPluginManager(pluggy.PluginManager):
    def __init__(self) -> None:
        super().__init__("scillm")
        self.generation = 0  # bumped on every (un)registration: the Hooks facade recompiles its chains
        self.add_hookspecs(hookspecs)

    def register(self, plugin: object, name: str | None = None) -> str | None:
        self.generation += 1
        return super().register(plugin, name)

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any | None:
        self.generation += 1
        return super().unregister(plugin, name)

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is not None:
            fn = getattr(plugin, name)
            if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
                raise pluggy.PluginValidationError(
                    plugin,
                    f"hook implementation {name!r} in {getattr(plugin, '__name__', plugin)!r} is 'async def'. "
                    "scillm hooks are plain 'def': return a zero-argument async callable (a thunk) instead, "
                    "because pluggy would treat the coroutine as a result and never await it.",
                )
        return opts

    def hooks_of(self, plugin: object) -> list[str]:
        return sorted(hc.name for hc in self.get_hookcallers(plugin) or [])


def build_plugin_manager(*, plugins: Sequence[tuple[str, object]] | None = None, entry_points: bool = True,
                         disabled: Iterable[str] = (), only: Iterable[str] | None = None,
                         ) -> tuple[ScillmPluginManager, list[PluginInfo]]:
    """A fresh manager with core's builtins, then entry points (unless ``entry_points=False``), then ``plugins``.

    ``disabled`` blocks entry points by name; ``only`` (tests, isolation) loads no entry point outside it.
    """
    from scillm_core.builtin import core_plugin

    pm = ScillmPluginManager()
    infos: list[PluginInfo] = []
    blocked = {name.strip() for name in disabled if name.strip()}
    allowed = None if only is None else set(only)

    pm.register(core_plugin, name="scillm.core")
    infos.append(PluginInfo("scillm.core", "scillm", _version("scillm"), "builtin", hooks=pm.hooks_of(core_plugin)))

    if entry_points:
        for ep, dist in _entry_points():
            if ep.name in blocked or (allowed is not None and ep.name not in allowed):
                reason = "disabled by configuration" if ep.name in blocked else "not selected"
                infos.append(PluginInfo(ep.name, dist, _version(dist), "disabled", reason))
                pm.set_blocked(ep.name)
                continue
            module, skip_reason = _load(ep, dist)
            if module is None:
                infos.append(PluginInfo(ep.name, dist, _version(dist), "skipped", skip_reason))
                continue
            _register(pm, module, ep.name, dist)
            infos.append(PluginInfo(ep.name, dist, _version(dist), hooks=pm.hooks_of(module)))

    for name, plugin in plugins or ():
        if name in blocked:
            infos.append(PluginInfo(name, None, None, "disabled", "disabled by configuration"))
            continue
        _register(pm, plugin, name, None)
        infos.append(PluginInfo(name, None, None, hooks=pm.hooks_of(plugin)))
    return pm, infos


def _entry_points() -> list[tuple[importlib.metadata.EntryPoint, str]]:
    found: dict[str, tuple[importlib.metadata.EntryPoint, str]] = {}
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP:
                continue
            dist_name = dist.metadata["Name"]
            if ep.name in found and found[ep.name][1] != dist_name:
                raise PluginLoadError(
                    f"plugin name {ep.name!r} is claimed by two distributions: {found[ep.name][1]} and {dist_name}. "
                    "Uninstall one of them.")
            found[ep.name] = (ep, dist_name)
    return [found[name] for name in sorted(found)]


def _load(ep: importlib.metadata.EntryPoint, dist: str) -> tuple[ModuleType | None, str | None]:
    """(module, None) when loaded; (None, reason) when a dependency is missing; raises on anything else."""
    own_package = ep.value.split(":")[0].split(".")[0]
    try:
        return ep.load(), None
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing and missing != own_package:
            reason = f"optional dependency {exc.name!r} is not installed"
            log.warning("plugin %s (%s) skipped: %s", ep.name, dist, reason)
            return None, reason
        raise PluginLoadError(_load_failure(ep.name, dist, exc)) from exc
    except Exception as exc:
        raise PluginLoadError(_load_failure(ep.name, dist, exc)) from exc


def _load_failure(name: str, dist: str, exc: BaseException) -> str:
    return (f"plugin {name!r} from distribution {dist} failed to load: {type(exc).__name__}: {exc}. "
            f"Fix or uninstall it, or start with SCILLM_DISABLE_PLUGINS={name}.")


def _register(pm: ScillmPluginManager, plugin: object, name: str, dist: str | None) -> None:
    try:
        pm.register(plugin, name=name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        where = f" from distribution {dist}" if dist else ""
        raise PluginLoadError(f"plugin {name!r}{where} is invalid: {exc}") from exc


def _version(dist: str | None) -> str | None:
    if not dist:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
