"""OpenAI chat <-> Gemini ``generateContent`` translation (pure functions; the provider does the I/O).

thoughtSignature round trip: Gemini puts an opaque ``thoughtSignature`` on a ``functionCall`` part and wants it back
verbatim when that call is replayed in history (Gemini 3 rejects the turn otherwise). OpenAI clients only reliably
echo a tool call's ``id``, so the signature travels *inside the id*: ``call_<8 hex>_<signature as unpadded
base64url>``. :func:`decode_call_id` reverses it; ids without the encoding (calls made elsewhere, or unsigned
parallel calls) are sent without a signature, or with Google's documented ``skip_thought_signature_validator``
placeholder for Gemini 3 models, so a conversation that started on another provider still continues.

Google Search grounding: the ``groundingMetadata`` of an answer searched with the ``googleSearch`` tool comes back as
OpenAI's ``url_citation`` annotations on the message (:func:`grounding_annotations`), as an Anthropic web search's
citations do; streamed, as one ``delta.annotations`` chunk before the finish.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
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

__all__ = ["SKIP_SIGNATURE", "StreamState", "build_body", "decode_call_id", "encode_call_id", "finish_reason",
           "grounding_annotations", "parse_data_url", "parse_response", "usage_from"]

SKIP_SIGNATURE = "skip_thought_signature_validator"
_CALL_ID = re.compile(r"^call_[0-9a-f]{8}_([A-Za-z0-9_-]+)$")
_CONTENT_FILTER = frozenset({"SAFETY", "RECITATION", "LANGUAGE", "OTHER", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
                             "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "IMAGE_OTHER", "NO_IMAGE"})
_LEVELS = {"none": "MINIMAL", "minimal": "MINIMAL", "low": "LOW", "medium": "MEDIUM", "high": "HIGH",
           "xhigh": "HIGH", "max": "HIGH"}
_BUDGETS = {"none": 0, "minimal": 512, "low": 1024, "medium": 8192, "high": 24576, "xhigh": 32768, "max": 32768}
_FILE_URI = re.compile(r"^(gs://|https://generativelanguage\.googleapis\.com/|https://(www\.)?youtube\.com/|"
                       r"https://youtu\.be/)")

#: ``fetch(url, where) -> (mime_type, base64 data)`` for http(s) image URLs (the provider supplies it).
Fetch = Callable[[str, str], Awaitable[tuple[str, str]]]


# -- tool-call ids ---------------------------------------------------------------------------------------------------

def encode_call_id(signature: str | None) -> str:
    stem = "call_" + secrets.token_hex(4)
    if not signature:
        return stem
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if not raw or raw[:1] == b"\0" or base64.b64encode(raw).decode() != signature:
        raw = b"\0" + signature.encode()  # not canonical base64: carried verbatim behind a marker byte
    return stem + "_" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_call_id(call_id: str | None) -> str | None:
    """The thoughtSignature carried by an id from :func:`encode_call_id`, else ``None``."""
    match = _CALL_ID.match(call_id or "")
    if not match:
        return None
    encoded = match.group(1)
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        return None
    if raw[:1] == b"\0":
        return raw[1:].decode("utf-8", "replace")
    return base64.b64encode(raw).decode()


# -- request ---------------------------------------------------------------------------------------------------------

def parse_data_url(url: str, where: str) -> tuple[str, str]:
    """``data:<mime>;base64,<data>`` -> (mime, data); 400 naming ``where`` otherwise."""
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise errors.InvalidRequest(f"expected a base64 data URL (data:<mime>;base64,...) @ {where}", param=where)
    mime = head[5:-7] or "application/octet-stream"
    if not data:
        raise errors.InvalidRequest(f"empty data URL @ {where}", param=where)
    return mime, data


def _is_gemini3(model: str) -> bool:
    return model.removeprefix("models/").startswith("gemini-3")


async def _parts(message: Message, index: int, fetch: Fetch) -> list[dict[str, Any]]:
    content = message.content
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        where = f"$.messages[{index}].content[{j}]"
        if isinstance(part, TextPart):
            parts.append({"text": part.text})
        elif isinstance(part, ImagePart):
            url = part.image_url.url
            if url.startswith("data:"):
                mime, data = parse_data_url(url, where + ".image_url.url")
                parts.append({"inlineData": {"mimeType": mime, "data": data}})
            elif _FILE_URI.match(url):
                parts.append({"fileData": {"fileUri": url}})
            elif url.startswith(("http://", "https://")):
                mime, data = await fetch(url, where + ".image_url.url")
                parts.append({"inlineData": {"mimeType": mime, "data": data}})
            else:
                raise errors.InvalidRequest(f"image_url must be a data URL or an http(s) URL @ {where}.image_url.url",
                                            param=where + ".image_url.url")
        elif isinstance(part, FilePart):
            if not part.file.file_data:
                raise errors.InvalidRequest(f"gemini needs the file inline: send file.file_data as a data URL "
                                            f"(file_id is not supported) @ {where}.file", param=where + ".file")
            mime, data = parse_data_url(part.file.file_data, where + ".file.file_data")
            parts.append({"inlineData": {"mimeType": mime, "data": data}})
        elif isinstance(part, OtherPart) and part.type == "input_audio":
            audio = part.data.get("input_audio") or {}
            if not isinstance(audio, Mapping) or not audio.get("data"):
                raise errors.InvalidRequest(f"input_audio needs data and format @ {where}", param=where)
            parts.append({"inlineData": {"mimeType": f"audio/{audio.get('format') or 'wav'}", "data": audio["data"]}})
        else:
            kind = part.type if isinstance(part, OtherPart) else type(part).__name__
            raise errors.InvalidRequest(f"gemini does not take {kind!r} content parts @ {where}", param=where)
    return parts


def _arguments(raw: str, where: str) -> Any:
    if not raw.strip():
        return {}
    try:
        value = loads(raw)
    except orjson.JSONDecodeError:
        raise errors.InvalidRequest(f"tool call arguments are not valid JSON @ {where}", param=where) from None
    if not isinstance(value, dict):
        raise errors.InvalidRequest(f"tool call arguments must be a JSON object @ {where}", param=where)
    return value


def _tool_response(text: str) -> dict[str, Any]:
    try:
        value = loads(text)
    except orjson.JSONDecodeError:
        return {"result": text}
    return value if isinstance(value, dict) else {"result": value}


async def _contents(request: ChatRequest, model: str, fetch: Fetch) -> tuple[list[dict[str, Any]], list[str]]:
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_call id -> function name, from earlier assistant turns
    for i, message in enumerate(request.messages):
        if message.role in ("system", "developer"):
            if message.text:
                system.append(message.text)
            continue
        if message.role == "assistant":
            parts = []
            if message.text:
                parts.append({"text": message.text})
            for k, call in enumerate(message.tool_calls or ()):
                names[call.id] = call.function.name
                part: dict[str, Any] = {"functionCall": {
                    "name": call.function.name,
                    "args": _arguments(call.function.arguments, f"$.messages[{i}].tool_calls[{k}].function.arguments")}}
                signature = decode_call_id(call.id)
                if signature is None and k == 0 and _is_gemini3(model):
                    signature = SKIP_SIGNATURE
                if signature:
                    part["thoughtSignature"] = signature
                parts.append(part)
            if parts:
                contents.append({"role": "model", "parts": parts})
            continue
        if message.role in ("tool", "function"):
            name = names.get(message.tool_call_id or "") or message.name
            if not name:
                where = f"$.messages[{i}].tool_call_id"
                raise errors.InvalidRequest(f"tool result {message.tool_call_id!r} matches no earlier assistant tool "
                                            f"call (gemini needs the function name) @ {where}", param=where)
            response = {"functionResponse": {"name": name, "response": _tool_response(message.text)}}
            if contents and contents[-1]["role"] == "user" and contents[-1].get("_tool"):
                contents[-1]["parts"].append(response)
            else:
                contents.append({"role": "user", "parts": [response], "_tool": True})
            continue
        parts = await _parts(message, i, fetch)
        if parts:
            contents.append({"role": "user", "parts": parts})
    for content in contents:
        content.pop("_tool", None)
    return contents, system


def _generation_config(request: ChatRequest, model: str) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if request.max_output_tokens is not None:
        config["maxOutputTokens"] = request.max_output_tokens
    if request.temperature is not None:
        config["temperature"] = request.temperature
    if request.top_p is not None:
        config["topP"] = request.top_p
    if request.stop_sequences:
        config["stopSequences"] = list(request.stop_sequences)
    if request.seed is not None:
        config["seed"] = request.seed
    if request.n is not None and request.n != 1:
        config["candidateCount"] = request.n
    for wire, key in (("presence_penalty", "presencePenalty"), ("frequency_penalty", "frequencyPenalty"),
                      ("top_k", "topK")):
        if isinstance(request.extra.get(wire), int | float) and not isinstance(request.extra.get(wire), bool):
            config[key] = request.extra[wire]
    fmt = request.response_format or {}
    kind = fmt.get("type")
    if kind == "json_object":
        config["responseMimeType"] = "application/json"
    elif kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            raise errors.InvalidRequest("response_format json_schema needs json_schema.schema (an object) @ "
                                        "$.response_format.json_schema.schema",
                                        param="$.response_format.json_schema.schema")
        config["responseMimeType"] = "application/json"
        config["responseJsonSchema"] = dict(spec["schema"])
    elif kind not in (None, "text"):
        raise errors.InvalidRequest(f"unsupported response_format type {kind!r} @ $.response_format.type",
                                    param="$.response_format.type")
    effort = request.reasoning_effort
    if effort is not None:
        if effort not in _BUDGETS:
            raise errors.InvalidRequest(f"reasoning_effort must be one of {', '.join(_BUDGETS)}, not {effort!r} "
                                        "@ $.reasoning_effort", param="$.reasoning_effort")
        if _is_gemini3(model):
            thinking: dict[str, Any] = {"thinkingLevel": _LEVELS[effort]}
        else:
            budget = _BUDGETS[effort]
            if "pro" in model and budget < 128:
                budget = 128  # 2.5 Pro cannot turn thinking off
            thinking = {"thinkingBudget": budget}
        if effort != "none":
            thinking["includeThoughts"] = True
        config["thinkingConfig"] = thinking
    return config


def _tool_config(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        mode = {"auto": "AUTO", "none": "NONE", "required": "ANY"}.get(choice)
        if mode is None:
            raise errors.InvalidRequest(f"tool_choice must be auto, none, required or a function, not {choice!r} "
                                        "@ $.tool_choice", param="$.tool_choice")
        return {"functionCallingConfig": {"mode": mode}}
    name = (choice.get("function") or {}).get("name") if isinstance(choice, Mapping) else None
    if not name:
        raise errors.InvalidRequest("tool_choice object needs function.name @ $.tool_choice.function.name",
                                    param="$.tool_choice.function.name")
    return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}


async def build_body(request: ChatRequest, model: str, fetch: Fetch) -> dict[str, Any]:
    """The ``generateContent`` body for ``request`` (the same body serves streaming)."""
    contents, system = await _contents(request, model, fetch)
    if not contents:
        raise errors.InvalidRequest("gemini needs at least one user or assistant message @ $.messages",
                                    param="$.messages")
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": [{"text": text} for text in system]}
    if request.tools:
        declarations = []
        for tool in request.tools:
            fn = tool.function
            declaration: dict[str, Any] = {"name": fn.name}
            if fn.description:
                declaration["description"] = fn.description
            if fn.parameters:
                # plain JSON Schema, no OpenAPI-subset conversion or key stripping needed
                declaration["parametersJsonSchema"] = dict(fn.parameters)
            declarations.append(declaration)
        body["tools"] = [{"functionDeclarations": declarations}]
        tool_config = _tool_config(request.tool_choice)
        if tool_config:
            body["toolConfig"] = tool_config
    if request.extra.get("web_search_options") is not None:
        body["tools"] = [*body.get("tools", ()), _google_search(request, model)]
    config = _generation_config(request, model)
    if config:
        body["generationConfig"] = config
    return body


def _google_search(request: ChatRequest, model: str) -> dict[str, Any]:
    """Chat's ``web_search_options`` (a Responses web search tool's) as Gemini's Google Search tool, which takes no
    options: ``search_context_size`` and ``user_location`` are hints it goes without; ``filters.allowed_domains``
    restricts the sources, which it cannot, so it is a 400 (fallbacks are tried) naming the client's own field."""
    options = request.extra["web_search_options"]
    filters = options.get("filters") if isinstance(options, Mapping) else None
    if isinstance(filters, Mapping) and filters.get("allowed_domains"):
        where = "$.web_search_options.filters.allowed_domains"  # a Responses surface names its web search tool's
        raise errors.UnsupportedParameter(
            f"a web search of some domains only (allowed_domains) cannot be delivered by provider 'gemini' for "
            f"model {model!r} (its Google Search takes no filters); remove it or route to a model that has it "
            f"@ {where}", param=where,
            details={"error_code": "unsupported_parameter", "provider": "gemini", "model": model})
    return {"googleSearch": {}}


