"""The shared upstream helpers: retry hints, and reply size caps enforced while reading."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from scillm_core import errors
from scillm_core.testing import DEV_KEY, FakeOpenAI, ServerThread, make_app
from scillm_core.testing.fakes import sse
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


# -- reply size caps, enforced while reading --------------------------------------------------------------------

class HugeReplies(FakeOpenAI):
    """Answers with a reply far past the caps, produced lazily; ``sent`` counts the bytes it managed to send."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0
        self.mode = "body"

    def routes(self) -> list[Route]:
        return [Route(f"{self.base_path}/chat/completions", self.huge, methods=["POST"])]

    async def huge(self, request: Request) -> Response:
        await self.record(request)
        self.sent = 0
        piece = b"x" * 65536

        def count(data: bytes) -> bytes:
            self.sent += len(data)
            return data
        # each piece is produced after the previous one was handed to the socket (flow control), and a pause
        # lets the server notice a closed connection: ``sent`` is what scillm read, plus socket buffers

        async def body() -> AsyncIterator[bytes]:  # a valid completion whose content is 64 MiB of "x"
            yield count(b'{"id": "c1", "object": "chat.completion", "created": 0, "model": "m", "choices": [{'
                        b'"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "')
            for _ in range(1024):
                yield count(piece)
                await asyncio.sleep(0)
            yield count(b'"}}]}')

        async def endless_line() -> AsyncIterator[bytes]:  # one SSE line that never ends
            yield count(b'data: {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, '
                        b'"delta": {"content": "')
            for _ in range(1024):
                yield count(piece)
                await asyncio.sleep(0)

        async def many_events() -> AsyncIterator[bytes]:  # small valid events, without end
            event = sse({"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
                         "choices": [{"index": 0, "delta": {"content": "x" * 4000}, "finish_reason": None}]})
            for _ in range(20000):
                yield count(event)
                await asyncio.sleep(0)

        if self.mode == "error":
            return StreamingResponse(body(), status_code=500, media_type="application/json")
        source = {"body": body, "line": endless_line, "events": many_events}[self.mode]
        media = "application/json" if self.mode == "body" else "text/event-stream"
        return StreamingResponse(source(), media_type=media)


@pytest.fixture(scope="module")
def huge() -> Iterator[HugeReplies]:
    with HugeReplies() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture(scope="module")
def capped(huge: HugeReplies, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    config = {"server": {"max_upstream_reply_mb": 1, "max_upstream_stream_mb": 2, "max_upstream_line_mb": 0.5}}
    app = make_app(env={"OPENAI_API_KEY": "sk-cap-test-0123456789", "OPENAI_API_BASE": huge.base_url},
                   config=config, data_dir=tmp_path_factory.mktemp("caps"), only=("chat", "auth", "openai-compat"))
    with ServerThread(app) as server:
        yield server


@pytest.mark.parametrize(("mode", "stream", "what", "cap_mib"), [
    ("body", False, "the reply body", 1), ("error", False, "the reply body", 1), ("error", True, "the reply body", 1),
    ("line", True, "one line of the streamed reply", 0.5), ("events", True, "the streamed reply", 2)])
def test_oversized_upstream_replies_are_a_502_cut_off_while_reading(huge: HugeReplies, capped: ServerThread,
                                                                    mode: str, stream: bool, what: str,
                                                                    cap_mib: float) -> None:
    huge.mode = mode
    client = openai.OpenAI(base_url=capped.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.APIError) as caught:
        list(client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                            stream=stream))
    if mode == "events":  # chunks were already handed on: the stream ends with an error event
        error = caught.value.body
    else:
        assert isinstance(caught.value, openai.APIStatusError) and caught.value.status_code == 502
        error = caught.value.response.json()["error"]
    assert error["code"] == "upstream_reply_too_large"
    assert error["message"].startswith("openai (gpt-4o-mini): ") and what in error["message"]
    assert "max_upstream_" in error["message"]
    # scillm stopped reading near the cap: the fake could not push its 64 MiB through (the margin covers loopback
    # socket buffers and what the fake writes before it notices the closed connection on a busy machine)
    assert huge.sent < (cap_mib + 24) * (1 << 20), huge.sent


# -- replies that are not what they claim ------------------------------------------------------------------------

class Liars(FakeOpenAI):
    """A chat completion labelled ``content-encoding: gzip`` that is not gzip."""

    def routes(self) -> list[Route]:
        return [Route(f"{self.base_path}/chat/completions", self.lie, methods=["POST"])]

    async def lie(self, request: Request) -> Response:
        await self.record(request)
        return Response(b'{"id": "c1", "object": "chat.completion"}', media_type="application/json",
                        headers={"content-encoding": "gzip"})


class NotHttp:
    """A loopback listener that answers every request with ``answer``: bytes that are not an HTTP response, or
    nothing (the connection closed once the request came)."""

    def __init__(self, answer: bytes = b"0\r\n\r\nnot a status line\r\n\r\n") -> None:
        self.answer = answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.answered = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                seen = b""
                while b"\r\n\r\n" not in seen:
                    data = conn.recv(65536)
                    if not data:
                        break
                    seen += data
                conn.sendall(self.answer)
                self.answered += 1


