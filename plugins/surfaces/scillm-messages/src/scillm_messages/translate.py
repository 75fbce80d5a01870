"""Anthropic Messages <-> core chat models.

Inbound: a Messages request body -> :class:`ChatRequest` (400 naming the JSON path on bad input).
Outbound: a :class:`ChatResponse` -> a Messages response, and a :class:`ChatChunk` stream -> the Messages event
sequence (``message_start``, ``content_block_start/delta/stop``, ``message_delta``, ``message_stop``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import orjson

from scillm_core import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    FileData,
    FilePart,
    FunctionCall,
    FunctionDef,
    ImagePart,
    ImageUrl,
    Message,
    OtherPart,
    TextPart,
    Tool,
    ToolCall,
    Usage,
    errors,
)
from scillm_core.jsonio import json_type, loads
from scillm_core.models import REASONING_CONTENT, THINKING_BLOCKS
from scillm_core.models.native import native_events

__all__ = ["STOP_REASONS", "StreamTranslator", "message_id", "parse_messages_request",
           "to_messages_response"]

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
#: Anthropic effort levels (``output_config.effort``) and thinking budgets -> OpenAI ``reasoning_effort``.
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
#: Anthropic request fields passed to Anthropic upstreams unchanged (in ``scillm["anthropic_native"]``, which only
#: the Anthropic provider reads when it translates).
NATIVE_FIELDS = ("thinking", "top_k", "metadata", "output_config", "service_tier", "context_management",
                 "mcp_servers", "container")
#: Fields that ask the upstream for something only Anthropic's Messages API delivers -> the capability (a
#: translation to another provider is refused naming them: ``scillm_core.models.params``). The others are hints
#: (``top_k``, ``service_tier``, ``metadata``, ``context_management``) or mapped (``thinking``, ``output_config``).
ASKS = {"mcp_servers": "mcp_servers", "container": "server_tools"}
#: chat request fields -> where a Messages body has them (errors about the chat request name the client's path)
FIELD_ORIGINS = {"stop": "$.stop_sequences", "reasoning_effort": "$.thinking", "parallel_tool_calls": "$.tool_choice"}
USER_BLOCKS = ("text", "image", "document", "tool_result")
ASSISTANT_BLOCKS = ("text", "tool_use", "thinking", "redacted_thinking")


def message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


# -- request -----------------------------------------------------------------------------------------------------

def _bad(message: str, path: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(f"{message} @ {path}", param=path)


def _thread_unsupported() -> errors.InvalidRequest:
    """A message thread (the server keeps the conversation, the client sends only what is new) is Anthropic's own
    state: only a body that goes to Anthropic as sent can carry one. Anywhere else the history would be lost, so it
    is refused the way Anthropic refuses a request it cannot thread, on which the SDK's tool runner resends the whole
    conversation without ``thread``."""
    return errors.InvalidRequest("this model's upstream cannot hold a message thread: send the whole conversation "
                                 "without `thread` @ $.thread", param="$.thread", code="thread_unsupported_request",
                                 details={"error_code": "thread_unsupported_request"})


def _expect(value: Any, kind: type | tuple[type, ...], name: str, path: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple)
                                                                                  else (kind,))):
        raise _bad(f"expected {name}, got {json_type(value)}", path)
    return value


def _text_or_none(block: Mapping[str, Any], key: str, path: str) -> str:
    """``block[key]``: a string, or ``""`` when absent or null."""
    value = block.get(key)
    return "" if value is None else _expect(value, str, "a string", f"{path}.{key}")  # type: ignore[no-any-return]


def _number(body: Mapping[str, Any], key: str, low: float, high: float | None = None) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    _expect(value, (int, float), "a number", f"$.{key}")
    if value < low or (high is not None and value > high):
        span = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _bad(f"{key} must be {span}, got {value}", f"$.{key}")
    return float(value)


def parse_messages_request(body: Any, *, session: str | None = None, lenient: bool = False,
                           origins: errors.Origins | None = None) -> ChatRequest:
    """Validate an Anthropic Messages body and translate it to a :class:`ChatRequest`.

    Unknown top-level keys (new betas) are ignored; Anthropic's own fields (:data:`NATIVE_FIELDS`) reach
    Anthropic upstreams only (they ride in ``scillm["anthropic_native"]``); those that ask for something only
    Anthropic delivers (``mcp_servers``, ``container``, server tools) are listed in ``scillm["asks"]``, so a
    translation to another provider is a 400 naming them (``scillm_core.models.params``) instead of dropping them.
    Thinking blocks in the history are carried as the assistant message's ``thinking_blocks``; ``cache_control``
    markers ride on the parts, tools and messages they mark (core's dispatch leaves both out of the attempts of
    providers that do not take them: ``scillm_core.models.without_carried``). ``lenient`` (the body goes to an
    Anthropic upstream as sent): what the chat model cannot carry (block types it does not know) is left out of
    the model instead of refused, since the upstream judges the body itself. ``session`` names the agent session
    (``scillm["session"]``). ``origins`` records where the chat request's parts came from, for errors about it
    (:class:`~scillm_core.errors.Origins`).
    """
    origins = origins if origins is not None else errors.Origins()
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object", "$")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _bad("model is required (a non-empty string)" if model is None else
                   f"model must be a non-empty string, got {json_type(model)}", "$.model")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise _bad("max_tokens is required", "$.max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _bad(f"max_tokens must be a positive integer, got {max_tokens!r}", "$.max_tokens")
    stream = body.get("stream", False)
    if stream is not None:
        _expect(stream, bool, "a boolean", "$.stream")
    if body.get("thread") is not None and not lenient:
        raise _thread_unsupported()

    messages: list[Message] = []
    system = body.get("system")
    if system is not None:
        content = _system(system)
        if content:
            messages.append(Message(role="system", content=content))
            origins.message("$.system")
    raw_messages = body.get("messages")
    if raw_messages is None:
        raise _bad("messages is required", "$.messages")
    _expect(raw_messages, list, "an array of messages", "$.messages")
    if not raw_messages:
        raise _bad("messages must not be empty", "$.messages")
    asks = {f"$.{key}": capability for key, capability in ASKS.items() if body.get(key)}
    origins.asks = asks
    for i, raw in enumerate(raw_messages):
        messages.extend(_message(raw, f"$.messages[{i}]", asks, origins, lenient))

    tools, server_tools = _tools(body.get("tools"), asks, origins)
    output = "$.output_config.format" if body.get("output_config") else "$.output_format"
    origins.fields.update(FIELD_ORIGINS)
    origins.fields.update({"response_format": output, "response_format.json_schema": output,
                           "response_format.json_schema.schema": f"{output}.schema"})
    tool_choice, parallel = _tool_choice(body.get("tool_choice"), lenient)
    stop = body.get("stop_sequences")
    if stop is not None:
        _expect(stop, list, "an array of strings", "$.stop_sequences")
        for j, s in enumerate(stop):
            _expect(s, str, "a string", f"$.stop_sequences[{j}]")
    metadata = body.get("metadata")
    if metadata is not None:
        _expect(metadata, dict, "an object", "$.metadata")
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    _number(body, "top_k", 0)  # validated, then dropped: OpenAI-style upstreams have no top_k
    native = {key: body[key] for key in NATIVE_FIELDS if body.get(key) is not None}
    if server_tools:
        native["server_tools"] = server_tools
    scillm: dict[str, Any] = {"dialect": "anthropic-messages", "anthropic_native": native}
    if asks:
        scillm["asks"] = asks
    if session:
        scillm["session"] = session
    effort = _reasoning_effort(body.get("thinking"), body.get("output_config"), max_tokens, lenient)
    response_format = _response_format(body.get("output_config") or body.get("output_format"))
    try:  # the model's own checks name chat's paths
        return ChatRequest(
            model=model, messages=tuple(messages), stream=bool(stream),
            stream_options={"include_usage": True} if stream else None,
            max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            stop=tuple(stop) if stop else None,
            tools=tuple(tools) or None, tool_choice=tool_choice if tools else None,
            parallel_tool_calls=parallel if tools else None,
            reasoning_effort=effort, response_format=response_format, scillm=scillm)
    except errors.ScillmError as exc:
        raise origins.relocate(exc) from None


def _cache_control(block: Mapping[str, Any], path: str) -> Mapping[str, Any] | None:
    marker = block.get("cache_control")
    return None if marker is None else _expect(marker, dict, "an object", f"{path}.cache_control")


def _system(system: Any) -> str | tuple[TextPart, ...]:
    """The system prompt: one string, or its blocks as parts when any carries a ``cache_control`` marker."""
    if isinstance(system, str):
        return system
    _expect(system, list, "a string or an array of text blocks", "$.system")
    parts = []
    for j, block in enumerate(system):
        path = f"$.system[{j}]"
        _expect(block, dict, "a text block object", path)
        if block.get("type") != "text":
            raise _bad(f"system blocks must have type 'text', got {block.get('type')!r}", f"{path}.type")
        parts.append(TextPart(text=_expect(block.get("text"), str, "a string", f"{path}.text"),
                              cache_control=_cache_control(block, path)))
    if any(p.cache_control for p in parts):
        return tuple(p for p in parts if p.text)
    return "\n\n".join(p.text for p in parts if p.text)


def _message(raw: Any, path: str, asks: dict[str, str], origins: errors.Origins, lenient: bool = False
             ) -> list[Message]:
    _expect(raw, dict, "a message object", path)
    role = raw.get("role")
    if role not in ("user", "assistant"):
        raise _bad(f"role must be 'user' or 'assistant' (system goes in the top-level 'system'), got {role!r}",
                   f"{path}.role")
    content = raw.get("content")
    if isinstance(content, str):
        origins.message(path)
        return [Message(role=role, content=content)]
    if content is None:
        raise _bad("content is required (a string or an array of content blocks)", f"{path}.content")
    _expect(content, list, "a string or an array of content blocks", f"{path}.content")
    blocks = []
    for j, block in enumerate(content):
        bpath = f"{path}.content[{j}]"
        _expect(block, dict, "a content block object", bpath)
        kind = block.get("type")
        allowed = USER_BLOCKS if role == "user" else ASSISTANT_BLOCKS
        if kind not in allowed:
            if lenient and isinstance(kind, str):
                if role == "user":  # a block type the chat model does not know: carried as it is
                    blocks.append(("other", block, bpath))
                continue
            raise _bad(f"content block type {kind!r} is not supported in a {role} message here (supported: "
                       f"{', '.join(allowed)})", f"{bpath}.type")
        blocks.append((kind, block, bpath))
    return _user(blocks, asks, path, origins, lenient) if role == "user" else _assistant(blocks, asks, path, origins)


def _cites(block: Mapping[str, Any], path: str, asks: dict[str, str]) -> bool:
    """Whether ``block`` asks for citations (a document with ``citations.enabled``) or carries them (a text block's
    ``citations``): only Anthropic cites, so the path goes in ``asks`` (a translation elsewhere is a 400 naming it)
    and the block is carried as it came (:class:`OtherPart`), which Anthropic upstreams take as it is."""
    citations = block.get("citations")
    if block.get("type") == "text":
        cites = isinstance(citations, list) and bool(citations)
    else:
        cites = isinstance(citations, Mapping) and citations.get("enabled") is True
    if cites:
        asks[f"{path}.citations"] = "citations"
    return cites


def _as_is(block: Mapping[str, Any]) -> OtherPart:
    """An Anthropic block carried as it came (Anthropic upstreams take it as it is)."""
    return OtherPart(type=block["type"], data={k: v for k, v in block.items() if k != "type"})


def _cited_text(blocks: list[tuple[str, dict[str, Any], str]]) -> tuple[TextPart | OtherPart, ...]:
    """An assistant turn's text blocks as parts, those with citations as they came (for Anthropic upstreams)."""
    return tuple(_as_is(block) if isinstance(block.get("citations"), list) and block["citations"]
                 else TextPart(text=block["text"]) for kind, block, _ in blocks if kind == "text")


