"""Provider-neutral chat models: what surfaces parse into and providers translate from.

Frozen and keyword-only; change them with ``attrs.evolve``. ``extra`` keeps wire keys core does not model so
OpenAI-compatible upstreams still receive them (and clients still see upstream extras such as
``reasoning_content``). Wire (de)serialisation lives in :mod:`scillm_core.models.convert`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from attrs import evolve, field, frozen

from scillm_core.errors import InvalidRequest
from scillm_core.jsonio import json_type
from scillm_core.models.native import NativeRequest, with_native

__all__ = [
    "CACHE_CONTROL", "CARRIED", "MAX_TOKEN_COUNT", "REASONING_CONTENT", "THINKING_BLOCKS", "ChatChunk", "ChatRequest",
    "ChatResponse", "Choice", "ChunkChoice", "Delta", "FileData", "FilePart", "FunctionCall", "FunctionCallDelta",
    "FunctionDef", "ImagePart", "ImageUrl", "Message", "OtherPart", "Part", "Role", "TextPart", "Tool", "ToolCall",
    "ToolCallDelta", "Usage", "token_count", "without_carried",
]

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
_EMPTY: Mapping[str, Any] = {}

# ``native`` fields hold the same-dialect form of a request or answer (see :mod:`scillm_core.models.native`):
# never on the wire, not compared, and dropped by ``attrs.evolve`` (a changed object is translated, with its change)


@frozen(kw_only=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"
    cache_control: Mapping[str, Any] | None = None  # a prompt-cache breakpoint (Anthropic's marker)


@frozen(kw_only=True)
class ImageUrl:
    url: str
    detail: str | None = None


@frozen(kw_only=True)
class ImagePart:
    image_url: ImageUrl
    type: Literal["image_url"] = "image_url"
    cache_control: Mapping[str, Any] | None = None


@frozen(kw_only=True)
class FileData:
    file_data: str | None = None
    filename: str | None = None
    file_id: str | None = None


@frozen(kw_only=True)
class FilePart:
    file: FileData
    type: Literal["file"] = "file"
    cache_control: Mapping[str, Any] | None = None


@frozen(kw_only=True)
class OtherPart:
    """A content part core does not model (``input_audio``, provider-specific parts); passed through as is."""

    type: str
    data: Mapping[str, Any] = _EMPTY


Part = TextPart | ImagePart | FilePart | OtherPart


@frozen(kw_only=True)
class FunctionCall:
    name: str
    arguments: str = ""


@frozen(kw_only=True)
class ToolCall:
    id: str
    function: FunctionCall
    type: str = "function"
    extra: Mapping[str, Any] = _EMPTY


@frozen(kw_only=True)
class Message:
    role: Role
    content: str | tuple[Part, ...] | None = None
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] | None = None
    tool_call_id: str | None = None
    extra: Mapping[str, Any] = _EMPTY

    @property
    def text(self) -> str:
        """The message's text, parts joined; empty when it has none."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))


@frozen(kw_only=True)
class FunctionDef:
    name: str
    description: str | None = None
    parameters: Mapping[str, Any] | None = None
    strict: bool | None = None


@frozen(kw_only=True)
class Tool:
    function: FunctionDef
    type: str = "function"
    cache_control: Mapping[str, Any] | None = None


def _check_response_format(_: Any, __: Any, value: Mapping[str, Any] | None) -> None:
    """The shape of ``response_format``, checked for every surface and provider before any upstream call (a
    ``json_schema`` of ``5`` otherwise went upstream and came back as an answer that is not JSON, a 502)."""
    if value is None:
        return
    where = "$.response_format"
    if not isinstance(value.get("type"), str):
        raise InvalidRequest(f"response_format needs a type (text, json_object or json_schema) @ {where}.type",
                             param=f"{where}.type")
    if value["type"] != "json_schema":
        return
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping):
        raise InvalidRequest(f"response_format of type json_schema needs json_schema, an object with name and "
                             f"schema; got {json_type(spec)} @ {where}.json_schema", param=f"{where}.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"json_schema needs a name (a non-empty string) @ {where}.json_schema.name",
                             param=f"{where}.json_schema.name")
    if "schema" in spec and not isinstance(spec["schema"], Mapping):
        raise InvalidRequest(f"json_schema.schema must be a JSON Schema object, got {json_type(spec['schema'])} "
                             f"@ {where}.json_schema.schema", param=f"{where}.json_schema.schema")
    if "strict" in spec and not isinstance(spec["strict"], bool | None):
        raise InvalidRequest(f"json_schema.strict must be true or false @ {where}.json_schema.strict",
                             param=f"{where}.json_schema.strict")


