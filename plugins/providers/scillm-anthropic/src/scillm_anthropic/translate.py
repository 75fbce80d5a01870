"""OpenAI chat completions <-> Anthropic Messages, both ways, as pure functions (no I/O).

* :func:`to_messages_body` — a :class:`ChatRequest` to a ``POST /v1/messages`` body;
* :func:`from_messages_response` — a Messages response body to a :class:`ChatResponse`;
* :class:`StreamTranslator` — Messages SSE events to OpenAI chunks;
* :func:`parse_error_body` / :func:`error_from_event` — Anthropic error bodies and ``event: error`` to the error tree.

Thinking blocks come back as ``reasoning_content`` (text) plus ``thinking_blocks`` (the blocks with their
signatures) in the message ``extra``; an assistant message that carries ``thinking_blocks`` sends them back
unchanged, which Anthropic requires in tool loops with thinking on. The ``citations`` of text blocks (documents
sent with ``citations: {"enabled": true}``, web search results) come back as the message's ``annotations``
(:func:`annotation`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from scillm_core import (
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Choice,
    ChunkChoice,
    Delta,
    FilePart,
    FunctionCall,
    FunctionCallDelta,
    ImagePart,
    Message,
    OtherPart,
    TextPart,
    ToolCall,
    ToolCallDelta,
    Usage,
    errors,
)
from scillm_core.jsonio import loads
from scillm_core.models.chat import token_count
from scillm_core.upstream import error_for_status, excerpt

__all__ = ["ANSWER_TOOL", "DEFAULT_MAX_TOKENS", "EFFORTS", "FEATURES_FROM", "FINISH_REASONS", "THINKING_BUDGETS",
           "StreamTranslator", "annotation", "answer_tool", "claude_version", "effort_for", "error_from_event",
           "error_from_status", "from_messages_response", "parse_error_body", "predates", "sanitize_tool_call_id",
           "takes", "to_messages_body", "usage_from_anthropic"]

#: ``max_tokens`` is required by the Messages API; used when the client sets neither ``max_tokens`` nor
#: ``max_completion_tokens``. 8192 fits every current Claude model's output limit.
DEFAULT_MAX_TOKENS = 8192
#: ``reasoning_effort`` -> ``thinking.budget_tokens`` (LiteLLM's values; ``none`` turns thinking off), for models
#: before adaptive thinking.
THINKING_BUDGETS: Mapping[str, int] = {"minimal": 1024, "low": 1024, "medium": 2048, "high": 4096, "xhigh": 8192,
                                       "max": 16384, "ultra": 16384}
#: ``reasoning_effort`` -> ``output_config.effort``, with ``thinking: {"type": "adaptive"}`` (models that take it);
#: ``ultra`` is ``max`` (provider-protocols.md §6.2), and ``xhigh`` is ``max`` on a model before ``xhigh_effort``
#: (:func:`effort_for`).
EFFORTS: Mapping[str, str] = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh",
                              "max": "max", "ultra": "max"}
#: What a Claude model takes, by the first version that takes it (provider-protocols.md §3.2, §9.5, §9.6), read
#: from the version in its name (:func:`claude_version`): ``adaptive_thinking``: ``thinking: {"type": "adaptive"}``
#: with ``output_config.effort`` (the 4.6 generation on; earlier ones think with ``budget_tokens``);
#: ``strict_tools``: a tool's ``strict: true`` (structured outputs, GA from the 4.5 generation; earlier models had
#: them only under a beta header, and Claude 4 and 3.x not at all); ``output_format``: ``output_config.format``, a
#: JSON schema the answer follows (structured outputs again; earlier models get the schema as a forced tool,
#: :func:`answer_tool`); ``xhigh_effort``: ``output_config.effort: "xhigh"`` (the 4.7 generation on; 4.6 takes
#: low to max, so ``xhigh`` is ``max`` there). The one table to change when a generation changes what it takes; a
#: name without a version (a proxy's own) gets what every Claude takes and is sent what the client asked for.
FEATURES_FROM: Mapping[str, tuple[int, int]] = {"adaptive_thinking": (4, 6), "strict_tools": (4, 5),
                                                "output_format": (4, 5), "xhigh_effort": (4, 7)}
#: The tool that carries a ``json_schema`` answer to a model before ``output_format`` (LiteLLM's name for it): its
#: input comes back as the message's JSON text (:func:`answer_tool`).
ANSWER_TOOL = "json_tool_call"
FINISH_REASONS: Mapping[str, str] = {"end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
                                     "max_tokens": "length", "model_context_window_exceeded": "length",
                                     "tool_use": "tool_calls", "refusal": "content_filter"}
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
#: Anthropic block types a client may send as-is inside OpenAI content arrays (a ``text`` one: how ``/v1/messages``
#: carries a text block with citations).
NATIVE_BLOCKS = frozenset({"image", "document", "search_result", "text"})
#: Body keys a client may pass through in ``extra`` (everything else is OpenAI-only and would be rejected).
PASSTHROUGH = ("top_k", "thinking", "metadata", "service_tier", "output_config", "context_management",
               "mcp_servers", "container")
#: Anthropic's web search tool: what chat's ``web_search_options`` asks for (see :func:`_web_search`)
WEB_SEARCH_TOOL: Mapping[str, str] = {"type": "web_search_20250305", "name": "web_search"}
#: Anthropic error ``type`` -> the HTTP status it comes with (for mid-stream ``event: error``).
ERROR_STATUS: Mapping[str, int] = {"invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
                                   "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
                                   "rate_limit_error": 429, "api_error": 500, "timeout_error": 504,
                                   "overloaded_error": 529}

_TOOL_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# claude-opus-4-6, claude-sonnet-4-5-20250929, claude-sonnet-4-20250514 (4.0: a date is no minor), claude-3-7-sonnet
_VERSION = re.compile(r"claude-(?:[a-z]+-)?(\d{1,2})(?:-(\d{1,2}))?(?=-|$|@)")
_DATA_URL = re.compile(r"^data:([^;,]+)((?:;[^;,]*)*?);base64,(.*)$", re.S)


# -- models --------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def claude_version(model: str) -> tuple[int, int] | None:
    """The generation a Claude model name says (``claude-opus-4-6`` -> ``(4, 6)``, ``claude-sonnet-4-20250514`` ->
    ``(4, 0)``, ``claude-3-7-sonnet-latest`` -> ``(3, 7)``); ``None`` for a name that says none."""
    match = _VERSION.search(model)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2) or 0)


def takes(model: str, feature: str) -> bool:
    """Whether upstream ``model`` takes ``feature`` (a key of :data:`FEATURES_FROM`)."""
    version = claude_version(model)
    return version is not None and version >= FEATURES_FROM[feature]


def predates(model: str, feature: str) -> bool:
    """Whether ``model`` names a Claude generation before ``feature``; ``False`` for a name without a version."""
    version = claude_version(model)
    return version is not None and version < FEATURES_FROM[feature]


def effort_for(model: str, effort: str) -> str:
    """``output_config.effort`` for ``model``: ``xhigh`` is ``max`` before the generation that has it (4.6 takes
    low, medium, high and max); anything else as it is."""
    return "max" if effort == "xhigh" and predates(model, "xhigh_effort") else effort


def answer_tool(request: ChatRequest, model: str) -> str | None:
    """The tool (:data:`ANSWER_TOOL`) that carries the answer when ``request`` asks for a ``json_schema`` answer
    from a model before ``output_format``: the Messages body offers the schema as that tool, and its input comes
    back as the message's JSON text (the way LiteLLM and the AI SDK answer such a request); ``None`` otherwise."""
    fmt = request.response_format
    if fmt is None or fmt.get("type") != "json_schema" or not predates(model, "output_format"):
        return None
    return ANSWER_TOOL


