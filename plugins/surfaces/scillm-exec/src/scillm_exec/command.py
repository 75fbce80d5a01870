"""``scillm exec PROFILE --prompt ... --cwd ... --sandbox ...``: a client of a running scillm server.

It posts to ``POST /v1/scillm/exec`` with ``wait: true`` (so the run gets the server's routing, per-run key and
artifacts) and prints the result JSON; exit status 0 when the run completed, 1 otherwise, 2 for a refused request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import httpx

DEV_KEY = "sk-dev-proxy-123"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profile", help="codex-exec, opencode-run, pi, claude-print, llm-call, ...")
    parser.add_argument("--prompt", help="the task (default: read from stdin)")
    parser.add_argument("--cwd", default=os.getcwd(), help="working directory (must be under exec.allowed_roots)")
    parser.add_argument("--sandbox", choices=["read-only", "workspace-write"], default="read-only")
    parser.add_argument("--model", help="the scillm model the CLI should use")
    parser.add_argument("--timeout", type=float, dest="timeout_s", help="wall-clock limit in seconds")
    parser.add_argument("--idle-timeout", type=float, dest="idle_timeout_s", help="limit on seconds without output")
    parser.add_argument("--output-schema", help="path to a JSON Schema the final answer must match")
    parser.add_argument("--caller", default=os.environ.get("SCILLM_CALLER_SKILL", "scillm-cli"),
                        help="X-Caller-Skill to attribute the run to")
    parser.add_argument("--url", default=os.environ.get("SCILLM_URL", "http://127.0.0.1:4001"))


def run(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    body: dict[str, object] = {"profile": args.profile, "prompt": prompt, "cwd": os.path.abspath(args.cwd),
                               "sandbox": args.sandbox, "wait": True}
    for key in ("model", "timeout_s", "idle_timeout_s"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.output_schema:
        with open(args.output_schema, encoding="utf-8") as fh:
            body["output_schema"] = json.load(fh)
    key = os.environ.get("SCILLM_API_KEY") or os.environ.get("SCILLM_MASTER_KEY") or DEV_KEY
    timeout = float(body.get("timeout_s") or 3600) + 60  # type: ignore[arg-type]
    try:
        response = httpx.post(args.url.rstrip("/") + "/v1/scillm/exec", json=body, timeout=timeout,
                              headers={"authorization": f"Bearer {key}", "x-caller-skill": args.caller})
    except httpx.HTTPError as exc:
        print(f"scillm exec: cannot reach {args.url}: {type(exc).__name__}", file=sys.stderr)
        return 2
    if response.status_code >= 400:
        print(f"scillm exec: HTTP {response.status_code}: {response.text}", file=sys.stderr)
        return 2
    result = response.json()
    print(json.dumps(result, indent=2))
    return 0 if result.get("status") == "completed" else 1