@pytest.fixture(scope="module")
def liars() -> Iterator[Liars]:
    with Liars() as fake:
        yield fake  # type: ignore[misc]


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_reply_that_lies_about_its_encoding_is_not_http_or_is_nothing_is_a_502(
        liars: Liars, stream: bool, transport: str, tmp_path: Any) -> None:
    not_http, silent = NotHttp(), NotHttp(b"")
    for base, code, says in [(liars.base_url, "upstream_bad_response", "content-encoding could not be decoded"),
                             (not_http.url, "connection_error", "connection failed"),
                             (silent.url, "connection_error", "connection failed")]:  # not "could not connect"
        app = make_app(env={"OPENAI_API_KEY": "sk-liar-test-0123456789", "OPENAI_API_BASE": base,
                            "SCILLM_HTTP_TRANSPORT": transport},
                       config={"resilience": {"max_retries": 0}}, data_dir=tmp_path / code,
                       only=("chat", "auth", "openai-compat", "resilience"))
        with ServerThread(app) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=30)
            with pytest.raises(openai.APIStatusError) as caught:
                list(client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                                    stream=stream))
        assert caught.value.status_code == 502, caught.value.response.text
        error = caught.value.response.json()["error"]
        assert error["code"] == code and error["message"].startswith("openai (gpt-4o-mini): ")
        assert says in error["message"] and "127.0.0.1" not in error["message"]
    assert not_http.answered >= 1 and silent.answered >= 1
    not_http.sock.close()
    silent.sock.close()


# -- SSE parsing and the shared client ---------------------------------------------------------------------------

SSE_WIRE = (b": keep-alive\r\n\r\n"              # a comment block: no event, its bytes ride on the next one
            b"event: delta\r\nid: 7\r\ndata: {\"a\":1}\r\n\r\n"
            b"data:no-space\rdata:  two spaces\r\r"  # bare CR line ends; one leading space stripped, not two
            b"data\n\n"                           # a field without a colon: an empty data line
            b"data: caf\xc3\xa9 \xff\n\n"          # UTF-8 kept, an invalid byte replaced
            b"data: [DONE]")                      # the last event lacks its terminator
SSE_EVENTS = [
    ("{\"a\":1}", "delta", "7", b": keep-alive\r\n\r\nevent: delta\r\nid: 7\r\ndata: {\"a\":1}\r\n\r\n"),
    ("no-space\n two spaces", None, "7", b"data:no-space\rdata:  two spaces\r\r"),
    ("", None, "7", b"data\n\n"),
    ("caf\u00e9 \ufffd", None, "7", b"data: caf\xc3\xa9 \xff\n\n"),
    ("[DONE]", None, "7", b"data: [DONE]\n\n"),
]


@pytest.mark.parametrize("split", range(1, len(SSE_WIRE)))
def test_sse_events_do_not_depend_on_where_the_reads_split(split):
    from scillm_core.upstream import iter_sse

    async def reads() -> AsyncIterator[bytes]:
        yield SSE_WIRE[:split]
        yield SSE_WIRE[split:]

    async def events() -> list[tuple[str, str | None, str | None, bytes]]:
        return [(e.data, e.event, e.id, e.raw) async for e in iter_sse(reads(), raw=True)]

    assert asyncio.run(events()) == SSE_EVENTS


def test_the_shared_client_keeps_no_upstream_cookie():
    import httpx

    from scillm_core.http import make_http_client

    sent: list[str | None] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("cookie"))
        return httpx.Response(200, headers={"set-cookie": "session=tenant-a; Path=/"}, content=b"{}")

    async def two_calls() -> None:
        client = make_http_client(transport=httpx.MockTransport(upstream))
        for _ in range(2):
            await client.post("http://127.0.0.1:9/v1/chat/completions", content=b"{}")
        await client.aclose()

    asyncio.run(two_calls())
    assert sent == [None, None]


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_an_upstream_reply_is_freed_without_the_garbage_collector(transport):
    """A read or closed reply leaves no reference cycle behind (httpx's response and the stream around it pointed at
    each other, holding the transport's whole reply): otherwise every upstream call is garbage that only the
    collector frees, and collecting it was about 4% of a request's CPU."""
    import gc

    from scillm_core.http import make_http_client
    from scillm_core.testing import FakeOpenAI

    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

    async def calls(url: str) -> None:
        client = make_http_client(env={"SCILLM_HTTP_TRANSPORT": transport})
        try:
            for _ in range(3):
                answer = await client.post(url, json=body)
                assert answer.json()["choices"]
                async with client.stream("POST", url, json={**body, "stream": True}) as streamed:
                    assert b"data: [DONE]" in b"".join([chunk async for chunk in streamed.aiter_raw()])
                failed = await client.post(url + "/nowhere", json=body)  # an error body, read whole
                assert failed.status_code == 404
        finally:
            await client.aclose()

    ours = ("httpx", "httpx_aiohttp", "aiohttp", "multidict", "yarl", "scillm_core")
    with FakeOpenAI() as fake:
        gc.collect()
        gc.disable()
        try:
            asyncio.run(calls(fake.base_url + "/chat/completions"))
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            left = sorted({f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
                           if type(o).__module__.split(".")[0] in ours})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert left == [], left


def test_a_base_url_with_a_user_and_password_and_a_key_is_a_clear_400_not_a_500(tmp_path: Any) -> None:
    """A provider whose base URL carries basic-auth credentials and which has a key too: the call cannot send both
    (aiohttp refuses before sending), so the answer says what is wrong with the configuration, without the password,
    instead of an internal error; nothing reaches the upstream."""
    with FakeOpenAI() as fake:
        base = fake.base_url.replace("http://", "http://team:Pr0xyPassw0rd@")
        env = {"OPENAI_API_KEY": "sk-openai-credentials-0123456789", "OPENAI_API_BASE": base}
        with ServerThread(make_app(env=env, data_dir=tmp_path)) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0)
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "provider_not_configured"
    assert "openai's base URL holds a user name and password" in error["message"]
    assert "Pr0xyPassw0rd" not in str(caught.value.response.text) and fake.requests == []