def _user(blocks: list[tuple[str, dict[str, Any], str]], asks: dict[str, str], where: str,
          origins: errors.Origins, lenient: bool = False) -> list[Message]:
    """Tool results become ``role: tool`` messages (first, in order); the rest one user message after them.
    Images inside tool results follow in a user message, since chat-completions tool messages carry text only."""
    out: list[Message] = []
    parts: list[Any] = []
    paths: list[str] = []  # each part's
    for kind, block, path in blocks:
        if kind == "tool_result":
            text, images = _tool_result(block, path, asks, lenient)
            tool_id = _expect(block.get("tool_use_id"), str, "a string", f"{path}.tool_use_id")
            marker = _cache_control(block, path)
            extra: dict[str, Any] = {"cache_control": marker} if marker else {}
            if isinstance(text, tuple) and block.get("is_error") is True:
                extra["is_error"] = True
            out.append(Message(role="tool", tool_call_id=tool_id, content=text, extra=extra))
            origins.message(path)
            for image, image_path in images:
                parts.append(image)
                paths.append(image_path)
            continue
        if kind == "other":  # e.g. a search_result, which may ask for citations too
            if "citations" in block:
                _cites(block, path, asks)
            parts.append(_as_is(block))
        else:
            parts.append(_part(kind, block, path, asks))
        paths.append(path)
    if parts:
        if all(isinstance(p, TextPart) and p.cache_control is None for p in parts):
            out.append(Message(role="user", content="\n\n".join(p.text for p in parts) if len(parts) > 1
                               else parts[0].text))
            origins.message(where)
        else:
            out.append(Message(role="user", content=tuple(parts)))
            origins.message(where, paths)
    return out


