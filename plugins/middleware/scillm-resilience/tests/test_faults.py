"""Fault tests through the official openai client against a real scillm and fake upstreams."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import openai
import orjson
import pytest
from resilience_helpers import DEEPSEEK_KEY, GROUP, HI, OPENAI_KEY, client_for, health
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread


class StallingOpenAI(FakeOpenAI):
    """An OpenAI-format upstream that never finishes: non-streaming calls wait for the client to drop the
    connection; streams send the role chunk, then stall. ``dropped`` is set when scillm closes the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = threading.Event()

    def routes(self) -> list[Route]:
        return [Route(f"{self.base_path}/chat/completions", self.stall, methods=["POST"])]

    async def stall(self, request: Request) -> Response:
        recorded = await self.record(request)
        self.in_flight += 1
        if recorded.body.get("stream"):
            first = {"id": "chatcmpl-stall", "object": "chat.completion.chunk", "created": 0,
                     "model": recorded.body["model"],
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"},
                                  "finish_reason": None}]}

            async def events() -> Any:
                try:
                    yield b"data: " + orjson.dumps(first) + b"\n\n"
                    await asyncio.sleep(3600)
                finally:
                    self.in_flight -= 1
                    self.dropped.set()

            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            while (await request.receive())["type"] != "http.disconnect":
                pass
        finally:
            self.in_flight -= 1
            self.dropped.set()
        return Response(b"", status_code=499)


def test_429_retry_after_is_honoured_then_success(start, fake_a):
    server = start(fake_a.base_url)
    fake_a.script(Reply.fail(429, "Rate limit reached", type="requests", code="rate_limit_exceeded",
                             headers={"retry-after-ms": "400"}), Reply.say("after the wait"))
    began = time.monotonic()
    raw = client_for(server).chat.completions.with_raw_response.create(model="openai/gpt-a", messages=HI)
    elapsed = time.monotonic() - began
    assert raw.parse().choices[0].message.content == "after the wait"
    assert raw.headers["x-scillm-attempts"] == "2"
    assert len(fake_a.requests) == 2
    assert 0.38 <= elapsed < 3.0, elapsed  # the 400 ms the upstream asked for, not the 10 ms backoff


def test_retry_after_beyond_the_maximum_is_not_slept(start, fake_a):
    server = start(fake_a.base_url, resilience={"max_retry_after_s": 1.0})
    fake_a.script(Reply.fail(429, "Rate limit reached", headers={"retry-after": "120"}))
    began = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        client_for(server).chat.completions.create(model="openai/gpt-a", messages=HI)
    assert time.monotonic() - began < 1.0
    assert caught.value.response.headers["retry-after"] == "120"
    assert len(fake_a.requests) == 1


MALFORMED_HINTS = [{"retry-after": "5s"}, {"retry-after": "garbage"}, {"retry-after": "nan"},
                   {"retry-after-ms": "nan"}, {"retry-after": "inf"}, {"retry-after-ms": "-Infinity"},
                   {"retry-after": "-1"}, {"retry-after": "1e400"}, {"retry-after": "9" * 400},
                   {"retry-after-ms": "12ms", "retry-after": "soon"}]


@pytest.mark.parametrize("hint", MALFORMED_HINTS, ids=lambda h: ",".join(f"{k}={v[:12]}" for k, v in h.items()))
def test_unusable_retry_hints_are_ignored_and_normal_backoff_retries(start, fake_a, hint):
    server = start(fake_a.base_url)
    fake_a.script(Reply.fail(429, "Rate limit reached", code="rate_limit_exceeded", headers=hint),
                  Reply.say("after a normal backoff"))
    raw = client_for(server).chat.completions.with_raw_response.create(model="openai/gpt-a", messages=HI)
    assert raw.parse().choices[0].message.content == "after a normal backoff"
    assert raw.headers["x-scillm-attempts"] == "2" and len(fake_a.requests) == 2


