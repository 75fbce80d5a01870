"""Key administration for the master key: ``POST/GET /v1/scillm/keys``, ``GET/DELETE /v1/scillm/keys/{id}``,
``POST /v1/scillm/keys/{id}/rotate``. The secret appears in the answer of create and rotate only."""

from __future__ import annotations

import math
import time
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from scillm_core import errors, identity_of, json_response, read_json, runtime_of
from scillm_core.web import list_page
from scillm_keys.limits import parse_limits
from scillm_keys.store import KeyStore, public

__all__ = ["parse_create", "routes"]

BODY_LIMIT = 64 * 1024
CREATE_FIELDS = ("name", "team", "models", "limits", "expires_at", "expires_in_s")
MAX_MODELS = 100
TEN_YEARS_S = 10 * 366 * 86400


def keys_of(request: Request) -> KeyStore:
    identity = identity_of(request)
    if not identity.master:
        raise errors.PermissionDenied("key administration needs the master key")
    return runtime_of(request).plugin_state["keys"]  # type: ignore[no-any-return]


def _text(value: Any, where: str, *, required: bool = False, limit: int = 100) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > limit or not value.isprintable():
        raise errors.InvalidRequest(f"expected a printable string of 1 to {limit} characters @ {where}", param=where)
    return value.strip()


def _expiry(body: dict[str, Any]) -> float | None:
    at, within = body.get("expires_at"), body.get("expires_in_s")
    if at is not None and within is not None:
        raise errors.InvalidRequest("give expires_at or expires_in_s, not both @ $.expires_at", param="$.expires_at")
    now = time.time()
    if within is not None:
        if isinstance(within, bool) or not isinstance(within, int | float) or not math.isfinite(within) \
                or not 0 < within <= TEN_YEARS_S:
            raise errors.InvalidRequest("expires_in_s must be a positive number of seconds (at most ten years) "
                                        "@ $.expires_in_s", param="$.expires_in_s")
        return now + float(within)
    if at is None:
        return None
    if isinstance(at, str) and len(at) <= 40:
        try:
            parsed = datetime.fromisoformat(at.replace("Z", "+00:00"))
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is None:
            raise errors.InvalidRequest("expires_at needs a time zone (e.g. 2027-01-31T00:00:00Z) @ $.expires_at",
                                        param="$.expires_at")
        at = parsed.timestamp() if parsed is not None else None
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at) \
            or not now < at <= now + TEN_YEARS_S:
        raise errors.InvalidRequest("expires_at must be a future time: ISO 8601 with a zone, or Unix seconds "
                                    "@ $.expires_at", param="$.expires_at")
    return float(at)


def parse_create(body: Any) -> dict[str, Any]:
    """The validated arguments of :meth:`KeyStore.create`; 400 naming the path of anything wrong."""
    if not isinstance(body, dict):
        raise errors.InvalidRequest("request body must be a JSON object @ $", param="$")
    unknown = [k for k in body if k not in CREATE_FIELDS]
    if unknown:
        name = str(unknown[0])[:60]
        raise errors.InvalidRequest(f"unknown field {errors.quote(name)} (known: {', '.join(CREATE_FIELDS)}) @ "
                                    f"$.{name}",
                                    param=f"$.{name}")
    models = body.get("models")
    if models is not None:
        if not isinstance(models, list) or not 1 <= len(models) <= MAX_MODELS:
            raise errors.InvalidRequest(f"models must be a list of 1 to {MAX_MODELS} model or group names "
                                        "(fnmatch patterns allowed) @ $.models", param="$.models")
        models = [_text(m, f"$.models[{i}]", required=True, limit=200) for i, m in enumerate(models)]
    return {"name": _text(body.get("name"), "$.name", required=True), "team": _text(body.get("team"), "$.team"),
            "models": models, "limits": parse_limits(body.get("limits")), "expires_at": _expiry(body)}


async def create(request: Request) -> Response:
    keys = keys_of(request)
    spec = parse_create(await read_json(request, limit_bytes=BODY_LIMIT))
    doc, token = await keys.create(**spec)
    return json_response({**public(doc), "key": token}, 201)


async def listing(request: Request) -> Response:
    page = list_page(request, await keys_of(request).list(), default_limit=10_000, max_limit=10_000,
                     default_order="asc")
    return json_response({**page, "data": [public(doc) for doc in page["data"]]})


async def show(request: Request) -> Response:
    return json_response(public(await keys_of(request).get(request.path_params["key_id"])))


async def revoke(request: Request) -> Response:
    return json_response(public(await keys_of(request).revoke(request.path_params["key_id"])))


async def rotate(request: Request) -> Response:
    doc, token = await keys_of(request).rotate(request.path_params["key_id"])
    return json_response({**public(doc), "key": token})


def routes() -> list[tuple[str, Any, list[str]]]:
    return [("/v1/scillm/keys", create, ["POST"]),
            ("/v1/scillm/keys", listing, ["GET"]),
            ("/v1/scillm/keys/{key_id}", show, ["GET"]),
            ("/v1/scillm/keys/{key_id}", revoke, ["DELETE"]),
            ("/v1/scillm/keys/{key_id}/rotate", rotate, ["POST"])]