# -- response --------------------------------------------------------------------------------------------------------

def finish_reason(reason: str | None, saw_call: bool) -> str | None:
    if reason is None:
        return None
    if reason == "MAX_TOKENS":
        return "length"
    if reason in _CONTENT_FILTER:
        return "content_filter"
    return "tool_calls" if saw_call else "stop"


def _index(candidate: Mapping[str, Any], position: int) -> int:
    """A candidate's ``index`` (Gemini leaves it out when 0), or its place when it is none a client can use."""
    index = candidate.get("index", position)
    return index if type(index) is int and 0 <= index < 128 else position


def usage_from(meta: Mapping[str, Any] | None) -> Usage | None:
    if not meta:
        return None
    prompt = token_count(meta.get("promptTokenCount"))
    thoughts = token_count(meta.get("thoughtsTokenCount"))
    completion = token_count(meta.get("candidatesTokenCount")) + thoughts
    total = token_count(meta.get("totalTokenCount")) or prompt + completion
    cached = token_count(meta.get("cachedContentTokenCount"))
    extra: dict[str, Any] = {"completion_tokens_details": {"reasoning_tokens": thoughts},
                             "prompt_tokens_details": {"cached_tokens": cached}}
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total, extra=extra)


def _response_id(data: Mapping[str, Any]) -> str:
    return "chatcmpl-" + str(data.get("responseId") or secrets.token_hex(12))


