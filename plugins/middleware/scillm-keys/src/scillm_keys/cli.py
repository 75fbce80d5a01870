"""``scillm keys create|list|revoke|rotate``: a client of a running server's ``/v1/scillm/keys`` (master key).

Going through the server keeps one writer of the key store per deployment and lets the server drop a revoked
key from its cache at once. The secret of a new or rotated key is printed once, on its own line, and is not
stored anywhere else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

DEFAULT_URL = "http://127.0.0.1:4001"
DEV_KEY = "sk-dev-proxy-123"
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
LIST_PAGE = 1000  # keys per request of `list`, which follows has_more to the end


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("SCILLM_URL", DEFAULT_URL))
    parser.add_argument("--key", default=None, help="the master key (default: SCILLM_MASTER_KEY, else the dev key)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="keys_command", required=True)
    create = sub.add_parser("create", help="create a key; its secret is printed once")
    create.add_argument("name")
    create.add_argument("--team", help="owner or team tag (team budgets apply)")
    create.add_argument("--models", help="comma-separated models or groups it may use (fnmatch patterns)")
    create.add_argument("--daily-usd", type=float)
    create.add_argument("--monthly-usd", type=float)
    create.add_argument("--rpm", type=int, help="provider calls per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--max-concurrency", type=int, help="provider calls in flight at once")
    create.add_argument("--expires-in", help="e.g. 30d, 12h, 90m")
    sub.add_parser("list", help="list keys (by prefix; never their secrets)")
    for name, text in (("revoke", "revoke a key: refused from its next request on"),
                       ("rotate", "give a key a new secret (the old one stops working); ownership and spend stay")):
        sub.add_parser(name, help=text).add_argument("key_id")


def _duration(text: str) -> float:
    unit = DURATION_UNITS.get(text[-1:])
    try:
        return float(text[:-1]) * unit if unit else float(text)
    except ValueError:
        raise SystemExit(f"scillm keys: --expires-in takes a duration such as 30d, 12h or 3600, not {text!r}") from None


def run(args: argparse.Namespace) -> int:
    import httpx

    key = args.key or os.environ.get("SCILLM_MASTER_KEY") or DEV_KEY
    sent = ("the key given with --key" if args.key else "SCILLM_MASTER_KEY" if key != DEV_KEY else
            f"the dev key {DEV_KEY}, as SCILLM_MASTER_KEY is not set here")
    base = args.url.rstrip("/") + "/v1/scillm/keys"
    command = args.keys_command
    body: dict[str, Any] | None = None
    if command == "create":
        limits = {name: getattr(args, name) for name in ("daily_usd", "monthly_usd", "rpm", "tpm", "max_concurrency")
                  if getattr(args, name) is not None}
        body = {"name": args.name, "team": args.team, "limits": limits}
        if args.models:
            body["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
        if args.expires_in:
            body["expires_in_s"] = _duration(args.expires_in)
        method, url = "POST", base
    elif command == "list":
        method, url = "GET", base
    elif command == "revoke":
        method, url = "DELETE", f"{base}/{args.key_id}"
    else:
        method, url = "POST", f"{base}/{args.key_id}/rotate"
    pages: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": LIST_PAGE} if command == "list" else {}
    while True:
        try:
            response = httpx.request(method, url, json=body, params=params,
                                     headers={"authorization": f"Bearer {key}"}, timeout=30)
        except httpx.HTTPError as exc:
            print(f"scillm keys: cannot reach {args.url} ({type(exc).__name__}); is `scillm serve` running?",
                  file=sys.stderr)
            return 2
        data = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        if response.status_code >= 400:
            message = (data.get("error") or {}).get("message") if isinstance(data, dict) else None
            hint = (f" (sent {sent}; `scillm keys` needs the server's master key: set SCILLM_MASTER_KEY or pass "
                    "--key)") if response.status_code == 401 else ""
            print(f"scillm keys: HTTP {response.status_code}: {message or response.text[:300]}{hint}",
                  file=sys.stderr)
            return 1
        pages.append(data)
        if command != "list" or not data.get("has_more"):
            break
        params = {"limit": LIST_PAGE, "after": data["last_id"]}
    if command == "list":  # every page as one list
        data = {"object": "list", "data": [doc for page in pages for doc in page["data"]], "has_more": False}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    if command == "list":
        for doc in data["data"]:
            limits = ", ".join(f"{k}={v}" for k, v in (doc.get("limits") or {}).items()) or "no limits"
            print(f"{doc['id']}  {doc['status']:<8} {doc['prefix']}…  {doc['name']}"
                  f"{' (team ' + doc['team'] + ')' if doc.get('team') else ''}  {limits}"
                  f"{'  models: ' + ','.join(doc['models']) if doc.get('models') else ''}")
        return 0
    print(f"{data['id']}  {data['status']}  {data['name']}")
    if "key" in data:
        print("secret (shown once, store it now):", file=sys.stderr)
        print(data["key"])
    return 0
