"""``[tracing]`` and the standard ``OTEL_*`` variables, resolved once at start-up (the table wins over the
environment, as everywhere in scillm; both are read from the app's environment, not the process's)."""

from __future__ import annotations

from collections.abc import Mapping

from attrs import frozen

from scillm_core.config import ConfigError

__all__ = ["Settings", "TracingConfig", "resolve"]

PROTOCOL = "http/protobuf"
TRACES_PATH = "/v1/traces"


@frozen(kw_only=True)
class TracingConfig:
    enabled: bool = False
    #: OTLP/HTTP endpoint: a collector's base URL (``/v1/traces`` is appended) or the full traces URL. Else
    #: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (full URL), ``OTEL_EXPORTER_OTLP_ENDPOINT`` (base), or
    #: ``http://localhost:4318``.
    endpoint: str | None = None
    #: Only ``http/protobuf`` (else ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``).
    protocol: str | None = None
    #: Fraction of new traces kept, 0..1 (else ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``; default 1).
    #: A continued trace follows the caller's sampling decision.
    sample_ratio: float | None = None
    #: ``service.name`` (else ``OTEL_SERVICE_NAME``, else ``scillm``); ``OTEL_RESOURCE_ATTRIBUTES`` are added.
    service_name: str | None = None
    #: Record prompts and completions (``gen_ai.input.messages`` / ``gen_ai.output.messages``, secrets
    #: redacted, each cut at ``max_content_chars``). Off: no message text is ever exported.
    record_content: bool = False
    max_content_chars: int = 4096
    #: Export timeout per batch (else ``OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`` / ``OTEL_EXPORTER_OTLP_TIMEOUT``, ms).
    timeout_s: float | None = None


@frozen(kw_only=True)
class Settings:
    endpoint: str
    sample_ratio: float
    parent_based: bool
    service_name: str
    resource: Mapping[str, str]
    headers: Mapping[str, str]  # OTEL_EXPORTER_OTLP(_TRACES)_HEADERS: collector credentials, never shown
    timeout_s: float
    compression: str | None
    batch: Mapping[str, int]  # BatchSpanProcessor settings from OTEL_BSP_*
    record_content: bool
    max_content_chars: int
    certificate: str | None = None         # CA bundle to verify the collector (OTEL_EXPORTER_OTLP_CERTIFICATE)
    client_certificate: str | None = None  # mTLS (OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE / _CLIENT_KEY)
    client_key: str | None = None


def _env(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name)
        if value:
            return value.strip()
    return None


def _traces_url(endpoint: str, *, base: bool) -> str:
    endpoint = endpoint.strip()
    if not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"[tracing] endpoint must be an http:// or https:// URL, not {endpoint!r}")
    if not base or endpoint.rstrip("/").endswith(TRACES_PATH):
        return endpoint
    return endpoint.rstrip("/") + TRACES_PATH


def _pairs(text: str | None, what: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` (URL-encoded values allowed), as in ``OTEL_RESOURCE_ATTRIBUTES``."""
    from urllib.parse import unquote

    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what}: expected key=value pairs separated by commas")
        out[key.strip()] = unquote(value.strip())
    return out


def _sampler(cfg: TracingConfig, env: Mapping[str, str]) -> tuple[float, bool]:
    if cfg.sample_ratio is not None:
        if not 0.0 <= cfg.sample_ratio <= 1.0:
            raise ConfigError(f"[tracing] sample_ratio must be between 0 and 1, not {cfg.sample_ratio}")
        return cfg.sample_ratio, True
    name = (_env(env, "OTEL_TRACES_SAMPLER") or "parentbased_always_on").lower()
    arg = _env(env, "OTEL_TRACES_SAMPLER_ARG")
    known = {"always_on": (1.0, False), "always_off": (0.0, False), "traceidratio": (None, False),
             "parentbased_always_on": (1.0, True), "parentbased_always_off": (0.0, True),
             "parentbased_traceidratio": (None, True)}
    if name not in known:
        raise ConfigError(f"OTEL_TRACES_SAMPLER={name!r} is not supported (one of: {', '.join(known)})")
    ratio, parent_based = known[name]
    if ratio is None:
        try:
            ratio = 1.0 if arg is None else float(arg)
        except ValueError:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG must be a number between 0 and 1, not {arg!r}") from None
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG must be between 0 and 1, not {arg}")
    return ratio, parent_based


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = _env(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, not {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive, not {raw!r}")
    return value


def resolve(cfg: TracingConfig, env: Mapping[str, str]) -> Settings:
    """The effective settings; a :class:`ConfigError` naming the key or variable when one is wrong."""
    protocol = cfg.protocol or _env(env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol and protocol != PROTOCOL:
        raise ConfigError(f"[tracing] protocol {protocol!r} is not supported: scillm exports OTLP over HTTP with "
                          f"protobuf (protocol = {PROTOCOL!r}, port 4318 on most collectors)")
    if cfg.endpoint:
        endpoint = _traces_url(cfg.endpoint, base=True)
    elif full := _env(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        endpoint = _traces_url(full, base=False)
    else:
        endpoint = _traces_url(_env(env, "OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318", base=True)
    ratio, parent_based = _sampler(cfg, env)
    resource = _pairs(_env(env, "OTEL_RESOURCE_ATTRIBUTES"), "OTEL_RESOURCE_ATTRIBUTES")
    service = cfg.service_name or _env(env, "OTEL_SERVICE_NAME") or resource.get("service.name") or "scillm"
    headers = _pairs(_env(env, "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"),
                     "OTEL_EXPORTER_OTLP_HEADERS")
    timeout_s = cfg.timeout_s
    if timeout_s is None:
        timeout_s = _int(env, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", 0) / 1000 or \
            _int(env, "OTEL_EXPORTER_OTLP_TIMEOUT", 10_000) / 1000
    if timeout_s <= 0:
        raise ConfigError(f"[tracing] timeout_s must be positive, not {timeout_s}")
    compression = _env(env, "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION")
    if compression not in (None, "none", "gzip", "deflate"):
        raise ConfigError(f"OTEL_EXPORTER_OTLP_COMPRESSION must be none, gzip or deflate, not {compression!r}")
    batch = {"schedule_delay_millis": _int(env, "OTEL_BSP_SCHEDULE_DELAY", 5000),
             "max_queue_size": _int(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048),
             "max_export_batch_size": _int(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
             "export_timeout_millis": _int(env, "OTEL_BSP_EXPORT_TIMEOUT", 30_000)}
    if cfg.max_content_chars < 1:
        raise ConfigError("[tracing] max_content_chars must be at least 1")
    return Settings(endpoint=endpoint, sample_ratio=ratio, parent_based=parent_based, service_name=service,
                    resource={**resource, "service.name": service}, headers=headers, timeout_s=timeout_s,
                    compression=None if compression == "none" else compression, batch=batch,
                    record_content=cfg.record_content, max_content_chars=cfg.max_content_chars,
                    certificate=_env(env, "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE"),
                    client_certificate=_env(env, "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
                                            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"),
                    client_key=_env(env, "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY"))