def _part(kind: str, block: Mapping[str, Any], path: str, asks: dict[str, str]) -> Any:
    """A user content block as a part, its ``cache_control`` marker with it (a block with citations as it came)."""
    part = _bare_part(kind, block, path)  # validated either way
    if "citations" in block and _cites(block, path, asks):
        return _as_is(block)
    marker = _cache_control(block, path)
    return attrs.evolve(part, cache_control=marker) if marker else part


def _bare_part(kind: str, block: Mapping[str, Any], path: str) -> Any:
    if kind == "text":
        return TextPart(text=_expect(block.get("text"), str, "a string", f"{path}.text"))
    source: dict[str, Any] = _expect(block.get("source"), dict, "a source object", f"{path}.source")
    stype = source.get("type")
    if kind == "image":
        if stype == "base64":
            media = source.get("media_type")
            if media not in IMAGE_TYPES:
                raise _bad(f"image media_type must be one of {', '.join(IMAGE_TYPES)}, got {media!r}",
                           f"{path}.source.media_type")
            data = _expect(source.get("data"), str, "a base64 string", f"{path}.source.data")
            return ImagePart(image_url=ImageUrl(url=f"data:{media};base64,{data}"))
        if stype == "url":
            return ImagePart(image_url=ImageUrl(url=_expect(source.get("url"), str, "a string", f"{path}.source.url")))
        raise _bad(f"image source type must be 'base64' or 'url', got {stype!r}", f"{path}.source.type")
    # document
    title = block.get("title") if isinstance(block.get("title"), str) else None
    if stype == "base64":
        media = source.get("media_type")
        if media != "application/pdf":
            raise _bad(f"base64 document media_type must be 'application/pdf', got {media!r}",
                       f"{path}.source.media_type")
        data = _expect(source.get("data"), str, "a base64 string", f"{path}.source.data")
        return FilePart(file=FileData(file_data=f"data:application/pdf;base64,{data}",
                                      filename=title or "document.pdf"))
    if stype == "text":
        data = _expect(source.get("data"), str, "a string", f"{path}.source.data")
        return TextPart(text=f"{title}\n\n{data}" if title else data)
    if stype == "content":
        inner = _expect(source.get("content"), (list, str), "a string or an array of text blocks",
                        f"{path}.source.content")
        if isinstance(inner, str):
            return TextPart(text=inner)
        texts = [_expect(b.get("text") if isinstance(b, dict) else None, str, "a text block",
                         f"{path}.source.content[{k}]") for k, b in enumerate(inner)]
        return TextPart(text="\n\n".join(texts))
    raise _bad(f"document source type {stype!r} is not supported (use 'base64' PDF or 'text')",
               f"{path}.source.type")