def grounding_annotations(metadata: Any, parts: list[str | None]) -> list[dict[str, Any]]:
    """A candidate's ``groundingMetadata`` as OpenAI ``url_citation`` annotations of its message content, which is
    the concatenation of ``parts`` (the candidate's parts in order: a part's answer text, ``None`` for a thought, a
    function call or anything else, which is not in the content).

    Each ``groundingSupports[]`` entry cites its ``segment`` with the ``groundingChunks[]`` its
    ``groundingChunkIndices`` name; a chunk's ``web.uri`` / ``web.title`` are the citation's ``url`` / ``title``.
    Google documents a segment as ``partIndex`` (the part within its Content) and ``startIndex`` / ``endIndex``
    measured in bytes from the start of that part, end exclusive: "Start index in the given Part, measured in bytes"
    (google-genai ``Segment``, googleapis.github.io/js-genai/interfaces/types.Segment.html), "measured in UTF-8
    bytes" (firebase.google.com/docs/reference/js/ai.segment.md). OpenAI's ``start_index`` / ``end_index`` are
    character offsets into the whole content, so the bytes are decoded and the part's place in the content added.
    Fields at their default (0) are left out of proto3 JSON: no ``partIndex`` / ``startIndex`` is 0. A support
    whose segment is malformed, out of its part, not on character boundaries or in a part that is no answer text,
    or that names no web chunk, gives nothing; anything else in the metadata is not read."""
    if not isinstance(metadata, Mapping):
        return []
    chunks, supports = metadata.get("groundingChunks"), metadata.get("groundingSupports")
    if not isinstance(chunks, list) or not isinstance(supports, list):
        return []
    starts: list[int] = []  # where each part's text starts in the content, in characters
    at = 0
    for text in parts:
        starts.append(at)
        at += len(text or "")
    encoded: dict[int, bytes] = {}
    notes: list[dict[str, Any]] = []
    seen: set[tuple[str, int, int]] = set()
    for support in supports:
        segment = support.get("segment") if isinstance(support, Mapping) else None
        span = _segment_span(segment, parts, starts, encoded) if isinstance(segment, Mapping) else None
        indices = support.get("groundingChunkIndices") if span is not None else None
        for i in indices if isinstance(indices, list) else ():
            chunk = chunks[i] if type(i) is int and 0 <= i < len(chunks) else None
            web = chunk.get("web") if isinstance(chunk, Mapping) else None
            url = web.get("uri") if isinstance(web, Mapping) else None
            if not isinstance(url, str) or not url or span is None or (url, *span) in seen:
                continue  # not a web source (retrievedContext, maps), or this page cites this span already
            seen.add((url, *span))
            title = web.get("title") if isinstance(web, Mapping) else None
            notes.append({"type": "url_citation", "url_citation": {
                "url": url, "title": title if isinstance(title, str) else "", "start_index": span[0],
                "end_index": span[1]}})
    return notes