@pytest.mark.parametrize("hint", MALFORMED_HINTS[:4], ids=lambda h: ",".join(f"{k}={v[:12]}" for k, v in h.items()))
def test_unusable_retry_hints_still_fall_back_or_answer_429(start, fake_a, fake_b, hint):
    limited = Reply.fail(429, "Rate limit reached", code="rate_limit_exceeded", headers=hint)
    server = start(fake_a.base_url, fake_b.base_url, groups=GROUP)
    fake_a.default = limited
    fake_b.script(Reply.say("served by the fallback"))
    raw = client_for(server).chat.completions.with_raw_response.create(model="g", messages=HI)
    assert raw.parse().choices[0].message.content == "served by the fallback"
    assert len(fake_a.requests) == 2 and len(fake_b.requests) == 1  # one retry on the primary, then fallback
    with pytest.raises(openai.RateLimitError) as caught:  # no fallback: the upstream's 429, without a hint
        client_for(server).chat.completions.create(model="openai/gpt-a", messages=HI)
    assert caught.value.response.json()["error"]["code"] == "rate_limit_exceeded"
    assert "retry-after" not in caught.value.response.headers


@pytest.mark.parametrize("reply", [Reply.fail(400, "bad param", code="invalid_value"),
                                   Reply.fail(429, "You exceeded your current quota", code="insufficient_quota")])
def test_request_and_quota_errors_are_not_retried(start, fake_a, reply):
    server = start(fake_a.base_url, resilience={"max_retries": 3})
    fake_a.script(reply)
    with pytest.raises(openai.APIStatusError) as caught:
        client_for(server).chat.completions.create(model="openai/gpt-a", messages=HI)
    assert caught.value.status_code == reply.status
    assert len(fake_a.requests) == 1


def test_500_then_fallback_to_the_groups_second_model(start, fake_a, fake_b):
    server = start(fake_a.base_url, fake_b.base_url, groups=GROUP)
    fake_a.script(Reply.fail(500, "internal error"), Reply.fail(502, "bad gateway"))
    fake_b.script(Reply.say("served by the fallback"))
    raw = client_for(server).chat.completions.with_raw_response.create(model="g", messages=HI)
    completion = raw.parse()
    assert completion.choices[0].message.content == "served by the fallback"
    assert completion.model == "deepseek-chat"
    assert raw.headers["x-scillm-provider"] == "deepseek"
    assert raw.headers["x-scillm-served-model"] == "deepseek-chat"
    assert raw.headers["x-scillm-attempts"] == "3"  # 1 try + 1 retry on the primary, then the fallback
    assert len(fake_a.requests) == 2 and len(fake_b.requests) == 1
    assert fake_b.last.headers["authorization"] == f"Bearer {DEEPSEEK_KEY}"


@pytest.mark.parametrize("reply", [Reply.fail(400, "messages[0].content is too long", code="invalid_value"),
                                   Reply.fail(422, "unprocessable")])
def test_an_ordinary_400_inside_a_group_is_never_replayed_against_the_fallbacks(start, fake_a, fake_b, reply):
    server = start(fake_a.base_url, fake_b.base_url, groups=GROUP, resilience={"max_retries": 3})
    fake_a.script(reply)
    fake_b.script(Reply.say("must not be asked"))
    with pytest.raises(openai.APIStatusError) as caught:
        client_for(server).chat.completions.create(model="g", messages=HI)
    assert caught.value.status_code == reply.status
    assert caught.value.response.headers["x-scillm-attempts"] == "1"
    assert len(fake_a.requests) == 1 and fake_b.requests == []  # the request is bad everywhere: no replay


def test_connection_refused_then_fallback(start, fake_b, closed_port):
    server = start(f"http://127.0.0.1:{closed_port}/v1", fake_b.base_url, groups=GROUP)
    fake_b.script(Reply.say("fallback after refused"))
    raw = client_for(server).chat.completions.with_raw_response.create(model="g", messages=HI)
    assert raw.parse().choices[0].message.content == "fallback after refused"
    assert raw.headers["x-scillm-served-model"] == "deepseek-chat"
    assert raw.headers["x-scillm-attempts"] == "3"


