"""Bounded JSON parsing: every JSON document that comes from outside (request bodies, upstream replies, agent CLI
output, model answers) is parsed with :func:`loads`, which refuses documents nested deeper than ``MAX_DEPTH``.

Deeper documents parse (orjson allows 1024 levels) but cannot be written back (orjson dumps at most 254 levels),
so without the bound a deep value failed late: after the upstream call, in the response, the call log or a stored
batch result. :class:`JSONTooDeep` is a ``JSONDecodeError``, so every caller that handles malformed JSON already
handles it; its ``path`` names where the nesting went too deep (``$.scillm_metadata.a.a...``).
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["json_type", "MAX_DEPTH", "JSONTooDeep", "depth_problem", "format_path", "loads"]

MAX_DEPTH = 128  # levels of objects/arrays; the top-level value is level 1


class JSONTooDeep(orjson.JSONDecodeError):
    def __init__(self, path: str, limit: int) -> None:
        message = f"JSON nested deeper than {limit} levels at {path}"
        super().__init__(message, "", 0)
        self.msg = message
        self.path = path
        self.limit = limit

    def __str__(self) -> str:
        return self.msg


def loads(raw: bytes | bytearray | memoryview | str, *, max_depth: int = MAX_DEPTH, root: str = "$") -> Any:
    """``orjson.loads`` that raises :class:`JSONTooDeep` for a document nested deeper than ``max_depth``.

    The check is cheap: a document shorter than ``2 * max_depth`` bytes, or with at most ``max_depth`` brackets,
    cannot be deeper (``bytes.count`` runs in C); otherwise orjson itself answers, since ``orjson.dumps`` refuses
    more than 254 levels: the value wrapped in ``254 - max_depth`` lists serialises exactly when it is no deeper
    than ``max_depth``. The path is looked for (in Python) only when it is too deep."""
    value = orjson.loads(raw)
    if len(raw) > 2 * max_depth and _brackets(raw) > max_depth and _deeper_than(value, max_depth):
        raise JSONTooDeep(depth_problem(value, max_depth, root) or root, max_depth)
    return value


_ORJSON_LEVELS = 254  # the most levels orjson.dumps writes


def _brackets(raw: bytes | bytearray | memoryview | str) -> int:
    """An upper bound of the nesting depth: every level opens a bracket."""
    if isinstance(raw, str):
        return raw.count("[") + raw.count("{")
    data = bytes(raw) if isinstance(raw, memoryview) else raw
    return data.count(b"[") + data.count(b"{")


def _deeper_than(value: Any, limit: int) -> bool:
    wrapped = value
    for _ in range(_ORJSON_LEVELS - limit):
        wrapped = [wrapped]
    try:
        orjson.dumps(wrapped)
    except orjson.JSONEncodeError:  # a parsed document always serialises, except past orjson's depth
        return True
    return False


def depth_problem(value: Any, limit: int = MAX_DEPTH, root: str = "$") -> str | None:
    """The path of the first container nested deeper than ``limit`` levels in ``value``, else ``None``.
    Iterative: a hostile document cannot exhaust the stack here."""
    if not isinstance(value, dict | list):
        return None
    # (container, depth, parent entry, key in parent): parents kept so that the path can be built
    stack: list[tuple[Any, int, Any, Any]] = [(value, 1, None, None)]
    while stack:
        entry = stack.pop()
        node, depth = entry[0], entry[1]
        if depth > limit:
            keys = []
            while entry[2] is not None:
                keys.append(entry[3])
                entry = entry[2]
            return format_path(reversed(keys), root)
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1, entry, key))
    return None


def format_path(keys: Any, root: str = "$", *, head: int = 6, tail: int = 2) -> str:
    """``$.a[0].b`` for a sequence of keys; long paths keep their first ``head`` and last ``tail`` steps."""
    steps = [f"[{k}]" if isinstance(k, int) else f".{str(k)[:40]}" for k in keys]
    if len(steps) > head + tail + 1:
        steps = [*steps[:head], f"[...{len(steps) - head - tail} more...]", *steps[-tail:]]
    return root + "".join(steps)


def json_type(value: Any) -> str:
    """The JSON name of ``value``'s type, for error messages (``expected object, got array``)."""
    return {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)
