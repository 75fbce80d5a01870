"""The OpenAI Batch API with the official ``openai`` SDK as the client: the whole flow for chat and embeddings,
exactly one output line per input line (across a graceful restart and a crash of a real server process), cancel,
and hostile input files and requests."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from scillm_core.testing import DEV_KEY, FakeOpenAI, RecordedRequest, Reply, ServerThread, fake_vector, make_app

AUTH = {"authorization": f"Bearer {DEV_KEY}"}
FINAL = ("completed", "failed", "cancelled", "expired")


class Answering(FakeOpenAI):
    """Answers each chat request with the text of its last message; 400 for POISON; optionally slow. With
    ``hold_after = N`` every request after the N-th hangs (a batch stopped there is stopped mid-way, whatever the
    machine's speed), until ``hold_after`` is set back to ``None``."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.asked: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.hold_after: int | None = None

    def responder(self, request: RecordedRequest) -> Reply | None:  # type: ignore[override]
        if request.path.endswith("/embeddings"):
            return Reply()
        text = request.body["messages"][-1]["content"]
        with self.lock:
            self.asked[text] += 1
            if self.hold_after is not None and sum(self.asked.values()) > self.hold_after:
                return Reply(hang=True)
        if "POISON" in text:
            return Reply.fail(400, "this input is rejected by the model", code="invalid_prompt")
        return Reply.say(f"answer to {text}", delay_s=self.delay_s)


def chat_line(custom_id: str, text: str, model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": text}], **extra}}


def jsonl(lines: list[Any]) -> bytes:
    return b"\n".join(orjson.dumps(line) for line in lines) + b"\n"


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=30)


def wait_for(client: openai.OpenAI, batch_id: str, done: Any = lambda b: b.status in FINAL) -> Any:
    for _ in range(1200):  # a hang guard, not a timing assertion
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} did not get there: {batch}")


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [orjson.loads(line) for line in client.files.content(file_id).text.splitlines()]


def start(client: openai.OpenAI, lines: list[Any], endpoint: str = "/v1/chat/completions", **kw: Any) -> Any:
    uploaded = client.files.create(file=("input.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h",
                                 **kw)  # type: ignore[arg-type]


# -- the ordinary flow -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake() -> Iterator[Answering]:
    with Answering() as fake:
        yield fake  # type: ignore[misc]


@pytest.fixture(scope="module")
def server(fake: Answering, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    config = {"openai_batch": {"max_file_mb": 1, "max_lines": 50, "lease_s": 1.0},
              "pools": {"two-lanes": {"lanes": [{"name": "a", "model": "gpt-4o-mini", "max_concurrency": 2},
                                                {"name": "b", "model": "openai/gpt-4.1", "max_concurrency": 2}]}}}
    env = {"OPENAI_API_KEY": "sk-batch-test-0123456789", "OPENAI_API_BASE": fake.base_url}
    with ServerThread(make_app(env=env, config=config, data_dir=tmp_path_factory.mktemp("batch"))) as server:
        yield server


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return client_for(server.url)


def test_sdk_chat_batch_one_line_per_input_line(client: openai.OpenAI) -> None:
    lines = [chat_line(f"q-{i}", f"question {i}", temperature=0.1) for i in range(20)]
    lines[7] = chat_line("q-7", "POISON pill")                                   # the upstream refuses it
    lines[11] = {"custom_id": "q-11", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "gpt-4o-mini", "messages": "not a list"}}     # scillm refuses its body
    batch = start(client, lines, metadata={"project": "test"})
    assert batch.status == "in_progress" and batch.request_counts.total == 20
    batch = wait_for(client, batch.id)
    assert batch.status == "completed" and batch.metadata == {"project": "test"}
    assert (batch.request_counts.completed, batch.request_counts.failed) == (18, 2)
    output, failed = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    assert sorted(line["custom_id"] for line in output + failed) == sorted(f"q-{i}" for i in range(20))
    for line in output:
        number = line["custom_id"].split("-")[1]
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert line["response"]["body"]["choices"][0]["message"]["content"] == f"answer to question {number}"
    refused = {line["custom_id"]: line["response"] for line in failed}
    assert refused["q-7"]["status_code"] == 400 and "rejected" in refused["q-7"]["body"]["error"]["message"]
    assert refused["q-11"]["status_code"] == 400 and "$.messages" in refused["q-11"]["body"]["error"]["message"]
    assert batch.usage.input_tokens == 18 * 11
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert batch.id in [b.id for b in client.batches.list()]


def test_sdk_embeddings_batch(client: openai.OpenAI) -> None:
    texts = ["alpha", "beta", "gamma"]
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "text-embedding-3-small", "input": text}} for i, text in enumerate(texts)]
    lines.append({"custom_id": "e-b64", "method": "POST", "url": "/v1/embeddings",
                  "body": {"model": "text-embedding-3-small", "input": ["delta"], "encoding_format": "base64"}})
    batch = wait_for(client, start(client, lines, endpoint="/v1/embeddings").id)
    assert batch.status == "completed" and batch.error_file_id is None
    output = {line["custom_id"]: line["response"]["body"] for line in lines_of(client, batch.output_file_id)}
    assert [output[f"e{i}"]["data"][0]["embedding"] for i in range(3)] == [fake_vector(t) for t in texts]
    assert isinstance(output["e-b64"]["data"][0]["embedding"], str)  # the encoding the line asked for


