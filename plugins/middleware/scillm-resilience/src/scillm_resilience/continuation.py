"""Mid-stream continuation: a group's stream that breaks after its first chunk is finished by the next model.

What the client already got is kept (:class:`Sent`). The next member is asked to continue after that text: with
the partial answer as an assistant prefill when its provider takes one (``"prefill"`` in its capabilities), else
as the previous assistant turn followed by an explicit instruction to continue. What it repeats of the end of the
partial answer is cut (:class:`Overlap`), its chunks take the original stream's id, model and creation time, and
the last chunk of the whole answer says that a continuation happened, after what and by whom
(``extra["scillm_continuation"]``; the surfaces put it on their dialect's last event).

Tool calls are not continued: a stream that breaks after a tool call began ends with an error saying so. A
continuation that cannot start (the model refuses the prefill, every member fails) ends with the original error.
"""

from __future__ import annotations

from typing import Any

import attrs

from scillm_core import ChatChunk, ChatRequest, ChunkChoice, Delta, Message, errors

__all__ = ["INSTRUCTION", "Overlap", "Sent", "continuation_request", "continued", "marked", "text_chunk",
           "with_note"]

#: the user turn that asks a model without prefill to continue the partial answer above it
INSTRUCTION = ("Your previous reply, above, was cut off. Continue it from exactly where it stops: do not repeat any "
               "of it, do not comment on the interruption, write only the rest of the reply.")

MIN_OVERLAP = 4     # shorter repeats are ambiguous ("real" + "ly"): left alone
TAIL = 1024         # the end of the partial answer a repeat is looked for in (besides the whole answer)


class Sent:
    """What the client got so far, from the chunks handed on (choice 0)."""

    __slots__ = ("created", "finished", "id", "model", "reasoning", "text", "tool")

    def __init__(self) -> None:
        self.id: str | None = None
        self.model = ""
        self.created = 0
        self.text: list[str] = []
        self.reasoning = False
        self.tool: str | None = None   # the name of a tool call that began, if one did
        self.finished = False          # a finish_reason went out

    def add(self, chunk: ChatChunk) -> None:
        if self.id is None:
            self.id, self.model, self.created = chunk.id, chunk.model, chunk.created
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                self.text.append(delta.content)
            if delta.tool_calls and self.tool is None:
                function = delta.tool_calls[0].function
                self.tool = (function.name if function else None) or "?"
            if delta.extra and not self.reasoning:
                self.reasoning = bool(delta.extra.get("reasoning_content") or delta.extra.get("reasoning"))
            if choice.finish_reason is not None:
                self.finished = True

    @property
    def answer(self) -> str:
        return "".join(self.text)


def continuation_request(request: ChatRequest, partial: str, *, prefill: bool) -> ChatRequest:
    """``request`` asking for the rest after ``partial``: as an assistant prefill (without trailing whitespace,
    which prefills may not end with), or as the previous turn and :data:`INSTRUCTION`; with nothing sent yet, the
    request as it was."""
    if not partial:
        return attrs.evolve(request)
    messages = list(request.messages)
    last = messages[-1] if messages else None
    if last is not None and last.role == "assistant" and isinstance(last.content, str):
        messages[-1] = attrs.evolve(last, content=last.content + partial)  # the client's own prefill goes on
    else:
        messages.append(Message(role="assistant", content=partial))
    if prefill:
        text = messages[-1].content
        assert isinstance(text, str)
        messages[-1] = attrs.evolve(messages[-1], content=text.rstrip())
    else:
        messages.append(Message(role="user", content=INSTRUCTION))
    return attrs.evolve(request, messages=tuple(messages))


