"""Resilience middleware around ``call_provider``: retries, fallbacks, circuit breakers, the overall deadline,
provider-wide pauses on upstream 429s, per-provider concurrency limits with AIMD and a wait queue fair between
keys, batches and runs, and cancel-on-disconnect.

One wrapper (pluggy: among wrappers ``tryfirst`` is outermost, ``trylast`` innermost)::

    cache (tryfirst)  ->  call_provider (this plugin: deadline, breaker, pauses, retries, fallback; each upstream
                          attempt holds one slot of its provider's concurrency limit)
                      ->  metrics (trylast: per attempt)  ->  core dispatch

Fail-open/closed: retries, fallbacks and the deadline only ever add attempts or stop waiting (they cannot reject a
request that would otherwise succeed); the circuit breaker and the concurrency limiter **fail closed** — an open
circuit is skipped in favour of its fallbacks (503 ``circuit_open`` when every member is open), a full queue is a
429 ``concurrency_queue_full`` and a wait past ``queue_wait_s`` or the request deadline a 503
``concurrency_wait_timeout``. ``[resilience] enabled = false`` passes every call through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Generator, Mapping
from typing import TYPE_CHECKING, Any

from scillm_core import (
    ChatChunk,
    ChatRequest,
    ConfigError,
    MiddlewareRegistry,
    Route,
    Runtime,
    SurfaceRegistry,
    errors,
    hookimpl,
)
from scillm_core.pipeline import aclose_quietly, carries_on
from scillm_resilience.breaker import Breaker, CircuitOpenSignal
from scillm_resilience.config import LimitConfig, ResilienceConfig
from scillm_resilience.continuation import (
    Overlap,
    Sent,
    continuation_request,
    continued,
    marked,
    text_chunk,
    with_note,
)
from scillm_resilience.disconnect import CancelOnDisconnect
from scillm_resilience.limiter import Limiter, QueueFullSignal, QueueTimeoutSignal, Slot, SlotIterator
from scillm_resilience.pause import PausedSignal, Pauses
from scillm_resilience.shared import Shared

if TYPE_CHECKING:
    from scillm_core import CallContext
    from scillm_core.pipeline import ChatResult, ChatThunk

__all__ = ["AllCircuitsOpen", "CircuitOpen", "ConcurrencyLimited", "LimitConfig", "ProviderPaused", "ResilienceConfig",
           "state_of"]

#: one info line per retry, fallback, continuation and breaker transition (core's dispatch logs the timeouts)
log = logging.getLogger("scillm.failover")


def report(ctx: CallContext, kind: str, route: Route, error: BaseException | None, **data: Any) -> None:
    """Emit ``kind`` (an event of ``ctx``'s call) and log it as one line naming the request, provider, model and
    reason."""
    ctx.emit(kind, route=route, error=error, **data)
    extra = "".join(f" {key}={_value(value)}" for key, value in data.items())
    log.info("%s request_id=%s provider=%s model=%s%s reason=%s", kind, ctx.request_id, route.provider,
             route.model, extra, _short(error) or "-")


def _value(value: Any) -> str:
    if isinstance(value, Route):
        return value.deployment
    return f"{value:.3g}" if isinstance(value, float) else str(value)

# -- errors --------------------------------------------------------------------------------------------------------

class CircuitOpen(errors.UpstreamUnavailable):
    """One deployment is cooling down; fallbacks are tried instead."""

    code = "circuit_open"
    retryable = False
    local = True


class AllCircuitsOpen(errors.ScillmError):
    """Every deployment a request could use is cooling down."""

    status = 503
    type = "server_error"
    code = "circuit_open"


class ConcurrencyLimited(errors.UpstreamError):
    """scillm's own per-provider limit refused the call (queue full: 429; no slot in time: 503)."""

    status = 503
    type = "server_error"
    code = "concurrency_wait_timeout"
    retryable = False
    local = True


class ProviderPaused(errors.UpstreamRateLimited):
    """The deployment is paused after an upstream 429 for longer than this request can wait (429 with
    ``retry-after``; fallbacks are tried first)."""

    code = "provider_paused"
    retryable = False
    local = True


def _is_local(exc: BaseException) -> bool:
    return bool(getattr(exc, "local", False))


# -- per-app state -------------------------------------------------------------------------------------------------

class State:
    def __init__(self, config: ResilienceConfig, provider_limits: Mapping[str, LimitConfig] | None = None,
                 runtime: Runtime | None = None, shared: Shared | None = None) -> None:
        self.config = config
        on_change = None
        if runtime is not None:
            events = runtime.events

            def on_change(deployment: str, old: str, new: str, error: str | None, request_id: str | None) -> None:
                events.emit("breaker.transition", None, deployment=deployment, old=old, new=new, error=error,
                            request_id=request_id)
                provider, _, model = deployment.partition("/")
                log.info("breaker request_id=%s provider=%s model=%s old=%s new=%s reason=%s", request_id or "-",
                         provider, model, old, new, error or "-")

        self.breaker = Breaker(config.breaker_threshold, config.breaker_cooldown_s, on_change=on_change)
        self.limiters: dict[str, Limiter] = {}
        self.pauses = Pauses(shared.pauses if shared is not None else None)
        self.provider_limits = dict(provider_limits or {})  # from [providers.NAME] max_concurrency / max_queue
        self.shared = shared  # with a Redis state store: limits, AIMD, breakers and pauses across instances

    def limit_for(self, provider: str) -> LimitConfig:
        return self.config.limits.get(provider) or self.provider_limits.get(provider) or self.config.default_limit

    @property
    def limited(self) -> set[str]:
        """Providers with a limit of their own (in either place)."""
        return set(self.config.limits) | set(self.provider_limits)

    def limiter(self, provider: str) -> Limiter:
        limiter = self.limiters.get(provider)
        if limiter is None:
            limit = self.limit_for(provider)
            limiter = self.limiters[provider] = Limiter(
                provider, limit.max_concurrency, limit.max_queue, aimd=self.config.aimd and self.shared is None,
                recover_s=self.config.aimd_recover_s)
            limiter.shared = self.shared
        return limiter

    def health(self, runtime: Runtime) -> dict[str, Any]:
        cfg = self.config
        for name in runtime.providers:  # show configured limits even before the first call
            if name in self.limited:
                self.limiter(name)
        return {
            "enabled": cfg.enabled,
            "switches": cfg.switches(),
            "fails": {"retries": "open", "fallbacks": "open", "deadline": "open", "breaker": "closed",
                      "pause": "closed", "concurrency": "closed"},
            "retries": {"max_retries": cfg.max_retries, "backoff_base_s": cfg.backoff_base_s,
                        "backoff_max_s": cfg.backoff_max_s, "max_retry_after_s": cfg.max_retry_after_s},
            "pauses": {"max_pause_wait_s": cfg.max_pause_wait_s, **self.pauses.snapshot()},
            "breaker": {"threshold": cfg.breaker_threshold, "cooldown_s": cfg.breaker_cooldown_s,
                        "circuits": self.breaker.snapshot()},
            "concurrency": {"default_limit": {"max_concurrency": cfg.default_limit.max_concurrency,
                                              "max_queue": cfg.default_limit.max_queue},
                            "queue_wait_s": cfg.queue_wait_s, "aimd_recover_s": cfg.aimd_recover_s,
                            "providers": {name: {**lim.snapshot(), **(self.shared.snapshot(lim) if self.shared
                                                                         else {})}
                                          for name, lim in sorted(self.limiters.items())}},
            "shared_across_instances": self.shared.describe() if self.shared is not None else False,
        }


def state_of(runtime: Runtime) -> State:
    """This plugin's state for one app (breakers, limiters); created on first use, dropped with the runtime."""
    state = runtime.plugin_state.get("resilience")
    if state is None:
        config = runtime.config.sections.get("resilience") or ResilienceConfig()
        shared = Shared(runtime, aimd=config.aimd, recover_s=config.aimd_recover_s) if runtime.shared else None
        state = runtime.plugin_state["resilience"] = State(config, provider_limits(runtime, config), runtime, shared)
    return state  # type: ignore[no-any-return]


def provider_limits(runtime: Runtime, config: ResilienceConfig) -> dict[str, LimitConfig]:
    """Limits set in ``[providers.NAME]`` (``max_concurrency``, ``max_queue``); a provider limited there and in
    ``[resilience.limits.NAME]`` too stops startup (one place per provider)."""
    limits: dict[str, LimitConfig] = {}
    for name, settings in (runtime.config.sections.get("providers") or {}).items():
        if settings.max_concurrency is None and settings.max_queue is None:
            continue
        if name in config.limits:
            raise ConfigError(f"the limits of provider {name!r} are set twice, in [providers.{name}] and in "
                              f"[resilience.limits.{name}]; keep one")
        default = config.default_limit
        limits[name] = LimitConfig(
            max_concurrency=default.max_concurrency if settings.max_concurrency is None else settings.max_concurrency,
            max_queue=default.max_queue if settings.max_queue is None else settings.max_queue)
    return limits


# -- hooks ---------------------------------------------------------------------------------------------------------

@hookimpl
def scillm_config_sections() -> Mapping[str, type]:
    return {"resilience": ResilienceConfig}


@hookimpl
def scillm_register_middleware(middleware: MiddlewareRegistry, runtime: Runtime) -> None:
    cfg = state_of(runtime).config
    if cfg.enabled and cfg.cancel_on_disconnect:
        paths = cfg.disconnect_paths
        middleware.add(lambda app: CancelOnDisconnect(app, paths), order=50, name="cancel_on_disconnect")


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    shared = state_of(runtime).shared
    if shared is not None:
        surfaces.on_shutdown(shared.close)


@hookimpl
def scillm_health(runtime: Runtime) -> dict[str, Any]:
    return {"resilience": state_of(runtime).health(runtime)}


@hookimpl
def scillm_doctor(runtime: Runtime) -> list[dict[str, Any]]:
    state = state_of(runtime)
    cfg = state.config
    unknown = sorted(set(cfg.limits) - set(runtime.providers))
    detail = (f"[resilience.limits] names unknown providers: {', '.join(unknown)} (known: "
              f"{', '.join(sorted(runtime.providers))})" if unknown else
              f"limits for {', '.join(sorted(state.limited)) or 'no provider'}; default "
              f"{cfg.default_limit.max_concurrency} in flight, {cfg.default_limit.max_queue} queued")
    return [{"check": "resilience limits", "ok": not unknown, "required": bool(unknown), "detail": detail}]


@hookimpl(wrapper=True)
def call_provider(request: ChatRequest, route: Route, ctx: CallContext) -> Generator[None, Any, Any]:
    """Deadline, circuit breaker, retries with backoff, fallback along ``route.fallbacks``."""
    call = yield
    state = state_of(ctx.runtime)
    if not state.config.enabled:
        return call

    async def resilient() -> ChatResult:
        return await Attempts(state, request, route, ctx, call).run()

    return resilient


def _rate_limited(slot: Slot, exc: BaseException) -> None:
    """AIMD: an upstream 429 (not scillm's own) for a call admitted through ``slot`` halves its provider's limit."""
    if isinstance(exc, errors.UpstreamRateLimited) and not _is_local(exc):
        slot.limiter.rate_limited(slot)
        shared = slot.limiter.shared
        if shared is not None:
            admitted = time.time() - (time.monotonic() - slot.admitted_at)
            shared.spawn(shared.rate_limited(slot.limiter, admitted))


def _queue_full(limiter: Limiter, route: Route, displaced: bool = False) -> ConcurrencyLimited:
    fair = ("; this call waited and gave its place to a caller with fewer calls waiting (the queue is shared "
            "fairly between keys, and between a key's batches, agent runs and other calls)" if displaced else "")
    return ConcurrencyLimited(
        f"concurrency limit reached: {limiter.in_flight} calls in flight (limit {limiter.effective} of "
        f"{limiter.limit}) and the wait queue is full ({limiter.max_queue} waiting){fair}; retry later or raise "
        f"[resilience.limits.{route.provider}] max_concurrency / max_queue",
        provider=route.provider, model=route.model, status=429, code="concurrency_queue_full",
        headers={"retry-after": "1"})


def _queue_timeout(limiter: Limiter, route: Route, waited_s: float) -> ConcurrencyLimited:
    return ConcurrencyLimited(
        f"no concurrency slot became free within {waited_s:.2f}s (limit {limiter.effective} of {limiter.limit}, "
        f"{limiter.in_flight} in flight, {len(limiter.waiters)} waiting); the request timeout or "
        f"[resilience] queue_wait_s ran out while queued",
        provider=route.provider, model=route.model, headers={"retry-after": "1"})


# -- the retry / fallback loop -------------------------------------------------------------------------------------

class Attempts:
    def __init__(self, state: State, request: ChatRequest, route: Route, ctx: CallContext, call: ChatThunk) -> None:
        self.state = state
        self.cfg = state.config
        self.request = request
        self.route = route
        self.ctx = ctx
        self.call = call
        self.waiting = False  # in the concurrency queue (a timeout then is the queue's, not the upstream's)
        self.holding = False  # waiting out a pause of the deployment (a timeout then is a 429, not a 504)
        self.probing = False  # this attempt is the one that tests whether a paused deployment answers again
        self.held_s = 0.0     # time spent waiting out pauses, bounded by max_pause_wait_s

    # -- deadline ---------------------------------------------------------------------------------------------

    def remaining(self) -> float | None:
        return self.ctx.remaining() if self.cfg.deadline else None

    def deadline_error(self, route: Route, last: BaseException | None = None) -> errors.DeadlineExceeded:
        timeout = self.request.scillm.get("timeout")
        total = f"{timeout}s " if timeout else ""
        last_text = f"; last error: {_short(last)}" if last is not None else ""
        return errors.DeadlineExceeded(
            f"request timeout {total}reached while calling {route.provider} ({route.model}) after "
            f"{self.ctx.attempts} upstream attempt(s){last_text}",
            details={"provider": route.provider, "model": route.model, "attempts": self.ctx.attempts})

    # -- one deployment --------------------------------------------------------------------------------------

    async def run(self) -> ChatResult:
        result, served = await self.first()
        route, request = self.route, self.request
        if (request.stream and self.cfg.continuation and served < len(route.fallbacks)
                and isinstance(request, ChatRequest) and (request.n or 1) == 1):
            carries_on(self.ctx)  # the request goes on past this attempt's stream: its end is the whole stream's
            return self.continuing(result, served)  # type: ignore[arg-type]  # a stream
        return result

    async def first(self) -> tuple[ChatResult, int]:
        """The answer of the first member that gives one (for a stream: its first chunk), and that member's place
        in the group (0: the route itself, ``i + 1``: ``route.fallbacks[i]``)."""
        route, cfg = self.route, self.cfg
        try:
            return await self.serve(), 0
        except Exception as exc:
            if not (cfg.fallbacks and route.fallbacks and _fallback_worthy(exc)):
                raise
            tried: list[tuple[Route, BaseException]] = [(route, exc)]
        hooks = self.ctx.runtime.hooks
        for index, fallback in enumerate(route.fallbacks, 1):
            remaining = self.remaining()
            if remaining is not None and remaining <= 0:
                last = tried[-1][1]
                if isinstance(last, errors.DeadlineExceeded | ConcurrencyLimited):
                    raise last
                raise self.deadline_error(fallback, last)
            report(self.ctx, "fallback", tried[-1][0], tried[-1][1], to=fallback)
            try:
                return await hooks.call_provider(self.request, fallback, self.ctx)(), index
            except Exception as exc:
                if not _fallback_worthy(exc):
                    raise
                tried.append((fallback, exc))
        raise self.exhausted(tried)

    # -- continuation ----------------------------------------------------------------------------------------

    async def continuing(self, chunks: AsyncIterator[ChatChunk], served: int) -> AsyncIterator[ChatChunk]:
        """The stream of group member ``served``; when it breaks after its first chunk, the rest of the answer from
        the members after it (:mod:`scillm_resilience.continuation`)."""
        sent = Sent()
        failure: Exception | None = None
        try:
            async for chunk in chunks:
                sent.add(chunk)
                yield chunk
        except Exception as exc:
            failure = exc
        finally:
            await aclose_quietly(chunks)
        if failure is None:
            return
        members = (self.route, *self.route.fallbacks)
        async for chunk in self.continue_after(sent, failure, members[served], members[served + 1:]):
            yield chunk

    async def continue_after(self, sent: Sent, failure: Exception, broken: Route,
                             members: tuple[Route, ...]) -> AsyncIterator[ChatChunk]:
        ctx, hooks, original = self.ctx, self.ctx.runtime.hooks, failure
        if sent.finished:  # every token and the finish reason went out: the answer is whole
            log.info("stream-end request_id=%s provider=%s model=%s reason=the stream broke after its finish "
                     "chunk (%s); the answer is complete", ctx.request_id, broken.provider, broken.model,
                     _short(failure))
            return
        attempts: list[str] = []
        pending: ChatChunk | None = None  # held back one chunk, so the last one can say what happened
        for member in members:
            if not _fallback_worthy(failure):
                break
            if sent.tool is not None:
                raise with_note(original, f"the stream broke inside tool call {sent.tool!r}; scillm does not "
                                          f"continue a tool call, ask again") from None
            remaining = self.remaining()
            if remaining is not None and remaining <= 0:
                break
            partial = sent.answer
            prefill = "prefill" in ctx.runtime.providers[member.provider].capabilities
            mode = "prefill" if prefill else "instruction"
            report(ctx, "continuation", broken, failure, to=member, mode=mode, sent_chars=len(partial))
            asked = continuation_request(self.request, partial, prefill=prefill)  # type: ignore[arg-type]
            try:
                stream = await hooks.call_provider(asked, member, ctx)()
            except Exception as exc:
                attempts.append(f"{member.deployment} refused to continue: {getattr(exc, 'code', None) or exc}")
                report(ctx, "continuation.end", member, exc, outcome="refused")
                continue
            note = {"by": member.deployment, "after": broken.deployment, "reason": _short(failure), "mode": mode,
                    "at_char": len(partial), "count": len(attempts) + 1}
            ctx.notes["continuation"] = note
            overlap = Overlap(partial)
            try:
                async for chunk in stream:  # type: ignore[union-attr]
                    for piece in continued(chunk, sent, overlap):
                        if pending is not None:
                            yield pending
                        sent.add(piece)
                        pending = piece
            except Exception as exc:
                attempts.append(f"{member.deployment} continued and broke too: {getattr(exc, 'code', None) or exc}")
                report(ctx, "continuation.end", member, exc, outcome="broke")
                failure, broken = exc, member
                continue
            finally:
                await aclose_quietly(stream)
            held = overlap.flush()
            if held:
                if pending is not None:
                    yield pending
                pending = text_chunk(sent, held)
                sent.add(pending)
            ctx.emit("continuation.end", route=member, error=None, outcome="completed")
            if pending is not None:
                yield marked(pending, note)
            return
        if pending is not None:
            yield pending
        tried = "; ".join(attempts) or "no group member after it could take over"
        raise with_note(original, f"the stream broke after {len(sent.answer)} characters; {tried}") from None

    def exhausted(self, tried: list[tuple[Route, BaseException]]) -> BaseException:
        summary = [{"deployment": r.deployment, "error": getattr(e, "code", None) or type(e).__name__}
                   for r, e in tried]
        if all(isinstance(e, CircuitOpen | AllCircuitsOpen) for _, e in tried):
            breaker = self.state.breaker
            parts = [f"{r.deployment} (retry in {breaker.remaining(r.deployment):.1f}s; last error: "
                     f"{breaker.circuits[r.deployment].last_error if r.deployment in breaker.circuits else '?'})"
                     for r, _ in tried]
            wait = min(breaker.remaining(r.deployment) for r, _ in tried)
            what = f"group {self.route.group!r}" if self.route.group else f"model {self.route.requested!r}"
            return AllCircuitsOpen(
                f"every deployment for {what} is cooling down after repeated failures: {', '.join(parts)}",
                headers={"retry-after": str(max(1, round(wait)))}, details={"tried": summary})
        # a member that could not deliver what was asked was never called: the failure of one that was is the
        # answer (a 503 to retry, not a 400); when none could, the first member's refusal
        called = [e for _, e in tried if not isinstance(e, errors.UnsupportedParameter)]
        last = next((e for e in reversed(called) if not isinstance(e, CircuitOpen)),
                    called[-1] if called else tried[0][1])
        if isinstance(last, errors.ScillmError):
            last.details.setdefault("tried", summary)
        return last

    async def serve(self) -> ChatResult:
        """Call ``self.route`` with breaker admission and retries; the first chunk of a stream is part of it."""
        route, cfg, breaker = self.route, self.cfg, self.state.breaker
        deployment = route.deployment
        probe = False
        if cfg.breaker:
            if self.state.shared is not None:
                await self.state.shared.sync_circuit(breaker, deployment)
            try:
                probe = breaker.admit(deployment, self.ctx.request_id) == "probe"
            except CircuitOpenSignal as signal:
                self.ctx.emit("circuit.skip", route=route, remaining_s=signal.remaining_s)
                raise CircuitOpen(
                    f"deployment {deployment} is cooling down for {signal.remaining_s:.1f}s more after "
                    f"{signal.circuit.consecutive_failures} consecutive failures (last error: "
                    f"{signal.circuit.last_error})", provider=route.provider, model=route.model,
                    headers={"retry-after": str(max(1, round(signal.remaining_s)))}) from None
        retry = 0
        while True:
            try:
                result = await self.attempt()
            except BaseException as exc:
                counted = cfg.breaker and self.record_failure(exc)
                if cfg.breaker and probe and not counted:
                    breaker.abandon_probe(deployment)
                if self.pause_for(exc):
                    continue  # held until the pause ends (bounded by the deadline and max_pause_wait_s)
                if not isinstance(exc, Exception):
                    raise
                if probe or (counted and breaker.remaining(deployment) > 0):
                    raise  # the probe failed, or this failure opened the circuit: fall back now
                delay = self.retry_delay(exc, retry)
                if delay is None:
                    raise
                retry += 1
                report(self.ctx, "retry", route, exc, retry=retry, delay_s=delay)
                await asyncio.sleep(delay)
                continue
            if cfg.breaker:
                circuit = breaker.circuits.get(deployment)
                if self.state.shared is not None and circuit is not None and (
                        circuit.consecutive_failures or circuit.state != "closed"):
                    self.state.shared.spawn(self.state.shared.circuit_success(deployment))
                breaker.success(deployment, self.ctx.request_id)
            if self.probing:
                self.probing = False
                self.state.pauses.success(deployment)
            return result

    def pause_for(self, exc: BaseException) -> bool:
        """An upstream 429 with a usable hint pauses the deployment for everybody (and this attempt, if it was the
        probe, reports it). Whether this caller should wait the pause out: the hint is one it may wait for."""
        pauses, deployment, probing = self.state.pauses, self.route.deployment, self.probing
        self.probing = False
        hint = getattr(exc, "retry_after_s", None)
        limited = (isinstance(exc, errors.UpstreamRateLimited) and not _is_local(exc) and hint is not None
                   and self.cfg.pause)
        if limited:
            pauses.pause(deployment, hint, probe=probing)
        elif probing:
            pauses.abandon(deployment)
        return limited and hint <= self.cfg.max_retry_after_s

    def record_failure(self, exc: BaseException) -> bool:
        """Count ``exc`` against the deployment when it says the deployment is unhealthy (5xx/overloaded, refused
        or dropped connections, timeouts, garbled answers). Rate limits are left to retry-after and AIMD, and
        request, auth and quota errors to fallbacks, so a breaker never hides a clear error behind a 503."""
        if not isinstance(exc, _HEALTH_ERRORS) or _is_local(exc):
            return False
        self.state.breaker.failure(self.route.deployment, _short(exc), self.ctx.request_id)
        if self.state.shared is not None:
            self.state.shared.spawn(self.state.shared.circuit_failure(self.state.breaker, self.route.deployment,
                                                                      _short(exc)))
        return True

    def retry_delay(self, exc: Exception, retry: int) -> float | None:
        cfg = self.cfg
        if not cfg.retries or retry >= cfg.max_retries:
            return None
        if not isinstance(exc, errors.UpstreamError) or not exc.retryable or _is_local(exc):
            return None
        if isinstance(exc, errors.UpstreamTimeout):
            return None  # a deployment that stayed silent for a whole limit is not asked again: fall back
        if exc.retry_after_s is not None:
            if exc.retry_after_s > cfg.max_retry_after_s:
                return None  # the upstream asks for longer than we wait: fall back or report its 429 now
            delay = exc.retry_after_s
        else:
            delay = random.uniform(0.0, min(cfg.backoff_max_s, cfg.backoff_base_s * (2 ** retry)))
        remaining = self.remaining()
        if remaining is not None and delay >= remaining:
            return None  # never sleep past the deadline
        return delay

    async def attempt(self) -> ChatResult:
        """One upstream call (through the inner chain), bounded by the deadline; for streams until the first
        chunk, which is pulled here so that failures before it can still be retried or failed over."""
        route = self.route
        self.waiting = False
        remaining = self.remaining()
        if remaining is None:
            return await self.once()
        if remaining <= 0:
            raise self.deadline_error(route)
        try:
            async with asyncio.timeout(remaining):
                return await self.once()
        except TimeoutError:
            if self.holding:
                raise self.paused(self.state.pauses.remaining(route.deployment)) from None
            if self.waiting:
                limiter = self.state.limiter(route.provider)
                limiter.rejected += 1
                raise _queue_timeout(limiter, route, remaining) from None
            raise self.deadline_error(route) from None
        except errors.DeadlineExceeded:
            raise self.deadline_error(route) from None

    async def slot(self) -> Slot | None:
        """A slot of the route's provider limit (``None`` when limits are off), waiting in its queue if full; with
        shared state also a lease on the provider's global slots (held and released with the local slot)."""
        cfg, route = self.cfg, self.route
        if not cfg.concurrency:
            return None
        limiter = self.state.limiter(route.provider)
        wait = cfg.queue_wait_s
        remaining = self.ctx.remaining()
        if remaining is not None:
            wait = min(wait, remaining)
        started = time.monotonic()
        slot = limiter.try_acquire()
        if slot is None:
            self.waiting = True
            try:
                slot = await limiter.acquire(wait, *self.fair_share_of())
            except QueueFullSignal as signal:
                raise _queue_full(limiter, route, signal.displaced) from None
            except QueueTimeoutSignal as signal:
                self.ctx.emit("queue.wait", provider=route.provider, waited_s=signal.waited_s, outcome="timeout")
                raise _queue_timeout(limiter, route, signal.waited_s) from None
        shared = self.state.shared
        if shared is not None:
            self.waiting = True
            try:
                lease = await shared.acquire(limiter, wait - (time.monotonic() - started))
            except BaseException as exc:
                slot.release()
                if isinstance(exc, QueueTimeoutSignal):
                    limiter.rejected += 1
                    waited = time.monotonic() - started
                    self.ctx.emit("queue.wait", provider=route.provider, waited_s=waited, outcome="timeout")
                    raise _queue_timeout(limiter, route, waited) from None
                raise
            if lease is not None:
                slot.also_release = lambda: shared.release(lease)
        if self.waiting:  # only calls that queued report their wait
            self.waiting = False
            self.ctx.emit("queue.wait", provider=route.provider, waited_s=time.monotonic() - started,
                          outcome="granted")
        return slot

    def fair_share_of(self) -> tuple[str, str]:
        """Who this call queues as: its key (owner), and its batch or agent run, or the key's other calls."""
        job = self.ctx.job
        return self.ctx.identity.owner, f"{job.kind}:{job.id}" if job is not None else ""

    async def hold(self) -> None:
        """Wait while the deployment is paused (or its probe is out); become the probe when the pause ends."""
        pauses, deployment, cfg = self.state.pauses, self.route.deployment, self.cfg
        if not cfg.pause:
            return
        if self.state.shared is not None:
            await self.state.shared.pauses.sync(pauses, deployment)
        if not pauses.blocks(deployment):
            return
        budget = cfg.max_pause_wait_s - self.held_s
        remaining = self.remaining()
        if remaining is not None:
            budget = min(budget, remaining)
        started = time.monotonic()
        self.holding = True
        try:
            self.probing = await pauses.wait(deployment, max(budget, 0.0), cfg.max_retry_after_s)
        except PausedSignal as signal:
            raise self.paused(signal.remaining_s) from None
        finally:
            self.holding = False
            self.held_s += time.monotonic() - started

    def paused(self, remaining_s: float) -> ProviderPaused:
        route, pauses = self.route, self.state.pauses
        pause = pauses.active.get(route.deployment)
        hint = f" (retry-after {pause.hint_s:g}s)" if pause is not None else ""
        wait = f"{remaining_s:.1f}s more" if remaining_s > 0 else "until a probe call gets through"
        return ProviderPaused(
            f"{route.deployment} is paused after the upstream answered 429{hint}: {wait}, longer than this request "
            f"can wait (its timeout, [resilience] max_pause_wait_s or max_retry_after_s)",
            provider=route.provider, model=route.model, retry_after_s=max(remaining_s, 1.0))

    async def once(self) -> ChatResult:
        await self.hold()
        slot = await self.slot()
        if slot is not None and not self.probing and self.cfg.pause and \
                self.state.pauses.blocks(self.route.deployment):
            slot.release()  # paused while this call queued for its slot: wait the pause out first
            return await self.once()
        try:
            result = await self.call()
        except BaseException as exc:
            if slot is not None:
                _rate_limited(slot, exc)
                slot.release()
            raise
        if not self.request.stream:
            if slot is not None:
                slot.release()
            return result
        chunks: AsyncIterator[Any] = result  # type: ignore[assignment]
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            if slot is not None:
                slot.release()
            return _empty()
        except BaseException as exc:
            try:
                if slot is not None:
                    _rate_limited(slot, exc)
                await aclose_quietly(chunks)
            finally:
                if slot is not None:
                    slot.release()
            raise
        return SlotIterator(chunks, slot, lambda exc: self.stream_failed(exc, slot), first=first)

    def stream_failed(self, exc: BaseException, slot: Slot | None) -> None:
        """The stream broke after its first chunk; the failure propagates (the chat surface sends an error event).
        An upstream 429 counts for the concurrency limit, any error for the breaker."""
        if slot is not None:
            _rate_limited(slot, exc)
        if isinstance(exc, Exception) and self.cfg.breaker:
            self.record_failure(exc)


_HEALTH_ERRORS = (errors.UpstreamUnavailable, errors.UpstreamConnectError, errors.UpstreamTimeout,
                  errors.UpstreamProtocolError)


def _fallback_worthy(exc: BaseException) -> bool:
    """Whether another deployment may succeed where this one failed."""
    if isinstance(exc, errors.ContextLengthExceeded):
        return True  # the prompt does not fit this model; the next one may have a larger window
    if isinstance(exc, errors.UnsupportedParameter):
        return True  # refused before sending: this member cannot deliver what the client asked for; another may
    if isinstance(exc, errors.UpstreamBadRequest):
        return exc.upstream_status == 404  # the upstream does not know this model; others may
    if isinstance(exc, errors.UpstreamError | AllCircuitsOpen | errors.ProviderNotConfigured):
        return True
    return False


async def _empty() -> AsyncIterator[Any]:
    return
    yield  # pragma: no cover


def _short(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    text = str(getattr(exc, "message", None) or exc or type(exc).__name__)
    return f"{getattr(exc, 'code', None) or type(exc).__name__}: {text[:300]}"
