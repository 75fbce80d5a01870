"""The shared upstream helpers on their own: retry hints."""

from __future__ import annotations

import email.utils
import time

import pytest

from scillm_core import errors
from scillm_core.upstream import retry_after_seconds


@pytest.mark.parametrize(("headers", "expected"), [
    ({"retry-after": "7"}, 7.0),
    ({"retry-after": " 2.5 "}, 2.5),
    ({"retry-after-ms": "400"}, 0.4),
    ({"retry-after-ms": "nan", "retry-after": "3"}, 3.0),  # an unusable ms hint falls back to the seconds one
    ({"retry-after": "120"}, 120.0),
    ({"retry-after": "3600"}, 300.0),  # capped
    ({}, None),
    ({"retry-after": ""}, None),
])
def test_usable_hints(headers, expected):
    assert retry_after_seconds(headers) == expected


@pytest.mark.parametrize("value", ["5s", "garbage", "nan", "NaN", "inf", "-inf", "-1", "1e3", "1_000", "0x10",
                                   "9" * 400, "99999999999", "Mon, 99 Foo 2024"])
def test_unusable_hints_are_absent(value):
    assert retry_after_seconds({"retry-after": value}) is None
    assert retry_after_seconds({"retry-after-ms": value}) is None


def test_more_than_a_day_is_nonsense():
    assert retry_after_seconds({"retry-after": "86401"}) is None
    assert retry_after_seconds({"retry-after-ms": "86400001"}) is None


def test_http_dates():
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after_seconds({"retry-after": soon}) <= 31  # type: ignore[operator]
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert retry_after_seconds({"retry-after": past}) == 0.0
    far = email.utils.formatdate(time.time() + 10 * 86400, usegmt=True)
    assert retry_after_seconds({"retry-after": far}) is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_errors_drop_an_unusable_hint_from_any_provider(value):
    exc = errors.UpstreamRateLimited("slow down", provider="p", model="m", retry_after_s=value)
    assert exc.retry_after_s is None and "retry-after" not in exc.headers
    assert errors.to_response_parts(exc)[0] == 429
