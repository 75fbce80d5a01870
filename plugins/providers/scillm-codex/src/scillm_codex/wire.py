"""Chat completions <-> the Codex backend's Responses dialect (provider-protocols.md §7, §8, §9).

Request: system/developer messages become ``instructions`` (a default when there are none); user/assistant
messages become ``message`` items with ``input_text`` / ``input_image`` / ``input_file`` / ``output_text`` parts;
assistant tool calls become ``function_call`` items and tool results ``function_call_output`` items; tools are
flattened; ``store: false`` and ``stream: true`` always; no temperature, top_p or token limits (the backend
rejects them); chat's ``verbosity`` is ``text.verbosity``, which Codex itself sends (not to ``-codex`` models).

Response: :class:`StreamState` turns Responses events into chat chunks: text deltas, function-call argument deltas
as ``tool_calls`` deltas (index = ordinal among the calls), reasoning summaries as ``reasoning_content``,
``response.completed`` usage, and ``response.failed`` / ``error`` events as errors of the error tree.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

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
    with_native,
)
from scillm_core.jsonio import loads
from scillm_core.models.chat import token_count
from scillm_core.upstream import Malformed, PendingBytes, excerpt, iter_sse, translate_transport

if TYPE_CHECKING:
    import httpx

__all__ = ["DEFAULT_INSTRUCTIONS", "StreamState", "chat_response", "conversation_id", "error_from_body",
           "failure_error", "final_response", "response_from_object", "responses_chunks", "to_codex_body", "usage_of"]

DEFAULT_INSTRUCTIONS = "You are a helpful assistant."


def conversation_id(request: ChatRequest) -> str:
    """Stable per conversation (model + first user message), for ``session_id`` / ``prompt_cache_key``."""
    metadata = request.scillm.get("scillm_metadata") or {}
    if isinstance(metadata, dict) and metadata.get("session_id"):
        return str(metadata["session_id"])
    first = next((m.text for m in request.messages if m.role == "user"), "")
    digest = hashlib.sha256(f"{request.model}\0{first}".encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def _cache_key(request: ChatRequest) -> str:
    """The client's own ``prompt_cache_key`` (chat and Responses clients name their cache), else the conversation's."""
    key = request.extra.get("prompt_cache_key")
    return key if isinstance(key, str) and key else conversation_id(request)


def _parts(message: Message, index: int, *, assistant: bool) -> list[dict[str, Any]]:
    content = message.content
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "output_text" if assistant else "input_text", "text": content}] if content else []
    out: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            out.append({"type": "output_text" if assistant else "input_text", "text": part.text})
        elif isinstance(part, ImagePart) and not assistant:
            out.append({"type": "input_image", "image_url": part.image_url.url,
                        "detail": part.image_url.detail or "auto"})
        elif isinstance(part, FilePart) and not assistant:
            item: dict[str, Any] = {"type": "input_file"}
            if part.file.file_data:
                item["file_data"] = part.file.file_data
                item["filename"] = part.file.filename or "file.pdf"
            elif part.file.file_id:
                item["file_id"] = part.file.file_id
            out.append(item)
        elif isinstance(part, OtherPart) and part.type in ("input_text", "input_image", "input_file", "output_text"):
            out.append({"type": part.type, **part.data})
        else:
            where = f"$.messages[{index}].content[{j}]"
            raise errors.InvalidRequest(f"the codex provider cannot send a {part.type!r} part @ {where}",
                                        param=where)
    return out


def _tool_output(message: Message) -> str:
    if isinstance(message.content, str):
        return message.content
    return message.text


def to_codex_body(request: ChatRequest, model: str) -> dict[str, Any]:
    instructions: list[str] = []
    items: list[dict[str, Any]] = []
    for i, message in enumerate(request.messages):
        if message.role in ("system", "developer"):
            if message.text.strip():
                instructions.append(message.text)
        elif message.role == "user":
            items.append({"type": "message", "role": "user", "content": _parts(message, i, assistant=False)})
        elif message.role == "assistant":
            parts = _parts(message, i, assistant=True)
            if parts:
                items.append({"type": "message", "role": "assistant", "content": parts})
            for call in message.tool_calls or ():
                items.append({"type": "function_call", "call_id": call.id, "name": call.function.name,
                              "arguments": call.function.arguments or "{}"})
        elif message.role in ("tool", "function"):
            if not message.tool_call_id:
                where = f"$.messages[{i}].tool_call_id"
                raise errors.InvalidRequest(f"a tool message needs tool_call_id @ {where}", param=where)
            items.append({"type": "function_call_output", "call_id": message.tool_call_id,
                          "output": _tool_output(message)})
    body: dict[str, Any] = {"model": model, "instructions": "\n\n".join(instructions) or DEFAULT_INSTRUCTIONS,
                            "input": items, "store": False, "stream": True,
                            "include": ["reasoning.encrypted_content"],
                            "prompt_cache_key": _cache_key(request)}
    if request.tools:
        body["tools"] = [_flat_tool(t.function) for t in request.tools if t.type == "function"]
        body["tool_choice"] = _tool_choice(request.tool_choice)
        body["parallel_tool_calls"] = True if request.parallel_tool_calls is None else request.parallel_tool_calls
    effort = request.reasoning_effort or _extra_effort(request.extra)
    body["reasoning"] = {"effort": effort or "medium", "summary": "auto"}
    text: dict[str, Any] = {}
    fmt = _text_format(request.response_format)
    if fmt is not None:
        text["format"] = fmt
    verbosity = request.extra.get("verbosity")
    if isinstance(verbosity, str) and "codex" not in model:
        # a hint, as Codex sends it; Codex leaves it out for its -codex models (support_verbosity false, openai/codex
        # PR #6007), which take only "medium" and answer others with a 400 naming text.verbosity
        text["verbosity"] = verbosity
    if text:
        body["text"] = text
    return body


def _flat_tool(function: Any) -> dict[str, Any]:
    tool: dict[str, Any] = {"type": "function", "name": function.name,
                            "parameters": function.parameters or {"type": "object", "properties": {}}}
    if function.description:
        tool["description"] = function.description
    tool["strict"] = bool(function.strict)
    return tool


def _tool_choice(choice: str | Mapping[str, Any] | None) -> Any:
    if choice is None or isinstance(choice, str):
        return choice or "auto"
    function = choice.get("function")
    if isinstance(function, dict) and function.get("name"):
        return {"type": "function", "name": function["name"]}
    return "auto"


def _extra_effort(extra: Mapping[str, Any]) -> str | None:
    reasoning = extra.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        return reasoning["effort"]  # type: ignore[no-any-return]
    return None


def _text_format(response_format: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = response_format.get("json_schema") or {}
        return {"type": "json_schema", "name": schema.get("name") or "response", "schema": schema.get("schema", {}),
                "strict": bool(schema.get("strict"))}
    return None


# -- the response ---------------------------------------------------------------------------------------------------

def usage_of(data: Any) -> Usage | None:
    if not isinstance(data, dict):
        return None
    prompt = token_count(data.get("input_tokens"))
    completion = token_count(data.get("output_tokens"))
    extra: dict[str, Any] = {}
    details, out_details = data.get("input_tokens_details"), data.get("output_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None  # (usage is metadata: odd details
    reasoning = out_details.get("reasoning_tokens") if isinstance(out_details, dict) else None  # are no error)
    if cached is not None:
        extra["prompt_tokens_details"] = {"cached_tokens": token_count(cached)}
    if reasoning is not None:
        extra["completion_tokens_details"] = {"reasoning_tokens": token_count(reasoning)}
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=token_count(data.get("total_tokens")) or prompt + completion, extra=extra)


_TRY_AGAIN = re.compile(r"try again in ([0-9.]+)\s*(ms|s)", re.IGNORECASE)


def failure_error(error: Any, *, provider: str, model: str, secrets: tuple[str | None, ...] = ()
                  ) -> errors.UpstreamError:
    """``response.failed`` ``response.error`` (or an ``error`` event) -> the error tree."""
    from scillm_core.redact import redact

    if not isinstance(error, dict):
        error = {}
    code = str(error.get("code") or error.get("type") or "")
    message = redact(str(error.get("message") or code or "the response failed"), secrets)
    common: dict[str, Any] = {"provider": provider, "model": model}
    if code in ("rate_limit_exceeded", "rate_limit_error"):
        match = _TRY_AGAIN.search(message)
        delay = None
        if match:
            delay = float(match.group(1)) / (1000.0 if match.group(2).lower() == "ms" else 1.0)
        return errors.UpstreamRateLimited(message, retry_after_s=delay, upstream_status=429, **common)
    if code in ("insufficient_quota", "usage_not_included", "usage_limit_reached"):
        return errors.UpstreamQuotaExceeded(message, code="insufficient_quota", upstream_status=429, **common)
    if code == "context_length_exceeded":
        return errors.ContextLengthExceeded(message, upstream_status=400, **common)
    if code in ("invalid_prompt", "invalid_request_error"):
        return errors.UpstreamBadRequest(message, code=code, upstream_status=400, **common)
    if code in ("server_is_overloaded", "slow_down"):
        return errors.UpstreamUnavailable(message, code="overloaded", **common)
    return errors.UpstreamUnavailable(f"{message} ({code})" if code and code not in message else message, **common)


def error_from_body(status: int, raw: bytes, headers: Mapping[str, str], *, provider: str, model: str,
                    secrets: tuple[str | None, ...] = ()) -> errors.UpstreamError:
    """An HTTP error answer of the backend: ``{"detail": ...}``, ``{"error": {...}}`` (usage limits with
    ``resets_at``), or text."""
    from scillm_core.redact import redact
    from scillm_core.upstream import error_for_status

    try:
        data = loads(raw)
    except orjson.JSONDecodeError:
        data = excerpt(raw.decode("utf-8", "replace"))
    message, code, kind = f"HTTP {status}", None, None
    error: Any = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(data.get("detail"), str | list | dict):
            detail = data["detail"]
            message = detail if isinstance(detail, str) else orjson.dumps(detail).decode()
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            code = error.get("code")
            kind = error.get("type")
        elif isinstance(error, str):
            message = error
    elif isinstance(data, str) and data.strip():
        message = data.strip()
    limit = kind if kind in ("usage_limit_reached", "usage_not_included", "rate_limit_exceeded") else code
    if limit in ("usage_limit_reached", "usage_not_included") and status in (404, 429):
        assert isinstance(error, dict)
        resets = _resets_in(error)
        plan = error.get("plan_type")
        text = redact(f"ChatGPT {plan + ' ' if plan else ''}plan usage limit reached ({message})", secrets)
        if resets is not None:
            text += f"; resets in {int(resets)}s"
        return errors.UpstreamQuotaExceeded(text, provider=provider, model=model, upstream_status=429,
                                            retry_after_s=resets, code="insufficient_quota")
    if status == 404 and limit == "rate_limit_exceeded":
        status = 429
    return error_for_status(status, message, provider=provider, model=model,
                            code=None if code is None else str(code), kind=kind, headers=headers, secrets=secrets)


def _resets_in(error: Mapping[str, Any]) -> float | None:
    seconds = error.get("resets_in_seconds")
    if isinstance(seconds, int | float) and not isinstance(seconds, bool):
        return max(float(seconds), 1.0)
    at = error.get("resets_at")
    if isinstance(at, int | float) and not isinstance(at, bool):
        return max(float(at) - time.time(), 1.0)
    return None


class StreamState:
    """Turns Responses/Codex stream events into chat chunks; also accumulates what a non-streaming reply needs."""

    def __init__(self, *, provider: str, model: str, include_usage: bool,
                 secrets: tuple[str | None, ...] = ()) -> None:
        self.provider = provider
        self.model = model
        self.include_usage = include_usage
        self.secrets = secrets
        self.id = "chatcmpl-codex"
        self.created = int(time.time())
        self.served_model = model
        self.started = False
        self.finished = False
        self.tool_index: dict[str, int] = {}     # item id / output index key -> tool ordinal
        self.tool_args: dict[int, str] = {}      # ordinal -> arguments sent so far
        self.tool_calls: dict[int, dict[str, str]] = {}
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.response: dict[str, Any] = {}      # the final Response object (response.completed / .incomplete)
        self.items: list[dict[str, Any]] = []   # the output items, as response.output_item.done gave them
        self._text_seen: set[str] = set()

    def _chunk(self, delta: Delta | None = None, *, finish: str | None = None, usage: Usage | None = None,
               choices: bool = True) -> ChatChunk:
        chosen = (ChunkChoice(delta=delta or Delta(), finish_reason=finish),) if choices else ()
        return ChatChunk(id=self.id, model=self.served_model, created=self.created, choices=chosen, usage=usage)

    def empty_chunk(self) -> ChatChunk:
        return self._chunk(choices=False)

    def _emit(self, delta: Delta) -> list[ChatChunk]:
        out: list[ChatChunk] = []
        if not self.started:
            self.started = True
            out.append(self._chunk(Delta(role="assistant", content="")))
        out.append(self._chunk(delta))
        return out

    def _key(self, event: Mapping[str, Any]) -> str:
        item_id = event.get("item_id")
        if isinstance(item_id, str) and item_id:
            return item_id
        return f"#{event.get('output_index', 0)}"

    def _tool_ordinal(self, key: str) -> tuple[int, bool]:
        if key in self.tool_index:
            return self.tool_index[key], False
        ordinal = len(self.tool_calls)
        self.tool_index[key] = ordinal
        self.tool_calls[ordinal] = {"id": "", "name": "", "arguments": ""}
        self.tool_args[ordinal] = ""
        return ordinal, True

    def _tool_start(self, item: Mapping[str, Any], key: str) -> list[ChatChunk]:
        ordinal, new = self._tool_ordinal(key)
        call = self.tool_calls[ordinal]
        call["id"] = str(item.get("call_id") or item.get("id") or f"call_{ordinal}")
        call["name"] = str(item.get("name") or "")
        if not new:
            return []
        return self._emit(Delta(tool_calls=(ToolCallDelta(index=ordinal, id=call["id"], type="function",
                                                          function=FunctionCallDelta(name=call["name"],
                                                                                     arguments="")),)))

    def _tool_args(self, ordinal: int, piece: str) -> list[ChatChunk]:
        if not piece:
            return []
        self.tool_args[ordinal] += piece
        self.tool_calls[ordinal]["arguments"] = self.tool_args[ordinal]
        return self._emit(Delta(tool_calls=(ToolCallDelta(index=ordinal, function=FunctionCallDelta(
            arguments=piece)),)))

    def feed(self, event: Mapping[str, Any]) -> list[ChatChunk]:
        """Chunks for one event; raises for ``response.failed`` and ``error``."""
        kind = event.get("type")
        if kind == "response.created":
            response = event.get("response") or {}
            if isinstance(response, dict):
                if response.get("id"):
                    self.id = f"chatcmpl-{response['id']}"
                if response.get("model"):
                    self.served_model = str(response["model"])
            return []
        if kind == "response.output_text.delta":
            self._text_seen.add(self._key(event))
            piece = str(event.get("delta") or "")
            self.text.append(piece)
            return self._emit(Delta(content=piece)) if piece else []
        if kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            piece = str(event.get("delta") or "")
            self.reasoning.append(piece)
            return self._emit(Delta(extra={"reasoning_content": piece})) if piece else []
        if kind == "response.reasoning_summary_part.added" and event.get("summary_index", 0) and self.reasoning:
            self.reasoning.append("\n\n")
            return self._emit(Delta(extra={"reasoning_content": "\n\n"}))
        if kind == "response.output_item.added":
            item = event.get("item") or {}
            if isinstance(item, dict) and item.get("type") == "function_call":
                return self._tool_start(item, str(item.get("id") or item.get("call_id") or self._key(event)))
            return []
        if kind == "response.function_call_arguments.delta":
            ordinal, _ = self._tool_ordinal(self._key(event))
            return self._tool_args(ordinal, str(event.get("delta") or ""))
        if kind == "response.output_item.done":
            return self._item_done(event)
        if kind in ("response.completed", "response.done", "response.incomplete"):
            return self._complete(event)
        if kind == "response.failed":
            response = event.get("response") or {}
            raise failure_error(response.get("error") if isinstance(response, dict) else None,
                                provider=self.provider, model=self.model, secrets=self.secrets)
        if kind == "error":
            raise failure_error(event.get("error") if isinstance(event.get("error"), dict) else event,
                                provider=self.provider, model=self.model, secrets=self.secrets)
        return []

    def _item_done(self, event: Mapping[str, Any]) -> list[ChatChunk]:
        item = event.get("item") or {}
        if not isinstance(item, dict):
            return []
        self.items.append(item)
        out: list[ChatChunk] = []
        if item.get("type") == "function_call":
            key = str(item.get("id") or item.get("call_id") or self._key(event))
            if key not in self.tool_index and f"#{event.get('output_index', 0)}" in self.tool_index:
                key = f"#{event.get('output_index', 0)}"
            out += self._tool_start(item, key)
            ordinal = self.tool_index[key]
            arguments = str(item.get("arguments") or "")
            sent = self.tool_args[ordinal]
            if arguments.startswith(sent):
                out += self._tool_args(ordinal, arguments[len(sent):])
        elif item.get("type") == "message" and item.get("id") not in self._text_seen \
                and f"#{event.get('output_index', 0)}" not in self._text_seen:
            text = "".join(p.get("text", "") for p in item.get("content") or ()
                           if isinstance(p, dict) and p.get("type") == "output_text")
            if text:  # a message that came whole, without deltas
                self.text.append(text)
                out += self._emit(Delta(content=text))
        return out

    def _complete(self, event: Mapping[str, Any]) -> list[ChatChunk]:
        response = event.get("response") or {}
        if not isinstance(response, dict):
            response = {}
        usage = usage_of(response.get("usage"))  # (read before the stream is marked finished: see the end)
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        if event.get("type") == "response.incomplete" or response.get("status") == "incomplete":
            self.finish_reason = "content_filter" if reason == "content_filter" else "length"
        elif self.tool_calls:
            self.finish_reason = "tool_calls"
        else:
            self.finish_reason = "stop"
        # only now, with nothing left that a wrong-shaped event can fail on: a terminal event skipped half-read must
        # not leave the stream looking finished (it would end without its end, and without an error)
        self.finished, self.response, self.usage = True, response, usage
        if response.get("model"):
            self.served_model = str(response["model"])
        out: list[ChatChunk] = []
        if not self.started:
            self.started = True
            out.append(self._chunk(Delta(role="assistant", content="")))
        out.append(self._chunk(finish=self.finish_reason))
        if self.include_usage and self.usage is not None:
            out.append(self._chunk(usage=self.usage, choices=False))
        return out


# -- reading a Responses answer (the Codex backend and the OpenAI Responses API speak the same events) ----------------

async def responses_chunks(response: httpx.Response, state: StreamState, malformed: Malformed, *,
                           native: bool = False) -> AsyncIterator[ChatChunk]:
    """Chat chunks of a Responses event stream; ``native``: with the events' own bytes on them, in order (see
    :class:`scillm_core.upstream.PendingBytes`). An event that cannot be parsed is skipped, its bytes too
    (``malformed``). Raises when it ends before ``response.completed``."""
    provider, model = state.provider, state.model
    carried = PendingBytes()
    try:
        with translate_transport(provider, model):
            async for event in iter_sse(response.aiter_bytes(), raw=native):
                if event.data.strip() == "[DONE]":
                    break
                try:
                    data = loads(event.data)
                except orjson.JSONDecodeError:
                    malformed.skip("malformed JSON", event.data)
                    continue
                chunks = malformed.read(event.data, state.feed, data) if isinstance(data, dict) else []
                if chunks is None:
                    continue  # skipped, its bytes too
                for chunk in carried.carry(event.raw, chunks) if native else chunks:
                    yield chunk
                if state.finished:
                    break
        if carried.pending:
            yield with_native(state.empty_chunk(), carried.rest())
    finally:
        await response.aclose()
    if not state.finished:
        raise errors.UpstreamProtocolError("stream closed before response.completed", provider=provider, model=model)


def final_response(state: StreamState) -> dict[str, Any]:
    """The Response object a non-streaming client gets: the terminal event's, completed from the stream where it
    came without its output (Codex's own mock server sends only ``id`` and ``usage``; clients of the backend must
    aggregate its events): the ``response.output_item.done`` items, and an id, object, model and status."""
    response = dict(state.response)
    output = response.get("output")
    if not isinstance(output, list) or (not output and state.items):
        response["output"] = list(state.items)
    response.setdefault("id", state.id.removeprefix("chatcmpl-"))
    response.setdefault("object", "response")
    response.setdefault("model", state.served_model)
    response.setdefault("status", "incomplete" if state.finish_reason in ("length", "content_filter") else "completed")
    return response


def chat_response(state: StreamState) -> ChatResponse:
    """The chat completion a finished :class:`StreamState` collected."""
    calls = tuple(ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=c["arguments"] or "{}"))
                  for _, c in sorted(state.tool_calls.items()))
    extra = {"reasoning_content": "".join(state.reasoning)} if state.reasoning else {}
    message = Message(role="assistant", content="".join(state.text) or None, tool_calls=calls or None, extra=extra)
    return ChatResponse(id=state.id, model=state.served_model, created=state.created,
                        choices=(Choice(message=message, finish_reason=state.finish_reason),),
                        usage=state.usage or Usage())


def response_from_object(data: Any, *, provider: str, model: str) -> ChatResponse:
    """A Response object (a non-streaming Responses answer) as a chat completion: its output items go through
    :class:`StreamState` as the stream would have delivered them. Raises ``ValueError`` on a body that is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("output"), list):
        raise ValueError("not a Response object")
    state = StreamState(provider=provider, model=model, include_usage=False)
    state.feed({"type": "response.created", "response": data})
    for index, item in enumerate(data["output"]):
        state.feed({"type": "response.output_item.done", "item": item, "output_index": index})
    if data.get("status") == "failed":
        state.feed({"type": "response.failed", "response": data})
    state.feed({"type": "response.incomplete" if data.get("status") == "incomplete" else "response.completed",
                "response": data})
    return chat_response(state)
