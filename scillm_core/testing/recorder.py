"""A plugin that records every pipeline hook call (as an outermost wrapper) for assertions in tests."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from scillm_core.hookspecs import hookimpl

__all__ = ["HookRecorder"]


class HookRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def named(self, hook: str) -> list[dict[str, Any]]:
        return [kwargs for name, kwargs in self.calls if name == hook]

    @hookimpl(wrapper=True, tryfirst=True)
    def preprocess_files(self, request: Any, ctx: Any) -> Generator[None, Any, Any]:
        self.calls.append(("preprocess_files", {"request": request, "ctx": ctx}))
        return (yield)

    @hookimpl(wrapper=True, tryfirst=True)
    def route_model(self, request: Any, runtime: Any) -> Generator[None, Any, Any]:
        route = yield
        self.calls.append(("route_model", {"request": request, "route": route}))
        return route

    @hookimpl(wrapper=True, tryfirst=True)
    def call_provider(self, request: Any, route: Any, ctx: Any) -> Generator[None, Any, Any]:
        self.calls.append(("call_provider", {"request": request, "route": route, "ctx": ctx}))
        return (yield)

    @hookimpl(wrapper=True, tryfirst=True)
    def postprocess_json(self, request: Any, ctx: Any) -> Generator[None, Any, Any]:
        self.calls.append(("postprocess_json", {"request": request, "ctx": ctx}))
        return (yield)

    @hookimpl(wrapper=True, tryfirst=True)
    def run_session(self, spec: Any, ctx: Any) -> Generator[None, Any, Any]:
        self.calls.append(("run_session", {"spec": spec, "ctx": ctx}))
        return (yield)
