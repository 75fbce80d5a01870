"""Keep secrets out of logs, errors, artifacts and ops output."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

__all__ = ["RedactingFilter", "redact"]

_KEY_SHAPES = re.compile(
    r"(?:sk|pk|cpk|rk)[-_][A-Za-z0-9_\-*.]{6,}"      # sk-..., cpk_..., sk-ant-...
    r"|(?i:bearer)\s+[A-Za-z0-9._\-~+/]{8,}=*"        # Authorization values
    r"|eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*"  # JWTs (OAuth access tokens)
    r"|AIza[0-9A-Za-z_\-]{20,}"                        # Google API keys
)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Replace the given secret values and anything shaped like a key or token with ``[redacted]``."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    return _KEY_SHAPES.sub("[redacted]", text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts every record's rendered message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
