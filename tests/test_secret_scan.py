"""Secrets never leave scillm. One real ``scillm serve`` runs with provider keys (one shaped like a key, one not),
a master key and, for exec runs, run keys; every error path below is driven against it with upstreams that quote
those keys back (plus a key-shaped token of a key scillm was never given); then every place text can end up is
scanned: responses, SSE events, ``/v1/scillm/health``, ``/metrics``, the call log, the server log, the data
directory and run artifacts. A secret counts as leaked when any 12 characters of its random part show up.

To add an error path: write ``def my_path(scan: Scan) -> None`` that drives it through ``scan.post``,
``scan.stream`` or ``scan.get`` (they record what came back), and decorate it with ``@error_path``. Use
``scan.deepseek`` / ``scan.glm`` (fake upstreams) and the planted values in ``SECRETS``; anything the server writes
to its log, data directory or ops endpoints is scanned by ``test_nothing_leaks_into_the_sinks``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from scillm_core.testing import FakeOpenAI, Reply, free_port, install_fake_cli
from scillm_core.testing.files import file_part, overlapping_zip, pdf_bomb

SCILLM = str(Path(sys.executable).with_name("scillm"))

# what is planted, and the random part of each that must never be seen (prefixes such as "sk-" are not secret)
DEEPSEEK_KEY = "sk-scan-" + secrets.token_hex(16)                    # shaped like a key
GLM_KEY = secrets.token_hex(10) + "." + secrets.token_hex(8)         # not shaped like a key: redacted by value
MASTER_KEY = "scan." + secrets.token_hex(16)                         # not shaped like a key either
UNKNOWN_KEY = "sk-proj-" + secrets.token_hex(20)                     # a key scillm was never given: by its shape
SECRETS = {"deepseek key": DEEPSEEK_KEY, "glm key": GLM_KEY, "master key": MASTER_KEY, "unknown key": UNKNOWN_KEY}
MODEL, GLM_MODEL = "deepseek/deepseek-chat", "glm/glm-5.1"
USER = [{"role": "user", "content": "hello"}]


def secret_fragments(value: str, width: int = 12) -> set[str]:
    # the part after a key's lowercase prefix words ("sk-proj-", "sk-scillm-run-"); a run key's random part may
    # itself hold a "-" (token_urlsafe), so not whatever follows the last "-" (a short tail matches any text)
    tail = re.sub(r"^sk-(?:[a-z]+-)*", "", value) if value.startswith("sk-") else value
    return {tail[i:i + width] for i in range(max(1, len(tail) - width + 1))}


class Scan:
    """The running server, its fake upstreams, and everything that came back so far."""

    def __init__(self, url: str, deepseek: FakeOpenAI, glm: FakeOpenAI, root: Path, data_dir: Path,
                 log: Path) -> None:
        self.url, self.deepseek, self.glm, self.root, self.data_dir, self.log = url, deepseek, glm, root, data_dir, log
        self.client = httpx.Client(base_url=url, timeout=60, headers={
            "authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": "secret-scan"})
        self.seen: list[tuple[str, str]] = []   # (where, text) of every answer
        self.ran: set[str] = set()

    # -- traffic (recorded) -------------------------------------------------------------------------------------

    def _record(self, where: str, response: httpx.Response, text: str) -> None:
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        self.seen.append((where, f"{response.status_code}\n{headers}\n{text}"))

    def post(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        response = self.client.post(path, json=body, **kw)
        self._record(f"POST {path}", response, response.text)
        return response

    def get(self, path: str, **kw: Any) -> httpx.Response:
        response = self.client.get(path, **kw)
        self._record(f"GET {path}", response, response.text)
        return response

    def stream(self, path: str, body: Any) -> str:
        with self.client.stream("POST", path, json=body) as response:
            text = response.read().decode()
            self._record(f"POST {path} (stream)", response, text)
        return text

    # -- scanning -----------------------------------------------------------------------------------------------

    def run_keys(self) -> dict[str, str]:
        return {f"run key {p.name}": p.read_text() for p in self.root.glob("run-key-*.txt") if p.read_text()}

    def leaks(self, text: str) -> list[str]:
        planted = {**SECRETS, **self.run_keys()}
        return [name for name, value in planted.items() if any(f in text for f in secret_fragments(value))]


ERROR_PATHS: list[Callable[[Scan], None]] = []


def error_path(fn: Callable[[Scan], None]) -> Callable[[Scan], None]:
    ERROR_PATHS.append(fn)
    return fn


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scan]:
    base = tmp_path_factory.mktemp("scan")
    root, data_dir, bin_dir = base / "root", base / "data", base / "bin"
    for d in (root, data_dir, bin_dir):
        d.mkdir()
    install_fake_cli(bin_dir)  # the claude-print runner, driving the harness's fake CLI
    config = base / "scillm.toml"
    config.write_text(f"""
