"""Scale-out figures, as ratios: throughput of `--workers 2` and of two instances behind nginx against one process,
and CPU per request with the Redis state backend against the embedded one.

    .venv/bin/python bench/scale.py [--duration 8] [--runs 3] [--load wrk|python] [--mock nginx|python]

Every setup is `scillm serve`, non-streaming, at c=64. By default the load is `wrk` (C, one thread; Debian's `wrk`)
and the upstream is nginx answering a fixed chat completion (`--mock nginx`): the side that is not scillm costs as
little CPU as it can, so on a small machine the cores go to scillm. `--load python --mock python` is the first
round's setup (`bench/loadgen.py` against `bench/mock.py`), which spends about as much CPU as one scillm process.
CPU per request is the user+system time of every process of the setup's scillm process groups (`/proc/<pid>/stat`,
children included) divided by OK requests; "machine busy" is the share of all cores busy during the run (every
process, other sessions' too). Nothing is pinned. Medians of `--runs`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from loadgen import chat_body, run_load  # noqa: E402

from scillm_core.testing.services import Nginx, RedisServer, ScillmProcess, free_port, nginx_example  # noqa: E402

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


def pid_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / TICKS


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def wrk(url: str, body: bytes, headers: dict[str, str], concurrency: int, duration: float, work: Path
        ) -> dict[str, float]:
    script = work / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.body = ' + _lua(body.decode()) + "\n" + "".join(
        f"wrk.headers[{_lua(k)}] = {_lua(v)}\n" for k, v in headers.items()))
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{duration:g}s", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    total = int(re.search(r"(\d+) requests in ([\d.]+)s", out).group(1))  # type: ignore[union-attr]
    seconds = float(re.search(r"requests in ([\d.]+)s", out).group(1))  # type: ignore[union-attr]
    bad = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    bad += sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return {"ok": total - bad, "rps": (total - bad) / seconds, "errors": bad}


def _lua(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def redis_counts(url: str | None) -> tuple[dict[str, int], dict[str, int], float]:
    """Redis's calls and µs per command so far and its CPU seconds (``INFO commandstats``, ``INFO cpu``; commands a
    script runs count on their own and in the script's time)."""
    if url is None:
        return {}, {}, 0.0
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
        cpu = client.info("cpu")
    finally:
        client.close()
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    usec = {name.removeprefix("cmdstat_"): int(v["usec"]) for name, v in stats.items()}
    return calls, usec, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def measure(url: str, groups: list[int], duration: float, load: str, work: Path,
            redis_url: str | None = None, others: dict[str, Callable[[], float]] | None = None) -> dict[str, Any]:
    """``others``: the CPU seconds so far of the processes around scillm (the load balancer, the upstream, Redis),
    reported per request next to the load generator's."""
    import orjson

    body = orjson.dumps(chat_body("openai/gpt-4o-mini", False))
    headers = {"Authorization": "Bearer sk-dev-proxy-123", "Content-Type": "application/json"}
    target = url + "/v1/chat/completions"

    def drive(concurrency: int, seconds: float) -> dict[str, float]:
        if load == "wrk":
            return wrk(target, body, headers, concurrency, seconds, work)
        return asyncio.run(run_load(target, headers, body, concurrency=concurrency, duration=seconds))

    drive(16, 1.0)  # warm-up
    calls0, usec0, redis_cpu0 = redis_counts(redis_url)
    others = {**(others or {}), "load generator": lambda: sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])}
    others0 = {name: cpu_s() for name, cpu_s in others.items()}
    before, (busy0, total0) = sum(group_cpu_s(g) for g in groups), machine_ticks()
    result = drive(64, duration)
    cpu = sum(group_cpu_s(g) for g in groups) - before
    busy1, total1 = machine_ticks()
    others1 = {name: cpu_s() for name, cpu_s in others.items()}
    calls1, usec1, redis_cpu1 = redis_counts(redis_url)
    ok = max(result["ok"], 1)
    per_request = {name: (n - calls0.get(name, 0)) / ok for name, n in calls1.items()
                   if name not in ("info",) and n > calls0.get(name, 0)}
    usec = {name: (n - usec0.get(name, 0)) / ok for name, n in usec1.items() if name in per_request}
    return {"rps": result["rps"], "cpu_us": cpu / ok * 1e6, "errors": result["errors"],
            "scillm_cores": cpu / duration, "machine_busy": (busy1 - busy0) / max(total1 - total0, 1),
            "redis_calls": per_request, "redis_usec": usec, "redis_cpu_us": (redis_cpu1 - redis_cpu0) / ok * 1e6,
            "others_us": {name: (others1[name] - others0[name]) / ok * 1e6 for name in others}}


