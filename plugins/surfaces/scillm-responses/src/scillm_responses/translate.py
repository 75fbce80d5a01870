"""OpenAI Responses wire <-> core chat models (provider-protocols.md §7, §9).

- :func:`parse_request`: a ``POST /v1/responses`` body -> a :class:`ChatRequest` (400 naming the JSON path of
  anything wrong) plus the request fields a Response object echoes.
- :func:`response_object`: a :class:`ChatResponse` -> a Response object.
- :class:`EventStream`: chat chunks -> the Responses streaming events, ``sequence_number`` on every one.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from collections.abc import Mapping
from typing import Any

import attrs
import orjson

from scillm_core import ChatChunk, ChatRequest, ChatResponse, Usage, errors, structure
from scillm_core.jsonio import json_type
from scillm_core.models import REASONING_CONTENT, THINKING_BLOCKS
from scillm_core.models.extensions import EXTENSION_FIELDS, take_extensions
from scillm_core.models.native import NativeRequest, native_events
from scillm_core.models.params import HOSTED

__all__ = ["EXTENSION_FIELDS", "EventStream", "THINKING", "new_id", "parse_request", "response_object",
           "sealed_thinking", "unsealed_thinking", "usage_object", "without_sealed_thinking"]

#: Responses fields we accept and ignore (they ask for server-side behaviour that changes nothing here).
IGNORED_FIELDS = frozenset({"store", "include", "prompt_cache_retention", "truncation", "service_tier",
                            "stream_options", "prompt", "client_metadata"})
#: ``include`` value (or ``top_logprobs`` > 0) asking for token log probabilities: chat's ``logprobs``, delivered
#: where the route has them (``scillm_core.models.params``) and carried back onto ``output_text``
LOGPROBS = "message.output_text.logprobs"
#: Responses fields that chat completions has too, under the same name: carried to the chat request, so an
#: OpenAI-compatible upstream gets them and other providers map them (Anthropic: ``metadata.user_id``; Codex:
#: its ``prompt_cache_key``). ``prompt_cache_key`` also names the session for affinity (``session_of``).
CHAT_FIELDS = ("prompt_cache_key", "safety_identifier", "user")
STATEFUL_FIELDS = ("previous_response_id", "conversation")
#: chat request fields -> where a Responses body has them (errors about the chat request name the client's path)
FIELD_ORIGINS = {"messages": "$.input", "max_tokens": "$.max_output_tokens", "response_format": "$.text.format",
                 "response_format.json_schema": "$.text.format", "response_format.json_schema.schema":
                 "$.text.format.schema", "reasoning_effort": "$.reasoning.effort", "verbosity": "$.text.verbosity"}
#: ``tool_choice`` types that are no hosted tool -> the capability they ask for (none a translated route has)
CHOICES = {"custom": "custom_tools", "allowed_tools": "allowed_tools"}


#: How a reasoning item's ``encrypted_content`` carries what a Responses client cannot hold otherwise: the
#: upstream's own reasoning state, Anthropic's signed thinking blocks. scillm keeps no response state, so the
#: client keeps it: a reasoning item that comes back with it gives the next assistant turn its ``thinking_blocks``
#: (Anthropic needs them back, signatures intact, in a tool loop with thinking on). Anything else in
#: ``encrypted_content`` (OpenAI's own) is not scillm's and is left alone.
THINKING = "scillm-thinking."


def sealed_thinking(blocks: Any) -> str | None:
    """Thinking blocks (chat's ``thinking_blocks``) as a reasoning item's ``encrypted_content``; None for none."""
    kept = [dict(b) for b in blocks if isinstance(b, Mapping) and b.get("type") in ("thinking", "redacted_thinking")
            ] if isinstance(blocks, list) else []
    return THINKING + base64.urlsafe_b64encode(orjson.dumps(kept)).decode() if kept else None


def unsealed_thinking(value: Any) -> list[dict[str, Any]]:
    """The thinking blocks a reasoning item's ``encrypted_content`` carries (``[]`` when it is not scillm's)."""
    if not isinstance(value, str) or not value.startswith(THINKING):
        return []
    try:
        blocks = orjson.loads(base64.urlsafe_b64decode(value[len(THINKING):]))
    except (binascii.Error, ValueError):
        return []
    return [b for b in blocks if isinstance(b, dict) and b.get("type") in ("thinking", "redacted_thinking")] \
        if isinstance(blocks, list) else []


def without_sealed_thinking(native: NativeRequest) -> NativeRequest:
    """The client's body without the reasoning items that carry scillm's sealed thinking: they are Anthropic's,
    which never takes a Responses body as sent, and an upstream that does (OpenAI's Responses API, Codex) cannot
    open them (the chat request keeps them as ``thinking_blocks``, for Anthropic attempts only)."""
    items = native.body.get("input")
    if not isinstance(items, list) or not any(_sealed(item) for item in items):
        return native
    return attrs.evolve(native, body={**native.body, "input": [item for item in items if not _sealed(item)]},
                        raw=None)


def _sealed(item: Any) -> bool:
    return isinstance(item, Mapping) and item.get("type") == "reasoning" \
        and isinstance(item.get("encrypted_content"), str) and item["encrypted_content"].startswith(THINKING)


MAX_SEQUENCE = 2**53  # an upstream's sequence_number or created_at past it is not one (JSON numbers stay exact)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def _bad(message: str, path: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(f"{message} @ {path}", param=path)


def _text_of(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"expected string, got {json_type(value)}", path)
    return value


def _part(part: Any, path: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise _bad(f"expected content part object, got {json_type(part)}", path)
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text", "refusal", "summary_text"):
        key = "refusal" if kind == "refusal" else "text"
        return {"type": "text", "text": _text_of(part.get(key), f"{path}.{key}")}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            raise _bad("input_image needs image_url (a data: or https: URL); file_id images are not supported",
                       f"{path}.image_url")
        image: dict[str, Any] = {"url": url}
        if isinstance(part.get("detail"), str):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        file: dict[str, Any] = {}
        if isinstance(part.get("file_data"), str):
            file["file_data"] = part["file_data"]
        elif isinstance(part.get("file_id"), str):
            file["file_id"] = part["file_id"]
        else:
            raise _bad("input_file needs file_data (a data: URL) or file_id", path)
        if isinstance(part.get("filename"), str):
            file["filename"] = part["filename"]
        return {"type": "file", "file": file}
    raise _bad(f"unsupported content part type {kind!r} (use input_text, input_image or input_file)",
               f"{path}.type")


def _content(content: Any, path: str, *, text_only: bool) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"expected string or array of content parts, got {json_type(content)}", path)
    parts = [_part(p, f"{path}[{j}]") for j, p in enumerate(content)]
    if text_only:
        for j, part in enumerate(parts):
            if part["type"] != "text":
                raise _bad("only text parts are allowed in this message", f"{path}[{j}]")
        return "".join(p["text"] for p in parts)
    return parts


def _output_text(output: Any, path: str) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        parts = [_part(x, f"{path}[{j}]") for j, x in enumerate(output)]
        return "".join(p["text"] for p in parts if p["type"] == "text")
    raise _bad(f"expected string or array of parts, got {json_type(output)}", path)


def _messages(body: Mapping[str, Any], origins: errors.Origins) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad(f"expected string, got {json_type(instructions)}", "$.instructions")
        if instructions:
            messages.append({"role": "system", "content": instructions})
            origins.message("$.instructions")
    raw = body.get("input")
    if raw is None:
        raise _bad("input is required (a string or an array of input items)", "$.input")
    if isinstance(raw, str):
        messages.append({"role": "user", "content": raw})
        origins.message("$.input")
        return messages
    if not isinstance(raw, list):
        raise _bad(f"expected string or array of items, got {json_type(raw)}", "$.input")
    thinking: list[dict[str, Any]] = []  # carried by reasoning items, for the assistant turn that follows them
    reasoning: list[str] = []  # their text likewise (summary, or reasoning text), for upstreams that want it back
    for i, item in enumerate(raw):
        path = f"$.input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"expected input item object, got {json_type(item)}", path)
        kind = item.get("type", "message")
        if kind == "reasoning":  # the model's own state: signed thinking blocks (Anthropic's), and its text
            sealed = item.get("encrypted_content")
            if sealed is not None and not isinstance(sealed, str):
                raise _bad(f"expected string, got {json_type(sealed)}", f"{path}.encrypted_content")
            thinking += unsealed_thinking(sealed)
            reasoning += _reasoning_text(item, path)
            continue
        before = len(messages)
        last = messages[-1] if messages else None
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _bad(f"role must be user, assistant, system or developer, got {role!r}", f"{path}.role")
            content = _content(item.get("content"), f"{path}.content", text_only=role != "user")
            # developer is the Responses name for system; many chat upstreams know only system
            messages.append({"role": "system" if role == "developer" else role, "content": content})
            origins.message(path, f"{path}.content" if isinstance(content, list) else None)  # parts keep places
        elif kind in ("function_call", "custom_tool_call"):
            call_id = _text_of(item.get("call_id"), f"{path}.call_id")
            name = _text_of(item.get("name"), f"{path}.name")
            if kind == "function_call":
                arguments = _text_of(item.get("arguments", "{}"), f"{path}.arguments")
            else:
                arguments = orjson.dumps({"input": _text_of(item.get("input", ""), f"{path}.input")}).decode()
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                origins.call(path)
                if last.get("content") == "":
                    last["content"] = None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                origins.message(path, None, [path])
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = _text_of(item.get("call_id"), f"{path}.call_id")
            output = _output_text(item.get("output", ""), f"{path}.output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
            origins.message(path)
        elif kind == "item_reference":
            raise _bad("item_reference needs the item it names kept (the surface resolves those it keeps); "
                       "send the items themselves", path)
        else:
            raise _bad(f"unsupported input item type {kind!r} (supported: message, function_call, "
                       f"function_call_output, reasoning)", f"{path}.type")
        if thinking or reasoning:  # the turn they came with starts here, or they belonged to no turn of this input
            turn = messages[before] if len(messages) > before else last
            if turn is not None and turn["role"] == "assistant":
                if thinking:
                    turn[THINKING_BLOCKS] = [*turn.get(THINKING_BLOCKS, ()), *thinking]
                if reasoning:
                    turn[REASONING_CONTENT] = turn.get(REASONING_CONTENT, "") + "".join(reasoning)
            thinking, reasoning = [], []
    return messages


def _reasoning_text(item: Mapping[str, Any], path: str) -> list[str]:
    """A reasoning item's text: its ``content`` (reasoning text), else its summary (it goes on as the turn's
    reasoning_content, so a part that is not an object with a string ``text`` is a 400 naming it)."""
    found: list[list[str]] = []
    for key in ("content", "summary"):
        parts = item.get(key)
        if parts is None:
            continue
        if not isinstance(parts, list):
            raise _bad(f"expected array of parts, got {json_type(parts)}", f"{path}.{key}")
        for j, part in enumerate(parts):
            if not isinstance(part, Mapping):
                raise _bad(f"expected part object, got {json_type(part)}", f"{path}.{key}[{j}]")
            _text_of(part.get("text"), f"{path}.{key}[{j}].text")
        found.append([p["text"] for p in parts])
    return next((texts for texts in found if texts), [])


def _tools(raw: Any, asks: dict[str, str], origins: errors.Origins
           ) -> tuple[list[dict[str, Any]] | None, dict[str, Any] | None]:
    """The function tools, and chat's ``web_search_options`` for a web search tool. A hosted tool is something the
    client asks for: its path goes in ``asks`` (``scillm_core.models.params``), so a route that cannot run it
    answers 400 instead of answering without it. A web search is chat's ``web_search`` (OpenAI-compatible
    upstreams get ``web_search_options``, Anthropic its web search tool); the other hosted tools (``file_search``,
    ``code_interpreter``, ``mcp``, ...) and custom tools only a Responses upstream takes, as sent."""
    if raw is None:
        return None, None
    if not isinstance(raw, list):
        raise _bad(f"expected array of tools, got {json_type(raw)}", "$.tools")
    tools: list[dict[str, Any]] = []
    search: dict[str, Any] | None = None
    for i, tool in enumerate(raw):
        path = f"$.tools[{i}]"
        if not isinstance(tool, dict):
            raise _bad(f"expected tool object, got {json_type(tool)}", path)
        kind = tool.get("type")
        if kind != "function":
            if not isinstance(kind, str) or not kind:
                raise _bad("tool type is required (a string)", f"{path}.type")
            if kind.startswith("web_search"):  # web_search, web_search_preview, and their dated versions
                search = _web_search_options(tool)
                asks[path] = "web_search"
                origins.fields["web_search_options"] = path
            elif kind == "custom":  # free-form input (Codex's apply_patch grammar): chat tools take JSON only
                asks[path] = "custom_tools"
            else:
                asks[path] = HOSTED + kind
            continue
        origins.tools.append(path)
        if isinstance(tool.get("function"), dict):  # chat-style nesting: accept it too
            tools.append({"type": "function", "function": tool["function"]})
            continue
        function: dict[str, Any] = {"name": _text_of(tool.get("name"), f"{path}.name")}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        tools.append({"type": "function", "function": function})
    return tools or None, search


def _web_search_options(tool: Mapping[str, Any]) -> dict[str, Any]:
    """A Responses web search tool as chat's ``web_search_options``: ``search_context_size``, ``user_location``
    (chat nests the place under ``approximate``) and ``filters`` (allowed domains) as the client gave them."""
    options: dict[str, Any] = {key: tool[key] for key in ("search_context_size", "filters")
                               if tool.get(key) is not None}
    location = tool.get("user_location")
    if isinstance(location, Mapping):
        place = {key: value for key, value in location.items() if key != "type" and value is not None}
        options["user_location"] = {"type": location.get("type") or "approximate", "approximate": place}
    return options


def _tool_choice(choice: Any, asks: dict[str, str]) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "function" and isinstance(choice.get("name"), str):
            return {"type": "function", "function": {"name": choice["name"]}}
        if isinstance(choice.get("function"), dict):
            return choice
        if kind in ("auto", "none", "required"):
            return kind
        if isinstance(kind, str) and kind and kind != "function":
            # a hosted or custom tool forced, or a choice among the tools: the chat model has no way to say it,
            # so only a route that takes the body as sent delivers it
            asks["$.tool_choice"] = CHOICES.get(kind, HOSTED + kind)
            return None
        raise _bad("tool_choice must be auto, none, required, {\"type\": \"function\", \"name\": ...} or a hosted "
                   "tool's type", "$.tool_choice")
    raise _bad(f"expected string or object, got {json_type(choice)}", "$.tool_choice")


def _response_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _bad(f"expected object, got {json_type(text)}", "$.text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _bad(f"expected object, got {json_type(fmt)}", "$.text.format")
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema", {}), dict):
            raise _bad(f"expected object, got {json_type(fmt['schema'])}", "$.text.format.schema")
        if not isinstance(fmt.get("name", ""), str):
            raise _bad(f"expected string, got {json_type(fmt['name'])}", "$.text.format.name")
        schema: dict[str, Any] = {"name": fmt.get("name") or "response", "schema": fmt.get("schema") or {}}
        if fmt.get("strict") is not None:
            schema["strict"] = fmt["strict"]
        if fmt.get("description"):
            schema["description"] = fmt["description"]
        return {"type": "json_schema", "json_schema": schema}
    raise _bad(f"unsupported text.format type {kind!r}", "$.text.format.type")


def _logprobs_asked(body: Mapping[str, Any], chat: dict[str, Any], asks: dict[str, str]) -> None:
    top = body.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
        raise _bad("top_logprobs must be an integer from 0 to 20", "$.top_logprobs")
    include = body.get("include")
    if not (top or (isinstance(include, list) and LOGPROBS in include)):
        return
    chat["logprobs"] = True
    if top:
        chat["top_logprobs"] = top
    path = "$.top_logprobs" if top else f"$.include[{include.index(LOGPROBS)}]"  # type: ignore[union-attr]
    asks[path] = "logprobs"


def parse_request(body: Any, *, session: str | None = None, origins: errors.Origins | None = None
                  ) -> tuple[ChatRequest, dict[str, Any]]:
    """``(chat request, echo)``; ``echo`` holds the request fields a Response object repeats. ``session`` names
    the agent session (``scillm["session"]``); ``origins`` records where the chat request's parts came from, for
    errors about it (:class:`~scillm_core.errors.Origins`)."""
    origins = origins if origins is not None else errors.Origins()
    origins.fields.update(FIELD_ORIGINS)
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object", "$")
    for key in STATEFUL_FIELDS:
        if body.get(key) is not None:
            raise _bad(f"{key} is not supported: scillm keeps no response state; send the whole conversation "
                       f"in input (with function_call and function_call_output items)", f"$.{key}")
    if body.get("background"):
        raise _bad("background responses are not supported; use stream or a plain request", "$.background")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required (a string)", "$.model")
    extensions = take_extensions(dict(body))
    extensions["dialect"] = "openai-responses"
    if session:
        extensions["session"] = session
    stream = body.get("stream", False)
    if not isinstance(stream, bool | type(None)):
        raise _bad(f"expected boolean, got {json_type(stream)}", "$.stream")
    chat: dict[str, Any] = {"model": model, "messages": _messages(body, origins), "stream": bool(stream),
                            "scillm": extensions}
    if stream:
        chat["stream_options"] = {"include_usage": True}
    asks: dict[str, str] = {}  # what the client asks for, by JSON path: deliverable or a 400 (core's dispatch)
    origins.asks = asks
    tools, search = _tools(body.get("tools"), asks, origins)
    if search is not None:
        chat["web_search_options"] = search
    choice = _tool_choice(body.get("tool_choice"), asks)
    if tools:
        chat["tools"] = tools
        if choice is not None:
            chat["tool_choice"] = choice
        if body.get("parallel_tool_calls") is not None:
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("max_output_tokens", "max_tokens")):
        if body.get(src) is not None:
            chat[dst] = body[src]
    for key in CHAT_FIELDS:
        value = body.get(key)
        if value is not None:
            chat[key] = _text_of(value, f"$.{key}")
    _logprobs_asked(body, chat, asks)
    if asks:
        extensions["asks"] = asks
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise _bad(f"expected object, got {json_type(reasoning)}", "$.reasoning")
        if isinstance(reasoning.get("effort"), str):
            chat["reasoning_effort"] = reasoning["effort"]
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    verbosity = (body.get("text") or {}).get("verbosity")
    if verbosity is not None:  # a hint: OpenAI-compatible upstreams get chat's verbosity, others drop it
        chat["verbosity"] = _text_of(verbosity, "$.text.verbosity")
    limit = body.get("max_tool_calls")
    if limit is not None:  # a cap on hosted tool calls: Anthropic's web search max_uses, else nothing to cap
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise _bad("max_tool_calls must be a non-negative integer", "$.max_tool_calls")
        extensions["max_tool_calls"] = limit
    try:
        request = structure(chat, ChatRequest)
    except errors.ScillmError as exc:
        raise origins.relocate(exc) from None
    echo = {"instructions": body.get("instructions"), "tools": body.get("tools") or [],
            "tool_choice": body.get("tool_choice") or "auto",
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "max_output_tokens": body.get("max_output_tokens"),
            "reasoning": {"effort": (reasoning or {}).get("effort"), "summary": (reasoning or {}).get("summary")},
            "text": body.get("text") or {"format": {"type": "text"}}, "metadata": body.get("metadata") or {},
            "store": False, "truncation": body.get("truncation") or "disabled", "user": body.get("user"),
            "prompt_cache_key": body.get("prompt_cache_key"), "safety_identifier": body.get("safety_identifier"),
            "previous_response_id": None, "background": False}
    return request, echo


# -- results ----------------------------------------------------------------------------------------------------

def usage_object(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    prompt_details = usage.extra.get("prompt_tokens_details") or {}
    completion_details = usage.extra.get("completion_tokens_details") or {}
    cached = prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else None
    reasoning = completion_details.get("reasoning_tokens") if isinstance(completion_details, dict) else None
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": cached or 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning or 0},
            "total_tokens": usage.total_tokens or usage.prompt_tokens + usage.completion_tokens}


def _status_of(finish: str | None) -> tuple[str, dict[str, Any] | None]:
    if finish == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def _base(response_id: str, created: int, model: str, echo: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": response_id, "object": "response", "created_at": created, "status": "in_progress",
            "completed_at": None, "error": None, "incomplete_details": None, "model": model, "output": [],
            "usage": None, **echo}


def response_object(result: ChatResponse, echo: Mapping[str, Any], *, response_id: str | None = None
                    ) -> dict[str, Any]:
    response_id = response_id or new_id("resp")
    created = result.created or int(time.time())
    choice = result.choices[0] if result.choices else None
    output: list[dict[str, Any]] = []
    if choice is not None:
        message = choice.message
        reasoning = message.extra.get("reasoning_content") or message.extra.get("reasoning")
        sealed = sealed_thinking(message.extra.get("thinking_blocks"))
        if (isinstance(reasoning, str) and reasoning) or sealed:
            item: dict[str, Any] = {"id": new_id("rs"), "type": "reasoning", "summary": [
                {"type": "summary_text", "text": reasoning}] if isinstance(reasoning, str) and reasoning else []}
            if sealed:
                item["encrypted_content"] = sealed
            output.append(item)
        if message.text:
            output.append({"id": new_id("msg"), "type": "message", "status": "completed", "role": "assistant",
                           "content": [{"type": "output_text", "text": message.text,
                                        "annotations": annotations_of(message.extra.get("annotations")),
                                        "logprobs": logprobs_of(choice.logprobs)}]})
        for call in message.tool_calls or ():
            output.append({"id": new_id("fc"), "type": "function_call", "status": "completed", "call_id": call.id,
                           "name": call.function.name, "arguments": call.function.arguments})
    status, incomplete = _status_of(choice.finish_reason if choice else None)
    return {**_base(response_id, created, result.model, echo), "status": status, "completed_at": int(time.time()),
            "incomplete_details": incomplete, "output": output, "usage": usage_object(result.usage)}


def annotations_of(chat: Any) -> list[Any]:
    """Chat's ``message.annotations`` (located by ``start_index`` / ``end_index``) are the ``output_text``
    annotations; a ``url_citation``, which chat nests under ``url_citation``, is flat here."""
    return [_flat(note) for note in chat if isinstance(note, Mapping)] if isinstance(chat, list) else []


def _flat(note: Mapping[str, Any]) -> Mapping[str, Any]:
    cited = note.get("url_citation")
    return {"type": "url_citation", **cited} if note.get("type") == "url_citation" and isinstance(cited, Mapping) \
        else note


def logprobs_of(chat: Any) -> list[Any]:
    """Chat's ``logprobs.content`` (token, logprob, bytes, top_logprobs) is the Responses ``logprobs`` list."""
    content = chat.get("content") if isinstance(chat, Mapping) else None
    return list(content) if isinstance(content, list) else []