def _tool_result(block: Mapping[str, Any], path: str, asks: dict[str, str], lenient: bool = False
                 ) -> tuple[str | tuple[TextPart | OtherPart, ...], list[tuple[Any, str]]]:
    """A tool result's text, and its images and documents with their paths (they follow in a user message). Its
    blocks ask for citations as at the top of a message (:func:`_cites`); text that cites is kept as parts, the
    cited blocks as they came, which only Anthropic upstreams get (every other route refuses the ask)."""
    content = block.get("content")
    texts: list[TextPart | OtherPart] = []
    images: list[tuple[Any, str]] = []
    if isinstance(content, str):
        texts.append(TextPart(text=content))
    elif isinstance(content, list):
        for k, inner in enumerate(content):
            ipath = f"{path}.content[{k}]"
            _expect(inner, dict, "a content block object", ipath)
            kind = inner.get("type")
            if kind == "text":
                text = TextPart(text=_expect(inner.get("text"), str, "a string", f"{ipath}.text"))
                texts.append(_as_is(inner) if "citations" in inner and _cites(inner, ipath, asks) else text)
            elif kind in ("image", "document"):
                images.append((_part(kind, inner, ipath, asks), ipath))
            elif not lenient:
                raise _bad(f"tool_result content blocks must be text, image or document, got {kind!r}",
                           f"{ipath}.type")
            elif isinstance(inner.get("citations"), Mapping):  # e.g. a search_result: goes as sent, or nowhere
                _cites(inner, ipath, asks)
    elif content is not None:
        raise _bad(f"expected a string or an array of content blocks, got {json_type(content)}", f"{path}.content")
    is_error = block.get("is_error")
    if is_error is not None:
        _expect(is_error, bool, "a boolean", f"{path}.is_error")
    if any(isinstance(part, OtherPart) for part in texts):
        return tuple(texts), images  # for Anthropic alone, which takes is_error as it is (:func:`_user`)
    text = "\n\n".join(part.text for part in texts if isinstance(part, TextPart))
    if is_error:
        text = f"Error: {text}" if text else "Error"
    return text, images


