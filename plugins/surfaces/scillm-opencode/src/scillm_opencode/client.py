"""A thin client of the ``opencode serve`` HTTP API (v1): Basic auth, every call scoped with ``?directory=``, and the
per-directory ``/event`` SSE stream. Errors become :class:`ServeError` (never with the password in them)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import orjson

from scillm_core import errors

__all__ = ["OpenCodeClient", "ServeError"]


class ServeError(errors.ScillmError):
    """The OpenCode server failed or is unreachable (502/503); the message says which call."""

    status = 502
    type = "upstream_error"
    code = "opencode_serve_error"


class OpenCodeClient:
    def __init__(self, url: str, username: str, password: str, *, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.url, auth=httpx.BasicAuth(username, password),
                                      timeout=httpx.Timeout(timeout_s), trust_env=False)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def call(self, method: str, path: str, *, directory: str | None = None, json: Any = None,
                   params: Mapping[str, str] | None = None) -> Any:
        query = dict(params or {})
        if directory is not None:
            query["directory"] = directory
        try:
            response = await self.http.request(method, path, params=query, json=json)
        except httpx.TimeoutException:
            raise ServeError(f"opencode serve: {method} {path} timed out", status=504) from None
        except httpx.HTTPError as exc:
            raise ServeError(f"opencode serve unreachable at {self.url} ({type(exc).__name__})", status=503) from None
        if response.status_code == 401:
            raise ServeError("opencode serve refused scillm's credentials (check OPENCODE_SERVER_PASSWORD)")
        if response.status_code >= 400:
            raise ServeError(f"opencode serve: {method} {path} answered HTTP {response.status_code}: "
                             f"{response.text[:300]}")
        if response.status_code == 204 or not response.content:
            return None
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            return response.text

    # -- the calls scillm makes ------------------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        return await self.call("GET", "/global/health")  # type: ignore[no-any-return]

    async def agents(self) -> list[dict[str, Any]]:
        return await self.call("GET", "/agent")  # type: ignore[no-any-return]

    async def providers(self) -> dict[str, Any]:
        return await self.call("GET", "/config/providers")  # type: ignore[no-any-return]

    async def create_session(self, directory: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.call("POST", "/session", directory=directory, json=body)  # type: ignore[no-any-return]

    async def prompt_async(self, directory: str, session_id: str, body: Mapping[str, Any]) -> None:
        await self.call("POST", f"/session/{session_id}/prompt_async", directory=directory, json=body)

    async def abort(self, directory: str, session_id: str) -> None:
        await self.call("POST", f"/session/{session_id}/abort", directory=directory)

    async def messages(self, directory: str, session_id: str) -> list[dict[str, Any]]:
        return await self.call("GET", f"/session/{session_id}/message",  # type: ignore[no-any-return]
                               directory=directory)

    async def status(self, directory: str) -> dict[str, Any]:
        return await self.call("GET", "/session/status", directory=directory)  # type: ignore[no-any-return]

    async def permissions(self, directory: str) -> list[dict[str, Any]]:
        return await self.call("GET", "/permission", directory=directory)  # type: ignore[no-any-return]

    async def reply_permission(self, directory: str, request_id: str, reply: str, message: str | None) -> None:
        body: dict[str, Any] = {"reply": reply}
        if message:
            body["message"] = message
        await self.call("POST", f"/permission/{request_id}/reply", directory=directory, json=body)

    async def delete_session(self, directory: str, session_id: str) -> None:
        await self.call("DELETE", f"/session/{session_id}", directory=directory)

    async def dispose(self, directory: str) -> None:
        """Drop the server's instance for a directory (its file watcher and caches) once no session needs it."""
        await self.call("POST", "/instance/dispose", directory=directory)

    async def events(self, directory: str) -> AsyncIterator[dict[str, Any]]:
        """The directory's bus events (``{id, type, properties}``) from ``/event?directory=``, starting with
        ``server.connected``; ends (returns) when the server closes the stream, raises :class:`ServeError` when it
        cannot be opened or breaks."""
        try:
            async with self.http.stream("GET", "/event", params={"directory": directory},
                                        timeout=httpx.Timeout(30.0, read=None)) as response:
                if response.status_code != 200:
                    raise ServeError(f"opencode serve: GET /event answered HTTP {response.status_code}")
                data: list[str] = []
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        data.append(line[5:].lstrip())
                    elif not line and data:
                        try:
                            event = orjson.loads("\n".join(data))
                        except orjson.JSONDecodeError:
                            event = None
                        data.clear()
                        if isinstance(event, dict):
                            yield event
        except httpx.HTTPError as exc:
            raise ServeError(f"opencode serve event stream broke ({type(exc).__name__})", status=503) from None
