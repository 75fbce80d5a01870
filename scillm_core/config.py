"""Configuration: ``scillm.toml`` (optional), the environment, and ``.env`` (never overriding the environment).

Top-level tables are claimed by plugins through ``scillm_config_sections`` (core claims its own the same way);
structuring is strict: an unknown table, key or a wrong type stops startup with the offending path.
"""

from __future__ import annotations

import contextlib
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
from attrs import field, frozen, validators

if TYPE_CHECKING:
    from scillm_core.http import ReplyLimits

__all__ = ["Config", "ConfigError", "Env", "GroupConfig", "PluginsConfig", "ProviderSettings", "ServerConfig",
           "StateConfig", "TimeoutSettings", "check_provider_tables", "load_config"]


class ConfigError(Exception):
    """The configuration is wrong; the message names the key and the file."""


class Env(Mapping[str, str]):
    """The process environment layered over a ``.env`` file; read-only so tests can pass their own."""

    def __init__(self, values: Mapping[str, str] | None = None, *, dotenv: Path | None = None) -> None:
        merged: dict[str, str] = {}
        if dotenv is not None and dotenv.is_file():
            from dotenv import dotenv_values

            merged.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
        merged.update(os.environ if values is None else values)
        self._values = merged

    def __getitem__(self, key: str) -> str:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def first(self, *names: str) -> str | None:
        """The first non-empty value among ``names`` (accepting the usual alternative spellings)."""
        for name in names:
            value = self._values.get(name)
            if value:
                return value
        return None