def _assistant(blocks: list[tuple[str, dict[str, Any], str]], asks: dict[str, str], where: str,
               origins: errors.Origins) -> list[Message]:
    texts: list[str] = []
    cites = False
    calls: list[ToolCall] = []
    thinking: list[dict[str, Any]] = []
    marker: Mapping[str, Any] | None = None
    for kind, block, path in blocks:
        marker = _cache_control(block, path) or marker
        if kind == "thinking":  # (its text goes on as reasoning_content: a number or an object is no text)
            thinking.append({"type": "thinking", "thinking": _text_or_none(block, "thinking", path),
                             "signature": _text_or_none(block, "signature", path)})
        elif kind == "redacted_thinking":
            thinking.append({"type": "redacted_thinking", "data": _text_or_none(block, "data", path)})
        elif kind == "text":
            texts.append(_expect(block.get("text"), str, "a string", f"{path}.text"))
            if "citations" in block and _cites(block, path, asks):
                cites = True
        elif kind == "tool_use":
            tool_id = _expect(block.get("id"), str, "a string", f"{path}.id")
            name = _expect(block.get("name"), str, "a string", f"{path}.name")
            arguments = block.get("input", {})
            _expect(arguments, dict, "an object", f"{path}.input")
            calls.append(ToolCall(id=tool_id, function=FunctionCall(name=name,
                                                                   arguments=orjson.dumps(arguments).decode())))
    text = "".join(texts)
    if not text and not calls:
        return []  # e.g. a thinking-only turn: nothing an upstream can take
    content = _cited_text(blocks) if cites else text or None
    # thinking blocks ride in ``thinking_blocks`` (the Anthropic provider sends them back, as tool loops with
    # thinking require), their text in ``reasoning_content`` (DeepSeek's, Kimi's and GLM's thinking models want it
    # back); core's dispatch leaves each out of the attempts of providers that do not take it
    extra: dict[str, Any] = {THINKING_BLOCKS: thinking} if thinking else {}
    reasoning = "".join(block["thinking"] for block in thinking if block["type"] == "thinking")
    if reasoning:
        extra[REASONING_CONTENT] = reasoning
    if marker:
        extra["cache_control"] = marker  # the turn's marker: it goes on the turn's last block again
    origins.message(where, [path for kind, _, path in blocks if kind == "text"] if cites else None,
                    [path for kind, _, path in blocks if kind == "tool_use"])
    return [Message(role="assistant", content=content, tool_calls=tuple(calls) or None, extra=extra)]


def _tools(raw: Any, asks: dict[str, str], origins: errors.Origins) -> tuple[list[Tool], list[dict[str, Any]]]:
    """The client tools, and the tools of Anthropic's own types (server tools such as ``web_search_20250305``,
    and the tools it defines, such as ``bash_20250124``), which only Anthropic delivers: each is added to ``asks``
    and goes to Anthropic upstreams as it came (``anthropic_native["server_tools"]``)."""
    if raw is None:
        return [], []
    _expect(raw, list, "an array of tools", "$.tools")
    tools = []
    server_tools: list[dict[str, Any]] = []
    for j, tool in enumerate(raw):
        path = f"$.tools[{j}]"
        _expect(tool, dict, "a tool object", path)
        kind = tool.get("type")
        if kind not in (None, "custom"):
            asks[path] = "server_tools"
            server_tools.append(tool)
            continue
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise _bad("tool name is required (a non-empty string)", f"{path}.name")
        schema = tool.get("input_schema")
        if schema is None:
            raise _bad("input_schema is required (a JSON Schema object)", f"{path}.input_schema")
        _expect(schema, dict, "a JSON Schema object", f"{path}.input_schema")
        description = tool.get("description")
        if description is not None:
            _expect(description, str, "a string", f"{path}.description")
        strict = tool.get("strict")
        if strict is not None:
            _expect(strict, bool, "a boolean", f"{path}.strict")
        tools.append(Tool(function=FunctionDef(name=name, description=description, parameters=schema, strict=strict),
                          cache_control=_cache_control(tool, path)))
        origins.tools.append(path)
    return tools, server_tools


