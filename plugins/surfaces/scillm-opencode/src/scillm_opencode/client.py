"""A thin client of the ``opencode serve`` HTTP API (v1): Basic auth, every call scoped with ``?directory=``, and the
per-directory ``/event`` SSE stream. Errors become :class:`ServeError` (never with the password in them)."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import orjson

from scillm_core import errors
from scillm_core.jsonio import json_type

__all__ = ["CLEANUP_S", "ID", "MAX_BODY", "MAX_EVENT", "RESULT_S", "OpenCodeClient", "ServeError"]

MAX_BODY = 64 << 20    # bytes of one answer
MAX_EVENT = 16 << 20   # bytes of one bus event (an SSE event's data lines together)
CLEANUP_S = 5.0        # seconds a clean-up call (abort, status, delete, dispose) may take: it never holds a run up
RESULT_S = 10.0        # seconds the messages of a session that ended may take (the run's answer, read once more)
ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # OpenCode's ids (ses_..., per_...): safe in a path, short in a record


class ServeError(errors.ScillmError):
    """The OpenCode server failed or is unreachable (502/503); the message says which call."""

    status = 502
    type = "upstream_error"
    code = "opencode_serve_error"


class OpenCodeClient:
    def __init__(self, url: str, username: str, password: str, *, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        basic = base64.b64encode(f"{username}:{password}".encode()).decode()
        self._secrets = [s for s in (password, basic) if len(s) >= 8]
        self.http = httpx.AsyncClient(base_url=self.url, auth=httpx.BasicAuth(username, password),
                                      timeout=httpx.Timeout(timeout_s), trust_env=False)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def call(self, method: str, path: str, *, directory: str | None = None, json: Any = None,
                   params: Mapping[str, str] | None = None, expect: type | None = None,
                   timeout_s: float | None = None) -> Any:
        """The decoded JSON answer (``None`` for an empty one); with ``expect`` (``dict`` or ``list``) an answer of
        any other shape is the server's fault (:class:`ServeError`, 502), so no caller handles a number where it
        wanted an object."""
        query = dict(params or {})
        if directory is not None:
            query["directory"] = directory
        if self.http.is_closed:
            raise ServeError(f"opencode serve: {method} {path}: the connection to it is closed", status=503)
        try:
            async with asyncio.timeout(timeout_s or self.timeout_s):  # the whole call, however slowly it trickles
                request = self.http.build_request(method, path, params=query, json=json)
                response = await self.http.send(request, stream=True)
                try:
                    body = await self._read(response, f"{method} {path}")
                finally:
                    await response.aclose()
        except (httpx.TimeoutException, TimeoutError):
            raise ServeError(f"opencode serve: {method} {path} timed out", status=504) from None
        except httpx.HTTPError as exc:
            raise ServeError(f"opencode serve unreachable at {self.url} ({type(exc).__name__})", status=503) from None
        if response.status_code == 401:
            raise ServeError("opencode serve refused scillm's credentials (check OPENCODE_SERVER_PASSWORD)")
        if response.status_code >= 400:
            raise ServeError(f"opencode serve: {method} {path} answered HTTP {response.status_code}: "
                             f"{self.clean(body.decode('utf-8', 'replace'))}")
        if response.status_code == 204 or not body:
            value: Any = None
        else:
            try:
                value = orjson.loads(body)
            except orjson.JSONDecodeError:
                if expect is not None:
                    raise ServeError(f"opencode serve: {method} {path} answered something that is not JSON: "
                                     f"{self.clean(body.decode('utf-8', 'replace'))}") from None
                value = body.decode("utf-8", "replace")
        if expect is not None and not isinstance(value, expect):
            raise ServeError(f"opencode serve: {method} {path} answered {json_type(value)} where "
                             f"{json_type(expect())} was expected")
        return value

    async def _read(self, response: httpx.Response, what: str) -> bytes:
        """The body, at most :data:`MAX_BODY` bytes (a server that sends more is broken, not to be buffered)."""
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > MAX_BODY:
                raise ServeError(f"opencode serve: {what} answered more than {MAX_BODY >> 20} MB")
            chunks.append(chunk)
        return b"".join(chunks)

    def clean(self, text: str, limit: int = 300) -> str:
        """A piece of the server's answer for a message: cut, one line, without scillm's credentials for it."""
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return " ".join(text[:limit].split())

    # -- the calls scillm makes ------------------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        return await self.call("GET", "/global/health", expect=dict)  # type: ignore[no-any-return]

    async def agents(self) -> list[dict[str, Any]]:
        return await self.call("GET", "/agent", expect=list)  # type: ignore[no-any-return]

    async def providers(self) -> dict[str, Any]:
        return await self.call("GET", "/config/providers", expect=dict)  # type: ignore[no-any-return]

    async def create_session(self, directory: str, body: Mapping[str, Any]) -> dict[str, Any]:
        session = await self.call("POST", "/session", directory=directory, json=body, expect=dict)
        if not isinstance(session.get("id"), str) or not ID.match(session["id"]):
            raise ServeError(f"opencode serve: POST /session answered without a usable session id "
                             f"({json_type(session.get('id'))})")
        return session  # type: ignore[no-any-return]

    async def prompt_async(self, directory: str, session_id: str, body: Mapping[str, Any]) -> None:
        await self.call("POST", f"/session/{session_id}/prompt_async", directory=directory, json=body)

    async def abort(self, directory: str, session_id: str) -> bool:
        """Whether the server answered ``true``: it stopped the session's work and set it idle before answering."""
        return await self.call("POST", f"/session/{session_id}/abort", directory=directory,
                               timeout_s=CLEANUP_S) is True

    async def messages(self, directory: str, session_id: str, *, timeout_s: float | None = None
                       ) -> list[dict[str, Any]]:
        return await self.call("GET", f"/session/{session_id}/message",  # type: ignore[no-any-return]
                               directory=directory, expect=list, timeout_s=timeout_s)

    async def status(self, directory: str) -> dict[str, Any]:
        return await self.call("GET", "/session/status", directory=directory,  # type: ignore[no-any-return]
                               expect=dict, timeout_s=CLEANUP_S)

    async def permissions(self, directory: str) -> list[dict[str, Any]]:
        return await self.call("GET", "/permission", directory=directory,  # type: ignore[no-any-return]
                               expect=list)

    async def reply_permission(self, directory: str, request_id: str, reply: str, message: str | None) -> None:
        if not ID.match(request_id):  # the server's id: never path segments of scillm's next call
            raise ServeError(f"opencode serve sent a permission request id that cannot be answered (not an id: "
                             f"{errors.quote(self.clean(request_id, 200))})")
        body: dict[str, Any] = {"reply": reply}
        if message:
            body["message"] = message
        await self.call("POST", f"/permission/{request_id}/reply", directory=directory, json=body)

    async def delete_session(self, directory: str, session_id: str) -> None:
        await self.call("DELETE", f"/session/{session_id}", directory=directory, timeout_s=CLEANUP_S)

    async def dispose(self, directory: str) -> None:
        """Drop the server's instance for a directory (its file watcher and caches) once no session needs it."""
        await self.call("POST", "/instance/dispose", directory=directory, timeout_s=CLEANUP_S)

    async def events(self, directory: str) -> AsyncIterator[dict[str, Any]]:
        """The directory's bus events (``{id, type, properties}``) from ``/event?directory=``, starting with
        ``server.connected``; ends (returns) when the server closes the stream, raises :class:`ServeError` when it
        cannot be opened or breaks. What is not a JSON object is skipped; an event over :data:`MAX_EVENT` bytes
        breaks the stream (it is never buffered whole)."""
        try:
            async with self.http.stream("GET", "/event", params={"directory": directory},
                                        timeout=httpx.Timeout(30.0, read=None)) as response:
                if response.status_code != 200:
                    raise ServeError(f"opencode serve: GET /event answered HTTP {response.status_code}")
                pending, size = bytearray(), 0  # the line being read; the size of the event's data lines
                data: list[bytes] = []
                async for chunk in response.aiter_bytes():
                    *lines, rest = chunk.split(b"\n")
                    if lines:
                        lines[0], pending = bytes(pending) + lines[0], bytearray(rest)
                    else:
                        pending += rest
                    if len(pending) + size > MAX_EVENT:
                        raise ServeError(f"opencode serve sent a bus event of more than {MAX_EVENT >> 20} MB")
                    for line in lines:
                        line = line.rstrip(b"\r")
                        if line.startswith(b"data:"):
                            data.append(line[5:].lstrip())
                            size += len(line)
                            if size > MAX_EVENT:
                                raise ServeError(f"opencode serve sent a bus event of more than {MAX_EVENT >> 20} MB")
                        elif not line and data:
                            try:
                                event = orjson.loads(b"\n".join(data))
                            except orjson.JSONDecodeError:
                                event = None
                            data, size = [], 0
                            if isinstance(event, dict):
                                yield event
        except httpx.HTTPError as exc:
            raise ServeError(f"opencode serve event stream broke ({type(exc).__name__})", status=503) from None
