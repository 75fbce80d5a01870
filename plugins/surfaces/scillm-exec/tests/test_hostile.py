"""Hostile input at the exec surface: names the file system cannot take, cursors, huge names, cancel races."""

from __future__ import annotations

import os

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
