"""Provider-wide pauses: an upstream 429 with a retry hint pauses its deployment for the hinted time.

While a deployment is paused nothing goes upstream: callers wait here (within their own budget) instead of each
collecting a 429. When the pause ends exactly one waiting caller probes; the others wait for its verdict: success
lifts the pause for everybody, another 429 with a hint pauses again, anything else lets the next waiter probe.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

__all__ = ["PausedSignal", "Pauses"]


class PausedSignal(Exception):
    """The pause (or the wait for the probe's verdict) outlasts what the caller may wait."""

    def __init__(self, remaining_s: float) -> None:
        super().__init__(remaining_s)
        self.remaining_s = remaining_s


class _Pause:
    __slots__ = ("changed", "hint_s", "probing", "until")

    def __init__(self) -> None:
        self.until = 0.0
        self.hint_s = 0.0
        self.probing = False
        self.changed = asyncio.Event()


class Pauses:
    def __init__(self) -> None:
        self.active: dict[str, _Pause] = {}
        self.held = 0            # callers waiting right now
        self.times_paused = 0    # upstream 429s with a hint that (re)started a pause
        self.lifted = 0          # pauses ended by a successful probe

    def pause(self, deployment: str, seconds: float, *, probe: bool = False) -> None:
        """An upstream 429 asked ``deployment``'s callers to wait ``seconds``; ``probe``: the probe got it."""
        pause = self.active.get(deployment)
        if pause is None:
            pause = self.active[deployment] = _Pause()
        pause.until = max(pause.until, time.monotonic() + seconds)
        pause.hint_s = seconds
        if probe:
            pause.probing = False
        self.times_paused += 1
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
                    return True
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

    def success(self, deployment: str) -> None:
        """The probe was answered: lift the pause for every waiting caller."""
        pause = self.active.pop(deployment, None)
        if pause is not None:
            self.lifted += 1
            _notify(pause)

    def abandon(self, deployment: str) -> None:
        """The probe ended without a verdict (cancelled, another error): the next waiter probes."""
        pause = self.active.get(deployment)
        if pause is not None and pause.probing:
            pause.probing = False
            _notify(pause)

    def snapshot(self) -> dict[str, Any]:
        return {"held": self.held, "times_paused": self.times_paused, "lifted_by_probe": self.lifted,
                "deployments": {d: {"remaining_s": round(self.remaining(d), 3), "hint_s": p.hint_s,
                                    "probe_in_flight": p.probing} for d, p in sorted(self.active.items())}}


def _notify(pause: _Pause) -> None:
    pause.changed.set()
    pause.changed = asyncio.Event()
