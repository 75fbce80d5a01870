"""The one cattrs converter: wire dicts <-> core models.

Rules: primitives are strict (``"5"`` is not an int, ``5`` is not a str); content parts are a tagged union on
``type`` with unknown types kept as :class:`OtherPart`; keys a class does not model go to its ``extra`` mapping and
come back out flat; ``None`` fields are omitted on the way out (the wire treats absent and null alike, and some
upstreams reject explicit nulls) except where OpenAI clients expect an explicit ``null``.
Errors become :class:`~scillm_core.errors.InvalidRequest` whose message and ``param`` carry the JSON path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn

from scillm_core.errors import InvalidRequest
from scillm_core.jsonio import json_type as _json_type
from scillm_core.models import chat as m
from scillm_core.models import embeddings as e

__all__ = ["converter", "structure", "unstructure"]

T = TypeVar("T")
converter = cattrs.Converter(detailed_validation=True, prefer_attrib_converters=True)  # (token counts: Usage)
_VALIDATED_FIELD = re.compile(r"'([A-Za-z_][A-Za-z0-9_]*)' must ")


# -- strict primitives -------------------------------------------------------------------------------------------

def _strict(kind: type, name: str) -> Any:
    def hook(value: Any, _: Any) -> Any:
        if type(value) is not kind and not (kind is float and type(value) is int):
            raise TypeError(f"expected {name}, got {_json_type(value)}")
        return value
    return hook


converter.register_structure_hook(str, _strict(str, "string"))
converter.register_structure_hook(int, _strict(int, "integer"))
converter.register_structure_hook(float, lambda v, _: float(_strict(float, "number")(v, _)))
converter.register_structure_hook(bool, _strict(bool, "boolean"))


def _mapping(value: Any, _: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected object, got {_json_type(value)}")
    return value


def _exact(hint: Any, hook: Any) -> None:
    converter.register_structure_hook_func(lambda t: t == hint, hook)


_exact(Mapping[str, Any], _mapping)
_exact(Mapping[str, Any] | None, lambda v, _: None if v is None else _mapping(v, _))
_exact(Any, lambda v, _: v)


def _is_homogeneous_tuple(hint: Any) -> bool:
    args: tuple[Any, ...] = getattr(hint, "__args__", ())
    return getattr(hint, "__origin__", None) is tuple and len(args) == 2 and args[-1] is Ellipsis


def _tuple_factory(hint: Any) -> Any:
    def hook(value: Any, _: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise TypeError(f"expected array, got {_json_type(value)}")
        return converter._structure_tuple(value, hint)

    return hook


converter.register_structure_hook_factory(_is_homogeneous_tuple, _tuple_factory)


def _role(value: Any, _: Any) -> str:
    if value not in _ROLES:
        raise ValueError(f"expected one of {', '.join(_ROLES)}, got {value!r}")
    return value  # type: ignore[no-any-return]


_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_exact(m.Role, _role)


# -- unions the generic machinery cannot tell apart -----------------------------------------------------------

_PARTS: dict[str, type] = {"text": m.TextPart, "image_url": m.ImagePart, "file": m.FilePart}


def _part(value: Any, _: Any) -> m.Part:
    if not isinstance(value, dict):
        raise TypeError(f"expected content part object, got {_json_type(value)}")
    kind = value.get("type")
    if not isinstance(kind, str):
        raise ValueError("content part needs a string 'type'")
    cls = _PARTS.get(kind)
    if cls is None:
        return m.OtherPart(type=kind, data={k: v for k, v in value.items() if k != "type"})
    return converter.structure(value, cls)  # type: ignore[no-any-return]


def _parts(value: Any) -> tuple[m.Part, ...]:
    return converter.structure(value, tuple[m.Part, ...])  # type: ignore[no-any-return]


def _content(value: Any, _: Any) -> str | tuple[m.Part, ...] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return _parts(value)
    raise TypeError(f"expected string, array of parts or null, got {_json_type(value)}")


def _stop(value: Any, _: Any) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise TypeError("expected string or array of strings")


def _tool_choice(value: Any, _: Any) -> str | Mapping[str, Any] | None:
    if value is None or isinstance(value, str | dict):
        return value
    raise TypeError(f"expected string or object, got {_json_type(value)}")


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request


def _embeddings_input(value: Any, _: Any) -> Any:
    """A non-empty string, or a non-empty array of strings, of token ids, or of token arrays; the message names
    the offending index (the path ends at ``$.input``)."""
    if isinstance(value, str):
        if not value:
            raise ValueError("must not be an empty string")
        return value
    if not isinstance(value, list):
        raise TypeError(f"expected a string or an array, got {_json_type(value)}")
    if not value:
        raise ValueError("must not be an empty array")
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise ValueError(f"{len(value)} inputs; at most {MAX_EMBEDDING_INPUTS} per request")
    if type(value[0]) is int:  # one token array
        bad = next((i for i, token in enumerate(value) if type(token) is not int), None)
        if bad is not None:
            raise TypeError(f"input[{bad}]: a token array holds integers only, got {_json_type(value[bad])}")
        return value
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                raise ValueError(f"input[{i}] must not be an empty string")
        elif isinstance(item, list):
            if not item or any(type(token) is not int for token in item):
                raise TypeError(f"input[{i}] must be a non-empty array of integer token ids")
        else:
            raise TypeError(f"input[{i}]: expected a string or a token array, got {_json_type(item)}")
    return value


_exact(m.Part, _part)
_exact(e.EmbeddingsInput, _embeddings_input)
_exact(str | tuple[m.Part, ...] | None, _content)
_exact(str | tuple[str, ...] | None, _stop)
_exact(str | Mapping[str, Any] | None, _tool_choice)


def _unstructure_part(part: m.Part) -> dict[str, Any]:
    if isinstance(part, m.OtherPart):
        return {"type": part.type, **part.data}
    return converter.unstructure(part, type(part))  # type: ignore[no-any-return]


converter.register_unstructure_hook_func(lambda t: t == m.Part, _unstructure_part)
converter.register_unstructure_hook(m.OtherPart, _unstructure_part)


# -- classes with an ``extra`` mapping -----------------------------------------------------------------------------

# Fields that OpenAI clients expect to see as explicit nulls.
_KEEP_NULL: dict[type, set[str]] = {m.Message: {"content"}, m.Choice: {"finish_reason", "logprobs"},
              m.ChunkChoice: {"finish_reason"}}
# Fields that never go on the wire (scillm's own request options).
_NOT_WIRE: dict[type, set[str]] = {m.ChatRequest: {"scillm"}, e.EmbeddingsRequest: {"scillm"}}
# URL fields whose scheme is case-insensitive: ``DATA:image/png;...`` becomes ``data:...`` here, once, so every
# middleware and provider that looks for ``data:`` (size and type checks, inlining) sees it.
_DATA_URLS: dict[type, str] = {m.ImageUrl: "url", m.FileData: "file_data"}


def _lower_data_scheme(obj: Any, name: str) -> Any:
    url = getattr(obj, name)
    if isinstance(url, str) and url[:5].lower() == "data:" and not url.startswith("data:"):
        return attrs.evolve(obj, **{name: "data:" + url[5:]})
    return obj


def _register_model(cls: type) -> None:
    names = [a.name for a in attrs.fields(cls) if a.init]  # init=False fields (``native``) are never wire keys
    has_extra = "extra" in names
    known = frozenset(n for n in names if n != "extra")
    keep_null = _KEEP_NULL.get(cls, set())
    not_wire = _NOT_WIRE.get(cls, set())
    data_url = _DATA_URLS.get(cls)
    base_structure: Any = make_dict_structure_fn(cls, converter)
    base_unstructure: Any = make_dict_unstructure_fn(cls, converter)

    def structure(value: Any, _: Any) -> Any:
        if not isinstance(value, dict):
            raise TypeError(f"expected object, got {_json_type(value)}")
        if has_extra:
            extra = {k: v for k, v in value.items() if k not in known}
            if extra:
                value = {k: v for k, v in value.items() if k in known}
                value["extra"] = extra
        obj = base_structure(value, cls)
        return obj if data_url is None else _lower_data_scheme(obj, data_url)

    def unstructure(obj: Any) -> dict[str, Any]:
        raw = base_unstructure(obj)
        out = {k: v for k, v in raw.items() if (v is not None or k in keep_null) and k not in not_wire}
        if has_extra:
            extra = out.pop("extra", None)
            if extra:
                out.update(extra)
        return out

    converter.register_structure_hook(cls, structure)
    converter.register_unstructure_hook(cls, unstructure)


for _cls in (m.TextPart, m.ImageUrl, m.ImagePart, m.FileData, m.FilePart, m.FunctionCall, m.ToolCall, m.Message,
             m.FunctionDef, m.Tool, m.ChatRequest, m.Usage, m.Choice, m.ChatResponse, m.FunctionCallDelta,
             m.ToolCallDelta, m.Delta, m.ChunkChoice, m.ChatChunk, e.EmbeddingsRequest, e.Embedding,
             e.EmbeddingsUsage, e.EmbeddingsResponse):
    _register_model(_cls)



# -- the stream hot path --------------------------------------------------------------------------------------------
# A stream is dozens of chunks per request, so chunks get hand-written hooks for their common shape (text and
# reasoning deltas): about 5x cheaper than the generated ones, measured with bench/. Anything else (tool-call deltas,
# usage, odd types) falls back to the generated hooks, so behaviour and error reporting are the same.

_generic_chunk = converter.get_structure_hook(m.ChatChunk)
_generic_chunk_wire = converter.get_unstructure_hook(m.ChatChunk)
_CHUNK_FIELDS = frozenset({"id", "object", "created", "model", "choices", "usage", "system_fingerprint"})
_CHOICE_FIELDS = frozenset({"delta", "index", "finish_reason", "logprobs"})
_DELTA_FIELDS = frozenset({"role", "content"})
_OPTIONAL_STR = (str, type(None))


def _fast_chunk(value: Any, cls: Any) -> m.ChatChunk:
    if type(value) is not dict or value.get("usage") is not None:
        return _generic_chunk(value, cls)  # type: ignore[no-any-return]
    wire_choices = value.get("choices")
    if type(wire_choices) is not list:
        return _generic_chunk(value, cls)  # type: ignore[no-any-return]
    choices = []
    for choice in wire_choices:
        delta = choice.get("delta") if type(choice) is dict else None
        if type(delta) is not dict or "tool_calls" in delta:
            return _generic_chunk(value, cls)  # type: ignore[no-any-return]
        role, content = delta.get("role"), delta.get("content")
        index, finish = choice.get("index", 0), choice.get("finish_reason")
        if (type(role) not in _OPTIONAL_STR or type(content) not in _OPTIONAL_STR or type(index) is not int
                or type(finish) not in _OPTIONAL_STR):
            return _generic_chunk(value, cls)  # type: ignore[no-any-return]
        # (extras are rare: a key-set comparison, in C, decides whether to build them)
        extra = m._EMPTY if delta.keys() <= _DELTA_FIELDS else _without(delta, _DELTA_FIELDS)
        choice_extra = m._EMPTY if choice.keys() <= _CHOICE_FIELDS else _without(choice, _CHOICE_FIELDS)
        choices.append(m.ChunkChoice(delta=m.Delta(role=role, content=content, extra=extra), index=index,
                                     finish_reason=finish, logprobs=choice.get("logprobs"), extra=choice_extra))
    chunk_id, model, created = value.get("id"), value.get("model"), value.get("created", 0)
    fingerprint = value.get("system_fingerprint")
    if type(chunk_id) is not str or type(model) is not str or type(created) is not int \
            or type(fingerprint) not in _OPTIONAL_STR:
        return _generic_chunk(value, cls)  # type: ignore[no-any-return]
    return m.ChatChunk(id=chunk_id, model=model, choices=tuple(choices), created=created,
                       system_fingerprint=fingerprint, object=value.get("object", "chat.completion.chunk"),
                       extra=m._EMPTY if value.keys() <= _CHUNK_FIELDS else _without(value, _CHUNK_FIELDS))


def _without(wire: dict[str, Any], fields: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in wire.items() if k not in fields}


def _fast_chunk_wire(chunk: m.ChatChunk) -> dict[str, Any]:
    if chunk.usage is not None:
        return _generic_chunk_wire(chunk)  # type: ignore[no-any-return]
    choices = []
    for choice in chunk.choices:
        delta = choice.delta
        if delta.tool_calls is not None:
            return _generic_chunk_wire(chunk)  # type: ignore[no-any-return]
        wire_delta: dict[str, Any] = {}
        if delta.role is not None:
            wire_delta["role"] = delta.role
        if delta.content is not None:
            wire_delta["content"] = delta.content
        if delta.extra:
            wire_delta.update(delta.extra)
        wire_choice: dict[str, Any] = {"delta": wire_delta, "index": choice.index,
                                       "finish_reason": choice.finish_reason}
        if choice.logprobs is not None:
            wire_choice["logprobs"] = choice.logprobs
        if choice.extra:
            wire_choice.update(choice.extra)
        choices.append(wire_choice)
    out: dict[str, Any] = {"id": chunk.id, "model": chunk.model, "choices": choices, "created": chunk.created,
                           "object": chunk.object}
    if chunk.system_fingerprint is not None:
        out["system_fingerprint"] = chunk.system_fingerprint
    if chunk.extra:
        out.update(chunk.extra)
    return out


converter.register_structure_hook(m.ChatChunk, _fast_chunk)
converter.register_unstructure_hook(m.ChatChunk, _fast_chunk_wire)


# -- public helpers ---------------------------------------------------------------------------------------------

def structure(data: Any, cls: type[T], *, what: str = "request body") -> T:
    """Structure ``data`` or raise :class:`InvalidRequest` naming the first bad JSON path."""
    try:
        return converter.structure(data, cls)
    except Exception as exc:  # cattrs raises ClassValidationError / IterableValidationError trees
        message, path = _first_error(exc)
        if isinstance(message, InvalidRequest):
            raise message from None  # a model's own check (``ChatRequest.response_format``) names its path
        raise InvalidRequest(f"invalid {what}: {message} @ {path}", param=path) from None


def unstructure(obj: Any) -> Any:
    return converter.unstructure(obj)


def _first_error(exc: BaseException, path: str = "$") -> tuple[str | InvalidRequest, str]:
    """Walk a cattrs exception group to its first leaf, building ``$.a[1].b`` (a leaf that is an
    ``InvalidRequest`` already says where: it is returned as it is)."""
    if isinstance(exc, cattrs.ClassValidationError | cattrs.IterableValidationError):
        for sub in exc.exceptions:
            note = next((n for n in getattr(sub, "__notes__", []) if hasattr(n, "name") or hasattr(n, "index")),
                        None)
            step = ""
            if note is not None and hasattr(note, "name"):
                step = f".{note.name}"
            elif note is not None and hasattr(note, "index"):
                step = f"[{note.index}]"
            if isinstance(sub, KeyError) and note is not None and hasattr(note, "name"):
                return "required field is missing", path + step
            return _first_error(sub, path + step)
    if isinstance(exc, KeyError):
        return "required field is missing", path
    if isinstance(exc, InvalidRequest):
        return exc, path
    text = str(exc)
    field = _VALIDATED_FIELD.match(text) if isinstance(exc, ValueError) else None
    if field is not None:  # an attrs validator ("'max_queue' must be >= 0: -1") names its field: point at it
        path = f"{path}.{field[1]}"
    if "not in literal" in text or "Literal" in text:
        text = "value not allowed here"
    return text or type(exc).__name__, path
