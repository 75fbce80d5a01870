"""Scale out for real: a redis-server, two `scillm serve` instances on it and nginx in front (the example config of
docs/deployment.md), all on loopback and started here. Shared limits, breakers, 429 pauses, cache, batches and
leases; an instance killed mid-batch; Redis killed mid-run."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import orjson
import pytest
from scillm_resilience.shared import PAUSE_NS

from scillm_core.state.redis import RedisStore
from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, services
from scillm_core.testing.fakes import RecordedRequest
from scillm_core.testing.services import Nginx, RedisServer, ScillmProcess, free_port, nginx_example

AUTH = {"authorization": f"Bearer {DEV_KEY}", "x-caller-skill": "scale-test"}
DOC = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"


def nginx_block(ports: list[int], listen: int) -> str:
    """The documented nginx example with its servers and port replaced by ours."""
    return nginx_example(DOC.read_text(), ports, listen)


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.upstream = FakeOpenAI().start()
        self.failing = FakeOpenAI().start()
        self.failing.default = Reply.fail(503, "overloaded")
        self.redis = RedisServer(tmp / "redis", persist=True).start()
        repo = tmp / "repo"
        repo.mkdir()
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q",
                        "--allow-empty", "-m", "init"], check=True)
        self.config = {
            "state": {"backend": "redis", "redis_url": self.redis.url, "key_prefix": f"scale-{uuid.uuid4().hex[:6]}:",
                      "claim_timeout_s": 2},
            "resilience": {"breaker_threshold": 2, "breaker_cooldown_s": 120, "backoff_max_s": 0.1,
                           "limits": {"openai": {"max_concurrency": 4}}},
            "cache": {"enabled": True},
            "groups": {"duo": {"models": ["openai/duo-first", "deepseek/duo-second"]}},
            "affinity": {"shared_cache_s": 0.2},
            "agents": {"fixer": {"repository": str(repo), "model": "gpt-4o-mini"}},
        }
        self.env = {"OPENAI_API_KEY": "sk-scale-test-0123456789", "OPENAI_API_BASE": self.upstream.base_url,
                    "DEEPSEEK_API_KEY": "sk-scale-test-9876543210", "DEEPSEEK_API_BASE": self.failing.base_url,
                    "HOME": str(tmp)}
        try:
            self.a = self.instance("a")
            self.b = self.instance("b")
            self.nginx = Nginx(tmp / "nginx", nginx_block([self.a.port, self.b.port], listen := free_port()),
                               listen).start()
        except BaseException:
            self.stop()  # what did start
            raise

    def instance(self, name: str) -> ScillmProcess:
        return ScillmProcess(self.tmp / name, env=self.env, config=self.config).start()

    def stop(self) -> None:
        """Every service, also when one of them fails to stop (each is killed after a grace period)."""
        with contextlib.ExitStack() as stack:
            for name in ("failing", "upstream", "redis", "b", "a", "nginx"):  # stopped in the reverse order
                service = getattr(self, name, None)
                if service is not None:
                    stack.callback(service.stop)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("scale"))
    try:
        yield cluster
    finally:
        cluster.stop()


def chat(url: str, text: str, model: str = "gpt-4o-mini", timeout: float = 60) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=timeout,
                      json={"model": model, "messages": [{"role": "user", "content": text}]})


def health(url: str) -> dict[str, Any]:
    return httpx.get(url + "/v1/scillm/health", headers=AUTH, timeout=10).json()  # type: ignore[no-any-return]


def test_both_instances_report_the_shared_backend(cluster: Cluster) -> None:
    a, b = health(cluster.a.url), health(cluster.b.url)
    assert a["state"]["backend"] == "redis" and a["state"]["reachable"] is True
    assert a["instance_id"] != b["instance_id"]
    deadline = time.monotonic() + 15
    while set(health(cluster.a.url)["state"]["instances"]) != {a["instance_id"], b["instance_id"]}:
        assert time.monotonic() < deadline, "the instances never saw each other"
        time.sleep(0.2)
    assert "sk-scale-test" not in str(a) + str(b)


def test_a_provider_limit_of_4_holds_across_instances_under_200_concurrent_requests(cluster: Cluster) -> None:
    cluster.upstream.default = Reply.say("limited", delay_s=0.05)
    cluster.upstream.max_in_flight = 0
    before = len(cluster.upstream.requests)

    async def storm() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return list(await asyncio.gather(*(client.post(
                cluster.nginx.url + "/v1/chat/completions", headers=AUTH,
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"limit {i} {uuid.uuid4()}"}]})
                for i in range(200))))

    answers = asyncio.run(storm())
    assert [r.status_code for r in answers] == [200] * 200, [r.text for r in answers if r.status_code != 200][:3]
    assert len(cluster.upstream.requests) - before == 200
    assert cluster.upstream.max_in_flight == 4  # the fake's own count: never more than 4 at once, across both
    served = [health(s.url)["middleware"]["resilience"]["concurrency"]["providers"]["openai"]["served"]
              for s in (cluster.a, cluster.b)]
    assert all(n > 0 for n in served)  # nginx spread the load over both instances


def test_a_keys_concurrency_cap_and_daily_budget_hold_across_instances(cluster: Cluster) -> None:
    """One virtual key, two instances behind nginx: its cap of 2 concurrent calls and its dollar budget are counters
    in Redis, so both instances together admit 2 at once and spend one budget (per-instance counters would admit 4
    and spend two); the fake's own count proves that no refused request reached it."""
    made = httpx.post(cluster.a.url + "/v1/scillm/keys", headers=AUTH, timeout=30, json={
        "name": "scale", "limits": {"max_concurrency": 2, "daily_usd": 0.0005}}).json()
    key = {"authorization": f"Bearer {made['key']}", "x-caller-skill": "scale-test"}
    cluster.upstream.default = Reply.say("capped", delay_s=0.2)  # 11 in, 7 out: $0.0000059 a call (gpt-4o-mini)
    cluster.upstream.max_in_flight = 0
    before = len(cluster.upstream.requests)

    async def storm(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return list(await asyncio.gather(*(client.post(
                cluster.nginx.url + "/v1/chat/completions", headers=key,
                json={"model": "gpt-4o-mini", "max_tokens": 5,
                      "messages": [{"role": "user", "content": f"cap {i} {uuid.uuid4()}"}]}) for i in range(n))))

    answers = asyncio.run(storm(40))
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    assert cluster.upstream.max_in_flight <= 2  # across both instances
    assert len(cluster.upstream.requests) - before == len(ok) >= 2
    assert refused and {r.json()["error"]["code"] for r in refused} == {"rate_limited"}
    # one budget: what both instances spent, read through one of them (settlements land within a linger)
    expected = sum(float(r.headers["x-scillm-cost-usd"]) for r in ok)
    deadline = time.monotonic() + 10
    while (spent := httpx.get(cluster.b.url + "/v1/budget", headers=key, timeout=30).json()["spent"]) \
            != pytest.approx(expected, abs=1e-9) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert spent == pytest.approx(expected, abs=1e-9) and expected > 0
    # the spend ledger in Redis: both instances' calls, summed per second by each, read through one of them
    query = {"key": made["id"], "window": "1h"}
    while (spend := httpx.get(cluster.b.url + "/v1/scillm/spend", headers=AUTH, params=query,
                              timeout=30).json())["calls"] != len(ok) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert spend["calls"] == len(ok) and spend["cost_usd"] == pytest.approx(expected, abs=1e-9)
    assert spend["tokens"]["output"] == 7 * len(ok) and not spend["truncated"]


def test_a_breaker_opened_through_one_instance_short_circuits_the_other(cluster: Cluster) -> None:
    assert chat(cluster.a.url, f"fails {uuid.uuid4()}", model="deepseek/deepseek-chat").status_code == 503
    circuits = health(cluster.a.url)["middleware"]["resilience"]["breaker"]["circuits"]
    assert circuits["deepseek/deepseek-chat"]["state"] == "open"  # two failed attempts opened it on A
    calls = len(cluster.failing.requests)
    time.sleep(0.5)  # the other instance's view of shared breakers is at most 0.2 s old
    refused = chat(cluster.b.url, f"fails {uuid.uuid4()}", model="deepseek/deepseek-chat")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "circuit_open"
    assert len(cluster.failing.requests) == calls  # instance B never called the upstream


def test_a_cached_answer_fetched_through_one_instance_is_a_hit_on_the_other(cluster: Cluster) -> None:
    cluster.upstream.default = Reply.say("cached once")
    text = f"cache me {uuid.uuid4()}"
    before = len(cluster.upstream.requests)
    first = chat(cluster.a.url, text)
    second = chat(cluster.b.url, text)
    assert first.headers["x-scillm-cache"] == "miss" and second.headers["x-scillm-cache"] == "hit"
    assert second.json()["choices"][0]["message"]["content"] == "cached once"
    assert len(cluster.upstream.requests) - before == 1


def test_a_429_pause_started_through_one_instance_holds_callers_on_both_and_one_probe_goes(cluster: Cluster) -> None:
    arrivals: list[tuple[str, int]] = []  # each upstream call's text, and how many calls were in flight when it came
    first = [True]

    def answer(request: RecordedRequest) -> Reply:
        arrivals.append((request.body["messages"][-1]["content"], cluster.upstream.in_flight))
        if first.pop() if first else False:
            return Reply.fail(429, "Rate limit reached", code="rate_limit_exceeded", headers={"retry-after": "3"})
        return Reply.say("after the pause", delay_s=0.3)

    async def callers() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            def call(url: str, n: int) -> asyncio.Future[httpx.Response]:
                return asyncio.ensure_future(client.post(url + "/v1/chat/completions", headers=AUTH, json={
                    "model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"pause {n} {uuid.uuid4()}"}]}))

            trigger = call(cluster.a.url, 0)
            store = RedisStore(cluster.redis.url, prefix=cluster.config["state"]["key_prefix"])
            try:
                deadline = time.monotonic() + 15
                while await store.get(PAUSE_NS, "openai/gpt-4o-mini") is None:  # A's 429 paused it for everybody
                    assert time.monotonic() < deadline, "the pause never reached the shared store"
                    await asyncio.sleep(0.02)
            finally:
                await store.close()
            await asyncio.sleep(0.5)  # each instance's view of shared pauses is at most 0.2 s old
            rest = [call((cluster.a, cluster.b)[n % 2].url, n) for n in range(1, 13)]  # 6 through each
            return list(await asyncio.gather(trigger, *rest))

    before = len(cluster.upstream.requests)
    cluster.upstream.responder = answer
    try:
        answers = asyncio.run(callers())
    finally:
        cluster.upstream.responder = None
    assert [r.status_code for r in answers] == [200] * 13, [r.text for r in answers if r.status_code != 200][:3]
    assert {r.json()["choices"][0]["message"]["content"] for r in answers} == {"after the pause"}
    assert len(cluster.upstream.requests) - before == 1 + 13  # the 429, then one call per caller: nobody got a 429
    assert arrivals[1][1] == 0 and arrivals[2][1] == 0  # one probe went alone, the rest only after its answer
    adopted = health(cluster.b.url)["middleware"]["resilience"]["pauses"]
    assert adopted["adopted_from_other_instances"] >= 1 and adopted["held"] == 0 and adopted["deployments"] == {}


def test_a_lease_held_through_one_instance_is_refused_through_the_other(cluster: Cluster) -> None:
    url = "/v1/scillm/agents/fixer/leases"
    held = httpx.post(cluster.a.url + url, headers=AUTH, json={"owner": "agent-one", "ttl_s": 60})
    assert held.status_code == 200, held.text
    refused = httpx.post(cluster.b.url + url, headers=AUTH, json={"owner": "agent-two", "ttl_s": 60})
    assert refused.status_code == 409, refused.text


def test_a_session_sticks_to_its_deployment_whichever_instance_serves_it(cluster: Cluster) -> None:
    """Session affinity on the shared store: a session that failed over to the group's second member through A
    stays there through B (B's own copy knows nothing of it; without the store B would route it to the first member,
    as it does a new session); a move made through B is followed by A."""
    broken = {"duo-first"}  # models the fakes refuse with a 401 (a fallback, never a breaker count or a retry)

    def answer(request: RecordedRequest) -> Reply:
        model = request.body["model"]
        if model in broken:
            return Reply.fail(401, "Incorrect API key provided", type="invalid_request_error", code="invalid_api_key")
        return Reply.say(f"from {model}")

    def turn(url: str, session: str) -> str:
        served = httpx.post(url + "/v1/chat/completions", timeout=30, headers={**AUTH, "x-scillm-session": session},
                            json={"model": "duo", "messages": [{"role": "user", "content": f"turn {uuid.uuid4()}"}]})
        assert served.status_code == 200, served.text
        assert served.json()["choices"][0]["message"]["content"] == f"from {served.headers['x-scillm-served-model']}"
        return served.headers["x-scillm-served-model"]

    session = f"agent-{uuid.uuid4()}"
    cluster.upstream.responder = cluster.failing.responder = answer
    try:
        assert turn(cluster.a.url, session) == "duo-second"  # A: the first member refused, the second answered
        broken.clear()  # the first member is fine again
        assert turn(cluster.b.url, f"new-{uuid.uuid4()}") == "duo-first"  # B routes a new session by group order
        assert [turn(cluster.b.url, session) for _ in range(3)] == ["duo-second"] * 3  # but this one sticks
        assert turn(cluster.a.url, session) == "duo-second"
        broken.add("duo-second")  # through B the session moves to the first member
        assert turn(cluster.b.url, session) == "duo-first"
        broken.clear()
        time.sleep(0.3)  # A's copy of the session is trusted for shared_cache_s (0.2 s here), then read again
        assert [turn(cluster.a.url, session) for _ in range(2)] == ["duo-first"] * 2  # A follows the move
    finally:
        cluster.upstream.responder = cluster.failing.responder = None
    affinity = health(cluster.b.url)["middleware"]["affinity"]
    assert affinity["shared"] is True and affinity["store_reads"] >= 1 and affinity["store_errors"] == 0


def test_a_batch_on_an_instance_killed_half_way_finishes_on_the_other_exactly_once(cluster: Cluster) -> None:
    cluster.upstream.default = Reply.say("batched", delay_s=0.05)
    before = len(cluster.upstream.requests)
    a_id = health(cluster.a.url)["instance_id"]
    items = [{"item_id": f"i{n}", "prompt": f"batch item {n} {uuid.uuid4()}"} for n in range(200)]
    seen = 0
    with httpx.stream("POST", cluster.a.url + "/v1/scillm/batch/completions", headers=AUTH, timeout=60,
                      json={"model": "gpt-4o-mini", "batch_id": "killed-half-way", "items": items,
                            "stream": True}) as response:
        for line in response.iter_lines():
            seen += line.startswith("event: item_completed")
            if seen >= 100:
                break
        cluster.a.kill()  # SIGKILL, half-way

    deadline = time.monotonic() + 90
    while True:  # through nginx, which now only has B
        answer = httpx.get(cluster.nginx.url + "/v1/scillm/batch/killed-half-way", headers=AUTH, timeout=10)
        assert answer.status_code == 200, answer.text
        progress = answer.json()
        if progress["done"]:
            break
        assert time.monotonic() < deadline, f"the batch did not finish on B: {progress['pending']} pending"
        time.sleep(0.3)
    results = progress["results"]
    assert sorted(r["item_id"] for r in results) == sorted(i["item_id"] for i in items)  # one result per item
    assert all(r["ok"] for r in results) and progress["completed"] == 200

    with httpx.stream("GET", cluster.nginx.url + "/v1/scillm/batch/killed-half-way/events", headers=AUTH,
                      timeout=30) as response:
        text = response.read().decode()
    events = [orjson.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    stored_by = {e["item_id"]: e["instance"] for e in events if "item_id" in e}
    assert len(stored_by) == 200 and sum(1 for e in events if "item_id" in e) == 200  # stored once each
    by_a = {item for item, instance in stored_by.items() if instance == a_id}
    assert len(by_a) < 200  # B finished the batch (which worker took which item first is the queue's choice)
    if by_a:  # A ran items too, so it held some when it died: B took them over
        assert health(cluster.b.url)["middleware"]["batch"]["worker"]["reclaimed"] > 0
    sent = collections.Counter(r.body["messages"][-1]["content"] for r in cluster.upstream.requests[before:])
    prompts = {i["item_id"]: i["prompt"] for i in items}
    for item in by_a:
        assert sent[prompts[item]] == 1, f"{item} was sent upstream again after A had stored its result"
    cluster.a = cluster.instance("a")  # back for the next test


def test_redis_killed_mid_run_degrades_clearly_and_recovers_with_nothing_lost(cluster: Cluster) -> None:
    cluster.upstream.default = Reply.say("still served")
    stored_before = httpx.get(cluster.nginx.url + "/v1/scillm/batch/killed-half-way", headers=AUTH,
                              timeout=10).json()["results"]
    cluster.redis.kill()
    started = time.monotonic()
    answer = chat(cluster.nginx.url, f"no redis {uuid.uuid4()}", timeout=30)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "still served"
    state = health(cluster.nginx.url)
    assert state["status"] == "degraded" and state["state"]["reachable"] is False
    refused = httpx.post(cluster.nginx.url + "/v1/scillm/batch/completions", headers=AUTH, timeout=30,
                         json={"model": "gpt-4o-mini", "items": [{"prompt": "x"}]})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "state_unavailable"
    lease = httpx.post(cluster.nginx.url + "/v1/scillm/agents/fixer/leases", headers=AUTH, timeout=30,
                       json={"owner": "agent-three", "ttl_s": 60})
    assert lease.status_code == 503  # a lease that cannot be checked is never granted
    assert time.monotonic() - started < 60  # every answer came within Redis's command timeout: no hang

    cluster.redis.start()  # the same port and append-only file
    deadline = time.monotonic() + 30
    for instance in (cluster.a, cluster.b):  # each one, not whichever nginx picks: the next posts may reach either
        while health(instance.url)["status"] != "ok":
            assert time.monotonic() < deadline, f"{instance.url} did not see Redis come back"
            time.sleep(0.2)
    stored = httpx.get(cluster.nginx.url + "/v1/scillm/batch/killed-half-way", headers=AUTH, timeout=10).json()
    after = {r["item_id"]: r for r in stored["results"]}
    assert all(after.get(r["item_id"]) == r for r in stored_before)  # nothing already stored was lost
    again = httpx.post(cluster.nginx.url + "/v1/scillm/batch/completions", headers=AUTH, timeout=60,
                       json={"model": "gpt-4o-mini", "items": [{"prompt": f"after {uuid.uuid4()}"}]})
    assert again.status_code == 200 and again.json()["completed"] == 1


def test_workers_on_sqlite_share_batches_and_say_which_limits_are_per_process(tmp_path: Path) -> None:
    with FakeOpenAI() as upstream:
        upstream.default = Reply.say("worked", delay_s=0.02)
        server = ScillmProcess(tmp_path / "w", workers=2, env={
            "OPENAI_API_KEY": "sk-workers-test-0123456789", "OPENAI_API_BASE": upstream.base_url}).start()
        try:
            notice = server.log.read_text()
            assert "2 workers on the embedded SQLite store share batches" in notice
            assert "Per worker" in notice and "concurrency limits" in notice and "circuit breakers" in notice
            seen: set[str] = set()
            deadline = time.monotonic() + 30
            while len(seen) < 2:  # both worker processes answer on the one port
                assert time.monotonic() < deadline, f"only {seen} answered"
                with httpx.Client() as fresh:  # a new connection each time, so the kernel may pick either worker
                    seen.add(fresh.get(server.url + "/v1/scillm/health", headers=AUTH).json()["instance_id"])
            items = [{"item_id": f"w{n}", "prompt": f"worker item {n}"} for n in range(40)]
            done = httpx.post(server.url + "/v1/scillm/batch/completions", headers=AUTH, timeout=60,
                              json={"model": "gpt-4o-mini", "batch_id": "two-workers", "items": items}).json()
            assert done["completed"] == 40 and len({r["item_id"] for r in done["results"]}) == 40
            assert len(upstream.requests) == 40
        finally:
            server.stop()


def test_workers_give_agent_children_their_own_address(tmp_path: Path) -> None:
    """Under --workers every process accepts on the shared port, but a CLI's run key lives in the process that
    started the run: the CLI is given that process's own loopback address, so none of its calls reach a worker that
    does not know its key (before, some runs failed: their CLI's model call got a 401 from the other worker)."""
    import json

    from scillm_core.testing import install_fake_cli

    bin_dir, root = tmp_path / "bin", tmp_path / "root"
    bin_dir.mkdir()
    root.mkdir()
    install_fake_cli(bin_dir)
    with FakeOpenAI() as upstream:
        upstream.default = Reply.say("called back")
        server = ScillmProcess(tmp_path / "w", workers=2, env={
            "OPENAI_API_KEY": "sk-workers-test-0123456789", "OPENAI_API_BASE": upstream.base_url},
            config={"exec": {"allowed_roots": [str(root)]},
                    "agent_runners": {"bin_dir": str(bin_dir), "default_model": "openai/fake-model"}}).start()
        try:
            def run(prompt: dict[str, Any]) -> dict[str, Any]:
                with httpx.Client() as fresh:  # a new connection each time: either worker may start the run
                    answer = fresh.post(server.url + "/v1/scillm/exec", headers=AUTH, timeout=60, json={
                        "profile": "claude-print", "prompt": json.dumps(prompt), "cwd": str(root), "wait": True})
                assert answer.status_code == 200, answer.text
                return answer.json()  # type: ignore[no-any-return]

            dumped = run({"mode": "env"})
            events = [json.loads(line) for line in Path(dumped["artifacts"]["events_jsonl"]).read_text().splitlines()]
            child_env = next(e for e in events if e["type"] == "env")["event"]["env"]
            own = child_env["ANTHROPIC_BASE_URL"]
            assert own.startswith("http://127.0.0.1:") and own != server.url  # a worker's own port, not the shared one
            assert httpx.get(own + "/health/readiness", timeout=10).status_code == 200
            results = [run({"mode": "call", "base": server.url, "model": "openai/fake-model"}) for _ in range(8)]
            assert [r["status"] for r in results] == ["completed"] * 8, [r.get("error") for r in results]
            assert {r["final_text"] for r in results} == {"called back"}
        finally:
            server.stop()


class Stubborn(services._Service):
    """A server that ignores SIGTERM and has a child in its process group (like a scillm worker or an agent CLI)."""

    group = True

    def __init__(self, workdir: Path) -> None:
        self.ready_file = workdir / "ready"
        self.child_pid = workdir / "child"

    def start(self) -> Stubborn:
        code = ("import signal, subprocess, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
                "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
                f"open({str(self.child_pid)!r}, 'w').write(str(child.pid))\nopen({str(self.ready_file)!r}, 'w')\n"
                "time.sleep(600)\n")
        self._launch(subprocess.Popen([sys.executable, "-c", code], start_new_session=True), self.ready_file.exists,
                     "stubborn")
        return self


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_server_that_ignores_sigterm_is_killed_with_its_children_after_the_grace_period(tmp_path: Path) -> None:
    server = Stubborn(tmp_path).start()
    assert server.process is not None
    pid, child = server.process.pid, int(server.child_pid.read_text())
    server.kill(signal.SIGTERM, grace_s=0.5)  # what stop() does, with a short grace
    assert not alive(pid) and not alive(child) and server.process is None


def test_services_a_failed_test_left_running_are_reaped(tmp_path: Path) -> None:
    left = Stubborn(tmp_path).start()  # as if the test failed before stopping it
    assert left.process is not None
    pid, child = left.process.pid, int(left.child_pid.read_text())
    services.reap_all()  # what the pytest plugin runs at the end of the session (and atexit)
    assert not alive(pid) and not alive(child)


def test_a_service_that_never_becomes_ready_is_killed_before_start_fails(tmp_path: Path) -> None:
    started: list[int] = []

    def times_out(ready: Any, process: subprocess.Popen[bytes], what: str) -> None:
        started.append(process.pid)
        raise AssertionError(f"{what} did not become ready in 30s")  # what _wait says when its time is up

    with mock.patch.object(services, "_wait", times_out), pytest.raises(AssertionError, match="did not become ready"):
        Stubborn(tmp_path).start()
    assert started and not alive(started[0])
