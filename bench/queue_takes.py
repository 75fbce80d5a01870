"""What a work-queue take costs as the flows waiting grow (``scillm_core.state``: a batch is a flow, grouped by its
key): one store per backend (the embedded SQLite file, a real ``redis-server``), ``--flows`` counts of flows
spread over 50 keys, with enough entries between them that each of the 200 takes of 4 gives 4. Reports wall and
CPU milliseconds per take (this process's CPU: for Redis the client's, the script's own time is Redis's) and each
against the smallest count. A take should cost what it gives, not one look per flow waiting.

    .venv/bin/python bench/queue_takes.py [--flows 10,1000,5000] [--takes 200]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scillm_core.state import StateStore
from scillm_core.state.redis import RedisStore
from scillm_core.state.sqlite import SQLiteStore
from scillm_core.testing.services import RedisServer


async def per_take(store: StateStore, flows: int, takes: int) -> tuple[float, float]:
    each = -(-takes * 4 // flows)
    for n in range(flows):
        await store.enqueue("bench", [{"n": n, "i": i} for i in range(each)], flow=f"key_{n % 50}/batch{n}")
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(takes):
        await store.take("bench", "bench", 4)
    return (time.perf_counter() - wall) / takes * 1e3, (time.process_time() - cpu) / takes * 1e3


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", default="10,1000,5000")
    ap.add_argument("--takes", type=int, default=200)
    args = ap.parse_args()
    counts = [int(x) for x in args.flows.split(",")]
    work = Path(tempfile.mkdtemp(prefix="scillm-queue-bench-"))
    redis = RedisServer(work / "redis").start()
    print("| backend | flows waiting | ms per take (wall) | ms per take (CPU) | CPU vs the fewest flows |")
    print("|---|---:|---:|---:|---:|")
    try:
        for backend in ("sqlite", "redis"):
            base = None
            for flows in counts:
                store: StateStore = (SQLiteStore(work / f"{flows}.sqlite3") if backend == "sqlite"
                                     else RedisStore(redis.url, prefix=f"bench{flows}:"))
                try:
                    wall, cpu = await per_take(store, flows, args.takes)
                finally:
                    await store.close()
                base = base or cpu
                print(f"| {backend} | {flows} | {wall:.2f} | {cpu:.2f} | {cpu / base:.2f}x |", flush=True)
    finally:
        redis.stop()


if __name__ == "__main__":
    asyncio.run(main())
