"""The breaker, the limiter and pauses on their own (a controllable clock where they take one)."""

from __future__ import annotations

import asyncio
import time

import pytest
from scillm_resilience.breaker import Breaker, CircuitOpenSignal
from scillm_resilience.limiter import Limiter, QueueFullSignal, QueueTimeoutSignal
from scillm_resilience.pause import PausedSignal, Pauses


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_then_allows_one_probe():
    clock = Clock()
    breaker = Breaker(threshold=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        assert breaker.admit("p/m") is None
        breaker.failure("p/m", "boom")
    breaker.success("p/m")  # a success resets the count
    for _ in range(3):
        assert breaker.admit("p/m") is None
        breaker.failure("p/m", "boom")
    with pytest.raises(CircuitOpenSignal) as caught:
        breaker.admit("p/m")
    assert caught.value.remaining_s == 10
    clock.now += 10
    assert breaker.admit("p/m") == "probe"
    with pytest.raises(CircuitOpenSignal):  # only one probe at a time
        breaker.admit("p/m")
    breaker.failure("p/m", "still down")  # failed probe: open for another cooldown
    assert breaker.snapshot()["p/m"]["state"] == "open"
    clock.now += 10
    assert breaker.admit("p/m") == "probe"
    breaker.abandon_probe("p/m")  # cancelled probe: the next request probes
    assert breaker.admit("p/m") == "probe"
    breaker.success("p/m")
    assert breaker.admit("p/m") is None
    assert breaker.snapshot()["p/m"]["state"] == "closed"


def test_limiter_aimd_halves_once_per_window_and_recovers_one_per_quiet_period():
    async def main() -> None:
        clock = Clock()
        limiter = Limiter("p", 8, 10, aimd=True, recover_s=2.0, clock=clock)
        old = await limiter.acquire(1)
        clock.now += 1
        new = await limiter.acquire(1)
        limiter.rate_limited(new)
        assert limiter.effective == 4
        limiter.rate_limited(old)  # admitted before the decrease: same window, no second halving
        assert limiter.effective == 4
        later = await limiter.acquire(1)
        limiter.rate_limited(later)
        assert limiter.effective == 2
        for slot in (old, new, later):
            slot.release()
            slot.release()  # idempotent
        assert limiter.in_flight == 0
        clock.now += 3.9
        assert limiter.snapshot()["effective_limit"] == 3
        clock.now += 0.1
        assert limiter.snapshot()["effective_limit"] == 4
        clock.now += 100
        assert limiter.snapshot()["effective_limit"] == 8
        for _ in range(20):
            slot = await limiter.acquire(1)
            limiter.rate_limited(slot)
            slot.release()
            clock.now += 0.001
        assert limiter.effective == 1  # never below one

    asyncio.run(main())


def test_aimd_decreases_count_only_halvings_that_change_the_limit():
    async def main() -> None:
        clock = Clock()
        limiter = Limiter("p", 2, 10, aimd=True, recover_s=60.0, clock=clock)
        for expected_effective, expected_decreases in ((1, 1), (1, 1), (1, 1)):
            clock.now += 1
            slot = await limiter.acquire(1)
            limiter.rate_limited(slot)
            slot.release()
            assert (limiter.effective, limiter.snapshot()["aimd_decreases"]) == (expected_effective,
                                                                                  expected_decreases)

    asyncio.run(main())


def test_limiter_queue_is_fifo_bounded_and_cancellation_frees_slots():
    async def main() -> None:
        limiter = Limiter("p", 1, 2, aimd=False, recover_s=1.0)
        held = await limiter.acquire(1)
        order: list[int] = []

        async def wait(n: int) -> None:
            slot = await limiter.acquire(5)
            order.append(n)
            slot.release()

        first = asyncio.ensure_future(wait(1))
        second = asyncio.ensure_future(wait(2))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullSignal):
            await limiter.acquire(5)
        first.cancel()  # a cancelled waiter leaves the queue without taking a slot
        await asyncio.sleep(0)
        assert limiter.snapshot()["waiting"] == 1
        held.release()
        await second
        assert order == [2]
        assert limiter.in_flight == 0
        held = await limiter.acquire(1)
        with pytest.raises(QueueTimeoutSignal):
            await limiter.acquire(0.05)
        held.release()
        assert limiter.in_flight == 0 and not limiter.waiters

    asyncio.run(main())


