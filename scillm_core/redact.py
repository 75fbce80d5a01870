"""Keep secrets out of logs, errors, artifacts and ops output.

:func:`redact` replaces known secret values and anything shaped like a key or token. Known values are the ones
given to the call plus every secret this process was handed (:func:`remember`: ``create_app`` registers the
secret-named variables of its environment, the master key included), so text built anywhere from upstream data
can be cleaned without knowing which provider it came from. Every :class:`~scillm_core.errors.ScillmError`
message passes through it when the error is made (the one redaction point for error text), log records through
:class:`RedactingFilter`, streamed output (agent CLI logs) through :class:`StreamRedactor`.

Ops output (health, ``/metrics`` labels, the dashboard, run listings, trace attributes) also shows names a client or
the configuration chose: a model ``llama3:sk-live-...``, an ``x-caller-skill``, a group member. It passes through
:func:`redact_name` (names, remembered: they repeat) or :func:`redact_json` (a whole JSON answer, every string and
key; ``scillm_core.web.ops_response``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

__all__ = ["RedactingFilter", "StreamRedactor", "env_secrets", "known_secrets", "redact", "redact_json", "redact_name",
           "redact_tree", "remember"]

_KEY_SHAPES = re.compile(
    r"(?:sk|pk|cpk|rk)[-_][A-Za-z0-9_\-*.]{6,}"      # sk-..., cpk_..., sk-ant-...
    r"|(?i:bearer)\s+[A-Za-z0-9._\-~+/]{8,}=*"        # Authorization values
    r"|eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*"  # JWTs (OAuth access tokens)
    r"|AIza[0-9A-Za-z_\-]{20,}"                        # Google API keys
)

# Substrings every match of _KEY_SHAPES contains (plus "bearer" in any case): when none is there, which is almost
# always, the text is returned without the regex scan (substring checks are ~50x faster than the scan).
_KEY_HINTS = ("sk-", "sk_", "pk-", "pk_", "rk-", "rk_", "eyJ", "AIza")
# *_HEADERS: OTEL_EXPORTER_OTLP_HEADERS and the like carry collector credentials
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|HEADERS)|_API$", re.IGNORECASE)
_WHERE_NAME = re.compile(r"_(URL|BASE|PATH|FILE|DIR|HOST|CREDENTIALS)$", re.IGNORECASE)  # where a secret is, not it
MIN_SECRET = 8  # shorter values are not remembered (they would redact ordinary words)
# the password of a URL's userinfo (``https://user:password@proxy/v1``, ``redis://:password@host``): base URLs and
# store URLs are where secrets are, not secrets, so their values are shown; the password in one never is
_URL_PASSWORD = re.compile(r"(://[^/?#@\s:'\"<>]*):[^/?#@\s'\"<>]+@")

_known: tuple[str, ...] = ()  # longest first, so a secret that contains another is replaced whole


def env_secrets(env: Mapping[str, str]) -> tuple[str, ...]:
    """The values of variables whose names say they hold a secret (``*_KEY``, ``*TOKEN*``, ``DEEPSEEK_API`` ...),
    not of those that say where one is (``SCILLM_CLAUDE_CREDENTIALS``, ``SCILLM_CLAUDE_TOKEN_URL``), longest
    first, for :func:`redact`."""
    return tuple(sorted({v for k, v in env.items()
                         if _SECRET_NAME.search(k) and not _WHERE_NAME.search(k) and v and len(v) >= MIN_SECRET},
                        key=len, reverse=True))


def remember(values: Iterable[str | None]) -> None:
    """Add secret values that every later :func:`redact` call in this process replaces."""
    global _known
    fresh = {v for v in values if v and len(v) >= MIN_SECRET} - set(_known)
    if fresh:
        _known = tuple(sorted({*_known, *fresh}, key=len, reverse=True))
        _names.clear()  # redacted before this secret was known


def known_secrets() -> tuple[str, ...]:
    return _known


def _may_hold_key_shape(text: str) -> bool:
    return any(hint in text for hint in _KEY_HINTS) or "bearer" in text.lower()


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Replace the given and the remembered secret values, the password of a URL, and anything shaped like a key
    or token with ``[redacted]``."""
    for secret in (*secrets, *_known):
        if secret and len(secret) >= 4 and secret in text:
            text = text.replace(secret, "[redacted]")
    if "@" in text and "://" in text:
        text = _URL_PASSWORD.sub(r"\1:[redacted]@", text)
    if not _may_hold_key_shape(text):
        return text
    return _KEY_SHAPES.sub("[redacted]", text)


_names: dict[str, str] = {}  # name -> redacted, for redact_name
_NAMES_MAX = 4096
_NAME_MAX = 256  # longer strings are not remembered


def redact_name(name: str) -> str:
    """:func:`redact` for names that repeat (models, callers, providers, deployments, span names): each distinct
    short one is redacted once and remembered, so an ops surface can pass every name through at no cost."""
    redacted = _names.get(name)
    if redacted is None:
        redacted = redact(name)
        if len(name) <= _NAME_MAX:
            if len(_names) >= _NAMES_MAX:
                _names.clear()
            _names[name] = redacted
    return redacted


def redact_tree(value: Any, secrets: Iterable[str] = ()) -> Any:
    """``value`` with every string in it, mapping keys included, redacted (lists, tuples and mappings walked)."""
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, Mapping):
        return {redact(str(k), secrets): redact_tree(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_tree(v, secrets) for v in value]
    return value


def redact_json(value: Any, secrets: Iterable[str] = ()) -> bytes:
    """``value`` as JSON with every string and key redacted. One scan of the encoded text tells whether anything
    needs redaction (almost never; without a backslash every string appears in it verbatim); only then is the value
    walked and encoded again."""
    secrets = tuple(secrets)
    encoded = orjson.dumps(value)
    text = encoded.decode()
    if "\\" not in text and redact(text, secrets) == text:
        return encoded
    return orjson.dumps(redact_tree(value, secrets))


class RedactingFilter(logging.Filter):
    """A logging filter that redacts every record's rendered message, traceback and stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None  # no formatter renders the raw exception again
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class StreamRedactor:
    """Redacts secret values from a byte stream read in chunks: the last ``len(longest secret) - 1`` bytes are held
    back until the next chunk (or :meth:`flush`), so a secret split across two reads is still found."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        values = {s for s in (*secrets, *_known) if s and len(s) >= 4}
        self.secrets = sorted((s.encode() for s in values), key=len, reverse=True)
        self.keep = max((len(s) for s in self.secrets), default=1) - 1
        self.held = b""

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of ``held + chunk`` that are safe to write now."""
        data = self.held + chunk
        for secret in self.secrets:
            data = data.replace(secret, b"[redacted]")
        if self.keep <= 0 or len(data) <= self.keep:
            self.held = data if self.keep > 0 else b""
            return b"" if self.keep > 0 else data
        self.held = data[-self.keep:]
        return data[:-self.keep]

    def flush(self) -> bytes:
        data, self.held = self.held, b""
        return data

    def scrub(self, data: bytes) -> bytes:
        """Redact a whole buffer at once (no state)."""
        for secret in self.secrets:
            data = data.replace(secret, b"[redacted]")
        return data