MOCK_REPLY = ('{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini",'
              '"choices":[{"index":0,"message":{"role":"assistant","content":"It is sunny in San Francisco."},'
              '"finish_reason":"stop"}],"usage":{"prompt_tokens":14,"completion_tokens":8,"total_tokens":22}}')


def start_mock(kind: str, work: Path) -> tuple[int, Any]:
    port = free_port()
    if kind == "nginx":
        block = (f"server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000; location / {{ "
                 f"default_type application/json; return 200 '{MOCK_REPLY}'; }} }}")
        return port, Nginx(work / "mock-nginx", block, port).start()
    mock = subprocess.Popen([sys.executable, str(HERE / "mock.py"), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return port, mock


def global_waits(url: str) -> int:
    """How often this instance's callers found every global slot of a provider taken (Redis backend; under
    ``--workers`` whichever worker answers)."""
    import httpx

    health = httpx.get(url + "/v1/scillm/health", headers={"Authorization": "Bearer sk-dev-proxy-123"}, timeout=10)
    shared = health.json().get("middleware", {}).get("resilience", {}).get("shared_across_instances") or {}
    return int(shared.get("global_waits", 0))


def service_cpu(service: Any) -> Callable[[], float]:
    """CPU seconds so far of a started service (an nginx's whole process group, a plain process otherwise)."""
    process = getattr(service, "process", service)
    if getattr(service, "group", False):
        return lambda: group_cpu_s(process.pid)
    return lambda: pid_cpu_s(process.pid)


def stop_mock(mock: Any) -> None:
    if isinstance(mock, Nginx):
        mock.stop()
    else:
        mock.send_signal(signal.SIGTERM)
        mock.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--load", choices=("wrk", "python"), default="wrk" if shutil.which("wrk") else "python")
    ap.add_argument("--mock", choices=("nginx", "python"), default="nginx")
    ap.add_argument("--setups", default="one process,one process, Redis,--workers 2,2 instances + nginx (Redis)",
                    help="comma list (names as printed); 'one process' is the base and always runs")
    args = ap.parse_args()
    known = ("one process", "one process, Redis", "--workers 2", "2 instances + nginx (Redis)", "--workers 2, Redis")
    chosen = ["one process", *(n for n in known[1:] if n in args.setups)]
    work = Path(tempfile.mkdtemp(prefix="scillm-scale-bench-"))
    mock_port, mock = start_mock(args.mock, work)
    env = {"OPENAI_API_KEY": "sk-bench", "OPENAI_API_BASE": f"http://127.0.0.1:{mock_port}/v1",
           "SCILLM_DISABLE_PLUGINS": ""}
    redis = RedisServer(work / "redis").start()
    state = {"backend": "redis", "redis_url": redis.url}
    rows: dict[str, list[dict[str, Any]]] = {}
    try:
        for _ in range(args.runs):
            for name in chosen:
                config = {"state": state} if "Redis" in name else {}
                servers = []
                nginx = None
                try:
                    if name.startswith("2 instances"):
                        servers = [ScillmProcess(work / f"{name}-{i}", env=env, config=config).start() for i in (0, 1)]
                        listen = free_port()  # the load balancer of docs/deployment.md, as documented
                        block = nginx_example((ROOT / "docs" / "deployment.md").read_text(),
                                              [s.port for s in servers], listen)
                        nginx = Nginx(work / "nginx", block, listen).start()
                        url = nginx.url
                    else:
                        workers = 2 if "workers" in name else 1
                        servers = [ScillmProcess(work / name, env=env, config=config, workers=workers).start()]
                        url = servers[0].url
                    groups = [s.process.pid for s in servers if s.process is not None]
                    others = {"upstream": service_cpu(mock)}
                    if nginx is not None:
                        others["load balancer"] = service_cpu(nginx)
                    if "Redis" in name:
                        others["Redis"] = service_cpu(redis)
                    row = measure(url, groups, args.duration, args.load, work, redis.url if "Redis" in name else None,
                                  others)
                    row["global_waits"] = sum(global_waits(s.url) for s in servers)
                    rows.setdefault(name, []).append(row)
                finally:
                    if nginx is not None:
                        nginx.stop()
                    for server in servers:
                        server.stop()
    finally:
        redis.stop()
        stop_mock(mock)
    base = statistics.median(r["rps"] for r in rows["one process"])
    base_cpu = statistics.median(r["cpu_us"] for r in rows["one process"])
    print(f"load {args.load}, mock {args.mock}, c=64, {args.duration:g} s per run, medians of {args.runs}")
    best = max(r["rps"] for r in rows["one process"])
    per_core = statistics.median(r["rps"] / max(r["scillm_cores"], 1e-9) for r in rows["one process"])
    print("| setup | req/s | vs one process | per round (median) | best run req/s | vs one process's best | "
          "scillm CPU µs/req | vs one process | cores used by scillm | req/s per scillm core | vs one process | "
          "machine busy | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, runs in rows.items():
        rps = statistics.median(r["rps"] for r in runs)
        top = max(r["rps"] for r in runs)
        cpu = statistics.median(r["cpu_us"] for r in runs)
        cores = statistics.median(r["scillm_cores"] for r in runs)
        core_rps = statistics.median(r["rps"] / max(r["scillm_cores"], 1e-9) for r in runs)
        busy = statistics.median(r["machine_busy"] for r in runs)
        # run k of this setup ÷ run k of one process: the two ran within a minute, so a slow phase of the host (that
        # moves every setup alike) cancels out
        paired = statistics.median(r["rps"] / b["rps"] for r, b in zip(runs, rows["one process"], strict=True))
        print(f"| {name} | {rps:.0f} | {rps / base:.2f}x | {paired:.2f}x | {top:.0f} | {top / best:.2f}x | {cpu:.0f} | "
              f"{cpu / base_cpu:.2f}x | {cores:.2f} | {core_rps:.0f} | {core_rps / per_core:.2f}x | {busy:.0%} | "
              f"{sum(r['errors'] for r in runs)} |")
        print("  per run req/s: " + ", ".join(f"{r['rps']:.0f}" for r in runs) + "; machine busy: "
              + ", ".join(f"{r['machine_busy']:.0%}" for r in runs), file=sys.stderr)
        around = {n: statistics.median(r["others_us"][n] for r in runs) for n in runs[0]["others_us"]}
        print("  CPU µs/req around scillm (median): " + ", ".join(f"{n} {v:.0f}" for n, v in around.items())
              + f"; total {sum(around.values()):.0f}", file=sys.stderr)
        if runs[0]["redis_calls"]:
            calls = {c: statistics.median(r["redis_calls"].get(c, 0.0) for r in runs)
                     for c in sorted({c for r in runs for c in r["redis_calls"]})}
            print(f"  Redis commands per request (median): {sum(calls.values()):.3f} ("
                  + ", ".join(f"{c} {n:.3f}" for c, n in calls.items() if n >= 0.001)
                  + f"); Redis CPU {statistics.median(r['redis_cpu_us'] for r in runs):.0f} µs/req, of which in "
                  + "commands: " + ", ".join(f"{c} {u:.1f}" for c in calls if (u := statistics.median(
                      r["redis_usec"].get(c, 0.0) for r in runs)) >= 0.05)
                  + " µs; waits for a global "
                  + "slot per run: " + ", ".join(str(r["global_waits"]) for r in runs), file=sys.stderr)


if __name__ == "__main__":
    main()
