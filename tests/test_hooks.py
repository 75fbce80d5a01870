"""The Hooks facade's compiled chains behave exactly like pluggy's own call, and follow (un)registration."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from scillm_core import hookimpl
from scillm_core.hooks import Hooks
from scillm_core.plugins import ScillmPluginManager


class Base:
    @hookimpl(trylast=True)
    def route_model(self, request: Any, runtime: Any) -> Any:
        if request == "boom":
            raise ValueError("base failed")
        return f"base({request})"


class Declines:
    @hookimpl
    def route_model(self, request: Any) -> Any:  # a subset of the spec's arguments
        return None


class Claims:
    @hookimpl(tryfirst=True)
    def route_model(self, runtime: Any, request: Any) -> Any:  # another order
        return f"claimed({request},{runtime})" if request == "mine" else None


class Tags:
    def __init__(self, tag: str, **opts: Any) -> None:
        self.tag = tag
        self.seen: list[str] = []

        def route_model(request: Any, runtime: Any) -> Generator[None, Any, Any]:
            self.seen.append(f"enter {request}")
            try:
                result = yield
            except ValueError as exc:
                if self.tag == "rescuer":
                    return f"rescued({exc})"
                raise
            return f"{self.tag}[{result}]"

        self.route_model = hookimpl(wrapper=True, **opts)(route_model)


def managers(*plugins: object) -> tuple[Any, Hooks]:
    pm = ScillmPluginManager()
    for i, plugin in enumerate(plugins):
        pm.register(plugin, name=f"p{i}")
    return pm, Hooks(pm)


def outcome(fn: Any) -> Any:
    try:
        return ("ok", fn())
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


@pytest.mark.parametrize("request_value", ["x", "mine", "boom"])
@pytest.mark.parametrize("plugins", [
    lambda: [Base()],
    lambda: [Base(), Declines(), Claims()],
    lambda: [Base(), Tags("outer", tryfirst=True), Tags("inner", trylast=True), Tags("mid")],
    lambda: [Base(), Tags("rescuer"), Tags("outer", tryfirst=True), Claims()],
])
def test_compiled_chain_matches_pluggy(plugins: Any, request_value: str) -> None:
    pm, hooks = managers(*plugins())
    expected = outcome(lambda: pm.hook.route_model(request=request_value, runtime="rt"))
    assert outcome(lambda: hooks.route_model(request_value, "rt")) == expected  # type: ignore[arg-type]


def test_wrappers_see_their_own_order_and_the_chain_follows_registration() -> None:
    outer, inner = Tags("outer", tryfirst=True), Tags("inner")
    pm, hooks = managers(Base(), inner)
    assert hooks.route_model("x", "rt") == "inner[base(x)]"  # type: ignore[arg-type]
    pm.register(outer, name="late")
    assert hooks.route_model("x", "rt") == "outer[inner[base(x)]]"  # type: ignore[arg-type]
    assert outer.seen == inner.seen[1:] == ["enter x"]
    pm.unregister(name="late")
    assert hooks.route_model("y", "rt") == "inner[base(y)]"  # type: ignore[arg-type]


def test_a_wrapper_that_does_not_yield_is_an_error() -> None:
    class NoYield:
        @hookimpl(wrapper=True)
        def route_model(self, request: Any) -> Any:
            return
            yield  # pragma: no cover

    _, hooks = managers(Base(), NoYield())
    with pytest.raises(RuntimeError, match="did not yield"):
        hooks.route_model("x", "rt")  # type: ignore[arg-type]


def test_old_style_hookwrappers_fall_back_to_pluggy() -> None:
    class OldStyle:
        @hookimpl(hookwrapper=True)
        def route_model(self, request: Any) -> Any:
            outcome = yield
            outcome.force_result(f"old[{outcome.get_result()}]")

    _, hooks = managers(Base(), OldStyle())
    assert hooks.route_model("x", "rt") == "old[base(x)]"  # type: ignore[arg-type]