def _tool_choice(raw: Any, lenient: bool = False) -> tuple[str | dict[str, Any] | None, bool | None]:
    if raw is None:
        return None, None
    _expect(raw, dict, "an object such as {\"type\": \"auto\"}", "$.tool_choice")
    kind = raw.get("type")
    parallel = False if raw.get("disable_parallel_tool_use") is True else None
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", None
    if kind == "tool":
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise _bad("tool_choice of type 'tool' needs the tool's name", "$.tool_choice.name")
        return {"type": "function", "function": {"name": name}}, parallel
    if lenient:
        return None, None
    raise _bad(f"tool_choice type must be auto, any, tool or none, got {kind!r}", "$.tool_choice.type")


def _reasoning_effort(thinking: Any, output_config: Any, max_tokens: int, lenient: bool = False) -> str | None:
    """``output_config.effort`` wins; else ``thinking.budget_tokens`` by size (< 4096 low, < 16384 medium, else
    high); adaptive thinking is medium; disabled or absent thinking leaves the upstream default."""
    if isinstance(output_config, dict) and output_config.get("effort") is not None:
        effort = output_config["effort"]
        if effort not in EFFORTS:
            if lenient:
                return None
            raise _bad(f"effort must be one of {', '.join(EFFORTS)}, got {effort!r}", "$.output_config.effort")
        return EFFORTS[effort]
    if thinking is None:
        return None
    _expect(thinking, dict, "an object", "$.thinking")
    kind = thinking.get("type")
    if kind == "disabled":
        return None
    if kind == "adaptive":
        return "medium"
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise _bad("budget_tokens must be a positive integer", "$.thinking.budget_tokens")
        return "low" if budget < 4096 else "medium" if budget < 16384 else "high"
    if lenient:
        return None
    raise _bad(f"thinking type must be enabled, adaptive or disabled, got {kind!r}", "$.thinking.type")


def _response_format(output_config: Any) -> dict[str, Any] | None:
    if not isinstance(output_config, dict):
        return None
    fmt = output_config.get("format", output_config if output_config.get("type") == "json_schema" else None)
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise _bad("a json_schema output format needs a 'schema' object", "$.output_config.format.schema")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}


# -- response ----------------------------------------------------------------------------------------------------

def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _usage(usage: Usage | None, *, estimate: int = 0) -> dict[str, int]:
    """Anthropic's ``input_tokens`` excludes cache reads and writes; OpenAI's ``prompt_tokens`` includes them.
    Reads come from ``prompt_tokens_details.cached_tokens``, writes from ``cache_creation_input_tokens`` (which
    the Anthropic-style upstreams report)."""
    if usage is None:
        return {"input_tokens": estimate, "output_tokens": 0, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0}
    extra = usage.extra or {}
    details = extra.get("prompt_tokens_details")
    cached = min(_count(details.get("cached_tokens") if isinstance(details, dict) else None), usage.prompt_tokens)
    created = min(_count(extra.get("cache_creation_input_tokens")), usage.prompt_tokens - cached)
    return {"input_tokens": usage.prompt_tokens - cached - created, "output_tokens": usage.completion_tokens,
            "cache_creation_input_tokens": created, "cache_read_input_tokens": cached}


def _reasoning(extra: Mapping[str, Any]) -> str | None:
    for key in ("reasoning_content", "reasoning"):
        value = extra.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _tool_input(arguments: str) -> Any:
    if not arguments.strip():
        return {}
    try:
        value = loads(arguments)
    except orjson.JSONDecodeError:
        return {"_raw_arguments": arguments}  # the model wrote invalid JSON: keep it visible, do not crash
    return value if isinstance(value, dict) else {"value": value}


