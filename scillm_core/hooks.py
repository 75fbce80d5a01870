"""Typed facade over ``pm.hook``: call sites never touch pluggy directly.

The four per-request hooks (``preprocess_files``, ``route_model``, ``call_provider``, ``postprocess_json``) run
through a precompiled chain instead of pluggy's generic caller: pluggy still registers, validates and orders the
implementations (``tryfirst``/``trylast``, wrappers outermost), and the chain is rebuilt whenever a plugin is
registered or unregistered; the call itself is a plain loop with pluggy's semantics for ``firstresult`` hooks and
``wrapper=True`` generators. It costs a fifth of pluggy's per-call bookkeeping, which the benchmark showed as the
largest single cost of running middleware. A chain containing anything else (old-style ``hookwrapper=True``,
keyword-only arguments) falls back to pluggy.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pluggy

    from scillm_core.context import CallContext, Runtime
    from scillm_core.models import ChatRequest
    from scillm_core.pipeline import ChatThunk, ProviderRequest, RequestThunk, ResponseThunk
    from scillm_core.registry import Route
    from scillm_core.sessions import SessionContext, SessionSpec, SessionThunk

__all__ = ["Hooks"]

# one compiled implementation: its function, whether it is a wrapper, and which of the call's arguments it takes
# (None: all of them, in the spec's order)
Step = tuple[Callable[..., Any], bool, tuple[int, ...] | None]


class Hooks:
    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self._hook = pm.hook
        self._chains: dict[str, list[Step] | None] = {}
        self._generation = -1

    def preprocess_files(self, request: ChatRequest, ctx: CallContext) -> RequestThunk:
        return self._call("preprocess_files", (request, ctx))  # type: ignore[no-any-return]

    def route_model(self, request: ProviderRequest, runtime: Runtime) -> Route:
        return self._call("route_model", (request, runtime))  # type: ignore[no-any-return]

    def call_provider(self, request: ProviderRequest, route: Route, ctx: CallContext) -> ChatThunk:
        return self._call("call_provider", (request, route, ctx))  # type: ignore[no-any-return]

    def postprocess_json(self, request: ProviderRequest, ctx: CallContext) -> ResponseThunk:
        return self._call("postprocess_json", (request, ctx))  # type: ignore[no-any-return]

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
        """The checks plugins return directly (those that need I/O come from :meth:`doctor_checks`)."""
        return [dict(check) for checks in self._hook.scillm_doctor(runtime=runtime)
                if checks and not callable(checks) for check in checks]

    async def doctor_checks(self, runtime: Runtime) -> list[dict[str, Any]]:
        """Every plugin's checks, awaiting the thunks of those that need I/O."""
        out: list[dict[str, Any]] = []
        for checks in self._hook.scillm_doctor(runtime=runtime):
            if callable(checks):
                checks = await checks()
            out.extend(dict(check) for check in checks or ())
        return out

    # -- the compiled chains --------------------------------------------------------------------------------------

    def _call(self, name: str, args: tuple[Any, ...]) -> Any:
        generation = getattr(self.pm, "generation", None)
        if generation != self._generation or generation is None:
            self._chains.clear()
            self._generation = -1 if generation is None else generation
        try:
            steps = self._chains[name]
        except KeyError:
            caller = getattr(self._hook, name)
            steps = self._chains[name] = _compile(caller) if generation is not None else None
        if steps is None:
            caller = getattr(self._hook, name)
            return caller(**dict(zip(caller.spec.argnames, args, strict=True)))
        return run_chain(steps, args)


def _compile(caller: Any) -> list[Step] | None:
    """The implementations of a ``firstresult`` hook in call order, or ``None`` to leave the call to pluggy."""
    if caller.spec is None or not caller.spec.opts.get("firstresult"):
        return None
    argnames: Sequence[str] = caller.spec.argnames
    steps: list[Step] = []
    for impl in reversed(caller.get_hookimpls()):
        if impl.hookwrapper or impl.kwargnames:
            return None
        picks = None if tuple(impl.argnames) == tuple(argnames) else tuple(argnames.index(a) for a in impl.argnames)
        steps.append((impl.function, impl.wrapper, picks))
    return steps


def run_chain(steps: Sequence[Step], args: tuple[Any, ...]) -> Any:
    """pluggy's ``firstresult`` call: wrappers run to their ``yield`` outermost first, then implementations until
    one returns non-``None``; the result (or the exception) is sent back into the wrappers, innermost first."""
    teardowns: list[Generator[None, Any, Any]] = []
    result: Any = None
    exception: BaseException | None = None
    try:
        for function, wrapper, picks in steps:
            call_args = args if picks is None else [args[i] for i in picks]
            if wrapper:
                teardown = function(*call_args)
                try:
                    next(teardown)
                except StopIteration:
                    raise RuntimeError(f"hook wrapper {function.__qualname__} did not yield") from None
                teardowns.append(teardown)
            else:
                result = function(*call_args)
                if result is not None:
                    break
    except BaseException as exc:
        exception = exc
    for teardown in reversed(teardowns):
        try:
            if exception is not None:
                teardown.throw(exception)
            else:
                teardown.send(result)
        except StopIteration as stop:
            result, exception = stop.value, None
            continue
        except BaseException as exc:
            exception = exc
            continue
        teardown.close()
        exception = RuntimeError(f"hook wrapper {teardown.gi_code.co_name} has a second yield")
    if exception is not None:
        try:
            raise exception
        finally:
            del exception  # no frame <-> traceback cycle left for the garbage collector
    return result
