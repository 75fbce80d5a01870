"""Typed registries that registration hooks fill: providers, surfaces (routes), ASGI middleware, CLI commands."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from attrs import define, field, frozen

from scillm_core.timeouts import Timeouts

if TYPE_CHECKING:
    import httpx
    from starlette.types import ASGIApp

    from scillm_core.context import CallContext
    from scillm_core.models import ChatChunk, ChatRequest, ChatResponse, EmbeddingsRequest, EmbeddingsResponse

__all__ = ["Command", "CommandRegistry", "MiddlewareRegistry", "Provider", "ProviderRegistry", "Route",
           "SurfaceRegistry"]


@frozen(kw_only=True)
class Route:
    """Where one call goes. ``deployment`` identifies provider+model for breakers, limits and metrics.
    ``timeouts``: the limits of its upstream attempts (the provider's defaults, ``[providers.NAME]``, then the
    group's); ``None`` on a route built elsewhere, which core's dispatch fills in from the provider."""

    provider: str
    model: str
    requested: str
    group: str | None = None
    fallbacks: tuple[Route, ...] = ()
    timeouts: Timeouts | None = None

    @property
    def deployment(self) -> str:
        return f"{self.provider}/{self.model}"

    @property
    def reaches(self) -> tuple[str, ...]:
        """The names a key's model list is matched against: the group (which brings its fallbacks), else the
        model, as ``model`` and as ``provider/model``."""
        return (self.group,) if self.group else (self.model, self.deployment)


class Provider:
    """Base class for providers. Subclasses set the class attributes and implement :meth:`complete` and
    :meth:`stream` (and :meth:`embed` when the upstream has embeddings); everything else has a working default.

    Routing uses, in order: ``aliases`` (name -> upstream model), ``prefixes`` (``"deepseek/"``), then
    :meth:`claims` for bare names, tried across providers by ascending ``rule_order``.
    """

    name: str = ""
    family: str = ""
    prefixes: tuple[str, ...] = ()
    aliases: Mapping[str, str] = {}
    rule_order: int = 100
    capabilities: frozenset[str] = frozenset({"streaming", "tools"})
    #: Client dialects whose body this provider sends upstream unchanged (``"openai-chat"``,
    #: ``"anthropic-messages"``, ``"openai-responses"``): see :meth:`speaks` and :meth:`complete_native`.
    dialects: frozenset[str] = frozenset()
    #: upstream timeouts of this provider's attempts before ``[providers.NAME]`` and groups change them
    timeouts: Timeouts = Timeouts()

    def claims(self, model: str) -> bool:
        """Whether this provider serves the bare ``model`` name by its name rules."""
        return False

    def capabilities_for(self, route: Route) -> frozenset[str]:
        """What ``route`` can deliver: :attr:`capabilities`, unless a provider serves models of different kinds.
        A translated request is checked against it before each attempt (``scillm_core.models.params``)."""
        return self.capabilities

    def http_timeout(self, route: Route, *, stream: bool) -> httpx.Timeout:
        """What to pass as ``timeout=`` to the shared client for one upstream request of ``route`` (connect, and a
        read limit behind the ones core's dispatch enforces)."""
        return (route.timeouts or self.timeouts).http(stream=stream)

    def missing_config(self) -> str | None:
        """``None`` when usable; else what to set, e.g. ``"set DEEPSEEK_API_KEY (or DEEPSEEK_API)"``."""
        return None

    def upstream_model(self, model: str) -> str:
        for prefix in self.prefixes:
            if model.startswith(prefix):
                return model[len(prefix):]
        return model

    def known_models(self) -> Sequence[str]:
        """Model names to advertise in ``/v1/models`` and to suggest for typos."""
        return ()

    #: whether ``scillm doctor`` calls an unreachable probe a failure (not for a local server you may not run)
    probe_required: bool = True

    def probe(self) -> tuple[str, Mapping[str, str]] | None:
        """``(url, headers)`` of a cheap GET that shows whether the upstream takes this provider's credentials,
        for ``scillm doctor`` (2xx: usable; 401/403: refused). ``None``: nothing to probe (logins have their own
        checks). The headers never leave the process."""
        return None

    def auth_status(self) -> dict[str, Any] | None:
        """Login health for providers that use one (OAuth): ``{"status", "source", "expires_in_s", ...}``.
        ``None`` for key-based providers. Shown at ``GET /v1/scillm/auth``; never include a token."""
        return None

    def describe(self) -> dict[str, Any]:
        """Public facts for ops endpoints. Never include a secret."""
        missing = self.missing_config()
        return {"name": self.name, "family": self.family, "configured": missing is None, "missing": missing,
                "prefixes": list(self.prefixes), "aliases": dict(self.aliases),
                "capabilities": sorted(self.capabilities)}

    async def complete(self, request: ChatRequest, route: Route, ctx: CallContext) -> ChatResponse:
        raise NotImplementedError

    async def stream(self, request: ChatRequest, route: Route, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        """Open the upstream stream (raising on HTTP errors) and return an iterator of chunks."""
        raise NotImplementedError

    async def embed(self, request: EmbeddingsRequest, route: Route, ctx: CallContext) -> EmbeddingsResponse:
        """Embeddings for ``request.inputs``, in order. Providers that have them override this and add
        ``"embeddings"`` to ``capabilities``; the default refuses with a 400 naming the provider."""
        from scillm_core import errors

        raise errors.InvalidRequest(
            f"model {route.requested!r} is served by provider {self.name!r}, which has no embeddings endpoint; use "
            f"an embeddings model of a provider that has one (see GET /v1/scillm/providers, capability "
            f"'embeddings')", param="model", code="embeddings_not_supported")

    # -- same-dialect pass-through ------------------------------------------------------------------------------

    def speaks(self, request: ChatRequest, route: Route) -> bool:
        """Whether ``request.native`` (the client's own body) goes upstream as sent for ``route``. The default:
        its dialect is one of :attr:`dialects`. Override to refuse bodies the upstream would reject as sent."""
        native = request.native
        return native is not None and native.dialect in self.dialects

    async def complete_native(self, request: ChatRequest, route: Route, ctx: CallContext) -> ChatResponse:
        """Send ``request.native`` upstream (``model`` rewritten) and return the answer translated for the
        middleware, with the upstream's body on its ``native`` field (:func:`scillm_core.with_native`)."""
        raise NotImplementedError

    async def stream_native(self, request: ChatRequest, route: Route, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        """As :meth:`stream` for ``request.native``; every upstream byte rides, in order, on some chunk's
        ``native`` field (an event that yields no chunk goes with the next one)."""
        raise NotImplementedError


class ProviderRegistry(Mapping[str, Provider]):
    """The providers by name. ``kinds`` holds the ``kind`` values of ``[providers.NAME]`` tables that plugins
    turn into providers of the user's own (a plugin adds its kind, e.g. ``"openai-compatible"``); a table of
    another kind, or a table naming no provider, stops startup."""

    def __init__(self) -> None:
        self._providers: dict[str, Provider] = {}
        self._owners: dict[str, str] = {}
        self.kinds: set[str] = set()

    def add(self, provider: Provider) -> None:
        plugin = type(provider).__module__
        if not provider.name:
            raise ValueError(f"provider {provider!r} has no name")
        if provider.name in self._providers:
            from scillm_core.config import ConfigError

            raise ConfigError(f"provider {provider.name!r} registered twice (by {self._owners[provider.name]} and "
                              f"{plugin}); a [providers.NAME] table of your own must not reuse a provider's name")
        self._providers[provider.name] = provider
        self._owners[provider.name] = plugin

    def __getitem__(self, name: str) -> Provider:
        return self._providers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._providers)

    def __len__(self) -> int:
        return len(self._providers)

    def values(self) -> Any:  # the dict's own views: routing walks them on every request
        return self._providers.values()

    def items(self) -> Any:
        return self._providers.items()

    def by_rule_order(self) -> list[Provider]:
        return sorted(self._providers.values(), key=lambda p: (p.rule_order, p.name))


Endpoint = Callable[..., Awaitable[Any]]


@define
class SurfaceRegistry:
    routes: list[Any] = field(factory=list)
    paths: dict[tuple[str, str], str] = field(factory=dict)
    public: set[str] = field(factory=set)
    startup: list[Callable[[], Awaitable[None]]] = field(factory=list)
    shutdown: list[Callable[[], Awaitable[None]]] = field(factory=list)

    def route(self, path: str, endpoint: Endpoint, methods: Sequence[str] = ("GET",), *, plugin: str = "?",
              public: bool = False) -> None:
        """Add a route. ``public=True`` (exact path, no parameters) is served without a key: only for what holds
        no data, such as a page that then asks for a key (auth plugins read ``runtime.public_paths``)."""
        from starlette.routing import Route as StarletteRoute

        for method in methods:
            if (method, path) in self.paths:
                raise ValueError(f"{method} {path} registered twice (by {self.paths[(method, path)]} and {plugin})")
            self.paths[(method, path)] = plugin
        if public:
            if "{" in path:
                raise ValueError(f"public route {path} must be an exact path (no parameters)")
            self.public.add(path)
        self.routes.append(StarletteRoute(path, endpoint, methods=list(methods)))

    def on_startup(self, fn: Callable[[], Awaitable[None]]) -> None:
        self.startup.append(fn)

    def on_shutdown(self, fn: Callable[[], Awaitable[None]]) -> None:
        self.shutdown.append(fn)


@define
class MiddlewareRegistry:
    entries: list[tuple[int, str, Callable[[ASGIApp], ASGIApp]]] = field(factory=list)

    def add(self, factory: Callable[[ASGIApp], ASGIApp], *, order: int = 100, name: str = "") -> None:
        """``factory(app) -> app``. Lower ``order`` sits closer to the client (runs first)."""
        self.entries.append((order, name or getattr(factory, "__name__", "middleware"), factory))

    def wrap(self, app: ASGIApp) -> ASGIApp:
        for _, _, factory in sorted(self.entries, key=lambda e: (e[0], e[1]), reverse=True):
            app = factory(app)
        return app


@frozen
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


@define
class CommandRegistry:
    commands: dict[str, Command] = field(factory=dict)

    def add(self, name: str, help: str, configure: Callable[[argparse.ArgumentParser], None],
            run: Callable[[argparse.Namespace], int]) -> None:
        if name in self.commands:
            raise ValueError(f"command {name!r} registered twice")
        self.commands[name] = Command(name, help, configure, run)
