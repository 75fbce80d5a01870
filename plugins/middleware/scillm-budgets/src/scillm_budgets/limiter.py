"""Admission and settlement of one provider call against every budget and limit that applies to it.

Before the call, one group of counter changes reserves what the call may cost at most (its input estimated from
the request, its output from ``max_tokens`` or the model's limit) in each dollar budget of the key, of its team and
of the batch or run, and takes a request, its tokens and a concurrency slot from the per-minute windows and caps.
The store applies the group all-or-nothing: refused, nothing is held and the call never reaches the provider.
After the call the reservation is replaced by the actual cost and the slot returned. Both go through
:mod:`scillm_budgets.leases`, so most calls take their room from what the process holds ahead, without a store
round trip; what a call changes is laid out once per identity and minute (:class:`Layout`), so a call that fits
in that room is a few dictionary updates.

Counters (namespace ``budgets``), dollars in nano-dollars:
``<scope>:<id>:d:<YYYYMMDD>:held`` (settled + reserved) and ``…:spent`` (settled), the same with ``m:<YYYYMM>``,
``<scope>:<id>:rpm:<minute>``, ``…:tpm:<minute>``, ``<scope>:<id>:conc``; scope is ``key`` (the owner: a key id or
``master``), ``team`` or ``batch``/``run`` (``<owner>/<id>``, with no window).
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NamedTuple

from scillm_budgets.pricing import NANO, Price, Tokens
from scillm_core import EmbeddingsRequest, FilePart, ImagePart, Job, OtherPart, TextPart, errors
from scillm_core.state import Count, Counted

if TYPE_CHECKING:
    from scillm_keys import Limits

    from scillm_core import Identity
    from scillm_core.pipeline import ProviderRequest

__all__ = ["Admission", "Layout", "Refused", "Window", "estimate_input_tokens", "explain", "layout", "windows"]

DAY_TTL_S = 3 * 86400
MONTH_TTL_S = 63 * 86400
MINUTE_TTL_S = 120
SLOT_TTL_S = 3600  # a slot nobody touches for an hour is dropped (a crashed process cannot hold one forever)
JOB_TTL_S = 90 * 86400
IMAGE_TOKENS = 1600
PDF_TOKENS = 1500 * 50  # a PDF part of unknown length: reserve for a long one
MESSAGE_OVERHEAD = 8


def estimate_input_tokens(request: ProviderRequest) -> int:
    """An upper estimate of the prompt, for reservations: a token per 3 bytes of UTF-8 text (tokenizers average
    about 4 for English and code and about 3 per CJK character), images and PDFs at a generous flat rate; an
    embeddings request's texts the same way, its token arrays as they are."""
    size = 0
    tokens = 0
    if isinstance(request, EmbeddingsRequest):
        for item in request.inputs:
            if isinstance(item, str):
                size += len(item.encode())
            else:
                tokens += len(item)
        return tokens + math.ceil(size / 3)
    for message in request.messages:
        tokens += MESSAGE_OVERHEAD
        content = message.content
        if isinstance(content, str):
            size += len(content.encode())
        elif content:
            for part in content:
                if isinstance(part, TextPart):
                    size += len(part.text.encode())
                elif isinstance(part, ImagePart):
                    tokens += IMAGE_TOKENS
                elif isinstance(part, FilePart):
                    tokens += PDF_TOKENS
                elif isinstance(part, OtherPart):
                    size += len(repr(part.data))
        for call in message.tool_calls or ():
            size += len(call.function.name) + len(call.function.arguments.encode())
    for tool in request.tools or ():
        size += len(repr(tool))
    return tokens + math.ceil(size / 3)


class Window(NamedTuple):
    """One dollar window: ``label`` ("daily"), its counter stem and when it resets."""

    label: str
    stem: str
    ttl_s: float
    resets_at: float


