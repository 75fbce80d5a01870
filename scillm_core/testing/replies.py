"""Provider-neutral scripted answers. Each fake upstream renders a :class:`Reply` in its own wire format,
streaming or not as the request asked, so one script drives the contract tests of every provider."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from attrs import field, frozen

__all__ = ["Reply", "ToolCallSpec", "fake_vector"]


def fake_vector(value: Any, dimensions: int = 8) -> list[float]:
    """The deterministic embedding every fake upstream returns for ``value`` (a text or a token array), so tests can
    check that each vector reached the client in its input's place. Values are multiples of 1/128 in [-1, 1), exact
    in float32, so a base64 round trip compares equal."""
    digest = hashlib.sha256(repr(value).encode()).digest()
    while len(digest) < dimensions:
        digest += hashlib.sha256(digest).digest()
    return [(byte - 128) / 128 for byte in digest[:dimensions]]


@frozen
class ToolCallSpec:
    name: str
    arguments: Mapping[str, Any]
    id: str | None = None


@frozen(kw_only=True)
class Reply:
    text: str = ""
    reasoning: str | None = None
    tool_calls: tuple[ToolCallSpec, ...] = ()
    finish_reason: str | None = None       # default: "tool_calls" with tool calls, else "stop"
    prompt_tokens: int = 11
    completion_tokens: int = 7
    cached_tokens: int = 0                  # prompt-cache reads (Anthropic: besides input; OpenAI: part of prompt)
    cache_write_tokens: int = 0             # prompt-cache writes (Anthropic's cache_creation_input_tokens)
    model: str | None = None               # default: the requested model
    # the answer as text blocks with the citations of each (Anthropic's document citations): ``text`` is theirs
    cited: tuple[tuple[str, tuple[Mapping[str, Any], ...]], ...] = ()
    # failures
    status: int = 200
    error: Any = None                       # body for an error status (dict, or str for the fake to wrap)
    headers: Mapping[str, str] = field(factory=dict)
    # timing and stream shape
    delay_s: float = 0.0                    # before the response starts
    first_chunk_delay_s: float = 0.0        # streams: after headers, before the first event
    hang: bool = False                      # never answer (deadline tests)
    chunk_size: int = 4                     # characters of text per content delta
    keepalive: bool = False                 # ": keep-alive" comments before the first event (DeepSeek)
    usage_in_finish: bool = False           # usage inside the finish chunk (GLM, Groq)
    whole_tool_call: bool = False           # tool call in one delta with full arguments (GLM)
    sparse_final: bool = False              # Responses: the terminal event's response holds only id and usage, as
                                            # Codex's own mock server sends it
    cut_after: int | None = None            # drop the connection after N events
    stall_after: int | None = None          # after N events send nothing more, keeping the connection open
    end_after: int | None = None            # after N events end the body cleanly, mid-answer
    error_after: int | None = None          # send an error event after N events
    malformed_at: tuple[int, ...] = ()      # an unparseable event before each of these events (0-based)
    garbage: bytes | None = None            # that event's bytes (default: the fake's own broken event)
    no_terminal: bool = False               # leave out the end marker (OpenAI ``[DONE]``, Anthropic message_stop)
    error_event: Any = None                 # its payload: a dict (JSON), or bytes sent as the event data verbatim
    raw: bytes | None = None                # a non-streamed body sent verbatim with ``status`` (malformed answers)

    @classmethod
    def say(cls, text: str, **kw: Any) -> Reply:
        return cls(text=text, **kw)

    @classmethod
    def cite(cls, *blocks: tuple[str, tuple[Mapping[str, Any], ...]], **kw: Any) -> Reply:
        """An answer in text blocks, each with its citations (``()`` for none)."""
        return cls(text="".join(text for text, _ in blocks), cited=tuple(blocks), **kw)

    @classmethod
    def call(cls, name: str, arguments: Mapping[str, Any], *, id: str | None = None, **kw: Any) -> Reply:
        return cls(tool_calls=(ToolCallSpec(name, dict(arguments), id),), **kw)

    @classmethod
    def fail(cls, status: int, message: str = "upstream failure", *, type: str | None = None,
             code: str | None = None, headers: Mapping[str, str] | None = None, body: Any = None) -> Reply:
        error = body if body is not None else {"message": message, "type": type, "code": code}
        return cls(status=status, error=error, headers=dict(headers or {}))

    @property
    def finish(self) -> str:
        return self.finish_reason or ("tool_calls" if self.tool_calls else "stop")

    def text_pieces(self) -> list[str]:
        size = max(1, self.chunk_size)
        return [self.text[i:i + size] for i in range(0, len(self.text), size)]
