"""Leases: a process admits calls against room it took from the store's counters, a little ahead of need.

Every limited counter (a budget's dollars held, a minute's requests or tokens, concurrency slots) lives in the
state store and only ever grows through ``StateStore.count`` with its limit, so everything all processes hold
together never passes a limit. Taking room one call at a time would cost a store write per call; instead, when a
call does not fit in what this process already holds for a counter (its ``free`` room), the process takes the call's
amount plus a little more (``chunk``: 32 calls' worth, at most a tenth of the limit, never a concurrency slot
more than needed) in the same atomic group. Calls that fit in the free room are admitted without the store (and
without building a ``Count``: :meth:`Leases.take`). What a call did not use (a reservation above its actual cost,
its tokens, its slot) goes back to the free room when it settles.

Every ``linger_s`` (:meth:`Leases.linger`) the room no call drew from since the previous linger goes back to the
store (with the counter's ttl, so a returned window counter still expires), and so does every debt (a call that
cost more than it reserved): another process never waits longer than two lingers for room (or a concurrency slot)
this one is not using, while room a busy process keeps drawing from (a slot its calls keep reusing) stays with it
instead of going back and forth every linger. The settled spend of calls (counters without a limit) is summed in
memory and written at each linger as one change per counter. At shutdown, and before ``/v1/budget`` or ``doctor``
read, everything goes back (:meth:`Leases.give_back_all`).

The bound of the reservations holds: the store's counter is settled spend + reservations of calls in flight + free
room, and the store refuses any growth past the limit, so calls are admitted only against room the limit allows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from scillm_core.state import Count, Counted

if TYPE_CHECKING:
    from scillm_core.state.counters import CountBatcher

__all__ = ["Leases"]

CHUNK_CALLS = 32       # take room for this many calls like the one at hand (a busy process's calls in a linger) ...
CHUNK_SHARE = 0.1      # ... but never more than this share of the limit
NEVER = -1             # the linger mark of room no call drew from yet
ROOM, TTL, MARK = 0, 1, 2  # a free room entry: [room no call uses, its ttl, the linger in which a call last drew]


class Leases:
    def __init__(self, counters: CountBatcher, *, linger_s: float = 0.05) -> None:
        self.counters = counters
        self.linger_s = linger_s
        # counter key -> [room no call uses, its ttl, the linger in which a call last drew from it] (changed in place)
        self.free: dict[str, list[Any]] = {}
        self.spent: dict[str, list[Any]] = {}  # settled-spend counter -> [not yet written, ttl]
        self.lingers = 0  # lingers so far: the current one's number
        self.timer: asyncio.TimerHandle | None = None
        self.stats = {"from_room": 0, "from_store": 0}  # calls admitted from room held ahead / with a round trip

    def take(self, keys: Sequence[str], amounts: Sequence[float]) -> bool:
        """Admit a call wholly from the free room if every amount fits there (no store, no ``Count``); else change
        nothing and say so (:meth:`admit` then takes what is missing from the store)."""
        free = self.free
        entries = []
        for key, amount in zip(keys, amounts, strict=True):
            if amount > 0:
                entry = free.get(key)
                if entry is None or entry[ROOM] < amount:
                    self.stats["from_store"] += 1
                    return False
                entries.append((entry, amount))
        now = self.lingers
        for entry, amount in entries:
            entry[ROOM] -= amount
            entry[MARK] = now
        self.stats["from_room"] += 1
        return True

    async def admit(self, changes: Sequence[Count], slots: frozenset[str]) -> tuple[list[Count], Counted] | None:
        """Admit one call: each change's amount from the free room, the rest from the store (with a chunk ahead).
        ``None`` when admitted; else the refused group of exact needs and the store's answer to it."""
        taken: list[tuple[str, float, float | None]] = []
        needs: list[Count] = []
        for change in changes:
            entry = self.free.get(change.key)
            local = min(max(entry[ROOM], 0.0), change.delta) if entry is not None else 0.0
            if entry is not None and local:
                entry[ROOM] -= local
                entry[MARK] = self.lingers
                taken.append((change.key, local, entry[TTL]))
            if change.delta - local > 0:
                needs.append(change._replace(delta=change.delta - local))
        if not needs:
            return None
        ahead = [self._ahead(need, need.key in slots) for need in needs]
        for group in ([n._replace(delta=n.delta + a) for n, a in zip(needs, ahead, strict=True)], needs):
            try:
                outcome = await self.counters.count(group)
            except BaseException:
                self._give_back(taken)
                raise
            if outcome.applied:
                for change, extra in zip(needs, ahead, strict=True):
                    if extra and group is not needs:
                        self._add(change.key, extra, change.ttl_s, drawn=True)
                return None
            if not any(ahead):
                break  # the exact needs were refused already
        self._give_back(taken)
        return needs, outcome

    def release(self, key: str, amount: float, ttl_s: float | None) -> None:
        """Room a settled call gives back (an unused reservation, tokens, a slot); negative when it cost more than
        it reserved (a debt: the store learns it at the next linger)."""
        self.release_each(((key, ttl_s),), amount)

    def release_each(self, counters: Sequence[tuple[str, float | None]], amount: float) -> None:
        """:meth:`release` of the same ``amount`` to each of ``counters`` (key, ttl)."""
        if not amount:
            return
        free = self.free
        for key, ttl in counters:
            entry = free.get(key)
            if entry is None:
                free[key] = [amount, ttl, NEVER]
            else:
                entry[ROOM] += amount
                if entry[TTL] is None:
                    entry[TTL] = ttl
        self._wait()

    def spend(self, counters: Sequence[tuple[str, float | None]], amount: float) -> None:
        """Add a settled call's cost to settled-spend counters (they have no limit): summed in memory and written at
        the next linger, one change per counter (:meth:`flush_spent` queues them at once)."""
        if not amount or not counters:
            return
        spent = self.spent
        for key, ttl in counters:
            entry = spent.get(key)
            if entry is None:
                spent[key] = [amount, ttl]
            else:
                entry[0] += amount
                entry[1] = ttl
        self._wait()

    def flush_spent(self) -> None:
        """Queue the settled spend not yet written (ahead of any change queued after this)."""
        if self.spent:
            self.counters.later([Count(key, total, ttl_s=ttl) for key, (total, ttl) in self.spent.items()])
            self.spent.clear()

    def _ahead(self, need: Count, slot: bool) -> float:
        if slot or need.limit is None:
            return 0.0
        chunk = min(need.delta * CHUNK_CALLS, need.limit * CHUNK_SHARE)
        return max(0.0, chunk - need.delta)

    def _add(self, key: str, amount: float, ttl_s: float | None, *, drawn: bool = False) -> None:
        entry = self.free.get(key)
        if entry is None:
            self.free[key] = [amount, ttl_s, self.lingers if drawn else NEVER]
        else:
            entry[ROOM] += amount
            if entry[TTL] is None:
                entry[TTL] = ttl_s
            if drawn:
                entry[MARK] = self.lingers
        self._wait()

    def _give_back(self, taken: list[tuple[str, float, float | None]]) -> None:
        for key, amount, ttl in taken:
            self._add(key, amount, ttl)

    def _wait(self) -> None:
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.linger_s, self.linger)

    def linger(self) -> None:
        """One linger is over: write the settled spend, and give back the room no call drew from during it and every
        debt; room calls drew from stays (until a linger passes without any)."""
        self.timer = None
        self.flush_spent()
        current = self.lingers
        self.lingers += 1
        returns: list[Count] = []
        for key, (room, ttl, mark) in list(self.free.items()):
            if mark < current or room < 0:
                del self.free[key]
                if room:
                    returns.append(Count(key, -room, ttl_s=ttl))
        self.counters.later(returns)
        if self.free:
            self._wait()

    def give_back_all(self) -> None:
        """Return every free room to the store and write the settled spend (queued behind earlier changes, in
        order): at shutdown, and before a read of what a key has left."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.flush_spent()
        returns = [Count(key, -room, ttl_s=ttl) for key, (room, ttl, _) in self.free.items() if room]
        self.free.clear()
        self.counters.later(returns)
