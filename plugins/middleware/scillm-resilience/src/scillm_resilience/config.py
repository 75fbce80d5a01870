"""The ``[resilience]`` config table (claimed through ``scillm_config_sections``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attrs import field, frozen, validators

__all__ = ["LimitConfig", "ResilienceConfig"]

_non_negative = validators.ge(0)
_seconds = validators.ge(0.0)
_positive_seconds = validators.gt(0.0)


@frozen(kw_only=True)
class LimitConfig:
    """Concurrency for one provider: at most ``max_concurrency`` upstream calls in flight, at most ``max_queue``
    more waiting for a slot (FIFO); anything beyond is refused at once (429)."""

    max_concurrency: int = field(default=64, validator=validators.ge(1))
    max_queue: int = field(default=1024, validator=_non_negative)


@frozen(kw_only=True)
class ResilienceConfig:
    enabled: bool = True                     # master switch: off = the plugin passes every call through untouched
    # retries of the same deployment (before the first chunk only)
    retries: bool = True
    max_retries: int = field(default=2, validator=_non_negative)
    backoff_base_s: float = field(default=0.5, validator=_seconds)
    backoff_max_s: float = field(default=8.0, validator=_seconds)
    max_retry_after_s: float = field(default=30.0, validator=_seconds)
    # an upstream 429 with a retry hint pauses its deployment for everybody; callers wait it out
    pause: bool = True
    max_pause_wait_s: float = field(default=60.0, validator=_seconds)  # longest one request is held in total
    # fallback along the group's members
    fallbacks: bool = True
    # a group's stream that breaks after its first chunk is finished by the next member (docs/failover.md)
    continuation: bool = True
    # circuit breaker per deployment (provider/model)
    breaker: bool = True
    breaker_threshold: int = field(default=5, validator=validators.ge(1))
    breaker_cooldown_s: float = field(default=30.0, validator=_seconds)
    # the request ``timeout`` as one deadline across retries and fallbacks
    deadline: bool = True
    # per-provider concurrency limits with a bounded queue, AIMD on upstream 429
    concurrency: bool = True
    default_limit: LimitConfig = field(factory=LimitConfig)
    limits: Mapping[str, LimitConfig] = field(factory=dict)
    queue_wait_s: float = field(default=60.0, validator=_positive_seconds)
    aimd: bool = True
    aimd_recover_s: float = field(default=5.0, validator=_positive_seconds)
    # a client that disconnects cancels its upstream call (chat-style routes only)
    cancel_on_disconnect: bool = True
    disconnect_paths: tuple[str, ...] = ("/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/embeddings")

    def switches(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "retries": self.retries, "fallbacks": self.fallbacks,
                "continuation": self.continuation,
                "breaker": self.breaker, "pause": self.pause, "deadline": self.deadline,
                "concurrency": self.concurrency,
                "aimd": self.aimd, "cancel_on_disconnect": self.cancel_on_disconnect}
