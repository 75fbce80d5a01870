"""OpenCode bus events of one session -> scillm's normalised run events (what ``events.jsonl`` and the SSE streams
carry): ``user_message``, ``transcript_delta``, ``reasoning_delta``, ``tool_call`` (on each status change),
``permission_requested``, ``permission_replied``, ``retry``. Pure bookkeeping, no I/O."""

from __future__ import annotations

from typing import Any

__all__ = ["EXCERPT", "SessionEvents", "obj"]

EXCERPT = 2000        # characters of a tool's input/output kept in an event
DIFF_EXCERPT = 8000   # characters of a permission request's diff kept in an event


def _cut(value: Any, limit: int = EXCERPT) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"... [{len(value) - limit} more characters]"
    return value


def obj(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one (bus payloads are not trusted to have a shape)."""
    return value if isinstance(value, dict) else {}


def _small(value: Any) -> Any:
    """A tool input for an event: strings cut, structure kept (at most a few levels)."""
    if isinstance(value, dict):
        return {str(k)[:100]: _small(v) for k, v in list(value.items())[:50]}
    if isinstance(value, list):
        return [_small(v) for v in value[:50]]
    return _cut(value)


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
            if info.get("id") and info.get("role"):
                self.roles[str(info["id"])] = str(info["role"])
            return []
        if kind == "message.part.updated":
            return self._part(obj(props.get("part")))
        if kind == "message.part.delta":
            return self._delta(props)
        if kind == "permission.asked":
            meta = obj(props.get("metadata"))
            return [("permission_requested", {
                "permission_id": props.get("id"), "permission": props.get("permission"),
                "patterns": _small(props.get("patterns") or []), "filepath": meta.get("filepath"),
                "diff": _cut(meta.get("diff"), DIFF_EXCERPT)})]
        if kind == "permission.replied":
            return [("permission_replied", {"permission_id": props.get("requestID"), "reply": props.get("reply")})]
        if kind == "session.status":
            status = obj(props.get("status"))
            if status.get("type") == "retry":
                return [("retry", {"attempt": status.get("attempt"), "message": _cut(status.get("message"))})]
        return []

    def _part(self, part: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        part_id, kind, message_id = str(part.get("id") or ""), str(part.get("type") or ""), part.get("messageID")
        if part_id:
            self.parts[part_id] = kind
        if kind == "tool":
            state = obj(part.get("state"))
            status = str(state.get("status") or "")
            call_id = str(part.get("callID") or part_id)
            if not status or self.tools.get(call_id) == status:
                return []
            self.tools[call_id] = status
            fields: dict[str, Any] = {"call_id": call_id, "tool": part.get("tool"), "status": status}
            if status != "pending":
                fields["input"] = _small(state.get("input") or {})
            if status == "completed":
                fields["output"] = _cut(state.get("output"))
                if state.get("title"):
                    fields["title"] = _cut(state.get("title"), 200)
            if status == "error":
                fields["error"] = _cut(state.get("error"))
            return [("tool_call", fields)]
        if kind not in ("text", "reasoning") or part.get("synthetic") or part.get("ignored"):
            return []
        text = str(part.get("text") or "")
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
        part_id = str(props.get("partID") or "")
        delta = str(props.get("delta") or "")
        if not delta or self.roles.get(str(props.get("messageID"))) == "user":
            return []
        self.sent[part_id] = self.sent.get(part_id, 0) + len(delta)
        kind = "reasoning_delta" if self.parts.get(part_id) == "reasoning" else "transcript_delta"
        return [(kind, {"message_id": props.get("messageID"), "part_id": part_id, "delta": delta})]