def test_connection_refused_without_fallback_names_the_provider(start, closed_port):
    server = start(f"http://127.0.0.1:{closed_port}/v1")
    with pytest.raises(openai.APIStatusError) as caught:
        client_for(server).chat.completions.create(model="openai/gpt-a", messages=HI)
    assert caught.value.status_code == 502
    assert "openai (gpt-a)" in caught.value.message
    assert OPENAI_KEY not in caught.value.response.text


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_that_never_answers_hits_the_deadline(start, fake_a, stream):
    server = start(fake_a.base_url)
    fake_a.default = Reply(hang=True)
    began = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        created = client_for(server).chat.completions.create(model="openai/gpt-a", messages=HI, stream=stream,
                                                             extra_body={"timeout": 0.8})
        list(created)
    elapsed = time.monotonic() - began
    assert caught.value.status_code == 504
    body = caught.value.response.json()["error"]
    assert body["code"] == "deadline_exceeded"
    assert "openai (gpt-a)" in body["message"] and "1 upstream attempt" in body["message"]
    assert 0.7 <= elapsed < 2.5, elapsed


def test_deadline_spans_retries_and_fallbacks(start, fake_a, fake_b):
    server = start(fake_a.base_url, fake_b.base_url, groups=GROUP,
                   resilience={"max_retries": 5, "backoff_base_s": 0.2, "backoff_max_s": 0.2})
    fake_a.default = Reply.fail(503, "overloaded", headers={"retry-after-ms": "300"})
    fake_b.default = Reply(hang=True)
    began = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client_for(server).chat.completions.create(model="g", messages=HI, extra_body={"timeout": 1.0})
    elapsed = time.monotonic() - began
    assert caught.value.status_code == 504
    assert "deepseek (deepseek-chat)" in caught.value.message
    assert 0.9 <= elapsed < 2.5, elapsed
    assert len(fake_b.requests) == 1


def test_stream_cut_after_chunks_is_an_error_not_a_clean_end(start, fake_a):
    server = start(fake_a.base_url, resilience={"max_retries": 3})
    fake_a.script(Reply.say("This answer will be cut off in the middle.", cut_after=3))
    stream = client_for(server).chat.completions.create(model="openai/gpt-a", messages=HI, stream=True)
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "This ans"  # role chunk + two text chunks came through
    assert "openai (gpt-a)" in str(caught.value.message)
    assert len(fake_a.requests) == 1  # never retried after the first chunk was handed on


@pytest.mark.parametrize("failure", [Reply(cut_after=0), Reply.fail(500, "boom")])
def test_failure_before_the_first_chunk_fails_over_the_stream(start, fake_a, fake_b, failure):
    server = start(fake_a.base_url, fake_b.base_url, groups=GROUP, resilience={"max_retries": 0})
    fake_a.script(failure)
    fake_b.script(Reply.say("the fallback streams this"))
    raw = client_for(server).chat.completions.with_raw_response.create(model="g", messages=HI, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == "the fallback streams this"
    assert raw.headers["x-scillm-served-model"] == "deepseek-chat"
    assert raw.headers["x-scillm-attempts"] == "2"


def test_200_concurrent_requests_respect_a_limit_of_4(start):
    with FakeOpenAI() as fake_a:
        _200_concurrent(start, fake_a)


def _200_concurrent(start, fake_a):
    server = start(fake_a.base_url, resilience={"limits": {"openai": {"max_concurrency": 4, "max_queue": 500}}})
    fake_a.default = Reply.say("ok", delay_s=0.005)

    async def burst() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="sk-dev-proxy-123", max_retries=0,
                                    timeout=30)
        async with client:
            results = await asyncio.gather(*(client.chat.completions.create(
                model="openai/gpt-a", messages=[{"role": "user", "content": f"n{i}"}]) for i in range(200)))
        return [r.choices[0].message.content for r in results]

    assert asyncio.run(burst()) == ["ok"] * 200
    assert len(fake_a.requests) == 200
    assert fake_a.max_in_flight == 4
    state = health(server)["concurrency"]["providers"]["openai"]
    assert state["in_flight"] == 0 and state["waiting"] == 0 and state["limit"] == 4