# -- request -------------------------------------------------------------------------------------------------------

def sanitize_tool_call_id(call_id: str) -> str:
    """A tool-call id Anthropic accepts (``^[a-zA-Z0-9_-]{1,64}$``). Valid ids are kept; others are cleaned and
    suffixed with a short hash of the original, so the same id maps the same way in ``tool_calls`` and in the
    ``tool`` message, and two ids that clean alike stay distinct."""
    if _TOOL_ID.match(call_id):
        return call_id
    cleaned = re.sub(r"[^a-zA-Z0-9_-]", "_", call_id)[:55]
    return f"{cleaned}_{hashlib.sha256(call_id.encode()).hexdigest()[:8]}"


def _bad(message: str, path: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(f"{message} @ {path}", param=path)


def _data_url(url: str, path: str) -> tuple[str, str]:
    match = _DATA_URL.match(url)
    if not match:
        raise _bad("expected a base64 data URL (data:<type>;base64,<data>)", path)
    return match.group(1).strip().lower(), match.group(3).strip()


def _image_block(part: ImagePart, path: str) -> dict[str, Any]:
    url = part.image_url.url
    if url.startswith("data:"):
        media_type, data = _data_url(url, f"{path}.image_url.url")
        if media_type == "image/jpg":
            media_type = "image/jpeg"
        if media_type not in IMAGE_TYPES:
            raise _bad(f"image type {media_type!r} is not supported by Anthropic (use jpeg, png, gif or webp)",
                       f"{path}.image_url.url")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise _bad("image_url.url must be a data URL or an http(s) URL", f"{path}.image_url.url")


def _document_block(part: FilePart, path: str) -> dict[str, Any]:
    file = part.file
    if file.file_data is None:
        what = "file_id references" if file.file_id else "file parts without file_data"
        raise _bad(f"{what} are not supported for Anthropic; send the file inline as file_data "
                   "(data:application/pdf;base64,...)", f"{path}.file")
    if file.file_data.startswith(("https://", "http://")):
        block: dict[str, Any] = {"type": "document", "source": {"type": "url", "url": file.file_data}}
    else:
        media_type, data = _data_url(file.file_data, f"{path}.file.file_data")
        if media_type == "application/pdf":
            block = {"type": "document", "source": {"type": "base64", "media_type": media_type, "data": data}}
        elif media_type.startswith("text/"):
            try:
                text = base64.b64decode(data, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise _bad("file_data is not valid base64 UTF-8 text", f"{path}.file.file_data") from None
            block = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": text}}
        elif media_type in IMAGE_TYPES:
            return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
        else:
            raise _bad(f"file type {media_type!r} is not supported by Anthropic (PDF, plain text or images)",
                       f"{path}.file.file_data")
    if file.filename:
        block["title"] = file.filename
    return block


def _content_blocks(content: str | tuple[Any, ...] | None, path: str) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        where = f"{path}[{j}]"
        if isinstance(part, TextPart):
            if part.text:
                blocks.append({"type": "text", "text": part.text})
        elif isinstance(part, ImagePart):
            blocks.append(_image_block(part, where))
        elif isinstance(part, FilePart):
            blocks.append(_document_block(part, where))
        elif isinstance(part, OtherPart) and part.type in NATIVE_BLOCKS:
            blocks.append({"type": part.type, **part.data})
            continue  # its own cache_control, if any, is in its data
        else:
            kind = part.type if isinstance(part, OtherPart) else type(part).__name__
            raise _bad(f"content part type {kind!r} is not supported by Anthropic", where)
        marker = getattr(part, "cache_control", None)
        if marker and blocks:
            blocks[-1]["cache_control"] = dict(marker)
    return blocks


def _marked(message: Message, blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A message-level ``cache_control`` (chat clients put it on the message) goes on its last block."""
    marker = message.extra.get("cache_control")
    if isinstance(marker, Mapping) and blocks:
        blocks[-1]["cache_control"] = dict(marker)
    return blocks


def _user_content(message: Message, path: str) -> str | list[dict[str, Any]]:
    if isinstance(message.content, str) and "cache_control" not in message.extra:
        return message.content
    if isinstance(message.content, str):
        return _marked(message, [{"type": "text", "text": message.content}] if message.content else [])
    return _marked(message, _content_blocks(message.content, path))


def _arguments(raw: str, path: str) -> Any:
    if not raw.strip():
        return {}
    try:
        value = loads(raw)
    except orjson.JSONDecodeError:
        raise _bad("tool call arguments must be a JSON object string", path) from None
    if not isinstance(value, dict):
        raise _bad("tool call arguments must be a JSON object", path)
    return value


def _assistant_blocks(message: Message, path: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    thinking = message.extra.get("thinking_blocks")
    if isinstance(thinking, list):
        blocks.extend(dict(b) for b in thinking if isinstance(b, dict)
                      and b.get("type") in ("thinking", "redacted_thinking"))
    blocks.extend(_content_blocks(message.content, f"{path}.content"))
    for j, call in enumerate(message.tool_calls or ()):
        blocks.append({"type": "tool_use", "id": sanitize_tool_call_id(call.id), "name": call.function.name,
                       "input": _arguments(call.function.arguments, f"{path}.tool_calls[{j}].function.arguments")})
    return _marked(message, blocks)


def _tool_result(message: Message, path: str) -> dict[str, Any]:
    if not message.tool_call_id:
        raise _bad("tool messages need tool_call_id", f"{path}.tool_call_id")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": sanitize_tool_call_id(message.tool_call_id)}
    if isinstance(message.content, str) or message.content is None:
        block["content"] = message.content or ""
    else:
        block["content"] = _content_blocks(message.content, f"{path}.content")
    if message.extra.get("is_error") is True:
        block["is_error"] = True
    return _marked(message, [block])[0]


def _append(messages: list[dict[str, Any]], role: str, content: str | list[dict[str, Any]]) -> None:
    """Add a turn, merging it into the previous one of the same role (Anthropic wants alternating roles);
    tool results stay first in a merged user turn."""
    if isinstance(content, list) and not content:
        return
    if messages and messages[-1]["role"] == role:
        previous = messages[-1]["content"]
        as_list = ([{"type": "text", "text": previous}] if previous else []) if isinstance(previous, str) \
            else previous
        new = ([{"type": "text", "text": content}] if content else []) if isinstance(content, str) else content
        messages[-1]["content"] = as_list + new
        return
    messages.append({"role": role, "content": content})


def _system_blocks(message: Message, path: str) -> list[dict[str, Any]]:
    """One block for the message's text, or one per part when a part carries a ``cache_control`` marker."""
    if isinstance(message.content, str) or message.content is None:
        text = message.content or ""
        return _marked(message, [{"type": "text", "text": text}] if text else [])
    for j, part in enumerate(message.content):
        if not isinstance(part, TextPart):
            raise _bad("system messages may only contain text parts", f"{path}.content[{j}]")
    if any(part.cache_control for part in message.content):  # type: ignore[union-attr]
        return _marked(message, _content_blocks(message.content, path))
    return _marked(message, [{"type": "text", "text": message.text}] if message.text else [])


def _tool_choice(request: ChatRequest) -> dict[str, Any] | None:
    choice = request.tool_choice
    out: dict[str, Any] | None
    if choice is None:
        out = {"type": "auto"} if request.parallel_tool_calls is False else None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "none":
        return {"type": "none"}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, Mapping):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), Mapping) else None
        if not isinstance(name, str) or not name:
            raise _bad("tool_choice object needs function.name", "$.tool_choice")
        out = {"type": "tool", "name": name}
    else:
        raise _bad(f"tool_choice {choice!r} is not one of auto, none, required or a function object",
                   "$.tool_choice")
    if out is not None and request.parallel_tool_calls is False:
        out["disable_parallel_tool_use"] = True
    return out