def test_limiter_serves_owners_round_robin_then_their_flows_each_in_arrival_order():
    async def main() -> list[str]:
        limiter = Limiter("p", 1, 100, aimd=False, recover_s=1.0)
        held = await limiter.acquire(1)
        served: list[str] = []

        async def wait(owner: str, flow: str, n: int) -> None:
            slot = await limiter.acquire(5, owner, flow)
            served.append(f"{owner}/{flow}{n}")
            slot.release()

        # one key floods first (a batch of 4 and 2 other calls), a second key asks once, last
        waiting = [wait("a", "batch:1-", n) for n in range(4)] + [wait("a", "", n) for n in range(2)]
        tasks = [asyncio.ensure_future(w) for w in [*waiting, wait("b", "", 0)]]
        await asyncio.sleep(0)
        assert limiter.snapshot()["waiting"] == 7
        held.release()
        await asyncio.gather(*tasks)
        assert limiter.in_flight == 0 and len(limiter.waiters) == 0 and not limiter.waiters.owners
        return served

    assert asyncio.run(main()) == ["a/batch:1-0", "b/0", "a/0", "a/batch:1-1", "a/1", "a/batch:1-2",
                                   "a/batch:1-3"]


def test_a_full_queue_makes_room_for_a_lighter_caller_by_refusing_the_heaviest_callers_newest_waiter():
    async def main() -> None:
        limiter = Limiter("p", 1, 4, aimd=False, recover_s=1.0)
        held = await limiter.acquire(1)
        outcomes: dict[str, str] = {}

        async def settle() -> None:  # the newcomer queues, then the waiter it displaced hears so
            for _ in range(3):
                await asyncio.sleep(0)

        async def wait(name: str, owner: str, flow: str = "") -> None:
            try:
                slot = await limiter.acquire(5, owner, flow)
            except QueueFullSignal as signal:
                outcomes[name] = "displaced" if signal.displaced else "refused"
                return
            outcomes[name] = "served"
            slot.release()

        tasks = [asyncio.ensure_future(wait(f"a{n}", "a")) for n in range(4)]
        await asyncio.sleep(0)
        tasks.append(asyncio.ensure_future(wait("b0", "b")))  # a has 4, b 0: a's newest gives way
        await settle()
        assert outcomes == {"a3": "displaced"}
        tasks.append(asyncio.ensure_future(wait("b1", "b")))  # a 3, b 1: a again
        await settle()
        assert outcomes == {"a3": "displaced", "a2": "displaced"}
        tasks.append(asyncio.ensure_future(wait("b2", "b")))  # a 2, b 2: b is no lighter, so b is refused
        await settle()
        assert outcomes["b2"] == "refused"
        # a newcomer of the heaviest caller, in the flow its waiters are in: nobody lighter to make room for
        tasks.append(asyncio.ensure_future(wait("a-call", "a", "")))
        await settle()
        assert outcomes.get("a-call") == "refused"
        assert limiter.snapshot()["waiting"] == 4 and limiter.rejected == 4
        held.release()
        await asyncio.gather(*tasks)
        assert [n for n, o in outcomes.items() if o == "served"] == ["a0", "b0", "a1", "b1"]
        assert limiter.in_flight == 0 and len(limiter.waiters) == 0

    asyncio.run(main())