def test_bounded_queue_full_is_429_at_once_and_a_wait_past_the_deadline_is_503(start, fake_a):
    server = start(fake_a.base_url, resilience={"limits": {"openai": {"max_concurrency": 1, "max_queue": 1}}})
    fake_a.script(Reply.say("slow", delay_s=1.2))

    async def three() -> tuple[Any, Any, Any]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0)
        async with client:
            first = asyncio.ensure_future(client.chat.completions.create(model="openai/gpt-a", messages=HI))
            await asyncio.sleep(0.3)
            queued = asyncio.ensure_future(client.chat.completions.create(
                model="openai/gpt-a", messages=HI, extra_body={"timeout": 0.5}))
            await asyncio.sleep(0.1)
            began = time.monotonic()
            with pytest.raises(openai.RateLimitError) as full:
                await client.chat.completions.create(model="openai/gpt-a", messages=HI)
            assert time.monotonic() - began < 0.3
            with pytest.raises(openai.APIStatusError) as waited:
                await queued
            return await first, full.value, waited.value

    first, full, waited = asyncio.run(three())
    assert first.choices[0].message.content == "slow"
    body = full.response.json()["error"]
    assert body["code"] == "concurrency_queue_full" and "max_queue" in body["message"]
    assert "openai (gpt-a)" in body["message"] and full.response.headers["retry-after"] == "1"
    body = waited.response.json()["error"]
    assert waited.status_code == 503 and body["code"] == "concurrency_wait_timeout", body
    assert "no concurrency slot" in body["message"]
    assert len(fake_a.requests) == 1
    state = health(server)["concurrency"]["providers"]["openai"]
    assert state["rejected"] == 2 and state["in_flight"] == 0 and state["waiting"] == 0


def test_aimd_halves_the_limit_on_429_and_recovers(start, fake_a):
    server = start(fake_a.base_url, resilience={"aimd_recover_s": 1.0,
                                                "limits": {"openai": {"max_concurrency": 8, "max_queue": 10}}})
    fake_a.script(Reply.fail(429, "Rate limit reached", headers={"retry-after-ms": "10"}), Reply.say("ok"))
    assert client_for(server).chat.completions.create(model="openai/gpt-a", messages=HI).choices[0].message.content \
        == "ok"
    state = health(server)["concurrency"]["providers"]["openai"]
    assert state["effective_limit"] == 4 and state["limit"] == 8 and state["aimd_decreases"] == 1
    time.sleep(1.05)
    assert 4 < health(server)["concurrency"]["providers"]["openai"]["effective_limit"] < 8  # +1 per quiet second


def test_flapping_deployment_is_cooled_down_and_probed_back(start, fake_a, fake_b):
    server = start(fake_a.base_url, fake_b.base_url, groups=GROUP,
                   resilience={"max_retries": 0, "breaker_threshold": 2, "breaker_cooldown_s": 4})
    fake_a.script(Reply.fail(500, "flap"), Reply.fail(503, "flap"))
    fake_a.default = Reply.say("primary is back")
    fake_b.default = Reply.say("fallback")
    client = client_for(server)

    def served() -> str:
        raw = client.chat.completions.with_raw_response.create(model="g", messages=HI)
        return raw.headers["x-scillm-served-model"]

    assert [served(), served()] == ["deepseek-chat", "deepseek-chat"]
    assert len(fake_a.requests) == 2
    circuit = health(server)["breaker"]["circuits"]["openai/gpt-a"]
    assert circuit["state"] == "open" and circuit["consecutive_failures"] == 2
    assert 0 < circuit["cooldown_remaining_s"] <= 4
    assert served() == "deepseek-chat"  # cooling down: skipped without an upstream call
    assert len(fake_a.requests) == 2
    time.sleep(circuit["cooldown_remaining_s"] + 0.1)
    assert served() == "gpt-a"  # the half-open probe succeeded
    assert len(fake_a.requests) == 3
    circuit = health(server)["breaker"]["circuits"]["openai/gpt-a"]
    assert circuit["state"] == "closed" and circuit["consecutive_failures"] == 0


