"""Hostile load against a real `scillm serve`: peak memory and what a neighbour sees.

    .venv/bin/python bench/hostile.py [--rounds 3] [--n 100] [--scillm .venv/bin/scillm] [--only small_pdf]

Starts `scillm serve` (a subprocess, default config, data in a temp dir) against an in-process fake upstream and
samples the resident memory of the server and of its file workers (its child processes) every 10 ms from /proc.
Scenarios, each reported with the peak RSS of the server alone and of server + workers:

* hostile_files: 8 concurrent callers, each sending `--rounds` hostile files one after another (4 send the PDF
  content-stream bomb, a 9 KB PDF whose 20 pages share a 2 MiB content stream; 4 send the overlapping-entry zip,
  64 entries reading one 1 MiB block), while a neighbour sends a small valid PDF (timeout 20 s) and reads
  `GET /v1/scillm/calls` in a loop: their latencies (median / max) and statuses.
* big_bodies: 3 concurrent 45 MB chat bodies (just under the 48 MiB default), passed upstream.
* huge_replies: 3 concurrent calls whose upstream answers 300 MB (cut at the 32 MiB default, 502).
* huge_batches: 3 concurrent 240 MB batch bodies (refused: 413 past the 32 MiB default).
* small_pdf: `--n` (100) sequential small-PDF requests to a text-only model (PDF text extraction), median
  latency and the server's CPU per request (its file workers included): the request-path cost of the file workers.
* plain_chat, plain_stream: 20 x n / 10 x n chat requests without files, 16 at a time: server CPU per request
  (run with ``--scillm`` of another tree for a ratio).

Figures on a shared machine are noisy; compare medians and ratios.
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
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from scillm_core.testing import DEV_KEY, FakeOpenAI
from scillm_core.testing.files import file_part, make_pdf, overlapping_zip, pdf_bomb

ROOT = Path(__file__).resolve().parents[1]
AUTH = {"authorization": f"Bearer {DEV_KEY}"}
TEXT_MODEL = "deepseek/deepseek-chat"
MIB = 1 << 20


# -- payloads ---------------------------------------------------------------------------------------------------

def small_pdf() -> bytes:
    return make_pdf(["Quarterly revenue rose to 42 million.", "Outlook: stable."])


def file_message(media: str, data: bytes) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": "Summarise."}, file_part(media, data)]}]


# -- the fake upstream: normal answers, or 300 MB produced lazily -------------------------------------------------

class Upstream(FakeOpenAI):
    async def chat(self, request: Request) -> Response:
        if request.headers.get("content-length", "0").isdigit() and int(request.headers["content-length"]) > MIB:
            await request.body()  # a big body: read, not kept
            return Response(b'{"id":"c","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,'
                            b'"finish_reason":"stop","message":{"role":"assistant","content":"ok"}}]}',
                            media_type="application/json")
        raw = await request.body()
        if b"HUGE" not in raw:
            self.requests.clear()
            return await super().chat(request)

        async def huge() -> AsyncIterator[bytes]:
            yield b'{"id":"c","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,' \
                  b'"finish_reason":"stop","message":{"role":"assistant","content":"'
            piece = b"x" * (256 << 10)
            for _ in range(1200):  # 300 MB
                yield piece
                await asyncio.sleep(0)
            yield b'"}}]}'

        return StreamingResponse(huge(), media_type="application/json")

    async def record(self, request: Request) -> Any:
        recorded = await super().record(request)
        self.requests.clear()  # keep the bench process small
        return recorded


# -- the server and its memory ------------------------------------------------------------------------------------

def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def cpu_s(pid: int) -> float:
    """CPU of ``pid`` and its children (live ones, and reaped ones through cutime/cstime)."""
    total = 0.0
    for p in [pid, *children(pid)]:
        try:
            with open(f"/proc/{p}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


class Sampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.server = self.total = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            server = rss_kb(self.pid)
            total = server + sum(rss_kb(c) for c in children(self.pid))
            self.server, self.total = max(self.server, server), max(self.total, total)
            self.stop.wait(0.01)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def start_server(scillm: str, upstream: str, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = 14107
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(work), "SCILLM_DATA_DIR": str(work / "data"),
           "OPENAI_API_KEY": "sk-bench", "OPENAI_API_BASE": upstream, "DEEPSEEK_API_KEY": "sk-bench",
           "DEEPSEEK_API_BASE": upstream}
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen([scillm, "serve", "--port", str(port)], cwd=work, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health/readiness", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"scillm did not get ready; see {work / 'server.log'}")


# -- scenarios ----------------------------------------------------------------------------------------------------

async def hostile_files(url: str, rounds: int) -> dict[str, Any]:
    bomb, overlap, small = pdf_bomb(), overlapping_zip(), small_pdf()
    statuses: dict[str, int] = {}
    neighbour: list[float] = []
    calls: list[float] = []
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=300) as http:
        async def hostile(payload: tuple[str, bytes]) -> None:
            for _ in range(rounds):
                r = await http.post("/v1/chat/completions", json={"model": TEXT_MODEL,
                                                                  "messages": file_message(*payload)})
                key = f"{r.status_code} {r.json().get('error', {}).get('code')}"
                statuses[key] = statuses.get(key, 0) + 1

        callers = [asyncio.ensure_future(hostile(("application/pdf", bomb))) for _ in range(4)]
        callers += [asyncio.ensure_future(hostile(("application/zip", overlap))) for _ in range(4)]
        while not all(c.done() for c in callers):
            t = time.perf_counter()
            r = await http.post("/v1/chat/completions", json={"model": TEXT_MODEL, "timeout": 20,
                                                              "messages": file_message("application/pdf", small)})
            neighbour.append(time.perf_counter() - t)
            key = f"neighbour {r.status_code}"
            statuses[key] = statuses.get(key, 0) + 1
            t = time.perf_counter()
            r = await http.get("/v1/scillm/calls")
            calls.append(time.perf_counter() - t)
            statuses[f"calls {r.status_code}"] = statuses.get(f"calls {r.status_code}", 0) + 1
        await asyncio.gather(*callers)
    return {"statuses": statuses, "neighbour_pdf_s": _spread(neighbour), "calls_s": _spread(calls)}


async def concurrent_posts(url: str, path: str, body: bytes, n: int = 3) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, headers={**AUTH, "content-type": "application/json"},
                                 timeout=300) as http:
        replies = await asyncio.gather(*(http.post(path, content=body) for _ in range(n)),
                                       return_exceptions=True)
    return {"statuses": [r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in replies]}


async def small_pdf_cost(url: str, pid: int, n: int) -> dict[str, Any]:
    body = {"model": TEXT_MODEL, "messages": file_message("application/pdf", small_pdf())}
    latencies = []
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as http:
        await http.post("/v1/chat/completions", json=body)  # warm-up (starts a worker)
        before = cpu_s(pid)
        for _ in range(n):
            t = time.perf_counter()
            r = await http.post("/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
        used = cpu_s(pid) - before
    return {"latency_s": _spread(latencies), "cpu_ms_per_request": round(used / n * 1000, 2)}


async def plain_cost(url: str, pid: int, n: int, stream: bool) -> dict[str, Any]:
    """Chat requests without files, 16 at a time: the server's CPU per request (no file workers involved)."""
    body = {"model": TEXT_MODEL, "stream": stream, "messages": [{"role": "user", "content": "hello there"}]}
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as http:
        async def one() -> None:
            r = await http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text

        await asyncio.gather(*(one() for _ in range(16)))
        before = cpu_s(pid)
        for _ in range(n // 16):
            await asyncio.gather(*(one() for _ in range(16)))
        used = cpu_s(pid) - before
    return {"cpu_us_per_request": round(used / (n // 16 * 16) * 1e6)}


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"median {statistics.median(values):.3f} / max {max(values):.3f} (n={len(values)})"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scillm", default=str(ROOT / ".venv" / "bin" / "scillm"))
    parser.add_argument("--only", default="")
    parser.add_argument("--n", type=int, default=100, help="small_pdf: sequential requests")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    big_chat = (b'{"model": "' + TEXT_MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
                + b"a" * (45 * 1000 * 1000) + b'"}]}')
    huge_batch = b'{"model": "x", "items": [{"prompt": "' + b"a" * (240 * 1000 * 1000) + b'"}]}'
    huge_reply = b'{"model": "' + TEXT_MODEL.encode() + b'", "messages": [{"role": "user", "content": "HUGE"}]}'
    scenarios = {
        "hostile_files": lambda url, pid: hostile_files(url, args.rounds),
        "big_bodies": lambda url, pid: concurrent_posts(url, "/v1/chat/completions", big_chat),
        "huge_replies": lambda url, pid: concurrent_posts(url, "/v1/chat/completions", huge_reply),
        "huge_batches": lambda url, pid: concurrent_posts(url, "/v1/scillm/batch/completions", huge_batch),
        "small_pdf": lambda url, pid: small_pdf_cost(url, pid, args.n),
        "plain_chat": lambda url, pid: plain_cost(url, pid, 20 * args.n, False),
        "plain_stream": lambda url, pid: plain_cost(url, pid, 10 * args.n, True),
    }
    with Upstream() as upstream:
        for name, run in scenarios.items():
            if only and name not in only:
                continue
            with tempfile.TemporaryDirectory(prefix="scillm-hostile-") as tmp:  # a fresh server per scenario
                proc, url = start_server(args.scillm, upstream.base_url, Path(tmp))
                try:
                    httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=30,
                               json={"model": TEXT_MODEL, "messages": [{"role": "user", "content": "warm up"}]})
                    idle = rss_kb(proc.pid)
                    with Sampler(proc.pid) as sampler:
                        started = time.perf_counter()
                        result = asyncio.run(run(url, proc.pid))
                        wall = time.perf_counter() - started
                    after = rss_kb(proc.pid)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            print(f"{name}: server RSS idle {idle / 1024:.0f} MB, peak {sampler.server / 1024:.0f} MB, after "
                  f"{after / 1024:.0f} MB; peak server + file workers {sampler.total / 1024:.0f} MB; {wall:.1f}s; "
                  f"{result}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