def _segment_span(segment: Mapping[str, Any], parts: list[str | None], starts: list[int],
                  encoded: dict[int, bytes]) -> tuple[int, int] | None:
    """``[start, end)`` in characters of the content for a segment's byte offsets in its part, or ``None``."""
    part, start, end = segment.get("partIndex", 0), segment.get("startIndex", 0), segment.get("endIndex")
    if type(part) is not int or type(start) is not int or type(end) is not int or not 0 <= part < len(parts):
        return None
    text = parts[part]
    if text is None:
        return None
    data = encoded.get(part)
    if data is None:
        data = encoded[part] = text.encode()
    if not 0 <= start < end <= len(data):
        return None
    try:
        first = starts[part] + len(data[:start].decode())
        return first, first + len(data[start:end].decode())
    except UnicodeDecodeError:  # an offset inside a character's bytes
        return None


def parse_response(data: Any, model: str) -> ChatResponse:
    if not isinstance(data, Mapping):
        raise TypeError("response is not a JSON object")
    choices = []
    candidates = data.get("candidates") or []
    for position, candidate in enumerate(candidates):
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[ToolCall] = []
        parts: list[str | None] = []  # each part's answer text, for the grounding segments
        for part in (candidate.get("content") or {}).get("parts") or []:
            answer = None
            if "functionCall" in part:
                call = part["functionCall"]
                calls.append(ToolCall(id=encode_call_id(part.get("thoughtSignature")), function=FunctionCall(
                    name=call.get("name", ""), arguments=orjson.dumps(call.get("args") or {}).decode())))
            elif "text" in part:
                (thoughts if part.get("thought") else texts).append(part["text"])
                answer = None if part.get("thought") else str(part["text"])
            parts.append(answer)
        extra: dict[str, Any] = {"reasoning_content": "".join(thoughts)} if thoughts else {}
        notes = grounding_annotations(candidate.get("groundingMetadata"), parts)
        if notes:
            extra["annotations"] = notes
        message = Message(role="assistant", content="".join(texts) if texts or not calls else None,
                          tool_calls=tuple(calls) or None, extra=extra)
        choices.append(Choice(index=_index(candidate, position), message=message,
                              finish_reason=finish_reason(candidate.get("finishReason") or "STOP", bool(calls))))
    if not choices:
        blocked = (data.get("promptFeedback") or {}).get("blockReason")
        choices.append(Choice(message=Message(role="assistant", content=""),
                              finish_reason="content_filter" if blocked else "stop",
                              extra={"block_reason": blocked} if blocked else {}))
    return ChatResponse(id=_response_id(data), model=str(data.get("modelVersion") or model), created=int(time.time()),
                        choices=tuple(choices), usage=usage_from(data.get("usageMetadata")))