def test_within_one_key_a_call_takes_the_place_of_its_batchs_newest_waiter():
    async def main() -> list[str]:
        limiter = Limiter("p", 1, 3, aimd=False, recover_s=1.0)
        held = await limiter.acquire(1)
        outcomes: list[str] = []

        async def wait(name: str, flow: str) -> None:
            try:
                slot = await limiter.acquire(5, "master", flow)
            except QueueFullSignal as signal:
                outcomes.append(f"{name} {'displaced' if signal.displaced else 'refused'}")
                return
            outcomes.append(f"{name} served")
            slot.release()

        tasks = [asyncio.ensure_future(wait(f"item{n}", "batch:b1")) for n in range(3)]
        await asyncio.sleep(0)
        tasks.append(asyncio.ensure_future(wait("chat", "")))
        await asyncio.sleep(0)
        held.release()
        await asyncio.gather(*tasks)
        return outcomes

    assert asyncio.run(main()) == ["item2 displaced", "item0 served", "chat served", "item1 served"]


def test_a_waiter_cancelled_but_not_yet_out_of_a_full_queue_is_never_displaced_into_an_error():
    """A waiter's task cancelled (its client gone, its wait timed out) has its future cancelled at once but leaves
    the queue only when the task runs next: a newcomer that finds the queue full meanwhile takes its place, and
    neither fails with the future's InvalidStateError (a 500)."""
    async def main() -> list[str]:
        limiter = Limiter("p", 1, 2, aimd=False, recover_s=1.0)
        held = await limiter.acquire(1)
        outcomes: list[str] = []

        async def wait(name: str, owner: str) -> None:
            try:
                slot = await limiter.acquire(5, owner)
            except QueueFullSignal as signal:
                outcomes.append(f"{name} {'displaced' if signal.displaced else 'refused'}")
                return
            except asyncio.CancelledError:
                outcomes.append(f"{name} cancelled")
                raise
            outcomes.append(f"{name} served")
            slot.release()

        waiting = [asyncio.ensure_future(wait(f"a{n}", "a")) for n in range(2)]
        await asyncio.sleep(0)
        newcomer = asyncio.ensure_future(wait("b0", "b"))  # scheduled before the cancelled waiter's next step
        waiting[1].cancel()
        for _ in range(3):
            await asyncio.sleep(0)
        assert not newcomer.done() or newcomer.exception() is None, newcomer.exception()
        held.release()
        await asyncio.gather(newcomer, *waiting, return_exceptions=True)
        assert limiter.in_flight == 0 and len(limiter.waiters) == 0 and not limiter.waiters.owners
        assert limiter.rejected == 0  # nobody was refused: the cancelled waiter's place was free
        return outcomes

    assert sorted(asyncio.run(main())) == ["a0 served", "a1 cancelled", "b0 served"]


def test_pause_lets_one_probe_out_at_a_time_and_its_success_releases_everybody():
    async def main() -> None:
        pauses = Pauses()
        calls: list[str] = []  # what reached the "upstream", in order
        storm = {"left": 2}     # the probe gets 429 twice more, then the upstream answers

        async def caller(n: int) -> str:
            while True:
                probe = await pauses.wait("p/m", budget_s=30, longest_s=30)
                calls.append("probe" if probe else "call")
                if probe and storm["left"]:
                    storm["left"] -= 1
                    pauses.pause("p/m", 0.01, probe=True)
                    continue
                if probe:
                    pauses.success("p/m")
                return f"ok {n}"

        pauses.pause("p/m", 0.01)
        results = await asyncio.gather(*(caller(n) for n in range(20)))
        assert results == [f"ok {n}" for n in range(20)]
        assert calls[:3] == ["probe"] * 3  # nobody else went upstream while the probes were out
        assert calls[3:] == ["call"] * 19
        assert pauses.snapshot() == {"held": 0, "times_paused": 3, "lifted_by_probe": 1, "deployments": {}}

    asyncio.run(main())


