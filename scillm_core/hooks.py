"""Typed facade over ``pm.hook``: call sites never touch pluggy directly."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pluggy

    from scillm_core.context import CallContext, Runtime
    from scillm_core.models import ChatRequest
    from scillm_core.pipeline import ChatThunk, RequestThunk, ResponseThunk
    from scillm_core.registry import Route
    from scillm_core.sessions import SessionContext, SessionSpec, SessionThunk

__all__ = ["Hooks"]


class Hooks:
    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._hook = pm.hook

    def preprocess_files(self, request: ChatRequest, ctx: CallContext) -> RequestThunk:
        return self._hook.preprocess_files(request=request, ctx=ctx)  # type: ignore[no-any-return]

    def route_model(self, request: ChatRequest, runtime: Runtime) -> Route:
        return self._hook.route_model(request=request, runtime=runtime)  # type: ignore[no-any-return]

    def call_provider(self, request: ChatRequest, route: Route, ctx: CallContext) -> ChatThunk:
        return self._hook.call_provider(request=request, route=route, ctx=ctx)  # type: ignore[no-any-return]

    def postprocess_json(self, request: ChatRequest, ctx: CallContext) -> ResponseThunk:
        return self._hook.postprocess_json(request=request, ctx=ctx)  # type: ignore[no-any-return]

    def run_session(self, spec: SessionSpec, ctx: SessionContext) -> SessionThunk | None:
        return self._hook.run_session(spec=spec, ctx=ctx)  # type: ignore[no-any-return]

    def session_profiles(self, runtime: Runtime) -> list[str]:
        return sorted({p for names in self._hook.scillm_session_profiles(runtime=runtime) if names for p in names})

    def health(self, runtime: Runtime) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part in reversed(self._hook.scillm_health(runtime=runtime)):
            merged.update(part or {})
        return merged

    def doctor(self, runtime: Runtime) -> list[dict[str, Any]]:
        return [dict(check) for checks in self._hook.scillm_doctor(runtime=runtime) if checks for check in checks]
