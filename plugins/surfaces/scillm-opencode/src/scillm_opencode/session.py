"""Driving OpenCode sessions over the server's event bus: one :class:`Bus` per directory (one ``/event`` stream,
opened before any prompt so nothing is missed, dispatching by session id; no polling), and one
:class:`SessionDriver` per session: create it with its agent and permission rules, send prompts with
``prompt_async``, turn its events into normalised run events, and tell when it went idle or failed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from scillm_opencode.client import ID, ServeError
from scillm_opencode.normalise import SessionEvents, obj, one, string
from scillm_opencode.serve import Server

__all__ = ["Bus", "SessionDriver", "Ended", "first_of"]

log = logging.getLogger("scillm.opencode")

Emit = Callable[[str, dict[str, Any]], None]


class Ended:
    IDLE = "idle"          # the session finished its turn
    ERROR = "error"        # OpenCode reported session.error
    TIMEOUT = "timeout"
    STOPPED = "stopped"    # the caller asked to stop (abort)
    LOST = "lost"          # the server died or the event stream broke


async def first_of(waiters: list[asyncio.Future[Any]], timeout_s: float | None) -> set[asyncio.Future[Any]]:
    """Wait until one of ``waiters`` is done (or ``timeout_s`` passed); the rest are cancelled and awaited, so none
    is left pending (and none outlives a cancelled caller)."""
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    return done


class Bus:
    """The ``/event?directory=`` stream of one directory, dispatched to the drivers watching its sessions."""

    def __init__(self, server: Server, directory: str) -> None:
        self.server = server
        self.directory = directory
        self.watchers: dict[str, SessionDriver] = {}
        self.connected = asyncio.Event()
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def open(self, timeout_s: float = 60.0) -> None:
        self._task = asyncio.ensure_future(self._read())
        await first_of([asyncio.ensure_future(e.wait()) for e in (self.connected, self.lost, self.server.died)],
                       timeout_s)
        if not self.connected.is_set():
            await self.close()
            raise ServeError(f"opencode serve did not open its event stream ({self.lost_reason or 'no answer'})",
                             status=503)

    async def _read(self) -> None:
        try:
            async for event in self.server.client.events(self.directory):
                if event.get("type") == "server.connected":
                    self.connected.set()
                    continue
                props = obj(event.get("properties"))
                session = props.get("sessionID")
                info = obj(props.get("info"))
                parent, child = info.get("parentID"), one(info.get("id"))
                if event.get("type") == "session.created" and isinstance(parent, str) and parent in self.watchers \
                        and isinstance(child, str):
                    self.watchers[parent].adopt(child)
                driver = self.watchers.get(session) if isinstance(session, str) else None
                if driver is not None:
                    try:
                        driver.on_bus(event)
                    except Exception as exc:  # one session's unreadable event fails that session, not the stream
                        log.warning("opencode session %s: an event scillm could not read (%s)", session,
                                    type(exc).__name__)
                        driver.fail(f"scillm could not read an OpenCode event of type {one(event.get('type'), 80)!r}"
                                    f" ({type(exc).__name__})")
            self.lost_reason = "the server closed the event stream"
        except ServeError as exc:
            self.lost_reason = exc.message
        except Exception as exc:  # never let a bug here leave runs waiting forever
            log.error("opencode event stream reader failed (%s)", type(exc).__name__)
            self.lost_reason = f"event stream reader failed: {type(exc).__name__}"
        finally:
            self.lost.set()

    async def why_lost(self) -> str:
        """Why the stream ended: a managed server's exit if that is the cause (it is noticed a moment later)."""
        if self.server.managed and not self.server.died.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.server.died.wait(), 2.0)
        return self.server.death or self.lost_reason or "lost the OpenCode server"

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


