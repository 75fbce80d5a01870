"""Circuit breaker per deployment: closed -> (N consecutive failures) -> open for a cooldown -> half-open, where
exactly one request probes; its success closes the circuit, its failure opens it for another cooldown."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["Breaker", "Circuit"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Circuit:
    __slots__ = (
        "consecutive_failures",
        "last_error",
        "opened_at",
        "probing",
        "state",
        "times_opened",
        "total_failures",
    )

    def __init__(self) -> None:
        self.state = CLOSED
        self.consecutive_failures = 0
        self.total_failures = 0
        self.times_opened = 0
        self.opened_at = 0.0
        self.probing = False
        self.last_error: str | None = None


class Breaker:
    def __init__(self, threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str, str, str, str | None, str | None], None] | None = None) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.circuits: dict[str, Circuit] = {}
        #: ``on_change(deployment, old, new, last_error, request_id)`` on every state transition (events, the log);
        #: ``request_id`` names the call that moved it (``None`` when the health endpoint saw a cooldown end)
        self.on_change = on_change

    def _moved(self, deployment: str, circuit: Circuit, old: str, request_id: str | None) -> None:
        if self.on_change is not None and circuit.state != old:
            self.on_change(deployment, old, circuit.state, circuit.last_error, request_id)

    def _circuit(self, deployment: str) -> Circuit:
        circuit = self.circuits.get(deployment)
        if circuit is None:
            circuit = self.circuits[deployment] = Circuit()
        return circuit

    def _refresh(self, deployment: str, circuit: Circuit, request_id: str | None = None) -> None:
        if circuit.state == OPEN and self.clock() - circuit.opened_at >= self.cooldown_s:
            circuit.state = HALF_OPEN
            circuit.probing = False
            self._moved(deployment, circuit, OPEN, request_id)

    def admit(self, deployment: str, request_id: str | None = None) -> str | None:
        """Admit one call: ``None`` when closed, ``"probe"`` when this call is the half-open probe. Raises
        :class:`CircuitOpenSignal` when the deployment must be skipped."""
        circuit = self.circuits.get(deployment)
        if circuit is None:
            return None
        self._refresh(deployment, circuit, request_id)
        if circuit.state == CLOSED:
            return None
        if circuit.state == HALF_OPEN and not circuit.probing:
            circuit.probing = True
            return "probe"
        raise CircuitOpenSignal(deployment, self.remaining(deployment), circuit)

    def remaining(self, deployment: str) -> float:
        circuit = self.circuits.get(deployment)
        if circuit is None or circuit.state == CLOSED:
            return 0.0
        return max(0.0, self.cooldown_s - (self.clock() - circuit.opened_at))

    def success(self, deployment: str, request_id: str | None = None) -> None:
        circuit = self.circuits.get(deployment)
        if circuit is None:
            return
        old = circuit.state
        circuit.state = CLOSED
        circuit.consecutive_failures = 0
        circuit.probing = False
        self._moved(deployment, circuit, old, request_id)

    def failure(self, deployment: str, error: str, request_id: str | None = None) -> None:
        circuit = self._circuit(deployment)
        circuit.consecutive_failures += 1
        circuit.total_failures += 1
        circuit.last_error = error
        if circuit.state == HALF_OPEN or circuit.consecutive_failures >= self.threshold:
            old = circuit.state
            if circuit.state != OPEN:
                circuit.times_opened += 1
            circuit.state = OPEN
            circuit.opened_at = self.clock()
            circuit.probing = False
            self._moved(deployment, circuit, old, request_id)

    def abandon_probe(self, deployment: str) -> None:
        """The probe ended without a verdict (cancelled, a request error): let the next request probe."""
        circuit = self.circuits.get(deployment)
        if circuit is not None and circuit.state == HALF_OPEN:
            circuit.probing = False

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for deployment, circuit in sorted(self.circuits.items()):
            self._refresh(deployment, circuit)
            out[deployment] = {"state": circuit.state, "consecutive_failures": circuit.consecutive_failures,
                               "total_failures": circuit.total_failures, "times_opened": circuit.times_opened,
                               "cooldown_remaining_s": round(self.remaining(deployment), 3)
                               if circuit.state == OPEN else 0.0,
                               "probe_in_flight": circuit.probing, "last_error": circuit.last_error}
        return out


class CircuitOpenSignal(Exception):
    def __init__(self, deployment: str, remaining_s: float, circuit: Circuit) -> None:
        super().__init__(deployment)
        self.deployment = deployment
        self.remaining_s = remaining_s
        self.circuit = circuit
