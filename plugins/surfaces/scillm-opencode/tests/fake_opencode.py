"""A fake ``opencode serve`` (v1 HTTP API + the ``/event`` SSE stream) answering scillm's calls with the shapes of
``shared/reference/agent-cli-samples`` (OpenCode 1.18.33), or with what a test puts in ``answers`` instead: a
broken or hostile server, call by call.

``answers[name]`` (names: health, agent, providers, create, prompt, messages, status, abort, delete, dispose,
skill, reply, event) is a :class:`Bad` answer; for ``prompt``, ``events`` are the raw SSE bytes the stream carries after
the prompt instead of a normal turn, and ``on_abort`` those it carries on an abort instead of the session's idle."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import orjson
from attrs import define
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from scillm_core.testing.fakes import FakeUpstream

PASSWORD = "oc-server-SECRET-password-0123456789"


@define
class Bad:
    """One broken answer: ``body`` (raw bytes, or JSON) with ``status``; ``hang`` never answers."""

    body: Any = None
    status: int = 200
    hang: bool = False
    raw: bool = False


def frame(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class FakeOpenCode(FakeUpstream):
    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, Bad] = {}
        self.events: list[bytes | None] | None = None  # after a prompt (None: a normal turn; a None ends the stream)
        self.on_abort: list[bytes] | None = None  # what the stream carries on an abort (None: the session's idle)
        self.streams: dict[str, asyncio.Queue[bytes | None]] = {}
        self.ids = itertools.count(1)
        self.sessions: dict[str, str] = {}  # session id -> directory

    def routes(self) -> list[Route]:
        return [Route("/global/health", self.health), Route("/agent", self.agent),
                Route("/config/providers", self.providers), Route("/skill", self.skill),
                Route("/session", self.create, methods=["POST"]),
                Route("/session/status", self.status),
                Route("/session/{sid}/prompt_async", self.prompt, methods=["POST"]),
                Route("/session/{sid}/message", self.messages),
                Route("/session/{sid}/abort", self.abort, methods=["POST"]),
                Route("/session/{sid}", self.delete, methods=["DELETE"]),
                Route("/instance/dispose", self.dispose, methods=["POST"]),
                Route("/permission/{pid}/reply", self.reply, methods=["POST"]),
                Route("/event", self.event),
                Route("/{path:path}", self.unknown, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])]

    async def _answer(self, name: str, request: Request, normal: Any, status: int = 200) -> Response:
        await self.record(request)
        bad = self.answers.get(name)
        if bad is None:
            return Response(orjson.dumps(normal), status, media_type="application/json")
        if bad.hang:
            await asyncio.sleep(3600)
        body = bad.body if bad.raw else orjson.dumps(bad.body)
        return Response(body, bad.status, media_type="application/json")

    async def health(self, request: Request) -> Response:
        return await self._answer("health", request, {"healthy": True, "version": "1.18.33"})

    async def agent(self, request: Request) -> Response:
        return await self._answer("agent", request, [{"name": "build", "mode": "primary", "permission": []},
                                                      {"name": "plan", "mode": "primary", "permission": []}])

    async def providers(self, request: Request) -> Response:
        return await self._answer("providers", request, {
            "providers": [{"id": "fake", "name": "Fake", "models": {"fake-model": {"id": "fake-model"}}}],
            "default": {"fake": "fake-model"}})

    async def skill(self, request: Request) -> Response:
        return await self._answer("skill", request, [])

    async def create(self, request: Request) -> Response:
        sid = f"ses_fake{next(self.ids):06d}"
        self.sessions[sid] = request.query_params.get("directory", "")
        return await self._answer("create", request, {"id": sid, "slug": "witty-wolf", "version": "1.18.33",
                                                      "directory": self.sessions[sid], "title": "scillm test",
                                                      "time": {"created": 1, "updated": 1}})

    def push(self, directory: str, data: bytes | None) -> None:
        self.streams.setdefault(directory, asyncio.Queue()).put_nowait(data)

    def turn(self, sid: str) -> list[bytes]:
        """The events of one normal turn (the sample's shapes): busy, an assistant text, idle."""
        mid = f"msg_fake{next(self.ids):06d}"
        return [frame({"type": "session.status", "properties": {"sessionID": sid, "status": {"type": "busy"}}}),
                frame({"type": "message.updated", "properties": {"sessionID": sid, "info": {
                    "id": mid, "sessionID": sid, "role": "assistant"}}}),
                frame({"type": "message.part.updated", "properties": {"sessionID": sid, "part": {
                    "id": f"prt_{mid}", "sessionID": sid, "messageID": mid, "type": "text", "text": "DONE"}}}),
                frame({"type": "session.status", "properties": {"sessionID": sid, "status": {"type": "idle"}}}),
                frame({"type": "session.idle", "properties": {"sessionID": sid}})]

    async def prompt(self, request: Request) -> Response:
        sid = request.path_params["sid"]
        response = await self._answer("prompt", request, None, 204)
        if response.status_code < 400:
            frames = self.events if self.events is not None else self.turn(sid)
            for data in frames:
                self.push(self.sessions.get(sid, ""), None if data is None else data.replace(b"{SID}", sid.encode()))
        return response if response.status_code != 204 else Response(status_code=204)

    async def messages(self, request: Request) -> Response:
        sid = request.path_params["sid"]
        return await self._answer("messages", request, [
            {"info": {"id": "msg_u", "sessionID": sid, "role": "user"},
             "parts": [{"id": "prt_u", "type": "text", "text": "the prompt"}]},
            {"info": {"id": "msg_a", "sessionID": sid, "role": "assistant"},
             "parts": [{"id": "prt_a", "type": "text", "text": "DONE"}]}])

    async def status(self, request: Request) -> Response:
        return await self._answer("status", request, {})

    async def abort(self, request: Request) -> Response:
        sid = request.path_params["sid"]
        frames = [frame({"type": "session.idle", "properties": {"sessionID": sid}})] if self.on_abort is None else \
            self.on_abort
        for data in frames:
            self.push(self.sessions.get(sid, ""), data.replace(b"{SID}", sid.encode()))
        return await self._answer("abort", request, True)

    async def delete(self, request: Request) -> Response:
        return await self._answer("delete", request, True)

    async def dispose(self, request: Request) -> Response:
        return await self._answer("dispose", request, True)

    async def reply(self, request: Request) -> Response:
        return await self._answer("reply", request, True)

    async def unknown(self, request: Request) -> Response:
        """Any other path (recorded too): what OpenCode answers for a route it does not have."""
        await self.record(request)
        return Response(b"Not Found", 404)

    async def event(self, request: Request) -> Response:
        await self.record(request)
        bad = self.answers.get("event")
        if bad is not None and (bad.hang or bad.status != 200):
            return await self._answer("event", request, None)
        queue = self.streams.setdefault(request.query_params.get("directory", ""), asyncio.Queue())

        async def body() -> Any:
            if bad is not None:  # a broken stream from its first byte
                yield bad.body if bad.raw else frame(bad.body)
                return
            yield frame({"id": "evt_1", "type": "server.connected", "properties": {}})
            while True:
                data = await queue.get()
                if data is None:
                    return
                yield data

        return StreamingResponse(body(), media_type="text/event-stream")
