"""Secrets are redacted from error text and log records."""

from __future__ import annotations

import logging

import pytest

from scillm_core.redact import RedactingFilter, env_secrets, redact


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


@pytest.mark.parametrize("token", [
    "sk-abcdef0123", "sk_abcdef0123", "pk-abcdef0123", "pk_abcdef0123", "rk-abcdef0123", "cpk_abcdef0123",
    "eyJhbGciOiJI.eyJzdWIiOiIx.sig", "AIzaSyA0123456789abcdefghij", "BeArEr abcdefghijkl", "bearer\tabcdefghijkl"])
def test_each_key_shape_is_redacted_on_its_own(token):
    assert token not in redact(f"value: {token}.") and "[redacted]" in redact(f"value: {token}.")


def test_the_quick_check_never_skips_what_the_full_scan_would_redact():
    import random

    from scillm_core.redact import _KEY_SHAPES

    fragments = ["sk", "pk", "cpk", "rk", "-", "_", "eyJ", "AIza", "Bearer ", "BEARER\t", "abcdef", "0123456789",
                 ".", " ", "deepseek-chat", "ek-", "AIz", "ey", "x" * 20, '"', "\\n"]
    rng = random.Random(7)
    for _ in range(5000):
        text = "".join(rng.choice(fragments) for _ in range(rng.randint(1, 12)))
        assert redact(text) == _KEY_SHAPES.sub("[redacted]", text), text


def test_env_secrets_are_the_values_of_secret_named_variables():
    env = {"DEEPSEEK_API_KEY": "sk-deep-0123456789", "CHUTES_API": "cpk_abcdefgh12", "GH_TOKEN": "short",
           "SCILLM_MASTER_KEY": "sk-master-longer-than-the-rest-0123", "HOME": "/home/someone-long"}
    assert env_secrets(env) == ("sk-master-longer-than-the-rest-0123", "sk-deep-0123456789", "cpk_abcdefgh12")


def test_secrets_of_the_environment_are_redacted_in_every_error_once_remembered():
    from scillm_core import errors
    from scillm_core.redact import env_secrets, remember

    env = {"GLM_API_KEY": "0f3c9a7e5b1d4c2a.Zt4Qw9Lx", "SCILLM_CLAUDE_CREDENTIALS": "/home/u/.claude/c.json",
           "SCILLM_CLAUDE_TOKEN_URL": "http://127.0.0.1:1/token", "LANG": "C.UTF-8"}
    assert env_secrets(env) == ("0f3c9a7e5b1d4c2a.Zt4Qw9Lx",)  # values, not where values are
    remember(env_secrets(env))
    error = errors.UpstreamProtocolError("unexpected role 'Bearer 0f3c9a7e5b1d4c2a.Zt4Qw9Lx'", provider="glm",
                                         model="m", details={"seen": ["0f3c9a7e5b1d4c2a.Zt4Qw9Lx"]})
    assert "0f3c9a7e5b1d4c2a" not in error.message + str(error) + str(error.details)
    unknown = errors.UpstreamAuthError("Incorrect API key provided: sk-proj-9a8b7c6d5e4f3a2b1c0d", provider="p",
                                       model="m")
    assert "9a8b7c6d5e4f" not in unknown.message  # a key nobody gave scillm: by its shape


def test_excerpt_redacts_before_it_cuts():
    from scillm_core.redact import remember
    from scillm_core.upstream import excerpt

    remember(["plain-secret-value-0123456789"])
    text = "x" * 30 + "plain-secret-value-0123456789"
    assert "plain-secret" not in excerpt(text, 45)  # cut through the secret: no prefix of it survives


def test_tracebacks_in_log_records_are_redacted(caplog):
    logger = logging.getLogger("scillm.test-redact-traceback")
    handler_filter = RedactingFilter()
    caplog.handler.addFilter(handler_filter)
    try:
        try:
            raise RuntimeError("upstream said Bearer sk-live-traceback-0123456789")
        except RuntimeError:
            logger.exception("failed")
    finally:
        caplog.handler.removeFilter(handler_filter)
    assert "sk-live-traceback" not in caplog.text and "RuntimeError" in caplog.text


@pytest.mark.parametrize("cut", [1, 7, 14, 20, 27])
def test_stream_redactor_finds_a_secret_split_across_reads(cut):
    from scillm_core.redact import StreamRedactor

    secret = "sk-scillm-run-abcdef0123456789"
    data = b"a" * 100 + secret.encode() + b" tail\n"
    at = 100 + cut
    redactor = StreamRedactor([secret])
    out = redactor.feed(data[:at]) + redactor.feed(data[at:]) + redactor.flush()
    assert out == b"a" * 100 + b"[redacted] tail\n"


@pytest.mark.parametrize(("text", "shown"), [
    ("http://team:proxy-pass-123@127.0.0.1:8080/v1", "http://team:[redacted]@127.0.0.1:8080/v1"),
    ("redis://:r3dis-pass@redis:6379/0", "redis://:[redacted]@redis:6379/0"),
    ('{"base_url": "https://u:p%40ss@proxy.corp/v1"}', '{"base_url": "https://u:[redacted]@proxy.corp/v1"}'),
    ("http://127.0.0.1:8080/v1 answered; ops@corp.example", "http://127.0.0.1:8080/v1 answered; ops@corp.example"),
    ("https://user@proxy.corp/v1", "https://user@proxy.corp/v1")])
def test_the_password_of_a_url_is_redacted_and_nothing_else_of_it(text, shown):
    assert redact(text) == shown


def test_a_base_url_with_a_password_is_shown_without_it_on_every_ops_endpoint(tmp_path):
    """A provider behind a proxy that takes basic auth in its URL: the providers list, health and the dashboard
    show where it is, never the password."""
    import httpx

    from scillm_core.testing import ServerThread, make_app

    env = {"SCILLM_MASTER_KEY": "sk-master-redact-0123456789", "OPENAI_API_KEY": "sk-openai-redact-0123456789",
           "OPENAI_API_BASE": "http://team:Pr0xyPassw0rd@127.0.0.1:9/v1"}
    with ServerThread(make_app(env=env, data_dir=tmp_path)) as server:
        headers = {"authorization": f"Bearer {env['SCILLM_MASTER_KEY']}"}
        answers = [httpx.get(server.url + path, headers=headers) for path in (
            "/v1/scillm/providers", "/v1/scillm/health", "/v1/scillm/ui/summary", "/v1/models")]
    assert all(answer.status_code == 200 for answer in answers)
    assert "team:[redacted]@127.0.0.1:9" in answers[0].text
    assert not [answer.url.path for answer in answers if "Pr0xyPassw0rd" in answer.text]
