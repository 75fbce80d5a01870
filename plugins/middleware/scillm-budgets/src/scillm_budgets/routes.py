"""``GET /v1/scillm/spend`` (the ledger summed over a window, grouped by one field) and ``GET /v1/budget`` (the
calling key's budgets: limit, spent, remaining, reset). A virtual key only ever sees its own spend."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from scillm_budgets.ledger import Sum
from scillm_budgets.limiter import windows
from scillm_budgets.pricing import NANO
from scillm_core import errors, identity_of, json_response, runtime_of
from scillm_core.state import Count

if TYPE_CHECKING:
    from scillm_budgets import BudgetsState

__all__ = ["LEDGER", "routes"]

LEDGER = "spend"
#: query name -> ledger field; each may filter (``?model=...``) or group (``?group_by=model``)
FIELDS = {"key": "owner", "team": "team", "caller": "caller", "model": "model", "provider": "provider",
          "served_model": "served_model", "batch": "batch", "run": "run"}
MAX_ROWS = 200_000
SLACK_S = 60.0
_WINDOW = re.compile(r"^(\d{1,6})([mhd])$")
_UNITS = {"m": 60, "h": 3600, "d": 86400}


def _state(request: Request) -> BudgetsState:
    return runtime_of(request).plugin_state["budgets"]  # type: ignore[no-any-return]


def _instant(raw: str, name: str) -> float:
    try:
        if re.fullmatch(r"\d{1,12}(\.\d+)?", raw):
            return float(raw)
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00")) if len(raw) <= 40 else None
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise errors.InvalidRequest(f"{name} must be Unix seconds or ISO 8601 with a zone (2026-11-24T00:00:00Z) "
                                    f"@ query.{name}", param=name)
    return moment.timestamp()


def _window(query: Mapping[str, str]) -> tuple[float, float]:
    now = time.time()
    until = _instant(query["until"], "until") if "until" in query else now
    if "since" in query:
        if "window" in query:
            raise errors.InvalidRequest("give since or window, not both @ query.window", param="window")
        return _instant(query["since"], "since"), until
    match = _WINDOW.match(query.get("window", "24h"))
    if match is None:
        raise errors.InvalidRequest("window must be a number and a unit: 90m, 24h, 30d @ query.window",
                                    param="window")
    return until - int(match.group(1)) * _UNITS[match.group(2)], until


async def spend(request: Request) -> Response:
    state = _state(request)
    query = request.query_params
    unknown = sorted(set(query) - {*FIELDS, "group_by", "since", "until", "window"})
    if unknown:
        raise errors.InvalidRequest(f"unknown parameter {unknown[0][:40]!r} (known: group_by, since, until, window, "
                                    f"{', '.join(FIELDS)}) @ query.{unknown[0][:40]}", param=unknown[0][:40])
    group_by = query.get("group_by", "key")
    if group_by not in FIELDS and group_by != "day":
        raise errors.InvalidRequest(f"group_by must be one of {', '.join([*FIELDS, 'day'])} @ query.group_by",
                                    param="group_by")
    await state.ledger.written()  # the calls summed in memory and queued so far are part of the answer
    since, until = _window(query)
    match: dict[str, str] = {}
    for name, field in FIELDS.items():
        value = query.get(name)
        if value is not None:
            if not value or len(value) > 200:
                raise errors.InvalidRequest(f"{name} must be 1 to 200 characters @ query.{name}", param=name)
            match[field] = value
    identity = identity_of(request)
    if not identity.master:  # a key sees its own spend only: another key's id finds nothing, as if unknown
        if match.setdefault("owner", identity.owner) != identity.owner:
            match["owner"] = "\0none"
    # a record is written up to an interval after its calls (the store's append time) and says when their interval
    # started ("ts"): read with slack on both sides (a slow writer, another host's clock) and select by "ts"
    slack = SLACK_S + state.config.ledger_interval_s
    records = await runtime_of(request).store.tail(LEDGER, MAX_ROWS + 1, since=since - slack, until=until + slack,
                                                   match=match)
    truncated = len(records) > MAX_ROWS
    records = records[-MAX_ROWS:]
    groups: dict[Any, dict[str, Any]] = {}
    total = Sum()
    for record in records:
        ts = record.get("ts")
        if not isinstance(ts, int | float) or not since <= ts < until:
            continue
        if group_by == "day":
            value: Any = time.strftime("%Y-%m-%d", time.gmtime(ts))
        else:
            value = record.get(FIELDS[group_by])
        entry = groups.get(value)
        if entry is None:
            entry = groups[value] = {group_by: value, "sum": Sum()}
            if group_by == "key":
                entry["key_name"] = record.get("key_name")
        entry["sum"].add(record)
        total.add(record)
    rows = sorted(({**{k: v for k, v in e.items() if k != "sum"}, **e["sum"].as_dict()} for e in groups.values()),
                  key=lambda r: (-(r["cost_usd"] or 0), str(r[group_by])))
    return json_response({"object": "spend", "since": since, "until": until, "group_by": group_by,
                          "filters": {name: query[name] for name in FIELDS if name in query},
                          **total.as_dict(), "truncated": truncated, "groups": rows})


async def budget(request: Request) -> Response:
    """The calling key's budgets now. ``limit``/``spent``/``remaining``/``reset_at`` at the top are the budget
    with the least room left (``null`` when the key has none), as the original ``/v1/budget`` answered."""
    state = _state(request)
    identity = identity_of(request)
    now = state.clock()
    scopes: list[tuple[str, str, str, Any]] = [("key", identity.owner, identity.name, identity.limits)]
    team_limits = state.config.teams.get(identity.team) if identity.team else None
    if team_limits is not None:
        scopes.append(("team", identity.team or "", identity.team or "", team_limits))
    reads: list[Count] = []
    minute = int(now // 60)
    for scope, ident, _, _ in scopes:
        base = f"{scope}:{ident}"
        for window in windows(now):
            reads += [Count(f"{base}:{window.stem}:held"), Count(f"{base}:{window.stem}:spent")]
        reads += [Count(f"{base}:rpm:{minute}"), Count(f"{base}:tpm:{minute}"), Count(f"{base}:conc")]
    state.leases.give_back_all()  # room this process holds ahead is not the key's: returned before the read
    values = iter((await state.counters.count(reads)).values)
    budgets: list[dict[str, Any]] = []
    spent_now: dict[str, float] = {}
    rates: dict[str, Any] = {}
    reset_in_s = math.ceil(60 - now % 60)
    for scope, _, who, limits in scopes:
        for window in windows(now):
            held, spent = next(values), next(values)
            if scope == "key":
                spent_now[window.label] = round(spent / NANO, 9)
            limit = getattr(limits, f"{window.label}_usd", None)
            if limit is None:
                continue
            budgets.append({"scope": scope, "name": who, "window": window.label, "limit_usd": limit,
                            "spent_usd": round(spent / NANO, 9), "reserved_usd": round(max(0, held - spent) / NANO, 9),
                            "remaining_usd": round(max(0.0, limit * NANO - held) / NANO, 9),
                            "reset_at": _iso(window.resets_at), "reset_in_s": math.ceil(window.resets_at - now)})
        rpm, tpm, in_flight = next(values), next(values), next(values)
        current = {"rpm": {"limit": getattr(limits, "rpm", None), "used": int(rpm), "reset_in_s": reset_in_s},
                   "tpm": {"limit": getattr(limits, "tpm", None), "used": int(tpm), "reset_in_s": reset_in_s},
                   "max_concurrency": {"limit": getattr(limits, "max_concurrency", None),
                                       "in_flight": int(in_flight)}}
        limited = {name: value for name, value in current.items() if value["limit"] is not None}
        if limited:
            rates[scope] = limited
    tightest = min(budgets, key=lambda b: b["remaining_usd"], default=None)
    return json_response({
        "object": "budget", "key": identity.public(),
        "limit": tightest["limit_usd"] if tightest else None, "spent": tightest["spent_usd"] if tightest else None,
        "remaining": tightest["remaining_usd"] if tightest else None,
        "reset_at": tightest["reset_at"] if tightest else None,
        # a virtual key's spend is counted per day and month; the master key's is in the ledger (/v1/scillm/spend)
        "spent_today_usd": None if identity.master else spent_now.get("daily", 0.0),
        "spent_this_month_usd": None if identity.master else spent_now.get("monthly", 0.0),
        "budgets": budgets, "rate_limits": rates})


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def routes() -> list[tuple[str, Any, list[str]]]:
    return [("/v1/scillm/spend", spend, ["GET"]), ("/v1/budget", budget, ["GET"])]
