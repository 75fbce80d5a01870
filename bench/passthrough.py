"""Bare Starlette pass-through: the floor any Python gateway can hope to reach.

Receives the body, forwards it to the upstream with one shared async client,
returns the answer; a streamed answer (text/event-stream) is forwarded chunk
by chunk. No parsing, no auth, no logging.

  BENCH_UPSTREAM   upstream base URL (default http://127.0.0.1:18080/v1)
  BENCH_TRANSPORT  httpx (default) | httpx-aiohttp | httpx2
Run: uvicorn passthrough:app --loop uvloop --http httptools --no-access-log
"""

import os
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:18080/v1") + "/chat/completions"
TRANSPORT = os.environ.get("BENCH_TRANSPORT", "httpx")
HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-bench"}
client = None


def make_client():
    if TRANSPORT == "httpx2":
        import httpx2 as hx
    else:
        import httpx as hx
    kw = dict(limits=hx.Limits(max_connections=1024, max_keepalive_connections=1024), timeout=60.0, trust_env=False)
    if TRANSPORT == "httpx-aiohttp":
        from httpx_aiohttp import AiohttpTransport

        return hx.AsyncClient(transport=AiohttpTransport(limits=kw["limits"], trust_env=False), timeout=60.0)
    return hx.AsyncClient(**kw)


@asynccontextmanager
async def lifespan(app):
    global client
    client = make_client()
    yield
    await client.aclose()


async def chat(request):
    body = await request.body()
    resp = await client.send(client.build_request("POST", UPSTREAM, content=body, headers=HEADERS), stream=True)
    ctype = resp.headers.get("content-type", "application/json")
    if ctype.startswith("text/event-stream"):
        return StreamingResponse(resp.aiter_raw(), resp.status_code, media_type=ctype,
                                 background=BackgroundTask(resp.aclose))
    content = await resp.aread()
    await resp.aclose()
    return Response(content, resp.status_code, media_type=ctype)


async def health(request):
    return JSONResponse({"status": "ok", "transport": TRANSPORT})


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)],
                lifespan=lifespan)