def to_messages_response(result: ChatResponse, model: str) -> dict[str, Any]:
    choice = result.choices[0] if result.choices else None
    content: list[dict[str, Any]] = []
    finish = None
    if choice is not None:
        message = choice.message
        finish = choice.finish_reason
        blocks = message.extra.get("thinking_blocks") if message.extra else None
        if isinstance(blocks, list) and blocks:  # from an Anthropic upstream, signatures included
            content.extend(b for b in (_thinking_block(x) for x in blocks) if b is not None)
        else:
            thinking = _reasoning(message.extra)
            if thinking:
                content.append({"type": "thinking", "thinking": thinking, "signature": ""})
        refusal = message.extra.get("refusal") if message.extra else None
        if message.text:
            content.extend(_text_blocks(message.text, message.extra.get("annotations")))
        elif isinstance(refusal, str) and refusal:
            content.append({"type": "text", "text": refusal})  # OpenAI's refusal field: still the model's words
            finish = "content_filter"
        for call in message.tool_calls or ():
            content.append({"type": "tool_use", "id": call.id or _tool_id(), "name": call.function.name,
                            "input": _tool_input(call.function.arguments)})
    has_tools = any(block["type"] == "tool_use" for block in content)
    return {"id": message_id(), "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": _stop_reason(finish, has_tools), "stop_sequence": None, "usage": _usage(result.usage)}


def _citations(annotations: Any) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """``(start, end, citation)`` of each annotation an Anthropic upstream's citation became (see
    ``scillm_anthropic.translate.annotation``): the citation as it sent it (a ``url_citation`` is its web search
    citation again), and the answer text it cites."""
    for note in annotations if isinstance(annotations, list) else ():
        if isinstance(note, Mapping) and note.get("type") == "url_citation" \
                and isinstance(note.get("url_citation"), Mapping):
            note = {**note["url_citation"], "type": "web_search_result_location"}
        if isinstance(note, Mapping) and isinstance(note.get("start_index"), int) \
                and isinstance(note.get("end_index"), int):
            yield note["start_index"], note["end_index"], {k: v for k, v in note.items()
                                                           if k not in ("start_index", "end_index")}


def _text_blocks(text: str, annotations: Any) -> list[dict[str, Any]]:
    """The answer's text block, or, when the upstream cited documents, its cited spans as text blocks with their
    ``citations`` and the text between them as plain ones (as Anthropic answers)."""
    spans: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for start, end, citation in _citations(annotations):
        spans.setdefault((start, end), []).append(citation)
    blocks: list[dict[str, Any]] = []
    at = 0
    for (start, end), citations in sorted(spans.items()):
        if start < at or start >= end or end > len(text):
            continue  # overlapping or outside the text: not a span Anthropic would send
        if start > at:
            blocks.append({"type": "text", "text": text[at:start]})
        blocks.append({"type": "text", "text": text[start:end], "citations": citations})
        at = end
    if at < len(text) or not blocks:
        blocks.append({"type": "text", "text": text[at:]})
    return blocks


def _thinking_block(block: Any) -> dict[str, Any] | None:
    if not isinstance(block, dict):
        return None
    if block.get("type") == "thinking":
        return {"type": "thinking", "thinking": str(block.get("thinking") or ""),
                "signature": str(block.get("signature") or "")}
    if block.get("type") == "redacted_thinking":
        return {"type": "redacted_thinking", "data": str(block.get("data") or "")}
    return None


def _stop_reason(finish: str | None, has_tools: bool) -> str:
    if has_tools and finish in (None, "stop"):
        return "tool_use"  # some upstreams (Gemini, Ollama) finish a tool-call turn with "stop"
    return STOP_REASONS.get(finish or "stop", "end_turn")


def _tool_id() -> str:
    return "toolu_" + uuid.uuid4().hex[:24]


# -- streaming ---------------------------------------------------------------------------------------------------

