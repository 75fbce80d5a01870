"""Upstream timeouts (scillm_core.timeouts): what each limit means, where it is set, how a stream is watched; and
the wire forms of context_length_exceeded that every provider maps to the one error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from scillm_anthropic.translate import error_from_status
from scillm_codex.wire import failure_error
from scillm_gemini.provider import error_from_body
from scillm_openai_compat.provider import parse_error_body

from scillm_core import errors
from scillm_core.builtin.routing import resolve
from scillm_core.config import GroupConfig, ProviderSettings
from scillm_core.testing import make_app
from scillm_core.timeouts import Timeouts, within_limits
from scillm_core.upstream import error_for_status


class Expired(Exception):
    def __init__(self, limit: str) -> None:
        super().__init__(limit)
        self.limit = limit


async def drain(chunks: AsyncIterator[Any], *, consume_s: float = 0.0) -> list[Any]:
    out = []
    async for chunk in chunks:
        out.append(chunk)
        if consume_s:
            await asyncio.sleep(consume_s)  # a slow consumer: the upstream is not asked meanwhile
    return out


async def paced(*gaps: float) -> AsyncIterator[int]:
    for n, gap in enumerate(gaps):
        await asyncio.sleep(gap)
        yield n


def watched(chunks: AsyncIterator[Any], *, first_token_s: float = 60, idle_s: float = 60) -> AsyncIterator[Any]:
    loop = asyncio.get_running_loop()
    return within_limits(chunks, loop.time(), Timeouts(first_token_s=first_token_s, idle_s=idle_s), Expired)


@pytest.mark.anyio
async def test_a_first_chunk_later_than_first_token_s_fails_with_that_limit():
    with pytest.raises(Expired) as caught:
        await drain(watched(paced(5.0), first_token_s=0.1))
    assert caught.value.limit == "first_token"


@pytest.mark.anyio
async def test_a_gap_longer_than_idle_s_after_the_first_chunk_fails_with_that_limit():
    got: list[int] = []
    with pytest.raises(Expired) as caught:
        async for chunk in watched(paced(0, 0, 5.0), idle_s=0.1):
            got.append(chunk)
    assert caught.value.limit == "idle" and got == [0, 1]


@pytest.mark.anyio
async def test_chunks_within_the_limits_pass_and_a_slow_consumer_is_not_an_idle_upstream():
    assert await drain(watched(paced(0.05, 0.05, 0.05), first_token_s=1, idle_s=0.15)) == [0, 1, 2]
    # the consumer holds each chunk longer than idle_s; the upstream answers at once when asked
    assert await drain(watched(paced(0, 0, 0), idle_s=0.05), consume_s=0.12) == [0, 1, 2]


@pytest.mark.anyio
async def test_a_cancel_from_elsewhere_stays_a_cancel():
    task = asyncio.ensure_future(drain(watched(paced(0, 5.0), idle_s=10)))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.anyio
async def test_the_watched_stream_closes_the_upstream_one():
    closed = asyncio.Event()

    async def upstream() -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.sleep(5)
            yield 2
        finally:
            closed.set()

    with pytest.raises(Expired):
        await drain(watched(upstream(), idle_s=0.05))
    assert closed.is_set()


def test_providers_then_groups_override_the_defaults_and_say_where():
    app = make_app(env={"OPENAI_API_KEY": "sk-x", "DEEPSEEK_API_KEY": "sk-y"}, config={
        "providers": {"openai": {"idle_timeout_s": 30, "timeout_s": 200}},
        "groups": {"g": {"models": ["openai/gpt-a", "deepseek/deepseek-chat"], "first_token_timeout_s": 20}}})
    runtime = app.runtime
    alone = resolve("openai/gpt-a", runtime).timeouts
    assert alone is not None and (alone.idle_s, alone.total_s, alone.first_token_s) == (30, 200, 300)
    assert alone.setting("idle") == "idle_timeout_s = 30 ([providers.openai])"
    assert alone.setting("headers") == "headers_timeout_s = 60 (the provider's default)"
    group = resolve("g", runtime)
    for route in (group, *group.fallbacks):  # the group's limit applies to every member
        assert route.timeouts is not None and route.timeouts.first_token_s == 20
        assert route.timeouts.setting("first_token") == "first_token_timeout_s = 20 ([groups.g])"
    assert group.timeouts is not None and group.timeouts.idle_s == 30  # the provider's own setting stays
    assert group.fallbacks[0].timeouts is not None and group.fallbacks[0].timeouts.idle_s == 120


def test_the_clients_read_limit_backs_up_the_dispatchs():
    timeouts = Timeouts(connect_s=3, headers_s=10, first_token_s=40, idle_s=20, total_s=90)
    assert timeouts.http(stream=True).read > 40 and timeouts.http(stream=True).connect == 3
    assert timeouts.http(stream=False).read > 90
    assert Timeouts().over(ProviderSettings(), "[providers.x]") == Timeouts()
    assert Timeouts().over(GroupConfig(models=("a",), connect_timeout_s=2), "[groups.g]").connect_s == 2


# -- context_length_exceeded in every provider's words ------------------------------------------------------------

def _openai_compat(status: int, body: bytes) -> errors.UpstreamError:
    message, code, kind = parse_error_body(body)
    return error_for_status(status, message, provider="p", model="m", code=code, kind=kind)


CONTEXT_FORMS = {
    "openai": lambda: _openai_compat(400, b'{"error": {"message": "This model\'s maximum context length is 128000 '
                                          b'tokens. However, your messages resulted in 130501 tokens.", "type": '
                                          b'"invalid_request_error", "param": "messages", "code": '
                                          b'"context_length_exceeded"}}'),
    "deepseek/vllm": lambda: _openai_compat(400, b'{"error": {"message": "This model\'s maximum context length is '
                                                 b'65536 tokens. However, you requested 70112 tokens (70000 in the '
                                                 b'messages, 112 in the completion).", "type": '
                                                 b'"invalid_request_error"}}'),
    "moonshot": lambda: _openai_compat(400, b'{"error": {"type": "invalid_request_error", "message": "Your request '
                                            b'exceeded model token limit : 262144"}}'),
    "glm": lambda: _openai_compat(400, b'{"error": {"code": "1261", "message": "Prompt exceeds max length"}}'),
    "llama.cpp": lambda: _openai_compat(400, b'{"error": {"code": 400, "message": "the request exceeds the '
                                             b'available context size, try increasing it", "type": '
                                             b'"exceed_context_size_error"}}'),
    "anthropic": lambda: error_from_status(400, b'{"type": "error", "error": {"type": "invalid_request_error", '
                                                b'"message": "prompt is too long: 210345 tokens > 200000 maximum"}}',
                                           {}, provider="p", model="m"),
    "anthropic max_tokens": lambda: error_from_status(
        400, b'{"type": "error", "error": {"type": "invalid_request_error", "message": "input length and '
             b'`max_tokens` exceed context limit: 197000 + 8192 > 200000, decrease input length or `max_tokens` '
             b'and try again"}}', {}, provider="p", model="m"),
    "gemini": lambda: error_from_body(400, b'{"error": {"code": 400, "message": "The input token count (1200000) '
                                           b'exceeds the maximum number of tokens allowed (1048576).", "status": '
                                           b'"INVALID_ARGUMENT"}}', provider="p", model="m"),
    "codex": lambda: failure_error({"code": "context_length_exceeded", "message": "Your input exceeds the context "
                                    "window of this model."}, provider="p", model="m"),
}


@pytest.mark.parametrize("form", CONTEXT_FORMS)
def test_every_providers_context_length_error_is_context_length_exceeded(form):
    exc = CONTEXT_FORMS[form]()
    assert isinstance(exc, errors.ContextLengthExceeded), exc
    assert exc.status == 400 and exc.code == "context_length_exceeded" and not exc.retryable


@pytest.mark.parametrize("body", [
    b'{"error": {"type": "content_filter", "message": "The request was rejected because it was considered high '
    b'risk"}}',
    b'{"error": {"message": "Invalid value for \'temperature\'", "type": "invalid_request_error", "code": '
    b'"invalid_value"}}',
    b'{"error": {"code": "1301", "message": "System detected potentially unsafe or sensitive content"}}',
])
def test_other_400s_are_not_context_length_errors(body):
    exc = _openai_compat(400, body)
    assert type(exc) is errors.UpstreamBadRequest