@frozen(kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 4001
    max_body_mb: float = 48.0              # chat-style request bodies (one 32 MiB file as base64, plus text)
    body_read_timeout_s: float = field(default=300.0, validator=validators.ge(0))  # whole body, from the head; 0: off
    heartbeat_s: float = 10.0
    max_upstream_reply_mb: float = 32.0    # an upstream body read whole (non-streaming answers, error bodies)
    max_upstream_stream_mb: float = 256.0  # a streamed upstream reply, in total
    max_upstream_line_mb: float = 8.0      # one line (SSE or NDJSON) of a streamed upstream reply
    passthrough: bool = True  # same-dialect requests go upstream as sent; false: every request is translated

    def reply_limits(self) -> ReplyLimits:
        from scillm_core.http import ReplyLimits

        mib = 1 << 20
        return ReplyLimits(max_reply_bytes=int(self.max_upstream_reply_mb * mib),
                           max_stream_bytes=int(self.max_upstream_stream_mb * mib),
                           max_line_bytes=int(self.max_upstream_line_mb * mib))


_optional_seconds = validators.optional(validators.gt(0))


@frozen(kw_only=True)
class TimeoutSettings:
    """Upstream timeouts in seconds (:mod:`scillm_core.timeouts`); ``None`` keeps what is set below this table."""

    timeout_s: float | None = field(default=None, validator=_optional_seconds)
    connect_timeout_s: float | None = field(default=None, validator=_optional_seconds)
    headers_timeout_s: float | None = field(default=None, validator=_optional_seconds)
    first_token_timeout_s: float | None = field(default=None, validator=_optional_seconds)
    idle_timeout_s: float | None = field(default=None, validator=_optional_seconds)


@frozen(kw_only=True)
class GroupConfig(TimeoutSettings):
    """A named model group: ``models[0]`` serves, the rest are its fallbacks in order. Its timeouts apply to every
    member's attempts, over the providers' own."""

    models: tuple[str, ...]


_optional_count = validators.optional(validators.ge(0))


@frozen(kw_only=True)
class ProviderSettings(TimeoutSettings):
    """``[providers.NAME]``: settings of a built-in provider, or, with ``kind``, a provider of your own (an
    OpenAI-compatible server: vLLM, SGLang, llama.cpp, LM Studio, a company proxy) declared under its own name."""

    base_url: str | None = None
    max_concurrency: int | None = field(default=None, validator=validators.optional(validators.ge(1)))
    max_queue: int | None = field(default=None, validator=_optional_count)
    # declared providers only (a table with ``kind``):
    kind: str | None = None
    key_env: str | None = None            # the variable holding its key; absent: the server needs none
    prefix: str | None = None             # model prefix; default "NAME/", "" for none
    models: tuple[str, ...] = ()          # bare model names it serves (and /v1/models lists)
    embeddings: bool | None = None        # whether it serves /embeddings (default: yes)

    #: Keys that only a declared provider (a table with ``kind``) takes.
    DECLARED_ONLY: ClassVar[tuple[str, ...]] = ("key_env", "prefix", "models", "embeddings")


@frozen(kw_only=True)
class StateConfig:
    """``[state]``: where what must survive a restart or be shared between processes lives. ``sqlite`` (the
    embedded default, under the data dir) or ``redis`` (``redis_url``, else ``$REDIS_URL``): every process and
    instance pointed at one Redis shares limits, breakers, cache, leases, runs and batch work."""

    backend: str = "sqlite"
    redis_url: str | None = None
    key_prefix: str = "scillm:"
    timeout_s: float = 2.0           # per Redis command: a server that does not answer is a 503, never a hang
    claim_timeout_s: float = 30.0    # queued work untouched this long (its process died) is taken over
    finished_logs_days: float = 7.0  # event logs of finished runs and batches go this long after they end (0: kept)

    def __attrs_post_init__(self) -> None:
        if self.backend not in ("sqlite", "redis"):
            raise ValueError(f"backend must be 'sqlite' or 'redis', not {self.backend!r}")
        if self.timeout_s <= 0 or self.claim_timeout_s <= 0:
            raise ValueError("timeout_s and claim_timeout_s must be > 0")
        if self.finished_logs_days < 0:
            raise ValueError("finished_logs_days must be >= 0 (0 keeps them)")

    @property
    def finished_logs_ttl_s(self) -> float | None:
        """How long the event log of a finished run or batch stays (``StateStore.expire_log``); ``None``: kept."""
        return self.finished_logs_days * 86400.0 or None

    def url(self, env: Mapping[str, str]) -> str | None:
        return self.redis_url or env.get("REDIS_URL") or None


@frozen(kw_only=True)
class PluginsConfig:
    disable: tuple[str, ...] = ()


@frozen(kw_only=True)
class Config:
    """Raw tables plus their structured sections; ``env`` is where keys and base URLs come from."""

    tables: Mapping[str, Any] = field(factory=dict)
    sections: Mapping[str, Any] = field(factory=dict)
    env: Env = field(factory=Env)
    path: Path | None = None
    data_dir: Path = field(factory=lambda: Path.cwd() / ".scillm-data")

    def section(self, name: str) -> Any:
        return self.sections[name]

    @property
    def server(self) -> ServerConfig:
        return self.sections.get("server") or ServerConfig()  # type: ignore[no-any-return]

    @property
    def state(self) -> StateConfig:
        return self.sections.get("state") or StateConfig()  # type: ignore[no-any-return]

    @property
    def aliases(self) -> Mapping[str, str]:
        return self.sections.get("aliases") or {}  # type: ignore[no-any-return]

    @property
    def groups(self) -> Mapping[str, GroupConfig]:
        return self.sections.get("groups") or {}  # type: ignore[no-any-return]

    def provider_settings(self, name: str) -> ProviderSettings:
        return (self.sections.get("providers") or {}).get(name) or ProviderSettings()  # type: ignore[no-any-return]

    def with_sections(self, schema: Mapping[str, Any]) -> Config:
        """Structure every table by ``schema`` (table name -> type); unknown tables are an error."""
        from scillm_core.models.convert import converter

        sections: dict[str, Any] = {}
        where = str(self.path) if self.path else "configuration"
        for name, raw in self.tables.items():
            if name not in schema:
                known = ", ".join(sorted(schema)) or "none"
                raise ConfigError(f"{where}: unknown table [{name}] (known tables: {known})")
            try:
                sections[name] = _strict_structure(converter, raw, schema[name])
            except _UnknownKey as exc:
                raise ConfigError(f"{where}: {exc} at {_dotted(name, exc.path)}") from None
            except Exception as exc:
                from scillm_core.models.convert import _first_error

                message, path = _first_error(exc)
                raise ConfigError(f"{where}: {message} at {_dotted(name, path)}") from None
        for name, hint in schema.items():  # absent tables get their defaults once, not a new object per request
            if name not in sections:
                with contextlib.suppress(Exception):  # a type with required fields stays absent
                    sections[name] = converter.structure({}, hint)
        return attrs.evolve(self, sections=sections)


def check_provider_tables(config: Config, registered: Mapping[str, Any], kinds: set[str]) -> None:
    """Every ``[providers.NAME]`` names a registered provider (a declared one is registered by the plugin that
    handles its ``kind``), and keys for declared providers are not set on built-in ones; else stop startup."""
    import difflib

    where = str(config.path) if config.path else "configuration"
    for name, raw in (config.tables.get("providers") or {}).items():
        settings = config.provider_settings(name)
        if name not in registered:
            if settings.kind is not None:
                known = ", ".join(sorted(kinds)) or "none installed"
                raise ConfigError(f"{where}: unknown provider kind {settings.kind!r} at providers.{name}.kind "
                                  f"(known kinds: {known})")
            close = difflib.get_close_matches(name, list(registered), n=3, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(f"{where}: unknown provider table [providers.{name}]: no provider is named {name!r}."
                              f"{hint} Known providers: {', '.join(sorted(registered))}. To declare a server of your "
                              f"own, give the table kind = \"openai-compatible\" and base_url.")
        if settings.kind is None:
            stray = [key for key in ProviderSettings.DECLARED_ONLY if isinstance(raw, dict) and key in raw]
            if stray:
                raise ConfigError(f"{where}: {stray[0]} at providers.{name}.{stray[0]} is only for a provider of "
                                  f"your own (a table with kind); {name!r} is built in")


def _dotted(table: str, path: str) -> str:
    """``$[g].models`` in table ``groups`` -> ``groups.g.models`` (TOML's own spelling)."""
    return table + re.sub(r"\[([^\]0-9][^\]]*)\]", r".\1", path[1:])


def _strict_structure(converter: Any, raw: Any, hint: Any) -> Any:
    """Structure with unknown keys rejected (config is strict, wire data is not)."""
    _reject_unknown_keys(raw, hint, "$")
    return converter.structure(raw, hint)


def _reject_unknown_keys(raw: Any, hint: Any, path: str) -> None:
    origin = getattr(hint, "__origin__", None)
    if attrs.has(hint):
        if not isinstance(raw, dict):
            return
        fields = {a.name: a.type for a in attrs.fields(attrs.resolve_types(hint))}
        for key, value in raw.items():
            if key not in fields:
                raise _UnknownKey(f"unknown key {key!r} (allowed: {', '.join(fields)})", f"{path}.{key}")
            _reject_unknown_keys(value, fields[key], f"{path}.{key}")
    elif origin in (Mapping, dict) and isinstance(raw, dict):
        value_type = hint.__args__[1]
        for key, value in raw.items():
            _reject_unknown_keys(value, value_type, f"{path}.{key}")
    elif origin in (tuple, list) and isinstance(raw, list) and hint.__args__:
        for i, value in enumerate(raw):
            _reject_unknown_keys(value, hint.__args__[0], f"{path}[{i}]")


class _UnknownKey(Exception):
    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


def load_config(path: str | Path | None = None, *, env: Mapping[str, str] | None = None,
                cwd: Path | None = None) -> Config:
    """Read the TOML file (``path``, else ``$SCILLM_CONFIG``, else ``./scillm.toml`` if present) and the env."""
    cwd = cwd or Path.cwd()
    environment = Env(env, dotenv=cwd / ".env")
    chosen = Path(path) if path else (Path(environment["SCILLM_CONFIG"]) if environment.get("SCILLM_CONFIG")
                                      else None)
    if chosen is None and (cwd / "scillm.toml").is_file():
        chosen = cwd / "scillm.toml"
    tables: dict[str, Any] = {}
    if chosen is not None:
        try:
            tables = tomllib.loads(chosen.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {chosen} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{chosen}: not valid TOML: {exc}") from None
    return Config(tables=tables, env=environment, path=chosen, data_dir=_data_dir(environment))


def _data_dir(env: Env) -> Path:
    if env.get("SCILLM_DATA_DIR"):
        return Path(env["SCILLM_DATA_DIR"]).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("scillm"))