def windows(now: float) -> tuple[Window, Window]:
    """Today's and this month's window (UTC); computed once a minute (a pure function of the minute)."""
    global _last
    minute = int(now // 60)
    last = _last
    if last is None or last[0] != minute:
        last = _last = (minute, _compute_windows(now))
    return last[1]


_last: tuple[int, tuple[Window, Window]] | None = None


def _compute_windows(now: float) -> tuple[Window, Window]:
    day = datetime.fromtimestamp(now, UTC)
    next_day = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() + 86400
    next_month = datetime(day.year + day.month // 12, day.month % 12 + 1, 1, tzinfo=UTC).timestamp()
    return (Window("daily", f"d:{day:%Y%m%d}", DAY_TTL_S, next_day),
            Window("monthly", f"m:{day:%Y%m}", MONTH_TTL_S, next_month))


class Check(NamedTuple):
    """What one reserving change in the admission group stands for, to explain a refusal."""

    kind: str          # "usd", "rpm", "tpm", "concurrency"
    scope: str         # "key", "team", "batch", "run"
    who: str           # the key's name, the team, the batch or run id
    limit: float       # in the counter's unit
    window: Window | None = None
    spent_key: str | None = None  # the counter of this budget's settled spend (read to explain a refusal)


class Refused(NamedTuple):
    """The first limit a refused group would pass: the check, this call's change and the counter's value."""

    check: Check
    delta: float
    current: float


class Admission:
    """A call's place in its limits: the amount it takes from each counter of its layout now, and what it gives back
    or settles after the call. The :class:`Count` group is built only when the store has to be asked."""

    __slots__ = ("amounts", "layout", "reserve_nano", "reserve_tokens")

    def __init__(self, layout: Layout, reserve_nano: int, reserve_tokens: int) -> None:
        self.layout = layout
        self.reserve_nano = reserve_nano
        self.reserve_tokens = reserve_tokens
        by_unit = (reserve_nano, reserve_tokens, 1)
        self.amounts = [by_unit[unit] for unit in layout.units]

    @property
    def limited(self) -> bool:
        return bool(self.layout.checks)

    @property
    def group(self) -> list[Count]:
        layout = self.layout
        return [Count(key, amount, limit, ttl) for key, amount, limit, ttl
                in zip(layout.keys, self.amounts, layout.limits, layout.ttls, strict=True)]

    def refused(self, group: list[Count], outcome: Counted) -> Refused:
        """The first limit the refused ``group`` would pass, with the call's whole amount for it."""
        amounts = dict(zip(self.layout.keys, self.amounts, strict=True))
        for change, current in zip(group, outcome.values, strict=True):
            check = self.layout.checks.get(change.key)
            if check is not None and current + change.delta > check.limit:
                return Refused(check, amounts.get(change.key, change.delta), current)
        raise AssertionError("a refused group passes one of its limits")


def explain(refused: Refused, spent: float, now: float) -> errors.LimitExceeded:
    """The 429 for a refusal, with when trying again can succeed; ``spent`` is the budget's settled spend."""
    check, delta, current = refused
    if check.kind == "concurrency":
        return errors.RateLimited(f"rate limited: {check.scope} {check.who!r} allows {int(check.limit)} "
                                  "concurrent calls and has that many in flight", retry_after_s=1)
    if check.kind in ("rpm", "tpm"):
        unit = "requests" if check.kind == "rpm" else "tokens"
        return errors.RateLimited(
            f"rate limited: {check.scope} {check.who!r} allows {int(check.limit)} {unit} per minute "
            f"(this call needs {int(delta)}; {int(current)} used this minute)",
            retry_after_s=max(1.0, 60 - now % 60))
    window = check.window
    what = f"{window.label} budget" if window else "max_cost_usd"
    message = (f"budget exceeded: {check.scope} {check.who!r} has spent ${spent / NANO:.6f} of its "
               f"${check.limit / NANO:.6f} {what} (${max(0, current - spent) / NANO:.6f} more reserved by "
               f"calls in flight); this call may cost up to ${delta / NANO:.6f}")
    if spent + delta <= check.limit:  # calls in flight hold the room: it may free up in a moment
        return errors.BudgetExceeded(message + "; retry when calls in flight finish", retry_after_s=1)
    if delta > check.limit:
        return errors.BudgetExceeded(message + "; lower max_tokens or raise the budget")
    if window is None:
        return errors.BudgetExceeded(message)
    return errors.BudgetExceeded(f"{message}; it resets at {_iso(window.resets_at)}",
                                 retry_after_s=window.resets_at - now)


USD, TOKENS, ONE = 0, 1, 2  # what a change takes: the reservation, the reserved tokens, one (a request, a slot)


class Layout(NamedTuple):
    """The counters an identity's calls change in one minute, computed once (callers cache it): per change its key,
    unit, limit and ttl (parallel tuples, so an admission is one list of amounts); what each limited change checks;
    and what settles, each counter with its ttl: dollars held, tokens taken, slots, settled spend."""

    keys: tuple[str, ...]
    units: tuple[int, ...]
    limits: tuple[float | None, ...]
    ttls: tuple[float | None, ...]
    checks: dict[str, Check]
    held: tuple[tuple[str, float | None], ...]
    spent: tuple[tuple[str, float | None], ...]
    tpm: tuple[tuple[str, float | None], ...]
    slots: frozenset[str]
    freed: tuple[tuple[str, float | None], ...]  # the slots with their ttl, as a settled call gives them back
    dollars: bool      # the key or its team has a dollar budget: calls need a price and a reservation
    tokens: bool       # a tokens-per-minute limit applies: calls need a token estimate

    def with_job(self, job: Job) -> Layout:
        """This layout plus the batch's or run's ``max_cost_usd`` ceiling (per call: the job's own counters)."""
        assert job.max_cost_usd is not None
        stem = f"{job.kind}:{job.owner}/{job.id}"
        limit = job.max_cost_usd * NANO
        return self._replace(
            keys=(*self.keys, f"{stem}:held"), units=(*self.units, USD), limits=(*self.limits, limit),
            ttls=(*self.ttls, JOB_TTL_S),
            checks={**self.checks, f"{stem}:held": Check("usd", job.kind, job.id, limit, None, f"{stem}:spent")},
            held=(*self.held, (f"{stem}:held", JOB_TTL_S)), spent=(*self.spent, (f"{stem}:spent", JOB_TTL_S)),
            dollars=True)


def layout(identity: Identity, team_limits: Limits | None, now: float) -> Layout:
    """The counters for calls of ``identity`` (and its team) in the minute of ``now``; the same all minute long, so
    callers cache it. A virtual key's spend is counted per day and month even without a budget (``GET
    /v1/budget``); the master key's only in the ledger."""
    track_spend = not identity.master
    changes: list[tuple[str, int, float | None, float | None]] = []
    checks: dict[str, Check] = {}
    held: list[tuple[str, float | None]] = []
    spent: list[tuple[str, float | None]] = []
    tpm: list[tuple[str, float | None]] = []
    slots: list[str] = []
    minute = int(now // 60)
    day, month = windows(now)
    scopes: list[tuple[str, str, str, Limits | None]] = [("key", identity.owner, identity.name, identity.limits)]
    if identity.team and team_limits is not None:
        scopes.append(("team", identity.team, identity.team, team_limits))

    def add(key: str, unit: int, limit: float | None, ttl: float | None, check: Check) -> None:
        checks[key] = check
        changes.append((key, unit, limit, ttl))

    for scope, ident, who, limits in scopes:
        base = f"{scope}:{ident}"
        for window, limit_usd in ((day, getattr(limits, "daily_usd", None)),
                                  (month, getattr(limits, "monthly_usd", None))):
            stem = f"{base}:{window.stem}"
            if limit_usd is not None:
                add(f"{stem}:held", USD, limit_usd * NANO, window.ttl_s,
                    Check("usd", scope, who, limit_usd * NANO, window, f"{stem}:spent"))
                held.append((f"{stem}:held", window.ttl_s))
                spent.append((f"{stem}:spent", window.ttl_s))
            elif scope == "key" and track_spend:
                spent.append((f"{stem}:spent", window.ttl_s))  # kept per key even without a budget
        if limits is None:
            continue
        if limits.rpm is not None:
            add(f"{base}:rpm:{minute}", ONE, limits.rpm, MINUTE_TTL_S, Check("rpm", scope, who, limits.rpm))
        if limits.tpm is not None:
            add(f"{base}:tpm:{minute}", TOKENS, limits.tpm, MINUTE_TTL_S, Check("tpm", scope, who, limits.tpm))
            tpm.append((f"{base}:tpm:{minute}", MINUTE_TTL_S))
        if limits.max_concurrency is not None:
            add(f"{base}:conc", ONE, limits.max_concurrency, SLOT_TTL_S,
                Check("concurrency", scope, who, limits.max_concurrency))
            slots.append(f"{base}:conc")
    keys, units, limit_of, ttls = (tuple(column) for column in zip(*changes, strict=True)) if changes else ((),) * 4
    return Layout(keys, units, limit_of, ttls, checks, tuple(held), tuple(spent), tuple(tpm), frozenset(slots),
                  tuple((slot, SLOT_TTL_S) for slot in slots), dollars=bool(held), tokens=bool(tpm))


def reservation(price: Price | None, input_tokens: int, output_tokens: int) -> int:
    """The most a call may cost, in nano-dollars: every prompt token at the full input rate, the whole output."""
    if price is None:
        return 0
    return price.nano(Tokens(input=input_tokens, output=output_tokens))


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
