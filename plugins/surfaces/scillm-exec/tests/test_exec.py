"""scillm exec with a fake CLI: bounds, process-group kill, artifacts, schema, roots, run keys, graphs, SSE."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
from scillm_exec import group_members
from scillm_exec_helpers import MASTER_KEY, PROVIDER_SECRET, Server

from scillm_core.testing import Reply


def fresh_cwd(server: Server, name: str) -> Path:
    path = server.root / name
    path.mkdir()
    return path


def assert_no_process_left(cwd: Path) -> None:
    pids = json.loads((cwd / "pids.json").read_text())
    assert group_members(pids["pgid"]) == []
    for pid in [pids["pid"], *pids["children"]]:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        assert state == "Z", f"process {pid} still alive ({state})"


def test_completed_run_and_artifacts(server: Server) -> None:
    response = server.run('{"mode": "ok", "text": "all good"}')
    assert response.status_code == 200
    result = response.json()
    assert result["status"] == "completed" and result["exit_code"] == 0 and result["final_text"] == "all good"
    art = result["artifacts"]
    assert Path(art["run_dir"]) == server.data_dir / "runs" / result["run_id"]
    for key in ("events_jsonl", "stdout", "stderr"):
        assert Path(art[key]).is_file()
    events = [json.loads(line) for line in Path(art["events_jsonl"]).read_text().splitlines()]
    assert [e["type"] for e in events] == ["process.start", "start", "final", "process.end"]
    assert events[2]["event"] == {"type": "final", "text": "all good"}
    assert json.loads((Path(art["run_dir"]) / "result.json").read_text())["final_text"] == "all good"
    assert json.loads((Path(art["run_dir"]) / "status.json").read_text())["status"] == "completed"
    shown = server.client.get(f"/v1/scillm/exec/{result['run_id']}").json()
    assert shown["status"] == "completed" and shown["final_text"] == "all good"


def test_timeout_kills_the_whole_group(server: Server) -> None:
    cwd = fresh_cwd(server, "timeout")
    started = time.monotonic()
    result = server.run('{"mode": "sleep"}', cwd=str(cwd), timeout_s=1.5,
                        sandbox="workspace-write").json()
    elapsed = time.monotonic() - started
    assert result["status"] == "timeout" and "timeout_s=1.5" in result["error"]
    assert elapsed < 6
    assert_no_process_left(cwd)  # the CLI ignored SIGTERM, and so did its child: SIGKILL got both


def test_idle_timeout_and_sse_heartbeats(server: Server) -> None:
    cwd = fresh_cwd(server, "idle")
    started = server.run('{"mode": "idle"}', cwd=str(cwd), timeout_s=30, idle_timeout_s=1.2, wait=False,
                         sandbox="workspace-write")
    assert started.status_code == 202
    run_id = started.json()["run_id"]
    frames = []
    with server.client.stream("GET", f"/v1/scillm/exec/{run_id}/events") as stream:
        for line in stream.iter_lines():
            frames.append(line)
    result = server.client.get(f"/v1/scillm/exec/{run_id}").json()
    assert result["status"] == "timeout" and "idle_timeout_s=1.2" in result["error"]
    assert ": heartbeat" in frames
    data = [json.loads(f[6:]) for f in frames if f.startswith("data: ")]
    assert data[-1] == {"type": "run.end", "run_id": run_id, "status": "timeout", "exit_code": -9}
    assert "working" in [d.get("type") for d in data]
    assert "event: end" in frames[-3:]
    assert_no_process_left(cwd)


def test_cancel_mid_run(server: Server) -> None:
    cwd = fresh_cwd(server, "cancel")
    run_id = server.run('{"mode": "sleep"}', cwd=str(cwd), timeout_s=60, wait=False,
                        sandbox="workspace-write").json()["run_id"]
    deadline = time.monotonic() + 15
    while not (cwd / "pids.json").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert server.client.get(f"/v1/scillm/exec/{run_id}").json()["status"] == "running"
    cancelled = server.client.post(f"/v1/scillm/exec/{run_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert_no_process_left(cwd)
    assert server.client.get(f"/v1/scillm/exec/{run_id}").json()["status"] == "cancelled"
    events = Path(cancelled.json()["artifacts"]["events_jsonl"]).read_text().splitlines()
    assert json.loads(events[-1])["status"] == "cancelled"


def test_large_lines_do_not_break_the_reader(server: Server) -> None:
    result = server.run('{"mode": "huge", "mb": 6}', timeout_s=60).json()
    assert result["status"] == "completed" and result["final_text"] == "after huge lines"
    art = result["artifacts"]
    assert os.path.getsize(art["stdout"]) > 6 * 1024 * 1024
    assert os.path.getsize(art["stderr"]) >= 200000
    events = [json.loads(line) for line in Path(art["events_jsonl"]).read_text().splitlines()]
    blob = next(e for e in events if e["type"] == "blob")
    assert len(blob["event"]["data"]) == 6 * 1024 * 1024
    text = next(e for e in events if e["type"] == "output")
    assert text["bytes"] == 300000 and text["truncated"] is True


def test_output_schema_parsed_and_checked(server: Server) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    ok = server.run(json.dumps({"mode": "ok", "text": 'Result:\n```json\n{"answer": 42}\n```'}),
                    output_schema=schema).json()
    assert ok["status"] == "completed" and ok["result"] == {"answer": 42}
    bad = server.run(json.dumps({"mode": "ok", "text": '{"answer": "many"}'}), output_schema=schema).json()
    assert bad["status"] == "failed" and "at $.answer:" in bad["error"] and bad["result"] is None
    prose = server.run(json.dumps({"mode": "ok", "text": "no json here"}), output_schema=schema).json()
    assert prose["status"] == "failed" and "not JSON" in prose["error"]
    invalid = server.run("{}", output_schema={"type": 12})
    assert invalid.status_code == 400 and invalid.json()["error"]["param"] == "$.output_schema.type"


def test_failed_cli(server: Server) -> None:
    result = server.run('{"mode": "fail"}').json()
    assert result["status"] == "failed" and result["exit_code"] == 3
    assert Path(result["artifacts"]["stderr"]).read_text() == "fake failure\n"


def test_bad_requests_are_400_naming_the_field(server: Server, tmp_path: Path) -> None:
    outside = server.run("{}", cwd=str(tmp_path))
    assert outside.status_code == 400 and "outside the allowed roots" in outside.json()["error"]["message"]
    assert outside.json()["error"]["param"] == "$.cwd"
    escape = server.run("{}", cwd=str(server.root / ".." / tmp_path.name))
    assert escape.status_code == 400
    assert server.run("{}", cwd="relative/dir").status_code == 400
    unknown = server.run("{}", profile="nope")
    assert unknown.status_code == 400 and "fake" in unknown.json()["error"]["message"]
    assert server.run("{}", sandbox="yolo").json()["error"]["param"] == "$.sandbox"
    assert server.run("{}", timeout_s=-1).json()["error"]["param"] == "$.timeout_s"
    assert server.run("{}", shell="rm -rf /").json()["error"]["param"] == "$.shell"
    no_caller = httpx.post(server.url + "/v1/scillm/exec", json={"profile": "fake", "prompt": "x"},
                           headers={"authorization": f"Bearer {MASTER_KEY}"})
    assert no_caller.status_code == 400 and "X-Caller-Skill" in no_caller.json()["error"]["message"]
    assert server.client.get("/v1/scillm/exec/run_" + "0" * 32).status_code == 404
    assert server.client.get("/v1/scillm/exec/..%2F..%2Fetc").status_code == 404


def test_run_key_reaches_models_only_and_dies_with_the_run(server: Server) -> None:
    server.fake.script(Reply.say("routed through scillm"))
    prompt = json.dumps({"mode": "call", "base": server.url, "model": "openai/fake-model"})
    result = server.run(prompt).json()
    assert result["status"] == "completed" and result["final_text"] == "routed through scillm"
    assert server.fake.last.headers["authorization"] == f"Bearer {PROVIDER_SECRET}"
    events = [json.loads(line) for line in Path(result["artifacts"]["events_jsonl"]).read_text().splitlines()]
    calls = next(e for e in events if e["type"] == "calls")["event"]["calls"]
    assert calls["/v1/scillm/exec"][0] == 403
    key = server.runner.keys[-1]
    assert key.startswith("sk-scillm-run-")
    after = httpx.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                       json={"model": "openai/fake-model", "messages": [{"role": "user", "content": "x"}]})
    assert after.status_code == 401
    for path in Path(result["artifacts"]["run_dir"]).iterdir():
        data = path.read_text()
        assert key not in data and MASTER_KEY not in data and PROVIDER_SECRET not in data


def test_child_env_is_scrubbed(server: Server) -> None:
    result = server.run('{"mode": "env"}').json()
    events = [json.loads(line) for line in Path(result["artifacts"]["events_jsonl"]).read_text().splitlines()]
    env = next(e for e in events if e["type"] == "env")["event"]["env"]
    assert "OPENAI_API_KEY" not in env and "SCILLM_MASTER_KEY" not in env
    assert PROVIDER_SECRET not in json.dumps(env) and MASTER_KEY not in json.dumps(env)
    assert env["SCILLM_API_KEY"] == "[redacted]"  # the run key, scrubbed from artifacts


def test_graph_failed_dependency_skips_dependant(server: Server) -> None:
    nodes = [{"id": "a", "profile": "fake", "prompt": '{"mode": "ok", "text": "A"}', "cwd": str(server.root)},
             {"id": "b", "profile": "fake", "prompt": '{"mode": "fail"}', "cwd": str(server.root)},
             {"id": "c", "profile": "fake", "prompt": '{"mode": "ok", "text": "C"}', "cwd": str(server.root),
              "depends_on": ["b"]}]
    response = server.client.post("/v1/scillm/exec/graph", json={"nodes": nodes, "max_concurrency": 2})
    assert response.status_code == 200
    graph = response.json()
    by_id = {n["id"]: n for n in graph["nodes"]}
    assert [n["id"] for n in graph["nodes"]] == ["a", "b", "c"]
    assert by_id["a"]["status"] == "completed" and by_id["a"]["final_text"] == "A"
    assert by_id["b"]["status"] == "failed" and by_id["b"]["exit_code"] == 3
    assert by_id["c"]["status"] == "skipped" and by_id["c"]["run_id"] is None and "'b'" in by_id["c"]["error"]
    assert graph["status"] == "failed"
    chain = [{"id": "x", "profile": "fake", "prompt": '{"mode": "ok", "text": "X"}', "cwd": str(server.root)},
             {"id": "y", "profile": "fake", "prompt": '{"mode": "ok", "text": "Y"}', "cwd": str(server.root),
              "depends_on": ["x"]}]
    ok = server.client.post("/v1/scillm/exec/graph", json={"nodes": chain, "max_concurrency": 1}).json()
    assert ok["status"] == "completed" and [n["status"] for n in ok["nodes"]] == ["completed", "completed"]


def test_graph_cycles_and_unknown_dependencies_are_400(server: Server) -> None:
    node = {"profile": "fake", "prompt": "{}", "cwd": str(server.root)}
    cycle = server.client.post("/v1/scillm/exec/graph", json={"nodes": [
        {"id": "a", **node, "depends_on": ["b"]}, {"id": "b", **node, "depends_on": ["a"]}]})
    assert cycle.status_code == 400 and "cycle" in cycle.json()["error"]["message"]
    unknown = server.client.post("/v1/scillm/exec/graph", json={"nodes": [
        {"id": "a", **node, "depends_on": ["ghost"]}]})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "$.nodes[0].depends_on[0]"
    missing = server.client.post("/v1/scillm/exec/graph", json={"nodes": []})
    assert missing.status_code == 400


def test_scillm_exec_command(server: Server, tmp_path: Path) -> None:
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "scillm_core.cli", "exec", "fake", "--url", server.url, *args],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "SCILLM_MASTER_KEY": MASTER_KEY})

    ok = cli("--prompt", '{"mode": "ok", "text": "from the command"}', "--cwd", str(server.root),
             "--sandbox", "workspace-write", "--timeout", "30")
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["status"] == "completed" and result["final_text"] == "from the command"
    assert result["caller"] == "scillm-cli"
    failed = cli("--prompt", '{"mode": "fail"}', "--cwd", str(server.root))
    assert failed.returncode == 1 and json.loads(failed.stdout)["exit_code"] == 3
    refused = cli("--prompt", "x", "--cwd", str(tmp_path))
    assert refused.returncode == 2 and "outside the allowed roots" in refused.stderr
    assert MASTER_KEY not in refused.stderr + ok.stdout


def _writes(server: Server, name: str, sandbox: str) -> tuple[Path, Path, dict[str, Any], dict[str, str]]:
    cwd = fresh_cwd(server, name)
    outside = server.root / f"{name}-outside.txt"  # inside the allowed roots, outside this run's cwd
    paths = [str(cwd / "inside.txt"), str(outside), "$HOME/home.txt", "$TMPDIR/tmp.txt", f"/tmp/{name}-stray.txt"]
    result = server.run(json.dumps({"mode": "write", "paths": paths}), cwd=str(cwd), sandbox=sandbox).json()
    events = [json.loads(line) for line in Path(result["artifacts"]["events_jsonl"]).read_text().splitlines()]
    writes = next(e["event"]["writes"] for e in events if e["type"] == "writes")
    return cwd, outside, result, {Path(k).name: v for k, v in writes.items()}


def test_read_only_is_enforced_for_a_cli_that_ignores_its_flag(server: Server) -> None:
    cwd, outside, result, writes = _writes(server, "ro", "read-only")
    assert result["status"] == "completed"
    assert not (cwd / "inside.txt").exists() and not outside.exists() and not Path("/tmp/ro-stray.txt").exists()
    assert writes["inside.txt"] == writes["ro-outside.txt"] == writes["ro-stray.txt"] == "Read-only file system"
    assert writes["home.txt"] == writes["tmp.txt"] == "written"  # the run's own HOME and TMPDIR stay writable
    start = json.loads(Path(result["artifacts"]["events_jsonl"]).read_text().splitlines()[0])
    assert start["sandbox"] == "read-only" and start["sandbox_enforced"] is True


def test_workspace_write_cannot_write_outside_cwd(server: Server) -> None:
    cwd, outside, result, writes = _writes(server, "ww", "workspace-write")
    assert result["status"] == "completed"
    assert (cwd / "inside.txt").read_text() == "written by a CLI that ignores its sandbox\n"
    assert writes["inside.txt"] == writes["home.txt"] == "written"
    assert not outside.exists() and not Path("/tmp/ww-stray.txt").exists()
    assert writes["ww-outside.txt"] == writes["ww-stray.txt"] == "Read-only file system"


def test_a_sandbox_that_cannot_be_set_up_never_starts_the_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    from scillm_exec import sandbox

    marker = tmp_path / "ran"
    proc = subprocess.run([sys.executable, "-I", sandbox.__file__, "--writable", str(tmp_path / "missing"), "--",
                           "touch", str(marker)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == sandbox.SANDBOX_FAILED and not marker.exists()
    assert proc.stderr.startswith("scillm sandbox: cannot make the file tree read-only")


def test_run_key_straddling_a_read_boundary_is_redacted_everywhere(server: Server) -> None:
    result = server.run('{"mode": "leak"}').json()
    key = server.runner.keys[-1]
    assert result["status"] == "completed"
    stdout = Path(result["artifacts"]["stdout"]).read_bytes()
    assert b"[redacted] <- the run key" in stdout and len(stdout) > 65536  # the key was split across two reads
    for path in Path(result["artifacts"]["run_dir"]).iterdir():
        assert key.encode() not in path.read_bytes(), path.name
    assert key not in json.dumps(result)


def test_run_key_opens_exactly_the_model_routes(server: Server) -> None:
    server.fake.script(Reply.say("ok"))
    prompt = json.dumps({"mode": "call", "base": server.url, "model": "openai/fake-model",
                         "get": ["/v1/models", "/v1/scillm/opencode-go/models", "/v1/scillm/calls"]})
    result = server.run(prompt).json()
    events = [json.loads(line) for line in Path(result["artifacts"]["events_jsonl"]).read_text().splitlines()]
    calls = next(e for e in events if e["type"] == "calls")["event"]["calls"]
    assert calls["/v1/models"][0] == 200
    assert calls["/v1/scillm/opencode-go/models"][0] == 403  # ends like a model route, is not one
    assert calls["/v1/scillm/calls"][0] == 403


def test_cwd_with_nul_is_400_in_runs_and_graph_nodes(server: Server) -> None:
    run = server.run("{}", cwd=str(server.root) + "/a\x00b")
    assert run.status_code == 400 and run.json()["error"]["param"] == "$.cwd"
    node = {"id": "a", "profile": "fake", "prompt": "{}", "cwd": str(server.root) + "\x00"}
    graph = server.client.post("/v1/scillm/exec/graph", json={"nodes": [node]})
    assert graph.status_code == 400 and graph.json()["error"]["param"] == "$.nodes[0].cwd"


def test_a_thousand_node_graph_listed_leaf_first_is_checked_without_recursion(server: Server) -> None:
    node = {"profile": "fake", "prompt": "{}", "cwd": str(server.root)}
    nodes = [{"id": f"n{i}", **node, "depends_on": [f"n{i + 1}"]} for i in range(1000)]
    nodes.append({"id": "n1000", **node, "depends_on": ["n0"]})  # closes the cycle at the far end
    response = server.client.post("/v1/scillm/exec/graph", json={"nodes": nodes})
    assert response.status_code == 400 and "dependency cycle: n0 -> n1 -> n2" in response.json()["error"]["message"]


def test_a_long_acyclic_chain_has_no_cycle() -> None:
    from scillm_exec import find_cycle

    chain = {f"n{i}": [f"n{i + 1}"] for i in range(5000)} | {"n5000": []}
    assert find_cycle(chain) is None
    assert find_cycle({**chain, "n5000": ["n4990"]})[:2] == ["n4990", "n4991"]


def test_events_after_that_is_not_a_plain_integer_is_400(server: Server) -> None:
    run_id = server.run('{"mode": "ok"}').json()["run_id"]
    for value in ("²", "9" * 5000, "-1"):
        response = server.client.get(f"/v1/scillm/exec/{run_id}/events", params={"after": value})
        assert response.status_code == 400 and response.json()["error"]["param"] == "query.after"


def test_output_schema_never_fetches_and_never_loops(server: Server) -> None:
    from scillm_core.testing import SilentListener

    with SilentListener() as listener:
        remote = server.run("{}", output_schema={"properties": {"a": {"$ref": listener.url + "/s.json"}}})
        assert remote.status_code == 400
        assert remote.json()["error"]["param"] == "$.output_schema.properties.a.$ref"
        assert listener.connections == 0
    looping = server.run("{}", output_schema={"$ref": "#"})
    assert looping.status_code == 400 and looping.json()["error"]["param"] == "$.output_schema"
