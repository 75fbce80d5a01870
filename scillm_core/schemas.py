"""JSON Schemas that callers send (chat ``json_schema``, exec ``output_schema``, batch items): checked once, before
any upstream call, and never able to reach the network or the filesystem.

:func:`check_schema` is the one gate every caller uses. A schema passes when it is an object no deeper than
``MAX_SCHEMA_DEPTH``, valid against its metaschema (``$schema``, else draft 2020-12), every ``$ref`` /
``$dynamicRef`` / ``$recursiveRef`` resolves inside the document (or to a bundled metaschema), and no chain of
references and in-place applicators (``allOf``, ``not``, ``if`` ...) loops back without descending into the
instance (``{"$ref": "#"}`` would recurse forever). Anything else is a 400 naming the path. The validator it
returns resolves references through a ``referencing`` registry whose retrieve function refuses every URI, so a
remote ``$ref`` is never fetched (jsonschema's default would fetch it, on the event loop).

Checking a schema is CPU work (milliseconds for the metaschema alone): :func:`check_schema_async` runs it on a small
pool of its own (never the default pool, which the state store uses) and remembers the validators of schemas that
passed; :func:`errors_async` validates large values there too.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import orjson

from scillm_core import errors
from scillm_core.jsonio import depth_problem, format_path

__all__ = ["MAX_REF_CHAIN", "MAX_SCHEMA_DEPTH", "check_schema", "check_schema_async", "errors_async",
           "schema_errors", "unwrap"]

T = TypeVar("T")
MAX_SCHEMA_DEPTH = 64    # JSON levels inside a schema (the metaschema check recurses per level)
MAX_REF_CHAIN = 32       # references and in-place applicators followed without descending into the instance
INLINE_NODES = 500       # values with fewer containers are validated on the event loop (well under 1 ms)
CACHE_SIZE = 256         # validators of schemas that passed, by content
CACHE_MAX_BYTES = 64 * 1024

_REFS = ("$ref", "$dynamicRef", "$recursiveRef")
_IN_PLACE_ONE = ("not", "if", "then", "else")
_IN_PLACE_MANY = ("allOf", "anyOf", "oneOf")
_IN_PLACE_MAP = ("dependentSchemas", "dependencies")
_ONE = ("additionalProperties", "additionalItems", "contains", "contentSchema", "propertyNames", "unevaluatedItems",
        "unevaluatedProperties", "items", *_IN_PLACE_ONE)
_MANY = ("prefixItems", "items", *_IN_PLACE_MANY)
_MAP = ("$defs", "definitions", "properties", "patternProperties", *_IN_PLACE_MAP)

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_validators: collections.OrderedDict[bytes, Any] = collections.OrderedDict()
_lock = threading.Lock()  # apps in several threads (tests) share the cache


def _cache_key(schema: Any) -> bytes | None:
    if not isinstance(schema, dict):
        return None
    try:
        key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return None
    return key if len(key) <= CACHE_MAX_BYTES else None


def _refuse(uri: str) -> Any:
    from referencing.exceptions import NoSuchResource

    raise NoSuchResource(ref=uri)  # type: ignore[call-arg]  # never fetched: only the document itself and the bundled metaschemas resolve


def _registry() -> Any:
    from jsonschema_specifications import REGISTRY  # type: ignore[import-untyped]
    from referencing import Registry

    return Registry(retrieve=_refuse).combine(REGISTRY)  # type: ignore[call-arg]


def unwrap(raw: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """The schema inside ``{"name", "schema", "strict"}`` (the ``response_format`` wrapper), and its path suffix."""
    inner = raw.get("schema")
    if isinstance(inner, dict) and not ({"type", "properties", "$schema"} & raw.keys()):
        return inner, ".schema"
    return raw, ""


def check_schema(schema: Any, where: str) -> Any:
    """A jsonschema validator for ``schema`` that can never fetch anything, or a 400 naming the path under
    ``where`` (``$.json_schema``) of the first problem."""
    from jsonschema import Draft202012Validator, SchemaError  # type: ignore[import-untyped]
    from jsonschema.validators import validator_for  # type: ignore[import-untyped]

    if not isinstance(schema, dict):
        raise _bad("must be a JSON Schema object", where)
    deep = depth_problem(schema, MAX_SCHEMA_DEPTH, where)
    if deep is not None:
        raise _bad(f"is nested deeper than {MAX_SCHEMA_DEPTH} levels", deep)
    cls = validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        raise _bad(f"is not a valid JSON Schema: {exc.message}", format_path(exc.path, where)) from None
    except RecursionError:
        raise _bad("is nested too deeply to check", where) from None
    registry = _registry()
    _check_references(schema, cls, registry, where)
    return cls(schema, registry=registry)


async def check_schema_async(schema: Any, where: str) -> Any:
    """:func:`check_schema` off the event loop (the metaschema check alone takes milliseconds), remembering the
    validators of the last ``CACHE_SIZE`` schemas that passed (batches and agents repeat theirs)."""
    key = _cache_key(schema)
    if key is not None:
        with _lock:
            validator = _validators.get(key)
            if validator is not None:
                _validators.move_to_end(key)
                return validator
    validator = await _in_pool(check_schema, schema, where)
    if key is not None:
        with _lock:
            _validators[key] = validator
            while len(_validators) > CACHE_SIZE:
                _validators.popitem(last=False)
    return validator


def schema_errors(validator: Any, value: Any, limit: int = 10) -> list[str]:
    """Up to ``limit`` problems of ``value`` under ``validator``, as ``"$.path: message"``."""
    try:
        found = sorted(validator.iter_errors(value), key=lambda e: [str(p) for p in e.absolute_path])
    except RecursionError:
        return ["$: the value is nested too deeply to validate"]
    return [f"{format_path(e.absolute_path)}: {e.message}" for e in found[:limit]]


async def errors_async(validator: Any, value: Any, limit: int = 10) -> list[str]:
    """:func:`schema_errors`, off the event loop when the value is large."""
    if _size(value) < INLINE_NODES:
        return schema_errors(validator, value, limit)
    return await _in_pool(schema_errors, validator, value, limit)


# -- references ----------------------------------------------------------------------------------------------------

def _check_references(schema: dict[str, Any], cls: Any, registry: Any, where: str) -> None:
    """Every reference resolves without retrieval, and no in-place chain loops or runs longer than MAX_REF_CHAIN."""
    import referencing.jsonschema
    from referencing.exceptions import Unresolvable

    meta_id = cls.META_SCHEMA.get("$id") or cls.META_SCHEMA.get("id", "")
    spec = referencing.jsonschema.specification_with(meta_id, default=referencing.jsonschema.DRAFT202012)
    inside = _objects(schema)  # a reference may also reach the bundled metaschemas: those are not walked
    in_place: dict[int, list[int]] = {}  # id(schema) -> ids of schemas applied to the same instance
    paths: dict[int, str] = {}
    # Subschemas first (their paths are the ones to report), then whatever a reference reaches that they did not.
    walk: list[tuple[Any, Any, str]] = [(schema, registry.resolver_with_root(spec.create_resource(schema)), where)]
    reached: list[tuple[Any, Any, str]] = []
    while walk or reached:
        node, node_resolver, path = walk.pop() if walk else reached.pop()
        if not isinstance(node, dict) or id(node) in paths:
            continue
        paths[id(node)] = path
        edges = in_place.setdefault(id(node), [])
        for keyword in _REFS:
            ref = node.get(keyword)
            if not isinstance(ref, str):
                continue
            try:
                target = node_resolver.lookup(ref)
            except (Unresolvable, ValueError, LookupError, TypeError) as exc:
                raise _bad(f"has a reference that does not resolve inside the document ({ref[:200]!r}; remote and "
                           f"file references are never fetched){_why(exc)}", f"{path}.{keyword}") from None
            if id(target.contents) in inside:
                edges.append(id(target.contents))
                reached.append((target.contents, target.resolver, f"{path}.{keyword}"))
        for child, child_path, applies_in_place in _subschemas(node, path):
            if applies_in_place:
                edges.append(id(child))
            walk.append((child, node_resolver.in_subresource(spec.create_resource(child)), child_path))
    loop = _longest_in_place_chain(in_place)
    if loop is not None:
        kind, start = loop
        what = ("refers back to itself without descending into the value (validating it would never end)"
                if kind == "cycle" else f"chains more than {MAX_REF_CHAIN} references without descending into "
                                        "the value")
        raise _bad(what, paths.get(start, where))


def _objects(value: Any) -> set[int]:
    found, stack = set(), [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            found.add(id(node))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _why(exc: BaseException) -> str:
    text = str(exc)
    return f": {text[:200]}" if text and "Unresolvable" not in type(exc).__name__ else ""


def _subschemas(node: dict[str, Any], path: str) -> Iterator[tuple[dict[str, Any], str, bool]]:
    """``(subschema, path, applies to the same instance)`` for every object subschema directly under ``node``."""
    for keyword in _ONE:
        child = node.get(keyword)
        if isinstance(child, dict):
            yield child, f"{path}.{keyword}", keyword in _IN_PLACE_ONE
    for keyword in _MANY:
        children = node.get(keyword)
        if isinstance(children, list):
            for i, child in enumerate(children):
                if isinstance(child, dict):
                    yield child, f"{path}.{keyword}[{i}]", keyword in _IN_PLACE_MANY
    for keyword in _MAP:
        children = node.get(keyword)
        if isinstance(children, dict):
            for name, child in children.items():
                if isinstance(child, dict):
                    yield child, f"{path}.{keyword}.{str(name)[:40]}", keyword in _IN_PLACE_MAP



def _longest_in_place_chain(graph: Mapping[int, list[int]]) -> tuple[str, int] | None:
    """``("cycle", node)`` or ``("long", node)`` when in-place edges loop or chain past MAX_REF_CHAIN (iterative)."""
    state: dict[int, int] = {}  # 1 on the current path, 2 done
    height: dict[int, int] = {}
    for start in graph:
        if start in state:
            continue
        stack: list[tuple[int, Iterator[int]]] = [(start, iter(graph.get(start, ())))]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                state[node] = 2
                height[node] = 1 + max((height.get(c, 0) for c in graph.get(node, ())), default=0)
                if height[node] > MAX_REF_CHAIN:
                    return "long", node
                continue
            if state.get(child) == 1:
                return "cycle", child
            if child not in state:
                state[child] = 1
                stack.append((child, iter(graph.get(child, ()))))
    return None


# -- running off the event loop ------------------------------------------------------------------------------------

def _size(value: Any) -> int:
    """Containers in ``value``, counted up to INLINE_NODES (enough to decide where to run)."""
    count, stack = 0, [value]
    while stack and count < INLINE_NODES:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
            count += 1
        elif isinstance(node, list):
            stack.extend(node)
            count += 1
    return count


async def _in_pool(fn: Callable[..., T], *args: Any) -> T:
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="scillm-schema")
    return await asyncio.get_running_loop().run_in_executor(_pool, lambda: fn(*args))


def _bad(problem: str, path: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(f"{_carrier(path)} {problem} @ {path}", param=path)


def _carrier(path: str) -> str:
    """``json_schema`` for ``$.items[2].json_schema.properties.a``: the field the caller named."""
    for name in ("json_schema", "output_schema"):
        if name in path:
            return name
    return "schema"
