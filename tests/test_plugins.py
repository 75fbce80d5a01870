"""Plugin manager policy: load order, duplicates, disabling, optional dependencies, async hooks."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import pluggy
import pytest

from scillm_core import hookimpl
from scillm_core.plugins import PluginLoadError, ScillmPluginManager, build_plugin_manager
from scillm_core.testing import make_app


class FakeEntryPoint:
    def __init__(self, name: str, value: str, loader) -> None:
        self.name, self.value, self.group, self._loader = name, value, "scillm", loader

    def load(self):
        return self._loader()


class FakeDist:
    def __init__(self, name: str, *eps: FakeEntryPoint) -> None:
        self.metadata = {"Name": name}
        self.entry_points = list(eps)


def module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


@pytest.fixture
def dists(monkeypatch):
    found: list[FakeDist] = []
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: list(found))
    return found


def test_entry_points_load_sorted_by_name(dists):
    order = []
    for name in ("zeta", "alpha", "mid"):
        dists.append(FakeDist(f"dist-{name}", FakeEntryPoint(name, f"pkg_{name}",
                                                             lambda n=name: order.append(n) or module(n))))
    _, infos = build_plugin_manager()
    assert order == ["alpha", "mid", "zeta"]
    assert [i.name for i in infos] == ["scillm.core", "alpha", "mid", "zeta"]


def test_two_distributions_claiming_one_name_is_an_error(dists):
    dists.append(FakeDist("scillm-a", FakeEntryPoint("same", "a", lambda: module("a"))))
    dists.append(FakeDist("scillm-b", FakeEntryPoint("same", "b", lambda: module("b"))))
    with pytest.raises(PluginLoadError, match="claimed by two distributions: scillm-a and scillm-b"):
        build_plugin_manager()


def test_disabled_plugins_are_not_loaded(dists):
    loaded = []
    dists.append(FakeDist("scillm-x", FakeEntryPoint("x", "x", lambda: loaded.append(1) or module("x"))))
    _, infos = build_plugin_manager(disabled=["x"])
    assert not loaded
    assert infos[-1].status == "disabled"


def test_missing_optional_dependency_skips_with_reason(dists, caplog):
    def load():
        raise ModuleNotFoundError("No module named 'redis'", name="redis")

    dists.append(FakeDist("scillm-cachey", FakeEntryPoint("cachey", "scillm_cachey", load)))
    _, infos = build_plugin_manager()
    assert infos[-1].status == "skipped"
    assert "redis" in infos[-1].reason
    assert "cachey" in caplog.text


def test_any_other_load_error_stops_startup_naming_the_distribution(dists):
    def load():
        raise RuntimeError("boom")

    dists.append(FakeDist("scillm-broken", FakeEntryPoint("broken", "scillm_broken", load)))
    with pytest.raises(PluginLoadError) as caught:
        build_plugin_manager()
    assert "scillm-broken" in str(caught.value) and "SCILLM_DISABLE_PLUGINS=broken" in str(caught.value)


def test_a_plugin_missing_its_own_module_is_an_error_not_a_skip(dists):
    def load():
        raise ModuleNotFoundError("No module named 'scillm_gone'", name="scillm_gone")

    dists.append(FakeDist("scillm-gone", FakeEntryPoint("gone", "scillm_gone", load)))
    with pytest.raises(PluginLoadError):
        build_plugin_manager()


def test_async_def_hookimpl_is_rejected_with_the_reason():
    class Bad:
        @hookimpl
        async def route_model(self, request, runtime):
            return None

    pm = ScillmPluginManager()
    with pytest.raises(pluggy.PluginValidationError, match="plain 'def'"):
        pm.register(Bad())


def test_each_app_gets_a_fresh_plugin_manager():
    class Counter:
        calls = 0

        @hookimpl
        def scillm_health(self, runtime):
            Counter.calls += 1
            return {"counter": Counter.calls}

    a = make_app(plugins=[("counter", Counter())], entry_points=False)
    b = make_app(entry_points=False)
    assert a.runtime.hooks.pm is not b.runtime.hooks.pm
    assert "counter" in a.runtime.hooks.health(a.runtime)
    assert "counter" not in b.runtime.hooks.health(b.runtime)


def test_installed_bundled_plugins_are_discovered():
    app = make_app()
    names = {info.name: info for info in app.runtime.plugins}
    for name in ("chat", "ops", "auth", "openai-compat"):
        assert names[name].status == "loaded" and names[name].distribution.startswith("scillm-")
    assert sys.modules.get("scillm_chat") is not None
