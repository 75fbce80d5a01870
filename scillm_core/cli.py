"""The ``scillm`` command: serve, plugins, models, doctor, plus whatever plugins register."""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from scillm_core.config import ConfigError
from scillm_core.plugins import PluginLoadError
from scillm_core.version import __version__

__all__ = ["main"]

DEV_KEY = "sk-dev-proxy-123"


def main(argv: Sequence[str] | None = None) -> int:
    from scillm_core.plugins import build_plugin_manager
    from scillm_core.registry import CommandRegistry

    parser = argparse.ArgumentParser(prog="scillm", description="One endpoint for every LLM call.")
    parser.add_argument("--version", action="version", version=f"scillm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 4001)")
    serve.add_argument("--config", default=None, help="scillm.toml path (or SCILLM_CONFIG)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes")
    serve.add_argument("--log-level", default="info")
    for name, help_text in (("plugins", "list plugins, their hooks and load failures"),
                            ("models", "list routable models"),
                            ("doctor", "preflight: credentials, reachability, logins, agent CLIs")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=None)
        p.add_argument("--json", action="store_true", help="machine-readable output")

    commands = CommandRegistry()
    try:
        disabled = os.environ.get("SCILLM_DISABLE_PLUGINS", "").split(",")
        pm, _ = build_plugin_manager(disabled=disabled)
        pm.hook.scillm_register_commands(commands=commands)
    except PluginLoadError as exc:
        print(f"scillm: {exc}", file=sys.stderr)
        return 2
    for command in commands.commands.values():
        command.configure(sub.add_parser(command.name, help=command.help))

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command in ("plugins", "models", "doctor"):
            return asyncio.run(_report(args.command, args))
        return commands.commands[args.command].run(args)
    except (ConfigError, PluginLoadError) as exc:
        print(f"scillm: {exc}", file=sys.stderr)
        return 2


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from scillm_core.config import load_config
    from scillm_core.protocol import LISTENER
    from scillm_core.redact import RedactingFilter

    config = load_config(args.config)
    host = args.host or config.tables.get("server", {}).get("host", "127.0.0.1")
    port = args.port or config.tables.get("server", {}).get("port", 4001)
    if not config.env.get("SCILLM_MASTER_KEY") and not _is_loopback(host):
        print(f"scillm: refusing to bind {host}: SCILLM_MASTER_KEY is not set, and the dev key "
              f"({DEV_KEY}) is only allowed on loopback. Set SCILLM_MASTER_KEY or bind 127.0.0.1.", file=sys.stderr)
        return 2
    if args.config:
        os.environ["SCILLM_CONFIG"] = args.config
    # Build once in this process so a bad config or plugin fails here with a clear message, before binding.
    from scillm_core.app import create_app

    app = create_app(config)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    if args.log_level.lower() != "debug":  # one line per upstream request is debug detail, not an info event
        logging.getLogger("httpx").setLevel(logging.WARNING)
    # log_config=None: uvicorn's loggers propagate to the root handler above, so its records are redacted too
    options: dict[str, Any] = {"host": host, "port": port, "log_level": args.log_level, "access_log": False,
                               "log_config": None, **LISTENER, "loop": "uvloop", "timeout_keep_alive": 30,
                               "timeout_graceful_shutdown": 10}
    if args.workers > 1:
        from scillm_core import workers

        runtime = app.runtime  # type: ignore[attr-defined]
        print(workers.workers_notice(runtime, args.workers), file=sys.stderr, flush=True)
        share = workers.create_share(config.data_dir, port)  # the workers split connections evenly through it
        try:
            uvicorn.run("scillm_core.workers:worker_app", factory=True, workers=args.workers,
                        **{**options, "loop": "scillm_core.workers:BalancedLoop"})
        finally:
            os.unlink(share)
    else:
        tune_gc()
        uvicorn.run(app, **options)
    return 0