def _sse(payload: dict[str, Any]) -> bytes:
    kind: str = payload["type"]
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class EventStream:
    """Chat chunks in, Responses SSE events out. Items are opened when their first delta arrives and closed when
    another kind of output starts or the stream ends."""

    def __init__(self, model: str, echo: Mapping[str, Any]) -> None:
        self.id = new_id("resp")
        self.created = int(time.time())
        self.model = model
        self.echo = echo
        self.seq = 0
        self.output: list[dict[str, Any] | None] = []   # by output_index; None while the item is open
        self.open: dict[str, Any] | None = None          # the item being streamed
        self.tools: dict[int, dict[str, Any]] = {}       # chat tool index -> its function_call item
        self.usage: Usage | None = None
        self.finish: str | None = None
        self.continuation: Any = None  # scillm-resilience finished the answer with another model: said at the end

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        return _sse(payload)

    def _snapshot(self, status: str) -> dict[str, Any]:
        return {**_base(self.id, self.created, self.model, self.echo), "status": status,
                "output": [item for item in self.output if item is not None]}

    def start(self) -> list[bytes]:
        return [self._event("response.created", response=self._snapshot("in_progress")),
                self._event("response.in_progress", response=self._snapshot("in_progress"))]

    # -- items ----------------------------------------------------------------------------------------------------

    def _open(self, item: dict[str, Any]) -> list[bytes]:
        out = self._close()
        item["output_index"] = len(self.output)
        self.output.append(None)
        self.open = item
        wire = {k: v for k, v in item.items() if not k.startswith("_") and k != "output_index"}
        out.append(self._event("response.output_item.added", output_index=item["output_index"], item=wire))
        if item["type"] == "message":
            out.append(self._event("response.content_part.added", item_id=item["id"],
                                   output_index=item["output_index"], content_index=0,
                                   part={"type": "output_text", "annotations": [], "logprobs": [], "text": ""}))
        elif item["type"] == "reasoning":
            out.append(self._event("response.reasoning_summary_part.added", item_id=item["id"],
                                   output_index=item["output_index"], summary_index=0,
                                   part={"type": "summary_text", "text": ""}))
        return out

    def _close(self) -> list[bytes]:
        item = self.open
        if item is None:
            return []
        self.open = None
        index = item["output_index"]
        out: list[bytes] = []
        if item["type"] == "message":
            text = "".join(item["_text"])
            logprobs = item["_logprobs"]
            part = {"type": "output_text", "annotations": item["_annotations"], "logprobs": logprobs, "text": text}
            out.append(self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                   content_index=0, text=text, logprobs=logprobs))
            out.append(self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                   content_index=0, part=part))
            done = {"id": item["id"], "type": "message", "status": "completed", "role": "assistant",
                    "content": [part]}
        elif item["type"] == "reasoning":
            text = "".join(item["_text"])
            part = {"type": "summary_text", "text": text}
            out.append(self._event("response.reasoning_summary_text.done", item_id=item["id"], output_index=index,
                                   summary_index=0, text=text))
            out.append(self._event("response.reasoning_summary_part.done", item_id=item["id"], output_index=index,
                                   summary_index=0, part=part))
            done = {"id": item["id"], "type": "reasoning", "summary": [part]}
            sealed = sealed_thinking(item.get("_blocks"))
            if sealed:
                done["encrypted_content"] = sealed
        else:
            arguments = "".join(item["_text"])
            out.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                   output_index=index, arguments=arguments))
            done = {"id": item["id"], "type": "function_call", "status": "completed", "call_id": item["call_id"],
                    "name": item["name"], "arguments": arguments}
        self.output[index] = done
        out.append(self._event("response.output_item.done", output_index=index, item=done))
        return out

    def feed(self, chunk: ChatChunk) -> list[bytes]:
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.extra and "scillm_continuation" in chunk.extra:
            self.continuation = chunk.extra["scillm_continuation"]
        if chunk.model:
            self.model = chunk.model
        out: list[bytes] = []
        for choice in chunk.choices[:1]:
            delta = choice.delta
            reasoning = delta.extra.get("reasoning_content") or delta.extra.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                if self.open is None or self.open["type"] != "reasoning":
                    out += self._open({"id": new_id("rs"), "type": "reasoning", "summary": [], "_text": [],
                                       "_blocks": []})
                assert self.open is not None
                self.open["_text"].append(reasoning)
                out.append(self._event("response.reasoning_summary_text.delta", item_id=self.open["id"],
                                       output_index=self.open["output_index"], summary_index=0, delta=reasoning))
            blocks = delta.extra.get("thinking_blocks") if delta.extra else None
            if isinstance(blocks, list) and blocks:  # a thinking block's signature (at its end), a redacted block
                if self.open is None or self.open["type"] != "reasoning":
                    out += self._open({"id": new_id("rs"), "type": "reasoning", "summary": [], "_text": [],
                                       "_blocks": []})
                assert self.open is not None
                self.open.setdefault("_blocks", []).extend(blocks)  # an item adopted from the upstream has none
            if delta.content:
                if self.open is None or self.open["type"] != "message":
                    out += self._open({"id": new_id("msg"), "type": "message", "status": "in_progress",
                                       "role": "assistant", "content": [], "_text": [], "_logprobs": [],
                                       "_annotations": []})
                assert self.open is not None
                self.open["_text"].append(delta.content)
                logprobs = logprobs_of(choice.logprobs)
                self.open["_logprobs"] += logprobs
                out.append(self._event("response.output_text.delta", item_id=self.open["id"],
                                       output_index=self.open["output_index"], content_index=0,
                                       delta=delta.content, logprobs=logprobs))
            notes = annotations_of(delta.extra.get("annotations")) if delta.extra else []
            if notes and self.open is not None and self.open["type"] == "message":  # citations of its text
                for note in notes:
                    self.open["_annotations"].append(note)
                    out.append(self._event("response.output_text.annotation.added", item_id=self.open["id"],
                                           output_index=self.open["output_index"], content_index=0,
                                           annotation_index=len(self.open["_annotations"]) - 1, annotation=note))
            for call in delta.tool_calls or ():
                item = self.tools.get(call.index)
                if item is None:
                    name = (call.function.name if call.function else None) or ""
                    item = {"id": new_id("fc"), "type": "function_call", "status": "in_progress", "arguments": "",
                            "call_id": call.id or new_id("call"), "name": name, "_text": []}
                    self.tools[call.index] = item
                    out += self._open(item)
                arguments = call.function.arguments if call.function else None
                if arguments:
                    item["_text"].append(arguments)
                    out.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                           output_index=item["output_index"], delta=arguments))
            if choice.finish_reason:
                self.finish = choice.finish_reason
        return out

    def follow(self, chunk: ChatChunk) -> None:
        """Take in a chunk whose upstream events went to the client as sent (same dialect), so that chunks
        translated after it (a continuation from another model) go on in the same response, in the item being
        written (its id and output index), and :meth:`complete` carries the whole answer. Only the response's
        creation and its items' starts and ends are parsed; text is taken from the chunk."""
        native = chunk.native
        if native is not None and (b"response.created" in native or b"output_item." in native):
            self._adopt(native)
        else:
            self.seq += 1
        if chunk.usage is not None:
            self.usage = chunk.usage
        item = self.open
        for choice in chunk.choices[:1]:
            delta = choice.delta
            reasoning = delta.extra.get("reasoning_content") or delta.extra.get("reasoning") if delta.extra else None
            if item is not None and item["type"] == "message" and delta.content:
                item["_text"].append(delta.content)
            elif item is not None and item["type"] == "reasoning" and isinstance(reasoning, str):
                item["_text"].append(reasoning)
            if choice.finish_reason:
                self.finish = choice.finish_reason

    def _adopt(self, native: bytes) -> None:
        """Follow the upstream's events as sent. What is not of the shape the API gives it (an ``output_index`` that
        is not the next item's or an earlier one's, a ``sequence_number`` that is not a count) is not followed:
        the bytes went to the client as they came, and an index of 10**15 would have been a list that long."""
        for data in native_events(native):
            if not isinstance(data, dict):
                continue
            kind = data.get("type")
            seq = data.get("sequence_number")
            if type(seq) is int and 0 <= seq < MAX_SEQUENCE:
                self.seq = seq + 1
            if kind == "response.created" and isinstance(data.get("response"), dict):
                response = data["response"]
                self.id = response["id"] if isinstance(response.get("id"), str) and response["id"] else self.id
                created = response.get("created_at")
                self.created = created if type(created) is int and 0 < created < MAX_SEQUENCE else self.created
            elif kind == "response.output_item.added" and isinstance(data.get("item"), dict):
                index = data.get("output_index", len(self.output))
                if type(index) is not int or not 0 <= index <= len(self.output):
                    continue
                self.output.extend([None] * (index + 1 - len(self.output)))
                self.open = {**data["item"], "output_index": index, "_text": [], "_logprobs": [], "_annotations": []}
            elif kind == "response.output_item.done" and isinstance(data.get("item"), dict):
                index = data.get("output_index", len(self.output) - 1)
                if type(index) is not int or not 0 <= index <= len(self.output):
                    continue
                self.output.extend([None] * (index + 1 - len(self.output)))
                self.output[index] = data["item"]
                if self.open is not None and self.open["output_index"] == index:
                    self.open = None

    def complete(self) -> list[bytes]:
        out = self._close()
        status, incomplete = _status_of(self.finish)
        final = {**self._snapshot(status), "completed_at": int(time.time()), "incomplete_details": incomplete,
                 "usage": usage_object(self.usage)}
        if self.continuation is not None:
            final["scillm_continuation"] = self.continuation
        out.append(self._event("response.completed" if status == "completed" else "response.incomplete",
                               response=final))
        return out

    def fail(self, exc: BaseException) -> list[bytes]:
        """A failure after the stream started: ``response.failed`` with the error's code and message."""
        _, body, _ = errors.to_response_parts(exc)
        error = body["error"]
        failed = {**self._snapshot("failed"), "error": {"code": error.get("code") or "server_error",
                                                        "message": error.get("message") or "the response failed"}}
        return [self._event("response.failed", response=failed)]
