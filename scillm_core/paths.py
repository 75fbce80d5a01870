"""The app's router: a request for a fixed path (``/v1/chat/completions``) finds its route in a dictionary instead of
trying every route before it. Starlette's router tries each route's pattern in order; with every surface's routes in
one app, a chat completion tried about 60 patterns first (about 5% of a request's CPU).

Only what the ordered scan would pick is looked up: a route is indexed when its path has no parameters and no
route before it (other than one of the same path, also indexed, in order) could match that path. Anything else (a
path with parameters, a wrong method, a trailing-slash redirect, a 404) goes to Starlette's scan unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette.routing import BaseRoute, Match, Route, Router
from starlette.types import Receive, Scope, Send

__all__ = ["IndexedRouter", "index_routes"]


def index_routes(routes: Sequence[BaseRoute]) -> dict[str, list[Route]]:
    """The routes of each fixed path that the ordered scan would reach first, in their order."""
    index: dict[str, list[Route]] = {}
    for position, route in enumerate(routes):
        if type(route) is not Route or route.param_convertors:
            continue
        path = route.path
        if all(_same_path(earlier, path) or not _could_match(earlier, path) for earlier in routes[:position]):
            index.setdefault(path, []).append(route)
    return index


def _same_path(route: BaseRoute, path: str) -> bool:
    return type(route) is Route and not route.param_convertors and route.path == path


def _could_match(route: BaseRoute, path: str) -> bool:
    pattern = getattr(route, "path_regex", None)
    return pattern is None or pattern.match(path) is not None  # no pattern (a host route): assume it could


class IndexedRouter(Router):
    """Starlette's router with fixed paths looked up first (module doc). The index is rebuilt when routes are
    added after start."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.index: dict[str, list[Route]] = {}
        self.indexed = -1  # how many routes the index was built from

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):  # under a root path: the scan
            if self.indexed != len(self.routes):
                self.index, self.indexed = index_routes(self.routes), len(self.routes)
            for route in self.index.get(scope["path"], ()):
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope.setdefault("router", self)
                    scope["route"] = route
                    scope.update(child_scope)
                    await route.handle(scope, receive, send)
                    return
        await super().app(scope, receive, send)
