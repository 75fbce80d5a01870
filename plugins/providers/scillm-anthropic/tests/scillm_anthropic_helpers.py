"""Shared test helpers: fakes preset for each auth mode, credentials files."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from scillm_core.testing.contract import ProviderContract
from scillm_core.testing.fake_anthropic import FakeAnthropic

CONTRACT_KEY = ProviderContract.key
#: one client for plain HTTP calls in tests (building a client per call costs a TLS context each time)
HTTP = httpx.Client(timeout=30)
#: the provider in isolation (no retry/cache middleware): the surfaces the tests talk to plus this plugin
ISOLATED = ("chat", "auth", "ops", "anthropic")
CONTRACT_ACCESS = "sk-ant-oat01-contract-access-0123456789abcdef"
CONTRACT_REFRESH = "sk-ant-ort01-contract-refresh-0123456789abcdef"


class ApiKeyFake(FakeAnthropic):
    require = "api_key"
    api_key = CONTRACT_KEY


class OAuthFake(FakeAnthropic):
    require = "oauth"

    def __init__(self) -> None:
        super().__init__()
        self.refresh_tokens.add(CONTRACT_REFRESH)


def write_credentials(path: Path, entry: dict[str, Any] | None, **other: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**other, **({"claudeAiOauth": entry} if entry is not None else {})}
    path.write_bytes(orjson.dumps(doc))
    os.chmod(path, 0o600)
    return path


def contract_credentials() -> Path:
    """A credentials file with a valid 8-hour login (module level: the contract's env is built per class)."""
    folder = Path(tempfile.mkdtemp(prefix="scillm-claude-"))
    entry = {"accessToken": CONTRACT_ACCESS, "refreshToken": CONTRACT_REFRESH,
             "expiresAt": int((time.time() + 8 * 3600) * 1000), "subscriptionType": "max"}
    return write_credentials(folder / ".credentials.json", entry)


def tiny_pdf() -> bytes:
    """A valid one-page PDF (correct xref offsets), built by hand so no PDF library is needed."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 72 72] >>"]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)
