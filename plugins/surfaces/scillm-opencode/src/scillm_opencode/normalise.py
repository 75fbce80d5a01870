"""OpenCode bus events of one session -> scillm's normalised run events (what ``events.jsonl`` and the SSE streams
carry): ``user_message``, ``transcript_delta``, ``reasoning_delta``, ``tool_call`` (on each status change),
``permission_requested``, ``permission_replied``, ``retry``. Pure bookkeeping, no I/O."""

from __future__ import annotations

from typing import Any

__all__ = ["EXCERPT", "SessionEvents", "obj", "one", "string"]

EXCERPT = 2000        # characters of a tool's input/output kept in an event
DIFF_EXCERPT = 8000   # characters of a permission request's diff kept in an event


def _cut(value: Any, limit: int = EXCERPT) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"... [{len(value) - limit} more characters]"
    return value


def _text(value: Any, limit: int = EXCERPT) -> str | None:
    """A text field for an event: the string cut, ``None`` when it is absent or anything else."""
    return str(_cut(value, limit)) if isinstance(value, str) else None


def obj(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one (bus payloads are not trusted to have a shape)."""
    return value if isinstance(value, dict) else {}


def _small(value: Any, depth: int = 6) -> Any:
    """A tool input for an event: strings cut, structure kept (at most ``depth`` levels, 50 items a level)."""
    if isinstance(value, (dict, list)) and depth <= 0:
        return "[" + ("object" if isinstance(value, dict) else "array") + " nested too deep]"
    if isinstance(value, dict):
        return {str(k)[:100]: _small(v, depth - 1) for k, v in list(value.items())[:50]}
    if isinstance(value, list):
        return [_small(v, depth - 1) for v in value[:50]]
    return _cut(value)


def one(value: Any, limit: int = 200) -> str | int | float | bool | None:
    """A field that should be one scalar (an id, a name, a status): a string cut to ``limit``, a number or bool as
    it is, anything else (an object where a name belongs) ``None``."""
    if isinstance(value, str):
        return value[:limit]
    return value if isinstance(value, (int, float, bool)) else None


def string(value: Any) -> str:
    """A text field: the string, or empty when it is anything else."""
    return value if isinstance(value, str) else ""


class SessionEvents:
    """Normalises the bus events of one session (and notes its subagent sessions)."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.roles: dict[str, str] = {}          # messageID -> user | assistant
        self.parts: dict[str, str] = {}          # partID -> text | reasoning | tool | ...
        self.sent: dict[str, int] = {}           # partID -> characters already sent as deltas
        self.user_parts: set[str] = set()
        self.tools: dict[str, str] = {}          # callID -> last status sent
        self.children: set[str] = set()

    def feed(self, event: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        kind = event.get("type")
        props = obj(event.get("properties"))
        if kind == "message.updated":
            info = obj(props.get("info"))
            if one(info.get("id")) and one(info.get("role")):
                self.roles[str(one(info["id"]))] = str(one(info["role"]))
            return []
        if kind == "message.part.updated":
            return self._part(obj(props.get("part")))
        if kind == "message.part.delta":
            return self._delta(props)
        if kind == "permission.asked":
            meta = obj(props.get("metadata"))
            return [("permission_requested", {
                "permission_id": one(props.get("id")), "permission": one(props.get("permission")),
                "patterns": _small(props.get("patterns") or [], 2), "filepath": one(meta.get("filepath"), 4096),
                "diff": _text(meta.get("diff"), DIFF_EXCERPT)})]
        if kind == "permission.replied":
            return [("permission_replied", {"permission_id": one(props.get("requestID")),
                                            "reply": one(props.get("reply"))})]
        if kind == "session.status":
            status = obj(props.get("status"))
            if status.get("type") == "retry":
                return [("retry", {"attempt": one(status.get("attempt")),
                                   "message": _text(status.get("message"))})]
        return []

    def _part(self, part: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        part_id, kind, message_id = str(one(part.get("id")) or ""), string(part.get("type")), one(part.get("messageID"))
        if part_id:
            self.parts[part_id] = kind
        if kind == "tool":
            state = obj(part.get("state"))
            status = str(one(state.get("status"), 40) or "")
            call_id = str(one(part.get("callID")) or part_id)
            if not status or self.tools.get(call_id) == status:
                return []
            self.tools[call_id] = status
            fields: dict[str, Any] = {"call_id": call_id, "tool": one(part.get("tool")), "status": status}
            if status != "pending":
                fields["input"] = _small(state.get("input") or {})
            if status == "completed":
                fields["output"] = _text(state.get("output"))
                if string(state.get("title")):
                    fields["title"] = _cut(state["title"], 200)
            if status == "error":
                fields["error"] = _text(state.get("error"))
            return [("tool_call", fields)]
        if kind not in ("text", "reasoning") or part.get("synthetic") or part.get("ignored"):
            return []
        text = string(part.get("text"))
        if self.roles.get(str(message_id)) == "user":
            if part_id in self.user_parts or not text:
                return []
            self.user_parts.add(part_id)
            return [("user_message", {"message_id": message_id, "text": _cut(text, 20000)})]
        # an assistant part: send what the deltas have not (providers that do not stream send it whole here)
        done = self.sent.get(part_id, 0)
        if len(text) <= done:
            return []
        self.sent[part_id] = len(text)
        return [(f"{'reasoning' if kind == 'reasoning' else 'transcript'}_delta",
                 {"message_id": message_id, "part_id": part_id, "delta": text[done:]})]

    def _delta(self, props: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if props.get("field") != "text":
            return []
        part_id, message_id = str(one(props.get("partID")) or ""), one(props.get("messageID"))
        delta = string(props.get("delta"))
        if not delta or self.roles.get(str(message_id)) == "user":
            return []
        self.sent[part_id] = self.sent.get(part_id, 0) + len(delta)
        kind = "reasoning_delta" if self.parts.get(part_id) == "reasoning" else "transcript_delta"
        return [(kind, {"message_id": message_id, "part_id": part_id, "delta": delta})]