[server]
max_upstream_reply_mb = 1
[resilience]
max_retries = 0
breaker_threshold = 1000
[groups.scan-group]
models = ["{GLM_MODEL}", "{MODEL}"]
timeout_s = 1
[json]
schema_retries = 0
[exec]
allowed_roots = ["{root}"]
kill_grace_s = 0.5
[agent_runners]
bin_dir = "{bin_dir}"
default_model = "{MODEL}"
""")
    port = free_port()
    log = base / "server.log"
    with FakeOpenAI() as deepseek, FakeOpenAI() as glm, open(log, "wb") as log_file:
        env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_API_BASE", "_API", "_Key"))
               and k != "SCILLM_MASTER_KEY"}
        env |= {"HOME": str(base), "SCILLM_DATA_DIR": str(data_dir), "SCILLM_MASTER_KEY": MASTER_KEY,
                "DEEPSEEK_API_KEY": DEEPSEEK_KEY, "DEEPSEEK_API_BASE": deepseek.base_url,
                "GLM_API_KEY": GLM_KEY, "GLM_API_BASE": glm.base_url, "OLLAMA_API_BASE": "http://127.0.0.1:9"}
        process = subprocess.Popen([SCILLM, "serve", "--port", str(port), "--config", str(config),
                                    "--log-level", "debug"], cwd=base, env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(url + "/health/readiness").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            yield Scan(url, deepseek, glm, root, data_dir, log)
        finally:
            process.terminate()
            process.wait(timeout=15)


def ran(scan: Scan, fn: Callable[[Scan], None]) -> None:
    if fn.__name__ not in scan.ran:
        scan.ran.add(fn.__name__)
        fn(scan)


# -- error paths ---------------------------------------------------------------------------------------------------

@error_path
def upstream_error_bodies(scan: Scan) -> None:
    """HTTP errors whose body quotes the key (auth failures echo it), streamed and not."""
    for stream in (False, True):
        scan.deepseek.script(Reply.fail(401, f"Incorrect API key provided: {DEEPSEEK_KEY}; also {UNKNOWN_KEY}"))
        assert scan.post("/v1/chat/completions", {"model": MODEL, "messages": USER, "stream": stream}
                         ).status_code == 401
        scan.glm.script(Reply.fail(400, f"token {GLM_KEY} is not valid for this model"))
        assert scan.post("/v1/chat/completions", {"model": GLM_MODEL, "messages": USER, "stream": stream}
                         ).status_code == 400


@error_path
def stream_error_before_the_first_chunk(scan: Scan) -> None:
    """``data: unauthorized Bearer <key>`` as the first event: a 502 before anything was sent."""
    scan.deepseek.script(Reply.say("x", error_after=0, error_event=f"unauthorized Bearer {DEEPSEEK_KEY}".encode()))
    assert scan.post("/v1/chat/completions", {"model": MODEL, "messages": USER, "stream": True}).status_code == 502
    scan.glm.script(Reply.say("x", error_after=0, error_event=f"unauthorized {GLM_KEY} {UNKNOWN_KEY}".encode()))
    assert scan.post("/v1/chat/completions", {"model": GLM_MODEL, "messages": USER, "stream": True}
                     ).status_code == 502


@error_path
def stream_error_after_the_first_chunk(scan: Scan) -> None:
    """The same after chunks went out: an SSE error event in each dialect."""
    for path, body in (("/v1/chat/completions", {"messages": USER}),
                       ("/v1/messages", {"messages": USER, "max_tokens": 50}),
                       ("/v1/responses", {"input": "hello"})):
        scan.glm.script(Reply.say("a long enough answer", error_after=2,
                                  error_event=f"unauthorized Bearer {GLM_KEY} / {UNKNOWN_KEY}".encode()))
        text = scan.stream(path, {"model": GLM_MODEL, "stream": True, **body})
        assert "error" in text and "a lo" in text  # chunks first (4 characters each), then the error event
        scan.deepseek.script(Reply.say("a long enough answer", error_after=2,
                                       error_event={"error": {"message": f"revoked: {DEEPSEEK_KEY}"}}))
        assert "error" in scan.stream(path, {"model": MODEL, "stream": True, **body})


@error_path
def failover_steps(scan: Scan) -> None:
    """A malformed stream event full of keys (skipped, logged), a silent member (a timeout, failed over), a stream
    broken by an error event quoting keys and continued (its reason on the last chunk), and one whose continuation
    is refused with a body quoting keys (an error event naming the break)."""
    garbage = f"data: {{\"key\": \"{DEEPSEEK_KEY} {UNKNOWN_KEY}\", \"choices\": [\n\n".encode()
    scan.deepseek.script(Reply.say("a long enough answer", malformed_at=(2,), garbage=garbage))
    text = scan.stream("/v1/chat/completions", {"model": MODEL, "messages": USER, "stream": True})
    assert "[DONE]" in text and '"error"' not in text  # the event was skipped, the stream went on
    scan.glm.script(Reply(hang=True))
    scan.deepseek.script(Reply.say("after the silence"))
    assert scan.post("/v1/chat/completions", {"model": "scan-group", "messages": USER}).status_code == 200
    for path, body in (("/v1/chat/completions", {"messages": USER}),
                       ("/v1/messages", {"messages": USER, "max_tokens": 50}),
                       ("/v1/responses", {"input": "hello"})):
        scan.glm.script(Reply.say("a long enough answer", error_after=3,
                                  error_event={"error": {"message": f"revoked: {GLM_KEY} {UNKNOWN_KEY}"}}))
        scan.deepseek.script(Reply.say("enough answer, and the rest"))
        assert "scillm_continuation" in scan.stream(path, {"model": "scan-group", "stream": True, **body})
        scan.glm.script(Reply.say("a long enough answer", end_after=3))
        scan.deepseek.script(Reply.fail(400, f"no prefill for {DEEPSEEK_KEY} / {UNKNOWN_KEY}"))
        assert "refused to continue" in scan.stream(path, {"model": "scan-group", "stream": True, **body})


@error_path
def bad_fields_in_a_200(scan: Scan) -> None:
    """A 200 whose body puts a key where a field value belongs (``"role": "Bearer <key>"``): a 502."""
    for fake, model, value in ((scan.deepseek, MODEL, f"Bearer {DEEPSEEK_KEY}"), (scan.glm, GLM_MODEL, GLM_KEY)):
        body = fake.completion(Reply.say("hi"), "chatcmpl-bad", model)
        body["choices"][0]["message"]["role"] = value
        fake.script(Reply(raw=json.dumps(body).encode()))
        assert scan.post("/v1/chat/completions", {"model": model, "messages": USER}).status_code == 502
    fake_body = scan.glm.completion(Reply.say("hi"), "chatcmpl-bad", GLM_MODEL)
    fake_body["choices"][0]["message"]["role"] = GLM_KEY
    scan.glm.script(Reply(raw=json.dumps(fake_body).encode()))
    assert scan.post("/v1/messages", {"model": GLM_MODEL, "messages": USER, "max_tokens": 5}).status_code == 502


@error_path
def json_answers_quoting_keys(scan: Scan) -> None:
    """Model answers that quote keys, quoted back in schema and repair errors."""
    scan.glm.script(Reply.say(json.dumps({"n": f"{GLM_KEY} {UNKNOWN_KEY}"})))
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    assert scan.post("/v1/chat/completions", {"model": GLM_MODEL, "messages": USER, "json_schema": schema}
                     ).status_code == 422
    scan.glm.script(Reply.say(f"no json here, only {GLM_KEY}"))
    assert scan.post("/v1/chat/completions", {"model": GLM_MODEL, "messages": USER,
                                              "response_format": {"type": "json_object"}}).status_code == 502


@error_path
def batch_items(scan: Scan) -> None:
    """Batch items whose upstream errors quote keys: the results, the stored items, the SSE form."""
    scan.glm.script(Reply.fail(400, f"bad key {GLM_KEY}"), Reply.fail(400, f"bad key {GLM_KEY}"))
    body = {"model": GLM_MODEL, "batch_id": "scan-batch", "items": [{"item_id": "a", "prompt": "x"}]}
    assert scan.post("/v1/scillm/batch/completions", body).json()["failed"] == 1
    assert "[redacted]" in scan.get("/v1/scillm/batch/scan-batch").text
    assert "item_failed" in scan.stream("/v1/scillm/batch/completions", {**body, "stream": True})


@error_path
def exec_runs(scan: Scan) -> None:
    """A CLI that prints its run key across a 64 KiB read boundary, and one whose model call fails with keys."""
    key_file = scan.root / f"run-key-{len(scan.run_keys())}.txt"
    run = scan.post("/v1/scillm/exec", {"profile": "claude-print", "cwd": str(scan.root), "wait": True,
                                        "sandbox": "workspace-write",
                                        "prompt": json.dumps({"mode": "leak", "key_file": str(key_file)})}).json()
    assert run["status"] == "completed" and key_file.read_text().startswith("sk-scillm-run-")
    scan.get(f"/v1/scillm/exec/{run['run_id']}")
    scan.get(f"/v1/scillm/exec/{run['run_id']}/events")
    scan.deepseek.script(Reply.fail(401, f"Incorrect API key provided: {DEEPSEEK_KEY}"))
    call = scan.post("/v1/scillm/exec", {"profile": "claude-print", "cwd": str(scan.root), "wait": True,
                                         "prompt": json.dumps({"mode": "call", "base": scan.url, "model": MODEL})})
    assert call.status_code == 200
    scan.get(f"/v1/scillm/exec/{call.json()['run_id']}/events")


@error_path
def oversized_upstream_replies(scan: Scan) -> None:
    """Replies past ``max_upstream_reply_mb`` that are full of keys: a 502, read no further than the cap."""
    filler = (f"{DEEPSEEK_KEY} {UNKNOWN_KEY} " * 40000).encode()
    scan.deepseek.script(Reply(raw=b'{"error": {"message": "' + filler + b'"}}', status=500))
    assert scan.post("/v1/chat/completions", {"model": MODEL, "messages": USER}).status_code == 502
    scan.glm.script(Reply.say(f"{GLM_KEY} " * 80000))
    assert scan.post("/v1/chat/completions", {"model": GLM_MODEL, "messages": USER}).status_code == 502


@error_path
def rate_limit_pauses(scan: Scan) -> None:
    """A 429 whose body quotes the key pauses the provider; callers that cannot wait get a 429 (and health shows
    the pause, built from upstream data)."""
    scan.glm.script(Reply.fail(429, f"slow down, {GLM_KEY} / {UNKNOWN_KEY}", headers={"retry-after": "30"}))
    response = scan.post("/v1/chat/completions", {"model": GLM_MODEL, "messages": USER, "timeout": 2})
    assert response.status_code == 429
    assert scan.post("/v1/chat/completions", {"model": GLM_MODEL, "messages": USER, "timeout": 1}
                     ).status_code == 429  # paused: never reaches the upstream
    scan.get("/v1/scillm/health")


@error_path
def hostile_files(scan: Scan) -> None:
    """File bombs whose names carry keys: 4xx naming the part, nothing sent upstream."""
    for media, data in (("application/pdf", pdf_bomb()), ("application/zip", overlapping_zip())):
        part = file_part(media, data, filename=f"{GLM_KEY}-{UNKNOWN_KEY}.bin")
        body = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, part]}]}
        assert 400 <= scan.post("/v1/chat/completions", body).status_code < 500


@error_path
def unsupported_parameters(scan: Scan) -> None:
    """Parameters a route cannot deliver (or a bad value of one it can), their values carrying keys: a 400 naming
    the parameter, the provider and the model (never the value), in the chat and Messages dialects (Responses asks
    only for logprobs, which Ollama delivers), nothing sent upstream."""
    model = "llama3:8b"  # an Ollama name (model:tag): no audio, no MCP servers, no citations
    assert scan.post("/v1/chat/completions", {"model": model, "messages": USER, "audio": {
        "voice": f"{GLM_KEY}-{UNKNOWN_KEY}", "format": "wav"}}).status_code == 400
    assert scan.post("/v1/chat/completions", {"model": model, "messages": USER,  # logprobs it has: a bad value
                                              "top_logprobs": f"{GLM_KEY}-{UNKNOWN_KEY}"}).status_code == 400
    assert scan.post("/v1/messages", {"model": model, "messages": USER, "max_tokens": 5, "mcp_servers": [
        {"type": "url", "url": f"https://mcp.example.com/?key={DEEPSEEK_KEY}", "name": "x"}]}).status_code == 400
    document = {"type": "document", "citations": {"enabled": True},
                "source": {"type": "text", "media_type": "text/plain", "data": f"{GLM_KEY} {UNKNOWN_KEY}"}}
    assert scan.post("/v1/messages", {"model": model, "max_tokens": 5, "messages": [
        {"role": "user", "content": [document]}]}).status_code == 400


@error_path
def sandbox_violations(scan: Scan) -> None:
    """A CLI that ignores read-only and writes into cwd and outside it: refused by scillm's own sandbox."""
    run = scan.post("/v1/scillm/exec", {"profile": "claude-print", "cwd": str(scan.root), "wait": True,
                                        "sandbox": "read-only", "prompt": json.dumps(
                                            {"mode": "write", "paths": [str(scan.root / "inside.txt"),
                                                                        str(scan.data_dir / "outside.txt")]})}).json()
    assert run["status"] == "completed" and not (scan.root / "inside.txt").exists()
    scan.get(f"/v1/scillm/exec/{run['run_id']}/events")