def to_messages_body(request: ChatRequest, model: str, *, system_prefix: Sequence[Mapping[str, Any]] = (),
                     native_fields: bool = True) -> dict[str, Any]:
    """The Messages API body for ``request`` sent to upstream ``model``.

    ``system_prefix`` blocks go before the caller's system prompt (the Claude login needs one). ``native_fields``:
    a ``/v1/messages`` client's own Anthropic fields (``scillm["anthropic_native"]``: ``thinking``, ``top_k``,
    ``mcp_servers``, ...) go in as it sent them; they ride there, not in ``extra``, so a fallback to another
    provider never gets them. Raises :class:`~scillm_core.errors.InvalidRequest` naming the JSON path for input
    Anthropic cannot take.
    """
    native = request.scillm.get("anthropic_native") if native_fields else None
    fields = {**native, **request.extra} if native else request.extra
    system: list[dict[str, Any]] = [dict(b) for b in system_prefix]
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(request.messages):
        path = f"$.messages[{i}]"
        if message.role in ("system", "developer"):
            system.extend(_system_blocks(message, path))
        elif message.role == "user":
            _append(messages, "user", _user_content(message, f"{path}.content"))
        elif message.role == "assistant":
            _append(messages, "assistant", _assistant_blocks(message, path))
        elif message.role == "tool":
            _append(messages, "user", [_tool_result(message, path)])
        else:
            raise _bad(f"role {message.role!r} is not supported by Anthropic; use tool messages", f"{path}.role")
    if not messages:
        raise _bad("at least one user or assistant message is required", "$.messages")

    body: dict[str, Any] = {"model": model, "messages": messages,
                            "max_tokens": request.max_output_tokens or DEFAULT_MAX_TOKENS}
    if request.n not in (None, 1):
        raise _bad("Anthropic returns one choice per call; n must be 1", "$.n")
    answering = answer_tool(request, model)
    answer: dict[str, Any] | None = None
    if request.response_format:
        kind = request.response_format.get("type")
        if kind == "json_schema":
            spec = request.response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, Mapping) else None
            if not isinstance(schema, Mapping):
                raise _bad("json_schema.schema must be an object", "$.response_format.json_schema.schema")
            if answering is None:
                body["output_config"] = {"format": {"type": "json_schema", "schema": dict(schema)}}
            else:  # a model before structured outputs: the schema is the answer tool's input (_offer_answer)
                about = spec.get("description")  # type: ignore[union-attr]  # (a Mapping: schema is one)
                answer = {"name": answering, "description": "Give your final answer by calling this tool: its "
                          "input is the answer." + (f" {about}" if isinstance(about, str) and about else ""),
                          "input_schema": dict(schema)}
        elif kind == "json_object":
            system.append({"type": "text", "text": "Respond with a single valid JSON object and nothing else."})
        elif kind not in ("text", None):
            raise _bad(f"response_format type {kind!r} is not supported", "$.response_format.type")
    if system:
        body["system"] = system
    if request.stop_sequences:
        for j, stop in enumerate(request.stop_sequences):
            if not stop.strip():
                raise _bad("Anthropic rejects whitespace-only stop sequences", f"$.stop[{j}]"
                           if not isinstance(request.stop, str) else "$.stop")
        body["stop_sequences"] = list(request.stop_sequences)
    if request.tools:
        tools = []
        for j, tool in enumerate(request.tools):
            if tool.type != "function":
                raise _bad(f"tool type {tool.type!r} is not supported; use function tools", f"$.tools[{j}].type")
            fn = tool.function
            entry: dict[str, Any] = {"name": fn.name,
                                     "input_schema": dict(fn.parameters or {"type": "object", "properties": {}})}
            if fn.description:
                entry["description"] = fn.description
            if fn.strict and takes(model, "strict_tools"):  # earlier models get the schema, without the guarantee
                entry["strict"] = True
            if tool.cache_control:
                entry["cache_control"] = dict(tool.cache_control)
            tools.append(entry)
        body["tools"] = tools
        choice = _tool_choice(request)
        if choice is not None:
            body["tool_choice"] = choice
    thinking_on = budgeted_effort = False
    # a /v1/messages client's own thinking and effort go as it sent them (its effort is also reasoning_effort)
    effort = None if native and ("thinking" in native or _effort_of(native.get("output_config"))) \
        else request.reasoning_effort
    if effort and effort != "none":
        budget = THINKING_BUDGETS.get(effort)
        if budget is None:
            raise _bad(f"reasoning_effort {effort!r} is not one of {', '.join(['none', *THINKING_BUDGETS])}",
                       "$.reasoning_effort")
        # Anthropic refuses thinking when tool_choice forces a tool: the client's required or named tool (a shape it
        # relies on) wins over the effort, as an unanswered tool turn does
        forced = isinstance(body.get("tool_choice"), Mapping) and body["tool_choice"].get("type") in ("any", "tool")
        if not forced and not _unthought_tool_turn(messages):
            if takes(model, "adaptive_thinking"):
                body["thinking"] = {"type": "adaptive"}
                body["output_config"] = {**body.get("output_config", {}),
                                         "effort": effort_for(model, EFFORTS[effort])}
            else:
                _think(body, budget, request.max_output_tokens)
            thinking_on = True
    for key in PASSTHROUGH:
        if key in fields:
            value = fields[key]
            if key == "output_config" and isinstance(value, Mapping):
                if answer is not None:  # (a /v1/messages client's format, which this model does not take)
                    value = {k: v for k, v in value.items() if k != "format"}
                body["output_config"] = {**dict(value), **body.get("output_config", {})}
                if _effort_of(value):  # the client's own effort wins over one reasoning_effort gave
                    body["output_config"]["effort"] = effort_for(model, value["effort"])
                if answer is not None and not body["output_config"]:
                    del body["output_config"]
            elif key == "thinking" and isinstance(value, Mapping) and value.get("type") == "adaptive" \
                    and not takes(model, "adaptive_thinking"):  # (a fallback to an earlier model, say)
                budgeted = _effort_of(fields.get("output_config")) or request.reasoning_effort or "medium"
                _think(body, THINKING_BUDGETS.get(budgeted, THINKING_BUDGETS["medium"]), request.max_output_tokens)
                budgeted_effort = True
            elif key == "metadata":  # OpenAI's metadata is free-form tags; Anthropic's holds user_id only
                user_id = value.get("user_id") if isinstance(value, Mapping) else None
                if isinstance(user_id, str):
                    body["metadata"] = {"user_id": user_id}
            elif key == "service_tier":  # OpenAI's default/flex/scale/priority have no Anthropic counterpart
                if value in ("auto", "standard_only"):
                    body["service_tier"] = value
            else:
                body[key] = value
    if native and native.get("server_tools"):  # tools of Anthropic's own types a /v1/messages client sent
        body["tools"] = [*body.get("tools", ()), *native["server_tools"]]
    if request.extra.get("web_search_options") is not None:  # chat's web search (a Responses web search tool)
        body["tools"] = [*body.get("tools", ()), _web_search(request.extra["web_search_options"],
                                                             request.scillm.get("max_tool_calls"))]
    if budgeted_effort and _effort_of(body.get("output_config")):  # adaptive thinking's effort: now its budget
        body["output_config"] = {k: v for k, v in body["output_config"].items() if k != "effort"}
        if not body["output_config"]:
            del body["output_config"]
    thinking_on = thinking_on or (isinstance(body.get("thinking"), Mapping)
                                  and body["thinking"].get("type") in ("enabled", "adaptive"))
    if answer is not None:
        _offer_answer(body, answer, request, thinking_on)
    if request.temperature is not None and not thinking_on:  # thinking requires the default temperature
        body["temperature"] = min(max(request.temperature, 0.0), 1.0)
    if request.top_p is not None:
        body["top_p"] = request.top_p
    # OpenAI's end-user ids (safety_identifier replaces user) are Anthropic's metadata.user_id
    user = request.extra.get("safety_identifier") or request.extra.get("user")
    if isinstance(user, str) and user and "metadata" not in body:
        body["metadata"] = {"user_id": user[:256]}
    if request.stream:
        body["stream"] = True
    return body