def test_failed_probe_reopens_and_all_open_is_a_clear_503(start, fake_a, fake_b):
    server = start(fake_a.base_url, fake_b.base_url, groups=GROUP,
                   resilience={"max_retries": 0, "breaker_threshold": 1, "breaker_cooldown_s": 30})
    fake_a.default = Reply.fail(500, "primary down")
    fake_b.default = Reply.fail(503, "fallback down")
    client = client_for(server)
    with pytest.raises(openai.APIStatusError) as first:
        client.chat.completions.create(model="g", messages=HI)
    assert first.value.status_code == 503 and "deepseek (deepseek-chat)" in first.value.message
    with pytest.raises(openai.APIStatusError) as second:
        client.chat.completions.create(model="g", messages=HI)
    body = second.value.response.json()["error"]
    assert second.value.status_code == 503 and body["code"] == "circuit_open"
    assert "openai/gpt-a" in body["message"] and "deepseek/deepseek-chat" in body["message"]
    assert "group 'g'" in body["message"]
    assert int(second.value.response.headers["retry-after"]) >= 1
    assert len(fake_a.requests) == 1 and len(fake_b.requests) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels_the_upstream_call(start, stream):
    with StallingOpenAI() as fake:
        server = start(fake.base_url, **{"server": {"heartbeat_s": 0.2}})
        client = client_for(server, timeout=0.6)
        with pytest.raises(openai.APITimeoutError):
            created = client.chat.completions.create(model="openai/gpt-a", messages=HI, stream=stream)
            for _ in created:
                pass
        assert fake.dropped.wait(3.0), "scillm kept the upstream call open after the client left"
        deadline = time.monotonic() + 3.0
        while health(server)["concurrency"]["providers"]["openai"]["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert health(server)["concurrency"]["providers"]["openai"]["in_flight"] == 0
        assert fake.in_flight == 0


def test_health_reports_state_without_secrets(start, fake_a):
    server = start(fake_a.base_url, resilience={"limits": {"openai": {"max_concurrency": 3, "max_queue": 7}}})
    fake_a.script(Reply.fail(500, f"key {OPENAI_KEY} leaked upstream"), Reply.say("ok"))
    client_for(server).chat.completions.create(model="openai/gpt-a", messages=HI)
    response = httpx.get(server.url + "/v1/scillm/health", headers={"authorization": "Bearer sk-dev-proxy-123"})
    assert OPENAI_KEY not in response.text
    state = response.json()["middleware"]["resilience"]
    assert state["switches"]["breaker"] is True and state["fails"]["concurrency"] == "closed"
    assert state["concurrency"]["providers"]["openai"] == {
        "limit": 3, "effective_limit": 3, "in_flight": 0, "waiting": 0, "max_queue": 7, "aimd_decreases": 0,
        "rejected": 0, "served": 2}
    circuit = state["breaker"]["circuits"]["openai/gpt-a"]
    assert circuit["state"] == "closed" and circuit["total_failures"] == 1


def test_switched_off_passes_calls_through(start, fake_a, fake_b):
    server = start(fake_a.base_url, fake_b.base_url, groups=GROUP, resilience={"enabled": False})
    fake_a.script(Reply.fail(500, "down"))
    with pytest.raises(openai.InternalServerError):
        client_for(server).chat.completions.create(model="g", messages=HI)
    assert len(fake_a.requests) == 1 and not fake_b.requests
    assert health(server)["enabled"] is False


def test_retries_and_fallbacks_switch_off_separately(start, fake_a, fake_b):
    server = start(fake_a.base_url, fake_b.base_url, groups=GROUP,
                   resilience={"retries": False, "max_retries": 3})
    fake_a.script(Reply.fail(500, "down"))
    fake_b.script(Reply.say("fallback"))
    raw = client_for(server).chat.completions.with_raw_response.create(model="g", messages=HI)
    assert raw.headers["x-scillm-attempts"] == "2" and len(fake_a.requests) == 1
    server2 = start(fake_a.base_url, fake_b.base_url, groups=GROUP, resilience={"fallbacks": False})
    fake_a.script(Reply.fail(500, "down"), Reply.fail(500, "down"))
    with pytest.raises(openai.InternalServerError):
        client_for(server2).chat.completions.create(model="g", messages=HI)
    assert len(fake_b.requests) == 1


# -- provider-wide pauses on upstream 429s --------------------------------------------------------------------------

def _pauses(server: ServerThread) -> dict[str, Any]:
    return health(server).get("pauses", {}).get("deployments", {})  # type: ignore[no-any-return]


def _wait_paused(server: ServerThread, deployment: str) -> None:
    deadline = time.monotonic() + 10
    while deployment not in _pauses(server):
        assert time.monotonic() < deadline, f"{deployment} was never paused"
        time.sleep(0.01)


def test_a_429_storm_pauses_the_provider_and_holds_callers_until_it_passes(start, fake_a):
    server = start(fake_a.base_url, resilience={"max_retries": 2})
    storm = threading.Event()
    storm.set()
    limited: list[int] = []

    def answer(request: Any) -> Reply:
        if storm.is_set():
            limited.append(1)
            return Reply.fail(429, "Rate limit reached", code="rate_limit_exceeded", headers={"retry-after": "1"})
        return Reply.say("after the storm")

    fake_a.responder = answer

    async def storm_of_callers() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=60)
        async with client:
            def call(i: int) -> Any:
                return asyncio.ensure_future(client.with_raw_response.chat.completions.create(
                    model="openai/gpt-a", messages=[{"role": "user", "content": f"n{i}"}],
                    extra_body={"timeout": 45}))

            first = call(0)
            await asyncio.to_thread(_wait_paused, server, "openai/gpt-a")  # the first 429 paused the provider
            rest = [call(i) for i in range(1, 40)]
            await asyncio.sleep(3.0)  # the storm lasts a few retry-after periods
            during = len(limited)
            storm.clear()
            raws = await asyncio.gather(first, *rest)
            return [during, raws]

    during, raws = asyncio.run(storm_of_callers())
    # while the storm lasted the upstream saw the first call and about one probe per retry-after second,
    # not 40 callers retrying
    assert 1 <= during <= 8, during
    assert [raw.parse().choices[0].message.content for raw in raws] == ["after the storm"] * 40
    assert len(fake_a.requests) == len(limited) + 40  # every caller succeeded with one call after the storm
    state = health(server)["pauses"]
    assert state["deployments"] == {} and state["held"] == 0 and state["lifted_by_probe"] == 1