class StreamState:
    """Turns Gemini stream events (each a whole ``GenerateContentResponse`` holding only new parts) into chunks.

    A candidate's ``groundingMetadata`` comes on a late event (with the finish, or before it), its segments located
    in the whole answer: in the parts as the SDKs put a stream together (consecutive text parts, answer or thought,
    one part; each function call a part of its own). Its citations go out as one ``annotations`` chunk just before
    the candidate's finish chunk; metadata arriving after the finish is not read."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id: str | None = None
        self.created = int(time.time())
        self.started: set[int] = set()
        self.calls: dict[int, int] = {}
        self.finished: set[int] = set()
        self.usage: Usage | None = None
        self.blocked: str | None = None
        self.parts: dict[int, list[tuple[str, list[str]]]] = {}  # candidate -> its parts so far: (kind, texts)
        self.grounding: dict[int, dict[str, Any]] = {}  # candidate -> groundingChunks / groundingSupports so far

    def _chunk(self, index: int, delta: Delta, finish: str | None = None) -> ChatChunk:
        return ChatChunk(id=self.id or "chatcmpl-gemini", model=self.model, created=self.created,
                         choices=(ChunkChoice(index=index, delta=delta, finish_reason=finish),))

    def feed(self, data: Mapping[str, Any]) -> list[ChatChunk]:
        if self.id is None:
            self.id = _response_id(data)
        self.model = str(data.get("modelVersion") or self.model)
        if data.get("usageMetadata"):
            self.usage = usage_from(data["usageMetadata"])
        out: list[ChatChunk] = []
        candidates = data.get("candidates") or []
        if not candidates and (data.get("promptFeedback") or {}).get("blockReason"):
            self.blocked = data["promptFeedback"]["blockReason"]
            out.append(self._chunk(0, Delta(role="assistant", content="")))
            out.append(self._chunk(0, Delta(), "content_filter"))
            self.finished.add(0)
        for position, candidate in enumerate(candidates):
            index = _index(candidate, position)
            if index not in self.started:
                self.started.add(index)
                out.append(self._chunk(index, Delta(role="assistant", content="")))
            for part in (candidate.get("content") or {}).get("parts") or []:
                self._keep(index, part)
                if "functionCall" in part:
                    call = part["functionCall"]
                    ordinal = self.calls.get(index, 0)
                    self.calls[index] = ordinal + 1
                    out.append(self._chunk(index, Delta(tool_calls=(ToolCallDelta(
                        index=ordinal, id=encode_call_id(part.get("thoughtSignature")), type="function",
                        function=FunctionCallDelta(name=call.get("name", ""),
                                                   arguments=orjson.dumps(call.get("args") or {}).decode())),))))
                elif part.get("text"):
                    if part.get("thought"):
                        out.append(self._chunk(index, Delta(extra={"reasoning_content": part["text"]})))
                    else:
                        out.append(self._chunk(index, Delta(content=part["text"])))
            metadata = candidate.get("groundingMetadata")
            if isinstance(metadata, Mapping) and index not in self.finished:
                self.grounding.setdefault(index, {}).update(
                    (key, metadata[key]) for key in ("groundingChunks", "groundingSupports") if key in metadata)
            if candidate.get("finishReason"):
                # (what can fail on a wrong-shaped event comes before the candidate is marked finished: a skipped
                # event must not leave the stream looking complete without its finish chunk)
                reason = finish_reason(candidate["finishReason"], bool(self.calls.get(index)))
                if index in self.grounding and index not in self.finished:
                    parts = [("".join(texts) if kind == "text" else None) for kind, texts in self.parts.get(index, ())]
                    notes = grounding_annotations(self.grounding[index], parts)
                    if notes:
                        out.append(self._chunk(index, Delta(extra={"annotations": notes})))
                self.finished.add(index)
                out.append(self._chunk(index, Delta(), reason))
        return out

    def _keep(self, index: int, part: Any) -> None:
        """Adds a streamed part to the candidate's parts as put together: text to the text part before it (answer
        or thought alike), anything else as a part of its own. Only answer text is kept."""
        parts = self.parts.setdefault(index, [])
        text = part.get("text") if isinstance(part, Mapping) else None
        if not isinstance(text, str):
            parts.append(("other", []))
            return
        kind = "thought" if part.get("thought") else "text"
        if not parts or parts[-1][0] != kind:
            parts.append((kind, []))
        if kind == "text":
            parts[-1][1].append(text)

    @property
    def complete(self) -> bool:
        return bool(self.finished) and self.finished >= self.started

    def usage_chunk(self) -> ChatChunk | None:
        if not self.include_usage or self.usage is None:
            return None
        return ChatChunk(id=self.id or "chatcmpl-gemini", model=self.model, created=self.created, choices=(),
                         usage=self.usage)