def test_pause_budget_and_an_abandoned_probe():
    async def main() -> None:
        pauses = Pauses()
        assert await pauses.wait("p/m", budget_s=0, longest_s=0) is False  # not paused: go
        pauses.pause("p/m", 5)
        with pytest.raises(PausedSignal) as caught:  # longer than the caller may wait: refused at once
            await pauses.wait("p/m", budget_s=1, longest_s=30)
        assert 4 < caught.value.remaining_s <= 5
        with pytest.raises(PausedSignal):
            await pauses.wait("p/m", budget_s=30, longest_s=1)
        pauses.pause("q/m", 0)
        assert await pauses.wait("q/m", budget_s=1, longest_s=1) is True  # the probe
        waiter = asyncio.ensure_future(pauses.wait("q/m", budget_s=30, longest_s=30))
        await asyncio.sleep(0.01)
        assert not waiter.done()  # waits for the probe's verdict
        pauses.abandon("q/m")     # the probe was cancelled: the next waiter probes
        assert await waiter is True
        with pytest.raises(PausedSignal) as caught:  # no verdict within the budget
            await pauses.wait("q/m", budget_s=0.02, longest_s=30)
        assert caught.value.remaining_s == 0

    asyncio.run(main())


def test_a_shared_pause_asks_the_arbiter_once_per_process_and_follows_its_verdict():
    class Arbiter:
        def __init__(self) -> None:
            self.turns: list[asyncio.Future[bool | float | None]] = []
            self.reports: list[tuple[str, ...]] = []

        def paused(self, deployment: str, seconds: float, probe: bool) -> None:
            self.reports.append(("paused", deployment))

        def lifted(self, deployment: str) -> None:
            self.reports.append(("lifted", deployment))

        def abandoned(self, deployment: str) -> None:
            self.reports.append(("abandoned", deployment))

        async def turn(self, deployment: str) -> bool | float | None:
            self.turns.append(asyncio.get_running_loop().create_future())
            return await self.turns[-1]

    async def main() -> None:
        arbiter = Arbiter()
        pauses = Pauses(arbiter)
        pauses.adopt("p/m", 0.0, 1.0)  # another instance paused it; it has just ended
        waiters = [asyncio.ensure_future(pauses.wait("p/m", budget_s=30, longest_s=30)) for _ in range(5)]
        await asyncio.sleep(0.01)
        assert len(arbiter.turns) == 1  # one caller of this process asks; the others wait for the answer
        arbiter.turns[0].set_result(0.02)  # another instance's probe got a 429 again: 20 ms more
        await asyncio.sleep(0.05)
        assert len(arbiter.turns) == 2 and not any(w.done() for w in waiters)
        arbiter.turns[1].set_result(None)  # another instance's probe was answered: everybody goes
        assert await asyncio.gather(*waiters) == [False] * 5
        assert pauses.snapshot()["deployments"] == {} and pauses.adopted == 1
        pauses.pause("p/m", 0.0)
        probe = asyncio.ensure_future(pauses.wait("p/m", budget_s=30, longest_s=30))
        await asyncio.sleep(0.01)
        arbiter.turns[2].set_result(True)  # this process won the probe
        assert await probe is True
        pauses.success("p/m")
        assert arbiter.reports == [("paused", "p/m"), ("lifted", "p/m")]
        with pytest.raises(PausedSignal):  # no verdict within the caller's budget
            pauses.adopt("q/m", 0.0, 1.0)
            await pauses.wait("q/m", budget_s=0.02, longest_s=30)
        assert not pauses.active["q/m"].probing  # the next caller asks in its turn

    asyncio.run(main())


