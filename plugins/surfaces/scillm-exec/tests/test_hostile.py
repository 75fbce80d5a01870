"""Hostile input at the exec surface: names the file system cannot take, cursors, huge names, cancel races."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from scillm_exec_helpers import Server


def test_cwd_the_file_system_cannot_resolve_is_400_not_500(server: Server) -> None:
    loops = server.root / "loops"
    loops.mkdir()
    os.symlink("b", loops / "a")
    os.symlink("a", loops / "b")
    for cwd in (loops / "a", loops / "a" / "x", server.root / ("n" * 300)):
        response = server.run("{}", cwd=str(cwd))
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "$.cwd" and "cannot be resolved" in error["message"]
        node = {"id": "n", "profile": "fake", "prompt": "{}", "cwd": str(cwd)}
        graph = server.client.post("/v1/scillm/exec/graph", json={"nodes": [node]})
        assert graph.status_code == 400 and graph.json()["error"]["param"] == "$.nodes[0].cwd"


def test_event_stream_resumes_from_last_event_id(server: Server) -> None:
    """An EventSource reconnects with ``Last-Event-ID`` (the ``id:`` of the last frame it got); it used to get the
    whole run again, and the frames carried no ``id:`` to resume from."""
    run_id = server.run('{"mode": "ok", "text": "hi"}').json()["run_id"]
    whole = server.client.get(f"/v1/scillm/exec/{run_id}/events").text
    seqs = [int(line[4:]) for line in whole.splitlines() if line.startswith("id: ")]
    assert seqs == [1, 2, 3, 4]
    resumed = server.client.get(f"/v1/scillm/exec/{run_id}/events", headers={"last-event-id": "2"}).text
    assert [int(line[4:]) for line in resumed.splitlines() if line.startswith("id: ")] == [3, 4]
    assert resumed.rstrip().endswith('"status":"completed","exit_code":0}')
    # ?after= wins over the header; anything but a seq is a 400 naming where it came from
    after = server.client.get(f"/v1/scillm/exec/{run_id}/events", params={"after": 3},
                              headers={"last-event-id": "1"}).text
    assert [int(line[4:]) for line in after.splitlines() if line.startswith("id: ")] == [4]
    for hostile in (b"-1", b"1e3", b"9" * 40, "\u00b2".encode(), b"1; drop"):
        bad = server.client.get(f"/v1/scillm/exec/{run_id}/events", headers={"last-event-id": hostile})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID", hostile


def test_a_cancel_while_the_result_is_written_neither_hangs_nor_loses_it(server: Server, monkeypatch: Any) -> None:
    """The CLI has ended and the result is being checked against output_schema when a cancel arrives: the cancel
    used to interrupt the writing, so the run never finished (the cancel and every waiter hung, its record stayed
    ``running``, its event stream never ended). Now the result is written whatever arrives, and the cancel answers
    it."""
    import scillm_exec.manager as manager
    from scillm_exec.routes import _MANAGERS

    real = manager.schemas.errors_async
    cancels: list[asyncio.Future[Any]] = []

    async def check_meanwhile_cancelled(validator: Any, instance: Any, limit: int) -> Any:
        if instance == {"cancel": "meanwhile"}:  # this run: a cancel comes in while its result is checked
            owner = next(m for m in _MANAGERS.values() if any(r.status == "running" for r in m.runs.values()))
            run_id = next(r.run_id for r in owner.runs.values() if r.status == "running")
            cancels.append(asyncio.ensure_future(owner.cancel(run_id)))
            await asyncio.sleep(0)  # the cancel has reached the run (exactly what POST .../cancel does)
        return await real(validator, instance, limit)

    monkeypatch.setattr(manager.schemas, "errors_async", check_meanwhile_cancelled)
    response = server.run('{"mode": "ok", "text": "{\\"cancel\\": \\"meanwhile\\"}"}',
                          output_schema={"type": "object"})  # wait: true (hung until the client's timeout before)
    assert response.status_code == 200 and response.json()["status"] == "completed", response.text
    assert len(cancels) == 1 and cancels[0].done() and cancels[0].result()["status"] == "completed"
    run_id = response.json()["run_id"]
    cancelled = server.client.post(f"/v1/scillm/exec/{run_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "completed", cancelled.text
    shown = server.client.get(f"/v1/scillm/exec/{run_id}").json()
    assert shown["status"] == "completed" and shown["result"] == {"cancel": "meanwhile"}
    end = server.client.get(f"/v1/scillm/exec/{run_id}/events").text.rstrip().splitlines()[-1]
    assert end.startswith("data: ") and json.loads(end[6:])["status"] == "completed"


def test_huge_names_are_400s_that_do_not_echo_them(server: Server) -> None:
    """A 1 MB field name was echoed three times in its 400 (3 MB); a 1 MB model was taken (kept in every record,
    put on the CLI's argv); a 100 KB node id was taken and echoed in the graph's result."""
    name = "x" * 1_000_000
    unknown = server.client.post("/v1/scillm/exec", json={"profile": "fake", "prompt": "{}", name: 1})
    assert unknown.status_code == 400 and len(unknown.content) < 2000
    assert unknown.json()["error"]["param"] == "$." + "x" * 64
    model = server.run("{}", model="m" * 1_000_000)
    assert model.status_code == 400 and model.json()["error"]["param"] == "$.model" and len(model.content) < 2000
    for flag_like in ("-c", "--model", "a\x7fb", "a\nb"):  # on the CLI's argv and in its config.toml
        bad = server.run("{}", model=flag_like)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "$.model", flag_like
    node = {"profile": "fake", "prompt": "{}", "cwd": str(server.root)}
    for bad_id in ("a" * 129, "../x", "a\nb", ""):
        graph = server.client.post("/v1/scillm/exec/graph", json={"nodes": [{"id": bad_id, **node}]})
        assert graph.status_code == 400 and graph.json()["error"]["param"] == "$.nodes[0].id", bad_id
    unknown_node_field = server.client.post("/v1/scillm/exec/graph", json={"nodes": [{"id": "a", name: 1, **node}]})
    assert unknown_node_field.status_code == 400 and len(unknown_node_field.content) < 2000
    assert unknown_node_field.json()["error"]["param"] == "$.nodes[0]." + "x" * 64


def test_graph_wait_is_checked(server: Server) -> None:
    """A graph always answers with its result; ``wait`` used to take any value (``"x"``, ``false``) silently."""
    node = {"id": "a", "profile": "fake", "prompt": "{}", "cwd": str(server.root)}
    for wait in ("x", False, None, 1):
        graph = server.client.post("/v1/scillm/exec/graph", json={"nodes": [node], "wait": wait})
        assert graph.status_code == 400 and graph.json()["error"]["param"] == "$.wait", wait
    assert server.client.post("/v1/scillm/exec/graph", json={"nodes": [node], "wait": True}).status_code == 200


def test_a_finished_run_is_not_kept_in_memory(server: Server) -> None:
    """Every run (its prompt, up to 4 MiB, and its result) stayed in the manager's memory for the life of the
    server; a finished one is read back from its run dir, whatever route asks."""
    from scillm_exec.routes import _MANAGERS

    prompt = '{"mode": "ok", "text": "kept on disk"}\n' + "p" * (3 << 20)
    done = server.run(prompt)
    assert done.status_code == 200 and done.json()["status"] == "completed"
    run_id = done.json()["run_id"]
    assert not any(run_id in m.runs for m in _MANAGERS.values())
    shown = server.client.get(f"/v1/scillm/exec/{run_id}").json()
    assert shown["final_text"] == "kept on disk" and shown["status"] == "completed"
    assert server.client.post(f"/v1/scillm/exec/{run_id}/cancel").json()["status"] == "completed"
    events = server.client.get(f"/v1/scillm/exec/{run_id}/events").text
    assert '"text":"kept on disk"' in events and "event: end" in events


def test_a_huge_graph_is_checked_without_holding_the_event_loop(server: Server) -> None:
    """Checking a graph's nodes (each resolves its cwd) took the event loop for the whole graph, about 0.7 s for
    10,000 nodes, and every other caller of the process waited; now other work runs between steps of the check."""
    from scillm_exec.routes import _MANAGERS

    manager = next(m for m in _MANAGERS.values() if m.runtime.config.data_dir == server.data_dir)  # this server's
    nodes = [{"id": f"n{i}", "profile": "fake", "prompt": "{}", "cwd": str(server.root)} for i in range(1000)]
    order: list[str] = []

    async def parse() -> None:
        parsed, _ = await manager.parse_graph({"nodes": nodes})
        order.append(f"parsed {len(parsed)}")

    async def other_caller() -> None:
        order.append("other")

    async def both() -> None:
        await asyncio.gather(parse(), other_caller())  # the parse starts first

    asyncio.run(both())
    assert order == ["other", "parsed 1000"]
