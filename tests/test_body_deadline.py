"""A request's body must arrive within ``[server] body_read_timeout_s`` (scillm_core/body_deadline.py): a client that
sends its head and then stalls or trickles gets a 408 in its route's dialect and its connection is closed, while
everyone else's requests are answered. The deadline is made small here; no test asserts how long anything took."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import select
import socket
import threading
from typing import Any

import anthropic
import openai
import pytest

from scillm_core.body_deadline import BodyDeadline
from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, make_app

MODEL = "deepseek/deepseek-chat"


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def server(fake, tmp_path_factory):
    env = {"DEEPSEEK_API_KEY": "sk-deadline-deepseek-0123456789", "DEEPSEEK_API_BASE": fake.base_url}
    app = make_app(env=env, data_dir=tmp_path_factory.mktemp("d"),
                   config={"server": {"body_read_timeout_s": 0.2, "max_body_mb": 1}, "resilience": {"max_retries": 0}})
    with ServerThread(app) as server:
        yield server


def stalled(server: ServerThread, path: str, *, content_type: str = "application/json", declared: int = 5000,
            start: bytes = b'{"model": "deepseek/deepseek-chat", ', trickle: threading.Event | None = None
            ) -> tuple[int, dict[str, Any], bytes]:
    """Send a head and the start of a body that never completes (with ``trickle``: one more byte every 50 ms until
    it is set); the status, the JSON body and what came after it (b"" when the server closed the connection)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {DEV_KEY}\r\nx-api-key: {DEV_KEY}\r\n"
                     f"anthropic-version: 2023-06-01\r\ncontent-type: {content_type}\r\nx-caller-skill: t\r\n"
                     f"content-length: {declared}\r\n\r\n".encode() + start)
        if trickle is not None:
            sock.settimeout(0.05)
            while True:
                try:
                    first = sock.recv(65536)
                    break
                except TimeoutError:
                    sock.sendall(b" ")
            sock.settimeout(30)
        else:
            first = sock.recv(65536)
        received = first
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        head, _, body = received.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += sock.recv(65536)
        after = sock.recv(65536)  # b"": the server closed the connection (it would block otherwise)
        return int(head.split()[1]), json.loads(body[:length]), after


def test_a_stalled_chat_body_is_a_408_in_the_openai_shape_and_the_connection_is_closed(server, fake):
    calls = len(fake.requests)
    status, body, after = stalled(server, "/v1/chat/completions")
    assert status == 408 and after == b""
    assert body["error"]["code"] == "request_timeout" and "body_read_timeout_s" in body["error"]["message"]
    assert len(fake.requests) == calls  # nothing went upstream


def test_a_trickled_body_is_refused_at_the_deadline_not_kept_alive_by_each_byte(server):
    status, body, after = stalled(server, "/v1/chat/completions", trickle=threading.Event())
    assert status == 408 and body["error"]["code"] == "request_timeout" and after == b""


def test_a_stalled_messages_body_is_a_408_in_the_anthropic_shape(server):
    status, body, after = stalled(server, "/v1/messages")
    assert status == 408 and after == b""
    assert body["type"] == "error" and body["error"]["type"] == "timeout_error"
    assert "body_read_timeout_s" in body["error"]["message"]


def test_a_stalled_multipart_upload_is_a_408(server):
    start = (b"--b\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--b\r\n"
             b"content-disposition: form-data; name=\"file\"; filename=\"x.jsonl\"\r\n\r\n{\"custom_id\"")
    status, body, after = stalled(server, "/v1/files", content_type="multipart/form-data; boundary=b", start=start)
    assert status == 408 and body["error"]["code"] == "request_timeout" and after == b""


def test_stalled_bodies_beside_good_requests_only_the_stalled_ones_fail(server, fake):
    fake.script(*[Reply.say("fine")] * 4)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=30)
    claude = anthropic.Anthropic(base_url=server.url, api_key=DEV_KEY, max_retries=0, timeout=30)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        stalls = [pool.submit(stalled, server, path) for path in ("/v1/chat/completions", "/v1/messages") * 2]
        good = [pool.submit(client.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "hi"}])
                for _ in range(3)]
        good.append(pool.submit(claude.messages.create, model=MODEL, max_tokens=16,
                                messages=[{"role": "user", "content": "hi"}]))
        assert [f.result().choices[0].message.content for f in good[:3]] == ["fine"] * 3
        assert good[3].result().content[0].text == "fine"
        assert [f.result()[0] for f in stalls] == [408] * 4


def test_a_body_sent_in_parts_within_the_deadline_is_read_whole(server, fake):
    fake.script(Reply.say("whole"))
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 200_000}]}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {DEV_KEY}\r\n"
                     f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode())
        for i in range(0, len(body), 16384):
            sock.sendall(body[i:i + 16384])
        received = b""
        while b'"whole"' not in received:
            chunk = sock.recv(65536)
            assert chunk, received.split(b"\r\n\r\n")[0]
            received += chunk
    assert received.startswith(b"HTTP/1.1 200") and len(fake.last.json["messages"][0]["content"]) == 200_000


@pytest.mark.anyio
async def test_a_reader_busy_between_two_receives_at_the_deadline_is_refused_at_its_next_receive():
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    body = BodyDeadline(messages.get, 0.0)
    messages.put_nowait({"type": "http.request", "body": b"{", "more_body": True})
    assert (await body())["body"] == b"{"  # there already: no timer armed, so nothing expires it
    assert body.timer is None
    waiting = asyncio.ensure_future(body())
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the deadline (already past) expires the wait
    with pytest.raises(Exception) as raised:
        await waiting
    assert getattr(raised.value, "status", None) == 408
    body2 = BodyDeadline(messages.get, 0.0)
    body2.expire()  # the deadline passes while the reader is not waiting: its task is not cancelled
    with pytest.raises(Exception) as raised:
        await body2()
    assert getattr(raised.value, "status", None) == 408


def test_a_client_still_sending_its_body_after_the_408_reads_the_whole_answer(server):
    """The refusal comes while the client is still sending (as an HTTP client writes its whole request before
    reading): it goes on sending, then reads the 408 and a clean end, not a reset (scillm_core/protocol.py)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {DEV_KEY}\r\n"
                     "content-type: application/json\r\ncontent-length: 900000\r\n\r\n{".encode())
        while not select.select([sock], [], [], 0.01)[0]:  # a byte now and then until the answer is there
            sock.sendall(b" ")
        for _ in range(32):  # and 512 KiB more after it
            sock.sendall(b" " * 16384)
        received = b""
        while chunk := sock.recv(65536):  # to the end of the connection; a reset raises here
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "request_timeout"


def test_a_body_past_max_body_mb_from_the_sdk_is_a_413_not_a_connection_error(server, fake):
    calls = len(fake.requests)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as raised:  # the answer comes before most of the 3 MB is read
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 3_000_000}])
    assert raised.value.status_code == 413 and raised.value.body["code"] == "payload_too_large"
    assert len(fake.requests) == calls
