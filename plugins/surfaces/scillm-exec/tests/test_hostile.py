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
