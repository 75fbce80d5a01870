"""``scillm batch in.jsonl -o out.jsonl``: stream a JSONL file of items through a running scillm server.

The batch id is derived from the input (file content + pool/model) unless given, so running the same command
again after Ctrl-C or a kill resumes: the server returns stored successes without calling the model and reruns
only what failed or never finished. ``out.jsonl`` is rewritten on every run with one line per item.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import orjson

DEFAULT_URL = "http://127.0.0.1:4001"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="JSONL file: one item per line ({item_id, messages|prompt, ...})")
    parser.add_argument("-o", "--output", type=Path, required=True, help="JSONL results, one line per item")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--pool", help="model pool from scillm.toml [pools.NAME]")
    target.add_argument("--model", help="one model for every item")
    parser.add_argument("--concurrency", type=int, default=None, help="max items in flight (single-model batches)")
    parser.add_argument("--batch-id", default=None, help="default: derived from the input, so reruns resume")
    parser.add_argument("--timeout", type=float, default=None, help="overall deadline in seconds")
    parser.add_argument("--url", default=os.environ.get("SCILLM_URL", DEFAULT_URL))
    parser.add_argument("--key", default=os.environ.get("SCILLM_MASTER_KEY") or "sk-dev-proxy-123")
    parser.add_argument("--caller", default=os.environ.get("SCILLM_CALLER_SKILL", "scillm-batch-cli"))


def run(args: argparse.Namespace) -> int:
    import httpx

    raw = args.input.read_bytes()
    items = [orjson.loads(line) for line in raw.splitlines() if line.strip()]
    target = args.pool or args.model
    batch_id = args.batch_id or "cli-" + hashlib.sha256(raw + b"\0" + target.encode()).hexdigest()[:20]
    body: dict[str, Any] = {"batch_id": batch_id, "items": items, "stream": True}
    body["model_pool" if args.pool else "model"] = target
    if args.concurrency:
        body["concurrency"] = args.concurrency
    if args.timeout:
        body["timeout"] = args.timeout
    headers = {"authorization": f"Bearer {args.key}", "x-caller-skill": args.caller}
    bar = ProgressBar(len(items), sys.stderr)
    summary: dict[str, Any] = {}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with args.output.open("wb") as out, httpx.Client(timeout=httpx.Timeout(30.0, read=None)) as client, \
                client.stream("POST", args.url.rstrip("/") + "/v1/scillm/batch/completions", json=body,
                              headers=headers) as response:
            if response.status_code >= 400:
                response.read()
                print(f"scillm batch: HTTP {response.status_code}: {response.text}", file=sys.stderr)
                return 2
            for event, data in _events(response.iter_lines()):
                if event in ("item_completed", "item_failed"):
                    out.write(orjson.dumps(data) + b"\n")
                    out.flush()
                    bar.update(ok=event == "item_completed", resumed=bool(data.get("resumed")))
                elif event == "batch_done":
                    summary = data
                elif event == "error":
                    print(f"\nscillm batch: {data.get('error', {}).get('message')}", file=sys.stderr)
                    return 2
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: {bar.done}/{bar.total} written to {args.output}; run the same command to resume",
              file=sys.stderr)
        return 130
    except httpx.TransportError as exc:
        bar.close()
        print(f"\nscillm batch: cannot reach {args.url} ({type(exc).__name__}); is `scillm serve` running? "
              "Run the same command again to resume.", file=sys.stderr)
        return 2
    bar.close()
    if not summary:
        print("scillm batch: the stream ended before batch_done; run the same command to resume", file=sys.stderr)
        return 2
    print(f"batch {batch_id}: {summary['completed']} ok, {summary['failed']} failed of {summary['total']} "
          f"in {summary['elapsed_s']:.1f}s ({bar.resumed} reused from an earlier run) -> {args.output}",
          file=sys.stderr)
    return 0 if summary["failed"] == 0 else 3


def _events(lines: Any) -> Any:
    event, data = None, []
    for line in lines:
        if not line:
            if data:
                yield event, orjson.loads("\n".join(data))
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


class ProgressBar:
    """``[#######.....]  120/500  ok 118  failed 2  37.5/s  ETA 10s`` on one terminal line."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream = total, stream
        self.done = self.failed = self.resumed = 0
        self.started = time.monotonic()
        self.tty = stream.isatty()
        self.last = 0.0

    def update(self, *, ok: bool, resumed: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        self.resumed += 1 if resumed else 0
        now = time.monotonic()
        step = max(self.total // 10, 1)  # not a terminal (CI, logs): one line per 10% or per 5 s
        quiet = now - self.last < 0.1 if self.tty else (self.done % step and now - self.last < 5.0)
        if quiet and self.done < self.total:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-6)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate else 0.0
        filled = int(30 * self.done / max(self.total, 1))
        line = (f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}  ok {self.done - self.failed}  "
                f"failed {self.failed}  {rate:.1f}/s  ETA {eta:.0f}s")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
