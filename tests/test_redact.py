"""Secrets are redacted from error text and log records."""

from __future__ import annotations

import logging

import pytest

from scillm_core.redact import RedactingFilter, redact


@pytest.mark.parametrize("secret", [
    "sk-proj-abcdef0123456789", "sk-ant-api03-abcdefghijkl", "cpk_abcdef0123456789",
    "AIzaSyA0123456789abcdefghijklmnopq", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlc2ln"])
def test_key_shaped_tokens_are_redacted(secret):
    assert secret not in redact(f"upstream said: bad key {secret} (header Bearer {secret})")


def test_known_secret_values_are_redacted_whatever_their_shape():
    assert "hunter2-long-password" not in redact("login failed for hunter2-long-password", ["hunter2-long-password"])


def test_log_records_are_redacted(caplog):
    logger = logging.getLogger("scillm.test-redact")
    handler_filter = RedactingFilter()
    logger.addFilter(handler_filter)
    try:
        with caplog.at_level(logging.INFO, logger="scillm.test-redact"):
            logger.info("calling upstream with %s", "Authorization: Bearer sk-live-0123456789abcdef")
    finally:
        logger.removeFilter(handler_filter)
    assert "sk-live-0123456789abcdef" not in caplog.text and "[redacted]" in caplog.text
