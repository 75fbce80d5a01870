"""scillm's own chat request fields (``scillm_metadata``, ``timeout``, ``json_schema`` ...): taken out of a wire
body before it is modelled (they are never sent upstream) and checked in one place for every surface that takes
them (chat, responses, batch items)."""

from __future__ import annotations

from typing import Any

from scillm_core import errors

__all__ = ["EXTENSION_FIELDS", "check_timeout", "take_extensions"]

EXTENSION_FIELDS = frozenset({"scillm_metadata", "timeout", "json_schema", "schema_retries", "source",
                              "grounding_threshold", "grounding_retries", "cache"})


def check_timeout(value: Any, where: str) -> float | None:
    """A positive number of seconds (``None`` when absent); 400 naming ``where`` otherwise (``"5"``, ``-1``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or value == float("inf"):
        raise errors.InvalidRequest(f"timeout must be a positive number of seconds, got {value!r:.40} @ {where}",
                                    param=where)
    return float(value)


def take_extensions(body: dict[str, Any], fields: frozenset[str] = EXTENSION_FIELDS, *,
                    where: str = "$") -> dict[str, Any]:
    """Remove scillm's ``fields`` from ``body`` and return them; the ones core defines are checked (400 naming the
    path under ``where``). Middleware checks its own (``json_schema``, ``schema_retries``, ...)."""
    extensions = {key: body.pop(key) for key in fields.intersection(body)}
    check_timeout(extensions.get("timeout"), f"{where}.timeout")
    metadata = extensions.get("scillm_metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise errors.InvalidRequest(f"scillm_metadata must be an object @ {where}.scillm_metadata",
                                    param=f"{where}.scillm_metadata")
    return extensions
