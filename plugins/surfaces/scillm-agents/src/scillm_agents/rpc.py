"""JSON-RPC 2.0 over a child's stdio, as ``codex app-server`` speaks it (one JSON object per line).

:class:`RpcClient` matches responses to requests by id, hands notifications to the owner, and answers every request
the server sends: the owner's handler returns the result or raises :class:`RpcError`; anything else it raises is
answered as an internal error. A server request is never left unanswered (codex would wait on it forever).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import orjson

from scillm_core.jsonio import loads

__all__ = ["METHOD_NOT_FOUND", "RpcClient", "RpcError"]

METHOD_NOT_FOUND = -32601
INTERNAL_ERROR = -32603

Handler = Callable[[str, Mapping[str, Any]], Awaitable[Any]]


class RpcError(Exception):
    """An error response, received (from a request of ours) or to send (from a handler)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


class RpcClient:
    def __init__(self, write: Callable[[bytes], Awaitable[None]], *, on_notification: Callable[[str, Any], None],
                 on_request: Handler, on_noise: Callable[[bytes], None] = lambda line: None,
                 spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]] = asyncio.ensure_future) -> None:
        """``spawn`` starts the task that answers a server request (the owner's, so that it can await them when
        it stops); :meth:`close` cancels those still running."""
        self._write = write
        self._spawn = spawn
        self.on_notification, self.on_request, self.on_noise = on_notification, on_request, on_noise
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._answering: set[asyncio.Task[None]] = set()
        self.closed: str | None = None

    async def request(self, method: str, params: Mapping[str, Any] | None = None, *,
                      timeout: float | None = None) -> Any:
        """Send a request and wait for its result; :class:`RpcError` for an error response, ``ConnectionError``
        when the child went away first, ``TimeoutError`` after ``timeout`` seconds."""
        if self.closed:
            raise ConnectionResetError(self.closed)
        msg_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        try:
            await self._send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": dict(params or {})})
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        finally:
            self._pending.pop(msg_id, None)

    async def notify(self, method: str, params: Mapping[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = dict(params)
        await self._send(message)

    async def _send(self, message: Mapping[str, Any]) -> None:
        await self._write(orjson.dumps(message) + b"\n")

    def feed(self, line: bytes) -> None:
        """One line of the child's stdout (the owner's ``ManagedProcess.on_stdout``)."""
        if not line.strip():
            return
        try:
            message = loads(line)  # nesting bounded: a hostile line is noise, not a crash later
        except orjson.JSONDecodeError:
            message = None
        if not isinstance(message, dict):
            self.on_noise(line)
            return
        method, msg_id = message.get("method"), message.get("id")
        if isinstance(method, str) and msg_id is not None:
            task = self._spawn(self._answer(msg_id, method, message.get("params") or {}))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)
        elif isinstance(method, str):
            self.on_notification(method, message.get("params") or {})
        elif isinstance(msg_id, int) and msg_id in self._pending:
            future = self._pending[msg_id]
            if future.done():
                return
            error = message.get("error")
            if isinstance(error, dict):
                future.set_exception(RpcError(int(error.get("code") or 0), str(error.get("message") or "error"),
                                              error.get("data")))
            else:
                future.set_result(message.get("result"))
        else:
            self.on_noise(line)

    async def _answer(self, msg_id: Any, method: str, params: Any) -> None:
        try:
            result = await self.on_request(method, params if isinstance(params, Mapping) else {})
            reply: dict[str, Any] = {"jsonrpc": "2.0", "id": msg_id, "result": result}
        except RpcError as exc:
            reply = {"jsonrpc": "2.0", "id": msg_id, "error": {"code": exc.code, "message": exc.message}}
        except Exception as exc:  # a handler bug still gets an answer, or codex would wait forever
            reply = {"jsonrpc": "2.0", "id": msg_id,
                     "error": {"code": INTERNAL_ERROR, "message": f"scillm failed to answer {method}: "
                                                                  f"{type(exc).__name__}"}}
        with contextlib.suppress(ConnectionError):
            await self._send(reply)

    def close(self, reason: str) -> None:
        """The child is gone: fail every pending request with ``ConnectionResetError(reason)``."""
        self.closed = reason
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionResetError(reason))
        for task in self._answering:
            task.cancel()
