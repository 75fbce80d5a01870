"""Scale-out figures, as ratios: throughput of `--workers 2` and of two instances behind nginx against one process,
and CPU per request with the Redis state backend against the embedded one.

    .venv/bin/python bench/scale.py [--duration 8] [--runs 3]

Every setup is `scillm serve` against `bench/mock.py` (no answer delay), driven by `bench/loadgen.py` at c=64,
non-streaming. CPU per request is the user+system time of every process of the setup's scillm process groups
(`/proc/<pid>/stat`, children included) divided by OK requests. Nothing is pinned: on a 2-core machine the load
generator, the mock and nginx share the cores with the workers, which caps what two workers can gain here; the
printed figures say how busy the machine was. Medians of `--runs`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from loadgen import chat_body, run_load  # noqa: E402

from scillm_core.testing.services import Nginx, RedisServer, ScillmProcess, free_port  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def group_cpu_s(pgid: int) -> float:
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 (pgrp) after the comm
            total += sum(int(x) for x in fields[11:15])
    return total / TICKS


def measure(url: str, groups: list[int], duration: float) -> dict[str, float]:
    import orjson

    body = orjson.dumps(chat_body("openai/gpt-4o-mini", False))
    headers = {"Authorization": "Bearer sk-dev-proxy-123", "Content-Type": "application/json"}
    asyncio.run(run_load(url + "/v1/chat/completions", headers, body, concurrency=16, duration=1.0))  # warm-up
    before = sum(group_cpu_s(g) for g in groups)
    result = asyncio.run(run_load(url + "/v1/chat/completions", headers, body, concurrency=64, duration=duration))
    cpu = sum(group_cpu_s(g) for g in groups) - before
    return {"rps": result["rps"], "cpu_us": cpu / max(result["ok"], 1) * 1e6, "errors": result["errors"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scillm-scale-bench-"))
    mock_port = free_port()
    mock = subprocess.Popen([sys.executable, str(HERE / "mock.py"), "--port", str(mock_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    env = {"OPENAI_API_KEY": "sk-bench", "OPENAI_API_BASE": f"http://127.0.0.1:{mock_port}/v1",
           "SCILLM_DISABLE_PLUGINS": ""}
    redis = RedisServer(work / "redis").start()
    state = {"backend": "redis", "redis_url": redis.url}
    rows: dict[str, list[dict[str, float]]] = {}
    try:
        for _ in range(args.runs):
            for name in ("one process", "one process, Redis", "--workers 2", "2 instances + nginx (Redis)"):
                config = {"state": state} if "Redis" in name else {}
                servers = []
                nginx = None
                try:
                    if name.startswith("2 instances"):
                        servers = [ScillmProcess(work / f"{name}-{i}", env=env, config=config).start() for i in (0, 1)]
                        listen = free_port()
                        block = (f"upstream s {{ least_conn; {''.join(f'server 127.0.0.1:{s.port}; ' for s in servers)}"
                                 f"keepalive 64; }}\nserver {{ listen 127.0.0.1:{listen}; location / {{ proxy_pass "
                                 f"http://s; proxy_http_version 1.1; proxy_set_header Connection \"\"; "
                                 f"proxy_buffering off; }} }}")
                        nginx = Nginx(work / "nginx", block, listen).start()
                        url = nginx.url
                    else:
                        workers = 2 if "workers" in name else 1
                        servers = [ScillmProcess(work / name, env=env, config=config, workers=workers).start()]
                        url = servers[0].url
                    groups = [s.process.pid for s in servers if s.process is not None]
                    rows.setdefault(name, []).append(measure(url, groups, args.duration))
                finally:
                    if nginx is not None:
                        nginx.stop()
                    for server in servers:
                        server.stop()
    finally:
        redis.stop()
        mock.send_signal(signal.SIGTERM)
        mock.wait()
    base = statistics.median(r["rps"] for r in rows["one process"])
    base_cpu = statistics.median(r["cpu_us"] for r in rows["one process"])
    print(f"| setup | req/s (median of {args.runs}) | vs one process | scillm CPU µs/req | vs one process | errors |")
    print("|---|---|---|---|---|---|")
    for name, runs in rows.items():
        rps = statistics.median(r["rps"] for r in runs)
        cpu = statistics.median(r["cpu_us"] for r in runs)
        print(f"| {name} | {rps:.0f} | {rps / base:.2f}x | {cpu:.0f} | {cpu / base_cpu:.2f}x | "
              f"{sum(r['errors'] for r in runs)} |")


if __name__ == "__main__":
    main()
