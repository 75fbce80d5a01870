"""Client-side batching the way the seed card asks callers to do it: ``httpx.AsyncClient`` + tasks +
``asyncio.as_completed``, every item tagged with ``scillm_metadata.batch_id`` and ``item_id``, results yielded in
completion order (reorder by ``item_id`` afterwards if you need input order)::

    async for result in complete_all(items, model="text-deepseek", concurrency=8):
        print(result["item_id"], result["ok"], result.get("content"))
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import httpx

__all__ = ["complete_all"]


async def complete_all(items: Iterable[Mapping[str, Any]], *, model: str, concurrency: int = 8,
                       base_url: str = "http://127.0.0.1:4001/v1", api_key: str = "sk-dev-proxy-123",
                       batch_id: str | None = None, caller: str = "scillm-client",
                       timeout_s: float = 600.0) -> AsyncIterator[dict[str, Any]]:
    """Yield one result per item as each finishes: ``{ok, item_id, content, response}`` or
    ``{ok: False, item_id, status_code, error}``. Items are chat bodies (``messages`` or ``prompt``) with an
    optional ``item_id``; ``model`` applies unless an item sets its own."""
    batch_id = batch_id or f"client-{uuid.uuid4().hex[:12]}"
    limit = asyncio.Semaphore(concurrency)
    headers = {"authorization": f"Bearer {api_key}", "x-caller-skill": caller}

    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s) as client:

        async def one(index: int, item: Mapping[str, Any]) -> dict[str, Any]:
            body = dict(item)
            item_id = str(body.pop("item_id", None) or f"item-{index}")
            prompt = body.pop("prompt", None)
            if "messages" not in body and prompt is not None:
                body["messages"] = [{"role": "user", "content": prompt}]
            body.setdefault("model", model)
            body["scillm_metadata"] = {**(body.get("scillm_metadata") or {}), "batch_id": batch_id,
                                       "item_id": item_id}
            async with limit:
                try:
                    response = await client.post("/chat/completions", json=body)
                except httpx.HTTPError as exc:
                    return {"ok": False, "item_id": item_id, "index": index, "status_code": None,
                            "error": f"{type(exc).__name__}: {exc}"}
            data = response.json()
            if response.status_code >= 400:
                return {"ok": False, "item_id": item_id, "index": index, "status_code": response.status_code,
                        "error": data.get("error", {}).get("message", response.text)}
            return {"ok": True, "item_id": item_id, "index": index,
                    "content": data["choices"][0]["message"].get("content"), "response": data}

        tasks = [asyncio.create_task(one(i, item)) for i, item in enumerate(items)]
        try:
            for finished in asyncio.as_completed(tasks):
                yield await finished
        finally:
            for task in tasks:
                task.cancel()