def test_a_pool_runs_a_batch_over_its_lanes(client: openai.OpenAI, fake: Answering) -> None:
    batch = wait_for(client, start(client, [chat_line(f"p{i}", f"pooled {i}", model="two-lanes")
                                            for i in range(12)]).id)
    assert batch.status == "completed" and batch.request_counts.completed == 12
    served = {line["response"]["body"]["model"] for line in lines_of(client, batch.output_file_id)}
    assert served == {"gpt-4o-mini", "gpt-4.1"}


def test_cancel_stops_the_batch_and_accounts_for_every_line(tmp_path: Path) -> None:
    with Answering(delay_s=0.1) as slow:
        env = {"OPENAI_API_KEY": "k", "OPENAI_API_BASE": slow.base_url}
        config = {"openai_batch": {"concurrency": 1, "lease_s": 1.0}}
        with ServerThread(make_app(env=env, config=config, data_dir=tmp_path)) as server:
            client = client_for(server.url)
            batch = start(client, [chat_line(f"c{i}", f"slow {i}") for i in range(30)])
            wait_for(client, batch.id, lambda b: b.request_counts.completed >= 2)
            cancelling = client.batches.cancel(batch.id)
            assert cancelling.status in ("cancelling", "cancelled")
            batch = wait_for(client, batch.id)
            assert batch.status == "cancelled" and batch.cancelled_at
            output, failed = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
            assert sorted(line["custom_id"] for line in output + failed) == sorted(f"c{i}" for i in range(30))
            never_ran = [line for line in failed if line["response"] is None]
            assert never_ran and all(line["error"]["code"] == "batch_cancelled" for line in never_ran)
            assert sum(slow.asked.values()) < 30
            assert client.batches.cancel(batch.id).status == "cancelled"  # again: nothing changes
            shown = httpx.get(server.url + "/v1/scillm/ui/batches", headers=AUTH).json()["data"]
            assert [(b["attrs"]["batch_id"], b["status"]) for b in shown] == [(batch.id, "cancelled")]  # not "error"


def test_a_finished_batch_cannot_be_cancelled(client: openai.OpenAI) -> None:
    batch = wait_for(client, start(client, [chat_line("f0", "quick")]).id)
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


# -- restarts --------------------------------------------------------------------------------------------------------

def check_exactly_once(client: openai.OpenAI, batch: Any, fake: Answering, total: int, in_flight: int) -> None:
    output, failed = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    assert failed == []
    assert sorted(line["custom_id"] for line in output) == sorted(f"r{i}" for i in range(total))
    for line in output:
        number = line["custom_id"][1:]
        assert line["response"]["body"]["choices"][0]["message"]["content"] == f"answer to item {number}"
    calls = sum(fake.asked.values())
    assert total <= calls <= total + in_flight  # only the calls in flight at the restart were made again
    assert max(fake.asked.values()) <= 2