@frozen(kw_only=True)
class ChatRequest:
    """One chat call. ``scillm`` holds scillm's own request fields (never sent upstream); ``native`` the client's
    own body when a dialect surface built the request (:class:`~scillm_core.models.native.NativeRequest`)."""

    model: str
    messages: tuple[Message, ...]
    stream: bool = False
    stream_options: Mapping[str, Any] | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | tuple[str, ...] | None = None
    n: int | None = None
    seed: int | None = None
    tools: tuple[Tool, ...] | None = None
    tool_choice: str | Mapping[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: Mapping[str, Any] | None = field(default=None, validator=_check_response_format)
    reasoning_effort: str | None = None
    extra: Mapping[str, Any] = _EMPTY
    scillm: Mapping[str, Any] = field(default=_EMPTY)
    native: NativeRequest | None = field(default=None, init=False, eq=False, repr=False)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else self.stop


#: The ``extra`` key of an assistant message that carries Anthropic's signed thinking blocks (``thinking`` with its
#: ``signature``, ``redacted_thinking``), as LiteLLM names them: Anthropic wants them back, unchanged, in a tool loop
#: with thinking on. Surfaces turn their dialect's carrier into it (a Messages assistant turn's thinking blocks, a
#: Responses reasoning item's ``encrypted_content``). Also the capability of a provider that takes them back; every
#: other provider's attempt gets the request without them (core's dispatch, :func:`without_carried`).
THINKING_BLOCKS = "thinking_blocks"

#: The ``extra`` key of an assistant message that carries the model's reasoning as text, as DeepSeek, Kimi and GLM
#: send it: their thinking models want it back on the assistant turns of a tool loop (Kimi answers 400 without it),
#: while OpenAI's own API knows no such key. Surfaces fill it from their dialect's carrier (a Messages thinking
#: block's text, a Responses reasoning item's summary); also the capability of a provider that takes it back.
REASONING_CONTENT = "reasoning_content"

#: Anthropic's prompt-cache markers (``cache_control`` on parts, tools, and in a message's ``extra`` for the
#: message's last block), which surfaces carry from their dialect; also the capability of a provider that takes
#: them. Every other provider's attempt gets the request without them (:func:`without_carried`): they are an
#: Anthropic notion.
CACHE_CONTROL = "cache_control"

#: What a request may carry that only some providers take, each for the providers with its capability: the
#: model's earlier reasoning on assistant turns, and the prompt-cache markers. Each is a message ``extra`` key (the
#: markers also sit on parts and tools).
CARRIED = (THINKING_BLOCKS, REASONING_CONTENT, CACHE_CONTROL)


def without_carried(request: ChatRequest, capabilities: frozenset[str], *, as_sent: bool = False) -> ChatRequest:
    """``request`` without what it carries (:data:`CARRIED`) that a provider with ``capabilities`` does not take;
    ``request`` itself when there is nothing to leave out. Core's dispatch decides it for each attempt, so every
    member of a group gets what it takes, whichever is first. A message left without markers whose content is text
    parts only is one string again, the parts joined with a blank line (as the Messages surface joins unmarked
    blocks). Its native body stays: surfaces keep carried thinking out of the bodies other upstreams take as sent,
    and a body sent as it came keeps the client's markers; ``as_sent`` (the provider sends that body) leaves the
    markers on the model too, unlooked for."""
    dropped = {key for key in CARRIED if key not in capabilities}
    if not dropped:
        return request
    unmark = not as_sent and CACHE_CONTROL in dropped
    if not unmark:
        dropped.discard(CACHE_CONTROL)
        if not dropped:
            return request
    tools = request.tools
    marked_tools = unmark and tools is not None and any(t.cache_control is not None for t in tools)
    messages = request.messages
    if not marked_tools and not (_carries(messages, dropped) if unmark else
                                 any(m.extra and not dropped.isdisjoint(m.extra) for m in messages)):
        return request
    plain = tuple(_without(m, dropped, unmark) for m in messages)
    if marked_tools and tools is not None:
        tools = tuple(evolve(t, cache_control=None) if t.cache_control is not None else t for t in tools)
    return with_native(evolve(request, messages=plain, tools=tools), request.native)


def _carries(messages: tuple[Message, ...], dropped: set[str]) -> bool:
    """Whether a message carries one of ``dropped`` or a part a marker; one pass."""
    for m in messages:
        if (m.extra and not dropped.isdisjoint(m.extra)) or (type(m.content) is tuple and _marked_parts(m.content)):
            return True
    return False


def _marked_parts(parts: tuple[Part, ...]) -> bool:
    for p in parts:
        if type(p) is not OtherPart and p.cache_control is not None:  # type: ignore[union-attr]
            return True
    return False


def _without(message: Message, dropped: set[str], unmark: bool) -> Message:
    """``message`` without the ``dropped`` carriers (its parts' markers too when ``unmark``)."""
    marked = unmark and type(message.content) is tuple and _marked_parts(message.content)
    if not marked and not (message.extra and not dropped.isdisjoint(message.extra)):
        return message
    marked = marked or (unmark and CACHE_CONTROL in message.extra)
    extra = {k: v for k, v in message.extra.items() if k not in dropped}
    content = message.content
    if marked and isinstance(content, tuple):
        parts = tuple(evolve(p, cache_control=None) if not isinstance(p, OtherPart) and p.cache_control is not None
                      else p for p in content)
        content = "\n\n".join(p.text for p in parts if isinstance(p, TextPart)) \
            if all(isinstance(p, TextPart) for p in parts) else parts
        return evolve(message, content=content, extra=extra)
    return evolve(message, extra=extra)


MAX_TOKEN_COUNT = 10**12  # no answer is a trillion tokens


def token_count(value: Any) -> int:
    """A token count as an upstream reported it, made safe to add, price, store and send on: a whole number from 0
    to :data:`MAX_TOKEN_COUNT`. Anything else (``-1``, ``1e308``, ``2**70``, a string) is an upstream's nonsense and
    counts 0: it would otherwise overflow a price or a JSON encoder far from where it came in."""
    if type(value) is int and 0 <= value <= MAX_TOKEN_COUNT:
        return value
    if type(value) is float and 0 <= value <= MAX_TOKEN_COUNT:  # (NaN fails both bounds)
        return int(value)
    return 0


@frozen(kw_only=True)
class Usage:
    """Token counts, each :func:`token_count`-checked however it was made."""

    prompt_tokens: int = field(default=0, converter=token_count)
    completion_tokens: int = field(default=0, converter=token_count)
    total_tokens: int = field(default=0, converter=token_count)
    extra: Mapping[str, Any] = _EMPTY


@frozen(kw_only=True)
class Choice:
    message: Message
    index: int = 0
    finish_reason: str | None = None
    logprobs: Any = None
    extra: Mapping[str, Any] = _EMPTY


@frozen(kw_only=True)
class ChatResponse:
    id: str
    model: str
    choices: tuple[Choice, ...]
    created: int = 0
    usage: Usage | None = None
    system_fingerprint: str | None = None
    object: str = "chat.completion"
    extra: Mapping[str, Any] = _EMPTY
    # the upstream's body as it came, in the client's dialect
    native: bytes | None = field(default=None, init=False, eq=False, repr=False)

    @property
    def text(self) -> str:
        return self.choices[0].message.text if self.choices else ""


@frozen(kw_only=True)
class FunctionCallDelta:
    name: str | None = None
    arguments: str | None = None


@frozen(kw_only=True)
class ToolCallDelta:
    index: int = 0
    id: str | None = None
    type: str | None = None
    function: FunctionCallDelta | None = None


@frozen(kw_only=True)
class Delta:
    role: str | None = None
    content: str | None = None
    tool_calls: tuple[ToolCallDelta, ...] | None = None
    extra: Mapping[str, Any] = _EMPTY


@frozen(kw_only=True)
class ChunkChoice:
    delta: Delta
    index: int = 0
    finish_reason: str | None = None
    logprobs: Any = None
    extra: Mapping[str, Any] = _EMPTY


@frozen(kw_only=True)
class ChatChunk:
    id: str
    model: str
    choices: tuple[ChunkChoice, ...] = ()
    created: int = 0
    usage: Usage | None = None
    system_fingerprint: str | None = None
    object: str = "chat.completion.chunk"
    extra: Mapping[str, Any] = _EMPTY
    # the upstream's own event bytes behind this chunk (same dialect)
    native: bytes | None = field(default=None, init=False, eq=False, repr=False)
