"""Spend in dollars, budgets and per-key limits, around every provider call.

- ``call_provider`` wrapper (``tryfirst``: outside resilience, so one reservation covers a call's retries and
  fallbacks; the cache, also ``tryfirst``, stays outside it so a hit costs nothing and needs no admission): before
  the call, one atomic group of counter changes in the state store reserves the call's most expensive outcome in
  every dollar budget that applies (the key's daily/monthly, its team's, the batch's or run's ``max_cost_usd``)
  and takes a request, tokens and a concurrency slot from the key's and team's per-minute windows and caps. A
  refused group is a 429 ``budget_exceeded`` / ``rate_limited`` with ``retry-after`` and the provider is never
  called. After the call the reservation is replaced by the actual cost, priced from ``prices.toml`` and
  ``[pricing]`` (cache reads and writes at their own rates).
- Every answered call costs something known or ``null`` (no price: never a guess): it is added to the response
  (``x-scillm-cost-usd``), the call log (``cost_usd``), the batch item or run (its :class:`~scillm_core.Job`) and
  the spend ledger (log ``spend``, summed per second and group: :mod:`scillm_budgets.ledger`), which
  ``GET /v1/scillm/spend`` sums by key, team, caller, model, provider, batch or run over a window.
  ``GET /v1/budget`` is the calling key's limits, spend, room and reset times.
- ``preprocess_files`` wrapper: streams that count against a dollar budget ask the upstream for usage
  (``stream_options.include_usage``) so they can be priced; the usage chunk is taken out again for clients that
  did not ask for it. Other streams the client sent in the upstream's own dialect go as sent (a changed request
  would be translated): priced when the upstream reports usage anyway, else their cost is ``null``.

Config ``[budgets]`` (limits of teams under ``[budgets.teams.NAME]``) and ``[pricing."provider/model"]``; see the
plugin README. Fails closed: a store that cannot admit a call refuses it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any, Literal

import attrs
from attrs import define, field, frozen, validators
from scillm_keys import Limits
from scillm_metrics import BoundedLabel
from scillm_metrics.series import Counters, SeriesCollector

from scillm_budgets.leases import Leases
from scillm_budgets.ledger import Ledger
from scillm_budgets.limiter import (
    Admission,
    Layout,
    estimate_input_tokens,
    explain,
    layout,
    reservation,
    windows,
)
from scillm_budgets.pricing import NANO, Price, PriceTable, tokens_of
from scillm_budgets.routes import LEDGER, routes
from scillm_core import ChatChunk, ChatRequest, Route, Runtime, SurfaceRegistry, errors, hookimpl
from scillm_core.pipeline import aclose_quietly
from scillm_core.state import Count
from scillm_core.state.counters import CountBatcher
from scillm_core.state.writer import LogWriter

if TYPE_CHECKING:
    from scillm_core import CallContext, Identity, Usage
    from scillm_core.pipeline import ChatResult, ChatThunk, ProviderRequest, RequestThunk

__all__ = ["BudgetsConfig", "BudgetsState", "Price", "PriceTable"]

ACTIVE = "budgets.active"        # ctx.notes: a call of this request is admitted (fallbacks inside it pass through)
HIDE_USAGE = "budgets.hide_usage"  # ctx.notes: usage was asked for on the client's behalf; keep it from the client
COUNTERS = "budgets"


@frozen(kw_only=True)
class BudgetsConfig:
    enabled: bool = True
    #: A key, team or job with a dollar budget calling a model that has no price: "refuse" (403) or "allow"
    #: (the call is made and costs null; the budget cannot count it).
    unpriced: Literal["refuse", "allow"] = "refuse"
    #: Output tokens reserved when neither the request (max_tokens) nor the price table names a limit.
    default_max_output_tokens: int = field(default=8192, validator=validators.gt(0))
    #: Ask upstreams for usage on streams (hidden again from clients that did not ask), so streams are priced.
    stream_usage: bool = True
    #: The spend ledger (log "spend"): on; its resolution (calls are summed per interval and group: one record each);
    #: and how many records it keeps.
    ledger: bool = True
    ledger_interval_s: int = field(default=1, validator=[validators.ge(1), validators.le(3600)])
    ledger_max_rows: int = field(default=5_000_000, validator=validators.ge(1000))
    #: ``scillm doctor`` warns about budgets used beyond this fraction.
    near_limit: float = field(default=0.8, validator=[validators.gt(0), validators.le(1)])
    #: Budgets and limits of teams (keys carry a team tag), by team name.
    teams: Mapping[str, Limits] = field(factory=dict)


@define
class BudgetsState:
    config: BudgetsConfig
    prices: PriceTable
    counters: CountBatcher
    leases: Leases
    ledger: Ledger
    keys: BoundedLabel
    spend: Counters
    refusals: Counters
    stats: dict[str, int] = field(factory=lambda: {"admitted": 0, "refused": 0, "unpriced_calls": 0})
    clock: Callable[[], float] = time.time  # what "now" is for windows (tests pin it)
    #: by id(identity): (it, minute, its layout, the admission its calls share when they take nothing)
    layouts: dict[int, tuple[Identity, int, Layout, Admission | None]] = field(factory=dict)

    def plan(self, identity: Identity, now: float) -> tuple[Layout, Admission | None]:
        """The layout of ``identity``'s calls in the minute of ``now`` (computed once per identity and minute: a
        cached key's identity is one object until the key changes), and, when they reserve and take nothing (the
        master key), the one admission all of them share."""
        minute = int(now // 60)
        found = self.layouts.get(id(identity))
        if found is not None and found[0] is identity and found[1] == minute:
            return found[2], found[3]
        if len(self.layouts) >= 10_000:
            self.layouts.clear()
        team_limits = self.config.teams.get(identity.team) if identity.team else None
        made = layout(identity, team_limits, now)
        idle = None if made.checks or made.dollars or made.tokens else Admission(made, 0, 0)
        self.layouts[id(identity)] = (identity, minute, made, idle)
        return made, idle

    def layout(self, identity: Identity, now: float) -> Layout:
        return self.plan(identity, now)[0]


def state_of(runtime: Runtime) -> BudgetsState | None:
    return runtime.plugin_state.get("budgets")  # type: ignore[no-any-return]


@hookimpl
def scillm_config_sections() -> Mapping[str, Any]:
    return {"budgets": BudgetsConfig, "pricing": Mapping[str, Price]}


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    config: BudgetsConfig = runtime.config.sections.get("budgets") or BudgetsConfig()
    if not config.enabled:
        return
    counters = CountBatcher(lambda: runtime.store, COUNTERS)
    state = BudgetsState(
        config=config, prices=PriceTable(runtime.config.sections.get("pricing") or {}),
        counters=counters, leases=Leases(counters),
        ledger=Ledger(LogWriter(lambda: runtime.store, LEDGER, backlog=10_000, max_rows=config.ledger_max_rows),
                      interval_s=config.ledger_interval_s),
        keys=BoundedLabel(100),
        spend=Counters("scillm_spend_usd", "Dollars spent on provider calls, by key (owner) and team",
                       ("key", "team")),
        refusals=Counters("scillm_budget_refusals", "Calls refused by a budget or limit before any provider",
                          ("key", "code", "scope")))
    runtime.plugin_state["budgets"] = state
    runtime.metrics.register(SeriesCollector(state.spend, state.refusals))
    for path, endpoint, methods in routes():
        surfaces.route(path, endpoint, methods, plugin="budgets")

    async def stop() -> None:
        state.leases.give_back_all()
        await state.counters.flush()
        await state.ledger.stop()

    surfaces.on_shutdown(stop)


@hookimpl
def scillm_health(runtime: Runtime) -> dict[str, Any]:
    state = state_of(runtime)
    if state is None:
        return {"budgets": {"enabled": False, "fails": "closed"}}
    store = type(runtime.store).__name__
    return {"budgets": {
        "enabled": True, "fails": "closed", "backend": store.removesuffix("Store").lower() or store,
        "priced_models": len(state.prices.prices), "teams": sorted(state.config.teams),
        "unpriced": state.config.unpriced, **state.stats, "counter_round_trips": state.counters.stats["round_trips"],
        "admitted_from_room_ahead": state.leases.stats["from_room"],
        "counter_errors": state.counters.stats["errors"],
        "ledger": {"enabled": state.config.ledger, "groups_summing": len(state.ledger.sums),
                   "backlog": state.ledger.writer.pending, **state.ledger.writer.counts}}}


@hookimpl
def scillm_doctor(runtime: Runtime) -> Any:
    from scillm_budgets.doctor import checks

    state = state_of(runtime)
    if state is None:
        return None
    return lambda: checks(runtime, state)


# -- the pipeline ---------------------------------------------------------------------------------------------------

@hookimpl(wrapper=True)
def preprocess_files(request: ChatRequest, ctx: CallContext) -> Generator[None, Any, Any]:
    """Streams ask for usage so they can be priced (taken out again below for clients that did not ask)."""
    call: RequestThunk = yield
    state = state_of(ctx.runtime)
    if state is None or not state.config.stream_usage or not request.stream or request.include_usage:
        return call
    job = ctx.job
    dollars = state.layout(ctx.identity, state.clock()).dollars or (job is not None and job.max_cost_usd is not None)
    if not dollars and getattr(request, "native", None) is not None:
        return call  # no dollar budget to count against: the client's own body goes upstream as sent, unchanged

    async def with_usage() -> ChatRequest:
        prepared = await call()
        if not prepared.stream or prepared.include_usage:
            return prepared
        ctx.notes[HIDE_USAGE] = True
        return attrs.evolve(prepared, stream_options={**(prepared.stream_options or {}), "include_usage": True})

    return with_usage


@hookimpl(wrapper=True, tryfirst=True)
def call_provider(request: ProviderRequest, route: Route, ctx: CallContext) -> Generator[None, Any, Any]:
    call: ChatThunk = yield
    state = ctx.runtime.plugin_state.get("budgets")
    if state is None:
        return call
    return Charge(state, request, route, ctx, call)


class Charge:
    """One provider call's thunk: admit (reserve), call, settle. A fallback inside an admitted call passes through:
    the admitted call's reservation covers it."""

    __slots__ = ("admission", "call", "ctx", "pending", "price", "request", "route", "state")

    def __init__(self, state: BudgetsState, request: ProviderRequest, route: Route, ctx: CallContext,
                 call: ChatThunk) -> None:
        self.state, self.request, self.route, self.ctx, self.call = state, request, route, ctx, call
        self.admission: Admission | None = None  # admitted: what settles
        self.pending: Admission | None = None  # what the store is asked for
        self.price: Price | None = None  # the route's price, when admission looked it up

    async def __call__(self) -> ChatResult:
        notes = self.ctx.notes
        if notes.get(ACTIVE):
            return await self.call()
        if self.admission is not None or self.pending is not None:  # called again while a call is in flight
            return await Charge(self.state, self.request, self.route, self.ctx, self.call)()
        if not self.admit():  # not admitted from room this process holds: ask the store
            try:
                await self.admit_from_store()
            finally:
                self.pending = None
        notes[ACTIVE] = True
        try:
            result = await self.call()
        except BaseException:
            self.settle(None, answered=False)
            raise
        finally:
            notes.pop(ACTIVE, None)
        if not self.request.stream:  # a ChatResponse or an EmbeddingsResponse
            self.settle(result.usage, answered=True)
            return result
        ended = self.ctx.stream_ended
        if ended is not None:  # the attempt's stream tap: settle as it ends, before the request's end is reported
            ended.append(self._settle_stream)
        return self.observe(result)

    def _settle_stream(self, error: BaseException | None, usage: Usage | None, first_at: float | None) -> None:
        """The stream ended (``StreamEnded``): settled with the last usage it carried, so that the request's end
        (call log, dashboard, traces) has its cost; :meth:`observe` settles what ends without this tap."""
        self.settle(usage, answered=True)

    def admit(self) -> bool:
        """Admit the call without the store when it can (nothing to take, or it fits in the room this process holds
        ahead); ``False`` when :meth:`admit_from_store` must take it (``self.pending``)."""
        state, ctx = self.state, self.ctx
        job = ctx.job
        plan, idle = state.plan(ctx.identity, state.clock())
        if job is not None and job.max_cost_usd is not None:
            plan, idle = plan.with_job(job), None
        if idle is not None:  # no reservation and no limit (the master key): nothing to take
            self.admission = idle
            return True
        if not plan.dollars and not plan.tokens:  # nothing to reserve: at most a request and a slot to take
            admission = Admission(plan, 0, 0)
        else:
            admission = Admission(plan, *self.reservation(plan))
        if admission.limited:
            if not state.leases.take(plan.keys, admission.amounts):
                self.pending = admission
                return False
            state.stats["admitted"] += 1
        self.admission = admission
        return True

    async def admit_from_store(self) -> None:
        state, ctx, admission = self.state, self.ctx, self.pending
        assert admission is not None
        plan, job = admission.layout, ctx.job
        try:
            refusal_of = await state.leases.admit(admission.group, plan.slots)
        except Exception as exc:  # fails closed: a call that cannot be counted is not made
            raise errors.ScillmError(f"budgets could not be checked (state store: {type(exc).__name__}); the "
                                     "call was not made", status=503, code="state_store_unavailable") from None
        if refusal_of is not None:
            refused = admission.refused(*refusal_of)
            spent_key = refused.check.spent_key
            state.leases.flush_spent()  # the spend settled so far is written before it is read
            spent = (await state.counters.count((Count(spent_key),))).values[0] if spent_key else 0.0
            refusal = explain(refused, spent, state.clock())
            self._refused(str(refusal.code), refused.check.scope)
            ctx.notes.setdefault("cost_usd", 0.0)
            if job is not None and isinstance(refusal, errors.BudgetExceeded) and (
                    refusal.retry_after_s is None or refusal.retry_after_s >= 60):
                job.exceed(refusal.message)
            raise refusal
        state.stats["admitted"] += 1
        self.admission = admission

    def reservation(self, plan: Layout) -> tuple[int, int]:
        """The most this call may cost (nano-dollars, every route it may take; 0 without a dollar budget) and the
        tokens it may use. 403 when a dollar budget applies and the model has no price (unless allowed)."""
        state, request, route = self.state, self.request, self.route
        config = state.config
        chat = isinstance(request, ChatRequest)  # embeddings have no output tokens
        price = self.price = state.prices.lookup(route.provider, route.model) if plan.dollars or chat else None
        if plan.dollars and price is None and config.unpriced == "refuse":
            self._refused("price_unknown", "key")
            raise errors.PermissionDenied(
                f"model {route.deployment} has no price, and this call counts against a dollar budget; set "
                f'[pricing."{route.deployment}"] in scillm.toml (or [budgets] unpriced = "allow")',
                code="price_unknown", param="model")
        input_tokens = estimate_input_tokens(request)
        output_tokens = 0
        if chat:
            output_tokens = request.max_output_tokens or (price.max_output_tokens if price else None) \
                or config.default_max_output_tokens
        if not plan.dollars:
            return 0, input_tokens + output_tokens
        reserve = reservation(price, input_tokens, output_tokens)
        for other in route.fallbacks:  # the most expensive route the call may take
            reserve = max(reserve, reservation(state.prices.lookup(other.provider, other.model), input_tokens,
                                               output_tokens))
        return reserve, input_tokens + output_tokens

    def _refused(self, code: str, scope: str) -> None:
        self.state.stats["refused"] += 1
        self.state.refusals.inc((self.state.keys(self.ctx.identity.owner), code, scope))

    async def observe(self, chunks: AsyncIterator[ChatChunk]) -> AsyncIterator[ChatChunk]:
        """The stream going on to the client: its usage is read (and hidden if the client did not ask for it),
        and the call is settled when it ends, however it ends."""
        hide = bool(self.ctx.notes.get(HIDE_USAGE))
        usage: Usage | None = None
        try:
            async for chunk in chunks:
                if chunk.usage is not None:
                    usage = chunk.usage
                    if hide:
                        if not chunk.choices:
                            continue
                        chunk = attrs.evolve(chunk, usage=None)
                yield chunk
        finally:
            self.settle(usage, answered=True)
            await aclose_quietly(chunks)

    def settle(self, usage: Usage | None, *, answered: bool) -> None:
        """Replace the reservation with the actual cost (priced by the route that served), and record it.
        Unanswered calls cost nothing; an answer without usage (or without a price) costs ``None`` and keeps its
        whole reservation, the most it can have cost."""
        admission, state, ctx = self.admission, self.state, self.ctx
        if admission is None:
            return
        self.admission = None
        served = ctx.route or self.route
        price = self.price if served is self.route and self.price is not None else \
            state.prices.lookup(served.provider, served.model)
        tokens = tokens_of(usage) if usage is not None else None
        cost: float | None = 0.0
        charged = 0
        if answered:
            cost = price.usd(tokens) if price is not None and tokens is not None else None
            charged = round(cost * NANO) if cost is not None else admission.reserve_nano
        # what the call gives back to its limits: the reservation it did not spend, the tokens it did not use, its
        # slots; and its cost to the settled spend
        plan, leases = admission.layout, state.leases
        if plan.checks:
            leases.release_each(plan.held, admission.reserve_nano - charged)
            if tokens is not None and plan.tpm:
                leases.release_each(plan.tpm, admission.reserve_tokens - tokens.total)
            leases.release_each(plan.freed, 1)
        if plan.spent:
            leases.spend(plan.spent, charged)
        notes = ctx.notes
        if not answered:
            notes.setdefault("cost_usd", 0.0)
            return
        total = notes.get("cost_usd", 0.0)
        total = notes["cost_usd"] = None if cost is None or total is None else round(total + cost, 9)
        if total is not None and not self.request.stream:
            headers = notes.get("headers")
            if headers is None:
                headers = notes["headers"] = {}
            headers["x-scillm-cost-usd"] = _usd(total)
        identity, job = ctx.identity, ctx.job
        if job is not None:
            job.add_cost(cost)
        if cost is None:
            state.stats["unpriced_calls"] += 1
        else:
            state.spend.inc((state.keys(identity.owner), identity.team or ""), cost)
        if state.config.ledger:
            batch = job.id if job is not None and job.kind == "batch" else None
            run = job.id if job is not None and job.kind == "run" else None
            state.ledger.add(time.time(), (
                identity.owner, identity.name, identity.team, ctx.caller[:200] if ctx.caller else None,
                self.request.model[:200], served.provider, served.model, batch, run),
                None if cost is None else charged, charged, tokens)


def _usd(value: float) -> str:
    return f"{value:.9f}".rstrip("0").rstrip(".") or "0"


__all__ += ["windows"]
