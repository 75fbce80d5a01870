"""The OpenAI-compatible embeddings surface: ``POST /v1/embeddings``.

The request is modelled as an :class:`~scillm_core.EmbeddingsRequest` and goes through
:func:`scillm_core.run_embeddings`: the request-level hook and ``route_model`` / ``call_provider`` with their
middleware (cache, limits, retries, fallbacks, breaker, metrics, call log), then the provider's ``embed``. The
vectors come back in the encoding the client asked for (the ``openai`` SDK asks for ``base64`` unless told
otherwise), whatever the upstream sent.
"""

from __future__ import annotations

from typing import Any

import attrs
from scillm_chat import EXTENSION_FIELDS as CHAT_FIELDS
from scillm_chat import take_extensions
from starlette.requests import Request
from starlette.responses import Response

from scillm_core import (
    EmbeddingsRequest,
    EmbeddingsUsage,
    Runtime,
    SurfaceRegistry,
    call_context,
    errors,
    hookimpl,
    json_response,
    read_json,
    run_embeddings,
    runtime_of,
    served_headers,
    structure,
    unstructure,
)

__all__ = ["EXTENSION_FIELDS", "parse_embeddings_request"]

#: scillm's own fields an embeddings request takes (never sent upstream); the chat-only ones are refused.
EXTENSION_FIELDS = frozenset({"scillm_metadata", "timeout", "cache"})


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    surfaces.route("/v1/embeddings", embeddings, ["POST"], plugin="embeddings")


def parse_embeddings_request(body: Any) -> EmbeddingsRequest:
    """Validate a wire body into an :class:`EmbeddingsRequest` (400 naming the JSON path on bad input)."""
    if not isinstance(body, dict):
        raise errors.InvalidRequest("request body must be a JSON object", param="$")
    chat_only = sorted((CHAT_FIELDS - EXTENSION_FIELDS).intersection(body))
    if chat_only:
        where = f"$.{chat_only[0]}"
        raise errors.InvalidRequest(f"{chat_only[0]} is a chat option; embeddings take "
                                    f"{', '.join(sorted(EXTENSION_FIELDS))} @ {where}", param=where)
    extensions = take_extensions(body, EXTENSION_FIELDS)
    if body.get("stream"):
        raise errors.InvalidRequest("embeddings do not stream @ $.stream", param="$.stream")
    body.pop("stream", None)
    body["scillm"] = extensions
    return structure(body, EmbeddingsRequest)


async def embeddings(request: Request) -> Response:
    runtime = runtime_of(request)
    body = await read_json(request, limit_bytes=int(runtime.config.server.max_body_mb * 1024 * 1024))
    embed = parse_embeddings_request(body)
    ctx = call_context(request, timeout_s=embed.scillm.get("timeout"))
    result = await run_embeddings(embed, ctx)
    if result.usage is None:  # the OpenAI shape always has usage; some upstreams report none
        result = attrs.evolve(result, usage=EmbeddingsUsage())
    payload = unstructure(result)
    metadata = embed.scillm.get("scillm_metadata")
    if metadata is not None:
        payload["scillm_metadata"] = metadata
    return json_response(payload, headers=served_headers(ctx))