def test_a_graceful_restart_mid_batch_resumes_it(tmp_path: Path) -> None:
    with Answering() as fake:
        fake.hold_after = 10  # 10 answers, then the next two calls hang until the server stops
        env = {"OPENAI_API_KEY": "k", "OPENAI_API_BASE": fake.base_url}
        config = {"openai_batch": {"concurrency": 2, "lease_s": 1.0}}
        lines = [chat_line(f"r{i}", f"item {i}") for i in range(40)]
        with ServerThread(make_app(env=env, config=config, data_dir=tmp_path)) as first:
            client = client_for(first.url)
            batch_id = start(client, lines).id
            before = wait_for(client, batch_id, lambda b: b.request_counts.completed >= 10)
            wait_for(client, batch_id, lambda b: sum(fake.asked.values()) == 12)  # both hanging calls are out
        assert before.status == "in_progress" and before.request_counts.completed == 10
        fake.hold_after = None
        with ServerThread(make_app(env=env, config=config, data_dir=tmp_path)) as second:
            client = client_for(second.url)
            batch = wait_for(client, batch_id)
            assert batch.status == "completed" and batch.request_counts.completed == 40
            check_exactly_once(client, batch, fake, 40, in_flight=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(tmp_path: Path, fake: FakeOpenAI, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_API_BASE"))}
    env.update(SCILLM_DATA_DIR=str(tmp_path / "data"), OPENAI_API_KEY="k", OPENAI_API_BASE=fake.base_url)
    process = subprocess.Popen([str(Path(sys.executable).with_name("scillm")), "serve", "--port", str(port),
                                "--config", str(tmp_path / "scillm.toml")], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(400):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/readiness").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        assert process.poll() is None, "scillm serve exited"
        time.sleep(0.05)
    process.kill()
    raise AssertionError("scillm serve did not become ready")


def test_a_crash_mid_batch_loses_nothing(tmp_path: Path) -> None:
    """A real ``scillm serve`` killed with SIGKILL mid-batch: the next process takes the batch over when the dead
    one's lease runs out, reuses every stored result and finishes with one line per input line."""
    (tmp_path / "scillm.toml").write_text("[openai_batch]\nconcurrency = 2\nlease_s = 1.0\n")
    with Answering() as fake:
        fake.hold_after = 10
        port = free_port()
        process = serve(tmp_path, fake, port)
        try:
            client = client_for(f"http://127.0.0.1:{port}")
            batch_id = start(client, [chat_line(f"r{i}", f"item {i}") for i in range(40)]).id
            wait_for(client, batch_id, lambda b: b.request_counts.completed >= 10)
            wait_for(client, batch_id, lambda b: sum(fake.asked.values()) == 12)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
        fake.hold_after = None
        port = free_port()
        process = serve(tmp_path, fake, port)
        try:
            client = client_for(f"http://127.0.0.1:{port}")
            batch = wait_for(client, batch_id)
            assert batch.status == "completed"
            check_exactly_once(client, batch, fake, 40, in_flight=2)
        finally:
            process.terminate()
            process.wait(timeout=15)


# -- hostile input ---------------------------------------------------------------------------------------------------

GOOD = chat_line("a", "hello")


@pytest.mark.parametrize(("content", "code", "where"), [
    (jsonl([GOOD]) + b"{not json\n", "invalid_json_line", "line 2"),
    (jsonl([GOOD, [1, 2]]), "invalid_request", "line 2"),
    (jsonl([{**GOOD, "method": "GET"}]), "invalid_request", "line 1 $.method"),
    (jsonl([{**GOOD, "url": "/v1/images/generations"}]), "invalid_url", "line 1 $.url"),
    (jsonl([GOOD, {**chat_line("b", "x"), "url": "/v1/embeddings"}]), "url_mismatch", "line 2 $.url"),
    (jsonl([GOOD, chat_line("b", "x", model="gpt-4.1")]), "model_mismatch", "line 2 $.body.model"),
    (jsonl([GOOD, chat_line("b", "x"), chat_line("a", "again")]), "duplicate_custom_id", "line 3 $.custom_id"),
    (jsonl([{**GOOD, "custom_id": 7}]), "invalid_request", "line 1 $.custom_id"),
    (jsonl([{**GOOD, "custom_id": "x" * 513}]), "invalid_request", "line 1 $.custom_id"),
    (jsonl([{**GOOD, "body": {"messages": []}}]), "invalid_request", "line 1 $.body.model"),
    (jsonl([{**GOOD, "body": "text"}]), "invalid_request", "line 1 $.body.model"),
    (jsonl([{**GOOD, "url": ["/v1/chat/completions"]}]), "invalid_url", "line 1 $.url"),  # unhashable: no 500
    (jsonl([{**GOOD, "url": {"path": "/v1/chat/completions"}}]), "invalid_url", "line 1 $.url"),
    (b"\n  \n", "empty_file", "file"),
    (jsonl([chat_line(f"id{i}", "x") for i in range(51)]), "too_many_tasks", "line 51"),
    (jsonl([GOOD]) + b'{"custom_id": "\xff\xfe"}\n', "invalid_json_line", "line 2"),
    (jsonl([GOOD]) + b'{"custom_id": "d", "body": ' + b'{"a":' * 300 + b"1" + b"}" * 301 + b"\n",
     "invalid_json_line", "line 2"),  # nested 300 deep: refused at upload, not when the batch writes results
])
def test_a_bad_batch_file_is_refused_naming_the_line(server: ServerThread, content: bytes, code: str,
                                                      where: str) -> None:
    before = len(httpx.get(server.url + "/v1/files", headers=AUTH).json()["data"])
    answer = httpx.post(server.url + "/v1/files", headers=AUTH, data={"purpose": "batch"},
                        files={"file": ("bad.jsonl", content)})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == code and error["param"] == where and where in error["message"]
    assert len(httpx.get(server.url + "/v1/files", headers=AUTH).json()["data"]) == before


def test_uploads_are_limited_in_size_and_purpose(server: ServerThread) -> None:
    huge = jsonl([chat_line(f"h{i}", "x" * 30_000) for i in range(40)])  # 1.2 MB against max_file_mb = 1
    answer = httpx.post(server.url + "/v1/files", headers=AUTH, data={"purpose": "batch"},
                        files={"file": ("huge.jsonl", huge)})
    assert answer.status_code == 413 and "max_file_mb" in answer.json()["error"]["message"]
    boundary = "scillm-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"file\"; filename=\"huge.jsonl\"\r\n\r\n").encode() + huge + \
        f"\r\n--{boundary}--\r\n".encode()
    pieces = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    chunked = httpx.post(server.url + "/v1/files", content=iter(pieces),
                         headers={**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"})
    assert "content-length" not in chunked.request.headers  # no size up front: refused while it streams in
    assert chunked.status_code == 413
    wrong = httpx.post(server.url + "/v1/files", headers=AUTH, data={"purpose": "fine-tune"},
                       files={"file": ("x.jsonl", jsonl([GOOD]))})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "purpose"
    no_file = httpx.post(server.url + "/v1/files", headers=AUTH, data={"purpose": "batch"},
                         files={"other": ("x.jsonl", jsonl([GOOD]))})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    not_multipart = httpx.post(server.url + "/v1/files", headers=AUTH, json={"purpose": "batch"})
    assert not_multipart.status_code == 400


def test_bad_batch_requests_are_refused_naming_the_field(server: ServerThread, client: openai.OpenAI) -> None:
    chat_file = client.files.create(file=("in.jsonl", io.BytesIO(jsonl([GOOD]))), purpose="batch").id
    stray_file = client.files.create(file=("in.jsonl", io.BytesIO(jsonl([chat_line("s", "x", model="nope-9")]))),
                                     purpose="batch").id
    cases = [
        ({"input_file_id": "file-000000000000000000000000", "endpoint": "/v1/chat/completions",
          "completion_window": "24h"}, 404, "file_id"),
        ({"input_file_id": chat_file, "endpoint": "/v1/embeddings", "completion_window": "24h"}, 400, "$.endpoint"),
        ({"input_file_id": chat_file, "endpoint": "/v1/completions", "completion_window": "24h"}, 400,
         "$.endpoint"),
        ({"input_file_id": chat_file, "endpoint": ["/v1/chat/completions"], "completion_window": "24h"}, 400,
         "$.endpoint"),
        ({"input_file_id": chat_file, "endpoint": {}, "completion_window": "24h"}, 400, "$.endpoint"),
        ({"input_file_id": chat_file, "endpoint": "/v1/chat/completions", "completion_window": "1h"}, 400,
         "$.completion_window"),
        ({"input_file_id": chat_file, "endpoint": "/v1/chat/completions", "completion_window": "24h",
          "metadata": {"k": 1}}, 400, "$.metadata"),
        ({"input_file_id": stray_file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}, 400,
         "$.input_file_id"),
        ({"input_file_id": 5, "endpoint": "/v1/chat/completions", "completion_window": "24h"}, 400,
         "$.input_file_id"),
    ]
    for body, status, where in cases:
        answer = httpx.post(server.url + "/v1/batches", headers=AUTH, json=body)
        assert answer.status_code == status, (body, answer.text)
        assert answer.json()["error"]["param"] == where, body
    for path in ("/v1/files/..%2F..%2Fscillm.sqlite3/content", "/v1/files/file-../content", "/v1/batches/..",
                 "/v1/batches/batch_nope"):
        assert httpx.get(server.url + path, headers=AUTH).status_code == 404, path
    for value in ("²", "9" * 5000, "0"):
        listing = httpx.get(server.url + "/v1/batches", headers=AUTH, params={"limit": value})
        assert listing.status_code == 400 and listing.json()["error"]["param"] == "query.limit", value


def upload_named(server: ServerThread, filename: bytes, *, parts: bytes = b"") -> httpx.Response:
    body = (parts + b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--b\r\n"
            b"Content-Disposition: form-data; name=\"file\"; filename=\"" + filename + b"\"\r\n\r\n" + jsonl([GOOD])
            + b"\r\n--b--\r\n")
    return httpx.post(server.url + "/v1/files", content=body, timeout=30,
                      headers={**AUTH, "content-type": "multipart/form-data; boundary=b"})


def test_a_file_is_listed_and_downloaded_under_its_last_name_component(server: ServerThread) -> None:
    for given, kept in ((b"../../etc/passwd", "passwd"), (b"..\\\\..\\\\evil.jsonl", "evil.jsonl"),
                        ("é😀.jsonl".encode(), "é😀.jsonl"), (b"", "batch.jsonl")):
        answer = upload_named(server, given)
        assert answer.status_code == 200 and answer.json()["filename"] == kept, (given, answer.text)
        download = httpx.get(server.url + f"/v1/files/{answer.json()['id']}/content", headers=AUTH)
        assert download.status_code == 200 and "/" not in download.headers["content-disposition"].split("=", 1)[1]


@pytest.mark.parametrize("filename", [b"a\x00b.jsonl", b"a\x1b[31mred.jsonl", b"x" * 300 + b".jsonl"])
def test_a_file_name_with_control_characters_or_of_300_characters_is_a_400(server: ServerThread,
                                                                            filename: bytes) -> None:
    before = len(httpx.get(server.url + "/v1/files", headers=AUTH).json()["data"])
    answer = upload_named(server, filename)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "file.filename", answer.text[:300]
    assert "x" * 65 not in answer.text
    assert len(httpx.get(server.url + "/v1/files", headers=AUTH).json()["data"]) == before


def test_thousands_of_form_parts_are_a_400_not_parsed_on(server: ServerThread) -> None:
    fields = b"".join(b"--b\r\nContent-Disposition: form-data; name=\"f%d\"\r\n\r\nv\r\n" % i for i in range(5000))
    answer = upload_named(server, b"x.jsonl", parts=fields)
    assert answer.status_code == 400 and "fields" in answer.json()["error"]["message"].lower()
    assert answer.json()["error"]["param"] == "file"
    long_head = upload_named(server, b"x" * 100_000)  # a part head past the parser's bound
    assert long_head.status_code == 400 and long_head.json()["error"]["param"] == "file"
    files = b"".join(b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f.jsonl\"\r\n\r\n{}\r\n"
                     for _ in range(3000))
    too_many = upload_named(server, b"x.jsonl", parts=files)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "file"