def _offer_answer(body: dict[str, Any], answer: dict[str, Any], request: ChatRequest, thinking_on: bool) -> None:
    """The answer tool added for a ``json_schema`` answer from a model before structured outputs, and the tool
    choice that makes the model answer with it: forced when the client sent no tools; ``any`` when it did (the
    model calls one of the client's tools, or answers: a tool loop goes on, and its last turn is the JSON answer);
    with ``tool_choice: "none"`` the client's tools are left out and the answer is forced. A client that requires a
    tool call now (``required``, or one named tool) gets its choice and no answer tool: the answer comes on a later
    turn. With thinking on, Anthropic refuses a forced tool choice: the tool is offered (``auto``) and the model
    asked by its description, and an answer in text comes back as it is."""
    choice = request.tool_choice
    if choice == "required" or isinstance(choice, Mapping):
        return
    tools: list[dict[str, Any]] = body.get("tools", [])
    if choice == "none":
        tools = tools[len(request.tools or ()):]  # the client's function tools come first (server tools after)
    body["tools"] = [*tools, answer]
    out: dict[str, Any] = {"type": "auto"} if thinking_on else {"type": "any"} if tools \
        else {"type": "tool", "name": answer["name"]}
    if request.parallel_tool_calls is False:
        out["disable_parallel_tool_use"] = True
    body["tool_choice"] = out