class SessionDriver:
    """One OpenCode session. ``emit`` receives the normalised events while the owner wants them."""

    def __init__(self, bus: Bus, emit: Emit, *, on_child: Callable[[str], None] | None = None) -> None:
        self.bus = bus
        self.emit = emit
        self.on_child = on_child
        self.session_id: str | None = None
        self.events: SessionEvents | None = None
        self.idle = asyncio.Event()
        self.error: str | None = None
        self.pending: dict[str, dict[str, Any]] = {}   # permission requests not answered yet
        self.wrote: list[str] = []                      # tools that changed files (edit, write, patch)
        self.busy = False
        self.muted = False                              # set once the owner's state is terminal

    @property
    def client(self) -> Any:
        return self.bus.server.client

    async def create(self, body: Mapping[str, Any]) -> str:
        session = await self.client.create_session(self.bus.directory, body)
        self.session_id = str(session["id"])
        self.events = SessionEvents(self.session_id)
        self.bus.watchers[self.session_id] = self
        return self.session_id

    def adopt(self, child: str) -> None:
        """A subagent session started from ours: its model calls belong to our run."""
        if self.on_child is not None:
            self.on_child(child)

    async def prompt(self, body: Mapping[str, Any]) -> None:
        assert self.session_id is not None
        self.idle.clear()
        self.busy = True
        await self.client.prompt_async(self.bus.directory, self.session_id, body)

    def on_bus(self, event: dict[str, Any]) -> None:
        if self.muted or self.events is None:
            return
        kind = event.get("type")
        props = obj(event.get("properties"))
        for name, fields in self.events.feed(event):
            if name == "permission_requested":
                permission_id = fields.get("permission_id")
                if not isinstance(permission_id, str) or not ID.match(permission_id):
                    fields["error"] = ("opencode serve sent this permission request without a usable id: it cannot "
                                       "be answered (a reply to it is a 502)")
                if isinstance(permission_id, str):
                    self.pending[permission_id] = fields
            elif name == "permission_replied":
                self.pending.pop(str(fields.get("permission_id")), None)
            elif name == "tool_call" and fields.get("status") == "completed" and \
                    fields.get("tool") in ("edit", "write", "patch", "multiedit", "apply_patch"):
                self.wrote.append(str(fields.get("tool")))
            self.emit(name, fields)
        if kind == "session.status":
            self.busy = obj(props.get("status")).get("type") != "idle"
        elif kind == "session.idle":
            self.busy = False
            self.idle.set()
        elif kind == "session.error":
            error = obj(props.get("error"))
            name = one(error.get("name"), 100)
            message = string(obj(error.get("data")).get("message")) or name or "session error"
            self.fail(f"{name or 'Error'}: {str(message)[:500]}")

    def fail(self, error: str) -> None:
        """The session failed (the first error is the cause; later ones repeat it with a stack)."""
        if self.error is None:
            self.error = error
        self.idle.set()

    async def wait(self, *, timeout_s: float | None, stop: asyncio.Event) -> str:
        """Until the session is idle or failed, the deadline passes, ``stop`` is set, or the server goes away."""
        waiters = {asyncio.ensure_future(self.idle.wait()): Ended.IDLE,
                   asyncio.ensure_future(stop.wait()): Ended.STOPPED,
                   asyncio.ensure_future(self.bus.lost.wait()): Ended.LOST,
                   asyncio.ensure_future(self.bus.server.died.wait()): Ended.LOST}
        done = await first_of(list(waiters), timeout_s)
        if not done:
            return Ended.TIMEOUT
        ended = min((waiters[d] for d in done), key=[Ended.STOPPED, Ended.LOST, Ended.IDLE].index)
        if ended == Ended.IDLE and self.error is not None:
            return Ended.ERROR
        return ended

    async def abort(self, grace_s: float = 10.0) -> bool:
        """Abort the session; whether it is no longer busy, known as soon as either says so: the abort's answer
        ``true`` (``opencode serve`` answers once it has stopped the session's work and set it idle, announcing
        ``session.idle``), or the session's ``session.idle`` / ``session.error`` on the bus. Only a server whose abort
        answers something else is waited for (its idle, at most ``grace_s``), then asked for the session's status."""
        if self.session_id is None or self.bus.server.died.is_set():
            return True
        self.idle.clear()
        call = asyncio.ensure_future(self.client.abort(self.bus.directory, self.session_id))
        try:
            await first_of([asyncio.shield(call), asyncio.ensure_future(self.idle.wait())], None)
            if self.idle.is_set():  # it said so on the bus: the abort's answer is not waited for
                return True
            if call.result():
                return True
        except ServeError:
            return False
        finally:
            if not call.done():
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
        never = asyncio.Event()
        if await self.wait(timeout_s=grace_s, stop=never) in (Ended.IDLE, Ended.ERROR):
            return True
        with contextlib.suppress(ServeError):
            status = await self.client.status(self.bus.directory)
            return self.session_id not in status
        return False

    async def messages(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        assert self.session_id is not None
        return await self.client.messages(self.bus.directory, self.session_id,  # type: ignore[no-any-return]
                                          timeout_s=timeout_s)

    async def reply(self, permission_id: str, reply: str, message: str | None) -> None:
        await self.client.reply_permission(self.bus.directory, permission_id, reply, message)

    async def close(self) -> None:
        self.muted = True
        if self.session_id is not None:
            self.bus.watchers.pop(self.session_id, None)


def assistant_text(messages: list[dict[str, Any]]) -> tuple[str, bool]:
    """The text of the assistant messages after the last user message, and whether a user message is still
    unanswered (a steer that arrived after the last model call: the session will take another turn)."""
    roles = [obj(obj(m).get("info")).get("role") for m in messages]
    last_user = max((i for i, role in enumerate(roles) if role == "user"), default=-1)
    answered = "assistant" in roles[last_user + 1:]
    texts: list[str] = []
    first_user = next((i for i, role in enumerate(roles) if role == "user"), -1)
    for message, role in list(zip(messages, roles, strict=True))[first_user + 1:]:
        if role != "assistant":
            continue
        parts = obj(message).get("parts")
        for part in parts if isinstance(parts, list) else []:
            part = obj(part)
            if part.get("type") == "text" and not part.get("synthetic") and string(part.get("text")):
                texts.append(part["text"])
    return "\n\n".join(t.strip() for t in texts if t.strip()), last_user >= 0 and not answered
