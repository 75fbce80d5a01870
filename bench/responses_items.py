"""Cost of keeping a translated Responses answer's output items (``scillm-responses``: one state-store write per
answer, so that a client's ``item_reference`` finds them), as a ratio against ``"store": false``.

A real ``scillm serve`` (embedded SQLite store, or ``--redis`` a real ``redis-server``) answers ``POST
/v1/responses`` for a Claude model from an in-process fake Anthropic upstream (a translated route, non-streaming),
c=8 from an async httpx client. Rounds alternate the two bodies; each reports scillm's CPU per request (user+system
of its process group, from /proc).

    .venv/bin/python bench/responses_items.py [--n 400] [--rounds 5] [--redis] [--aa]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from scale import group_cpu_s

from scillm_core.testing import DEV_KEY, Reply
from scillm_core.testing.fake_anthropic import FakeAnthropic
from scillm_core.testing.services import RedisServer, ScillmProcess


async def load(url: str, n: int, store: bool) -> None:
    body: dict[str, object] = {"model": "claude-sonnet-4-5", "input": "Say hello.", "max_output_tokens": 64}
    if not store:
        body["store"] = False
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60,
                                 headers={"authorization": f"Bearer {DEV_KEY}"}) as client:
        queue = asyncio.Queue[int]()
        for i in range(n):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                response = await client.post("/v1/responses", json=body)
                assert response.status_code == 200, response.text

        await asyncio.gather(*(worker() for _ in range(8)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--redis", action="store_true")
    ap.add_argument("--aa", action="store_true", help="both sides store: false (how far rounds differ by chance)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scillm-bench-items-"))
    redis = RedisServer(work / "redis").start() if args.redis else None
    with FakeAnthropic() as claude:
        claude.default = Reply.say("Hello there.")
        env = {"ANTHROPIC_API_KEY": "sk-ant-bench-0123456789", "ANTHROPIC_API_BASE": claude.base_url}
        config = {"state": {"backend": "redis", "redis_url": redis.url}} if redis is not None else {}
        server = ScillmProcess(work / "scillm", env=env, config=config).start()
        try:
            asyncio.run(load(server.url, 100, True))  # warm up
            costs: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.rounds):
                for store in (False, True):
                    before = group_cpu_s(server.process.pid)
                    asyncio.run(load(server.url, args.n, store and not args.aa))
                    costs[store].append((group_cpu_s(server.process.pid) - before) / args.n * 1e6)
        finally:
            server.stop()
            if redis is not None:
                redis.stop()
    off, on = statistics.median(costs[False]), statistics.median(costs[True])
    ratios = [b / a for a, b in zip(costs[False], costs[True], strict=True)]
    backend = "Redis" if args.redis else "SQLite"
    print(f"| {backend} | {off:,.0f} | {on:,.0f} | {on / off:.3f}x (per round {min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