def test_a_pause_longer_than_the_deadline_is_a_429_at_once_without_an_upstream_call(start, fake_a):
    server = start(fake_a.base_url)
    fake_a.script(Reply.fail(429, "Rate limit reached", headers={"retry-after": "20"}))
    client = client_for(server)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="openai/gpt-a", messages=HI, extra_body={"timeout": 5})
    assert len(fake_a.requests) == 1
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="openai/gpt-a", messages=HI, extra_body={"timeout": 5})
    assert len(fake_a.requests) == 1  # the paused provider was not called again
    body = caught.value.response.json()["error"]
    assert body["code"] == "provider_paused" and "openai/gpt-a is paused" in body["message"]
    assert "openai (gpt-a)" in body["message"] and "retry-after 20s" in body["message"]
    assert 15 <= int(caught.value.response.headers["retry-after"]) <= 20


def test_a_paused_primary_falls_back_without_being_called(start, fake_a, fake_b):
    server = start(fake_a.base_url, fake_b.base_url, groups=GROUP)
    fake_a.script(Reply.fail(429, "Rate limit reached", headers={"retry-after": "60"}))
    fake_b.default = Reply.say("fallback")
    client = client_for(server)
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model="g", messages=HI)
        assert raw.headers["x-scillm-served-model"] == "deepseek-chat"
    assert len(fake_a.requests) == 1 and len(fake_b.requests) == 3
    assert 50 < _pauses(server)["openai/gpt-a"]["remaining_s"] <= 60


def test_pauses_switch_off(start, fake_a):
    server = start(fake_a.base_url, resilience={"pause": False})
    fake_a.script(Reply.fail(429, "Rate limit reached", headers={"retry-after": "20"}))
    fake_a.default = Reply.say("no pause")
    client = client_for(server)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="openai/gpt-a", messages=HI, extra_body={"timeout": 5})
    assert client.chat.completions.create(model="openai/gpt-a", messages=HI).choices[0].message.content == "no pause"
    assert _pauses(server) == {}