@pytest.mark.parametrize("path", ERROR_PATHS, ids=[fn.__name__ for fn in ERROR_PATHS])
def test_error_path_answers_carry_no_secret(scan: Scan, path: Callable[[Scan], None]) -> None:
    before = len(scan.seen)
    ran(scan, path)
    answers = scan.seen[before:]
    assert answers, "the path sent nothing"
    leaked = [(where, scan.leaks(text)) for where, text in answers if scan.leaks(text)]
    assert not leaked, leaked


def test_nothing_leaks_into_the_sinks(scan: Scan) -> None:
    for path in ERROR_PATHS:  # also when this test runs on its own
        ran(scan, path)
    health = scan.get("/v1/scillm/health").json()
    circuits = health["middleware"]["resilience"]["breaker"]["circuits"]
    assert any(c["last_error"] for c in circuits.values())  # built from upstream text: there is something to scan
    calls = scan.get("/v1/scillm/calls", params={"limit": 1000}).json()["data"]
    assert any(r.get("error") for r in calls)
    sinks = {"/v1/scillm/health": json.dumps(health), "/v1/scillm/calls": json.dumps(calls),
             "/metrics": scan.get("/metrics").text}
    time.sleep(0.2)  # the server flushes its log lines
    sinks["server log"] = scan.log.read_text(errors="replace")
    assert "HTTP Request" in sinks["server log"]  # debug logging is on: upstream calls are logged
    for path in scan.data_dir.rglob("*"):  # the SQLite store (and its WAL), run artifacts
        if path.is_file():
            sinks[str(path.relative_to(scan.data_dir))] = path.read_bytes().decode("latin-1")
    assert any("runs/run_" in name for name in sinks)
    leaked = {where: scan.leaks(text) for where, text in sinks.items() if scan.leaks(text)}
    assert not leaked, leaked
