"""Prices per million tokens and what a call costs: the shipped table (``prices.toml``) under ``[pricing]``.

Usage is split four ways before it is priced: prompt tokens read from the provider's cache, prompt tokens written
to it, the rest of the prompt, and output (reasoning included). Each has its own rate; an entry without a
``cache_read`` or ``cache_write`` rate charges those tokens at its ``input`` rate. A model with no entry has no
price: its cost is ``None``, never a guess.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, NamedTuple

from attrs import field, frozen, validators

from scillm_core import Usage

__all__ = ["NANO", "Price", "PriceTable", "Tokens", "shipped_prices", "tokens_of"]

NANO = 1e9  # budgets count in nano-dollars: integers, so sums never drift
_DATED = re.compile(r"-(?:20\d\d-?\d\d-?\d\d)$")
_rate = validators.optional(validators.and_(validators.instance_of(float | int), validators.ge(0)))


@frozen(kw_only=True)
class Price:
    """US dollars per million tokens."""

    input: float = field(validator=_rate)
    output: float = field(validator=_rate)
    cache_read: float | None = field(default=None, validator=_rate)
    cache_write: float | None = field(default=None, validator=_rate)
    max_output_tokens: int | None = field(default=None, validator=validators.optional(validators.gt(0)))

    def usd(self, tokens: Tokens) -> float:
        read = self.input if self.cache_read is None else self.cache_read
        write = self.input if self.cache_write is None else self.cache_write
        return (tokens.input * self.input + tokens.output * self.output + tokens.cache_read * read
                + tokens.cache_write * write) / 1e6

    def nano(self, tokens: Tokens) -> int:
        return math.ceil(self.usd(tokens) * NANO - 1e-6)


class Tokens(NamedTuple):
    input: int  # prompt tokens neither read from nor written to a cache
    output: int
    cache_read: int = 0
    cache_write: int = 0

    @property
    def total(self) -> int:
        return self.input + self.output + self.cache_read + self.cache_write

    def as_dict(self) -> dict[str, int]:
        return {"input": self.input, "output": self.output, "cache_read": self.cache_read,
                "cache_write": self.cache_write}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


_CACHE_FIELDS = frozenset(("prompt_tokens_details", "prompt_cache_hit_tokens", "cache_read_input_tokens",
                           "cache_creation_input_tokens"))


def tokens_of(usage: Usage) -> Tokens:
    """Split normalised usage: ``prompt_tokens`` counts every prompt token, cache reads and writes included
    (``prompt_tokens_details.cached_tokens``, DeepSeek's ``prompt_cache_hit_tokens``; Anthropic's
    ``cache_read_input_tokens`` / ``cache_creation_input_tokens``)."""
    extra = usage.extra
    prompt = max(0, usage.prompt_tokens)
    if not extra or extra.keys().isdisjoint(_CACHE_FIELDS):  # nothing about caches: the prompt at the input rate
        return Tokens(prompt, max(0, usage.completion_tokens))
    details = extra.get("prompt_tokens_details")
    read = _int(details.get("cached_tokens")) if isinstance(details, Mapping) else 0
    read = read or _int(extra.get("prompt_cache_hit_tokens")) or _int(extra.get("cache_read_input_tokens"))
    write = _int(extra.get("cache_creation_input_tokens"))
    return Tokens(input=max(0, prompt - read - write), output=max(0, usage.completion_tokens),
                  cache_read=min(read, prompt), cache_write=min(write, max(0, prompt - read)))


def shipped_prices() -> dict[str, Price]:
    raw = tomllib.loads((Path(__file__).parent / "prices.toml").read_text())
    return {name: Price(**entry) for name, entry in raw["models"].items()}


class PriceTable:
    """Shipped prices with the config's entries over them; keys are ``provider/model`` or fnmatch patterns."""

    def __init__(self, overrides: Mapping[str, Price] | None = None) -> None:
        self.prices = {**shipped_prices(), **(overrides or {})}
        self.patterns = [(name, price) for name, price in self.prices.items() if any(c in name for c in "*?[")]
        self._found: dict[str, Price | None] = {}

    def lookup(self, provider: str, model: str) -> Price | None:
        deployment = f"{provider}/{model}"
        try:
            return self._found[deployment]
        except KeyError:
            pass
        price = self.prices.get(deployment)
        if price is None and _DATED.search(model):
            price = self.prices.get(f"{provider}/{_DATED.sub('', model)}")
        if price is None:
            price = next((p for name, p in self.patterns if fnmatchcase(deployment, name)), None)
        if len(self._found) < 10_000:
            self._found[deployment] = price
        return price
