"""The app's router finds fixed paths in a dictionary and answers exactly as Starlette's ordered scan would."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from scillm_core.paths import IndexedRouter, index_routes

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def answer(text: str):
    async def endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"{text} {request.path_params}")
    return endpoint


ROUTES = [
    Route("/items/{name}", answer("item"), methods=["GET"]),  # an earlier pattern that also matches /items/new
    Route("/items/new", answer("new"), methods=["GET", "POST"]),  # the scan gives GET to the pattern above
    Route("/v1/chat", answer("chat-get"), methods=["GET"]),
    Route("/v1/chat", answer("chat-post"), methods=["POST"]),  # one path, two routes: both indexed, in order
    Route("/v1/other", answer("other"), methods=["POST"]),
]


def client(routes: list[Route]) -> httpx.AsyncClient:
    app = Starlette()
    app.router = IndexedRouter(routes)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_only_what_the_scan_would_reach_first_is_indexed():
    index = index_routes(ROUTES)
    assert sorted(index) == ["/v1/chat", "/v1/other"]  # /items/new is shadowed by /items/{name} for GET
    assert [r.endpoint.__name__ for r in index["/v1/chat"]] == ["endpoint", "endpoint"]
    assert [sorted(r.methods or ()) for r in index["/v1/chat"]] == [["GET", "HEAD"], ["POST"]]


@pytest.mark.parametrize(("method", "path", "status", "text"), [
    ("GET", "/v1/chat", 200, "chat-get {}"),
    ("POST", "/v1/chat", 200, "chat-post {}"),
    ("POST", "/v1/other", 200, "other {}"),
    ("GET", "/items/new", 200, "item {'name': 'new'}"),  # the earlier pattern wins, as in the scan
    ("POST", "/items/new", 200, "new {}"),
    ("GET", "/items/x", 200, "item {'name': 'x'}"),
    ("GET", "/v1/other", 405, None),  # a wrong method on an indexed path: the scan's 405
    ("GET", "/nowhere", 404, None),
])
async def test_answers_as_the_ordered_scan_does(method, path, status, text):
    async with client(ROUTES) as indexed:
        got = await indexed.request(method, path)
    plain = Starlette(routes=ROUTES)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=plain), base_url="http://test") as scan:
        expected = await scan.request(method, path)
    assert (got.status_code, got.text) == (expected.status_code, expected.text)
    assert got.status_code == status
    if text is not None:
        assert got.text == text


async def test_routes_added_after_start_are_found():
    routes = list(ROUTES)
    app = Starlette()
    app.router = IndexedRouter(routes)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        assert (await http.post("/v1/late")).status_code == 404
        app.router.routes.append(Route("/v1/late", answer("late"), methods=["POST"]))
        assert (await http.post("/v1/late")).text == "late {}"


def test_every_fixed_path_of_the_shipped_app_is_indexed(tmp_path, monkeypatch):
    """Nothing in scillm's own routes shadows a fixed path: each is found without the scan."""
    from scillm_core.app import create_app

    monkeypatch.setenv("SCILLM_DATA_DIR", str(tmp_path))
    app = create_app()
    while not hasattr(app, "router"):
        app = app.app
    assert isinstance(app.router, IndexedRouter)
    routes = app.router.routes
    index = index_routes(routes)
    fixed = [r for r in routes if type(r) is Route and not r.param_convertors]
    assert "/v1/chat/completions" in index and len(fixed) > 20
    assert [r for r in fixed if r not in index.get(r.path, [])] == []
