"""Same-dialect pass-through: the client's own request body beside the neutral model, and the upstream's own bytes
beside the neutral answer.

A dialect surface (chat completions, Messages, Responses) attaches a :class:`NativeRequest` to the
:class:`~scillm_core.models.ChatRequest` it built. Middleware keeps reading the neutral request; a provider that
speaks the same dialect sends the native body instead of translating (``model`` rewritten, nothing else), and
hands back the upstream's body or event bytes on the answer's ``native`` field, which the surface writes as they
came.

The ``native`` fields are ``init=False``: :func:`attrs.evolve` does not carry them, so a request or answer that a
middleware changed (a re-ask, a converted file, a repaired JSON answer) loses its native form and is translated,
carrying the change. Set them only on a freshly built object, with :func:`with_native`.

A stream's chunks after the upstream's own may come without bytes: a continuation by another model (see
scillm-resilience; ``ctx.notes["continuation"]`` is set before its first chunk). The surface translates those,
going on from the state its translator took in from the native events (:func:`native_events`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import orjson
from attrs import frozen

from scillm_core import errors

__all__ = ["NativeRequest", "native_events", "native_request", "with_native"]

T = TypeVar("T")
_EMPTY: Mapping[str, str] = {}
# a "model" key and its string value (group 1), wherever it occurs; candidates are checked before use
_MODEL = re.compile(rb'"model"\s*:\s*("(?:[^"\\]|\\.)*")')


def with_native(obj: T, native: Any) -> T:
    """Set ``obj.native`` (an ``init=False`` field of a frozen model) on a freshly built object; returns it."""
    object.__setattr__(obj, "native", native)
    return obj


def native_events(raw: bytes) -> Iterator[Any]:
    """The JSON payloads of the SSE events in ``raw`` (a chunk's ``native`` bytes: whole events); other lines and
    payloads that are not JSON are passed over."""
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                yield orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                continue


@frozen(kw_only=True)
class NativeRequest:
    """The client's request in its own dialect (``openai-chat``, ``anthropic-messages``, ``openai-responses``: the
    names ``x-scillm-dialect`` uses). ``body`` is its JSON with scillm's extension fields taken out;
    ``raw`` the bytes exactly as received when nothing was taken out (else ``None``); ``headers`` the client's
    dialect headers that go upstream with it (``anthropic-beta``, ``anthropic-version``, ``openai-beta``)."""

    dialect: str
    body: Mapping[str, Any]
    raw: bytes | bytearray | None = None
    headers: Mapping[str, str] = _EMPTY

    def upstream_body(self, model: str, **changes: Any) -> bytes:
        """The bytes to send upstream: the client's own bytes with only the ``model`` value rewritten (key order,
        spacing and escapes as the client wrote them). ``changes`` (fields a backend insists on) and bodies that
        had scillm fields taken out are serialised again from ``body``."""
        raw = self.raw
        if raw is not None and not changes:
            if self.body.get("model") == model:
                return raw if type(raw) is bytes else bytes(raw)  # surfaces read bodies into a bytearray
            spliced = _splice_model(raw, model, self.body)
            if spliced is not None:
                return bytes(spliced)
        return orjson.dumps({**self.body, "model": model, **changes})


def native_request(dialect: str, body: Mapping[str, Any], raw: bytes | bytearray, headers: Mapping[str, str], *,
                   taken: frozenset[str] = frozenset(), forward: tuple[str, ...] = ()) -> NativeRequest:
    """The native form of a request a surface received: ``taken`` are scillm's own body fields (left out, which
    means the body is serialised again), ``forward`` the client headers that go upstream with it."""
    removed = taken.intersection(body)
    kept = {name: value for name in forward if (value := headers.get(name))}
    for name, value in kept.items():  # they go upstream as they came: an HTTP client sends visible ASCII only
        if not (value.isascii() and value.isprintable()):
            raise errors.InvalidRequest(f"header {name} must be visible ASCII (it goes upstream as sent)", param=name)
    return NativeRequest(dialect=dialect, body={k: v for k, v in body.items() if k not in removed} if removed else body,
                         raw=None if removed else raw, headers=kept or _EMPTY)


def _splice_model(raw: bytes | bytearray, model: str, body: Mapping[str, Any]) -> bytes | bytearray | None:
    """``raw`` with the top-level ``model`` value replaced, or ``None`` when it cannot be found for sure."""
    matches = list(_MODEL.finditer(raw))
    value = orjson.dumps(model)
    if len(matches) == 1 and raw.count(b'"model"') == 1 \
            and orjson.loads(matches[0].group(1)) == body.get("model"):  # the only "model" anywhere: the top key
        start, end = matches[0].span(1)
        return raw[:start] + value + raw[end:]
    expected = {**body, "model": model}
    for match in matches:  # a nested "model" key or a "model" string value too: take the one that parses right
        start, end = match.span(1)
        candidate = raw[:start] + value + raw[end:]
        try:
            if orjson.loads(candidate) == expected:
                return candidate
        except orjson.JSONDecodeError:
            continue
    return None
