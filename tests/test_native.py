"""NativeRequest.upstream_body: only the top-level model value changes, whatever else the body holds."""

from __future__ import annotations

import orjson
import pytest

from scillm_core.models.native import native_request


@pytest.mark.parametrize("raw", [
    b'{"model": "a/m",  "x": 1.50}',
    b'{"tools": [{"model": "a/m"}], "note": "model", "model":"a/m"}',  # a nested key and a value "model" too
    b'{"metadata": {"model": "a/m"}, "model" : "a/m", "text": "\\"model\\": \\"a/m\\""}',
])
def test_only_the_top_level_model_value_is_rewritten(raw: bytes) -> None:
    native = native_request("openai-chat", orjson.loads(raw), raw, {})
    out = native.upstream_body("m")
    assert orjson.loads(out) == {**orjson.loads(raw), "model": "m"}
    assert len(out) == len(raw) - 2  # nothing but the value changed: same spacing, same number formats


def test_an_unchanged_model_sends_the_bytes_themselves() -> None:
    raw = b'{"model":"m","x":1e2}'
    assert native_request("openai-chat", orjson.loads(raw), raw, {}).upstream_body("m") is raw


def test_bodies_it_cannot_splice_are_serialised_again() -> None:
    raw = b'{"mod\\u0065l": "a/m", "timeout": 5, "x": 1}'  # an escaped key; and a scillm field taken out
    native = native_request("openai-chat", orjson.loads(raw), raw, {}, taken=frozenset({"timeout"}))
    assert native.raw is None and orjson.loads(native.upstream_body("m")) == {"model": "m", "x": 1}
    escaped = native_request("openai-chat", orjson.loads(raw), raw, {})
    assert orjson.loads(escaped.upstream_body("m")) == {"model": "m", "timeout": 5, "x": 1}


def test_dialect_headers_are_the_ones_named() -> None:
    native = native_request("anthropic-messages", {"model": "x"}, b"{}", {"anthropic-beta": "b1", "x-api-key": "k"},
                            forward=("anthropic-version", "anthropic-beta"))
    assert dict(native.headers) == {"anthropic-beta": "b1"}