def _effort_of(output_config: Any) -> str | None:
    effort = output_config.get("effort") if isinstance(output_config, Mapping) else None
    return effort if isinstance(effort, str) else None


def _think(body: dict[str, Any], budget: int, asked_tokens: int | None) -> None:
    """Thinking with ``budget`` tokens, which must be below ``max_tokens``: raised past it keeping the caller's
    answer room."""
    body["thinking"] = {"type": "enabled", "budget_tokens": budget}
    if body["max_tokens"] <= budget:
        body["max_tokens"] = budget + (asked_tokens or DEFAULT_MAX_TOKENS)


def _unthought_tool_turn(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the final assistant turn called tools and came back without the thinking blocks it was answered
    with. Anthropic refuses thinking then (400 "a final assistant message must start with a thinking block"), so a
    ``reasoning_effort`` leaves thinking off for this call: a chat client that does not send ``thinking_blocks``
    back (openai-agents' chat completions model, most OpenAI clients) gets its tool loop answered, and thinking
    again from the next turn that has no unanswered tool call."""
    last = next((m for m in reversed(messages) if m.get("role") == "assistant"), None)
    blocks = last.get("content") if last is not None else None
    if not isinstance(blocks, list) or not any(isinstance(b, Mapping) and b.get("type") == "tool_use"
                                               for b in blocks):
        return False
    return not (isinstance(blocks[0], Mapping) and blocks[0].get("type") in ("thinking", "redacted_thinking"))


def _web_search(options: Any, limit: Any = None) -> dict[str, Any]:
    """Chat's ``web_search_options`` as Anthropic's web search tool: the place in ``user_location.approximate``, and
    ``filters.allowed_domains`` (a Responses web search tool's); ``search_context_size`` has no counterpart (a hint
    of how much search context to use). ``limit``: a Responses request's ``max_tool_calls``, as ``max_uses``."""
    tool: dict[str, Any] = dict(WEB_SEARCH_TOOL)
    if isinstance(limit, int):
        tool["max_uses"] = limit
    if isinstance(options, Mapping):
        location = options.get("user_location")
        place = location.get("approximate") if isinstance(location, Mapping) else None
        if isinstance(place, Mapping) and place:
            tool["user_location"] = {**place, "type": "approximate"}
        filters = options.get("filters")
        domains = filters.get("allowed_domains") if isinstance(filters, Mapping) else None
        if isinstance(domains, list) and domains:
            tool["allowed_domains"] = domains
    return tool


# -- response ------------------------------------------------------------------------------------------------------

def usage_from_anthropic(usage: Mapping[str, Any]) -> Usage:
    """Prompt tokens include cache reads and writes; ``cached_tokens`` is the cache reads."""
    read = token_count(usage.get("cache_read_input_tokens"))
    created = token_count(usage.get("cache_creation_input_tokens"))
    prompt = token_count(usage.get("input_tokens")) + read + created
    completion = token_count(usage.get("output_tokens"))
    extra: dict[str, Any] = {"prompt_tokens_details": {"cached_tokens": read},
                             "cache_creation_input_tokens": created, "cache_read_input_tokens": read}
    thinking = (usage.get("output_tokens_details") or {}).get("thinking_tokens") \
        if isinstance(usage.get("output_tokens_details"), Mapping) else None
    if thinking is not None:
        extra["completion_tokens_details"] = {"reasoning_tokens": token_count(thinking)}
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion, extra=extra)


def _finish(stop_reason: Any) -> str | None:
    if stop_reason is None:
        return None
    return FINISH_REASONS.get(str(stop_reason), "stop")


def annotation(citation: Mapping[str, Any], start: int, end: int) -> dict[str, Any]:
    """An Anthropic citation of the answer's text ``[start, end)`` as a chat annotation. A web search's source
    (``web_search_result_location``) is OpenAI's ``url_citation`` (``url``, ``title``, ``start_index``,
    ``end_index``; Anthropic's ``cited_text`` and ``encrypted_index`` beside them, which a ``/v1/messages`` client
    gets back). A document citation (``char_location``, ``page_location``, ...) has no OpenAI type: it is the
    citation as Anthropic sent it with ``start_index`` / ``end_index`` locating the cited text in the content."""
    if citation.get("type") == "web_search_result_location":
        source = {"url": citation.get("url"), "title": citation.get("title") or "", "start_index": start,
                  "end_index": end}
        source.update((key, value) for key, value in citation.items() if key not in ("type", *source))
        return {"type": "url_citation", "url_citation": source}
    return {**citation, "start_index": start, "end_index": end}


def from_messages_response(data: Any, *, model: str = "", answer_tool: str | None = None) -> ChatResponse:
    """A Messages response body to a chat completion; raises ``ValueError`` on a body that is not a message.
    ``answer_tool``: the tool that carries a ``json_schema`` answer (:func:`answer_tool`): when the model called it,
    its input is the message's content (JSON text, any text beside it left out) and the answer stops (``stop``)
    unless the model also called the client's tools."""
    if not isinstance(data, Mapping) or data.get("type") != "message" or not isinstance(data.get("content"), list):
        raise ValueError("not a Messages API message")
    texts: list[str] = []
    reasoning: list[str] = []
    thinking_blocks: list[dict[str, Any]] = []
    calls: list[ToolCall] = []
    annotations: list[dict[str, Any]] = []
    offset = 0
    answered = None
    if answer_tool is not None:
        answered = next((b for b in data["content"] if isinstance(b, Mapping) and b.get("type") == "tool_use"
                         and b.get("name") == answer_tool), None)
    for block in data["content"]:
        kind = block.get("type") if isinstance(block, Mapping) else None
        if answered is not None and (kind == "text" or block is answered):
            continue
        if kind == "text":
            text = str(block.get("text", ""))
            texts.append(text)
            annotations.extend(annotation(c, offset, offset + len(text)) for c in block.get("citations") or ()
                               if isinstance(c, Mapping))
            offset += len(text)
        elif kind == "tool_use":
            calls.append(ToolCall(id=str(block["id"]), function=FunctionCall(
                name=str(block["name"]), arguments=orjson.dumps(block.get("input") or {}).decode())))
        elif kind == "thinking":
            reasoning.append(str(block.get("thinking", "")))
            thinking_blocks.append({"type": "thinking", "thinking": block.get("thinking", ""),
                                    "signature": block.get("signature", "")})
        elif kind == "redacted_thinking":
            thinking_blocks.append({"type": "redacted_thinking", "data": block.get("data", "")})
    extra: dict[str, Any] = {}
    if reasoning:
        extra["reasoning_content"] = "".join(reasoning)
    if thinking_blocks:
        extra["thinking_blocks"] = thinking_blocks
    if annotations:
        extra["annotations"] = annotations
    finish = _finish(data.get("stop_reason")) or "stop"
    if answered is not None:
        texts = [orjson.dumps(answered.get("input") or {}).decode()]
        if finish == "tool_calls" and not calls:
            finish = "stop"
    message = Message(role="assistant", content="".join(texts) if texts or not calls else None,
                      tool_calls=tuple(calls) or None, extra=extra)
    usage = data.get("usage")
    return ChatResponse(id=str(data.get("id") or "msg"), model=str(data.get("model") or model),
                        created=int(time.time()), choices=(Choice(message=message, finish_reason=finish),),
                        usage=usage_from_anthropic(usage) if isinstance(usage, Mapping) else None)


# -- errors --------------------------------------------------------------------------------------------------------

def parse_error_body(raw: bytes) -> tuple[str, str | None]:
    """(message, Anthropic error type) from ``{"type":"error","error":{"type","message"}}``; raw text otherwise."""
    try:
        data = loads(raw)
    except orjson.JSONDecodeError:
        return excerpt(raw.decode("utf-8", "replace")).strip(), None
    if isinstance(data, Mapping):
        error = data.get("error")
        if isinstance(error, Mapping):
            return excerpt(str(error.get("message") or error.get("type") or "error"), 2000), \
                (str(error["type"]) if error.get("type") else None)
        if isinstance(error, str):
            return excerpt(error, 2000), None
    return excerpt(str(data)), None


def _error_code(kind: str | None, message: str) -> str | None:
    if kind == "invalid_request_error" and "prompt is too long" in message.lower():
        return "context_length_exceeded"
    return None


def error_from_status(status: int, raw: bytes, headers: Mapping[str, str], *, provider: str, model: str,
                      secrets: tuple[str | None, ...] = ()) -> errors.UpstreamError:
    message, kind = parse_error_body(raw)
    exc = error_for_status(status, message, provider=provider, model=model, code=_error_code(kind, message),
                           kind=kind, headers=headers, secrets=secrets)
    should_retry = headers.get("x-should-retry")
    if should_retry in ("true", "false"):
        exc.retryable = should_retry == "true"  # type: ignore[misc]  # the upstream's own verdict wins
    return exc


def error_from_event(data: Any, *, provider: str, model: str,
                     secrets: tuple[str | None, ...] = ()) -> errors.UpstreamError:
    """A mid-stream ``event: error`` payload to the error its HTTP status would have given."""
    error = data.get("error") if isinstance(data, Mapping) else None
    kind = str(error.get("type")) if isinstance(error, Mapping) and error.get("type") else "api_error"
    message = str(error.get("message") or kind) if isinstance(error, Mapping) else "stream error"
    return error_for_status(ERROR_STATUS.get(kind, 500), f"mid-stream error: {message}", provider=provider,
                            model=model, code=_error_code(kind, message), kind=kind, secrets=secrets)


# -- streaming -----------------------------------------------------------------------------------------------------

class StreamTranslator:
    """Feed Messages SSE events (``feed(event_name, data)``) and get OpenAI chunks back.

    The role chunk comes first (at ``message_start``); ``tool_calls[].index`` is the ordinal among tool calls,
    not the content-block index; the finish chunk comes at ``message_delta``; the ``choices: []`` usage chunk
    only with ``include_usage``. ``event: error`` raises the matching :class:`UpstreamError`.

    ``answer_tool``: the tool that carries a ``json_schema`` answer (:func:`answer_tool`): its ``input_json_delta``
    pieces are content deltas, and the answer finishes ``stop`` unless the client's tools were called too. Text
    is held back until it is known not to precede the answer (a tool call or the end), as
    :func:`from_messages_response` leaves text beside the answer out.
    """

    def __init__(self, *, provider: str, model: str, include_usage: bool,
                 secrets: tuple[str | None, ...] = (), answer_tool: str | None = None) -> None:
        self.provider = provider
        self.route_model = model  # errors name the routed model; chunks carry the upstream's own model id
        self.model = model
        self.include_usage = include_usage
        self.secrets = secrets
        self.id = "msg"
        self.created = int(time.time())
        self.usage: dict[str, Any] = {}
        self.finish: str | None = None
        self.started = False
        self.stopped = False
        self._blocks: dict[int, dict[str, Any]] = {}
        self._tools = 0
        self._offset = 0  # characters of answer text so far: where a cited block's text starts and ends
        self.answer_tool = answer_tool
        self._answered = False
        self._held: list[ChatChunk] = []  # text chunks not yet known to be more than chatter before the answer

    def _chunk(self, delta: Delta, finish: str | None = None) -> ChatChunk:
        return ChatChunk(id=self.id, model=self.model, created=self.created,
                         choices=(ChunkChoice(delta=delta, finish_reason=finish),))

    def feed(self, event: str | None, data: Any) -> list[ChatChunk]:
        kind = data.get("type") if isinstance(data, Mapping) else None
        kind = kind or event
        if kind == "error" or event == "error":
            raise error_from_event(data, provider=self.provider, model=self.route_model, secrets=self.secrets)
        if not isinstance(data, Mapping):
            return []
        if kind == "message_start":
            message = data.get("message") or {}
            self.id = str(message.get("id") or self.id)
            self.model = str(message.get("model") or self.model)
            self.usage.update(message.get("usage") or {})
            self.started = True
            return [self._chunk(Delta(role="assistant", content=""))]
        if kind in ("content_block_start", "content_block_delta", "content_block_stop"):
            index = int(data.get("index", 0))
            if kind == "content_block_start":
                chunks = self._block_start(index, data.get("content_block") or {})
            elif kind == "content_block_delta":
                chunks = self._block_delta(index, data.get("delta") or {})
            else:
                chunks = self._block_stop(index)
            if self.answer_tool is not None and self._blocks.get(index, {}).get("type") == "text":
                if not self._answered:  # (text beside the answer is left out)
                    self._held.extend(chunks)
                return []
            return chunks
        if kind == "message_delta":
            usage = data.get("usage")
            if isinstance(usage, Mapping):
                self.usage.update({k: v for k, v in usage.items() if v is not None})  # cumulative counts
            delta = data.get("delta") or {}
            if delta.get("stop_reason") is not None:
                self.finish = _finish(delta["stop_reason"])
                if self._answered and self.finish == "tool_calls" and not self._tools:
                    self.finish = "stop"
                return [*self._release(), self._chunk(Delta(), self.finish)]
            return []
        if kind == "message_stop":
            self.stopped = True
            out = self._release()
            if self.finish is None:
                self.finish = "stop"
                out.append(self._chunk(Delta(), self.finish))
            if self.include_usage:
                out.append(ChatChunk(id=self.id, model=self.model, created=self.created, choices=(),
                                     usage=usage_from_anthropic(self.usage)))
            return out
        return []  # ping and event types added later

    def _release(self) -> list[ChatChunk]:
        held, self._held = self._held, []
        return held

    def _block_start(self, index: int, block: Mapping[str, Any]) -> list[ChatChunk]:
        kind = block.get("type")
        state: dict[str, Any] = {"type": kind, "thinking": []}
        self._blocks[index] = state
        if kind == "tool_use":
            initial = block.get("input")
            args = orjson.dumps(initial).decode() if isinstance(initial, Mapping) and initial else ""
            state["sent_args"] = bool(args)
            if self.answer_tool is not None and block.get("name") == self.answer_tool:
                self._answered = True
                self._held.clear()
                state["answer"] = True
                return [self._chunk(Delta(content=args))] if args else []
            state["tool"] = self._tools
            self._tools += 1
            return [*self._release(), self._chunk(Delta(tool_calls=(ToolCallDelta(
                index=state["tool"], id=str(block.get("id")), type="function",
                function=FunctionCallDelta(name=str(block.get("name")), arguments=args)),)))]
        if kind == "text":
            state["start"] = self._offset
            state["citations"] = [c for c in block.get("citations") or () if isinstance(c, Mapping)]
            if block.get("text"):
                self._offset += len(str(block["text"]))
                return [self._chunk(Delta(content=str(block["text"])))]
        if kind == "thinking" and block.get("thinking"):
            state["thinking"].append(str(block["thinking"]))
            return [self._chunk(Delta(extra={"reasoning_content": str(block["thinking"])}))]
        if kind == "redacted_thinking":
            return [self._chunk(Delta(extra={"thinking_blocks": [{"type": "redacted_thinking",
                                                                   "data": block.get("data", "")}]}))]
        return []

    def _block_delta(self, index: int, delta: Mapping[str, Any]) -> list[ChatChunk]:
        kind = delta.get("type")
        state = self._blocks.get(index) or {"type": None, "thinking": []}
        if kind == "text_delta":
            text = str(delta.get("text") or "")
            self._offset += len(text)
            return [self._chunk(Delta(content=text))] if text else []
        if kind == "citations_delta":  # before the cited text: said with the block's span when it ends
            if isinstance(delta.get("citation"), Mapping) and "citations" in state:
                state["citations"].append(delta["citation"])
            return []
        if kind == "input_json_delta":
            partial = str(delta.get("partial_json") or "")
            if not partial or state.get("sent_args"):
                return []
            if state.get("answer"):  # the answer tool's input is the answer
                return [self._chunk(Delta(content=partial))]
            if "tool" not in state:
                return []
            return [self._chunk(Delta(tool_calls=(ToolCallDelta(
                index=state["tool"], function=FunctionCallDelta(arguments=partial)),)))]
        if kind == "thinking_delta":
            text = str(delta.get("thinking") or "")
            if not text:
                return []
            state["thinking"].append(text)
            return [self._chunk(Delta(extra={"reasoning_content": text}))]
        if kind == "signature_delta":
            block = {"type": "thinking", "thinking": "".join(state["thinking"]),
                     "signature": str(delta.get("signature") or "")}
            return [self._chunk(Delta(extra={"thinking_blocks": [block]}))]
        return []

    def _block_stop(self, index: int) -> list[ChatChunk]:
        """A cited text block's citations, as ``annotations`` locating its text (known now that it ended)."""
        state = self._blocks.get(index)
        if not state or not state.get("citations"):
            return []
        start = state["start"]
        return [self._chunk(Delta(extra={"annotations": [annotation(c, start, self._offset)
                                                         for c in state["citations"]]}))]