def tune_gc() -> None:
    """For a long-running server: take everything loaded at start-up out of the collector's sight and collect the
    young generation less often. With CPython's defaults a chat request spent about 7% of its CPU in the garbage
    collector (bench/README.md), most of it re-scanning live objects of the requests in flight. The young count is
    objects allocated minus freed, so the requests in flight alone hold it up: at 64 of them, a virtual key with
    every limit (~150 live objects each) kept passing 10,000 and collected 12 times per 1,000 requests with nothing
    to free (upstream replies leave no reference cycles: ``scillm_core.http``); 50,000 leaves that headroom."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


async def _report(command: str, args: argparse.Namespace) -> int:
    from scillm_core.app import create_app
    from scillm_core.builtin.routing import model_catalog
    from scillm_core.http import make_http_client

    app = create_app(config_path=args.config)
    runtime = app.runtime  # type: ignore[attr-defined]
    if command == "plugins":
        rows: Any = [info.as_dict() for info in runtime.plugins]
        if not args.json:
            for row in rows:
                extra = f"  ({row['reason']})" if row["reason"] else ""
                print(f"{row['name']:<28} {row['status']:<9} {row['distribution'] or '-'} "
                      f"{row['version'] or ''}{extra}\n    hooks: {', '.join(row['hooks']) or '-'}")
            return 0
    elif command == "models":
        rows = model_catalog(runtime)  # the same list as GET /v1/models (usable) + "unavailable"
        if not args.json:
            usable = [m["id"] for m in rows if m["usable"]]
            print("Usable now:\n  " + ("\n  ".join(usable) if usable else "none (no provider has a key or login)"))
            waiting: dict[str, list[str]] = {}
            for m in rows:
                if not m["usable"]:
                    waiting.setdefault(m["missing"], []).append(m["id"])
            if waiting:
                print("\nNot usable until configured (GET /v1/models lists them under \"unavailable\"):")
                for missing, names in waiting.items():
                    print(f"  {missing}:\n    {', '.join(names)}")
            print("\nAlso routable by pattern: " + ", ".join(
                sorted({prefix + "<model>" for p in runtime.providers.values() for prefix in p.prefixes})))
            return 0
    else:
        runtime.http = make_http_client(runtime.config.env, limits=runtime.config.server.reply_limits())
        try:
            rows = await _doctor(runtime)
        finally:
            await runtime.http.aclose()
            if runtime._store is not None:  # a check that read the state store opened it
                await runtime._store.close()
        status = doctor_status(rows)
        if not args.json:
            for row in rows:
                print(f"[{_MARKS[_mark(row)]}] {row['check']}: {row['detail']}")
            print(status["summary"])
        else:
            print(json.dumps(rows, indent=2))
        return int(status["exit_code"])
    print(json.dumps(rows, indent=2))
    return 0


_MARKS = {"ok": "ok  ", "fail": "FAIL", "info": "--  "}


def _mark(row: dict[str, Any]) -> str:
    """``ok`` only when the check passed; ``fail`` when it failed and matters (``required``, or a configured
    provider that cannot be used); ``info`` for what is merely not set up (an optional login, an unset key)."""
    if row.get("ok") is True:
        return "ok"
    return "fail" if row.get("required") else "info"


def doctor_status(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Exit code 0 only when at least one provider is usable and no required check failed."""
    usable = sorted(row["provider"] for row in rows if row.get("usable"))
    failed = [row["check"] for row in rows if _mark(row) == "fail"]
    if not usable:
        summary = ("FAIL: no provider is usable: set a key (e.g. DEEPSEEK_API_KEY) or log in (claude, codex), "
                   "then run scillm doctor again")
    elif failed:
        summary = f"FAIL: {', '.join(failed)}; usable providers: {', '.join(usable)}"
    else:
        summary = f"ok: usable providers: {', '.join(usable)}"
    return {"exit_code": 0 if usable and not failed else 1, "summary": summary}


async def _doctor(runtime: Any) -> list[dict[str, Any]]:
    """A row per provider (configured? its probe answered?), then the plugins' checks. A provider row carries
    ``usable``: configured, and its probe (when it has one) answered 2xx with the credentials."""
    import httpx

    from scillm_core.builtin.routing import shadowed_groups

    checks: list[dict[str, Any]] = []
    for provider in runtime.providers.values():
        missing = provider.missing_config()
        row: dict[str, Any] = {"check": f"provider {provider.name}", "provider": provider.name,
                               "ok": missing is None, "usable": missing is None,
                               "detail": "configured" if missing is None else f"not configured: {missing}"}
        checks.append(row)
        probe = provider.probe() if missing is None else None
        if probe is None:
            continue
        url, headers = probe
        reach: dict[str, Any] = {"check": f"reach {provider.name}", "ok": False}
        try:
            response = await runtime.http.get(url, headers=headers, timeout=httpx.Timeout(5.0))
        except httpx.HTTPError as exc:
            reach.update(detail=f"{url} unreachable ({type(exc).__name__})", required=provider.probe_required)
        else:
            code = response.status_code
            if 200 <= code < 300:
                reach.update(ok=True, detail=f"{url} answered HTTP {code}: credentials accepted")
            elif code in (401, 403):
                reach.update(detail=f"{url} answered HTTP {code}: the credentials were refused", required=True)
            else:
                reach.update(detail=f"{url} answered HTTP {code}: reachable, credentials not confirmed")
        row["usable"] = reach["ok"]
        checks.append(reach)
    for group, alias in shadowed_groups(runtime).items():
        checks.append({"check": f"group {group}", "ok": False, "required": True,
                       "detail": f"never used: the alias of the same name wins ({alias}); rename the group or "
                                 f"point an alias at it"})
    checks.extend(await runtime.hooks.doctor_checks(runtime))
    return checks


if __name__ == "__main__":
    raise SystemExit(main())