def _position(fake: FakeOpenAI, text: str) -> int:
    """Where the call asking ``text`` came in the upstream's order of requests."""
    return [r.body["messages"][-1]["content"] for r in fake.requests].index(text)


def _hold_the_first_call(fake: FakeOpenAI) -> threading.Event:
    """The upstream keeps its first call (the one holding the only slot) until the returned gate is set, so a
    test can line up the queue behind it. (The fake's own loop waits: with a limit of 1 nothing else is in flight.)"""
    gate = threading.Event()

    def respond(request: Any) -> Reply:
        if len(fake.requests) == 1:
            assert gate.wait(30)
        return Reply.say("ok")

    fake.responder = respond
    return gate


async def _until_waiting(server: ServerThread, count: int) -> None:
    for _ in range(1500):
        if health(server)["concurrency"]["providers"]["openai"]["waiting"] >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {count} calls ever waited")


def test_a_batch_does_not_hold_up_its_keys_other_calls(start, fake_a):
    """Twelve batch items wait for a provider limit of 1; a chat call of the same key made after them is served
    within one more item (first in, first out it would have come thirteenth)."""
    server = start(fake_a.base_url, resilience={"limits": {"openai": {"max_concurrency": 1}}})
    gate = _hold_the_first_call(fake_a)

    async def run() -> Any:
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     headers={"authorization": f"Bearer {DEV_KEY}"}) as http:
            batch = asyncio.ensure_future(http.post("/v1/scillm/batch/completions", json={
                "model": "openai/gpt-a", "batch_id": "fair-queue", "concurrency": 13,
                "items": [{"item_id": f"i{n}", "messages": [{"role": "user", "content": f"item {n}"}]}
                          for n in range(13)]}))
            await _until_waiting(server, 12)
            chat = asyncio.ensure_future(http.post("/v1/chat/completions", json={
                "model": "openai/gpt-a", "messages": [{"role": "user", "content": "interactive"}]}))
            await _until_waiting(server, 13)
            gate.set()
            return await chat, await batch

    chat, batch = asyncio.run(run())
    assert chat.status_code == 200 and batch.status_code == 200
    assert batch.json()["completed"] == 13
    assert _position(fake_a, "interactive") <= 2, [r.body["messages"][-1]["content"] for r in fake_a.requests]


def test_one_keys_flood_does_not_starve_another_key_or_push_it_out_of_a_full_queue(start, fake_a):
    """Key A sends 9 calls at once through a limit of 1 and a queue of 8; key B's call, made after them, is served
    within one more of A's, and the full queue refuses A's newest waiter to make room for B, not B."""
    server = start(fake_a.base_url, resilience={"limits": {"openai": {"max_concurrency": 1, "max_queue": 8}}})
    gate = _hold_the_first_call(fake_a)
    admin = httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {DEV_KEY}"})
    keys = [admin.post("/v1/scillm/keys", json={"name": name}).json()["key"] for name in ("a", "b")]

    async def run() -> tuple[list[Any], Any]:
        clients = [openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0) for key in keys]
        flood = [asyncio.ensure_future(clients[0].chat.completions.create(
            model="openai/gpt-a", messages=[{"role": "user", "content": f"a {n}"}])) for n in range(9)]
        await _until_waiting(server, 8)
        b = asyncio.ensure_future(clients[1].chat.completions.create(
            model="openai/gpt-a", messages=[{"role": "user", "content": "b"}]))
        await asyncio.wait(flood, return_when=asyncio.FIRST_COMPLETED)  # the one refused for b, gate still shut
        gate.set()
        results = await asyncio.gather(*flood, return_exceptions=True), await b
        for client in clients:
            await client.close()
        return results

    a, b = asyncio.run(run())
    assert b.choices[0].message.content == "ok"
    refused = [r for r in a if isinstance(r, openai.RateLimitError)]
    assert len(refused) == 1 and "gave its place" in refused[0].response.json()["error"]["message"]
    assert sum(not isinstance(r, Exception) for r in a) == 8
    assert _position(fake_a, "b") <= 2, [r.body["messages"][-1]["content"] for r in fake_a.requests]