class Overlap:
    """Cuts from the start of a continuation what repeats the end of the partial answer (or the whole of it, when
    the model started over). Text is held back only while it could still be such a repeat."""

    def __init__(self, partial: str) -> None:
        self.partial = partial
        self.held = ""
        self.decided = not partial

    def feed(self, text: str) -> str:
        """What of ``text`` may go out now."""
        if self.decided:
            return text
        self.held += text
        cut = self._cut(final=False)
        if cut is None:
            return ""
        return self._release(cut)

    def flush(self) -> str:
        """At the end of the continuation: what is still held, less a repeat."""
        if self.decided:
            return ""
        return self._release(self._cut(final=True) or 0)

    def _release(self, cut: int) -> str:
        self.decided = True
        out, self.held = self.held[cut:], ""
        partial = self.partial
        trailing = len(partial) - len(partial.rstrip())
        if not cut and trailing:  # whitespace a prefill lost comes back once, not twice
            k = min(trailing, len(out) - len(out.lstrip()))
            if k and out[:k] == partial[len(partial) - k:]:
                out = out[k:]
        return out

    def _cut(self, *, final: bool) -> int | None:
        """How much of ``held`` repeats the partial answer; ``None`` while more text could make a longer repeat."""
        partial, held = self.partial, self.held
        starts = [0, *range(max(1, len(partial) - TAIL), len(partial) - MIN_OVERLAP + 1)]
        for start in starts:  # longest repeat first
            suffix = partial[start:]
            if len(held) >= len(suffix):
                if held.startswith(suffix):
                    return len(suffix)
            elif suffix.startswith(held) and not final:
                return None  # still a candidate: wait for more
        return 0


def continued(chunk: ChatChunk, sent: Sent, overlap: Overlap) -> list[ChatChunk]:
    """A continuation's chunk as part of the answer the client is getting: the original stream's id, model and
    creation time, no second role, the repeat of the partial answer cut, and no thinking about how to go on once
    text went out. Text still held back by ``overlap`` goes out before a finish, a tool call or the usage."""
    out: list[ChatChunk] = []
    choice = chunk.choices[0] if chunk.choices else None
    delta = choice.delta if choice is not None else None
    closing = choice is None or choice.finish_reason is not None or bool(delta and delta.tool_calls)
    if closing and not overlap.decided:
        held = overlap.flush()
        if held:
            out.append(text_chunk(sent, held))
    if choice is None or delta is None:
        out.append(attrs.evolve(chunk, id=sent.id or chunk.id, model=sent.model or chunk.model,
                                created=sent.created or chunk.created))
        return out
    content = overlap.feed(delta.content) if delta.content else None
    extra = delta.extra
    if extra and sent.text and ("reasoning_content" in extra or "reasoning" in extra):
        extra = {k: v for k, v in extra.items() if k not in ("reasoning_content", "reasoning")}
    if not (content or delta.tool_calls or extra or choice.finish_reason is not None or chunk.usage is not None):
        return out
    new_delta = attrs.evolve(delta, role=None, content=content or None, extra=extra)
    out.append(attrs.evolve(chunk, id=sent.id or chunk.id, model=sent.model or chunk.model,
                            created=sent.created or chunk.created,
                            choices=(attrs.evolve(choice, delta=new_delta),)))
    return out


def text_chunk(sent: Sent, text: str) -> ChatChunk:
    return ChatChunk(id=sent.id or "chatcmpl-continued", model=sent.model, created=sent.created,
                     choices=(ChunkChoice(delta=Delta(content=text)),))


def marked(chunk: ChatChunk, note: dict[str, Any]) -> ChatChunk:
    """``chunk`` carrying the continuation ``note`` (the last chunk of a continued answer)."""
    return attrs.evolve(chunk, extra={**chunk.extra, "scillm_continuation": note})


def with_note(exc: BaseException, note: str) -> BaseException:
    """``exc`` with ``note`` added to its message (a copy: the original may be shared)."""
    if not isinstance(exc, errors.ScillmError):
        return exc
    clone = type(exc).__new__(type(exc))  # not copy.copy: it would call the constructor with the message alone
    clone.__dict__.update(exc.__dict__)
    clone.message = f"{exc.message} ({note})"
    clone.args = (clone.message,)
    return clone

