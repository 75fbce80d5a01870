"""What a key (or a team) may spend and how fast: the limits the budgets plugin enforces on every provider call."""

from __future__ import annotations

import math
from typing import Any

from attrs import asdict, frozen

from scillm_core import errors

__all__ = ["LIMIT_FIELDS", "Limits", "parse_limits"]


@frozen(kw_only=True)
class Limits:
    """Each limit is off when ``None``. Dollars are per UTC calendar day / month; rates per clock minute."""

    daily_usd: float | None = None       # dollars per UTC day
    monthly_usd: float | None = None     # dollars per UTC month
    rpm: int | None = None               # requests (provider calls) per minute
    tpm: int | None = None               # tokens per minute (input + output)
    max_concurrency: int | None = None   # provider calls in flight at once

    @property
    def empty(self) -> bool:
        return all(value is None for value in asdict(self).values())

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


LIMIT_FIELDS = tuple(a.name for a in Limits.__attrs_attrs__)
_INTEGERS = {"rpm", "tpm", "max_concurrency"}
_MAX = 1e12


def parse_limits(raw: Any, where: str = "$.limits") -> Limits:
    """``{"daily_usd": 5, "rpm": 60, ...}`` as :class:`Limits`; 400 naming the path of anything wrong."""
    if raw is None:
        return Limits()
    if not isinstance(raw, dict):
        raise errors.InvalidRequest(f"limits must be an object @ {where}", param=where)
    values: dict[str, Any] = {}
    for name, value in raw.items():
        path = f"{where}.{name}" if isinstance(name, str) and name.isidentifier() else where
        if name not in LIMIT_FIELDS:
            raise errors.InvalidRequest(f"unknown limit {str(name)[:60]!r} (known: {', '.join(LIMIT_FIELDS)}) "
                                        f"@ {path}", param=path)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or value <= 0 or value > _MAX:
            raise errors.InvalidRequest(f"{name} must be a positive number @ {path}", param=path)
        if name in _INTEGERS:
            if value != int(value):
                raise errors.InvalidRequest(f"{name} must be a whole number @ {path}", param=path)
            value = int(value)
        else:
            value = float(value)
        values[name] = value
    return Limits(**values)
