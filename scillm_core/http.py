"""The shared upstream HTTP client: httpx's API over the transport that measured fastest (see bench/README.md).

``SCILLM_HTTP_TRANSPORT=aiohttp`` (default) uses the aiohttp transport: its connection pool stays flat with
hundreds of requests in flight, where httpcore 1.0's pool grows quadratically. ``httpx`` selects httpx's own.
Every request carries scillm's own User-Agent; client headers are never forwarded.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from scillm_core.version import __version__

__all__ = ["USER_AGENT", "make_http_client"]

USER_AGENT = f"scillm/{__version__}"
LIMITS = httpx.Limits(max_connections=2048, max_keepalive_connections=512, keepalive_expiry=30.0)
TIMEOUT = httpx.Timeout(connect=15.0, read=900.0, write=60.0, pool=60.0)


def make_http_client(env: Mapping[str, str] | None = None,
                     transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    if transport is None:
        transport = _transport((env or {}).get("SCILLM_HTTP_TRANSPORT", "aiohttp"))
    return httpx.AsyncClient(transport=transport, timeout=TIMEOUT, headers={"user-agent": USER_AGENT},
                             follow_redirects=False, trust_env=False)


def _transport(name: str) -> httpx.AsyncBaseTransport:
    if name == "httpx":
        return httpx.AsyncHTTPTransport(limits=LIMITS)
    if name != "aiohttp":
        raise ValueError(f"SCILLM_HTTP_TRANSPORT must be 'aiohttp' or 'httpx', not {name!r}")
    from httpx_aiohttp import AiohttpTransport

    return AiohttpTransport(limits=LIMITS, trust_env=False)
