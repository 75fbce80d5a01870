"""Provider-wide pauses: an upstream 429 with a retry hint pauses its deployment for the hinted time.

While a deployment is paused nothing goes upstream: callers wait here (within their own budget) instead of each
collecting a 429. When the pause ends exactly one waiting caller probes; the others wait for its verdict: success
lifts the pause for everybody, another 429 with a hint pauses again, anything else lets the next waiter probe.

With an ``arbiter`` (:class:`scillm_resilience.shared.SharedPauses`, on a Redis state store) the pause is shared by
every process and instance: a pause started anywhere holds callers everywhere, and of the callers each process
elects when the pause ends, exactly one across all of them probes; the others wait for its verdict.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

__all__ = ["Arbiter", "PausedSignal", "Pauses"]


class PausedSignal(Exception):
    """The pause (or the wait for the probe's verdict) outlasts what the caller may wait."""

    def __init__(self, remaining_s: float) -> None:
        super().__init__(remaining_s)
        self.remaining_s = remaining_s


class Arbiter(Protocol):
    """Where a pause is shared with other processes. Calls that report return at once (the work is spawned)."""

    def paused(self, deployment: str, seconds: float, probe: bool) -> None:
        """This process saw a 429 asking for ``seconds`` (``probe``: its probe got it)."""

    def lifted(self, deployment: str) -> None:
        """This process's probe was answered."""

    def abandoned(self, deployment: str) -> None:
        """This process's probe ended without a verdict."""

    async def turn(self, deployment: str) -> bool | float | None:
        """This process's elected caller asks to probe: ``True`` it probes; ``None`` the pause was lifted elsewhere;
        a number: the pause goes on for that many seconds (another process's probe was refused again). Waits while
        another process's probe is out; the caller bounds the wait."""


class _Pause:
    __slots__ = ("changed", "hint_s", "probing", "until")

    def __init__(self) -> None:
        self.until = 0.0
        self.hint_s = 0.0
        self.probing = False  # a caller of this process probes, or asks the arbiter whether it may
        self.changed = asyncio.Event()


class Pauses:
    def __init__(self, arbiter: Arbiter | None = None) -> None:
        self.active: dict[str, _Pause] = {}
        self.arbiter = arbiter
        self.held = 0            # callers waiting right now
        self.times_paused = 0    # upstream 429s with a hint that (re)started a pause
        self.lifted = 0          # pauses ended by a successful probe
        self.adopted = 0         # pauses another process started, taken on here

    def _get(self, deployment: str) -> _Pause:
        pause = self.active.get(deployment)
        if pause is None:
            pause = self.active[deployment] = _Pause()
        return pause

    def pause(self, deployment: str, seconds: float, *, probe: bool = False) -> None:
        """An upstream 429 asked ``deployment``'s callers to wait ``seconds``; ``probe``: the probe got it."""
        pause = self._get(deployment)
        pause.until = max(pause.until, time.monotonic() + seconds)
        pause.hint_s = seconds
        if probe:
            pause.probing = False
        self.times_paused += 1
        _notify(pause)
        if self.arbiter is not None:
            self.arbiter.paused(deployment, seconds, probe)

    def adopt(self, deployment: str, remaining_s: float, hint_s: float) -> None:
        """Another process paused ``deployment`` with ``remaining_s`` to go: callers here wait for it too."""
        pause = self.active.get(deployment)
        if pause is None:
            self.adopted += 1
            pause = self._get(deployment)
        if time.monotonic() + remaining_s > pause.until:
            pause.until = time.monotonic() + remaining_s
            pause.hint_s = hint_s
            _notify(pause)

    def remaining(self, deployment: str) -> float:
        pause = self.active.get(deployment)
        return max(0.0, pause.until - time.monotonic()) if pause is not None else 0.0

    def blocks(self, deployment: str) -> bool:
        return deployment in self.active

    async def wait(self, deployment: str, budget_s: float, longest_s: float) -> bool:
        """Return once ``deployment`` may be called: ``True`` when this caller is the probe. Raises
        :class:`PausedSignal` at once when the pause lasts longer than ``longest_s`` or ``budget_s``, and when
        ``budget_s`` runs out while waiting for a probe's verdict."""
        pause = self.active.get(deployment)
        if pause is None:
            return False
        give_up = time.monotonic() + budget_s
        self.held += 1
        try:
            while self.active.get(deployment) is pause:
                now = time.monotonic()
                if now >= pause.until and not pause.probing:
                    pause.probing = True
                    if self.arbiter is None or await self._turn(deployment, pause, give_up):
                        return True
                    continue
                left = pause.until - now
                if left > longest_s or pause.until > give_up or now >= give_up:
                    raise PausedSignal(max(left, 0.0))
                changed = pause.changed
                try:
                    async with asyncio.timeout(left if left > 0 else give_up - now):
                        await changed.wait()
                except TimeoutError:
                    pass
            return False  # the probe succeeded: the pause is lifted
        finally:
            self.held -= 1

    async def _turn(self, deployment: str, pause: _Pause, give_up: float) -> bool:
        """Ask the arbiter whether this process's elected caller probes; meanwhile the others here keep waiting."""
        assert self.arbiter is not None
        try:
            async with asyncio.timeout(max(give_up - time.monotonic(), 0.0)):
                verdict = await self.arbiter.turn(deployment)
        except BaseException as exc:
            pause.probing = False
            _notify(pause)  # the next waiter here asks in its turn
            if isinstance(exc, TimeoutError):
                raise PausedSignal(0.0) from None
            raise
        if verdict is True:
            return True
        pause.probing = False
        if verdict is None:
            if self.active.get(deployment) is pause:
                del self.active[deployment]  # another process's probe was answered
        else:
            pause.until = max(pause.until, time.monotonic() + float(verdict))
        _notify(pause)
        return False

    def success(self, deployment: str) -> None:
        """The probe was answered: lift the pause for every waiting caller."""
        pause = self.active.pop(deployment, None)
        if pause is not None:
            self.lifted += 1
            _notify(pause)
        if self.arbiter is not None:
            self.arbiter.lifted(deployment)

    def abandon(self, deployment: str) -> None:
        """The probe ended without a verdict (cancelled, another error): the next waiter probes."""
        pause = self.active.get(deployment)
        if pause is not None and pause.probing:
            pause.probing = False
            _notify(pause)
        if self.arbiter is not None:
            self.arbiter.abandoned(deployment)

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {"held": self.held, "times_paused": self.times_paused, "lifted_by_probe": self.lifted}
        if self.arbiter is not None:
            out["adopted_from_other_instances"] = self.adopted
        out["deployments"] = {d: {"remaining_s": round(self.remaining(d), 3), "hint_s": p.hint_s,
                                  "probe_in_flight": p.probing} for d, p in sorted(self.active.items())}
        return out


def _notify(pause: _Pause) -> None:
    pause.changed.set()
    pause.changed = asyncio.Event()