def test_shared_documents_are_read_once_for_all_the_callers_that_find_the_copy_stale():
    """Under load dozens of calls find the 0.2 s old copy of a shared breaker or pause stale at once: one store read
    answers all of them (each used to make its own), a cancelled caller leaves it to the others, a failure reaches
    every caller and the next call reads again."""
    from types import SimpleNamespace

    from scillm_resilience.shared import BREAKER_NS, MIRROR_S, Shared

    class Store:
        def __init__(self) -> None:
            self.reads = 0
            self.answer: asyncio.Future[dict[str, str] | None] | None = None

        async def get(self, namespace: str, key: str) -> dict[str, str] | None:
            self.reads += 1
            self.answer = asyncio.get_running_loop().create_future()
            return await self.answer

    async def main() -> None:
        store = Store()
        runtime = SimpleNamespace(store=store, instance_id="me", config=SimpleNamespace(
            state=SimpleNamespace(claim_timeout_s=30)))
        shared = Shared(runtime, aimd=False, recover_s=1.0)  # type: ignore[arg-type]
        callers = [asyncio.ensure_future(shared._doc(BREAKER_NS, "p/m")) for _ in range(50)]
        await asyncio.sleep(0)
        callers[0].cancel()  # the caller that started the read goes away: the read goes on for the others
        await asyncio.sleep(0)
        assert store.reads == 1 and store.answer is not None
        store.answer.set_result({"state": "open"})
        assert await asyncio.gather(*callers[1:]) == [{"state": "open"}] * 49
        assert await shared._doc(BREAKER_NS, "p/m") == {"state": "open"} and store.reads == 1  # fresh: no read
        shared.mirrors[(BREAKER_NS, "p/m")] = (time.monotonic() - MIRROR_S, {"state": "open"})  # stale again
        failing = [asyncio.ensure_future(shared._doc(BREAKER_NS, "p/m")) for _ in range(3)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert store.reads == 2 and store.answer is not None
        store.answer.set_exception(ConnectionError("redis down"))
        assert [type(r) for r in await asyncio.gather(*failing, return_exceptions=True)] == [ConnectionError] * 3
        again = asyncio.ensure_future(shared._doc(BREAKER_NS, "p/m"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert store.reads == 3 and store.answer is not None  # the failed read is not reused
        store.answer.set_result(None)
        assert await again is None

    asyncio.run(main())


def test_global_slots_are_one_count_per_process_and_a_slot_taken_for_a_caller_that_left_goes_back(tmp_path):
    """Two processes on one store (the per-process count of ``StateStore.hold_slots``): the limit holds across
    them, a release reaches the store so the other process gets the slot, and a caller that leaves while its slot
    is being taken does not keep it taken (it goes back with the next call)."""
    from types import SimpleNamespace

    from scillm_resilience.shared import Shared

    from scillm_core.state.sqlite import SQLiteStore

    class Gated(SQLiteStore):
        gate: asyncio.Event | None = None

        async def hold_slots(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if self.gate is not None:
                await self.gate.wait()
            return await super().hold_slots(*args, **kwargs)

    async def main() -> None:
        stores = [Gated(tmp_path / "state.sqlite3"), Gated(tmp_path / "state.sqlite3")]
        a, b = (Shared(SimpleNamespace(store=store, instance_id=f"process-{i}", presence=None, config=SimpleNamespace(
            state=SimpleNamespace(claim_timeout_s=30))), aimd=False, recover_s=1.0)  # type: ignore[arg-type]
            for i, store in enumerate(stores))
        limiter = SimpleNamespace(provider="p", limit=3, effective=3)
        first = [await a.acquire(limiter, 5.0) for _ in range(2)]  # type: ignore[arg-type]
        assert None not in first and await stores[1].slots_held("limits:p") == 2

        stores[0].gate = asyncio.Event()
        leaving = asyncio.ensure_future(a.acquire(limiter, 5.0))  # type: ignore[arg-type]
        for _ in range(5):
            await asyncio.sleep(0)
        leaving.cancel()
        stores[0].gate.set()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        await a.batch("p").task
        assert a.batch("p").held == 2 and await stores[1].slots_held("limits:p") == 2

        assert await b.acquire(limiter, 5.0) is not None  # type: ignore[arg-type]
        with pytest.raises(QueueTimeoutSignal):
            await b.acquire(limiter, 0.05)  # type: ignore[arg-type]
        a.release(first[0])
        assert await b.acquire(limiter, 5.0) is not None  # type: ignore[arg-type]
        assert await stores[0].slots_held("limits:p") == 3 and b.batch("p").held == 2 and a.batch("p").held == 1
        for store in stores:
            await store.close()

    asyncio.run(main())