def event(kind: str, payload: Mapping[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class StreamTranslator:
    """Turns chat chunks into Messages events: one content block at a time (thinking, text, one per tool call),
    each closed before the next opens; ``finish`` closes the last block and sends ``message_delta`` (stop reason,
    cumulative usage) and ``message_stop``."""

    def __init__(self, model: str, *, input_estimate: int = 0) -> None:
        self.id = message_id()
        self.model = model
        self.input_estimate = input_estimate
        self.index = -1
        self.open: str | None = None          # "thinking" | "text" | "tool_use"
        self.tool_calls: dict[int, tuple[str, int]] = {}  # OpenAI tool-call ordinal -> (id, block index)
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.continuation: Any = None  # scillm-resilience finished the answer with another model: said at the end

    def start(self) -> bytes:
        message: dict[str, Any] = {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {**_usage(None, estimate=self.input_estimate), "output_tokens": 1}}
        return event("message_start", {"type": "message_start", "message": message}) + ping()

    def _close(self) -> Iterator[bytes]:
        if self.open is not None:
            yield event("content_block_stop", {"type": "content_block_stop", "index": self.index})
            self.open = None

    def _open(self, block: dict[str, Any]) -> Iterator[bytes]:
        yield from self._close()
        self.index += 1
        self.open = block["type"]
        yield event("content_block_start", {"type": "content_block_start", "index": self.index,
                                            "content_block": block})

    def _delta(self, delta: dict[str, Any], *, index: int | None = None) -> bytes:
        return event("content_block_delta", {"type": "content_block_delta",
                                             "index": self.index if index is None else index, "delta": delta})

    def chunk(self, chunk: ChatChunk) -> Iterator[bytes]:
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.extra and "scillm_continuation" in chunk.extra:
            self.continuation = chunk.extra["scillm_continuation"]
        for choice in chunk.choices[:1]:
            delta = choice.delta
            thinking = _reasoning(delta.extra) if delta.extra else None
            if thinking:
                if self.open != "thinking":
                    yield from self._open({"type": "thinking", "thinking": "", "signature": ""})
                yield self._delta({"type": "thinking_delta", "thinking": thinking})
            for block in (delta.extra.get("thinking_blocks") or ()) if delta.extra else ():
                yield from self._thinking_block(block)
            if delta.content:
                if self.open != "text":
                    yield from self._open({"type": "text", "text": ""})
                yield self._delta({"type": "text_delta", "text": delta.content})
            if delta.extra and "annotations" in delta.extra:  # citations of the text just streamed
                for _, _, citation in _citations(delta.extra["annotations"]):
                    if self.open != "text":
                        yield from self._open({"type": "text", "text": "", "citations": []})
                    yield self._delta({"type": "citations_delta", "citation": citation})
            for call in delta.tool_calls or ():
                function = call.function
                known = self.tool_calls.get(call.index)
                if known is None or (call.id is not None and call.id != known[0]):
                    tool_id = call.id or _tool_id()
                    yield from self._open({"type": "tool_use", "id": tool_id,
                                           "name": (function.name if function else None) or "", "input": {}})
                    self.tool_calls[call.index] = (tool_id, self.index)
                    known = self.tool_calls[call.index]
                if function is not None and function.arguments:
                    # a late fragment of an earlier parallel call still goes to that call's block
                    yield self._delta({"type": "input_json_delta", "partial_json": function.arguments},
                                      index=known[1])
            if choice.finish_reason is not None:
                self.finish_reason = choice.finish_reason

    def follow(self, chunk: ChatChunk) -> None:
        """Take in a chunk whose upstream events went to the client as sent (same dialect), so that chunks
        translated after it (a continuation from another model) go on in the open content block, or after the
        last one, and :meth:`finish` ends the message. Only block starts and stops are parsed."""
        if chunk.usage is not None:
            self.usage = chunk.usage
        native = chunk.native
        if native is None or b"content_block_st" not in native:
            return
        for data in native_events(native):
            kind = data.get("type") if isinstance(data, dict) else None
            if kind == "content_block_start":
                self.index = int(data.get("index", self.index + 1))
                self.open = (data.get("content_block") or {}).get("type") or "text"
                if self.open == "tool_use":
                    self.tool_calls[len(self.tool_calls)] = (data["content_block"].get("id", ""), self.index)
            elif kind == "content_block_stop":
                self.open = None

    def _thinking_block(self, block: Any) -> Iterator[bytes]:
        """A finished block from an Anthropic upstream: its signature ends the open thinking block; a redacted
        block is a block of its own."""
        block = _thinking_block(block)
        if block is None:
            return
        if block["type"] == "redacted_thinking":
            yield from self._open(block)
            return
        if self.open != "thinking":
            yield from self._open({"type": "thinking", "thinking": "", "signature": ""})
            if block["thinking"]:
                yield self._delta({"type": "thinking_delta", "thinking": block["thinking"]})
        if block["signature"]:
            yield self._delta({"type": "signature_delta", "signature": block["signature"]})

    def finish(self) -> Iterator[bytes]:
        yield from self._close()
        usage = _usage(self.usage, estimate=self.input_estimate)
        delta: dict[str, Any] = {"type": "message_delta",
                                 "delta": {"stop_reason": _stop_reason(self.finish_reason, bool(self.tool_calls)),
                                           "stop_sequence": None},
                                 "usage": usage}
        if self.continuation is not None:
            delta["scillm_continuation"] = self.continuation
        yield event("message_delta", delta)
        yield event("message_stop", {"type": "message_stop"})


def ping() -> bytes:
    return event("ping", {"type": "ping"})
